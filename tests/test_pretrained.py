"""The model shipped in pretrained/ loads from the file alone and is described by its 01_baseline.json."""
import json

import pytest

from conftest import REPO
from utils.checkpoint import load_model, read_checkpoint
from utils.io import PRODUCERS, load_results_json, sha256_file

SHIPPED = REPO / "pretrained" / "resnet20_cifar10jpeg_30ep.pt"


@pytest.mark.skipif(not SHIPPED.exists(), reason="no shipped model in this checkout")
def test_shipped_baseline():
    """weights_only-loadable, finished, no optimizer state, its split identity recorded; 01_baseline.json names
    it by a repository-relative path with its SHA-256, and records the data as ../shared/data/..."""
    model, meta = load_model(SHIPPED)
    ck = read_checkpoint(SHIPPED)
    assert meta["finished"] and ck["epoch"] == 30 and "optimizer" not in ck
    assert meta["model_args"] == {"arch": "resnet20", "shortcut": "B", "num_classes": 10}
    assert len(ck["data"]["split"]["val_indices"]) == 5000 and ck["data"]["data_dir"].startswith("../shared/data/")
    r = json.loads((SHIPPED.parent / "01_baseline.json").read_text())
    assert r["checkpoint"] == "pretrained/resnet20_cifar10jpeg_30ep.pt"
    assert r["provenance"]["inputs"]["checkpoint"]["sha256"] == sha256_file(SHIPPED)
    assert r["epochs"] == 30 and r["test_acc"] == ck["final"]["test_acc"]
    assert SHIPPED.stat().st_size < 1.5e6
    # stages 2-5 read it as it ships (stage 5 draws its training curve from it): its schema is current
    assert load_results_json(SHIPPED.parent / "01_baseline.json", "1", PRODUCERS["1"]) == r
