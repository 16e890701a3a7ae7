"""Stage 4 as an importable function: uniform widths vs the searched configurations, on the
validation split and the held-out test set."""
from __future__ import annotations

import time
from pathlib import Path

from tqdm import tqdm

from utils.ai_calculator import model_cost
from utils.bitsearch import RESULTS_NAME as STAGE3_NAME
from utils.config import FLOAT_BITS, full_config, uniform_config, validate_config
from utils.io import check_same_checkpoint, load_results_json
from utils.stage import load_setup, resolve_bits, results_header, write_results
from utils.evaluation import CachedEvaluator

RESULTS_NAME = "04_baselines.json"


def dominates(a: dict, b: dict) -> bool:
    """Higher AI at equal or better accuracy, or better accuracy at equal or higher AI."""
    return ((a["ai"] > b["ai"] and a["test_acc"] >= b["test_acc"]) or
            (a["test_acc"] > b["test_acc"] and a["ai"] >= b["ai"]))


def load_stage3(args):
    path = Path(args.results_dir) / STAGE3_NAME
    return path, load_results_json(path, "3", "3_greedy_search.py", force=args.force)


def create_baselines(args) -> dict:
    t0 = time.time()
    resolve_bits(args)
    s3_path, s3 = load_stage3(args)
    quant = s3.get("quantization", {"granularity": "channel", "clip": "mse"})
    s = load_setup(args, need_test=True, per_channel=quant["granularity"] == "channel", clip=quant["clip"])
    check_same_checkpoint(s3, s3_path, s.checkpoint, "3_greedy_search.py", args.force)
    names = [info.name for info in s.table]

    candidates = [("fp32", {})] + [(f"uniform_w{b}", uniform_config(names, b))
                                    for b in dict.fromkeys(args.bits) if b != FLOAT_BITS]
    for method in ("greedy", "pareto"):
        if s3.get(method):
            candidates.append((method, validate_config(s3[method]["config"], names, f"{s3_path} {method} config")))
    if not any(s3.get(m) for m in ("greedy", "pareto")):
        print(f"note: {s3_path} holds no searched configuration; comparing uniform widths only")

    # The same (BN-folded) evaluation path as stages 2-3, so fp32 val accuracy matches theirs.
    def evaluator(x, y):
        return CachedEvaluator(s.model, s.quantizer, x, y, s.normalize, args.eval_batch_size, cache_activations=False)
    test_eval = evaluator(s.test_x, s.test_y)
    val_eval = evaluator(s.eval_x, s.eval_y) if s.eval_split == "val" else None
    configs = []
    for name, cfg in tqdm(candidates, desc="configurations", dynamic_ncols=True):
        cost = model_cost(s.table, cfg)
        configs.append({"name": name, "config": full_config(cfg, names), "ai": cost["ai"], "bytes": cost["bytes"],
                        "val_acc": val_eval.accuracy(cfg) if val_eval else None, "test_acc": test_eval.accuracy(cfg)})
    s.quantizer.restore()

    by_name = {c["name"]: c for c in configs}
    uniform = [c for c in configs if c["name"].startswith("uniform_")]
    dom = {m: [u["name"] for u in uniform if dominates(by_name[m], u)] for m in ("greedy", "pareto") if m in by_name}
    result = {**results_header("4", s), "max_drop": s3.get("max_drop"), "baseline": "fp32", "quantization": quant,
              "configs": configs, "dominates": dom, "dominance_basis": "test_acc and ai"}
    path = write_results(result, args, s, {"checkpoint": s.checkpoint, "search": s3_path}, t0, RESULTS_NAME)
    print_comparison(result)
    print(f"\n{len(configs)} configurations in {result['seconds']:.1f} s; wrote {path}")
    return result


def print_comparison(res: dict):
    label = " (synthetic data)" if res["dataset"].get("synthetic") else ""
    fp = next(c for c in res["configs"] if c["name"] == "fp32")
    print(f"\ncomparison{label}: weight widths vs arithmetic intensity (FLOPs/byte, batch 1, fp32 activations)")
    print(f"{'config':<12}{'AI':>8}{'AI gain':>9}{'val %':>8}{'test %':>8}{'test drop':>10}")
    for c in res["configs"]:
        val = f"{c['val_acc']:.2f}" if c["val_acc"] is not None else "-"
        print(f"{c['name']:<12}{c['ai']:>8.2f}{100 * (c['ai'] / fp['ai'] - 1):>+8.1f}%{val:>8}"
              f"{c['test_acc']:>8.2f}{fp['test_acc'] - c['test_acc']:>10.2f}")
    for m, beaten in res["dominates"].items():
        print(f"{m} dominates: {', '.join(beaten) if beaten else 'none of the uniform baselines'}")
