"""Arithmetic intensity (FLOPs per byte moved) of a configuration, under two named cost models.

FLOPs are 2 x MACs of every Conv2d/Linear (pooling and adds are not counted), whatever the widths,
so raising AI means moving fewer bytes. AI = total FLOPs / total bytes, not a mean of per-layer AIs.

* ``fused`` (the default) charges what the simulated network reads and writes, kernel by kernel
  (models/structure.py declares the kernels of a target's fusion). A kernel moves

      weights * w/8 + folded bias * 4 + sum(tensors read * width/8) + tensor written * width/8

  with weights and the fp32 bias read once per batch and tensors once per image. Every tensor has
  one width, set where it is written, and every reader reads it at that width. The image is read by
  the stem and written by nobody. A tensor that follows another (models/structure.py) is moved at
  that one's width. Anchors (ResNet-20 B, batch 1, every tensor and weight at one width): FP32 26.99,
  W8 with fp32 tensors 36.90, W8A8 107.61, W4A8 131.00, W4A4 214.32.
* ``reference``: the reference work's per-layer convention, bit for bit: a layer moves
  weights * w/8 + bias * 4 + (its input + its output) * 32/8 per image, with no fusion and nothing
  charged for shortcuts, adds or pooling. Its activations are float, so it is defined for weight
  widths only. ResNet-20 B: FP32 29.85, W8 42.47, W4 45.69.

Both are additive over groups (a weight layer's width, a tensor's width), so the searches can
work with per-group bytes (``group_bytes``) plus a constant.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import ClassVar

import numpy as np
import torch
import torch.nn as nn

from models.structure import DEFAULT_TARGET, INPUT, check_target, input_shape as model_input_shape
from quant.errors import UserError
from quant.fold import fold_bias_elements
from quant.widths import FLOAT_BITS, A, Space, W, narrows_tensors

BIAS_BYTES = 4  # bias stays fp32 whatever the weight width
COST_MODELS = ("fused", "reference")
DEFAULT_COST_MODEL = "fused"
CONVENTIONS = {
    "fused": "bytes = sum over kernels of weights*w/8 + folded bias*4 + tensors read*width/8 + tensor written*width/8 "
             "(weights and bias once per batch, tensors per image); AI = total FLOPs / total bytes",
    "reference": "bytes = sum over layers of weights*w/8 + bias*4 + (input + output)*32/8 per image (the reference "
                 "work's per-layer convention; tensors float); AI = total FLOPs / total bytes",
}


@dataclass(frozen=True)
class LayerInfo:
    name: str
    kind: str       # "conv" or "linear"
    macs: int       # per sample
    flops: int      # 2 * macs, per sample
    weights: int    # weight elements
    bias: int       # bias elements, 0 if none
    in_elems: int   # input activation elements, per sample
    out_elems: int  # output activation elements, per sample


def layer_table(model: nn.Module, input_shape=None) -> list[LayerInfo]:
    """Measure every Conv2d/Linear from one real forward pass, so the table cannot drift from the model.

    Hooks record shapes as layers run, giving execution order and true spatial sizes (strides,
    padding, pooling) without a hand-kept table. A module called more than once adds up its
    activations and MACs but counts its weights once. Modules never called are left out.
    """
    records: dict[str, dict] = {}
    input_shape = input_shape or model_input_shape(model)

    def hook_for(name):
        def hook(module, inputs, output):
            n = inputs[0].shape[0]
            in_elems, out_elems = inputs[0].numel() // n, output.numel() // n
            if isinstance(module, nn.Conv2d):
                kh, kw = module.kernel_size
                macs = out_elems * (module.in_channels // module.groups) * kh * kw
            else:  # per output element, one MAC per input feature (= in*out for a 2-D input)
                macs = out_elems * module.in_features
            r = records.setdefault(name, {"macs": 0, "in": 0, "out": 0, "module": module})
            r["macs"] += macs
            r["in"] += in_elems
            r["out"] += out_elems
        return hook

    handles = [m.register_forward_hook(hook_for(name)) for name, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    try:
        model.eval()
        param = next(model.parameters(), None)
        x = torch.zeros(input_shape, device=param.device if param is not None else "cpu")
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    table = []
    for name, r in records.items():
        m = r["module"]
        table.append(LayerInfo(
            name=name, kind="conv" if isinstance(m, nn.Conv2d) else "linear",
            macs=r["macs"], flops=2 * r["macs"], weights=m.weight.numel(),
            bias=m.bias.numel() if m.bias is not None else 0, in_elems=r["in"], out_elems=r["out"]))
    return table


@dataclass(frozen=True)
class KernelInfo:
    name: str
    flops: int                          # per image
    weights: tuple[tuple[str, int], ...]  # (layer, weight elements)
    bias: int                           # fp32 bias elements once BN is folded
    reads: tuple[tuple[str, int], ...]  # (tensor, elements per image)
    writes: tuple[str, int]             # (tensor, elements per image)


@dataclass
class KernelTable:
    """Everything the cost models charge, measured from one forward pass of the model under a target."""
    target: str
    kernels: list[KernelInfo]
    layers: list[LayerInfo]             # per-layer view (the reference convention)
    elements: dict[str, int]            # tensor -> elements per image
    signed: dict[str, bool]
    segment_of: dict[tuple[str, str], int] = field(default_factory=dict)   # group -> segment index
    follows: dict[str, str] = field(default_factory=dict)   # a materialized copy -> the tensor whose width it has

    def width_group(self, tensor: str) -> str:
        """The tensor whose width `tensor` is moved at: itself, or the one it follows."""
        return self.follows.get(tensor, tensor)

    @cached_property
    def space(self) -> Space:
        return Space(tuple(n for k in self.kernels for n, _ in k.weights),
                     tuple(t for t in self.elements if t not in self.follows),
                     logits=self.kernels[-1].writes[0] if self.kernels else None)

    @cached_property
    def flops(self) -> int:
        return sum(k.flops for k in self.kernels)

    @cached_property
    def weights(self) -> dict[str, int]:
        return {n: e for k in self.kernels for n, e in k.weights}

    @cached_property
    def _traffic(self) -> dict[str, int]:
        out = {t: 0 for t in self.elements if t not in self.follows}
        for k in self.kernels:
            for t, e in (*k.reads, k.writes):
                out[self.width_group(t)] += e
        return out

    def traffic(self, tensor: str) -> int:
        """Elements moved per image at `tensor`'s width: its write (none for the image) plus every read, and the
        writes and reads of the tensors that follow it."""
        return self._traffic[tensor]


def bitops(table: KernelTable, config: dict) -> int:
    """BitOps per image, AIMET's price of a configuration: the sum over weight layers of MACs x the weight's bits x
    the bits of the tensor the layer multiplies (the kernel's first read; 32 for float). It prices compute, not
    bytes: the fused AI's objective it is not."""
    macs = {li.name: li.macs for li in table.layers}
    return sum(macs[layer] * config[W, layer] * config[A, table.width_group(k.reads[0][0])]
               for k in table.kernels for layer, _ in k.weights)


def kernel_table(model: nn.Module, target: str = DEFAULT_TARGET, input_shape=None) -> KernelTable:
    """The declared kernels of `model` with element counts from a real forward pass (hooks on the
    tensors' Slots and on every Conv2d/Linear). `model` is the float model, before BN folding: the
    reference convention charges only the biases a layer has of its own."""
    check_target(target)
    input_shape = input_shape or model_input_shape(model)
    if any(not isinstance(model.get_submodule(bn), nn.BatchNorm2d) for _, bn in model.conv_bn_pairs()):
        raise ValueError("kernel_table needs the model before BN folding")
    layers = layer_table(model, input_shape)
    info = {li.name: li for li in layers}
    tensors = model.tensors(target)
    elements = {}

    def record(name):
        def hook(_m, _inputs, out):
            elements[name] = out[0].numel()
        return hook

    handles = [model.get_submodule(t.slot).register_forward_hook(record(t.name)) for t in tensors]
    was_training = model.training
    try:
        model.eval()
        param = next(model.parameters(), None)
        with torch.no_grad():
            model(torch.zeros(input_shape, device=param.device if param is not None else "cpu"))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    kernels = []
    for k in model.kernels(target):
        reads = []
        for r in k.reads:
            e = elements[r.tensor] * r.fraction
            if abs(e - round(e)) > 1e-6 * max(1.0, e):   # float rounding of an exact share is tolerated
                raise ValueError(f"kernel {k.name}: a fraction {r.fraction} of {r.tensor} is not whole elements")
            reads.append((r.tensor, round(e)))
        kernels.append(KernelInfo(k.name, sum(info[n].flops for n in k.layers),
                                  tuple((n, info[n].weights) for n in k.layers),
                                  sum(fold_bias_elements(model, n) for n in k.layers),
                                  tuple(reads), (k.writes, elements[k.writes])))
    order = [INPUT] + [k.writes[0] for k in kernels]
    seg_of_kernel = {k: i for i, seg in enumerate(model.segments(target)) for k in seg.kernels}
    follows = {t.name: t.follows for t in tensors if t.follows is not None}
    segment_of = {(A, INPUT): 0}
    for k in model.kernels(target):
        if k.writes not in follows:   # a copy is no group of its own
            segment_of[A, k.writes] = seg_of_kernel[k.name]
        for n in k.layers:
            segment_of[W, n] = seg_of_kernel[k.name]
    return KernelTable(target, kernels, layers, {t: elements[t] for t in order},
                       {t.name: t.signed for t in tensors}, segment_of, follows)


@dataclass(frozen=True)
class CostModel:
    """A convention that charges the bytes a configuration moves, at a batch size; recorded in every results
    JSON. The conventions are the subclasses (``FusedCost``, ``ReferenceCost``); ``CostModel.named(name,
    batch_size)`` and ``from_json`` build one by name."""
    batch_size: int = 1
    name: ClassVar[str]
    prices_tensors: ClassVar[bool]     # can it charge a tensor at a width other than float?
    row_unit: ClassVar[str]            # what one row of ``cost`` is: a "kernel" or a "layer"

    def __post_init__(self):
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise UserError(f"cost model {self.name}: batch_size must be an integer >= 1, got {self.batch_size!r}.")

    @staticmethod
    def named(name: str = DEFAULT_COST_MODEL, batch_size: int = 1) -> "CostModel":
        if name not in COST_MODEL_CLASSES:
            raise UserError(f"cost model {name!r} is not one of {', '.join(COST_MODELS)}.")
        return COST_MODEL_CLASSES[name](batch_size)

    def to_json(self, target: str = DEFAULT_TARGET) -> dict:
        return {"name": self.name, "batch_size": self.batch_size, "target": target,
                "convention": CONVENTIONS[self.name]}

    @staticmethod
    def from_json(d: dict | None) -> "CostModel":
        d = d or {}
        return CostModel.named(d.get("name", DEFAULT_COST_MODEL), int(d.get("batch_size", 1)))

    def check(self, config: dict):
        if not self.prices_tensors and narrows_tensors(config):
            raise UserError(self.tensor_refusal("a configuration that narrows a tensor",
                                                "Use --cost-model fused for activation widths."))

    def check_tensor_widths(self, widths, what: str, hint: str):
        """Refuse to search or measure tensor `widths` (narrower than float) under a cost model that cannot
        price them; `what` names them, `hint` says what to do instead."""
        if not self.prices_tensors and any(b != FLOAT_BITS for b in widths):
            raise UserError(self.tensor_refusal(what, hint))

    def tensor_refusal(self, what: str, hint: str) -> str:
        return (f"the {self.name} cost model charges activations in float (the reference work's weight-only "
                f"convention), so it cannot price {what}. {hint}")

    def group_bytes(self, table: KernelTable, group: tuple[str, str], bits: int) -> float:
        """Bytes one batch moves that depend on this group's width: a layer's weights, once per batch, under
        every convention; a tensor's as the convention charges it (``tensor_bytes``)."""
        kind, name = group
        return table.weights[name] * bits / 8 if kind == W else self.tensor_bytes(table, name, bits)

    def tensor_bytes(self, table: KernelTable, tensor: str, bits: int) -> float:
        raise NotImplementedError

    def constant_bytes(self, table: KernelTable) -> float:
        """Bytes no width changes."""
        raise NotImplementedError

    def rows(self, table: KernelTable, config: dict) -> list[dict]:
        """One row (flops, bytes, widths) per kernel or layer of a full configuration."""
        raise NotImplementedError

    def total_bytes(self, table: KernelTable, config: dict) -> float:
        self.check(config)
        return self.constant_bytes(table) + sum(self.group_bytes(table, g, b) for g, b in config.items())

    def cost(self, table: KernelTable, config: dict) -> dict:
        """Totals, and the rows, of a full configuration."""
        self.check(config)
        flops = table.flops * self.batch_size
        rows = self.rows(table, config)
        for r in rows:
            r["ai"] = r["flops"] / r["bytes"] if r["bytes"] else 0.0
        total = float(sum(r["bytes"] for r in rows))
        return {"flops": flops, "bytes": total, "ai": flops / total if total else 0.0, "rows": rows}

    def ai(self, table: KernelTable, config: dict) -> float:
        return table.flops * self.batch_size / self.total_bytes(table, config)


@dataclass(frozen=True)
class FusedCost(CostModel):
    """Every tensor each kernel reads and writes, at its width, the elements it uses (CONVENTIONS["fused"])."""
    name: ClassVar[str] = "fused"
    prices_tensors: ClassVar[bool] = True
    row_unit: ClassVar[str] = "kernel"

    def tensor_bytes(self, table, tensor, bits):   # every read and the write, per image
        return table.traffic(tensor) * bits / 8 * self.batch_size

    def constant_bytes(self, table):
        return float(sum(k.bias * BIAS_BYTES for k in table.kernels))   # the folded fp32 biases

    def rows(self, table, config):
        rows = []
        for k in table.kernels:
            wb = sum(e * config[W, n] / 8 for n, e in k.weights)
            bits = {t: config[A, table.width_group(t)] for t, _ in (*k.reads, k.writes)}
            tb = sum(e * bits[t] / 8 for t, e in (*k.reads, k.writes)) * self.batch_size
            rows.append({"name": k.name, "flops": k.flops * self.batch_size, "weight_bytes": wb,
                         "bias_bytes": k.bias * BIAS_BYTES, "tensor_bytes": tb, "bytes": wb + k.bias * BIAS_BYTES + tb,
                         "w_bits": [config[W, n] for n, _ in k.weights],
                         "reads": [{"tensor": t, "elements": e, "bits": bits[t]} for t, e in k.reads],
                         "writes": {"tensor": k.writes[0], "elements": k.writes[1], "bits": bits[k.writes[0]]}})
        return rows


@dataclass(frozen=True)
class ReferenceCost(CostModel):
    """The reference work's per-layer, weight-only convention (CONVENTIONS["reference"]): activations float."""
    name: ClassVar[str] = "reference"
    prices_tensors: ClassVar[bool] = False
    row_unit: ClassVar[str] = "layer"

    def tensor_bytes(self, table, tensor, bits):   # float, and in constant_bytes
        if bits != FLOAT_BITS:
            self.check({(A, tensor): bits})
        return 0.0

    def constant_bytes(self, table):   # the fp32 biases and the float activations of every layer
        return float(sum(li.bias * BIAS_BYTES + (li.in_elems + li.out_elems) * FLOAT_BITS / 8 * self.batch_size
                         for li in table.layers))

    def rows(self, table, config):
        rows = []
        for li in table.layers:
            w = config[W, li.name]
            b = li.weights * w / 8 + li.bias * BIAS_BYTES + (li.in_elems + li.out_elems) * 4 * self.batch_size
            rows.append({"name": li.name, "kind": li.kind, "macs": li.macs, "weights": li.weights,
                         "flops": li.flops * self.batch_size, "bytes": b, "w_bits": w, "a_bits": FLOAT_BITS})
        return rows


COST_MODEL_CLASSES = {c.name: c for c in (FusedCost, ReferenceCost)}
assert tuple(COST_MODEL_CLASSES) == COST_MODELS


# Roofline: peak dense (no 2:4 sparsity) BF16/FP16 tensor-core throughput, and peak memory bandwidth.
# ResNet inference on these parts runs in BF16/FP16 (or lower), so that is the compute roof we use.
DEVICES = {
    # NVIDIA H100 Tensor Core GPU datasheet (SXM5): BF16/FP16 tensor 1,979 TFLOP/s with sparsity
    # = 989 dense; HBM3 3.35 TB/s.
    "H100 SXM": dict(peak_flops=989e12, bandwidth=3.35e12,
                     note="NVIDIA H100 datasheet, SXM: 989 TFLOP/s dense BF16 tensor, HBM3 3.35 TB/s"),
    # NVIDIA A100 Tensor Core GPU datasheet (SXM, 80GB): BF16/FP16 tensor 312 TFLOP/s dense
    # (624 with sparsity); HBM2e 2,039 GB/s.
    "A100 SXM 80GB": dict(peak_flops=312e12, bandwidth=2.039e12,
                          note="NVIDIA A100 datasheet, SXM 80GB: 312 TFLOP/s dense BF16 tensor, HBM2e 2.039 TB/s"),
    # NVIDIA H200 Tensor Core GPU datasheet (SXM): BF16/FP16 tensor 1,979 TFLOP/s with sparsity
    # = 989 dense; HBM3e 4.8 TB/s.
    "H200 SXM": dict(peak_flops=989e12, bandwidth=4.8e12,
                     note="NVIDIA H200 datasheet, SXM: 989 TFLOP/s dense BF16 tensor, HBM3e 4.8 TB/s"),
}


def _device(device) -> dict:
    if isinstance(device, dict):
        return device
    if device not in DEVICES:
        raise UserError(f"unknown device {device!r} for the roofline; known devices are {list(DEVICES)}, "
                        f"or pass a dict with peak_flops (FLOP/s) and bandwidth (bytes/s).")
    return DEVICES[device]


def attainable_flops(ai, device):
    """Roofline bound min(peak, AI * bandwidth) in FLOP/s; `ai` may be a float or a numpy array."""
    d = _device(device)
    bound = np.minimum(d["peak_flops"], np.asarray(ai, dtype=float) * d["bandwidth"])
    return float(bound) if bound.ndim == 0 else bound


def ridge_point(device) -> float:
    """AI (FLOPs/byte) above which the device is compute-bound rather than memory-bound."""
    d = _device(device)
    return d["peak_flops"] / d["bandwidth"]
