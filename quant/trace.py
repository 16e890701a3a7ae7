"""Where the bytes go, measured on the real tensors of the simulated model.

``trace(model, target, weight_bits, x)`` runs one image through a quantized model (quant/place.py)
and hooks the real tensors: each tensor where its Slot writes it (elements, width of the attached
quantizer, distinct values), and each module that reads one (the declared ops of a kernel, and any
other Conv2d, Linear, pooling or add that touches a tensor, which is reported as undeclared).
Counts are per image. The result has the shape of ``python -m utils.ai_calculator --trace --json``:

    {"cost_model": "fused", "target": ..., "total_bytes": ..., "total_flops": ..., "ai": ...,
     "kernels": [{"name", "flops", "weight_bytes", "bias_bytes", "reads": [...], "writes": [...]}],
     "undeclared_reads": [...]}

with reads and writes as {"tensor", "elements", "bits", "distinct"}. For a quantized tensor,
``distinct`` is at most 2^bits. Under the ``fused`` cost model, ``total_bytes`` equals what it charges.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from models.structure import Slot, covered
from quant.cost import BIAS_BYTES
from quant.widths import FLOAT_BITS

_PASS_THROUGH = (Slot, nn.Identity, nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _is_reader(m: nn.Module) -> bool:
    return not isinstance(m, _PASS_THROUGH) and not any(True for _ in m.children())


def conv_read_view(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The elements of `x` that `conv` uses: those under at least one of its windows (a 1x1 stride-2
    convolution uses every other row and column)."""
    for axis, (k, s, p, d) in enumerate(zip(conv.kernel_size, conv.stride, conv.padding, conv.dilation)):
        idx = torch.tensor(covered(x.shape[2 + axis], k, s, p, d), device=x.device)
        x = x.index_select(2 + axis, idx)
    return x


def _read_view(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    if hasattr(module, "read_view"):
        return module.read_view(t)
    return conv_read_view(module, t) if isinstance(module, nn.Conv2d) else t


def _bits(slot: Slot) -> int:
    return FLOAT_BITS if slot.quant is None else slot.quant.bits


@torch.no_grad()
def trace(model: nn.Module, target: str, weight_bits: dict[str, int], x: torch.Tensor) -> dict:
    """The trace of one image `x` ([1, C, H, W], normalized) through the quantized, BN-folded `model`.
    `weight_bits` gives each weight layer's width (its weight tensor is what the kernel reads)."""
    if x.shape[0] != 1:
        raise ValueError("trace one image: x must have batch size 1")
    kernels = model.kernels(target)
    declared = model.tensors(target)
    tensors = {t.slot: t.name for t in declared}
    slot_of = {t.name: t.slot for t in declared}
    width_slot = {t.name: slot_of[t.follows or t.name] for t in declared}   # a copy's width: its source's quantizer
    op_kernel = {op: k.name for k in kernels for op in k.ops}
    seen = {}            # id(tensor object) -> tensor name, kept alive in `alive`
    alive = []
    stats = {}           # tensor -> {"elements", "bits", "distinct"}
    reads = {k.name: [] for k in kernels}
    undeclared = []
    flops = {k.name: 0 for k in kernels}
    layer_kernel = {n: k.name for k in kernels for n in k.layers}

    def on_slot(name, slot):   # `slot` holds the quantizer of the tensor's width (a follower's: its source's)
        def hook(_m, _inputs, out):
            seen[id(out)] = name
            alive.append(out)
            stats[name] = {"elements": out[0].numel(), "bits": _bits(slot), "distinct": int(out.unique().numel())}
        return hook

    def on_reader(mod_name, module):
        def hook(_m, inputs):
            for t in inputs:
                if not isinstance(t, torch.Tensor) or id(t) not in seen:
                    continue
                name = seen[id(t)]
                used = _read_view(module, t)
                entry = {"tensor": name, "elements": used[0].numel(), "bits": stats[name]["bits"],
                         "distinct": int(used.unique().numel()), "op": mod_name}
                if mod_name in op_kernel:
                    reads[op_kernel[mod_name]].append(entry)
                else:
                    undeclared.append(entry)
        return hook

    def on_layer(name, module):
        def hook(_m, inputs, out):
            if isinstance(module, nn.Conv2d):
                kh, kw = module.kernel_size
                macs = out[0].numel() * (module.in_channels // module.groups) * kh * kw
            else:
                macs = out[0].numel() * module.in_features
            flops[layer_kernel[name]] += 2 * macs
        return hook

    mods = dict(model.named_modules())
    handles = [mods[s].register_forward_hook(on_slot(n, mods[width_slot[n]])) for s, n in tensors.items()]
    handles += [m.register_forward_pre_hook(on_reader(n, m)) for n, m in mods.items() if _is_reader(m)]
    handles += [mods[n].register_forward_hook(on_layer(n, mods[n])) for n in layer_kernel]
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    out, total = [], 0.0
    for k in kernels:
        layers = [mods[n] for n in k.layers]
        wb = sum(m.weight.numel() * weight_bits[n] / 8 for n, m in zip(k.layers, layers))
        bb = sum(m.bias.numel() for m in layers if m.bias is not None) * BIAS_BYTES
        rd = [{key: r[key] for key in ("tensor", "elements", "bits", "distinct")} for r in reads[k.name]]
        wr = [{"tensor": k.writes, **stats[k.writes]}]
        total += wb + bb + sum(r["elements"] * r["bits"] / 8 for r in rd + wr)
        out.append({"name": k.name, "flops": flops[k.name], "weight_bytes": wb, "bias_bytes": bb,
                    "reads": rd, "writes": wr})
    total_flops = sum(flops.values())
    return {"target": target, "total_bytes": total, "total_flops": total_flops,
            "ai": total_flops / total if total else 0.0, "kernels": out,
            "undeclared_reads": [{key: r[key] for key in ("op", "tensor", "elements")} for r in undeclared]}
