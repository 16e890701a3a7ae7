"""Stage 3 variants on one stage-2 table, in one run: what each search finds, on data it never saw,
and what it costs.

    python benchmarks/search_speed.py --results-dir results             # after stages 1-2
    python benchmarks/search_speed.py --results-dir results --variants kl drop
    python benchmarks/search_speed.py --dp-only                         # the DP over (w, a) pairs alone

Each variant runs stages 3 and 4 in its own folder (a copy of 01 and 02) and reports the greedy's and
the Pareto search's AI, search drop, test drop, evaluations and stage-3 seconds:

* ``kl``, ``loss``, ``drop``: the sensitivity signal that ranks moves (``--rank-by``); the default
  search (fast-forward, pruning) otherwise;
* ``classic``: ``--rank-by drop --no-fast-forward --no-prune-infeasible``, the search before these
  changes (verified step by step, every remaining move measured before it stops).

``--dp-only`` times the Pareto DP for 22 layers x 5 weight x 4 activation options (random estimates).
"""
import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from utils.cli import script_module  # noqa: E402
from quant.search import pareto_frontier  # noqa: E402

VARIANTS = {"kl": ["--rank-by", "kl"], "loss": ["--rank-by", "loss"], "drop": ["--rank-by", "drop"],
            "classic": ["--rank-by", "drop", "--no-fast-forward", "--no-prune-infeasible"]}


def run_stage(script, argv):
    mod = script_module(script)
    t = time.perf_counter()
    out = mod.main(mod.get_args_parser().parse_args([str(a) for a in argv])).json
    return out, time.perf_counter() - t


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
    args = p.parse_args()
    print(args)
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
