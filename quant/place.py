"""Placement: quantizers attached where the model declares them (models/structure.py), the one
mechanism that evaluation, fine-tuning, the trace and the export share.

* A tensor quantizer goes into the tensor's ``Slot``, where it is written: every consumer then
  reads the quantized tensor (convolutions, the residual add, pooling).
* A weight quantizer goes onto the layer: baked (the weight is replaced by its fake-quantized value,
  for evaluation) or as a ``torch.nn.utils.parametrize`` parametrization (for fine-tuning: the float
  original trains and the forward pass uses its quantized view).

``quantize_(model, config, ranges, ...)`` is the entry point (like torchao's): it folds nothing and
reads no data; give it a BN-folded model (quant/fold.py) and calibrated ranges (quant/calibrate.py).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize

from models.structure import Slot, widths_of_their_own
from quant.errors import UserError
from quant.quantizer import Quantizer, levels_weight, tensor_quantizer, weight_grid, weight_quantizer
from quant.widths import FLOAT_BITS, tensors_of, weights_of


def slots(model: nn.Module, target: str) -> dict[str, Slot]:
    """{tensor: its Slot} of the tensors with a width of their own, as the model declares them (a tensor that
    follows another keeps an empty Slot: its values are already on that one's grid)."""
    return {t.name: model.get_submodule(t.slot) for t in widths_of_their_own(model.tensors(target))}


def _slots_for(model: nn.Module, target: str, config: dict) -> dict[str, Slot]:
    """`slots`, refusing a configuration that gives a width to a tensor without one of its own."""
    by_slot = slots(model, target)
    follows = {t.name: t.follows for t in model.tensors(target) if t.follows}
    bad = [n for n in tensors_of(config) if n not in by_slot]
    if bad:
        why = (f"it is a copy of {follows[bad[0]]!r} and has that tensor's width" if bad[0] in follows
               else f"{type(model).__name__} has no such tensor under the {target!r} target")
        raise UserError(f"the configuration gives tensor {bad[0]!r} a width, but {why}. Give widths only to the "
                        f"tensors of the model's space (kernel_table(model, target).space).")
    return by_slot


def set_tensor_quantizer(slot: Slot, q: Quantizer | None):
    slot.quant = q


def tensor_quantizers(model: nn.Module, target: str) -> dict[str, Quantizer]:
    """{tensor: its attached quantizer} of every quantized tensor."""
    return {n: s.quant for n, s in slots(model, target).items() if s.quant is not None}


def weight_quantizers(model: nn.Module, layers) -> dict[str, Quantizer]:
    """{layer: its weight quantizer} of every parametrized layer among `layers`."""
    out = {}
    for n in layers:
        m = model.get_submodule(n)
        if parametrize.is_parametrized(m, "weight"):
            out[n] = m.parametrizations.weight[0]
    return out


def check_ranges(config: dict, ranges: dict):
    missing = [(n, a) for n, a in tensors_of(config).items()
               if a != FLOAT_BITS and str(a) not in (ranges.get(n) or {}).get("scales", {})]
    if missing:
        raise UserError(f"no range was calibrated for tensor {missing[0][0]!r} at {missing[0][1]} bits; calibrate "
                        f"that width (stage 2's --a-bits) before using it.")


@torch.no_grad()
def quantize_(model: nn.Module, config: dict, ranges: dict, target: str, per_channel: bool = True,
              clip: str = "mse", trainable: bool = False, learn_scales: bool = True,
              weight_range: int = 8, levels: dict | None = None) -> nn.Module:
    """Quantize the BN-folded `model` in place to the full configuration `config` ({group: bits}) and
    return it. Tensor scales come from `ranges` (quant/calibrate.py); weight scales are searched on the
    model's current weights, on the grid of `weight_range` (quant/quantizer.py); a (layer, bits) pair in
    `levels` takes those learned integer levels (quant/adaround.py) on that grid. ``trainable``:
    parametrized weights and trainable tensor quantizers (LSQ; scales learned unless ``learn_scales`` is
    False), else baked weights and eval-mode quantizers."""
    by_slot = _slots_for(model, target, config)
    check_ranges(config, ranges)
    for name, a in tensors_of(config).items():
        q = None
        if a != FLOAT_BITS:
            q = tensor_quantizer(ranges[name]["scales"][str(a)], a, ranges[name]["signed"],
                                 learn=trainable and learn_scales)
            q = q.to(next(model.parameters()).device).train(trainable)
        set_tensor_quantizer(by_slot[name], q)
    for name, w in weights_of(config).items():
        if w == FLOAT_BITS:
            continue
        layer = model.get_submodule(name)
        q = weight_quantizer(layer.weight, w, per_channel, clip, learn=trainable and learn_scales,
                             weight_range=weight_range)
        q = q.to(layer.weight.device)
        if levels and (name, w) in levels:      # on the grid already: the quantizer maps it back to the levels
            layer.weight.copy_(levels_weight(q, layer.weight, levels[name, w]))
        if trainable:
            with torch.enable_grad():
                parametrize.register_parametrization(layer, "weight", q.train())
        else:
            layer.weight.copy_(q.eval()(layer.weight))
    return model


def skeleton_(model: nn.Module, config: dict, grids: dict, target: str, per_channel: bool = True,
              weight_range: int = 8) -> nn.Module:
    """The structure `quantize_(..., trainable=True)` gives `model`, with placeholder scales, so that a
    fine-tuned state dict loads into it. `grids`: {tensor: [qmin, qmax]} of its quantized tensors."""
    by_slot = _slots_for(model, target, config)
    for name, a in tensors_of(config).items():
        set_tensor_quantizer(by_slot[name], Quantizer(torch.ones(1), *grids[name]) if a != FLOAT_BITS else None)
    for name, w in weights_of(config).items():
        if w != FLOAT_BITS:
            layer = model.get_submodule(name)
            n = layer.weight.shape[0] if per_channel else 1
            q = Quantizer(torch.ones(n), *weight_grid(w, weight_range), 0 if per_channel else None, per_sample=False)
            parametrize.register_parametrization(layer, "weight", q)
    return model


def tensor_grids(model: nn.Module, target: str) -> dict[str, list[int]]:
    """{tensor: [qmin, qmax]} of every quantized tensor (what `skeleton_` needs)."""
    return {n: [q.qmin, q.qmax] for n, q in tensor_quantizers(model, target).items()}
