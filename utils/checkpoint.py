"""Checkpoints: ours carry everything the next stage needs to rebuild model and inputs;
foreign ones (raw state_dicts, DataParallel, {'state_dict': ...}) load too."""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from models.resnet import build_model
from utils.errors import UserError
from utils.io import atomic_torch_save

CHECKPOINT_VERSION = 1
# CIFAR-10 statistics for checkpoints that carry no normalization of their own.
DEFAULT_NORMALIZATION = {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616]}


def default_checkpoint_path(checkpoint_dir, depth: int = 20) -> Path:
    return Path(checkpoint_dir) / f"resnet{depth}_baseline.pt"


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


def extract_state_dict(obj) -> dict:
    """Accept a raw state_dict, {'state_dict': ...} or {'model': ...}, with or without 'module.'."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        sd = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        sd = obj["state_dict"]
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd = obj
    else:
        raise UserError("the checkpoint holds no model weights: expected a state_dict, or a dict with "
                        "a 'state_dict' or 'model' entry.")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def load_weights(model: torch.nn.Module, state_dict: dict, source: str = "checkpoint"):
    """Strict load that names missing/unexpected keys and shape mismatches in one message."""
    own = model.state_dict()
    # Checkpoints from PyTorch < 0.4.1 lack BN's num_batches_tracked, which eval never uses.
    missing = [k for k in own if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k}: {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
              for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        ma = getattr(model, "model_args", {})
        raise UserError(
            f"{source} does not fit {ma.get('arch', '')}{ma.get('depth', '')} shortcut "
            f"{ma.get('shortcut', '?')}: missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
            f"{', shape mismatches ' + str(shapes[:4]) if shapes else ''}. It is probably another "
            f"architecture: pass the right --depth / --shortcut, or another --checkpoint.")
    model.load_state_dict({k: state_dict.get(k, own[k]) for k in own})


def load_model(path, model_args_override: dict | None = None, require_finished: bool = True):
    """Rebuild model and preprocessing from a checkpoint file alone.

    Returns (model in eval mode, meta) with meta keys model_args, normalization, data,
    finished, foreign (True for checkpoints not written by stage 1).
    """
    obj = read_checkpoint(path)
    ours = isinstance(obj, dict) and "model_args" in obj
    model_args = dict(obj["model_args"]) if ours else {"arch": "resnet", "depth": 20, "shortcut": "B",
                                                        "num_classes": 10}
    for k, v in (model_args_override or {}).items():
        if v is not None:
            model_args[k] = v
    try:
        model = build_model(model_args)
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
        "normalization": obj.get("normalization", DEFAULT_NORMALIZATION) if ours else DEFAULT_NORMALIZATION,
        "data": obj.get("data", {}) if ours else {},
        "finished": finished,
        "foreign": not ours,
        "epoch": obj.get("epoch") if ours else None,
    }
    return model.eval(), meta
