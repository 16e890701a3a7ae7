"""Stage 4 as an importable function: the float model, uniform widths and the searched
configurations, on the search images and on the report images the search never saw, with
intervals: Wilson for accuracies, the paired bootstrap for drops against fp32."""
from __future__ import annotations

import time
from pathlib import Path

from tqdm import tqdm

from utils.config import FLOAT_BITS, check_widths, config_json, parse_config, uniform
from utils.evaluation import CachedEvaluator
from utils.io import PRODUCERS, RESULTS_FILES, check_same_checkpoint, load_results_json
from utils.stages.common import check_same_data, load_setup, results_header, write_results
from utils.stats import bootstrap_drop_interval, paired_drop, wilson_interval

JOINT_UNIFORMS = ((8, 8), (4, 8), (4, 4))   # added when stage 3 searched activations too
SEARCHED = ("greedy", "pareto")


def dominates(a: dict, b: dict) -> bool:
    """Higher AI at equal or better accuracy, or better accuracy at equal or higher AI."""
    return ((a["ai"] > b["ai"] and a["test_acc"] >= b["test_acc"]) or
            (a["test_acc"] > b["test_acc"] and a["ai"] >= b["ai"]))


def compared_configs(s3: dict, names, w_widths) -> list[tuple[str, dict]]:
    """(name, full config) of fp32, the uniform widths and what stage 3 found, in that order."""
    out = [("fp32", uniform(names, FLOAT_BITS, FLOAT_BITS))]
    out += [(f"uniform_w{b}", uniform(names, b, FLOAT_BITS)) for b in w_widths if b != FLOAT_BITS]
    if s3.get("joint"):
        out += [(f"uniform_w{w}a{a}", uniform(names, w, a)) for w, a in JOINT_UNIFORMS]
    for m in SEARCHED:
        if s3.get(m):
            out.append((m, parse_config(s3[m]["config"], names, FLOAT_BITS, f"{RESULTS_FILES['3']} {m} config")))
    return out


def score(name, cfg, s, val_eval, test_eval, fp_val, fp_test, joint) -> dict:
    """AI and the accuracy of one configuration on both splits, with intervals and paired drops."""
    cost = s.cost_model.cost(s.table, cfg)
    v, t = val_eval.evaluate(cfg), test_eval.evaluate(cfg)
    pv, pt = paired_drop(fp_val.correct, v.correct), paired_drop(fp_test.correct, t.correct)
    return {"name": name, "config": config_json(cfg, joint), "ai": cost["ai"], "bytes": cost["bytes"],
            "val_acc": v.accuracy, "val_acc_ci95": wilson_interval(v.n_correct, v.n), "val_drop": pv.drop,
            "test_acc": t.accuracy, "test_acc_ci95": wilson_interval(t.n_correct, t.n),
            "test_drop": pt.drop, "test_drop_se": pt.se, "test_drop_ci95": bootstrap_drop_interval(pt)}


def create_baselines(args) -> dict:
    t0 = time.time()
    s3_path = Path(args.results_dir) / RESULTS_FILES["3"]
    s3 = load_results_json(s3_path, "3", PRODUCERS["3"], force=args.force)
    w_widths = list(dict.fromkeys(args.bits if args.bits is not None else s3.get("bits") or []))
    if args.bits is not None:
        check_widths(args.bits, "--bits")
    quant = s3.get("quantization", {"granularity": "channel", "clip": "mse"})
    calib = (s3.get("dataset") or {}).get("calibration", {}).get("images")
    s = load_setup(args, per_channel=quant["granularity"] == "channel", clip=quant["clip"], calib_images=calib)
    check_same_checkpoint(s3, s3_path, s.checkpoint, PRODUCERS["3"], args.force)
    check_same_data(s3, s3_path, s, PRODUCERS["3"], args.force)
    names, joint = s.layer_names, bool(s3.get("joint"))
    candidates = compared_configs(s3, names, w_widths)
    if not any(s3.get(m) for m in SEARCHED):
        print(f"note: {s3_path} holds no searched configuration; comparing uniform widths only")
    act = s.calibrate({a for _, cfg in candidates for _, a in cfg.values()})

    # The same (BN-folded) evaluation as stages 2-3, so fp32's search accuracy matches theirs.
    def evaluator(x, y):
        return CachedEvaluator(s.model, s.quantizer, x, y, s.normalize, args.eval_batch_size, act_quant=act,
                               cache_activations=False)
    val_eval, test_eval = evaluator(s.eval_x, s.eval_y), evaluator(s.report_x, s.report_y)
    fp_val, fp_test = val_eval.float_outcome, test_eval.float_outcome
    configs = []
    for name, cfg in tqdm(candidates, desc="configurations", dynamic_ncols=True):
        entry = score(name, cfg, s, val_eval, test_eval, fp_val, fp_test, joint)
        if name in SEARCHED:
            entry.update(search_drop=s3[name]["drop"], confirm_drop=None,
                         budget_holds_on_test=entry["test_drop"] <= s3["max_drop"])
        configs.append(entry)
    s.quantizer.restore()

    by_name = {c["name"]: c for c in configs}
    uniforms = [c for c in configs if c["name"].startswith("uniform_")]
    dom = {m: [u["name"] for u in uniforms if dominates(by_name[m], u)] for m in SEARCHED if m in by_name}
    result = {**results_header("4", s), "max_drop": s3.get("max_drop"), "budget": s3.get("budget"),
              "baseline": "fp32", "quantization": quant, "joint": joint, "configs": configs, "dominates": dom,
              "dominance_basis": "test_acc and ai", "report_split": s.split.report.name,
              "images": {"search": s.split.search.describe(s.data, True),
                         "report": s.split.report.describe(s.data, True)}}
    if s.split.policy == "test halves":
        print(f"note: test accuracies are on the report half of the test set ({len(s.report_y)} images), which "
              f"the search never saw; val accuracies are on the search half")
    path = write_results(result, args, s, {"checkpoint": s.checkpoint, "search": s3_path}, t0, RESULTS_FILES["4"])
    print_comparison(result)
    print(f"\n{len(configs)} configurations in {result['seconds']:.1f} s; wrote {path}")
    return result


def print_comparison(res: dict):
    label = " (synthetic data)" if res["dataset"].get("synthetic") else ""
    cm = res.get("cost_model") or {}
    n_test = res["dataset"]["report"]["images"]
    print(f"\ncomparison{label}: AI in FLOPs/byte (batch {cm.get('batch_size', 1)}); accuracies on "
          f"{res['eval_split']} (search) and {res['report_split']} ({n_test} images, never searched), 95% intervals")
    fp = next(c for c in res["configs"] if c["name"] == "fp32")
    print(f"{'config':<14}{'AI':>8}{'x fp32':>8}{'val %':>8}{'test %':>8}{'test 95% CI':>16}{'test drop':>10}"
          f"{'drop 95% CI':>16}")
    for c in res["configs"]:
        lo, hi = c["test_acc_ci95"]
        dlo, dhi = c["test_drop_ci95"]
        print(f"{c['name']:<14}{c['ai']:>8.2f}{c['ai'] / fp['ai']:>8.2f}{c['val_acc']:>8.2f}{c['test_acc']:>8.2f}"
              f"{f'[{lo:.2f}, {hi:.2f}]':>16}{c['test_drop']:>10.2f}{f'[{dlo:.2f}, {dhi:.2f}]':>16}")
    for m, beaten in res["dominates"].items():
        print(f"{m} dominates: {', '.join(beaten) if beaten else 'none of the uniform baselines'}")
    for c in res["configs"]:
        if "budget_holds_on_test" in c:
            print(f"{c['name']}: test drop {c['test_drop']:.2f} {'<=' if c['budget_holds_on_test'] else '>'} budget "
                  f"{res['max_drop']} (search drop {c['search_drop']:.2f})")
