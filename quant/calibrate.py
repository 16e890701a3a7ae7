"""Calibrated ranges of a model's tensors, once per tensor and width.

Each tensor is observed where it is written (its Slot) in a float forward pass of the calibration
images (training images, never validation or test). Its range minimizes the squared quantization
error of the calibration histogram (torch.ao's HistogramObserver, told the grid's real number of
levels). A signed tensor is observed as |x| on an unsigned grid of 2^(b-1) levels, so that the
symmetric grid's clip is MSE-optimal too. Whether a tensor can be negative is declared by the model.

The result, ``ranges``, is plain data ({tensor: {"signed": bool, "scales": {bits: scale}}}) that the
stages save in their JSON, so the trace and the export rebuild the same quantizers without data.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.ao.quantization.observer import HistogramObserver

from models.structure import widths_of_their_own
from quant.errors import UserError
from quant.place import slots
from quant.quantizer import Quantizer, tensor_quantizer
from quant.widths import ACT_BITS, FLOAT_BITS

METHOD = ("mse: torch.ao HistogramObserver (2048 bins) with the grid's real number of levels; signed tensors "
          "observed as |x| with 2^(a-1) levels; at each tensor's producer, in the BN-folded float model")


class _LevelsHistogramObserver(HistogramObserver):
    """HistogramObserver whose range search models the real number of levels.

    Its error model assumes 2^8 destination bins whatever quant_min/quant_max say, which would pick
    an 8-bit range for a 4-bit grid; this sets the bin count from the grid."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.dst_nbins = self.quant_max - self.quant_min + 1


@torch.no_grad()
def calibrate(model: nn.Module, target: str, batches, widths, tensors=None) -> dict:
    """Ranges of every tensor (or those listed) at every width in `widths`, from float forward passes of
    `batches` (normalized image batches) through `model` (BN-folded, no quantizer attached)."""
    widths = sorted({int(b) for b in widths if b != FLOAT_BITS}, reverse=True)
    for b in widths:
        if b not in ACT_BITS:
            raise UserError(f"tensor width {b} is not supported; use 2-8, or 32 for float.")
    declared = {t.name: t for t in widths_of_their_own(model.tensors(target))}
    names = list(declared) if tensors is None else list(tensors)
    if not widths:
        return {}
    by_slot = slots(model, target)
    if any(by_slot[n].quant is not None for n in names):
        raise ValueError("calibrate needs a float model: detach the tensor quantizers first")
    observers = {(n, b): _LevelsHistogramObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine, quant_min=0,
                                                  quant_max=2 ** (b - 1 if declared[n].signed else b) - 1)
                 for n in names for b in widths}
    lows = {n: float("inf") for n in names}

    def observe(name):
        def hook(_m, _inputs, out):
            x = out.detach().float().cpu()
            lows[name] = min(lows[name], float(x.min()))
            x = x.abs() if declared[name].signed else x
            for b in widths:
                observers[name, b](x)
        return hook

    handles = [by_slot[n].register_forward_hook(observe(n)) for n in names]
    was_training = model.training
    model.eval()
    try:
        for x in batches:
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    wrong = [n for n in names if not declared[n].signed and lows[n] < 0]
    if wrong:
        raise ValueError(f"{type(model).__name__} declares {wrong} never negative, but calibration saw negative values")
    return {n: {"signed": declared[n].signed,
                "scales": {str(b): float(observers[n, b].calculate_qparams()[0]) for b in widths}} for n in names}


def quantizers_from(ranges: dict, learn: bool = False) -> dict[tuple[str, int], Quantizer]:
    """{(tensor, bits): Quantizer} of every calibrated tensor and width."""
    return {(n, int(b)): tensor_quantizer(s, int(b), r["signed"], learn)
            for n, r in ranges.items() for b, s in r["scales"].items()}
