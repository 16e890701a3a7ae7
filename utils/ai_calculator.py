"""Modelled arithmetic intensity (FLOPs per byte moved) of a registered architecture under a width
configuration, and, with --trace, where the bytes go on the real tensors of the simulated model.

    python -m utils.ai_calculator --arch resnet20 --w-bits 8 --a-bits 8
    python -m utils.ai_calculator --config my_widths.json --json
    python -m utils.ai_calculator --cost-model reference --w-bits 4           # the reference work's convention
    python -m utils.ai_calculator --trace --checkpoint pretrained/resnet20_cifar10jpeg_30ep.pt --config F --json
    python -m utils.ai_calculator --model torchvision:mobilenet_v3_small --w-bits 4 --a-bits 4 --trace
    python -m utils.ai_calculator --model path/to/net.py:build --model-kwargs '{"width": 2}' --input-size 64

The cost models live in quant/cost.py; the trace in quant/trace.py. AI here is modelled, not measured.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from models.structure import DEFAULT_TARGET, TARGETS, input_shape
from quant.recipe import Recipe
from quant.calibrate import calibrate
from quant.cost import COST_MODELS, DEFAULT_COST_MODEL, CostModel, KernelTable, kernel_table
from quant.fold import fold_bn
from quant.place import quantize_
from quant.trace import trace
from quant.widths import ACT_BITS, FLOAT_BITS, WEIGHT_BITS, A, W
from utils.cli import add_outside_args, outside_model, positive_int
from utils.config import load_config
from utils.errors import UserError, error_paragraph
from utils.options import CalculatorOptions

TRACE_SEED = 0
TRACE_CALIB_IMAGES = 64
DEFAULT_RANGES = "results/02_per_layer.json"


def get_args_parser() -> argparse.ArgumentParser:
    from models import arch_names
    p = argparse.ArgumentParser(description="Modelled arithmetic intensity (FLOPs/byte) of a registered architecture "
                                            "under a configuration of weight and tensor widths; --trace shows where "
                                            "the bytes go on the simulated model's real tensors.")
    p.add_argument("--arch", default=None, choices=arch_names(), metavar="ARCH",
                   help=f"{', '.join(arch_names())} (default: the checkpoint's, else resnet20)")
    p.add_argument("--shortcut", default=None, choices=("A", "B"),
                   help="ResNets only: A = zero-pad identity, B = 1x1 conv projection (default: B)")
    add_outside_args(p, "random weights, traced at --input-size")
    p.add_argument("--checkpoint", default=None,
                   help="a float checkpoint: its architecture, and with --trace its weights (default: none; random "
                        "weights)")
    p.add_argument("--w-bits", type=int, choices=WEIGHT_BITS, default=None,
                   help="weight width of every layer the configuration names none (default: 32, float)")
    p.add_argument("--a-bits", type=int, choices=ACT_BITS, default=FLOAT_BITS,
                   help="width of every tensor the configuration names none, the image and the logits included "
                        "(default: 32, float)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help='a tensor-widths/1 file, {"format": "tensor-widths/1", "layer1.0.conv1": {"w": 4, "a": 8}, '
                        '"input": {"a": 8}, ...}, or a 03_search.json for its best configuration (default: none)')
    p.add_argument("--cost-model", default=DEFAULT_COST_MODEL, choices=COST_MODELS,
                   help="fused: every tensor each kernel reads and writes, at its width; reference: the reference "
                        "work's per-layer weight-only convention (default: fused)")
    p.add_argument("--target", default=DEFAULT_TARGET, choices=TARGETS,
                   help="the runtime's kernels: generic (TensorRT-style fusion) or ort-cpu (ONNX Runtime's CPU "
                        "kernels) (default: generic)")
    p.add_argument("--batch-size", type=positive_int, default=1,
                   help="images per weight read; tensors scale with it (default: 1)")
    p.add_argument("--trace", action="store_true",
                   help="run one image through the simulated model and list, per kernel, the tensors it really "
                        "reads and writes, their widths and distinct values (default: off)")
    p.add_argument("--ranges", default=None, metavar="FILE|random",
                   help="with --trace: a results JSON (stage 2-4) whose activation_calibration holds the tensor ranges, "
                        "or 'random': ranges calibrated on seeded random images, which changes no count (default: "
                        f"{DEFAULT_RANGES} when it exists, else random)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table (default: off)")
    return p


def _model(opts):
    from models import build_model
    from models.outside import build_outside
    from utils.checkpoint import load_model
    outside = outside_model(opts)
    if opts.checkpoint:   # with --model: a plain state_dict of that network, or a checkpoint that records it
        model, meta = load_model(opts.checkpoint, opts.arch, opts.shortcut, require_finished=False, outside=outside)
        return model, meta["model_args"]
    if outside is not None:   # the builder's seeded random weights
        model = build_outside(outside["arch"], outside.get("model_kwargs"), opts.num_classes, opts.input_size)
        return model.eval(), model.model_args
    try:
        model = build_model(opts.arch or "resnet20", opts.shortcut)
    except ValueError as e:
        raise UserError(f"{e}.") from None
    return model.eval(), model.model_args


def _images(n: int, shape, g) -> torch.Tensor:
    return torch.randn(n, *shape[1:], generator=g)


def _ranges(opts, folded, target, widths) -> tuple[dict, str]:
    """Tensor ranges for the trace: from a results JSON, or calibrated on seeded random images."""
    path = None if opts.ranges == "random" else Path(opts.ranges or DEFAULT_RANGES)
    if path is not None and opts.ranges and not path.is_file():
        raise UserError(f"--ranges {path} does not exist. Name a stage 2-4 results JSON, or pass --ranges random.")
    if path is not None and path.is_file():
        try:
            rec = (json.loads(path.read_text()).get("activation_calibration") or {}).get("tensors") or {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            raise UserError(f"--ranges {path} could not be read as a results JSON ({e}).") from None
        if rec and all(str(b) in rec.get(t, {}).get("scales", {}) for t, b in widths):
            return rec, f"ranges from {path}"
        if opts.ranges:
            missing = next(((t, b) for t, b in sorted(widths) if str(b) not in rec.get(t, {}).get("scales", {})), None)
            raise UserError(f"--ranges {path} holds no calibrated range for tensor {missing[0]!r} at {missing[1]} bits; "
                            f"calibrate it with stage 2's --a-bits, or pass --ranges random.")
    g = torch.Generator().manual_seed(TRACE_SEED)
    batches = [_images(TRACE_CALIB_IMAGES, input_shape(folded), g)]
    return calibrate(folded, target, batches, {b for _, b in widths}), "ranges calibrated on seeded random images"


def calculate(opts: CalculatorOptions):
    """Print the cost (or, with `trace`, the trace) of one configuration."""
    model, model_args = _model(opts)
    from models import describe
    table: KernelTable = kernel_table(model, opts.target)
    folded = fold_bn(model)
    space = table.space
    cm = CostModel.named(opts.cost_model, opts.batch_size)
    if opts.config is not None:
        config = load_config(opts.config, space, opts.a_bits)
        if opts.w_bits is not None:
            config = {g: (opts.w_bits if g[0] == W and b == FLOAT_BITS else b) for g, b in config.items()}
    else:
        config = space.uniform(opts.w_bits or FLOAT_BITS, opts.a_bits)
    cm.check(config)
    cost = cm.cost(table, config)
    if opts.trace:
        widths = {(n, b) for (k, n), b in config.items() if k == A and b != FLOAT_BITS}
        ranges, source = _ranges(opts, folded, opts.target, widths)
        quantize_(folded, config, ranges, opts.target, **Recipe.for_target(opts.target).weight_kwargs())
        x = _images(1, input_shape(folded), torch.Generator().manual_seed(TRACE_SEED))
        tr = trace(folded, opts.target, {n: b for (k, n), b in config.items() if k == W}, x)
        tr.update(cost_model=cm.name, model_args=model_args, ranges=source,
                  charged_bytes=cost["bytes"] / cm.batch_size if cm.prices_tensors else None)
        if opts.json:
            print(json.dumps(tr, indent=2))
            return
        print(f"trace of one image through {describe(model_args)} ({opts.target} kernels; {source})")
        for k in tr["kernels"]:
            rd = ", ".join(f"{r['tensor']}[{r['elements']}x{r['bits']}b, {r['distinct']} values]" for r in k["reads"])
            wr = k["writes"][0]
            print(f"  {k['name']:<22} reads {rd}; writes {wr['elements']}x{wr['bits']}b ({wr['distinct']} values); "
                  f"weights {k['weight_bytes']:,.0f} B, bias {k['bias_bytes']:,.0f} B")
        print(f"total: {tr['total_flops']:,} FLOPs, {tr['total_bytes']:,.1f} bytes, AI {tr['ai']:.2f} (the fused cost "
              f"model charges {cost['bytes']:,.1f} bytes at batch {cm.batch_size})")
        return
    if opts.json:
        cost.update(model_args=model_args, cost_model=cm.to_json(opts.target), config=space.to_file(config))
        print(json.dumps(cost, indent=2))
        return
    print(f"{describe(model_args)}, {cm.name} cost model ({opts.target} kernels), batch {cm.batch_size}; AI is "
          f"modelled, not measured")
    names = [r["name"] for r in cost["rows"]]
    width = max(22, max(len(n) for n in names) + 2)
    print(f"{cm.row_unit:<{width}}{'FLOPs':>12}{'w':>4}{'bytes':>14}{'AI':>9}")
    for r in cost["rows"]:
        w = r["w_bits"] if isinstance(r["w_bits"], int) else ("/".join(map(str, r["w_bits"])) or "-")
        print(f"{r['name']:<{width}}{r['flops']:>12,}{w:>4}{r['bytes']:>14,.0f}{r['ai']:>9.2f}")
    print(f"model: {cost['flops']:,} FLOPs, {cost['bytes']:,.0f} bytes, AI {cost['ai']:.2f} FLOPs/byte")


def cli(argv=None) -> int:
    """Entry point; returns the exit code. Bad input -> a one-paragraph message on stderr and 2.

    Not utils.cli.run: it prints opts to stdout, which would break --json output.
    """
    args = get_args_parser().parse_args(argv)
    try:
        calculate(CalculatorOptions.from_args(args))
    except UserError as e:
        print(error_paragraph(e), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
