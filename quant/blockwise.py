"""Learned rounding fitted block by block: BRECQ's block reconstruction (Li et al. 2021, "BRECQ: Pushing the Limit
of Post-Training Quantization by Block Reconstruction", ICLR, arXiv 2102.05426), on this project's weight grid.

AdaRound (quant/adaround.py) fits one layer at a time to its own float output, so the rounding of a block's first
convolution cannot account for what the second one does with its error. BRECQ fits the roundings of all weight
layers of a block jointly, to reconstruct the block's float output:

    loss = mean ||f_block(x; W) - f_block(x; W~)||^2  +  lambda * sum over the block's layers of AdaRound's regularizer

with AdaRound's rounding variables, schedule and settings (``AdaRoundSettings``). A block is one of the model's
segments (models/graph.py: a stretch of the graph that ends where exactly one tensor is live, e.g. a residual
block with its shortcut), under the ``generic`` target, so the blocks do not depend on the target a stage prices.

This project keeps two choices of its own, so that the fit of a (layer, width) pair is one cached result:

* the block's input is the *float* network's (BRECQ's code feeds the quantized network's), so the fit does not
  depend on the widths of the layers in front of the block;
* all weight layers of a block are fitted at the same width, and their tensors stay float. A configuration that
  gives a block's layers different widths takes each layer's levels from its own width's fit.

BRECQ's Fisher-weighted loss is not used (plain squared error, as its ``mse`` mode). No I/O: the caller hands in
the float network's block inputs and gets integer levels back.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.func import functional_call

from models.structure import DEFAULT_TARGET
from quant.adaround import AdaRoundSettings, Rounding, reconstruct
from quant.quantizer import weight_quantizer


def blocks(model: nn.Module) -> list[tuple[nn.Module, tuple[str, ...]]]:
    """(segment function, its weight layers) of each segment of `model` (BN-folded) under the generic target."""
    layers_of = {k.name: k.layers for k in model.kernels(DEFAULT_TARGET)}
    return [(seg.fn, tuple(n for k in seg.kernels for n in layers_of[k])) for seg in model.segments(DEFAULT_TARGET)]


def _with_inputs(model: nn.Module, x: torch.Tensor, batch_size: int):
    """(segment function, its weight layers, the float network's input to it) of each block in order, on the
    normalized images `x`; only the current block's input is held, the next one computed when it is asked for."""
    h = x
    for fn, names in blocks(model):
        yield fn, names, h
        with torch.no_grad():
            h = torch.cat([fn(h[s:s + batch_size]) for s in range(0, len(h), batch_size)])


def block_inputs(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> list[torch.Tensor]:
    """The float network's input to each block (segment) on the normalized images `x`, in order."""
    return [h for _, _, h in _with_inputs(model, x, batch_size)]


def learn_block_rounding(fn: nn.Module, layers: dict[str, nn.Module], quantizers: dict, inputs: torch.Tensor,
                         settings: AdaRoundSettings = AdaRoundSettings()) -> dict[str, torch.Tensor]:
    """{layer: its learned integer levels (int32)} of the block `fn`'s weight layers `layers` ({name: module}),
    each on its quantizer's grid, fitted jointly to reconstruct the block's float output on `inputs`."""
    rounding = {n: Rounding(m.weight, quantizers[n]) for n, m in layers.items()}
    with torch.no_grad():
        target = fn(inputs)

    def output(x):
        return functional_call(fn, {f"{n}.weight": r.weight() for n, r in rounding.items()}, (x,))
    return dict(zip(rounding, reconstruct(list(rounding.values()), output, inputs, target, settings)))


def fit_block_levels(model: nn.Module, pairs, x: torch.Tensor, per_channel: bool = True, clip: str = "mse",
                     weight_range: int = 8, settings: AdaRoundSettings = AdaRoundSettings(), on_fit=None) -> dict:
    """{(layer, bits): int8 levels} for every (layer, bits) of `pairs` on the folded float `model`: each block that
    holds one of them is fitted at that width, all its weight layers together, from the float network's block
    inputs on the normalized images `x`; ``on_fit(block's pairs: {(layer, bits): levels})`` after each fit."""
    wanted = set(pairs)
    out = {}
    for fn, names, inputs in _with_inputs(model, x, batch_size=256):
        layers = {n: model.get_submodule(n) for n in names}
        for bits in sorted({b for n, b in wanted if n in layers}, reverse=True):
            qs = {n: weight_quantizer(m.weight, bits, per_channel, clip, weight_range=weight_range)
                  for n, m in layers.items()}
            with torch.enable_grad():
                got = learn_block_rounding(fn, layers, qs, inputs, settings)
            fitted = {(n, bits): lv.to(torch.int8) for n, lv in got.items()}
            out.update(fitted)
            if on_fit is not None:
                on_fit(fitted)
        if wanted <= set(out):
            break          # the blocks behind the last one asked for are not run
    missing = wanted - set(out)
    if missing:
        raise ValueError(f"no block of {type(model).__name__} holds weight layer {sorted(missing)[0][0]!r}")
    return out
