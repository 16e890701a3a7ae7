"""Loss-aware tensor ranges: each tensor's clip chosen by what it does to the network's output.

The MSE range (quant/calibrate.py) minimizes a tensor's own squared quantization error. That weighs a clipped
outlier like any other error, and a tensor's error matters only through what it does downstream. Here each
tensor's range at each width is the MSE range times the multiplier, from a fixed grid, that minimizes the mean
KL divergence of the network's output from the float output on training calibration images, with only that
tensor quantized (every weight and every other tensor float). The choice is per (tensor, width) and does not
depend on the other groups' widths, so one range per tensor and width still serves every configuration, as
learned rounding's levels do (quant/adaround.py). It is the separable, one-dimensional form of the loss-aware
clipping of Nahshan et al. (LAPQ, 2019), which searches the clips jointly.

Ties keep the smaller change from the MSE range (1.0 is tried first, then outward).
"""
from __future__ import annotations

import torch

from quant.evaluation import CachedEvaluator
from quant.widths import A

MULTIPLIERS = (1.0, 0.9, 1.1, 0.8, 1.25, 0.7, 1.4, 0.6, 1.6, 0.5, 1.8, 2.0)


def describe(images: int, multipliers=MULTIPLIERS) -> str:
    return (f"kl: each tensor's MSE range times the multiplier (of {', '.join(map(str, sorted(multipliers)))}) that "
            f"minimizes the mean KL of the output from the float output on the first {images} calibration images, "
            f"that tensor alone quantized")


@torch.no_grad()
def loss_aware_ranges(model, table, ranges: dict, x_u8: torch.Tensor, normalize, tensors=None,
                      multipliers=MULTIPLIERS, batch_size: int = 256, progress=None) -> tuple[dict, dict]:
    """(`ranges` with each listed tensor's scales rescaled, {tensor: {bits: multiplier}}), from `ranges` (the MSE
    ones, quant/calibrate.py) on the uint8 training images `x_u8` through `model` (float weights; the evaluator folds
    its BN). `progress(tensor)` is called after each tensor."""
    if not multipliers or min(multipliers) <= 0:
        raise ValueError(f"multipliers must be positive, got {multipliers}")
    names = [n for n in (ranges if tensors is None else tensors) if ranges[n]["scales"]]
    ev = CachedEvaluator(model, table, x_u8, torch.zeros(len(x_u8), dtype=torch.long, device=x_u8.device),
                         normalize, ranges, batch_size=batch_size)
    chosen = {}
    for name in names:
        for b, s0 in ranges[name]["scales"].items():
            kl = {}
            for m in multipliers:
                ev.set_tensor_scale(name, int(b), s0 * m)
                kl[m] = ev.evaluate({(A, name): int(b)}).kl
            chosen.setdefault(name, {})[b] = min(multipliers, key=lambda m: kl[m])   # ties: the first, nearest 1.0
            ev.set_tensor_scale(name, int(b), s0)           # the next tensor is chosen with this one float anyway
        if progress is not None:
            progress(name)
    return rescaled(ranges, chosen, names)


def rescaled(ranges: dict, multipliers: dict, tensors) -> tuple[dict, dict] | None:
    """``loss_aware_ranges``' result from multipliers it chose before ({tensor: {bits: multiplier}}, as recorded):
    each listed tensor's MSE scale times its recorded multiplier, the same product, without the search. None when
    the record lacks a listed (tensor, width) of `ranges`, so the caller searches instead."""
    chosen = {}
    for name in tensors:
        for b in ranges[name]["scales"]:
            m = (multipliers.get(name) or {}).get(str(b))
            if not isinstance(m, (int, float)) or not m > 0:
                return None
            chosen.setdefault(name, {})[b] = float(m)
    out = {n: {**r, "scales": dict(r["scales"])} for n, r in ranges.items()}
    for name, by_bits in chosen.items():
        for b, m in by_bits.items():
            out[name]["scales"][b] = ranges[name]["scales"][b] * m
    return out, chosen
