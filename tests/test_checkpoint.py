"""Checkpoints (utils/checkpoint.py): our round trip, every accepted foreign format, and a
UserError (never a traceback) for everything else."""
from collections import OrderedDict

import pytest
import torch

from models.resnet import CifarResNet
from utils.checkpoint import (DEFAULT_NORMALIZATION, default_checkpoint_path, extract_state_dict,
                              load_model, read_checkpoint, save_checkpoint)
from utils.errors import UserError



class NotATensor:
    """A custom class: a pickle holding one needs arbitrary code to load, so weights_only refuses it."""

    def __init__(self):
        self.payload = [1, 2, 3]


def trained_like(depth=20, shortcut="B", seed=0, num_classes=10):
    """A model whose weights and BN statistics differ from a fresh init (so a load is visible)."""
    torch.manual_seed(seed)
    m = CifarResNet(depth, shortcut, num_classes)
    with torch.no_grad():
        for k, v in m.state_dict().items():
            if v.is_floating_point():
                v.copy_(torch.randn_like(v).abs() + 0.1 if "running_var" in k else torch.randn_like(v))
            else:
                v.fill_(7)
    return m


def assert_same_weights(model, state_dict):
    own = model.state_dict()
    assert set(own) == set(state_dict)
    for k, v in state_dict.items():
        assert torch.equal(own[k], v), k


def our_state(model, finished=True, **extra):
    return {"model": model.state_dict(), "model_args": dict(model.model_args), "epoch": 3, "epochs": 3,
            "finished": finished, "normalization": {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]},
            "data": {"name": "synthetic", "seed": 4, "val_size": 50}, **extra}


@pytest.mark.parametrize("depth,shortcut", [(20, "B"), (20, "A"), (32, "A")])
def test_round_trip(tmp_path, depth, shortcut):
    """save_checkpoint -> load_model rebuilds the same architecture from the file alone, with
    bit-identical weights, in eval mode, and returns the stored normalization and data info."""
    m = trained_like(depth, shortcut)
    path = default_checkpoint_path(tmp_path, depth)
    assert path.name == f"resnet{depth}_baseline.pt"
    save_checkpoint(path, our_state(m))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # the atomic write left no temp file
    loaded, meta = load_model(path)
    assert not loaded.training
    assert loaded.model_args == m.model_args
    assert_same_weights(loaded, m.state_dict())
    assert meta["model_args"] == m.model_args
    assert meta["normalization"] == {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}
    assert meta["data"] == {"name": "synthetic", "seed": 4, "val_size": 50}
    assert meta["finished"] is True and meta["foreign"] is False and meta["epoch"] == 3
    assert read_checkpoint(path)["checkpoint_version"] == 1


def _prefixed(sd):
    return OrderedDict(("module." + k, v) for k, v in sd.items())


FOREIGN_FORMATS = {
    "raw": lambda sd: sd,
    "state_dict": lambda sd: {"state_dict": sd, "best_prec1": 91.7, "epoch": 199},
    "model": lambda sd: {"model": sd, "optimizer": None},
    "raw+module": _prefixed,
    "state_dict+module": lambda sd: {"state_dict": _prefixed(sd), "best_prec1": 92.0},
    "model+module": lambda sd: {"model": _prefixed(sd)},
}


@pytest.mark.parametrize("fmt", FOREIGN_FORMATS)
@pytest.mark.parametrize("shortcut", ["B", "A"])
def test_foreign_formats_load(tmp_path, fmt, shortcut):
    """Raw state_dicts, {'state_dict': ...} and {'model': ...}, each with or without DataParallel's
    'module.' prefix, load bit-identically (resnet20 B by default, A when asked for), as foreign
    checkpoints with the default CIFAR-10 normalization."""
    m = trained_like(20, shortcut, seed=1)
    path = tmp_path / "foreign.pth"
    torch.save(FOREIGN_FORMATS[fmt](m.state_dict()), path)
    override = {"shortcut": "A"} if shortcut == "A" else None
    loaded, meta = load_model(path, override)
    assert_same_weights(loaded, m.state_dict())
    assert meta["foreign"] is True and meta["finished"] is True
    assert meta["normalization"] == DEFAULT_NORMALIZATION
    assert meta["model_args"]["shortcut"] == shortcut and meta["model_args"]["depth"] == 20


def test_override_none_keeps_checkpoint_values(tmp_path):
    """Override entries that are None (flags not given) do not replace the checkpoint's model_args."""
    m = trained_like(32, "A", seed=2)
    save_checkpoint(tmp_path / "c.pt", our_state(m))
    loaded, meta = load_model(tmp_path / "c.pt", {"depth": None, "shortcut": None})
    assert meta["model_args"]["depth"] == 32 and meta["model_args"]["shortcut"] == "A"
    assert_same_weights(loaded, m.state_dict())


def test_missing_num_batches_tracked_still_loads(tmp_path):
    """State dicts from PyTorch < 0.4.1 lack BN's num_batches_tracked: they load, every other
    tensor bit-identical."""
    m = trained_like(20, "A", seed=3)
    sd = OrderedDict((k, v) for k, v in m.state_dict().items() if not k.endswith("num_batches_tracked"))
    assert len(sd) < len(m.state_dict())
    torch.save({"state_dict": _prefixed(sd)}, tmp_path / "old.th")
    loaded, _ = load_model(tmp_path / "old.th", {"shortcut": "A"})
    own = loaded.state_dict()
    for k, v in sd.items():
        assert torch.equal(own[k], v), k


def test_missing_and_unexpected_keys_named(tmp_path):
    """A state dict with one key missing and one extra key fails with a UserError naming both."""
    sd = OrderedDict(trained_like(20, "B").state_dict())
    del sd["layer3.2.conv2.weight"]
    sd["fc.weight"] = torch.zeros(10, 64)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(UserError) as e:
        load_model(tmp_path / "bad.pt")
    msg = str(e.value)
    assert "layer3.2.conv2.weight" in msg and "fc.weight" in msg
    assert "missing keys" in msg and "unexpected keys" in msg


def test_shape_mismatch_is_user_error(tmp_path):
    """Same names, other shapes (a 100-class head) fail with a UserError naming the tensor."""
    torch.save(trained_like(20, "B", num_classes=100).state_dict(), tmp_path / "c100.pt")
    with pytest.raises(UserError, match="linear.weight"):
        load_model(tmp_path / "c100.pt")


@pytest.mark.parametrize("saved,override,named", [
    ((20, "A"), None, "layer2.0.shortcut.0.weight"),       # foreign A loaded as the default B
    ((20, "B"), {"shortcut": "A"}, "layer2.0.shortcut.0.weight"),
    ((32, "B"), None, "layer1.3.conv1.weight"),             # foreign resnet32 loaded as resnet20
    ((20, "B"), {"depth": 32}, "layer1.3.conv1.weight"),
])
def test_other_architecture_is_user_error(tmp_path, saved, override, named):
    """A checkpoint of another architecture (A vs B, depth 32 vs 20) gives a UserError that
    names an offending key, never a traceback or a silently partial load."""
    torch.save({"state_dict": trained_like(*saved).state_dict()}, tmp_path / "other.pt")
    with pytest.raises(UserError, match=named.replace(".", r"\.")):
        load_model(tmp_path / "other.pt", override)


def test_our_checkpoint_with_wrong_override_is_user_error(tmp_path):
    save_checkpoint(tmp_path / "a.pt", our_state(trained_like(20, "A")))
    with pytest.raises(UserError, match="shortcut"):
        load_model(tmp_path / "a.pt", {"shortcut": "B"})
    with pytest.raises(UserError):
        load_model(tmp_path / "a.pt", {"depth": 21})  # not 6n+2: UserError, not ValueError


def test_truncated_file_is_user_error(tmp_path):
    """A real checkpoint cut in half (an interrupted copy) gives a UserError saying so."""
    path = tmp_path / "cut.pt"
    save_checkpoint(path, our_state(trained_like()))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated"):
        load_model(path)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all\n", b"PK\x03\x04garbage"])
def test_garbage_file_is_user_error(tmp_path, content):
    path = tmp_path / "junk.pt"
    path.write_bytes(content)
    with pytest.raises(UserError):
        load_model(path)


def test_pickled_object_refused(tmp_path):
    """A checkpoint holding a custom class instance is refused by weights_only loading (it could
    run arbitrary code) with a UserError; the object's __init__/__setstate__ never runs."""
    m = trained_like()
    torch.save({"state_dict": m.state_dict(), "extra": NotATensor()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="only tensors and plain Python values"):
        load_model(tmp_path / "evil.pt")
    torch.save(m, tmp_path / "whole_module.pt")  # a pickled nn.Module: same refusal
    with pytest.raises(UserError):
        load_model(tmp_path / "whole_module.pt")


@pytest.mark.parametrize("obj", [[1, 2, 3], {"epoch": 3}, {}, torch.zeros(3), {"model": "resnet20"}])
def test_no_weights_is_user_error(tmp_path, obj):
    """Loadable files without weights are refused with a UserError, not a KeyError/AttributeError."""
    torch.save(obj, tmp_path / "empty.pt")
    with pytest.raises(UserError):
        load_model(tmp_path / "empty.pt")


def test_missing_file_is_user_error(tmp_path):
    with pytest.raises(UserError, match="1_train_baseline.py"):
        load_model(tmp_path / "nope.pt")
    with pytest.raises(UserError):
        load_model(tmp_path)  # a folder, not a file


def test_unfinished_checkpoint_refused(tmp_path):
    """An unfinished training checkpoint is refused when a finished one is required (the message
    says how to finish it), and loads with require_finished=False, flagged unfinished."""
    m = trained_like(20, "B", seed=5)
    path = tmp_path / "partial.pt"
    save_checkpoint(path, our_state(m, finished=False, epoch=1, epochs=3))
    with pytest.raises(UserError, match="--resume"):
        load_model(path, require_finished=True)
    loaded, meta = load_model(path, require_finished=False)
    assert meta["finished"] is False and meta["epoch"] == 1
    assert_same_weights(loaded, m.state_dict())


def test_extract_state_dict_prefers_model_entry():
    """{'model': sd} wins over a 'state_dict' entry; only a leading 'module.' is stripped."""
    a, b = {"w": torch.ones(1)}, {"w": torch.zeros(1)}
    assert extract_state_dict({"model": a, "state_dict": b})["w"].item() == 1
    assert list(extract_state_dict({"module.layer.module.x": torch.ones(1)})) == ["layer.module.x"]
    with pytest.raises(UserError):
        extract_state_dict({"w": torch.ones(1), "note": "text"})
