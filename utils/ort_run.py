"""Running an exported file on ONNX Runtime's CPU build and checking it against the PyTorch model.

With data at hand, the export runs the file on ONNX Runtime's CPU build and compares it with the
fake-quant PyTorch model (the same configuration, same target) on the report (test) images:
top-1 agreement and the accuracy difference (``check_agreement``), and counts which convolutions and
adds ONNX Runtime runs in integer (``fusion_report``).
"""
from __future__ import annotations

import collections
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from quant.stats import top1_agreement, top1_credit
from quant.widths import FLOAT_BITS, A, W


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
