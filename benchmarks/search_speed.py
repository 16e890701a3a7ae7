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

``--speed`` times stages 2 and 3 of the joint search (``--a-bits 8 6 4``) on three paths, each in its own
folder, with the same ``--ptq``, in one process (PATH_FLAGS): ``start``, the evaluation as it was before issue 28
(quant.evaluation.starting_path: torch's fake-quantize op, every accepted configuration recomputed; glibc's
default allocation; batches of 1,000); ``new``, the levers that keep the answers (freed memory kept for reuse,
utils.machine.keep_freed_memory; the arithmetic fake-quantize form; the accepted candidate's activations
promoted; batches of 250); and ``levers``, ``new`` with the levers that may change them (benchmarks/common.py's
SPEED_LEVERS: stage 2 ``--signal fisher``, stage 3 ``--rank-by fisher --early-stop --confirm-step 0.01 --method
greedy``). The one-time fits (learned rounding, cached on disk and shared by the paths) are excluded: each
stage's ``ptq_fit.seconds`` is subtracted. ``--images N`` gives stages 2-3 N search images (the held-out images'
confirm part stays 2,000, or what is left). It writes
``speedup_identical`` (start / new; ``identical_answers`` says whether the answers and stage-2 tables were the
same), ``speedup`` (start / levers) and ``x_fp32_lost``, and scores every path's shipped answer on the test
images, which no path saw.
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

from benchmarks.common import SHIPPED, SPEED_LEVERS  # noqa: E402
from utils.cli import run_stage, script_module  # noqa: E402
from quant.recipe import PTQ_METHODS  # noqa: E402
from quant.evaluation import starting_path  # noqa: E402
from quant.search import pareto_frontier  # noqa: E402
from quant.stats import bootstrap_drop_interval, paired_drop  # noqa: E402
from quant.widths import FLOAT_BITS  # noqa: E402
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


# Each path's own flags for stages 2 and 3. start: the evaluation batch before issue 28 (its other differences are
# the starting_path() context and glibc's default allocation); levers: the ones that may change the answers.
PATH_FLAGS = {"start": (["--eval-batch-size", 1000], ["--eval-batch-size", 1000]),
              "new": ([], []),
              "levers": SPEED_LEVERS}
LEVERS = {"keep answers": ["freed memory kept for reuse (glibc)", "arithmetic fake-quantize form",
                           "promoted candidate activations", "evaluation batches of 250 (was 1,000)"],
          "change answers": ["stage 2 --signal fisher: one backward pass instead of a forward pass per candidate",
                             "stage 3 --rank-by fisher", "stage 3 --early-stop: sequential test of each candidate",
                             "stage 3 --confirm-step 0.01: the confirm test at 1% AI granularity",
                             "stage 3 --method greedy: no Pareto search, so no Bonferroni split of the confirm test"]}


def stage_argv(folder: Path, args) -> tuple[list, list]:
    """(stage 2's, stage 3's) arguments of the joint search in `folder`."""
    common = ["--results-dir", folder, "--checkpoint", args.checkpoint, "--checkpoint-dir", args.work / "checkpoints",
              "--data-dir", args.data_dir]
    if args.images:
        confirm = min(CONFIRM, HELD_OUT - args.images)
        common += ["--confirm-size", confirm, "--select-size", HELD_OUT - args.images - confirm]
    return [*common, "--a-bits", 8, 6, 4, *(["--ptq", args.ptq] if args.ptq else [])], common


def prefit(args):
    """Fit (or find cached) the learned rounding of every (layer, width) stage 2 will ask for, as stage 2 does,
    so that no timed path fits anything; returns the seconds it took and the set-up (to score the answers)."""
    from utils.options import SensitivityOptions
    from utils.stages.common import load_setup, stage2_recipe, weight_ladder
    mod = script_module("2_per_layer_analysis.py")
    argv = [str(a) for a in stage_argv(args.work, args)[0]]
    opts = SensitivityOptions.from_args(mod.get_args_parser().parse_args(argv))
    t = time.perf_counter()
    s = load_setup(opts, stage2_recipe(opts, "fused"), calib_images=opts.calib_images)
    s.learn_levels([(n, b) for n in s.space.layers for b in weight_ladder(opts)])
    return time.perf_counter() - t, s


def speed_stages(path: str, folder: Path, args) -> dict:
    """Stages 2 and 3 of the joint search on one path; seconds without the one-time fits."""
    folder.mkdir(parents=True, exist_ok=True)
    argv2, argv3 = stage_argv(folder, args)
    argv2, argv3 = argv2 + PATH_FLAGS[path][0], argv3 + PATH_FLAGS[path][1]
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
            "early_stop": s3.get("early_stop"), "best": s3["best"],
            "answers": {m: {"config": s3[m]["config"], "ai": s3[m]["ai"], "x_fp32": s3[m]["ai"] / s3["fp32_ai"],
                            "confirm_passed": s3[m]["confirm_passed"]} for m in ("greedy", "pareto") if s3[m]}}


def score_on_test(s, paths: dict, max_drop: float):
    """Each path's shipped answer (stage 3's best) on the test images, which no path saw: accuracy, paired drop
    with its bootstrap interval, and whether the drop is within the budget."""
    s.calibrate([8, 6, 4])
    ev = s.evaluator(s.report_x, s.report_y, 250, cache_activations=False)
    for p in paths.values():
        a = p["answers"][p["best"]]
        out = ev.evaluate(s.space.parse(a["config"], FLOAT_BITS, source="stage 3's answer"))
        pd = paired_drop(ev.float_outcome.correct, out.correct)
        a.update(test_images=out.n, test_acc=out.accuracy, test_drop=pd.drop, test_drop_se=pd.se,
                 test_drop_ci95=bootstrap_drop_interval(pd), within_budget_on_test=pd.drop <= max_drop)


def speed(args):
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    load_dataset("cifar10", args.data_dir)   # decoded and cached once, before either path is timed
    keep_freed_memory()
    fit_seconds, setup = prefit(args)        # the one-time fits, shared by the paths through the disk cache
    print(f"learned rounding fitted or found cached in {fit_seconds:.0f} s (not timed below)")
    paths = {}
    for path in PATH_FLAGS:
        print(f"\n=== {path} path ===")
        paths[path] = speed_stages(path, args.work / path, args)
    score_on_test(setup, paths, 1.0)
    same = all(paths["new"][k] == paths["start"][k] for k in ("answers", "sensitivity"))
    start = paths["start"]
    out = {"images": {"search": paths["new"]["search_images"], "confirm": paths["new"]["confirm_images"],
                      "test": len(setup.report_y)},
           "a_bits": [8, 6, 4], "ptq": paths["new"]["ptq"], "prefit_seconds": fit_seconds,
           "paths": {k: {x: y for x, y in v.items() if x != "sensitivity"} for k, v in paths.items()},
           "identical_answers": bool(same), "speedup_identical": start["seconds"] / paths["new"]["seconds"],
           "speedup": start["seconds"] / paths["levers"]["seconds"],
           "stage_speedups": {p: {f"stage{k}": start[f"stage{k}_seconds"] / paths[p][f"stage{k}_seconds"]
                                  for k in (2, 3)} for p in ("new", "levers")},
           "x_fp32_lost": start["answers"][start["best"]]["x_fp32"]
           - paths["levers"]["answers"][paths["levers"]["best"]]["x_fp32"],
           "levers": LEVERS, "machine": cpu_info(), "torch_threads": torch.get_num_threads(),
           "provenance": provenance(vars(args), "cpu", seconds=time.perf_counter() - t0)}
    print(f"\nstages 2+3 of the joint search on {out['images']['search']} search images, fits excluded; the shipped "
          f"answer on {out['images']['test']} test images:")
    for k, v in paths.items():
        a = v["answers"][v["best"]]
        print(f"  {k:<7} stage 2 {v['stage2_seconds']:7.1f} s ({v['stage2_evaluations']} evaluations)   stage 3 "
              f"{v['stage3_seconds']:7.1f} s ({v['stage3_evaluations']})   {v['best']} {a['x_fp32']:.2f}x, test drop "
              f"{a['test_drop']:.2f} [{a['test_drop_ci95'][0]:.2f}, {a['test_drop_ci95'][1]:.2f}]")
    print(f"  answer-keeping levers {out['speedup_identical']:.2f}x (identical answers: {same}); all levers "
          f"{out['speedup']:.2f}x, {out['x_fp32_lost']:.2f}x of FP32 AI lost")
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
    g.add_argument("--checkpoint", default=SHIPPED, type=Path,
                   help="(default: the shipped model)")
    g.add_argument("--data-dir", default="data", help="(default: data)")
    g.add_argument("--images", default=None, type=int,
                   help=f"search images of stages 2-3, at most {HELD_OUT - 1} (default: the stages' 2,000)")
    g.add_argument("--ptq", default=None, choices=PTQ_METHODS, help="(default: the stages')")
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
