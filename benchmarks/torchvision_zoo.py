"""Every torchvision classifier through the structure derivation, the cost model and (``--trace``) the trace.

    python benchmarks/torchvision_zoo.py --out docs/results/torchvision_zoo.json --trace

For each name in ``torchvision.models.list_models(module=torchvision.models)``: build it (random weights, 1,000
classes), derive its structure from the traced graph at ``--input-size`` (models/graph.py), and price uniform
FP32, W8A8 and W4A4 under the fused cost model (generic kernels, batch 1; modelled, not measured). With
``--trace``: one seeded random image through the W8A8 model (ranges calibrated on two seeded random images), and
whether the bytes it measures equal what the cost model charges. A model the rules do not cover is recorded with
the error that names the op. The JSON is rewritten after each model, so an interrupted run keeps what it did.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.errors import UserError  # noqa: E402
from models.outside import build_outside  # noqa: E402
from quant.calibrate import calibrate  # noqa: E402
from quant.cost import CostModel, kernel_table  # noqa: E402
from quant.fold import fold_bn  # noqa: E402
from quant.place import quantize_  # noqa: E402
from quant.trace import trace  # noqa: E402
from quant.widths import W  # noqa: E402
from utils.io import provenance  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    p.add_argument("--input-size", type=int, default=224, help="image height and width (default: 224)")
    p.add_argument("--trace", action="store_true", help="also trace one W8A8 image per model (default: off)")
    p.add_argument("--models", nargs="+", default=None, help="only these names (default: all classifiers)")
    p.add_argument("--resume", action="store_true",
                   help="keep the models --out already holds (made with the same --input-size and --trace) and "
                        "run only the others (default: start afresh)")
    return p


def one(name: str, size: int, with_trace: bool) -> dict:
    t0 = time.perf_counter()
    try:
        model = build_outside(f"torchvision:{name}", input_size=size)
    except UserError as e:
        return {"name": name, "status": "not derived", "error": str(e), "seconds": time.perf_counter() - t0}
    table, cm = kernel_table(model), CostModel.named("fused")
    row = {"name": name, "status": "derived", "kernels": len(table.kernels), "weight_layers": len(table.weights),
           "tensors": len(table.elements), "flops": table.flops,
           "ai": {f"W{b}A{b}" if b < 32 else "FP32": cm.ai(table, table.space.uniform(b, b)) for b in (32, 8, 4)}}
    if with_trace:
        folded = fold_bn(model)
        g = torch.Generator().manual_seed(0)
        cfg = table.space.uniform(8, 8)
        ranges = calibrate(folded, "generic", [torch.randn(2, 3, size, size, generator=g)], [8])
        quantize_(folded, cfg, ranges, "generic")
        tr = trace(folded, "generic", {n: b for (k, n), b in cfg.items() if k == W},
                   torch.randn(1, 3, size, size, generator=g))
        row["trace"] = {"bytes": tr["total_bytes"], "charged": cm.cost(table, cfg)["bytes"],
                        "equal": tr["total_bytes"] == cm.cost(table, cfg)["bytes"],
                        "undeclared_reads": len(tr["undeclared_reads"])}
    row["seconds"] = time.perf_counter() - t0
    return row


def previous_rows(args) -> tuple[list, list]:
    """The rows of an earlier run into ``--out`` and the provenance of the runs that made them, refused if it
    measured something else."""
    if not args.out.exists():
        return [], []
    old = json.loads(args.out.read_text())
    if old.get("input_size") != args.input_size or old["provenance"]["args"].get("trace") != args.trace:
        raise SystemExit(f"error: {args.out} was made with --input-size {old.get('input_size')} and "
                         f"--trace {old['provenance']['args'].get('trace')}; --resume needs the same options. "
                         "Choose another --out or drop --resume.")
    return old["models"], old.get("resumed_from", []) + [old["provenance"]]


def main(args):
    import torchvision
    torch.set_num_threads(1)
    names = args.models or torchvision.models.list_models(module=torchvision.models)
    rows, earlier = previous_rows(args) if args.resume else ([], [])
    done = {r["name"] for r in rows}
    for name in tqdm([n for n in names if n not in done], desc="torchvision classifiers"):
        rows.append(one(name, args.input_size, args.trace))
        out = {"benchmark": "torchvision_zoo", "input_size": args.input_size, "cost_model": "fused, generic, batch 1",
               "modelled": True, "models": rows, "provenance": provenance(vars(args), "cpu"),
               **({"resumed_from": earlier} if earlier else {})}   # the runs that made the rows kept
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1, default=str))
    ok = [r for r in rows if r["status"] == "derived"]
    print(f"{len(ok)} of {len(rows)} derived; not derived: " +
          ", ".join(f"{r['name']}" for r in rows if r["status"] != "derived"))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
