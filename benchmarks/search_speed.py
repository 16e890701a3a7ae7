"""Stage 3 variants on one stage-2 table, in one run: what each search finds, on data it never saw,
and what it costs; and, with --speed, how much faster stages 2 and 3 run than they did.

    python benchmarks/search_speed.py --results-dir results             # after stages 1-2
    python benchmarks/search_speed.py --results-dir results --variants kl drop
    python benchmarks/search_speed.py --dp-only                         # the DP over (w, a) pairs alone
    python benchmarks/search_speed.py --speed --checkpoint pretrained/resnet20_cifar10jpeg_30ep.pt \
        --data-dir ../shared/data/cifar10-jpeg.tar.gz --images 2000 --out search_speed.json

Each variant runs stages 3 and 4 in its own folder (a copy of 01 and 02) and reports the greedy's and
the Pareto search's AI, search drop, test drop, evaluations and stage-3 seconds:

* ``kl``, ``loss``, ``drop``: the sensitivity signal that ranks moves (``--rank-by``); the default
  search (fast-forward, pruning) otherwise;
* ``classic``: ``--rank-by drop --no-fast-forward --no-prune-infeasible``, the search before these
  changes (verified step by step, every remaining move measured before it stops).

``--dp-only`` times the Pareto DP for 22 layers x 5 weight x 4 activation options (random estimates).

``--speed`` times stages 2 and 3 of the joint search (``--a-bits 8 6 4``) on two paths, each in its own
folder, with the same ``--ptq``, in one process: ``start``, the evaluation as it was before issue 28
(quant.evaluation.starting_path: torch's fake-quantize op, every accepted configuration recomputed; glibc's
default allocation), and ``new`` (freed memory kept for reuse, utils.machine.keep_freed_memory; the arithmetic
fake-quantize form; the accepted candidate's activations promoted). The
one-time fits (learned rounding, cached on disk and shared by both paths) are excluded: each stage's
``ptq_fit.seconds`` is subtracted. ``--images N`` gives stages 2-3 N search images (the held-out images'
confirm part stays 2,000, or what is left). It writes ``speedup_identical`` (these levers keep the answers;
``identical_answers`` says whether they did) and ``speedup`` (all levers: the same two, as no lever that
changes answers is built yet).
"""
import argparse
import json
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from utils.cli import run_stage, script_module  # noqa: E402
from quant.evaluation import starting_path  # noqa: E402
from quant.search import pareto_frontier  # noqa: E402
from utils.data import load_dataset  # noqa: E402
from utils.io import provenance  # noqa: E402
from utils.machine import allocator, cpu_info, keep_freed_memory  # noqa: E402

VARIANTS = {"kl": ["--rank-by", "kl"], "loss": ["--rank-by", "loss"], "drop": ["--rank-by", "drop"],
            "classic": ["--rank-by", "drop", "--no-fast-forward", "--no-prune-infeasible"]}


def time_dp(layers=22, w=(32, 8, 6, 4, 3), a=(32, 8, 6, 4), seed=0):
    rng = np.random.default_rng(seed)
    options = {}
    for i in range(layers):
        p, act = int(rng.integers(500, 40000)), int(rng.integers(1000, 20000))
        options[f"l{i}"] = [((wb, ab), p * wb / 8 + act * ab / 8,
                             0.0 if (wb, ab) == (32, 32) else float(rng.gamma(1.0, 0.01) * (40 / wb + 30 / ab)))
                            for wb in w for ab in a]
    t = time.perf_counter()
    front = pareto_frontier(options)
    return time.perf_counter() - t, len(front)


HELD_OUT = 5000       # the validation split of a stage-1 checkpoint, or a test half of a foreign one
CONFIRM = 2000        # the stages' default confirm part of it


def stage_argv(folder: Path, args) -> tuple[list, list]:
    """(stage 2's, stage 3's) arguments of the joint search in `folder`."""
    common = ["--results-dir", folder, "--checkpoint", args.checkpoint, "--checkpoint-dir", args.work / "checkpoints",
              "--data-dir", args.data_dir]
    if args.images:
        confirm = min(CONFIRM, HELD_OUT - args.images)
        common += ["--confirm-size", confirm, "--select-size", HELD_OUT - args.images - confirm]
    return [*common, "--a-bits", 8, 6, 4, *(["--ptq", args.ptq] if args.ptq else [])], common


def prefit(args) -> float:
    """Fit (or find cached) the learned rounding of every (layer, width) stage 2 will ask for, as stage 2 does,
    so that neither timed path fits anything; returns the seconds it took."""
    from utils.options import SensitivityOptions
    from utils.stages.common import load_setup, stage2_recipe, weight_ladder
    mod = script_module("2_per_layer_analysis.py")
    argv = [str(a) for a in stage_argv(args.work, args)[0]]
    opts = SensitivityOptions.from_args(mod.get_args_parser().parse_args(argv))
    t = time.perf_counter()
    s = load_setup(opts, stage2_recipe(opts, "fused"), calib_images=opts.calib_images)
    s.learn_levels([(n, b) for n in s.space.layers for b in weight_ladder(opts)])
    return time.perf_counter() - t


def speed_stages(path: str, folder: Path, args) -> dict:
    """Stages 2 and 3 of the joint search on one path; seconds without the one-time fits."""
    folder.mkdir(parents=True, exist_ok=True)
    argv2, argv3 = stage_argv(folder, args)
    keep_freed_memory(path != "start")
    with (starting_path() if path == "start" else nullcontext()):
        s2, t2 = run_stage("2_per_layer_analysis.py", argv2)
        s3, t3 = run_stage("3_greedy_search.py", argv3)
    fits = [(s.get("ptq_fit") or {}).get("seconds", 0.0) for s in (s2, s3)]
    return {"stage2_seconds": t2 - fits[0], "stage3_seconds": t3 - fits[1], "fit_seconds_excluded": sum(fits),
            "seconds": t2 + t3 - sum(fits), "stage2_evaluations": s2["evaluations"],
            "stage3_evaluations": s3["evaluations"], "search_images": s2["eval_images"],
            "confirm_images": s3["confirm_images"], "ptq": s2["quantization"].get("ptq"), "allocator": allocator(),
            "sensitivity": [(r["name"], r["results"]) for r in s2["layers"] + s2["tensors"]],
            "answers": {m: {"config": s3[m]["config"], "ai": s3[m]["ai"], "x_fp32": s3[m]["ai"] / s3["fp32_ai"],
                            "confirm_passed": s3[m]["confirm_passed"]} for m in ("greedy", "pareto")}}


def speed(args):
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    load_dataset("cifar10", args.data_dir)   # decoded and cached once, before either path is timed
    keep_freed_memory()
    fit_seconds = prefit(args)               # the one-time fits, shared by both paths through the disk cache
    print(f"learned rounding fitted or found cached in {fit_seconds:.0f} s (not timed below)")
    paths = {}
    for path in ("start", "new"):
        print(f"\n=== {path} path ===")
        paths[path] = speed_stages(path, args.work / path, args)
    same = all(paths["new"][k] == paths["start"][k] for k in ("answers", "sensitivity"))
    ratio = paths["start"]["seconds"] / paths["new"]["seconds"]
    levers = {"keep answers": ["freed memory kept for reuse (glibc)", "arithmetic fake-quantize form",
                               "promoted candidate activations"], "change answers": []}
    out = {"images": {"search": paths["new"]["search_images"], "confirm": paths["new"]["confirm_images"]},
           "a_bits": [8, 6, 4], "ptq": paths["new"]["ptq"], "prefit_seconds": fit_seconds,
           "paths": {k: {x: y for x, y in v.items() if x != "sensitivity"} for k, v in paths.items()},
           "identical_answers": bool(same), "speedup_identical": ratio,
           "stage2_speedup": paths["start"]["stage2_seconds"] / paths["new"]["stage2_seconds"],
           "stage3_speedup": paths["start"]["stage3_seconds"] / paths["new"]["stage3_seconds"],
           "speedup": ratio, "levers": levers, "machine": cpu_info(), "torch_threads": torch.get_num_threads(),
           "provenance": provenance(vars(args), "cpu", seconds=time.perf_counter() - t0)}
    print(f"\nstages 2+3 of the joint search on {out['images']['search']} search images, fits excluded:")
    for k, v in paths.items():
        print(f"  {k:<6} stage 2 {v['stage2_seconds']:7.1f} s ({v['stage2_evaluations']} evaluations)   stage 3 "
              f"{v['stage3_seconds']:7.1f} s ({v['stage3_evaluations']})   "
              f"greedy {v['answers']['greedy']['x_fp32']:.2f}x")
    print(f"  speedup {ratio:.2f}x (stage 2 {out['stage2_speedup']:.2f}x, stage 3 {out['stage3_speedup']:.2f}x); "
          f"identical answers: {same}")
    if args.out:
        args.out.write_text(json.dumps(out, indent=2, default=str))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results-dir", default="results", type=Path, help="holds 01 and 02 (default: results)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   help=f"(default: {' '.join(VARIANTS)})")
    p.add_argument("--max-drop", default=1.0, type=float, help="(default: 1.0)")
    p.add_argument("--weights-only", action="store_true",
                   help="search weight widths only, even if stage 2 measured activations (default: off)")
    p.add_argument("--out", default=None, type=Path, help="also write the table as JSON (default: none)")
    p.add_argument("--dp-only", action="store_true", help="only time the DP over (w, a) pairs (default: off)")
    g = p.add_argument_group("--speed: stages 2 and 3, the new path against the starting path")
    g.add_argument("--speed", action="store_true", help="time the two paths instead of the variants (default: off)")
    g.add_argument("--checkpoint", default=REPO / "pretrained" / "resnet20_cifar10jpeg_30ep.pt", type=Path,
                   help="(default: the shipped model)")
    g.add_argument("--data-dir", default="data", help="(default: data)")
    g.add_argument("--images", default=None, type=int,
                   help=f"search images of stages 2-3, at most {HELD_OUT - 1} (default: the stages' 2,000)")
    g.add_argument("--ptq", default=None, choices=("nearest", "adaround"), help="(default: the stages')")
    g.add_argument("--work", default=Path("results") / "search_speed", type=Path,
                   help="folder of the two paths' results and the shared PTQ cache (default: results/search_speed)")
    args = p.parse_args()
    print(args)
    if args.speed:
        if args.images is not None and not 0 < args.images < HELD_OUT:
            p.error(f"--images must be 1..{HELD_OUT - 1}")
        speed(args)
        return
    seconds, size = time_dp()
    print(f"Pareto DP, 22 layers x 5 weight x 4 activation options: {seconds:.2f} s, {size} frontier points")
    if args.dp_only:
        return
    rows = {}
    for name in args.variants:
        folder = args.results_dir.parent / f"{args.results_dir.name}_search_{name}"
        folder.mkdir(parents=True, exist_ok=True)
        for f in ("01_baseline.json", "02_per_layer.json"):
            shutil.copy(args.results_dir / f, folder / f)
        common = ["--results-dir", folder, "--max-drop", args.max_drop, *(["--a-bits", 32] if args.weights_only else [])]
        s3, t3 = run_stage("3_greedy_search.py", [*common, *VARIANTS[name]])
        s4, _ = run_stage("4_create_baselines.py", ["--results-dir", folder])
        by = {c["name"]: c for c in s4["configs"]}
        rows[name] = {m: {"ai": s3[m]["ai"], "x_fp32": s3[m]["ai"] / s3["fp32_ai"], "search_drop": s3[m]["drop"],
                          "test_drop": by[m]["test_drop"], "test_drop_ci95": by[m]["test_drop_ci95"],
                          "evaluations": s3[m]["evaluations"]} for m in ("greedy", "pareto")}
        rows[name]["stage3_seconds"] = t3
        rows[name]["evaluations"] = s3["evaluations"]
    print(f"\nbudget {args.max_drop} point(s); search drop on {s3['eval_images']} {s3['eval_split']} images, test drop "
          f"on {s4['dataset']['report']['images']} {s4['report_split']} images")
    print(f"{'variant':<9}{'method':<8}{'AI':>8}{'x fp32':>8}{'search drop':>13}{'test drop':>11}{'evals':>7}"
          f"{'stage-3 s':>11}")
    for name, r in rows.items():
        for m in ("greedy", "pareto"):
            x = r[m]
            print(f"{name:<9}{m:<8}{x['ai']:>8.2f}{x['x_fp32']:>8.2f}{x['search_drop']:>13.2f}{x['test_drop']:>11.2f}"
                  f"{x['evaluations']:>7}{r['stage3_seconds'] if m == 'greedy' else 0:>11.0f}")
    if args.out:
        args.out.write_text(json.dumps({"dp_seconds": seconds, "variants": rows}, indent=2))


if __name__ == "__main__":
    main()
