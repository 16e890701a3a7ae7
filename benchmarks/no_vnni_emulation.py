"""Where ONNX Runtime's x86 int8 convolutions saturate on a CPU without VNNI, emulated on any CPU.

    python benchmarks/no_vnni_emulation.py --checkpoint pretrained/resnet20_cifar10jpeg_30ep.pt \\
        --data-dir ../shared/data/cifar10-jpeg.tar.gz --images 100 --out docs/results/no_vnni_emulation.json

Exports uniform W8A8 under ``--target ort-cpu`` with 8-bit weights in range 8 (-127..127) and in range 7
(-63..63, the default), with tensor ranges calibrated as stage 2 does, runs each file on ONNX Runtime for
the uint8 tensors its integer convolutions read (seeded report images), and recomputes every convolution
exactly and as AVX2's ``vpmaddubsw`` computes it (utils/ort_x86.py), in both orders of the reduction axis.
It writes, per range and order, the pairs that saturate, the conv outputs that change, and the per-conv
figures. This machine's own instruction set does not matter: the emulation is arithmetic.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quant.quantizer import WEIGHT_RANGES  # noqa: E402
from quant.recipe import Recipe  # noqa: E402
from utils.cli import run  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.export import seeded_subset  # noqa: E402
from utils.onnx_export import placed_model, to_onnx  # noqa: E402
from utils.ort_run import normalized_numpy  # noqa: E402
from utils.io import atomic_write_json, provenance  # noqa: E402
from utils.machine import runtime_machine  # noqa: E402
from utils.ort_x86 import K_ORDERS, conv_saturation  # noqa: E402
from utils.options import ModelOptions  # noqa: E402
from utils.stages.common import benchmark_parser, load_setup  # noqa: E402

TARGET = "ort-cpu"


def get_args_parser():
    p, g = benchmark_parser(__doc__)
    g.add_argument("--images", default=100, type=int, help="report (test) images, a seeded subset (default: 100)")
    g.add_argument("--calib-images", default=None, type=int, help="training images for the tensor ranges (default: 1000)")
    return p


def emulate(args) -> dict:
    t0 = time.time()
    if args.images < 1:
        raise UserError(f"--images must be >= 1, got {args.images}.")
    s = load_setup(ModelOptions.from_args(args, strict=False), calib_images=args.calib_images, target=TARGET)
    ranges = s.calibrate([8])
    idx = seeded_subset(len(s.report_y), args.images, s.seed)
    x = normalized_numpy(s.report_x[idx].cpu(), s.normalize)
    cfg = s.space.uniform(8, 8)
    out = {"benchmark": "no_vnni_emulation", "checkpoint": str(s.checkpoint), "target": TARGET,
           "images": len(idx), "set": s.split.report.name, "calibration_images": len(s.calib_x),
           "machine": runtime_machine(), "ranges": {}}
    for r in sorted(WEIGHT_RANGES, reverse=True):
        proto = to_onnx(placed_model(s.model.cpu(), cfg, ranges, TARGET, Recipe.for_target(TARGET, weight_range=r)))
        out["ranges"][str(r)] = {}
        for order in K_ORDERS:
            convs = conv_saturation(proto, x, order)
            total = {k: sum(c[k] for c in convs) for k in ("pairs", "saturated_pairs", "outputs", "outputs_changed")}
            out["ranges"][str(r)][order] = {
                **total, "convs": len(convs), "convs_saturated": sum(c["saturated_pairs"] > 0 for c in convs),
                "outputs_changed_pct": 100.0 * total["outputs_changed"] / total["outputs"],
                "max_abs_pair_sum": max(c["max_abs_pair_sum"] for c in convs), "per_conv": convs}
            e = out["ranges"][str(r)][order]
            print(f"weight range {r}, K order {order}: {e['convs_saturated']} of {e['convs']} convs saturate, "
                  f"{e['saturated_pairs']:,} of {e['pairs']:,} pairs; {e['outputs_changed_pct']:.3f}% of conv "
                  f"outputs change; largest |pair sum| {e['max_abs_pair_sum']:,} (int16 holds 32,767)")
    out["provenance"] = provenance(vars(args), "cpu", {"checkpoint": s.checkpoint}, time.time() - t0)
    atomic_write_json(args.out, out)
    print(f"wrote {args.out}")
    return out


def main(argv=None):
    run(emulate, get_args_parser(), argv)


if __name__ == "__main__":
    main()
