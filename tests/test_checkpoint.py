"""Checkpoints (utils/checkpoint.py): our round trip, every accepted foreign format, and a
UserError (never a traceback) for everything else."""
from collections import OrderedDict

import pytest
import torch

from models import build_model
from utils.checkpoint import (DEFAULT_NORMALIZATION, NORMALIZATIONS, default_checkpoint_path, extract_state_dict,
                              load_model, parse_normalization, read_checkpoint, save_checkpoint, slim_checkpoint)
from utils.errors import UserError



class NotATensor:
    """A custom class: a pickle holding one needs arbitrary code to load, so weights_only refuses it."""

    def __init__(self):
        self.payload = [1, 2, 3]


def trained_like(depth=20, shortcut="B", seed=0, num_classes=10, arch=None):
    """A model whose weights and BN statistics differ from a fresh init (so a load is visible)."""
    torch.manual_seed(seed)
    m = build_model(arch, None, num_classes) if arch else build_model(f"resnet{depth}", shortcut, num_classes)
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
    path = default_checkpoint_path(tmp_path, f"resnet{depth}")
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
    assert read_checkpoint(path)["checkpoint_version"] == 2


def _prefixed(sd, prefix="module."):
    return OrderedDict((prefix + k, v) for k, v in sd.items())


FOREIGN_FORMATS = {
    "raw": lambda sd: sd,
    "state_dict": lambda sd: {"state_dict": sd, "best_prec1": 91.7, "epoch": 199},
    "model": lambda sd: {"model": sd, "optimizer": None},
    "net": lambda sd: {"net": sd, "acc": 95.1, "epoch": 199},         # kuangliu/pytorch-cifar
    "raw+module": _prefixed,
    "state_dict+module": lambda sd: {"state_dict": _prefixed(sd), "best_prec1": 92.0},
    "model+module": lambda sd: {"model": _prefixed(sd)},
    "raw+compile": lambda sd: _prefixed(sd, "_orig_mod."),              # torch.compile
    "net+module+compile": lambda sd: {"net": _prefixed(sd, "module._orig_mod.")},
}


@pytest.mark.parametrize("fmt", FOREIGN_FORMATS)
@pytest.mark.parametrize("shortcut", ["B", "A"])
def test_foreign_formats_load(tmp_path, fmt, shortcut):
    """Plain state_dicts, {'state_dict': ...}, {'model': ...} and {'net': ...}, with or without
    DataParallel's 'module.' and torch.compile's '_orig_mod.' prefixes, load bit-identically (resnet20 B
    by default, A when asked for), as foreign checkpoints with the default CIFAR-10 normalization."""
    m = trained_like(20, shortcut, seed=1)
    path = tmp_path / "foreign.pth"
    torch.save(FOREIGN_FORMATS[fmt](m.state_dict()), path)
    loaded, meta = load_model(path, shortcut="A" if shortcut == "A" else None)
    assert_same_weights(loaded, m.state_dict())
    assert meta["foreign"] is True and meta["finished"] is True
    assert meta["normalization"] == DEFAULT_NORMALIZATION and "default" in meta["normalization_source"]
    assert meta["model_args"] == {"arch": "resnet20", "shortcut": shortcut, "num_classes": 10}


def test_foreign_mobilenetv2_in_kuangliu_format(tmp_path):
    """kuangliu/pytorch-cifar saves {'net': DataParallel state_dict, 'acc', 'epoch'}: it loads as mobilenetv2."""
    m = trained_like(arch="mobilenetv2", seed=4)
    torch.save({"net": _prefixed(m.state_dict()), "acc": 94.4, "epoch": 199}, tmp_path / "ckpt.pth")
    loaded, meta = load_model(tmp_path / "ckpt.pth", arch="mobilenetv2", normalization=parse_normalization("imagenet"))
    assert_same_weights(loaded, m.state_dict())
    assert meta["model_args"] == {"arch": "mobilenetv2", "num_classes": 10}
    assert meta["normalization"] == NORMALIZATIONS["imagenet"] and meta["normalization_source"] == "--normalization"


def test_mismatch_names_the_closest_architecture(tmp_path):
    """Loaded as the default resnet20, a resnet56 / mobilenetv2 state dict fails with a message naming
    the registered architecture its keys fit (exactly, with the flags to pass)."""
    torch.save(trained_like(56, "A").state_dict(), tmp_path / "r56.pt")
    with pytest.raises(UserError, match=r"fit resnet56 \(shortcut A\) exactly: pass --arch resnet56 --shortcut A"):
        load_model(tmp_path / "r56.pt")
    torch.save(trained_like(arch="mobilenetv2").state_dict(), tmp_path / "mbv2.pt")
    with pytest.raises(UserError, match="--arch mobilenetv2"):
        load_model(tmp_path / "mbv2.pt")


def test_normalization_flag():
    """cifar10 = stage 1's statistics, imagenet, or six numbers; anything else is a UserError."""
    assert parse_normalization(None) is None
    assert parse_normalization("cifar10") == {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616]}
    assert parse_normalization("imagenet") == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert parse_normalization("0.5,0.5,0.5,0.25,0.25,0.25") == {"mean": [0.5] * 3, "std": [0.25] * 3}
    for bad in ("cifar100", "1,2,3", "0.5,0.5,0.5,0,0.2,0.2", "a,b,c,d,e,f"):
        with pytest.raises(UserError, match="--normalization"):
            parse_normalization(bad)


def test_our_normalization_cannot_be_overridden(tmp_path):
    """A checkpoint that records its normalization refuses a conflicting --normalization (equal is fine)."""
    m = trained_like(20, "B")
    save_checkpoint(tmp_path / "c.pt", our_state(m))
    with pytest.raises(UserError, match="normalization"):
        load_model(tmp_path / "c.pt", normalization=parse_normalization("imagenet"))
    _, meta = load_model(tmp_path / "c.pt", normalization={"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]})
    assert meta["normalization_source"] == "recorded in the checkpoint"


def test_legacy_model_args_still_load(tmp_path):
    """Checkpoints written before the registry record {"arch": "resnet", "depth": N}: they load as resnetN."""
    m = trained_like(32, "A", seed=2)
    save_checkpoint(tmp_path / "c.pt", our_state(m) | {"model_args": {"arch": "resnet", "depth": 32, "shortcut": "A",
                                                                       "num_classes": 10}})
    loaded, meta = load_model(tmp_path / "c.pt")
    assert meta["model_args"] == {"arch": "resnet32", "shortcut": "A", "num_classes": 10}
    assert_same_weights(loaded, m.state_dict())


def test_flags_not_given_keep_checkpoint_values(tmp_path):
    """Flags left out (None) do not replace the checkpoint's model_args."""
    m = trained_like(32, "A", seed=2)
    save_checkpoint(tmp_path / "c.pt", our_state(m))
    loaded, meta = load_model(tmp_path / "c.pt", arch=None, shortcut=None)
    assert meta["model_args"] == {"arch": "resnet32", "shortcut": "A", "num_classes": 10}
    assert_same_weights(loaded, m.state_dict())


def test_slim_checkpoint(tmp_path):
    """A finished checkpoint slims to one without optimizer state that loads to the same model; an
    unfinished one is refused."""
    m = trained_like(20, "B", seed=6)
    save_checkpoint(tmp_path / "full.pt", our_state(m, optimizer={"state": {}, "param_groups": []}, scheduler={}))
    slim_checkpoint(tmp_path / "full.pt", tmp_path / "slim.pt")
    ck = read_checkpoint(tmp_path / "slim.pt")
    assert "optimizer" not in ck and "scheduler" not in ck and ck["finished"] is True
    assert_same_weights(load_model(tmp_path / "slim.pt")[0], m.state_dict())
    save_checkpoint(tmp_path / "partial.pt", our_state(m, finished=False))
    with pytest.raises(UserError, match="finished"):
        slim_checkpoint(tmp_path / "partial.pt", tmp_path / "x.pt")


def test_missing_num_batches_tracked_still_loads(tmp_path):
    """State dicts from PyTorch < 0.4.1 lack BN's num_batches_tracked: they load, every other
    tensor bit-identical."""
    m = trained_like(20, "A", seed=3)
    sd = OrderedDict((k, v) for k, v in m.state_dict().items() if not k.endswith("num_batches_tracked"))
    assert len(sd) < len(m.state_dict())
    torch.save({"state_dict": _prefixed(sd)}, tmp_path / "old.th")
    loaded, _ = load_model(tmp_path / "old.th", shortcut="A")
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
    ((20, "A"), {}, "layer2.0.shortcut.0.weight"),       # foreign A loaded as the default B
    ((20, "B"), {"shortcut": "A"}, "layer2.0.shortcut.0.weight"),
    ((32, "B"), {}, "layer1.3.conv1.weight"),             # foreign resnet32 loaded as resnet20
    ((20, "B"), {"arch": "resnet32"}, "layer1.3.conv1.weight"),
])
def test_other_architecture_is_user_error(tmp_path, saved, override, named):
    """A checkpoint of another architecture (A vs B, depth 32 vs 20) gives a UserError that
    names an offending key, never a traceback or a silently partial load."""
    torch.save({"state_dict": trained_like(*saved).state_dict()}, tmp_path / "other.pt")
    with pytest.raises(UserError, match=named.replace(".", r"\.")):
        load_model(tmp_path / "other.pt", **override)


def test_our_checkpoint_with_wrong_override_is_user_error(tmp_path):
    save_checkpoint(tmp_path / "a.pt", our_state(trained_like(20, "A")))
    with pytest.raises(UserError, match="shortcut"):
        load_model(tmp_path / "a.pt", shortcut="B")
    with pytest.raises(UserError, match="--arch resnet32"):
        load_model(tmp_path / "a.pt", arch="resnet32")
    with pytest.raises(UserError, match="unknown architecture"):   # foreign: a UserError, not a ValueError
        torch.save(trained_like(20, "A").state_dict(), tmp_path / "raw.pt")
        load_model(tmp_path / "raw.pt", arch="resnet21")


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
    """{'model': sd} wins over a 'state_dict' entry; only leading 'module.' / '_orig_mod.' are stripped."""
    a, b = {"w": torch.ones(1)}, {"w": torch.zeros(1)}
    assert extract_state_dict({"model": a, "state_dict": b})["w"].item() == 1
    assert list(extract_state_dict({"module.layer.module.x": torch.ones(1)})) == ["layer.module.x"]
    with pytest.raises(UserError):
        extract_state_dict({"w": torch.ones(1), "note": "text"})
