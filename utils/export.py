"""Export a configuration to ONNX with integer QDQ, and run it on ONNX Runtime.

    python -m utils.export --checkpoint pretrained/resnet20_cifar10jpeg_30ep.pt --w-bits 8 --a-bits 8 \\
        --target ort-cpu --data-dir ../shared/data/cifar10-jpeg.tar.gz --onnx w8a8.onnx
    python -m utils.export --checkpoint C --config results/03_search.json --onnx searched.onnx
    python -m utils.export --checkpoint checkpoints/qat_greedy.pt --onnx greedy_qat.onnx

The file is standard ONNX, built node by node from the BN-folded model (``to_onnx``):

* one input, ``input``: the normalized float image, NCHW, exactly what the PyTorch model takes, with a
  dynamic batch dimension; one output, ``logits`` (float);
* quantized weights as per-output-channel integer initializers (int8, levels -127..127, zero point 0;
  int4 levels -7..7 at opset 21) with a DequantizeLinear; float weights stay float initializers;
* every quantized tensor as one QuantizeLinear where its Slot writes it and a DequantizeLinear in front
  of each reader, per tensor: uint8 (zero point 0) after a ReLU; a signed tensor's grid -128..127 as
  uint8 with zero point 128 (``--signed-dtype uint8``, the default: the same levels, stored offset) or as
  int8 with zero point 0 (``--signed-dtype int8``, what TensorRT and ARM builds read). ONNX Runtime's x86
  CPU build computes QLinearConv / QLinearAdd on uint8 activations only, with a conv's input and output of
  one type; it rewrites int8 QDQ pairs to uint8 itself, but not everywhere (all of ResNet-20's, but in
  MobileNetV2 most convs next to a signed tensor then stay float), so uint8 is what runs in integer
  everywhere;
* a conv's (or the linear layer's) bias as int32 (scale = input scale x weight scale) where ONNX
  Runtime fuses the node into QLinearConv / QGemm (quantized input, 8-bit weights, quantized output of
  the input's type), else float;
* ReLU as Relu (ONNX Runtime drops a Relu in front of a uint8 QuantizeLinear with zero point 0); the
  residual add as Add, which ONNX Runtime runs as QLinearAdd where both inputs and its output are
  quantized tensors of one type, i.e. under ``--target ort-cpu``.

What ONNX Runtime runs in integer is read back from its optimized graph (``fusion_report``): ResNet-20
W8A8 under ``--target ort-cpu`` runs all 21 convolutions as QLinearConv, all 9 adds as QLinearAdd, the
pool and the linear layer in integer; under ``generic`` the 9 conv2 + add pairs stay float. A float
layer that reads a quantized tensor would be quantized by ONNX Runtime itself (per-tensor int8 weights,
its default WeightBiasQuantization optimizer); the sessions here disable that optimizer (``KEEP_FLOAT``)
so that what stays float runs in float, and the export says when a deployment must do the same.

Only widths the runtime executes are exported: 8-bit weights and tensors, and float; 4-bit weights too
(int4, opset 21), although ONNX Runtime's CPU build dequantizes them to float in front of the convolution
(they save size, not time). Any other width is refused, or with ``--round-up-widths`` exported at the next
exportable width (weights 2-3 -> 4, 5-7 -> 8; tensors 2-7 -> 8), and the accuracy reported is that of
what was exported.

Tensor ranges come from <results-dir>/02_per_layer.json when stage 2 recorded them for this checkpoint and
target at the widths needed, else they are calibrated here on training images (as stage 2 does). A
fine-tuned checkpoint (utils.qat) exports its own learned weights and scales.

With data at hand, the export runs the file on ONNX Runtime's CPU build and compares it with the
fake-quant PyTorch model (the same configuration, same target) on the report (test) images:
top-1 agreement and the accuracy difference (``check_agreement``), and counts which convolutions and
adds ONNX Runtime runs in integer (``fusion_report``).

(This replaces the private "ai-qs-int-v2" torch file of earlier versions, which only this code read.)
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize

from models.structure import DEFAULT_TARGET, TARGETS, Add, Slot
from quant.fold import fold_bn
from quant.place import quantize_, slots
from quant.quantizer import WEIGHT_RANGES, Quantizer, tensor_grid, weight_grid
from quant.recipe import DEFAULT_PTQ, PTQ_METHODS, Recipe
from quant.stats import top1_agreement, top1_credit
from quant.widths import FLOAT_BITS, A, W, tensors_of, weights_of
from utils.errors import UserError, error_paragraph
from utils.machine import describe_cpu, runtime_machine
from utils.train import Normalizer

if TYPE_CHECKING:
    import onnx

try:   # the model zoo's only model-specific op: option A's subsample-and-pad shortcut
    from models.resnet import PadShortcut
except ImportError:  # pragma: no cover
    PadShortcut = ()

# What ONNX Runtime executes (and what this exporter therefore writes).
EXPORT_W_BITS = (8, 4, FLOAT_BITS)      # 4: int4 weights (opset 21), dequantized to float by ORT's CPU build
EXPORT_A_BITS = (8, FLOAT_BITS)
INTEGER_W_BITS = 8                      # the weight width ORT's CPU kernels compute with in integer
# {largest level: the width stored}: int8 on the full grid or in range 7 (quant/quantizer.py), int4
STORED_WEIGHT_QMAX = {weight_grid(8)[1]: 8, weight_grid(8, 7)[1]: 8, weight_grid(4)[1]: 4}
SIGNED_DTYPES = ("uint8", "int8")
DEFAULT_SIGNED_DTYPE = "uint8"
OPSET = 13                              # per-axis DequantizeLinear; 4-bit weights need 21
OPSET_INT4 = 21
INPUT_NAME, OUTPUT_NAME = "input", "logits"
INT4_NOTE = ("4-bit weights are stored as int4 (opset 21); ONNX Runtime's CPU build dequantizes them to float in "
             "front of the convolution: they save size, not time")


# ---------------------------------------------------------------- widths
def round_up_width(bits: int, allowed) -> int:
    """The narrowest exportable width >= bits (32 = float stays float)."""
    return min(b for b in allowed if b >= bits)


def unexportable(config: dict) -> dict:
    """{group: bits} of every group at a width this exporter cannot write."""
    return {g: b for g, b in config.items() if b not in (EXPORT_W_BITS if g[0] == W else EXPORT_A_BITS)}


def exportable_config(config: dict, round_up: bool) -> tuple[dict, dict]:
    """(the configuration to export, {group: (from, to)} of the widths rounded up). Without `round_up`, a
    configuration with another width is refused (UserError)."""
    bad = unexportable(config)
    if bad and not round_up:
        w = sorted({b for (k, _), b in bad.items() if k == W})
        a = sorted({b for (k, _), b in bad.items() if k == A})
        first = next(iter(bad))
        raise UserError(
            f"the configuration has {len(bad)} group(s) at widths ONNX Runtime cannot run ("
            + ", ".join(x for x in (f"weights at {w} bits" if w else "", f"tensors at {a} bits" if a else "") if x)
            + f"; e.g. {first[0]}:{first[1]} at {bad[first]} bits). The runtime executes 8-bit weights and "
            f"tensors (and float); 4-bit weights export too, as int4, but ONNX Runtime's CPU build dequantizes "
            f"them to float. Search with --target ort-cpu to get an exportable configuration, or pass "
            f"--round-up-widths to export the next exportable width instead (weights 2-3 -> 4, 5-7 -> 8; tensors "
            f"-> 8) and see the accuracy of what was exported.")
    out, changed = dict(config), {}
    for g, b in bad.items():
        out[g] = round_up_width(b, EXPORT_W_BITS if g[0] == W else EXPORT_A_BITS)
        changed[g] = (b, out[g])
    return out, changed


def rescale_to(q: Quantizer, bits: int, weight: bool, weight_range: int = 8) -> Quantizer:
    """`q` at another width with the same clip range (a fine-tuned quantizer rounded up keeps its learned range)."""
    if weight:
        qmin, qmax = weight_grid(bits, weight_range)
        return Quantizer(q.scale.detach() * q.qmax / qmax, qmin, qmax, q.axis, per_sample=False)
    qmin, qmax = tensor_grid(bits, q.signed)
    if q.signed:     # the clip range of a signed grid is its negative end
        return Quantizer(q.scale.detach() * -q.qmin / -qmin, qmin, qmax)
    return Quantizer(q.scale.detach() * q.qmax / qmax, qmin, qmax)


@torch.no_grad()
def round_up_quantized_(model: nn.Module, target: str, changed: dict, weight_range: int = 8) -> nn.Module:
    """Round up the widths of a quantized (e.g. fine-tuned) model in place, keeping each quantizer's clip range."""
    by_slot = slots(model, target)
    for (kind, name), (_, bits) in changed.items():
        if kind == A:
            old = by_slot[name].quant
            by_slot[name].quant = rescale_to(old, bits, weight=False).to(old.scale.device).eval()
        else:
            layer = model.get_submodule(name)
            old = layer.parametrizations.weight[0]
            layer.parametrizations.weight[0] = rescale_to(old, bits, True, weight_range).to(old.scale.device).eval()
    return model


# ---------------------------------------------------------------- the graph
class _Tracer(fx.Tracer):
    """Leaves: layers, Slots, the residual add and the pad shortcut (everything else is traced through)."""

    LEAVES = (nn.Conv2d, nn.Linear, Slot, Add, nn.Identity, nn.ReLU, nn.AdaptiveAvgPool2d)

    def is_leaf_module(self, m, qualname):
        return isinstance(m, self.LEAVES) or (PadShortcut and isinstance(m, PadShortcut))


@dataclass
class _Value:
    name: str
    q: dict | None = None          # quantized: {"scale", "zp" (initializer names), "dtype", "s", "z"}
    applied: str | None = None     # the Slot already applied (a Flatten moved behind its quantizer)


@dataclass
class _Graph:
    nodes: list = field(default_factory=list)
    inits: list = field(default_factory=list)
    names: collections.Counter = field(default_factory=collections.Counter)
    opset: int = OPSET
    int_bias: list = field(default_factory=list)     # layers written with an int32 bias (fusable)
    float_after_dq: list = field(default_factory=list)   # float-weight layers reading a quantized tensor

    def fresh(self, base: str) -> str:
        base = base.replace("/", ".")
        self.names[base] += 1
        return base if self.names[base] == 1 else f"{base}__{self.names[base] - 1}"

    def init(self, name, array: np.ndarray, dtype=None) -> str:
        from onnx import helper, numpy_helper
        name = self.fresh(name)
        if dtype is not None:      # int4: helper packs the values
            self.inits.append(helper.make_tensor(name, dtype, list(array.shape), array.flatten().tolist()))
        else:
            self.inits.append(numpy_helper.from_array(np.array(array, order="C"), name))   # keeps 0-d scalars
        return name

    def node(self, op, inputs, base, **attrs) -> str:
        from onnx import helper
        out = self.fresh(base)
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.fresh(f"{op}:{out}"), **attrs))
        return out


def _np_dtype(dtype: str):
    return np.uint8 if dtype == "uint8" else np.int8


def _tensor_qparams(q: Quantizer, signed_dtype: str) -> tuple[float, int, str]:
    """(scale, zero point, storage type) of an 8-bit tensor quantizer on its ONNX grid."""
    if (q.qmin, q.qmax) == (0, 255):
        return float(q.qparams()["scale"]), 0, "uint8"
    if (q.qmin, q.qmax) == (-128, 127):
        return float(q.qparams()["scale"]), (128 if signed_dtype == "uint8" else 0), signed_dtype
    raise UserError(f"a tensor quantizer on the grid [{q.qmin}, {q.qmax}] cannot be exported: ONNX Runtime runs "
                    f"8-bit tensors (grid 0..255 or -128..127). Use --round-up-widths.")


@torch.no_grad()
def to_onnx(model: nn.Module, signed_dtype: str = DEFAULT_SIGNED_DTYPE, input_shape=(3, 32, 32),
            doc: str = "") -> "onnx.ModelProto":
    """The ONNX form of a BN-folded model in eval mode: plain float layers, or placed quantizers (weights as
    ``parametrize`` parametrizations, as ``quantize_(..., trainable=True)`` and fine-tuning leave them; tensor
    quantizers in the Slots). See the module docstring for what the graph holds."""
    import onnx
    from onnx import TensorProto, helper

    if signed_dtype not in SIGNED_DTYPES:
        raise ValueError(f"signed_dtype must be one of {SIGNED_DTYPES}")
    if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        raise ValueError("to_onnx needs a BN-folded model (quant.fold.fold_bn)")
    gm = fx.GraphModule(model, _Tracer().trace(model))
    g = _Graph()
    vals: dict[fx.Node, _Value] = {}
    mods = dict(model.named_modules())

    def wq(m):   # (levels, per-channel scales or scalar, bits) of a quantized weight, or None
        if not parametrize.is_parametrized(m, "weight"):
            return None
        q = m.parametrizations.weight[0]
        if q.qmin != -q.qmax or q.qmax not in STORED_WEIGHT_QMAX:
            raise UserError(f"a weight quantizer on the grid [{q.qmin}, {q.qmax}] cannot be exported: ONNX Runtime "
                            f"runs 8-bit (and stores 4-bit) weights. Use --round-up-widths.")
        levels = q.integers(m.parametrizations.weight.original).cpu().numpy()
        return levels, q.qparams()["scale"], STORED_WEIGHT_QMAX[q.qmax]

    def slot_q(node):    # the tensor quantizer of an fx Slot node, or None
        return mods[node.target].quant if node.op == "call_module" and isinstance(mods[node.target], Slot) else None

    def follow(node):
        """The Slot node a layer's output goes to through Identity / ReLU (each with one user), or None."""
        relu = False
        while len(node.users) == 1:
            node = next(iter(node.users))
            if node.op == "call_module" and isinstance(mods[node.target], Slot):
                return node if mods[node.target].quant is not None else None
            if node.op == "call_module" and isinstance(mods[node.target], nn.Identity):
                continue
            is_relu = (node.op == "call_function" and node.target in (F.relu, torch.relu)) or (
                node.op == "call_module" and isinstance(mods[node.target], nn.ReLU))
            if is_relu and not relu:
                relu = True
                continue
            return None
        return None

    def as_float(v: _Value, out=None) -> str:
        if v.q is None:
            return v.name if out is None else g.node("Identity", [v.name], out)
        return g.node("DequantizeLinear", [v.name, v.q["scale"], v.q["zp"]], out or f"{v.name}.dq")

    def quantize(x: str, q: Quantizer, base: str) -> _Value:
        s, z, dtype = _tensor_qparams(q, signed_dtype)
        scale = g.init(f"{base}.scale", np.array(s, dtype=np.float32))
        zp = g.init(f"{base}.zero_point", np.array(z, dtype=_np_dtype(dtype)))
        return _Value(g.node("QuantizeLinear", [x, scale, zp], f"{base}.q"), {"scale": scale, "zp": zp, "dtype": dtype,
                                                                             "s": s, "z": z})

    def weight_input(name, m, v_in, fuse_out: _Value | None):
        """(weight value name, bias value name or None) of a conv/linear layer."""
        w = wq(m)
        if w is None:
            wname = g.init(f"{name}.weight", m.weight.detach().float().cpu().numpy())
            if v_in.q is not None:
                g.float_after_dq.append(name)
        else:
            levels, scale, bits = w
            per_channel = isinstance(scale, torch.Tensor)
            s = scale.numpy().astype(np.float32) if per_channel else np.array(scale, dtype=np.float32)
            if bits == 4:
                g.opset = max(g.opset, OPSET_INT4)
                wi = g.init(f"{name}.weight_int4", levels.astype(np.int8), TensorProto.INT4)
                zi = g.init(f"{name}.weight_zero_point", np.zeros(s.shape, dtype=np.int8), TensorProto.INT4)
            else:
                wi = g.init(f"{name}.weight_int8", levels.astype(np.int8))
                zi = g.init(f"{name}.weight_zero_point", np.zeros(s.shape, dtype=np.int8))
            si = g.init(f"{name}.weight_scale", s)
            wname = g.node("DequantizeLinear", [wi, si, zi], f"{name}.weight", **({"axis": 0} if per_channel else {}))
        if m.bias is None:
            return wname, None
        b = m.bias.detach().float().cpu().numpy()
        # QLinearConv needs a quantized output of the input's type; QGemm may also write float
        out_ok = (fuse_out.q["dtype"] == v_in.q["dtype"]) if fuse_out is not None and v_in.q is not None else (
            isinstance(m, nn.Linear))
        fused = w is not None and w[2] == INTEGER_W_BITS and v_in.q is not None and out_ok
        if not fused:
            return wname, g.init(f"{name}.bias", b)
        bscale = (v_in.q["s"] * np.broadcast_to(w[1].numpy() if isinstance(w[1], torch.Tensor) else np.array(w[1]),
                                                b.shape)).astype(np.float32)
        bq = np.clip(np.round(b / bscale), -2 ** 31, 2 ** 31 - 1).astype(np.int32)
        bi = g.init(f"{name}.bias_int32", bq)
        bs = g.init(f"{name}.bias_scale", bscale)
        bz = g.init(f"{name}.bias_zero_point", np.zeros(b.shape, dtype=np.int32))
        g.int_bias.append(name)
        return wname, g.node("DequantizeLinear", [bi, bs, bz], f"{name}.bias", axis=0)

    def out_quant(node) -> _Value | None:
        """The quantized value a layer's output will be written as (for the fusion decision), or None."""
        s = follow(node)
        if s is None:
            return None
        z = _tensor_qparams(mods[s.target].quant, signed_dtype)
        return _Value("", {"dtype": z[2]})

    output = None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            vals[node] = _Value(INPUT_NAME)
        elif node.op == "output":
            output = node.args[0]
        elif node.op == "get_attr":
            raise UserError(f"cannot export {type(model).__name__}: it reads the attribute {node.target} in forward")
        elif node.op == "call_module":
            m = mods[node.target]
            x = vals[node.args[0]]
            if isinstance(m, Slot):
                if m.quant is None or x.applied == node.target:
                    vals[node] = x
                else:
                    vals[node] = quantize(as_float(x), m.quant, node.target)
            elif isinstance(m, nn.Identity):
                vals[node] = x
            elif isinstance(m, nn.ReLU):
                vals[node] = _Value(g.node("Relu", [as_float(x)], f"{node.target}.relu"))
            elif isinstance(m, nn.Conv2d):
                if m.padding_mode != "zeros" or isinstance(m.padding, str):
                    raise UserError(f"cannot export conv {node.target}: padding {m.padding!r}/{m.padding_mode}")
                wname, bname = weight_input(node.target, m, x, out_quant(node))
                ph, pw = m.padding
                vals[node] = _Value(g.node("Conv", [as_float(x), wname] + ([bname] if bname else []), node.target,
                                           kernel_shape=list(m.kernel_size), strides=list(m.stride),
                                           pads=[ph, pw, ph, pw], dilations=list(m.dilation), group=m.groups))
            elif isinstance(m, nn.Linear):
                wname, bname = weight_input(node.target, m, x, out_quant(node))
                vals[node] = _Value(g.node("Gemm", [as_float(x), wname] + ([bname] if bname else []), node.target,
                                           transB=1))
            elif isinstance(m, Add):
                a, b = vals[node.args[0]], vals[node.args[1]]
                vals[node] = _Value(g.node("Add", [as_float(a), as_float(b)], node.target))
            elif isinstance(m, nn.AdaptiveAvgPool2d):
                if m.output_size not in (1, (1, 1)):
                    raise UserError(f"cannot export {node.target}: adaptive pooling to {m.output_size}")
                vals[node] = _Value(g.node("GlobalAveragePool", [as_float(x)], node.target))
            elif PadShortcut and isinstance(m, PadShortcut):
                # subsample by 2 and zero-pad channels; on a quantized tensor in its integers (pad = zero point)
                st = g.init(f"{node.target}.starts", np.array([0, 0], np.int64))
                en = g.init(f"{node.target}.ends", np.array([2 ** 62, 2 ** 62], np.int64))
                ax = g.init(f"{node.target}.axes", np.array([2, 3], np.int64))
                sp = g.init(f"{node.target}.steps", np.array([2, 2], np.int64))
                sub = g.node("Slice", [x.name, st, en, ax, sp], f"{node.target}.subsample")
                half = m.extra // 2
                pads = g.init(f"{node.target}.pads", np.array([0, half, 0, 0, 0, m.extra - half, 0, 0], np.int64))
                if x.q is not None:
                    pv = x.q["zp"]
                else:
                    pv = g.init(f"{node.target}.pad_value", np.array(0.0, np.float32))
                vals[node] = _Value(g.node("Pad", [sub, pads, pv], f"{node.target}.pad"), x.q)
            else:
                raise UserError(f"cannot export {node.target}: {type(m).__name__} has no ONNX translation here")
        elif node.op == "call_function":
            x = vals[node.args[0]]
            if node.target in (F.relu, torch.relu):
                vals[node] = _Value(g.node("Relu", [as_float(x)], f"{node.name}"))
            elif node.target is torch.flatten:
                start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
                if start != 1 or (len(node.args) > 2 and node.args[2] != -1):
                    raise UserError("cannot export torch.flatten other than from dimension 1")
                users = list(node.users)
                sq = slot_q(users[0]) if len(users) == 1 else None
                if x.q is None and sq is not None:    # quantize first, flatten the integers: GAP -> Q stays fusable
                    v = quantize(x.name, sq, users[0].target)
                    vals[node] = _Value(g.node("Flatten", [v.name], node.name, axis=1), v.q, users[0].target)
                else:
                    vals[node] = _Value(g.node("Flatten", [x.name], node.name, axis=1), x.q)
            elif node.target in (torch.add, __import__("operator").add):
                a, b = vals[node.args[0]], vals[node.args[1]]
                vals[node] = _Value(g.node("Add", [as_float(a), as_float(b)], node.name))
            else:
                raise UserError(f"cannot export {type(model).__name__}: the operation {node.target} has no ONNX "
                                f"translation here")
        else:
            raise UserError(f"cannot export {type(model).__name__}: fx node {node.op} {node.target}")
    as_float(vals[output], OUTPUT_NAME)
    c, h, w = input_shape
    x_info = helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", c, h, w])
    y_info = helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", None])
    graph = helper.make_graph(g.nodes, type(model).__name__, [x_info], [y_info], g.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", g.opset)], producer_name="ai-qs",
                              doc_string=doc)
    proto.ir_version = helper.find_min_ir_version_for([helper.make_opsetid("", g.opset)])
    proto.metadata_props.add(key="int32_bias_layers", value=",".join(g.int_bias))
    proto.metadata_props.add(key="float_layers_reading_quantized_tensors", value=",".join(g.float_after_dq))
    onnx.checker.check_model(proto, full_check=True)
    return proto


# ---------------------------------------------------------------- building what is exported
def placed_model(float_model: nn.Module, config: dict, ranges: dict, target: str,
                 recipe: Recipe | None = None, levels: dict | None = None) -> nn.Module:
    """The fake-quant model of `config` (post-training: weight scales of the folded weights by `recipe`, default
    the target's; calibrated tensor ranges) in the form the exporter reads: weights as parametrizations,
    quantizers in the Slots, eval mode. It computes exactly what ``quantize_(fold_bn(model), config, ranges,
    target, **recipe.weight_kwargs())`` computes."""
    recipe = recipe or Recipe.for_target(target)
    return quantize_(fold_bn(float_model), config, ranges, target, trainable=True, learn_scales=False,
                     levels=levels, **recipe.weight_kwargs()).eval()


def export_model(qmodel: nn.Module, target: str, signed_dtype: str = DEFAULT_SIGNED_DTYPE, meta: dict | None = None,
                 input_shape=(3, 32, 32)) -> "onnx.ModelProto":
    """`to_onnx` plus metadata: the configuration (tensor-widths/1), target, normalization and source."""
    import json
    proto = to_onnx(qmodel, signed_dtype, input_shape, doc=f"AI-QS export, {target} kernels")
    for k, v in {"target": target, "signed_dtype": signed_dtype, **(meta or {})}.items():
        proto.metadata_props.add(key=k, value=v if isinstance(v, str) else json.dumps(v))
    return proto


# ---------------------------------------------------------------- ONNX Runtime
# ONNX Runtime's graph optimizer that quantizes, by itself, the float weights (per tensor, int8) and float biases
# (int32) of a Conv/Gemm whose input comes from a DequantizeLinear: a layer the configuration keeps in float would
# not run in float. Sessions here disable it, so that what stays float in the file stays float when it runs.
KEEP_FLOAT = ("WeightBiasQuantization",)


def ort_session(model, threads: int = 1, optimized_path=None, level: str = "all", keep_float: bool = True):
    """An ONNX Runtime CPU session (sequential, `threads` intra-op threads) of a ModelProto, bytes or path; with
    `keep_float`, without the optimizer that would quantize float layers behind a DequantizeLinear (KEEP_FLOAT)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                   "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[level]
    so.log_severity_level = 3      # the saved optimized model's "hardware specific" warning is expected
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), so,
                                providers=["CPUExecutionProvider"], disabled_optimizers=list(KEEP_FLOAT) if keep_float else None)


def runtime_name() -> str:
    import onnxruntime as ort
    return f"onnxruntime {ort.__version__} CPUExecutionProvider"


def normalized_numpy(x_u8: torch.Tensor, normalize) -> np.ndarray:
    return normalize(x_u8).contiguous().cpu().numpy()


def ort_logits(sess, x_u8: torch.Tensor, normalize, batch_size: int = 500) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: normalized_numpy(x_u8[i:i + batch_size], normalize)})[0]
                           for i in range(0, len(x_u8), batch_size)])


@torch.no_grad()
def torch_logits(model: nn.Module, x_u8: torch.Tensor, normalize, batch_size: int = 500) -> np.ndarray:
    dev = next(model.parameters()).device
    return torch.cat([model(normalize(x_u8[i:i + batch_size].to(dev))).float().cpu()
                      for i in range(0, len(x_u8), batch_size)]).numpy()


# The bar for "the runtime computes what the simulation computes" (>= 2,000 test images).
MIN_AGREEMENT = 99.0          # % of images with the same top-1 class
MAX_ACC_DIFF = 0.2            # accuracy points
MIN_CHECK_IMAGES = 2000


def check_agreement(model_proto, qmodel: nn.Module, x_u8: torch.Tensor, labels: torch.Tensor, normalize,
                    threads: int = 1, batch_size: int = 500) -> dict:
    """ONNX Runtime (CPU) on the exported file against the fake-quant PyTorch model, on the same images:
    top-1 agreement (%), both accuracies (%) and their difference (points), the largest logit difference.
    Ties count as a random tie-break would in expectation (quant.stats.top1_credit, top1_agreement)."""
    sess = ort_session(model_proto, threads)
    a = ort_logits(sess, x_u8, normalize, batch_size)
    b = torch_logits(qmodel, x_u8, normalize, batch_size)
    y = labels.cpu()
    n = len(y)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    out = {"images": n, "agreement": 100.0 * float(top1_agreement(ta, tb).mean()),
           "ort_acc": 100.0 * float(top1_credit(ta, y).mean()), "torch_acc": 100.0 * float(top1_credit(tb, y).mean()),
           "max_logit_diff": float(np.abs(a - b).max())}
    out["acc_diff"] = out["ort_acc"] - out["torch_acc"]
    out["passed"] = bool(out["agreement"] >= MIN_AGREEMENT and abs(out["acc_diff"]) <= MAX_ACC_DIFF)
    out["enough_images"] = n >= MIN_CHECK_IMAGES
    return out


def fusion_report(model_proto, threads: int = 1) -> dict:
    """What ONNX Runtime's CPU build actually runs, read from its optimized graph (all optimizations, as the
    benchmark runs it): how many of the exported convolutions, adds, linear layers and pools became integer
    kernels (QLinearConv, QLinearAdd, QGemm / QLinearMatMul, QLinearGlobalAveragePool), and every op type."""
    import onnx
    exported = collections.Counter(n.op_type for n in model_proto.graph.node)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "optimized.onnx"
        ort_session(model_proto, threads, optimized_path=path)
        opt = onnx.load(str(path))
    ops = collections.Counter((f"{n.domain}." if n.domain not in ("", "ai.onnx", "com.microsoft") else "")
                              + n.op_type for n in opt.graph.node)
    return {"convs": exported["Conv"], "integer_convs": ops["QLinearConv"],
            "adds": exported["Add"], "integer_adds": ops["QLinearAdd"],
            "linears": exported["Gemm"], "integer_linears": ops["QGemm"] + ops["QLinearMatMul"],
            "pools": exported["GlobalAveragePool"], "integer_pools": ops["QLinearGlobalAveragePool"],
            "quantize_nodes": ops["QuantizeLinear"], "dequantize_nodes": ops["DequantizeLinear"],
            "optimized_ops": dict(sorted(ops.items()))}


def describe_fusion(f: dict) -> str:
    return (f"ONNX Runtime runs {f['integer_convs']} of {f['convs']} convolutions as QLinearConv, {f['integer_adds']} "
            f"of {f['adds']} adds as QLinearAdd, {f['integer_linears']} of {f['linears']} linear layers and "
            f"{f['integer_pools']} of {f['pools']} pools in integer; {f['quantize_nodes']} QuantizeLinear and "
            f"{f['dequantize_nodes']} DequantizeLinear left")


def config_summary(config: dict) -> str:
    w = collections.Counter(b for (k, _), b in config.items() if k == W)
    a = collections.Counter(b for (k, _), b in config.items() if k == A)
    fmt = lambda c: ", ".join(f"{n} at {'float' if b == FLOAT_BITS else f'{b} bits'}" for b, n in sorted(c.items()))
    return f"weights: {fmt(w)}; tensors: {fmt(a)}"


# ---------------------------------------------------------------- the command line
def recorded_stage2(args, checkpoint: Path):
    """(stage 2's results in --results-dir when they were made from this checkpoint, else None; why they are not
    used, or None)."""
    from utils.io import PRODUCERS, RESULTS_FILES, load_results_json, sha256_file
    path = Path(args.results_dir) / RESULTS_FILES["2"]
    if not path.is_file():
        return None, None
    try:
        obj = load_results_json(path, "2", PRODUCERS["2"])
    except UserError as e:
        return None, f"{path} not used ({e})"
    recorded = obj.get("provenance", {}).get("inputs", {}).get("checkpoint", {}).get("sha256")
    if recorded != sha256_file(checkpoint):
        return None, f"{path} was made from another checkpoint: its tensor ranges are not used"
    return obj, None


def _stage3_answer(path, checkpoint: Path, force: bool):
    """Stage 3's answer when --config names a 03_search.json (its ``best`` search): (file-form configuration,
    target, recorded ranges, quantization, label); None for a plain configuration file."""
    import json
    from utils.config import searched_answer
    from utils.io import PRODUCERS, check_same_checkpoint, load_results_json
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None     # load_config says what is wrong with it
    if not (isinstance(obj, dict) and obj.get("stage") == "3"):
        return None
    obj = load_results_json(path, "3", PRODUCERS["3"], force=force)
    check_same_checkpoint(obj, path, checkpoint, PRODUCERS["3"], force)
    answer = searched_answer(obj)
    if answer is None:
        raise UserError(f"{path} holds no searched configuration (no 'best' answer). Re-run {PRODUCERS['3']}.")
    best, entry = answer
    return (entry["config"], obj.get("target", DEFAULT_TARGET),
            (obj.get("activation_calibration") or {}).get("tensors") or {}, obj.get("quantization") or {},
            f"{path} ({best})", obj.get("ptq_fit"))


def seeded_subset(n: int, k: int, seed: int) -> np.ndarray:
    """`k` of `n` indices, seeded and sorted (all of them when k >= n): test sets are stored class by class."""
    from utils.split import quick_subset
    idx = np.arange(n)
    return idx if k >= n else np.sort(quick_subset(idx, k, seed))


@dataclass
class Prepared:
    """A quantized model ready to export, and what the check needs."""
    qmodel: nn.Module
    float_model: nn.Module | None      # the BN-folded float model (None for a fine-tuned checkpoint)
    target: str
    config: dict                       # what is exported (after rounding up)
    asked: dict                        # what was asked for
    rounded: dict                      # {group: (from, to)}
    space: object
    normalization: dict
    source: str
    notes: list
    recipe: Recipe = Recipe()
    check_x: torch.Tensor | None = None
    check_y: torch.Tensor | None = None
    check_set: str = ""


def prepare(args) -> Prepared:
    """Resolve the checkpoint, configuration, target, tensor ranges and check images of an export (see main)."""
    from quant.cost import kernel_table
    from utils.checkpoint import load_model, parse_normalization, read_checkpoint
    from utils.cli import resolve_arch
    from utils.config import load_config
    from utils.data import load_dataset
    from utils.qat import load_qat
    from utils.stages.common import load_setup, resolve_checkpoint

    if args.check_images < 0 or args.threads < 1:
        raise UserError(f"--check-images must be >= 0 and --threads >= 1; got {args.check_images}, {args.threads}.")
    given = [f for f, v in (("--config", args.config), ("--w-bits", args.w_bits), ("--a-bits", args.a_bits)) if v is not None]
    ckpt = resolve_checkpoint(args)
    obj = read_checkpoint(ckpt)
    notes = []
    if isinstance(obj, dict) and "qat_format" in obj:     # a fine-tuned checkpoint carries everything
        if given:
            raise UserError(f"{ckpt} is a fine-tuned checkpoint: it carries its configuration and scales, so "
                            f"{' and '.join(given)} cannot change them. Drop {' and '.join(given)}, or export from "
                            f"the float checkpoint it was fine-tuned from.")
        qm, ck = load_qat(ckpt)          # refuses other versions of the format
        target, recipe = ck["target"], Recipe.from_json(ck["quantization"])
        if args.weight_range is not None and args.weight_range != recipe.weight_range:
            raise UserError(f"{ckpt} was fine-tuned with 8-bit weights in range {recipe.weight_range}; its learned "
                            f"weights cannot be exported in range {args.weight_range}. Drop --weight-range, or "
                            f"fine-tune with stage 2's --weight-range {args.weight_range}.")
        if args.target is not None and args.target != target:
            raise UserError(f"{ckpt} was fine-tuned under --target {target}; it cannot be exported as {args.target}. "
                            f"Drop --target, or fine-tune under --target {args.target}.")
        from models import build_from_args
        space = kernel_table(build_from_args(ck["model_args"]), target).space
        asked = {(g[0], g[1]): int(b) for g, b in ck["config"]}
        cfg, rounded = exportable_config(asked, args.round_up_widths)
        if rounded:
            round_up_quantized_(qm, target, rounded, recipe.weight_range)
            notes.append("fine-tuned quantizers rounded up keep their learned clip range")
        p = Prepared(qm, None, target, cfg, asked, rounded, space, ck["normalization"], str(ckpt), notes, recipe)
        if args.check_images:
            data = load_dataset(args.dataset or "cifar10", args.data_dir or Path("data"))
            idx = seeded_subset(len(data.test_y), args.check_images, 0)
            p.check_x, p.check_y = torch.from_numpy(data.test_x[idx]), torch.from_numpy(data.test_y[idx])
            p.check_set = f"{len(idx)} test images of {data.name}"
        return p

    # a float checkpoint: quantize it here
    arch, shortcut = resolve_arch(args.arch, args.depth, args.shortcut)
    model, meta = load_model(ckpt, arch, shortcut, parse_normalization(args.normalization),
                             require_finished=not args.force)
    s2, why = recorded_stage2(args, ckpt)
    if why:
        notes.append(why)
    if args.config is not None and (args.w_bits is not None or args.a_bits is not None):
        raise UserError("give either --config FILE or --w-bits/--a-bits (a uniform configuration), not both.")
    s3 = _stage3_answer(args.config, ckpt, args.force) if args.config is not None else None
    if s3 is not None and args.target is not None and args.target != s3[1]:
        raise UserError(f"{s3[4]} was searched under --target {s3[1]}; its configuration cannot be exported as "
                        f"--target {args.target}. Drop --target, or search under --target {args.target}.")
    target = args.target or (s3[1] if s3 else None) or (s2 or {}).get("target") or DEFAULT_TARGET
    space = kernel_table(model, target).space
    if s3 is not None:
        asked = space.parse(s3[0], source=s3[4])
        notes.append(f"configuration: the answer of {s3[4]}")
    elif args.config is not None:
        asked = load_config(args.config, space)
    elif args.w_bits is not None or args.a_bits is not None:
        w = FLOAT_BITS if args.w_bits is None else args.w_bits
        a = FLOAT_BITS if args.a_bits is None else args.a_bits
        asked = space.uniform(w, a, None if args.quantize_logits else FLOAT_BITS)
    else:
        raise UserError(f"{ckpt} is a float checkpoint: say what to export with --config FILE (a tensor-widths/1 "
                        f"configuration, e.g. one stage 3 found) or --w-bits N --a-bits N (every weight and tensor "
                        f"at one width, e.g. --w-bits 8 --a-bits 8), or pass a fine-tuned checkpoint.")
    cfg, rounded = exportable_config(asked, args.round_up_widths)
    widths = sorted({a for a in tensors_of(cfg).values() if a != FLOAT_BITS}, reverse=True)
    ranges, recipe, measured_by = None, Recipe.for_target(target), None

    def covers(rec):
        return all(str(a) in (rec.get(n) or {}).get("scales", {}) for n, a in tensors_of(cfg).items() if a != FLOAT_BITS)
    if s3 is not None and covers(s3[2]):
        ranges, recipe, measured_by = s3[2], Recipe.from_json(s3[3]), "the search"
        notes.append(f"tensor ranges and weight quantization ({recipe.describe()}) as the search used them")
    elif s2 is not None and s2.get("target") == target:
        rec = (s2.get("activation_calibration") or {}).get("tensors") or {}
        if covers(rec):
            ranges, recipe, measured_by = rec, Recipe.from_json(s2.get("quantization")), "stage 2"
            notes.append(f"tensor ranges and weight quantization ({recipe.describe()}) as stage 2 recorded them in "
                         f"{Path(args.results_dir) / '02_per_layer.json'}")
    fit_record = {"the search": (s3 or [None] * 6)[5], "stage 2": (s2 or {}).get("ptq_fit")}.get(measured_by)
    recipe = dataclasses.replace(with_weight_range(recipe, args.weight_range, measured_by, notes),
                                 logits="quantized" if narrows_logits(cfg, space) else "float",
                                 ptq=args.ptq or (recipe.ptq if measured_by else DEFAULT_PTQ["fused"]))
    pairs = [(n, b) for n, b in weights_of(cfg).items() if b != FLOAT_BITS]
    levels = {}
    if recipe.ptq != "nearest" and fit_record:
        from utils.ptq import cached_levels
        levels = cached_levels(ckpt, recipe, fit_record, Path(args.checkpoint_dir) / "ptq-cache")
    learn = recipe.ptq != "nearest" and any(p_ not in levels for p_ in pairs)
    if recipe.ptq != "nearest":
        notes.append(f"weights rounded by {recipe.ptq}: " + (f"learned levels fitted here on {recipe.ptq_images} "
                     f"training images (cached under {Path(args.checkpoint_dir) / 'ptq-cache'})" if learn else
                     f"the learned levels {measured_by} used, from the cache"))
    need_data = args.check_images > 0 or (ranges is None and widths) or learn
    p = Prepared(None, fold_bn(model), target, cfg, asked, rounded, space, meta["normalization"], str(ckpt), notes,
                 recipe)
    if need_data:
        s = load_setup(args, recipe, calib_images=args.calib_images, target=target)
        if learn:
            levels = s.learn_levels(pairs)
        if ranges is None and widths:
            ranges = s.calibrate(widths)
            notes.append(f"tensor ranges calibrated here on {len(s.calib_x)} training images at {widths} bits "
                         f"(no stage-2 record for this checkpoint, target and widths)")
        if args.check_images:
            idx = seeded_subset(len(s.report_y), args.check_images, s.seed)
            p.check_x, p.check_y = s.report_x[idx].cpu(), s.report_y[idx].cpu()
            p.check_set = f"{len(idx)} {s.split.report.name} images"
    p.qmodel = placed_model(model.cpu(), cfg, ranges or {}, target, recipe, levels)
    return p


def narrows_logits(config: dict, space) -> bool:
    return space.logits is not None and config.get((A, space.logits), FLOAT_BITS) != FLOAT_BITS


def with_weight_range(recipe: Recipe, weight_range: int | None, measured_by: str | None, notes: list) -> Recipe:
    """`recipe` with --weight-range where given; a note when that is not the range `measured_by` simulated."""
    if weight_range is None or weight_range == recipe.weight_range:
        return recipe
    if measured_by:
        notes.append(f"--weight-range {weight_range} differs from the range {recipe.weight_range} that {measured_by} "
                     f"measured: the file computes a model the search did not evaluate (the check below compares "
                     f"it with its own simulation)")
    return dataclasses.replace(recipe, weight_range=weight_range)


def get_args_parser():
    from utils.cli import add_common_args
    from utils.stages.common import add_model_args
    p = argparse.ArgumentParser(
        description="Write a configuration as standard ONNX with integer QDQ (int8 weights per channel, 8-bit "
                    "tensors), check it on ONNX Runtime's CPU build against the fake-quant PyTorch model, and say "
                    "what the runtime runs in integer.")
    add_common_args(p)
    add_model_args(p)
    for a in p._actions:
        if a.dest == "checkpoint":
            a.help = ("a float checkpoint (with --config or --w-bits/--a-bits), or a fine-tuning checkpoint "
                      "<checkpoint-dir>/qat_<name>.pt, which carries its configuration (default: the one recorded "
                      "in <results-dir>/01_baseline.json)")
    g = p.add_argument_group("export")
    g.add_argument("--onnx", required=True, type=Path, help="the ONNX file to write")
    g.add_argument("--config", default=None,
                   help="a tensor-widths/1 configuration file, or stage 3's results (<results-dir>/03_search.json: its "
                        "best answer, with the target, tensor ranges and weight quantization the search used)")
    g.add_argument("--w-bits", default=None, type=int, help="every weight layer at this width (default: float)")
    g.add_argument("--a-bits", default=None, type=int, help="every tensor, the image included, at this width; the "
                                                            "logits too with --quantize-logits (default: float)")
    g.add_argument("--quantize-logits", action="store_true",
                   help="with --a-bits: the logits at that width too (default: float logits)")
    g.add_argument("--target", default=None, choices=TARGETS,
                   help="the kernels simulated and exported: generic (the add fused into the conv before it) or "
                        "ort-cpu (ONNX Runtime's CPU kernels: the conv output quantized, the add its own integer "
                        "kernel) (default: a fine-tuned checkpoint's; else the one stage 2 recorded in --results-dir; "
                        "else generic)")
    g.add_argument("--signed-dtype", default=DEFAULT_SIGNED_DTYPE, choices=SIGNED_DTYPES,
                   help="storage of signed tensors (grid -128..127): uint8 with zero point 128 (the same levels), which "
                        "ONNX Runtime's x86 CPU kernels run in integer wherever they are; or int8 with zero point 0 "
                        "(TensorRT, ARM), which ONNX Runtime on x86 rewrites to uint8 only in some places (default: uint8)")
    g.add_argument("--weight-range", default=None, type=int, choices=WEIGHT_RANGES,
                   help="levels of the int8 weights: 7 (-63..63), which ONNX Runtime's x86 kernels compute exactly on "
                        "every CPU, or 8 (-127..127), which they saturate on CPUs without VNNI (default: what stage 2 "
                        "or 3 recorded; else 7 under --target ort-cpu and 8 under generic)")
    g.add_argument("--ptq", default=None, choices=PTQ_METHODS,
                   help="weight rounding: nearest, or adaround (learned levels, from the cache stage 2 filled, else "
                        f"fitted here on training images) (default: what stage 2 or 3 recorded; else "
                        f"{DEFAULT_PTQ['fused']})")
    g.add_argument("--round-up-widths", action="store_true",
                   help="export widths the runtime cannot run at the next exportable width (weights 2-3 -> 4, 5-7 -> 8; "
                        "tensors -> 8) instead of refusing them; the accuracy reported is the exported one's")
    g.add_argument("--check-images", default=MIN_CHECK_IMAGES, type=int,
                   help=f"report (test) images ONNX Runtime and the fake-quant PyTorch model both classify (a seeded "
                        f"subset; for a fine-tuned checkpoint, of the test set of --dataset/--data-dir): top-1 "
                        f"agreement >= {MIN_AGREEMENT}%% and accuracy difference <= {MAX_ACC_DIFF} points pass; 0 = "
                        f"no check and no data needed when ranges are recorded (default: {MIN_CHECK_IMAGES})")
    g.add_argument("--threads", default=2, type=int, help="ONNX Runtime intra-op threads for the check (default: 2)")
    g.add_argument("--calib-images", default=None, type=int,
                   help="training images that calibrate tensor ranges when stage 2 recorded none (default: 1000)")
    return p


def export(args) -> dict:
    """Prepare, export, look at what ONNX Runtime fuses, check agreement, write. Returns the report."""
    t0 = time.time()
    p = prepare(args)
    proto = export_model(p.qmodel, p.target, args.signed_dtype,
                         meta={"config": p.space.to_file(p.config), "normalization": p.normalization, "source": p.source,
                               "quantization": p.recipe.to_json()})
    fusion = fusion_report(proto, args.threads)
    behind = [v for p_ in proto.metadata_props if p_.key == "float_layers_reading_quantized_tensors"
              for v in p_.value.split(",") if v]
    if behind:
        p.notes.append(f"{len(behind)} float layer(s) read a quantized tensor ({', '.join(behind[:3])}"
                       f"{', ...' if len(behind) > 3 else ''}): ONNX Runtime's default optimizer "
                       f"{KEEP_FLOAT[0]} would quantize their weights to per-tensor int8 by itself; run the file "
                       f"with InferenceSession(..., disabled_optimizers={list(KEEP_FLOAT)}) to keep them float, as "
                       f"this check and benchmarks/deploy_speed.py do")
    rep = {"onnx": str(args.onnx), "target": p.target, "signed_dtype": args.signed_dtype, "source": p.source,
           "quantization": p.recipe.to_json(), "machine": runtime_machine(), "config": config_summary(p.config), "rounded_up": {f"{k}:{n}": v for (k, n), v in p.rounded.items()},
           "int4_weights": any(b == 4 for (k, _), b in p.config.items() if k == W), "fusion": fusion,
           "int8_weight_layers": sum(b == INTEGER_W_BITS for (k, _), b in p.config.items() if k == W),
           "notes": p.notes, "check": None}
    if p.check_x is not None:
        normalize = Normalizer(p.normalization["mean"], p.normalization["std"], "cpu")
        rep["check"] = check_agreement(proto, p.qmodel, p.check_x, p.check_y, normalize, args.threads,
                                       args.eval_batch_size)
        rep["check"]["set"] = p.check_set
        if p.float_model is not None:
            fl = torch.from_numpy(torch_logits(p.float_model, p.check_x, normalize, args.eval_batch_size))
            rep["check"]["float_acc"] = 100.0 * float(top1_credit(fl, p.check_y.cpu()).mean())
    from utils.io import atomic_write_bytes
    atomic_write_bytes(args.onnx, proto.SerializeToString())
    rep["bytes"] = Path(args.onnx).stat().st_size
    rep["seconds"] = time.time() - t0
    print_report(rep)
    return rep


def saturation_risk(rep: dict) -> bool:
    """8-bit integer weights on the full range, run by a CPU that is not known to have VNNI."""
    return (rep["int8_weight_layers"] > 0 and rep["quantization"]["weight_range"] == 8 and rep["fusion"]["integer_convs"] > 0
            and rep["machine"]["cpu"]["vnni"] is not True)


def failure_hint(rep: dict) -> str:
    """One paragraph on why the agreement check failed, and what to do."""
    cpu = describe_cpu(rep["machine"]["cpu"])
    if saturation_risk(rep):
        return (f"likely cause: this CPU, {cpu}, multiplies uint8 tensors by int8 weights in ONNX Runtime's "
                f"AVX2 kernel, which adds two products in 16 bits (vpmaddubsw) and saturates when they exceed "
                f"32,767 (2 x 255 x 127 = 64,770). The file uses 8-bit weights on the full range -127..127. "
                f"Remedy: export with --weight-range 7 (-63..63, exact on every x86 CPU; the default under "
                f"--target ort-cpu), and run stage 2 with the same --weight-range so that the search measures "
                f"what runs.")
    return (f"the file and the fake-quant model disagree beyond rounding on {cpu} (weight range "
            f"{rep['quantization']['weight_range']}, ONNX Runtime {rep['machine']['onnxruntime']}). Check that "
            f"the file runs with disabled_optimizers={list(KEEP_FLOAT)} as here, re-run with more --check-images, "
            f"and report the configuration if it persists.")


def print_report(rep: dict):
    print(f"wrote {rep['onnx']} ({rep['bytes'] / 1e3:.0f} kB; target {rep['target']}, signed tensors as "
          f"{rep['signed_dtype']}, 8-bit weights in range {rep['quantization']['weight_range']}): {rep['config']}")
    print(f"machine: {describe_cpu(rep['machine']['cpu'])}; onnxruntime {rep['machine']['onnxruntime']}")
    for n in rep["notes"]:
        print(f"note: {n}")
    if rep["rounded_up"]:
        moves = collections.Counter(f"{k.split(':')[0]}{a}->{b}" for k, (a, b) in rep["rounded_up"].items())
        print(f"rounded up {len(rep['rounded_up'])} group(s) ({', '.join(f'{m}: {c}' for m, c in sorted(moves.items()))}); "
              f"the accuracy below is that of the exported widths")
    if rep["int4_weights"]:
        print(f"note: {INT4_NOTE}")
    print(describe_fusion(rep["fusion"]))
    c = rep["check"]
    if c:
        print(f"check on {c['set']}: ONNX Runtime {c['ort_acc']:.2f}%, fake-quant PyTorch {c['torch_acc']:.2f}%"
              + (f", float {c['float_acc']:.2f}%" if "float_acc" in c else "")
              + f"; top-1 agreement {c['agreement']:.2f}%, accuracy difference {c['acc_diff']:+.2f} points: "
              f"{'PASS' if c['passed'] else 'FAIL'} (>= {MIN_AGREEMENT}% and <= {MAX_ACC_DIFF} points"
              + ("" if c["enough_images"] else f"; fewer than {MIN_CHECK_IMAGES} images") + ")")
        if not c["passed"]:
            print(error_paragraph(failure_hint(rep)).replace("error: ", "", 1))
    elif saturation_risk(rep):
        print(f"note: {failure_hint(rep)}")


def main(argv=None) -> int:
    """Exit codes: 0 written (and the check passed), 1 written but the check failed, 2 bad input, 130 Ctrl-C."""
    args = get_args_parser().parse_args(argv)
    try:
        rep = export(args)
    except UserError as e:
        print(error_paragraph(e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted (Ctrl-C): no file was written.", file=sys.stderr)
        return 130
    return 1 if rep["check"] and not rep["check"]["passed"] else 0


if __name__ == "__main__":
    sys.exit(main())
