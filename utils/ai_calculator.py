"""Arithmetic intensity (FLOPs per byte moved) of Conv2d/Linear networks under weight bit widths.

Convention (the reference work's; its anchors are checked in tests/test_ai_calculator.py):
a layer moves weights*w_bits/8 + bias*4 + (input + output activations)*a_bits/8*batch bytes.
Weights are read once per batch, bias stays fp32, and every layer's input and output are
counted (no fusion or cache reuse between layers). Model AI = total FLOPs / total bytes,
not a mean of per-layer AIs, so big layers weigh in proportion to their traffic.

Defaults (w_bits 32, a_bits 32, batch 1) give ResNet-20 (shortcut B) an FP32 AI of 29.85.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from utils.config import FLOAT_BITS, load_config, validate_config
from utils.errors import UserError

BIAS_BYTES = 4  # bias is kept in fp32 whatever the weight width


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


def layer_table(model: nn.Module, input_shape=(1, 3, 32, 32)) -> list[LayerInfo]:
    """Measure every Conv2d/Linear from one real forward pass, so the table cannot drift from the model.

    Hooks record shapes as layers run, giving execution order and true spatial sizes (strides,
    padding, pooling) without a hand-kept table. A module called more than once adds up its
    activations and MACs but counts its weights once. Modules never called are left out: they cost nothing.
    """
    records: dict[str, dict] = {}

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


def layer_bytes(info: LayerInfo, w_bits: int = FLOAT_BITS, a_bits: int = 32, batch_size: int = 1) -> float:
    """Bytes one batch moves through this layer: weights once, activations once per sample."""
    return (info.weights * w_bits / 8 + info.bias * BIAS_BYTES
            + (info.in_elems + info.out_elems) * a_bits / 8 * batch_size)


def model_cost(table: list[LayerInfo], config: dict | None = None, a_bits: int = 32,
               batch_size: int = 1) -> dict:
    """Totals and per-layer FLOPs/bytes/AI; `config` maps layer names to weight bits (missing = float)."""
    config = validate_config(config or {}, [layer.name for layer in table])
    layers = []
    for info in table:
        w_bits = config.get(info.name, FLOAT_BITS)
        flops = info.flops * batch_size
        nbytes = layer_bytes(info, w_bits, a_bits, batch_size)
        layers.append({"name": info.name, "kind": info.kind, "flops": flops, "bytes": nbytes,
                       "ai": flops / nbytes, "w_bits": w_bits})
    flops = sum(layer["flops"] for layer in layers)
    nbytes = float(sum(layer["bytes"] for layer in layers))
    return {"flops": flops, "bytes": nbytes, "ai": flops / nbytes if nbytes else 0.0, "layers": layers}


def model_ai(table: list[LayerInfo], config: dict | None = None, a_bits: int = 32, batch_size: int = 1) -> float:
    return model_cost(table, config, a_bits, batch_size)["ai"]


def weight_bytes_saved(table: list[LayerInfo], config: dict) -> float:
    """Weight traffic removed by `config` relative to all-float weights (activations are unchanged)."""
    config = validate_config(config, [layer.name for layer in table])
    return sum(layer.weights * (FLOAT_BITS - config.get(layer.name, FLOAT_BITS)) / 8 for layer in table)


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


def _arch_depth(text: str) -> int:
    m = re.fullmatch(r"resnet(\d+)", text.strip().lower())
    if not m or int(m.group(1)) not in (20, 32, 44, 56, 110):
        raise argparse.ArgumentTypeError(f"{text!r}: choose resnet20, resnet32, resnet44, resnet56 or resnet110")
    return int(m.group(1))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a positive integer")
    return value


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Per-layer and model arithmetic intensity (FLOPs/byte) of a CIFAR "
                                            "ResNet under a weight bit configuration.")
    p.add_argument("--arch", default=20, type=_arch_depth, metavar="resnetN",
                   help="resnet20, resnet32, resnet44, resnet56 or resnet110 (default: resnet20)")
    p.add_argument("--shortcut", default="B", choices=("A", "B"),
                   help="A = zero-pad identity, B = 1x1 conv projection (default: B)")
    bits = p.add_mutually_exclusive_group()
    bits.add_argument("--w-bits", type=int, choices=(2, 3, 4, 5, 6, 7, 8, 32), default=None,
                      help="same weight width for every layer (default: 32, i.e. float)")
    bits.add_argument("--config", default=None, metavar="FILE",
                      help="JSON object {layer name: weight bits}; layers not named stay float (default: none)")
    p.add_argument("--a-bits", type=_positive_int, default=32, help="activation width in bits (default: 32)")
    p.add_argument("--batch-size", type=_positive_int, default=1,
                   help="samples per weight read; activations scale with it (default: 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table (default: off)")
    return p


def main(args):
    from models.resnet import CifarResNet
    table = layer_table(CifarResNet(args.arch, args.shortcut))
    names = [layer.name for layer in table]
    if args.config is not None:
        config = load_config(args.config, names)
    elif args.w_bits is not None:
        config = {n: args.w_bits for n in names}
    else:
        config = {}
    cost = model_cost(table, config, args.a_bits, args.batch_size)
    if args.json:
        cost.update(arch=f"resnet{args.arch}", shortcut=args.shortcut, a_bits=args.a_bits,
                    batch_size=args.batch_size)
        print(json.dumps(cost, indent=2))
        return
    print(f"resnet{args.arch} shortcut {args.shortcut}, a_bits {args.a_bits}, batch {args.batch_size}")
    print(f"{'layer':<22}{'kind':<8}{'MACs':>12}{'weights':>10}{'w_bits':>8}{'bytes':>14}{'AI':>9}")
    for info, row in zip(table, cost["layers"]):
        print(f"{info.name:<22}{info.kind:<8}{info.macs:>12,}{info.weights:>10,}{row['w_bits']:>8}"
              f"{row['bytes']:>14,.0f}{row['ai']:>9.2f}")
    print(f"model: {cost['flops']:,} FLOPs, {cost['bytes']:,.0f} bytes, AI {cost['ai']:.2f} FLOPs/byte")


def cli(argv=None) -> int:
    """Entry point; returns the exit code. Bad input -> a one-paragraph message on stderr and 2.

    Not utils.cli.run: it prints args to stdout, which would break --json output.
    """
    args = get_args_parser().parse_args(argv)
    try:
        main(args)
    except UserError as e:
        print(textwrap.fill(f"error: {e}", width=100), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
