"""ONNX Runtime's x86 uint8 x int8 convolution on a CPU without VNNI, emulated: where 8-bit weights saturate.

On such a CPU, ONNX Runtime's integer GEMM (MLAS) multiplies the uint8 tensor by the int8 weights with AVX2's
``vpmaddubsw``: it forms the products of two neighbours along the reduction axis K and adds them with int16
saturation, then accumulates the pair sums in int32 (``vpmaddwd`` with ones). With VNNI (``vpdpbusd``) every
product reaches the int32 accumulator exactly. A pair exceeds int16 only if 255 x |w1| + 255 x |w2| > 32,767,
which needs weights beyond +-64: impossible in weight range 7 (-63..63; 2 x 255 x 63 = 32,130), possible on
the full int8 grid (2 x 255 x 127 = 64,770).

``conv_saturation(proto, x)`` runs the exported file on ONNX Runtime, reads the uint8 tensor every integer
convolution takes, and recomputes each convolution both ways: exactly, and with the pairs saturated. K is
ordered as the runtime's channels-last convolution lays it out (kernel row, kernel column, input channel), so
a pair is two neighbouring input channels at one kernel tap; ``k_order="chw"`` takes NCHW im2col order instead.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

INT16_MIN, INT16_MAX = -(2 ** 15), 2 ** 15 - 1
K_ORDERS = ("hwc", "chw")


def pair_sums(x_cols: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(exact [O, L], emulated [O, L], saturated pairs, largest |pair sum|) of the int32 products
    w [O, K] @ x_cols [K, L], the emulation adding neighbouring products (k, k + 1) with int16 saturation
    before the int32 sum."""
    x, w = x_cols.to(torch.int32), w.to(torch.int32)
    if x.shape[0] % 2:      # an odd K is padded with a zero product, as the packed kernels do
        x = torch.cat([x, x.new_zeros(1, x.shape[1])])
        w = torch.cat([w, w.new_zeros(w.shape[0], 1)], 1)
    prod = w[:, :, None] * x[None]                       # [O, K, L]
    pairs = prod[:, 0::2] + prod[:, 1::2]                # [O, K/2, L]
    sat = pairs.clamp(INT16_MIN, INT16_MAX)
    return pairs.sum(1), sat.sum(1), int((pairs != sat).sum()), int(pairs.abs().max()) if pairs.numel() else 0


def taps(x: torch.Tensor, kernel, stride, pads, dilation, zero_point: int) -> torch.Tensor:
    """[N, C, kh * kw, L]: for each image, input channel and kernel tap, the L values of the uint8 tensor
    `x` [N, C, H, W] a convolution multiplies, padded with its zero point (what the runtime pads with)."""
    top, left, bottom, right = pads
    xp = F.pad(x.to(torch.float32), (left, right, top, bottom), value=float(zero_point))
    cols = F.unfold(xp, kernel, dilation=dilation, stride=stride)        # [N, C * kh * kw, L]
    return cols.round().to(torch.int32).view(x.shape[0], x.shape[1], -1, cols.shape[-1])


def k_major(cols: torch.Tensor, w: torch.Tensor, k_order: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [K, L], w [O, K]) of one image's taps [C, T, L] and weights [O, C, kh, kw], K in `k_order`:
    "hwc" (tap-major, channels adjacent) or "chw" (channel-major, taps adjacent)."""
    if k_order == "hwc":
        return cols.transpose(0, 1).reshape(-1, cols.shape[-1]), w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)
    return cols.reshape(-1, cols.shape[-1]), w.reshape(w.shape[0], -1)


def integer_convs(proto) -> list[dict]:
    """The convolutions of an exported file that ONNX Runtime runs as uint8 x int8: a uint8 input through a
    DequantizeLinear, int8 weight levels through a DequantizeLinear. {"name", "input" (the uint8 tensor),
    "zero_point", "weight" (levels), "attrs"}."""
    from onnx import TensorProto, helper, numpy_helper
    inits = {i.name: i for i in proto.graph.initializer}
    made_by = {o: n for n in proto.graph.node for o in n.output}
    out = []
    for node in proto.graph.node:
        if node.op_type != "Conv":
            continue
        dq_x, dq_w = made_by.get(node.input[0]), made_by.get(node.input[1])
        if not (dq_x and dq_w and dq_x.op_type == dq_w.op_type == "DequantizeLinear"):
            continue
        zp, w = inits.get(dq_x.input[2]), inits.get(dq_w.input[0])
        if zp is None or w is None or zp.data_type != TensorProto.UINT8 or w.data_type != TensorProto.INT8:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        out.append({"name": node.name, "input": dq_x.input[0], "zero_point": int(numpy_helper.to_array(zp)),
                    "weight": numpy_helper.to_array(w), "attrs": attrs})
    return out


def conv_inputs(proto, x: np.ndarray, names) -> dict[str, np.ndarray]:
    """The values of the tensors `names` when ONNX Runtime runs `proto` (unoptimized) on the input batch `x`."""
    import onnx
    from onnx import TensorProto, helper
    from utils.ort_run import ort_session
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    for n in names:
        m.graph.output.append(helper.make_tensor_value_info(n, TensorProto.UINT8, None))
    sess = ort_session(m, level="none")
    values = sess.run(list(names), {sess.get_inputs()[0].name: x})
    return dict(zip(names, values))


def conv_saturation(proto, x: np.ndarray, k_order: str = "hwc") -> list[dict]:
    """Per integer convolution of `proto` on the normalized input batch `x`: products paired, pairs saturated,
    outputs (per image, channel and position) the saturation changes, and the largest |pair sum|."""
    if k_order not in K_ORDERS:
        raise ValueError(f"k_order must be one of {K_ORDERS}")
    convs = integer_convs(proto)
    values = conv_inputs(proto, x, list(dict.fromkeys(c["input"] for c in convs)))
    report = []
    for c in convs:
        a = c["attrs"]
        xu = torch.from_numpy(values[c["input"]].astype(np.int32))
        w = torch.from_numpy(c["weight"].astype(np.int32))
        groups = int(a.get("group", 1))
        cols = taps(xu, tuple(a.get("kernel_shape", w.shape[2:])), tuple(a.get("strides", (1, 1))),
                    tuple(a.get("pads", (0, 0, 0, 0))), tuple(a.get("dilations", (1, 1))), c["zero_point"])
        cin, og = xu.shape[1] // groups, w.shape[0] // groups
        r = {"name": c["name"], "weight_levels": [int(w.min()), int(w.max())], "pairs": 0, "saturated_pairs": 0,
             "outputs": cols.shape[0] * w.shape[0] * cols.shape[-1], "outputs_changed": 0, "max_abs_pair_sum": 0}
        for g in range(groups):
            for img in cols:
                xg, wg = k_major(img[g * cin:(g + 1) * cin], w[g * og:(g + 1) * og], k_order)
                exact, emulated, saturated, biggest = pair_sums(xg, wg)
                r["pairs"] += wg.shape[0] * ((wg.shape[1] + 1) // 2) * xg.shape[1]
                r["saturated_pairs"] += saturated
                r["outputs_changed"] += int((exact != emulated).sum())
                r["max_abs_pair_sum"] = max(r["max_abs_pair_sum"], biggest)
        report.append(r)
    return report
