"""Stage 3 as an importable function: greedy and exact (Pareto) bit-width search."""
from __future__ import annotations

import time
from pathlib import Path

from tqdm import tqdm

from utils.ai_calculator import layer_bytes, model_cost
from utils.config import FLOAT_BITS, full_config
from utils.errors import UserError
from utils.evaluation import CachedEvaluator
from utils.io import check_same_checkpoint, load_results_json
from utils.search import EvalCache, greedy_search, pareto_frontier, verify_frontier
from utils.sensitivity import RESULTS_NAME as STAGE2_NAME
from utils.stage import load_setup, resolve_bits, results_header, write_results

RESULTS_NAME = "03_search.json"


def load_stage2(args):
    """The stage-2 table, checked against the checkpoint and the requested widths."""
    path = Path(args.results_dir) / STAGE2_NAME
    res = load_results_json(path, "2", "2_per_layer_analysis.py", force=args.force)
    missing = [b for b in args.bits if b not in res["bits"]]
    if missing:
        raise UserError(f"{path} has no measurements for widths {missing} (it has {res['bits']}). Re-run "
                        f"2_per_layer_analysis.py --bits {' '.join(map(str, args.bits))}, or search over "
                        f"--bits {' '.join(map(str, res['bits']))}.")
    return path, res


def bit_search(args) -> dict:
    t0 = time.time()
    if args.max_drop < 0:
        raise UserError(f"--max-drop must be >= 0 points, got {args.max_drop}.")
    if args.verify_top_k < 1 or args.pareto_verify < 1:
        raise UserError("--verify-top-k and --pareto-verify must be >= 1.")
    resolve_bits(args)
    ladder = sorted({b for b in args.bits if b != FLOAT_BITS}, reverse=True)
    s2_path, s2 = load_stage2(args)
    quant = s2.get("quantization", {"granularity": "channel", "clip": "mse"})
    s = load_setup(args, per_channel=quant["granularity"] == "channel", clip=quant["clip"])
    check_same_checkpoint(s2, s2_path, s.checkpoint, "2_per_layer_analysis.py", args.force)
    names = [info.name for info in s.table]
    if [l["name"] for l in s2["layers"]] != names:
        raise UserError(f"{s2_path} describes other layers than {s.checkpoint} has. Re-run 2_per_layer_analysis.py.")

    evaluator = CachedEvaluator(s.model, s.quantizer, s.eval_x, s.eval_y, s.normalize, args.eval_batch_size)
    base_acc = evaluator.base_accuracy
    same_data = {k: (s2["dataset"].get(k), s.data_info.get(k)) for k in ("name", "seed", "val_size", "quick", "eval_split")}
    same_data["eval_images"] = (s2.get("eval_images"), evaluator.n)
    differ = {k: v for k, v in same_data.items() if v[0] != v[1]}
    if differ and not args.force:
        raise UserError(f"{s2_path} was measured on other data than this run would search on ({differ}, as "
                        f"(recorded, now)). Re-run 2_per_layer_analysis.py with the same --quick / --val-size / "
                        f"--dataset flags, or pass --force.")
    if abs(base_acc - s2["baseline_val_acc"]) > 1e-9:
        print(f"note: the float model scores {base_acc:.2f}% here, {s2['baseline_val_acc']:.2f}% in {s2_path} "
              f"(non-deterministic kernels?); the search uses {base_acc:.2f}%")
    drops = {l["name"]: {r["bits"]: r["drop"] for r in l["results"]} for l in s2["layers"]}
    info_of = {info.name: info for info in s.table}
    flops = model_cost(s.table)["flops"]

    def bytes_of(name, bits):
        return layer_bytes(info_of[name], bits)

    def est_drop(name, bits):
        return 0.0 if bits == FLOAT_BITS else drops[name][bits]

    def ai_of(config):
        return flops / sum(bytes_of(n, config.get(n, FLOAT_BITS)) for n in names)

    cache = EvalCache(evaluator.accuracy)
    cache.remember(full_config({}, names), base_acc)
    result = {**results_header("3", s), "eval_images": evaluator.n, "max_drop": args.max_drop, "baseline_val_acc": base_acc,
              "fp32_ai": ai_of({}), "bits": ladder, "quantization": quant,
              "layers": [{"name": i.name, "params": i.weights, "macs": i.macs} for i in s.table],
              "greedy": None, "pareto": None}

    if args.method in ("greedy", "both"):
        bar = tqdm(desc="greedy steps", unit="step", dynamic_ncols=True)

        def progress(step, entry):
            bar.update()
            bar.set_postfix(layer=entry["layer"], bits=entry["bits"], ai=f"{entry['ai']:.2f}",
                            acc=f"{entry['val_acc']:.2f}", evals=entry.get("evaluations"))

        g = greedy_search(names, ladder, bytes_of, est_drop, cache, base_acc, args.max_drop,
                          args.verify_top_k, ai_of=ai_of, on_accept=evaluator.set_base, progress=progress)
        bar.close()
        result["greedy"] = {k: g[k] for k in ("config", "ai", "val_acc", "evaluations", "steps")}
        result["greedy"]["trajectory"] = [{("estimated_drop" if k == "est_drop" else k): v for k, v in t.items()}
                                          for t in g["trajectory"]]
        print(f"greedy: AI {g['ai']:.2f} at {g['val_acc']:.2f}% after {g['steps']} steps, {g['evaluations']} evaluations")

    if args.method in ("pareto", "both"):
        options = {n: [(FLOAT_BITS, bytes_of(n, FLOAT_BITS), 0.0)] + [(b, bytes_of(n, b), est_drop(n, b)) for b in ladder]
                   for n in names}
        frontier = pareto_frontier(options)
        p = verify_frontier(frontier, cache, base_acc, args.max_drop, ai_of, args.pareto_verify, args.pareto_slack)
        measured = {tuple(sorted(v["config"].items())): v["val_acc"] for v in p["verified"]}
        result["pareto"] = {
            "frontier": [{"config": pt.config, "estimated_drop": pt.est_drop, "bytes": pt.bytes, "ai": flops / pt.bytes,
                          "val_acc": measured.get(tuple(sorted(pt.config.items())))} for pt in frontier],
            "config": p["config"], "ai": p["ai"], "val_acc": p["val_acc"], "estimated_drop": p["est_drop"],
            "evaluations": p["evaluations"], "note": p["note"]}
        print(f"pareto: {len(frontier)} frontier points; best verified AI {p['ai']:.2f} at {p['val_acc']:.2f}% "
              f"(estimated drop {p['est_drop']:.2f}), {p['evaluations']} evaluations" + (f"; {p['note']}" if p["note"] else ""))

    ran = [m for m in ("greedy", "pareto") if result[m]]
    result["best"] = max(ran, key=lambda m: (result[m]["ai"], result[m]["val_acc"])) if ran else None
    s.quantizer.restore()
    result["evaluations"] = cache.count
    path = write_results(result, args, s, {"checkpoint": s.checkpoint, "per_layer": s2_path}, t0, RESULTS_NAME)
    label = " (synthetic data)" if s.data_info.get("synthetic") else ""
    print(f"\nsearch{label}: float {base_acc:.2f}% at AI {result['fp32_ai']:.2f}; budget {args.max_drop} points")
    for m in ran:
        r = result[m]
        print(f"  {m:<7} AI {r['ai']:.2f} ({100 * (r['ai'] / result['fp32_ai'] - 1):+.1f}%)  "
              f"{s.eval_split} {r['val_acc']:.2f}% (drop {base_acc - r['val_acc']:.2f})")
    if len(ran) == 2:
        print(f"  higher AI within budget: {result['best']}")
    print(f"{cache.count} evaluations in {result['seconds']:.1f} s; wrote {path}")
    return result
