"""Arithmetic intensity (FLOPs per byte moved) of Conv2d/Linear networks under per-layer widths.

One cost model (``CostModel``) says what a layer is charged. The reference convention, its
default: a layer moves weights*w/8 + bias*4 + (input + output activations)*a/8*batch bytes, where
w and a are the layer's weight and activation widths. Weights are read once per batch, bias stays
fp32, and every layer's input and output are counted at the layer's own ``a`` (no fusion or cache
reuse between layers), so bytes add up per layer. Model AI = total FLOPs / total bytes, not a mean
of per-layer AIs. Defaults (a = 32, batch 1) give ResNet-20 (shortcut B) an FP32 AI of 29.85; the
anchors are checked in tests/test_ai_calculator.py.

    python -m utils.ai_calculator --arch resnet20 --w-bits 8
    python -m utils.ai_calculator --config my_bits.json --a-bits 8 --json
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn

from utils.config import ACT_BITS, FLOAT_BITS, WEIGHT_BITS, load_config, parse_config
from utils.errors import UserError, error_paragraph

BIAS_BYTES = 4  # bias is kept in fp32 whatever the weight width
CHARGES = ("weights", "bias", "inputs", "outputs")


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


@dataclass(frozen=True)
class CostModel:
    """What a layer is charged, in one object that every stage records in its results.

    ``a_bits`` is the activation width of layers whose configuration names none; ``charge`` is the
    subset of CHARGES that count as traffic.
    """
    a_bits: int = FLOAT_BITS
    batch_size: int = 1
    charge: tuple = CHARGES

    def __post_init__(self):
        if self.a_bits not in ACT_BITS or self.batch_size < 1 or not set(self.charge) <= set(CHARGES):
            raise UserError(f"cost model: a_bits must be 2-8 or 32, batch_size >= 1 and charge a subset of "
                            f"{CHARGES}; got {self.a_bits}, {self.batch_size}, {self.charge}.")
        object.__setattr__(self, "charge", tuple(c for c in CHARGES if c in self.charge))

    def to_json(self) -> dict:
        return {**asdict(self), "charge": list(self.charge),
                "convention": "bytes = weights*w/8 + bias*4 + (inputs + outputs)*a/8*batch per layer; "
                              "AI = total FLOPs / total bytes"}

    @classmethod
    def from_json(cls, d: dict | None) -> "CostModel":
        d = d or {}
        return cls(int(d.get("a_bits", FLOAT_BITS)), int(d.get("batch_size", 1)), tuple(d.get("charge", CHARGES)))

    def layer_bytes(self, info: "LayerInfo", w_bits: int = FLOAT_BITS, a_bits: int | None = None) -> float:
        """Bytes one batch moves through this layer: weights once, activations once per sample."""
        a = self.a_bits if a_bits is None else a_bits
        c = self.charge
        return (("weights" in c) * info.weights * w_bits / 8 + ("bias" in c) * info.bias * BIAS_BYTES
                + (("inputs" in c) * info.in_elems + ("outputs" in c) * info.out_elems) * a / 8 * self.batch_size)

    def full(self, table, config) -> dict[str, tuple[int, int]]:
        """{name: (w, a)} for every layer, from a full config or a file-form one."""
        names = [t.name for t in table]
        config = config or {}
        if config and all(isinstance(v, tuple) for v in config.values()) and list(config) == names:
            return config
        return parse_config(config, names, self.a_bits)

    def cost(self, table, config=None) -> dict:
        """Totals and per-layer FLOPs/bytes/AI of a configuration (missing layers: float weights)."""
        full = self.full(table, config)
        layers = []
        for info in table:
            w, a = full[info.name]
            flops = info.flops * self.batch_size
            nbytes = self.layer_bytes(info, w, a)
            layers.append({"name": info.name, "kind": info.kind, "macs": info.macs, "weights": info.weights,
                           "flops": flops, "bytes": nbytes, "ai": flops / nbytes if nbytes else 0.0,
                           "w_bits": w, "a_bits": a})
        flops = sum(layer["flops"] for layer in layers)
        nbytes = float(sum(layer["bytes"] for layer in layers))
        return {"flops": flops, "bytes": nbytes, "ai": flops / nbytes if nbytes else 0.0, "layers": layers}

    def ai(self, table, config=None) -> float:
        return self.cost(table, config)["ai"]


REFERENCE = CostModel()


def layer_bytes(info: LayerInfo, w_bits: int = FLOAT_BITS, a_bits: int = FLOAT_BITS, batch_size: int = 1) -> float:
    return CostModel(a_bits, batch_size).layer_bytes(info, w_bits)


def model_cost(table: list[LayerInfo], config: dict | None = None, cost_model: CostModel = REFERENCE) -> dict:
    return cost_model.cost(table, config)


def model_ai(table: list[LayerInfo], config: dict | None = None, cost_model: CostModel = REFERENCE) -> float:
    return cost_model.ai(table, config)


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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a positive integer")
    return value


def get_args_parser() -> argparse.ArgumentParser:
    from models import arch_names
    p = argparse.ArgumentParser(description="Per-layer and model arithmetic intensity (FLOPs/byte) of a registered "
                                            "architecture under a weight/activation width configuration.")
    p.add_argument("--arch", default="resnet20", choices=arch_names(), metavar="ARCH",
                   help=f"{', '.join(arch_names())} (default: resnet20)")
    p.add_argument("--shortcut", default=None, choices=("A", "B"),
                   help="ResNets only: A = zero-pad identity, B = 1x1 conv projection (default: B)")
    bits = p.add_mutually_exclusive_group()
    bits.add_argument("--w-bits", type=int, choices=WEIGHT_BITS, default=None,
                      help="same weight width for every layer (default: 32, i.e. float)")
    bits.add_argument("--config", default=None, metavar="FILE",
                      help='JSON object {layer: {"w": 4, "a": 8}} or {layer: w}; layers not named have float '
                           'weights (default: none)')
    p.add_argument("--a-bits", type=int, choices=ACT_BITS, default=FLOAT_BITS,
                   help="activation width of every layer the configuration gives none (default: 32)")
    p.add_argument("--batch-size", type=_positive_int, default=1,
                   help="samples per weight read; activations scale with it (default: 1)")
    p.add_argument("--charge", nargs="+", choices=CHARGES, default=list(CHARGES),
                   help="what counts as traffic (default: weights bias inputs outputs)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table (default: off)")
    return p


def main(args):
    from models import build_model, describe
    try:
        model = build_model(args.arch, args.shortcut)
    except ValueError as e:
        raise UserError(f"{e}.") from None
    table = layer_table(model)
    names = [layer.name for layer in table]
    cm = CostModel(args.a_bits, args.batch_size, tuple(args.charge))
    if args.config is not None:
        config = load_config(args.config, names, cm.a_bits)
    else:
        config = {n: args.w_bits for n in names} if args.w_bits is not None else {}
    cost = cm.cost(table, config)
    if args.json:
        cost.update(model_args=model.model_args, cost_model=cm.to_json())
        print(json.dumps(cost, indent=2))
        return
    print(f"{describe(model.model_args)}, default activation width {cm.a_bits}, batch {cm.batch_size}, "
          f"charged: {' '.join(cm.charge)}")
    width = max(22, max(len(n) for n in names) + 2)
    print(f"{'layer':<{width}}{'kind':<8}{'MACs':>12}{'weights':>10}{'w':>4}{'a':>4}{'bytes':>14}{'AI':>9}")
    for row in cost["layers"]:
        print(f"{row['name']:<{width}}{row['kind']:<8}{row['macs']:>12,}{row['weights']:>10,}{row['w_bits']:>4}"
              f"{row['a_bits']:>4}{row['bytes']:>14,.0f}{row['ai']:>9.2f}")
    print(f"model: {cost['flops']:,} FLOPs, {cost['bytes']:,.0f} bytes, AI {cost['ai']:.2f} FLOPs/byte")


def cli(argv=None) -> int:
    """Entry point; returns the exit code. Bad input -> a one-paragraph message on stderr and 2.

    Not utils.cli.run: it prints args to stdout, which would break --json output.
    """
    args = get_args_parser().parse_args(argv)
    try:
        main(args)
    except UserError as e:
        print(error_paragraph(e), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
