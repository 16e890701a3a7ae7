"""The ONNX graph builder: a placed (fake-quant) model written as standard ONNX with integer QDQ.

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
"""
from __future__ import annotations

import collections
import operator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize

from models.structure import Add, Slot
from quant.fold import fold_bn
from quant.place import quantize_, slots
from quant.quantizer import Quantizer, tensor_grid, weight_grid
from quant.recipe import Recipe
from quant.widths import FLOAT_BITS, A, W
from utils.errors import UserError

if TYPE_CHECKING:
    import onnx

from models.resnet import ChannelPad, Subsample   # option A's shortcut: the model zoo's only model-specific ops

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
    """Leaves: layers, Slots, the residual add, the pad shortcut and the modules with a translation below
    (everything else, a traced model's ``Op`` modules included, is traced through)."""

    LEAVES = (nn.Conv2d, nn.Linear, Slot, Add, nn.Identity, nn.ReLU, nn.AdaptiveAvgPool2d, nn.MaxPool2d, nn.Dropout,
              nn.Flatten, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, Subsample, ChannelPad)

    def is_leaf_module(self, m, qualname):
        return isinstance(m, self.LEAVES)


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
            elif isinstance(m, nn.Dropout):
                vals[node] = x   # eval mode: the identity
            elif isinstance(m, nn.Hardswish):   # x * HardSigmoid(x): ONNX's HardSwish needs opset 14
                xf = as_float(x)
                hs = g.node("HardSigmoid", [xf], f"{node.target}.hardsigmoid", alpha=1 / 6, beta=0.5)
                vals[node] = _Value(g.node("Mul", [xf, hs], f"{node.target}.hardswish"))
            elif type(m) in ELEMENTWISE:
                op, attrs = ELEMENTWISE[type(m)]
                vals[node] = _Value(g.node(op, [as_float(x)] + [g.init(f"{node.target}.{k}", np.array(v, np.float32))
                                                               for k, v in attrs.get("inputs", {}).items()],
                                           f"{node.target}.{op.lower()}", **attrs.get("attrs", {})))
            elif isinstance(m, nn.Flatten):
                if m.start_dim != 1 or m.end_dim != -1:
                    raise UserError(f"cannot export {node.target}: flatten other than from dimension 1")
                vals[node] = _Value(g.node("Flatten", [x.name], node.target, axis=1), x.q)
            elif isinstance(m, nn.MaxPool2d):
                if m.dilation not in (1, (1, 1)) or m.ceil_mode:
                    raise UserError(f"cannot export {node.target}: max pooling with dilation or ceil_mode")
                k, st, pd = (list(_pair(v)) for v in (m.kernel_size, m.stride or m.kernel_size, m.padding))
                vals[node] = _Value(g.node("MaxPool", [as_float(x)], node.target, kernel_shape=k, strides=st,
                                           pads=pd + pd))
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
            elif isinstance(m, Subsample):   # every other row and column; on a quantized tensor, in its integers
                st = g.init(f"{node.target}.starts", np.array([0, 0], np.int64))
                en = g.init(f"{node.target}.ends", np.array([2 ** 62, 2 ** 62], np.int64))
                ax = g.init(f"{node.target}.axes", np.array([2, 3], np.int64))
                sp = g.init(f"{node.target}.steps", np.array([2, 2], np.int64))
                vals[node] = _Value(g.node("Slice", [x.name, st, en, ax, sp], node.target), x.q)
            elif isinstance(m, ChannelPad):   # zero channels; on a quantized tensor the zero point
                half = m.extra // 2
                pads = g.init(f"{node.target}.pads", np.array([0, half, 0, 0, 0, m.extra - half, 0, 0], np.int64))
                pv = x.q["zp"] if x.q is not None else g.init(f"{node.target}.pad_value", np.array(0.0, np.float32))
                vals[node] = _Value(g.node("Pad", [x.name, pads, pv], node.target), x.q)
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
            elif node.target in (torch.add, operator.add, operator.iadd, torch.mul, operator.mul):
                a, b = vals[node.args[0]], vals[node.args[1]]
                op = "Add" if node.target in (torch.add, operator.add, operator.iadd) else "Mul"
                vals[node] = _Value(g.node(op, [as_float(a), as_float(b)], node.name))
            elif node.target is F.adaptive_avg_pool2d and tuple(_pair(node.args[1])) == (1, 1):
                vals[node] = _Value(g.node("GlobalAveragePool", [as_float(x)], node.name))
            elif node.target in (torch.cat, torch.concat):
                dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
                vals[node] = _Value(g.node("Concat", [as_float(vals[a]) for a in node.args[0]], node.name, axis=dim))
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


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


# module -> (ONNX op, constant inputs and attributes), run in float on the dequantized input
ELEMENTWISE = {nn.ReLU6: ("Clip", {"inputs": {"min": 0.0, "max": 6.0}}),
               nn.Hardsigmoid: ("HardSigmoid", {"attrs": {"alpha": 1 / 6, "beta": 0.5}}), nn.Sigmoid: ("Sigmoid", {})}


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
