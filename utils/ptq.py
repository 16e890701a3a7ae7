"""Post-training quantization beyond round-to-nearest, fitted once and cached on disk.

``--ptq adaround`` learns each weight layer's rounding at each width (quant/adaround.py) from the float
network's inputs to that layer on training images, so the levels of a (layer, width) pair do not depend on
any other layer's width. ``--ptq block`` learns the roundings of a block's layers together, all at one width,
to reconstruct the block's float output from the float network's input to it (quant/blockwise.py, BRECQ), so
its levels of a (layer, width) pair do not depend on the widths a configuration gives the other layers either.
They are fitted once per pair (per block and width) and stored in one cache file per key:

    <cache-dir>/ptq-<method>-<key hash>.pt   {"key": {...}, "levels": {"layer:bits": int8 tensor}}

The key holds everything the levels depend on: the checkpoint's SHA-256, the method and its settings, the
weight recipe (granularity, clip, weight range) and the SHA-256 of the calibration images' bytes. A later
stage (or the export) that asks for the same key reuses the levels and fits only pairs not yet cached.
"""
from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from quant.adaround import fit_levels, layer_inputs
from quant.blockwise import fit_block_levels
from quant.fold import fold_bn
from quant.recipe import PTQ_METHODS, Recipe
from utils.io import atomic_write_bytes, sha256_file

DEFAULT_PTQ_IMAGES = Recipe().ptq_images    # training images the rounding is fitted on: the first calibration ones
CACHE_SUBDIR = "ptq-cache"                  # under --checkpoint-dir
DEFAULT_CACHE_DIR = Path("checkpoints") / CACHE_SUBDIR
__all__ = ["PTQ_METHODS", "DEFAULT_PTQ_IMAGES", "DEFAULT_CACHE_DIR", "learned_levels", "cached_levels"]


@dataclass
class LearnedLevels:
    """Learned levels for some (layer, bits) pairs, and how they were made."""
    levels: dict                  # {(layer, bits): int8 tensor}
    key: dict
    path: Path | None
    fitted: int                   # pairs fitted in this run (the rest came from the cache)
    seconds: float                # time spent fitting in this run

    def describe(self) -> dict:
        return {"method": self.key["method"], "settings": self.key["settings"], "images": self.key["images"],
                "images_sha256": self.key["images_sha256"], "cache": str(self.path) if self.path else None,
                "pairs": len(self.levels), "fitted_here": self.fitted, "seconds": self.seconds}


def images_sha256(x_u8: torch.Tensor) -> str:
    return hashlib.sha256(x_u8.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def cache_key(checkpoint_sha256: str, recipe: Recipe, n_images: int, images_digest: str) -> dict:
    return {"format": "ai-qs-ptq/1", "method": recipe.ptq, "checkpoint_sha256": checkpoint_sha256,
            "settings": recipe.ptq_settings.to_json(),
            "recipe": {k: v for k, v in recipe.to_json().items() if k in ("granularity", "clip", "weight_range")},
            "images": n_images, "images_sha256": images_digest}


def cache_path(cache_dir, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"ptq-{key['method']}-{digest}.pt"


def _read(path: Path, key: dict) -> dict:
    if not path.is_file():
        return {}
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:      # a damaged cache is refitted, never trusted
        return {}
    if not isinstance(obj, dict) or obj.get("key") != key:
        return {}
    return {(k.rsplit(":", 1)[0], int(k.rsplit(":", 1)[1])): v for k, v in obj.get("levels", {}).items()}


def _write(path: Path, key: dict, levels: dict):
    buf = io.BytesIO()
    torch.save({"key": key, "levels": {f"{n}:{b}": v.cpu() for (n, b), v in levels.items()}}, buf)
    atomic_write_bytes(path, buf.getvalue())


def cached_levels(checkpoint, recipe: Recipe, fit: dict, cache_dir=DEFAULT_CACHE_DIR) -> dict:
    """The cached levels a stage recorded (its ``ptq_fit``: images and their SHA-256), without the data; {} when
    the cache does not hold them."""
    key = cache_key(sha256_file(checkpoint), recipe, fit["images"], fit["images_sha256"])
    return _read(cache_path(cache_dir, key), key)


def learned_levels(model, checkpoint, pairs, calib_u8: torch.Tensor, normalize, recipe: Recipe,
                   cache_dir=DEFAULT_CACHE_DIR, progress: bool = True) -> LearnedLevels:
    """The learned levels of every (layer, bits) in `pairs` (bits 32 skipped) of the float `model`, fitted on
    the first ``recipe.ptq_images`` of the uint8 training images `calib_u8`: from the cache where it has them,
    else fitted here and added to it."""
    pairs = sorted({(n, b) for n, b in pairs if b != 32})
    x_u8 = calib_u8[:recipe.ptq_images]
    key = cache_key(sha256_file(checkpoint), recipe, len(x_u8), images_sha256(x_u8))
    path = cache_path(cache_dir, key) if cache_dir is not None else None
    have = _read(path, key) if path is not None else {}
    todo = [p for p in pairs if p not in have]
    t = time.time()
    if todo:
        folded = fold_bn(model).cpu().eval()
        x = normalize(x_u8).cpu()
        unit = "layer x width, by block" if recipe.ptq == "block" else "layer x width"
        bar = tqdm(total=len(todo), desc=f"learned rounding ({unit})", dynamic_ncols=True, disable=not progress)

        def done(fitted: dict):
            have.update(fitted)
            if path is not None:
                _write(path, key, have)      # after each fit: an interrupted fit keeps what it fitted
            bar.update(sum(p in fitted for p in todo))
        kw = dict(**recipe.weight_kwargs(), settings=recipe.ptq_settings)
        if recipe.ptq == "block":
            fit_block_levels(folded, todo, x, **kw, on_fit=done)
        else:
            inputs = layer_inputs(folded, sorted({n for n, _ in todo}), x)
            fit_levels(folded, todo, inputs, **kw, on_fit=lambda n, b, lv: done({(n, b): lv}))
        bar.close()
    return LearnedLevels({p: have[p] for p in pairs}, key, path, len(todo), time.time() - t)
