"""Checkpoints: ours carry everything the next stage needs to rebuild model and inputs;
foreign ones (plain state_dicts, DataParallel, torch.compile, {'net': ...}, {'state_dict': ...})
load too, with the architecture and input normalization given by flags."""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from models import arch_flags, build_from_args, closest_architectures, describe, normalize_model_args
from models.outside import build_outside, is_outside
from utils.errors import UserError, error_paragraph
from utils.io import atomic_torch_save

CHECKPOINT_VERSION = 2   # 2: registry model_args, split identity, weight-decay groups
# What --normalization names. "cifar10" is what stage 1 computes on CIFAR-10's 50,000 training images.
NORMALIZATIONS = {
    "cifar10": {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616]},
    "imagenet": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
}
DEFAULT_NORMALIZATION = NORMALIZATIONS["cifar10"]
_PREFIXES = ("module.", "_orig_mod.")   # DataParallel/DDP, torch.compile


def default_checkpoint_path(checkpoint_dir, arch: str = "resnet20") -> Path:
    return Path(checkpoint_dir) / f"{arch}_baseline.pt"


def parse_normalization(text: str | None) -> dict | None:
    """--normalization cifar10 | imagenet | m1,m2,m3,s1,s2,s3 -> {"mean": [...], "std": [...]}."""
    if text is None:
        return None
    if text in NORMALIZATIONS:
        return {k: list(v) for k, v in NORMALIZATIONS[text].items()}
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        vals = []
    if len(vals) != 6 or not all(s > 0 for s in vals[3:]):
        raise UserError(f"--normalization {text!r}: give cifar10, imagenet, or six numbers m1,m2,m3,s1,s2,s3 "
                        f"(per-channel mean and std of images scaled to [0, 1], stds > 0).")
    return {"mean": vals[:3], "std": vals[3:]}


def save_checkpoint(path, state: dict):
    atomic_torch_save({"checkpoint_version": CHECKPOINT_VERSION, **state}, path)


def read_checkpoint(path) -> dict:
    """torch.load with weights_only=True (a checkpoint is untrusted input), clear errors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist. Train one first with "
                        f"`python 1_train_baseline.py` (or pass --checkpoint PATH to an existing one).")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {path} could not be loaded ({first[:200]}). It is truncated, "
                        f"damaged or not a PyTorch weights file (only tensors and plain Python values "
                        f"are accepted). Re-train with `python 1_train_baseline.py --resume` or "
                        f"copy the file again.") from None
    return obj


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def extract_state_dict(obj) -> dict:
    """Accept a plain state_dict or one under 'model', 'state_dict' or 'net', with or without
    'module.' (DataParallel, DDP) and '_orig_mod.' (torch.compile) prefixes."""
    sd = None
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "net"):
            if isinstance(obj.get(key), dict):
                sd = obj[key]
                break
        if sd is None and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            sd = obj
    if sd is None:
        raise UserError("the checkpoint holds no model weights: expected a state_dict, or a dict with "
                        "a 'model', 'state_dict' or 'net' entry.")
    return {_strip(k): v for k, v in sd.items()}


def load_weights(model: torch.nn.Module, state_dict: dict, source: str = "checkpoint"):
    """Strict load that names missing/unexpected keys, shape mismatches and the closest architecture."""
    own = model.state_dict()
    # Checkpoints from PyTorch < 0.4.1 lack BN's num_batches_tracked, which eval never uses.
    missing = [k for k in own if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k}: {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
              for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        ma = getattr(model, "model_args", {})
        best = closest_architectures(state_dict, ma.get("num_classes", 10))
        args, score = best[0]
        hint = (f"The keys fit {describe(args)} exactly: pass {arch_flags(args)}" if score == 1.0 else
                f"The closest registered architecture is {describe(args)} ({100 * score:.0f}% of the tensors "
                f"fit; {arch_flags(args)})")
        if is_outside(ma.get("arch")) and not missing and not unexpected:
            hint = ("The names fit the --model network; check --num-classes (its classifier's outputs) and "
                    "--model-kwargs")
        raise UserError(
            f"{source} does not fit {describe(ma) if ma else type(model).__name__}: missing keys "
            f"{missing[:6]}{'...' if len(missing) > 6 else ''}, unexpected keys "
            f"{unexpected[:6]}{'...' if len(unexpected) > 6 else ''}"
            f"{', shape mismatches ' + str(shapes[:3]) if shapes else ''}. {hint}, or use another --checkpoint.")
    model.load_state_dict({k: state_dict.get(k, own[k]) for k in own})


def _flag(key: str, outside: dict | None) -> str:
    """The flag that sets a model_args key."""
    return "--model" if key == "arch" and outside else "--" + key.replace("_", "-")


def load_model(path, arch: str | None = None, shortcut: str | None = None, normalization: dict | None = None,
               require_finished: bool = True, num_classes: int | None = None, outside: dict | None = None):
    """Rebuild model and preprocessing from a checkpoint file alone.

    Ours record their model_args and normalization: a conflicting ``arch`` / ``shortcut`` / ``outside`` /
    ``normalization`` is an error. A foreign checkpoint takes them from the arguments (default
    resnet20 shortcut B, CIFAR-10 statistics); ``outside`` ({"arch": spec, and "model_kwargs", "num_classes",
    "input_size" where given}: utils.cli.outside_model) names a model from outside the registry. Returns (model in
    eval mode, meta) with meta keys model_args, normalization, normalization_source, data, finished, foreign, epoch.
    """
    obj = read_checkpoint(path)
    ours = isinstance(obj, dict) and "model_args" in obj
    built = None
    if ours:
        model_args = normalize_model_args(obj["model_args"])
        given = {"arch": arch, "shortcut": shortcut, **(outside or {})}
        clash = {k: (model_args.get(k), v) for k, v in given.items() if v is not None and model_args.get(k) != v}
        if clash:
            asked = ", ".join(f"{_flag(k, outside)} {v[1]}" for k, v in clash.items())
            raise UserError(f"checkpoint {path} holds a {describe(model_args)}, but the flags ask for {asked}. "
                            f"Drop those flags (the checkpoint says what it is), or pass another --checkpoint.")
        recorded_norm = obj.get("normalization") or DEFAULT_NORMALIZATION
        if normalization is not None and normalization != recorded_norm:
            raise UserError(f"checkpoint {path} records its input normalization {recorded_norm}; "
                            f"--normalization {normalization} contradicts it. Drop --normalization.")
        norm, norm_source = recorded_norm, "recorded in the checkpoint"
    else:
        if outside is not None:   # built here: it fills in the builder's defaults (its classes, the input size)
            built = build_outside(outside["arch"], outside.get("model_kwargs"), outside.get("num_classes"),
                                  outside.get("input_size"))
            model_args = built.model_args
        else:
            model_args = normalize_model_args({"arch": arch or "resnet20", "num_classes": num_classes or 10,
                                               **({"shortcut": shortcut} if shortcut else {})})
        norm = normalization or DEFAULT_NORMALIZATION
        norm_source = "--normalization" if normalization else "default (cifar10 statistics)"
    try:
        model = built if built is not None else build_from_args(model_args)
    except ValueError as e:
        raise UserError(f"cannot build the model for {path}: {e}.") from None
    load_weights(model, extract_state_dict(obj), source=f"checkpoint {path}")
    finished = bool(obj.get("finished", True)) if ours else True
    if require_finished and not finished:
        raise UserError(f"checkpoint {path} is from a training run that stopped after epoch "
                        f"{obj.get('epoch')} of {obj.get('epochs')}. Finish it with "
                        f"`python 1_train_baseline.py --resume` (or pass --force to use it as it is).")
    meta = {
        "model_args": model_args,
        "normalization": {"mean": list(norm["mean"]), "std": list(norm["std"])},
        "normalization_source": norm_source,
        "data": obj.get("data", {}) if ours else {},
        "finished": finished,
        "foreign": not ours,
        "epoch": obj.get("epoch") if ours else None,
    }
    return model.eval(), meta


def slim_checkpoint(src, dst):
    """A finished checkpoint without optimizer and scheduler state (half the size), for shipping."""
    obj = read_checkpoint(src)
    if not (isinstance(obj, dict) and "model_args" in obj and obj.get("finished")):
        raise UserError(f"{src} is not a finished stage-1 checkpoint; only those can be slimmed.")
    save_checkpoint(dst, {k: v for k, v in obj.items() if k not in ("optimizer", "scheduler", "checkpoint_version")})


def main(argv=None) -> int:
    """python -m utils.checkpoint --slim SRC --out DST [--results 01_baseline.json]: ship a finished model."""
    import argparse
    import json
    import sys
    from utils.io import atomic_write_json, sha256_file
    p = argparse.ArgumentParser(description="Write a finished stage-1 checkpoint without optimizer state (to ship "
                                            "it), and, with --results, its 01_baseline.json beside it pointing at it.")
    p.add_argument("--slim", required=True, help="a finished stage-1 checkpoint")
    p.add_argument("--out", required=True, help="the slim checkpoint to write")
    p.add_argument("--results", default=None, help="the run's 01_baseline.json, copied next to --out (default: none)")
    args = p.parse_args(argv)
    try:
        slim_checkpoint(args.slim, args.out)
        if args.results:
            res = json.loads(Path(args.results).read_text())
            res["checkpoint"] = str(args.out)
            res["slimmed_from"] = {"path": str(args.slim), "sha256": sha256_file(args.slim),
                                   "note": "optimizer and scheduler state removed; model, args, split and history kept"}
            res["provenance"]["inputs"]["checkpoint"] = {"path": str(args.out), "sha256": sha256_file(args.out)}
            atomic_write_json(Path(args.out).parent / "01_baseline.json", res)
    except (UserError, OSError, ValueError, KeyError) as e:
        print(error_paragraph(e), file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main())
