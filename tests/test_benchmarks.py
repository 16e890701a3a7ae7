"""The GPU suite cannot rot: `benchmarks/gpu_suite.py --tiny` runs every section on the CPU in about a
minute and writes one JSON report with device, torch version, date and each measurement."""
import json

from conftest import run_script


def test_gpu_suite_tiny(tmp_path):
    """Every section is there with positive timings and sane ratios; the training run reached some accuracy."""
    out = tmp_path / "suite.json"
    run_script("benchmarks/gpu_suite.py", "--tiny", "--device", "cpu", "--out", out, timeout=900)
    r = json.loads(out.read_text())
    assert r["tiny"] is True and r["torch_version"] and r["date"] and r["device"].startswith("cpu")
    assert {"loader", "recipes", "training", "stages", "qat"} <= set(r)
    assert r["loader"]["plain_s_per_epoch"] > 0 and r["loader"]["ratio"] > 0
    assert all(v["s_per_epoch"] > 0 for v in r["recipes"].values()) and len(r["recipes"]) >= 3
    t = r["training"]
    assert t["s_per_epoch"] > 0 and t["projected_200_epochs_s"] == 200 * t["s_per_epoch"] and 0 <= t["test_acc"] <= 100
    assert set(r["stages"]) == {"2_per_layer_analysis.py", "3_greedy_search.py", "4_create_baselines.py"}
    assert all(v["wall_s"] > 0 and v["evaluations"] > 0 for v in r["stages"].values())
    assert r["qat"]["float_epoch_s"] > 0 and r["qat"]["ratio"] > 0
