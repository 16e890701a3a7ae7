"""Stage 4 as an importable function: the float model, uniform widths and the searched
configurations, on the search images and on the report images the search never saw, with
intervals: Wilson for accuracies, the paired bootstrap for drops against fp32. With --qat-epochs N,
every compared configuration (fp32 in float, to control for the extra training) is also fine-tuned
for N epochs under one recipe (utils/qat.py) and reported beside its post-training numbers."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from quant.fold import fold_bn
from quant.recipe import Recipe
from quant.stats import bootstrap_drop_interval, drop_of_differences, paired_drop, wilson_interval
from quant.widths import FLOAT_BITS, A, W, check_widths, tensors_of, weights_of
from utils.errors import UserError
from utils.io import PRODUCERS, RESULTS_FILES, check_same_checkpoint, load_results_json, sha256_file
from utils.options import BaselineOptions
from utils.qat import FineTuneRecipe, checkpoint_name, fine_tune_config, fine_tune_images, keep_post_training
from utils.stages.common import EXECUTABLE, check_same_data, load_setup, results_header, write_results
from utils.stages.greedy_search import stage2_cost_model
from utils.onnx_export import placed_model
from utils.train import correct_credit

JOINT_UNIFORMS = ((8, 8), (4, 8), (4, 4))   # added when stage 3 searched activations too; W3A3 when 3 bits were too
SEARCHED = ("greedy", "pareto")


DOMINATES = "dominates"
EQUAL_ACC = "higher AI, accuracy not significantly different"


def relation(a: dict, b: dict, a_masks: list, b_masks: list) -> dict:
    """How configuration `a` compares with `b` on the report images, by AI and the paired 95% bootstrap
    interval of the accuracy difference acc(a) - acc(b) (``seeds_drop``: the correct-masks of one run each,
    or of several seeds, averaged per image):

    * "dominates": AI(a) >= AI(b) and the interval lies above zero;
    * "higher AI, accuracy not significantly different": AI(a) > AI(b) and the interval contains zero;
    * "trade-off": more AI and significantly less accurate, or less AI and significantly more accurate;
    * "dominated or equal" otherwise."""
    diff, (lo, hi) = seeds_drop(a_masks, b_masks)   # drop of b against a = acc(a) - acc(b)
    if a["ai"] >= b["ai"] and lo > 0:
        rel = DOMINATES
    elif a["ai"] > b["ai"] and lo <= 0 <= hi:
        rel = EQUAL_ACC
    elif (a["ai"] > b["ai"] and hi < 0) or (a["ai"] < b["ai"] and lo > 0):
        rel = "trade-off"
    else:
        rel = "dominated or equal"
    return {"vs": b["name"], "relation": rel, "acc_diff": diff, "acc_diff_ci95": [lo, hi]}


def qat_comparisons(configs: list[dict], masks: dict) -> dict:
    """After fine-tuning: each fine-tuned searched configuration against each fine-tuned uniform one, under
    the same recipe and seeds, by `relation`'s rules. The accuracy difference is per image over the mean of
    the seeds (the recipe's expected accuracy, not the selected seed's), with seeds_drop's paired interval."""
    by_name = {c["name"]: c for c in configs}
    uniforms = [n for n in masks if n.startswith("uniform_")]
    return {m: [relation(by_name[m], by_name[u], masks[m], masks[u]) for u in uniforms]
            for m in SEARCHED if m in masks}


def compared_configs(s3: dict, space, w_widths, recipe: Recipe = Recipe()) -> list[tuple[str, dict]]:
    """(name, full config) of fp32, the uniform widths and what stage 3 found, in that order. Uniform
    weight widths leave every tensor float; the joint uniforms (W8A8, W4A8, W4A4, and W3A3 when stage 2 measured
    3-bit weights and tensors) put every tensor (the image included) at their width, the logits too where the
    recipe quantizes them; under a target that runs only some widths, only those."""
    out = [("fp32", space.uniform(FLOAT_BITS, FLOAT_BITS))]
    out += [(f"uniform_w{b}", space.uniform(b, FLOAT_BITS)) for b in w_widths if b != FLOAT_BITS]
    runs = EXECUTABLE[s3.get("target", "generic")]
    if s3.get("joint"):
        pairs = list(JOINT_UNIFORMS) + [(3, 3)] * (3 in (s3.get("a_bits") or []) and 3 in (s3.get("bits") or []))
        out += [(f"uniform_w{w}a{a}", recipe.uniform(space, w, a)) for w, a in pairs
                if runs is None or (w in runs and a in runs)]
    for m in SEARCHED:
        if s3.get(m):
            out.append((m, space.parse(s3[m]["config"], FLOAT_BITS, f"{RESULTS_FILES['3']} {m} config")))
    return out


def score(name, cfg, s, val_eval, test_eval, fp_val, fp_test) -> tuple[dict, torch.Tensor]:
    """(entry, test correct-mask): AI and the accuracy of one configuration on both splits, with intervals and
    paired drops, and which report images it classifies correctly."""
    cost = s.cost_model.cost(s.table, cfg)
    v, t = val_eval.evaluate(cfg), test_eval.evaluate(cfg)
    pv, pt = paired_drop(fp_val.correct, v.correct), paired_drop(fp_test.correct, t.correct)
    return {"name": name, "config": s.space.to_file(cfg), "ai": cost["ai"], "bytes": cost["bytes"],
            "val_acc": v.accuracy, "val_acc_ci95": wilson_interval(v.n_correct, v.n), "val_drop": pv.drop,
            "test_acc": t.accuracy, "test_acc_ci95": wilson_interval(t.n_correct, t.n),
            "test_drop": pt.drop, "test_drop_se": pt.se, "test_drop_ci95": bootstrap_drop_interval(pt),
            "tie_rate": t.tie_rate}, t.correct


def create_baselines(opts: BaselineOptions) -> dict:
    t0 = time.time()
    if opts.bits is not None:   # before any file is read
        check_widths(opts.bits, "--bits")
    check_qat_args(opts, None)
    s3_path = Path(opts.results_dir) / RESULTS_FILES["3"]
    s3 = load_results_json(s3_path, "3", PRODUCERS["3"], force=opts.force)
    w_widths = list(dict.fromkeys(opts.bits if opts.bits is not None else s3.get("bits") or []))
    recipe = Recipe.from_json(s3.get("quantization"))
    if opts.quantize_logits:
        recipe = dataclasses.replace(recipe, logits="quantized")
    quant = recipe.to_json()
    calib = (s3.get("dataset") or {}).get("calibration", {}).get("images")
    cm = stage2_cost_model(s3, opts.cost_model, s3_path)
    joint = bool(s3.get("joint"))
    cm.check_tensor_widths(s3.get("a_bits") or [] if joint else [], f"the tensor widths {s3_path} searched",
                           "Drop --cost-model.")
    s = load_setup(opts, recipe, calib_images=calib,
                   cost_model=cm, target=s3.get("target", "generic"))
    check_same_checkpoint(s3, s3_path, s.checkpoint, PRODUCERS["3"], opts.force)
    check_same_data(s3, s3_path, s, PRODUCERS["3"], opts.force)
    candidates = with_ends(compared_configs(s3, s.space, w_widths, recipe), s.model, s.target, opts.keep_ends)
    if not any(s3.get(m) for m in SEARCHED):
        print(f"note: {s3_path} holds no searched configuration; comparing uniform widths only")
    act = s.calibrate({a for _, cfg in candidates for a in tensors_of(cfg).values()},
                      multipliers=(s3.get("activation_calibration") or {}).get("multipliers"))
    s.learn_levels({(n, b) for _, cfg in candidates for n, b in weights_of(cfg).items()})

    # The same (BN-folded) evaluation as stages 2-3, so fp32's search accuracy matches theirs.
    val_eval = s.evaluator(s.eval_x, s.eval_y, opts.eval_batch_size, cache_activations=False)
    test_eval = s.evaluator(s.report_x, s.report_y, opts.eval_batch_size, cache_activations=False)
    fp_val, fp_test = val_eval.float_outcome, test_eval.float_outcome
    configs, correct = [], {}
    for name, cfg in tqdm(candidates, desc="configurations", dynamic_ncols=True):
        entry, correct[name] = score(name, cfg, s, val_eval, test_eval, fp_val, fp_test)
        if name in SEARCHED:
            r3 = s3[name]
            entry.update(search_drop=r3["drop"], confirm_drop=r3.get("confirm_drop"),
                         confirm_drop_se=r3.get("confirm_drop_se"), confirm_passed=r3.get("confirm_passed"),
                         confirm_images=r3.get("confirm_images", 0),
                         budget_holds_on_test=entry["test_drop"] <= s3["max_drop"])
        configs.append(entry)

    qat_top = fine_tune(opts, s, candidates, configs, fp_val, fp_test, act, quant) if opts.qat_epochs else {}

    by_name = {c["name"]: c for c in configs}
    uniforms = [c for c in configs if c["name"].startswith("uniform_")]
    comparisons = {m: [relation(by_name[m], u, [correct[m]], [correct[u["name"]]]) for u in uniforms]
                   for m in SEARCHED if m in by_name}
    dom = {m: [c["vs"] for c in rows if c["relation"] == DOMINATES] for m, rows in comparisons.items()}
    result = {**results_header("4", s), "max_drop": s3.get("max_drop"), "budget": s3.get("budget"),
              "baseline": "fp32", "quantization": quant, "ptq_fit": s.ptq_fit, "joint": joint, "configs": configs,
              "dominates": dom,
              "comparisons": comparisons,
              "keep_ends": None if opts.keep_ends is None else {
                  "bits": opts.keep_ends, "groups": [list(g) for g in end_groups(s.model, s.target)],
                  "applies_to": "uniform configurations (--keep-ends), where narrower"},
              **qat_top,
              "dominance_basis": "AI, and the paired 95% bootstrap interval of the test accuracy difference: "
                                 "dominates only when it excludes zero",
              "report_split": s.split.report.name,
              "images": {role: p.describe(s.data, True) if p is not None else None
                         for role, p in s.split.parts().items()}}
    if s.split.policy == "test halves":
        print(f"note: test accuracies are on the report half of the test set ({len(s.report_y)} images), which "
              f"the search never saw; val accuracies are on the search half")
    path = write_results(result, opts, s, {"checkpoint": s.checkpoint, "search": s3_path}, t0, RESULTS_FILES["4"])
    print_comparison(result)
    print(f"\n{len(configs)} configurations in {result['seconds']:.1f} s; wrote {path}")
    return result


def check_qat_args(opts: BaselineOptions, names):
    fractions = [f for f in (opts.qat_warmup, opts.qat_freeze_bn) if f is not None]
    if opts.qat_epochs < 0 or opts.qat_lr <= 0 or opts.qat_batch_size < 1 or opts.qat_seeds < 1 \
            or not all(0 <= f <= 1 for f in fractions):
        raise UserError(f"--qat-epochs must be >= 0, --qat-lr > 0, --qat-batch-size >= 1, --qat-seeds >= 1, and "
                        f"--qat-warmup and --qat-freeze-bn fractions of the steps between 0 and 1; got "
                        f"{opts.qat_epochs}, {opts.qat_lr}, {opts.qat_batch_size}, {opts.qat_seeds}, "
                        f"{opts.qat_warmup}, {opts.qat_freeze_bn}.")
    if opts.keep_ends is not None and opts.keep_ends not in KEEP_ENDS_BITS:
        raise UserError(f"--keep-ends {opts.keep_ends}: give the width the ends keep, one of {list(KEEP_ENDS_BITS)} "
                        f"(8, as the literature's W4A4 and W3A3 results do).")
    unknown = [n for n in opts.qat_configs or [] if names is not None and n not in names]
    if unknown:
        raise UserError(f"--qat-configs {unknown}: stage 4 compares {names}; name some of those.")


KEEP_ENDS_BITS = (2, 3, 4, 5, 6, 7, 8)


def end_groups(model, target) -> list[tuple[str, str]]:
    """The ends of a network: the first kernel's weights and the tensor it reads (the image), the last kernel's
    weights and the tensor it reads (the pooled features of a ResNet)."""
    ks = model.kernels(target)
    return [(W, ks[0].layers[0]), (A, ks[0].reads[0].tensor), (W, ks[-1].layers[0]), (A, ks[-1].reads[0].tensor)]


def with_ends(candidates, model, target, bits):
    """--keep-ends BITS: every uniform configuration keeps its ends (``end_groups``) at `bits` wherever it
    would have them narrower; float ends stay float. Searched configurations are left as stage 3 found them."""
    if bits is None:
        return candidates
    ends = end_groups(model, target)
    out = []
    for name, cfg in candidates:
        if name.startswith("uniform_"):
            cfg = {**cfg, **{g: bits for g in ends if cfg[g] < bits}}
        out.append((name, cfg))
    return out


def seeds_drop(ref, cand) -> tuple[float, list[float]]:
    """Paired drop acc(ref) - acc(cand), in points, on the same images, and its 95% paired bootstrap interval.
    `ref` and `cand` are lists of per-image credits (one per seed); each image's difference is the mean over
    seeds of ref minus the mean over seeds of cand (with one of each, exactly quant.stats.paired_drop), and
    images are resampled keeping their pairs (quant.stats.bootstrap_drop_interval)."""
    d = (torch.stack([torch.as_tensor(m, dtype=torch.float64) for m in ref]).mean(0)
         - torch.stack([torch.as_tensor(m, dtype=torch.float64) for m in cand]).mean(0))
    pd = drop_of_differences(d)
    return pd.drop, bootstrap_drop_interval(pd)


SELECTION_RULE = ("on the select images (no search or confirm step saw them): the seed with the best accuracy (the "
                  "first on ties); it is the answer unless its paired gain over the post-training weights of the "
                  "same configuration, on the same images, is below 0 (margin 0), when the post-training weights stay")
QAT_BUDGET, QAT_BUDGET_Z = 1.0, 1.645   # a chosen fine-tune: drop vs fine-tuned fp32 + z x SE <= 1 point on confirm


class BudgetTest:
    """The test a chosen fine-tuned answer passes on the confirm images (which the select step never saw): its
    paired drop from the fine-tuned fp32 (``reference``, set once fp32 is fine-tuned; the original float model
    where fp32 is not fine-tuned in this run) plus QAT_BUDGET_Z x its SE is at most QAT_BUDGET points, whatever
    the search's --max-drop."""

    def __init__(self, s, batch_size: int):
        self.s, self.batch_size = s, batch_size
        self.reference = None

    def credit(self, model):
        s = self.s
        return None if s.confirm_x is None else correct_credit(model, s.confirm_x, s.confirm_y, s.normalize,
                                                               self.batch_size)

    def rule(self) -> str:
        return (f"confirm drop vs the fine-tuned fp32 (else the original float) + {QAT_BUDGET_Z} x SE <= "
                f"{QAT_BUDGET} point, on the confirm images")

    def test(self, credit) -> dict | None:
        if credit is None:
            return {"passed": None, "why": "no confirm images (--confirm-size 0)"}
        tuned = self.reference is not None   # else the original float, measured only when it is needed
        pd = paired_drop(self.reference if tuned else self.credit(fold_bn(self.s.model)), credit)
        return {"reference": "fine-tuned fp32" if tuned else "original float", "images": len(credit),
                "drop": pd.drop, "se": pd.se, "z": QAT_BUDGET_Z, "budget": QAT_BUDGET,
                "passed": pd.drop + QAT_BUDGET_Z * pd.se <= QAT_BUDGET}

    @staticmethod
    def describe(t: dict | None) -> str:
        if not t or t.get("passed") is None:
            return ""
        return (f"; budget test on {t['images']} confirm images: drop {t['drop']:.2f} + {t['z']} x {t['se']:.2f} "
                f"{'<=' if t['passed'] else '>'} {t['budget']} vs {t['reference']}: {'passed' if t['passed'] else 'FAILED'}")


def choose_answer(runs: list[dict]) -> tuple[str, dict]:
    """("fine-tuned" or "post-training", the run chosen), by SELECTION_RULE: the fine-tune (one per seed) with the
    best accuracy on the select images, the first seed on ties, unless its paired gain over the post-training
    weights there is negative (``below_post_training``): then the post-training weights stay the answer."""
    best = max(runs, key=lambda r: r["selection_acc"])
    return ("post-training" if best["below_post_training"] else "fine-tuned"), best


def _acc(credit) -> float:
    return 100.0 * float(credit.sum()) / len(credit)


def fine_tune(opts: BaselineOptions, s, candidates, configs, fp_val, fp_test, act, quant) -> dict:
    """Fine-tune each selected configuration from the float checkpoint under one recipe, with each of
    --qat-seeds seeds, and add qat_* fields to its entry. Every decision is made on the select images, which no
    search or confirm step saw, never on test (SELECTION_RULE); a fine-tuned answer then passes BudgetTest on
    the confirm images, and the JSON records both. Drops are paired against the fine-tuned fp32 and the original float,
    per image over the mean of the seeds. Returns the top-level fields."""
    names = [n for n, _ in candidates]
    check_qat_args(opts, names)
    chosen = [(n, cfg) for n, cfg in candidates if not opts.qat_configs or n in opts.qat_configs]
    pool, padded, labels = fine_tune_images(s, opts.quick)
    seeds = [s.seed + k for k in range(opts.qat_seeds)]
    ft = FineTuneRecipe(opts.qat_epochs, opts.qat_lr, opts.qat_batch_size, opts.qat_warmup, opts.qat_freeze_bn,
                        opts.qat_scales, opts.qat_bn, opts.qat_distill, opts.qat_start)
    recipe = ft.to_json(pool, s.device, s.recipe.ptq)
    if s.select_x is None:
        raise UserError("fine-tuning is decided on the select images (between post-training and fine-tuned weights, "
                        "and among seeds), and this run has none: drop --select-size 0, or name a 'select' part in "
                        "the --holdout file.")
    sel_eval = s.evaluator(s.select_x, s.select_y, opts.eval_batch_size, cache_activations=False)
    budget = BudgetTest(s, opts.eval_batch_size)
    teacher = fold_bn(s.model).to(s.device) if opts.qat_distill else None
    base_sha = sha256_file(s.checkpoint)
    masks = {}      # name -> list of test masks of the fine-tunes, one per seed
    by_name = {c["name"]: c for c in configs}
    tuned = {}      # key -> name: a configuration equal to one already fine-tuned (pareto = greedy) reuses it
    for name, cfg in chosen:
        e = by_name[name]
        twin = tuned.setdefault(json.dumps({"config": s.space.to_file(cfg), "seeds": seeds}, sort_keys=True), name)
        if twin != name:
            e.update({k: v for k, v in by_name[twin].items() if k.startswith("qat_")},
                     qat_status=f"reused: same configuration and recipe as {twin}")
            masks[name] = masks[twin]
            print(f"{name}: the same configuration as {twin}; its fine-tune is reused")
            continue
        ptq_sel = sel_eval.evaluate(cfg).correct
        runs, tests, confirms = [], [], []
        for k, seed in enumerate(seeds):
            path = Path(opts.checkpoint_dir) / checkpoint_name(name, k, seed)
            run = fine_tune_config(s, name, cfg, ft, recipe, quant, base_sha, seed, path, padded, labels, teacher,
                                   opts.resume, f"qat {name}" + (f" seed {seed}" if len(seeds) > 1 else ""))
            m = run["model"]
            v = correct_credit(m, s.eval_x, s.eval_y, s.normalize, opts.eval_batch_size)
            sel = correct_credit(m, s.select_x, s.select_y, s.normalize, opts.eval_batch_size)
            t = correct_credit(m, s.report_x, s.report_y, s.normalize, opts.eval_batch_size)
            tests.append(t)
            confirms.append(budget.credit(m))
            gain = drop_of_differences(sel - ptq_sel.to(sel.dtype))   # fine-tuned minus post-training, per image
            runs.append({"seed": seed, "val_acc": _acc(v), "selection_acc": _acc(sel), "test_acc": _acc(t),
                         "selection_gain": gain.drop, "selection_gain_ci95": bootstrap_drop_interval(gain),
                         "below_post_training": gain.drop < 0, "checkpoint": str(path),
                         "status": run["status"], "seconds": run["seconds"], "history": run["history"]})
        masks[name] = tests
        test_accs = [r["test_acc"] for r in runs]
        mean_test = float(np.mean(test_accs))
        n_test = len(tests[0])
        answer, best = choose_answer(runs)
        if name == "fp32" and confirms[0] is not None:   # the fine-tuned fp32, per image over its seeds
            budget.reference = torch.stack(confirms).mean(0)
        if answer == "post-training":
            # the post-training model the evaluators computed (learned levels included), in the checkpoint's form
            keep_post_training(Path(best["checkpoint"]), placed_model(s.model, cfg, act, s.target, s.recipe, s.levels))
        e.update(qat_epochs=opts.qat_epochs, qat_seeds=seeds,
                 qat_val_acc=float(np.mean([r["val_acc"] for r in runs])),
                 qat_selection_acc=float(np.mean([r["selection_acc"] for r in runs])),
                 qat_test_acc=mean_test,
                 qat_test_acc_sd=float(np.std(test_accs, ddof=1)) if len(runs) > 1 else None,
                 qat_test_acc_ci95=wilson_interval(int(round(mean_test * n_test / 100)), n_test),
                 qat_post_training_selection_acc=_acc(ptq_sel),
                 qat_budget_test=budget.test(confirms[runs.index(best)]) if answer == "fine-tuned" and name != "fp32"
                 else None,
                 qat_below_post_training=[r["below_post_training"] for r in runs],
                 qat_answer=answer, qat_answer_seed=None if answer == "post-training" else best["seed"],
                 qat_answer_test_acc=e["test_acc"] if answer == "post-training" else best["test_acc"],
                 qat_checkpoint=best["checkpoint"], qat_status=runs[0]["status"],
                 qat_seconds=float(sum(r["seconds"] for r in runs)), qat_history=runs[0]["history"],
                 qat_runs=[{k: v for k, v in r.items() if k != "history"} for r in runs])
        drop, ci = seeds_drop([fp_test.correct], tests)
        e.update(qat_test_drop_vs_float=drop, qat_test_drop_vs_float_ci95=ci)
        sd = f" (sd {e['qat_test_acc_sd']:.2f} over {len(seeds)} seeds)" if len(seeds) > 1 else ""
        print(f"{name}: fine-tuned {opts.qat_epochs} epochs ({runs[0]['status']}): test {e['test_acc']:.2f}% -> "
              f"{mean_test:.2f}%{sd}" + ("; below post-training on the select images, which stays the answer"
                                         if answer == "post-training" else budget.describe(e["qat_budget_test"])))
    for name in masks:
        e = by_name[name]
        if "fp32" in masks:
            drop, ci = seeds_drop(masks["fp32"], masks[name])
            e.update(qat_test_drop=drop, qat_test_drop_ci95=ci)
        else:
            e.update(qat_test_drop=None, qat_test_drop_ci95=None)
    return {"qat_selected_on": "select", "qat_selection_rule": SELECTION_RULE, "qat_budget_rule": budget.rule(),
            "qat_recipe": recipe, "qat_seeds": seeds,
            "qat_comparisons": qat_comparisons(configs, masks)}


def print_comparison(res: dict):
    label = " (synthetic data)" if res["dataset"].get("synthetic") else ""
    cm = res.get("cost_model") or {}
    n_test = res["dataset"]["report"]["images"]
    print(f"\ncomparison{label}: modelled AI in FLOPs/byte ({cm.get('name', 'fused')} cost model, batch "
          f"{cm.get('batch_size', 1)}); accuracies on "
          f"{res['eval_split']} (search) and {res['report_split']} ({n_test} images, never searched), 95% intervals")
    fp = next(c for c in res["configs"] if c["name"] == "fp32")
    print(f"{'config':<14}{'AI':>8}{'x fp32':>8}{'val %':>8}{'test %':>8}{'test 95% CI':>16}{'test drop':>10}"
          f"{'drop 95% CI':>16}")
    for c in res["configs"]:
        lo, hi = c["test_acc_ci95"]
        dlo, dhi = c["test_drop_ci95"]
        print(f"{c['name']:<14}{c['ai']:>8.2f}{c['ai'] / fp['ai']:>8.2f}{c['val_acc']:>8.2f}{c['test_acc']:>8.2f}"
              f"{f'[{lo:.2f}, {hi:.2f}]':>16}{c['test_drop']:>10.2f}{f'[{dlo:.2f}, {dhi:.2f}]':>16}")
    for m, rows in (res.get("comparisons") or {}).items():
        for c in rows:
            if c["relation"] in (DOMINATES, EQUAL_ACC):
                lo, hi = c["acc_diff_ci95"]
                print(f"{m} vs {c['vs']}: {c['relation']} (test accuracy {c['acc_diff']:+.2f} [{lo:+.2f}, {hi:+.2f}])")
    qat = [c for c in res["configs"] if "qat_test_acc" in c]
    if qat:
        seeds = len(qat[0].get("qat_seeds") or [0])
        print(f"\nafter {qat[0]['qat_epochs']} epochs of quantization-aware fine-tuning (same recipe for all; fp32 "
              f"fine-tuned in float{f'; mean over {seeds} seeds' if seeds > 1 else ''}): test accuracy, drop vs "
              f"fine-tuned fp32 and vs the original float; selected on {res.get('qat_selected_on', 'val')} images")
        for c in qat:
            d = "-" if c["qat_test_drop"] is None else f"{c['qat_test_drop']:.2f}"
            sd = f" sd {c['qat_test_acc_sd']:.2f}" if c.get("qat_test_acc_sd") is not None else ""
            kept = "  (below post-training: post-training kept)" if c.get("qat_answer") == "post-training" else ""
            print(f"{c['name']:<14}{c['ai']:>8.2f}  PTQ {c['test_acc']:6.2f}%  QAT {c['qat_test_acc']:6.2f}%{sd}  "
                  f"drop {d:>6}  vs float {c['qat_test_drop_vs_float']:.2f}{kept}")
        for m, rows in (res.get("qat_comparisons") or {}).items():
            for c in rows:
                lo, hi = c["acc_diff_ci95"]
                print(f"fine-tuned {m} vs fine-tuned {c['vs']}: {c['relation']} (test accuracy {c['acc_diff']:+.2f} "
                      f"[{lo:+.2f}, {hi:+.2f}], mean over seeds)")
    for c in res["configs"]:
        if "budget_holds_on_test" in c:
            print(f"{c['name']}: test drop {c['test_drop']:.2f} {'<=' if c['budget_holds_on_test'] else '>'} budget "
                  f"{res['max_drop']} (search drop {c['search_drop']:.2f})")
