"""Stage 3 as an importable function: greedy and Pareto width search over stage 2's table.

The search space is one width per weight layer (stage 2's weight ladder) plus, when stage 2 measured
tensor widths, one width per tensor (its tensor ladder). Both searches rank by stage 2's per-group
signal (``--rank-by``, default the KL divergence to the float model), check every answer by real
evaluation on the search images, and hold the budget as ``Budget`` defines it:
drop + z * SE <= --max-drop. The Pareto DP is exact for its additive estimate, not for accuracy.
"""
from __future__ import annotations

import time
from pathlib import Path

from tqdm import tqdm

from quant.confirm import CONFIRM_Z, chain_parts, confirm_chain, greedy_sequence, pareto_sequence, thin_sequence
from quant.cost import CostModel, bitops
from quant.recipe import Recipe
from quant.search import (EvalCache, Measured, audit_pruning, greedy_search, most_accurate_above, pareto_frontier,
                          verify_frontier)
from quant.stats import BUDGET_Z, Budget, EarlyStop, paired_drop
from quant.widths import ACT_BITS, FLOAT_BITS, WEIGHT_BITS, A, W, check_widths
from utils.errors import UserError
from utils.io import PRODUCERS, RESULTS_FILES, check_same_checkpoint, load_results_json
from utils.options import SearchOptions
from utils.stages.common import check_same_data, load_setup, results_header, write_results

RANK_SIGNALS = {"kl": "kl", "loss": "loss_increase", "drop": "drop", "fisher": "fisher"}   # --rank-by: column
OBJECTIVES = ("ai", "bitops")   # --objective: what the greedy maximizes (answers report both)
# Scores divide by the estimated loss; a move estimated free must not divide by zero. In the units
# of each signal: nats of KL or cross-entropy per image, or points of accuracy (half an image of 10,000).
SCORE_EPS = {"kl": 1e-6, "loss": 1e-6, "drop": 0.005, "fisher": 1e-6}
QUICK_MAX_EVALUATIONS = 40
# The search's own margin when a confirm split carries the guarantee: 0, chosen by simulation
# (benchmarks/budget_simulation.py: AI rises as the margin falls and the promise holds at every margin
# tried; README "A budget that holds out of sample"); without one, the margin that keeps a fresh split
# of the search's size within budget about 95% of the time.
SEARCH_Z_WITH_CONFIRM = 0.0
SEARCH_Z_WITHOUT_CONFIRM = BUDGET_Z
FRONTIER_POINTS_SAVED = 300   # the frontier can have thousands of points: a thinned copy goes into the JSON
CHAIN_RULE = ("one fixed sequence at the full level: the greedy's trajectory, then the Pareto candidates with more AI "
              "than its last configuration (reached only when every greedy configuration passed)")


def load_stage2(opts: SearchOptions):
    """The stage-2 table, and the weight / activation ladders to search (default: all it measured)."""
    path = Path(opts.results_dir) / RESULTS_FILES["2"]
    res = load_results_json(path, "2", PRODUCERS["2"], force=opts.force)
    ladders = []
    for flag, key in (("bits", "bits"), ("a_bits", "a_bits")):
        measured = [b for b in res.get(key) or [] if b != FLOAT_BITS]
        given = getattr(opts, flag)
        if given is None:
            ladders.append(measured)
            continue
        given = [b for b in dict.fromkeys(given) if b != FLOAT_BITS]
        missing = [b for b in given if b not in measured]
        if missing:
            raise UserError(f"{path} has no measurements for --{flag.replace('_', '-')} widths {missing} (it has "
                            f"{measured or 'none'}). Re-run {PRODUCERS['2']} --{flag.replace('_', '-')} "
                            f"{' '.join(map(str, given))}, or drop the flag to search what stage 2 measured.")
        ladders.append(given)
    return path, res, ladders[0], ladders[1]


def check_calibration(s2: dict, s, path, force: bool):
    """Tensor ranges must be the ones stage 2 measured sensitivities with."""
    rec = (s2.get("activation_calibration") or {}).get("tensors") or {}
    for name, r in (s.ranges or {}).items():
        for b, scale in r["scales"].items():
            if abs(rec.get(name, {}).get("scales", {}).get(b, float("nan")) - scale) > 1e-9 * max(1.0, abs(scale)) \
                    and not force:
                raise UserError(f"the range of tensor {name} at {b} bits calibrates to {scale:.6g} here but "
                                f"{path} recorded another: its table describes other quantizers. Re-run "
                                f"{PRODUCERS['2']} (same flags), or pass --force.")


def stage2_column(s2: dict, key: str) -> dict:
    """{(group, bits): value} of one column of stage 2's table (empty if the table lacks it)."""
    rows = [((W, l["name"]), r["bits"], r) for l in s2["layers"] for r in l["results"]]
    rows += [((A, t["name"]), r["a_bits"], r) for t in s2.get("tensors") or [] for r in t["results"]]
    if not all(key in r for _, _, r in rows):
        return {}
    return {(g, b): r[key] for g, b, r in rows}


def rank_signal(s2: dict, rank_by: str, path) -> dict:
    """The column `--rank-by` ranks with, or a one-paragraph error naming the stage-2 run that has it."""
    col = stage2_column(s2, RANK_SIGNALS[rank_by])
    if not col:
        has = (s2.get("signal") or {}).get("name", "measured")
        fix = "--signal fisher (or both)" if rank_by == "fisher" else "--signal measured (or both)"
        raise UserError(f"--rank-by {rank_by}: {path} has no {RANK_SIGNALS[rank_by]} column (stage 2 ran with "
                        f"--signal {has}). Re-run {PRODUCERS['2']} {fix}, or pick a --rank-by it has.")
    return col


def stage2_cost_model(s2: dict, given: str | None, path) -> CostModel:
    """Stage 2's cost model, or the one asked for (said so)."""
    recorded = CostModel.from_json(s2.get("cost_model"))
    if given is None or given == recorded.name:
        return recorded
    print(f"note: {path} was costed with the {recorded.name} model; this stage charges bytes with the {given} model, "
          f"as --cost-model asks")
    return CostModel.named(given, recorded.batch_size)


def thin(points, k):
    if len(points) <= k:
        return list(points)
    idx = sorted({round(i * (len(points) - 1) / (k - 1)) for i in range(k)})
    return [points[i] for i in idx]


def search_widths(opts: SearchOptions) -> dict:
    t0 = time.time()
    if opts.max_drop < 0:
        raise UserError(f"--max-drop must be >= 0 points, got {opts.max_drop}.")
    if opts.z is not None and opts.z < 0:
        raise UserError(f"--z must be >= 0, got {opts.z}.")
    if opts.verify_top_k < 1 or opts.pareto_verify < 1:
        raise UserError("--verify-top-k and --pareto-verify must be >= 1.")
    if opts.audit_pruning < 0:
        raise UserError(f"--audit-pruning must be >= 0, got {opts.audit_pruning}.")
    if getattr(opts, "min_ai", None) is not None and not opts.min_ai >= 1:
        raise UserError(f"--min-ai is a multiple of the FP32 AI, at least 1; got {opts.min_ai}.")
    if not opts.confirm_step >= 0:
        raise UserError(f"--confirm-step is a fraction of AI, >= 0; got {opts.confirm_step}.")
    if opts.max_evaluations is not None and opts.max_evaluations < 1:
        raise UserError(f"--max-evaluations must be >= 1, got {opts.max_evaluations}.")
    for flag, allowed in (("bits", WEIGHT_BITS), ("a_bits", ACT_BITS)):   # before any file is read
        if getattr(opts, flag) is not None:
            check_widths(getattr(opts, flag), f"--{flag.replace('_', '-')}", allowed)
    cap = opts.max_evaluations or (QUICK_MAX_EVALUATIONS if opts.quick else None)
    if opts.objective not in OBJECTIVES:
        raise UserError(f"--objective {opts.objective!r}: use one of {', '.join(OBJECTIVES)}.")
    if opts.objective == "bitops" and (opts.method == "pareto" or getattr(opts, "min_ai", None) is not None):
        raise UserError("--objective bitops runs the greedy only: BitOps multiply a layer's weight width by its "
                        "input's, so they do not add up per group as the Pareto search needs. Drop --method pareto "
                        "/ --min-ai, or use --objective ai.")
    method = "greedy" if opts.objective == "bitops" else opts.method
    s2_path, s2, w_ladder, a_ladder = load_stage2(opts)
    if not w_ladder and not a_ladder:
        raise UserError(f"{s2_path} measured no widths to search.")
    cm = stage2_cost_model(s2, opts.cost_model, s2_path)
    cm.check_tensor_widths(a_ladder, "a search of tensor widths",
                           "Pass --a-bits 32 to search weights only under it, or drop --cost-model.")
    calib = (s2.get("dataset") or {}).get("calibration", {}).get("images")
    recipe = Recipe.from_json(s2.get("quantization"))
    if opts.quantize_logits and recipe.logits == "float" and a_ladder:
        raise UserError(f"--quantize-logits: {s2_path} measured the logits only in float, so the search has no "
                        f"sensitivity to narrow them with. Re-run {PRODUCERS['2']} --quantize-logits (same flags), "
                        f"or drop the flag.")
    s = load_setup(opts, recipe, calib_images=calib,
                   cost_model=cm, target=s2.get("target", "generic"))
    check_same_checkpoint(s2, s2_path, s.checkpoint, PRODUCERS["2"], opts.force)
    space = s.space
    if [l["name"] for l in s2["layers"]] != list(space.layers) or \
            (a_ladder and [t["name"] for t in s2.get("tensors") or []] != list(space.tensors)):
        raise UserError(f"{s2_path} describes other layers or tensors than {s.checkpoint} has. Re-run {PRODUCERS['2']}.")
    check_same_data(s2, s2_path, s, PRODUCERS["2"], opts.force)
    s.calibrate(a_ladder, multipliers=(s2.get("activation_calibration") or {}).get("multipliers"))
    check_calibration(s2, s, s2_path, opts.force)
    s.learn_levels([(n, b) for n in space.layers for b in w_ladder])      # stage 2's, from the cache
    joint = bool(a_ladder)
    confirming = s.confirm_x is not None
    z = opts.z if opts.z is not None else (SEARCH_Z_WITH_CONFIRM if confirming else SEARCH_Z_WITHOUT_CONFIRM)
    # one fixed sequence at 5%, also when both searches run: the Pareto candidates follow the greedy's (a chain)
    z_confirm = CONFIRM_Z

    # the greedy moves its base to the candidate it accepts: keep its candidates' activations (another --cache-gb)
    evaluator = s.evaluator(s.eval_x, s.eval_y, opts.eval_batch_size, cache_bytes=int(opts.cache_gb * 2 ** 30),
                            pending_bytes=int(opts.cache_gb * 2 ** 30))
    base = evaluator.float_outcome
    if abs(base.accuracy - s2["baseline_val_acc"]) > 1e-9:
        print(f"note: the float model scores {base.accuracy:.2f}% here, {s2['baseline_val_acc']:.2f}% in {s2_path} "
              f"(non-deterministic kernels?); the search uses {base.accuracy:.2f}%")
    sig, drops = rank_signal(s2, opts.rank_by, s2_path), stage2_column(s2, "drop")
    flops = s.table.flops * cm.batch_size
    const = cm.constant_bytes(s.table)
    ladders = {**{(W, n): w_ladder for n in space.layers},
               **{(A, t): a_ladder if s.recipe.narrows(space, (A, t)) else [] for t in space.tensors}}

    def est(table, group, bits):
        return 0.0 if bits == FLOAT_BITS else max(0.0, table[group, bits])

    def bytes_of(group, bits):
        return cm.group_bytes(s.table, group, bits)

    def ai_of(config):
        return flops / (const + sum(bytes_of(g, b) for g, b in config.items()))

    def objective(config):   # what the greedy maximizes (higher is better)
        return ai_of(config) if opts.objective == "ai" else 1.0 / bitops(s.table, config)

    early = EarlyStop(opts.max_drop) if opts.early_stop else None
    stop = early.stopper(base.correct) if early else None
    stopped = []   # images seen by each configuration the early stop ended

    def measure(config) -> Measured:
        out = evaluator.evaluate(config, stop=stop)
        pd = paired_drop(base.correct[:out.n], out.correct)
        # the Fisher estimate is of the KL: the measured signal is the KL itself
        signal = {"kl": out.kl, "fisher": out.kl, "loss": out.loss - base.loss, "drop": pd.drop}[opts.rank_by]
        stopped_at = out.n if out.n < evaluator.n else None
        if stopped_at is not None:
            stopped.append(stopped_at)
        return Measured(out.accuracy, pd.drop, pd.se, signal, stopped_at=stopped_at)

    float_cfg = space.uniform(FLOAT_BITS, FLOAT_BITS)
    cache = EvalCache(measure)
    cache.remember(float_cfg, Measured(base.accuracy, 0.0, 0.0, 0.0))
    budget = Budget(opts.max_drop, z)

    def describe(config, m: Measured, **extra):
        return {"config": space.to_file(config), "ai": ai_of(config), "bitops": bitops(s.table, config),
                "val_acc": m.acc, "drop": m.drop,
                "drop_se": m.se, "margin": m.drop + budget.z * m.se, **extra}

    confirm_eval = s.evaluator(s.confirm_x, s.confirm_y, opts.eval_batch_size,
                               cache_bytes=int(opts.cache_gb * 2 ** 30)) if confirming else None

    def measure_confirm(config) -> Measured:
        # consecutive configurations differ in a few groups: move the cached prefix along
        confirm_eval.set_base(config)
        out = confirm_eval.base_outcome
        pd = paired_drop(confirm_eval.float_outcome.correct, out.correct)
        return Measured(out.accuracy, pd.drop, pd.se, pd.drop)

    def confirm(sequences: dict) -> dict:
        """The fixed sequences the search fixed ({name: configurations}), thinned, tested on the confirm images:
        one sequence alone, or greedy then Pareto as one chain (quant.confirm.confirm_chain), the Pareto part
        being its candidates above the greedy's last AI."""
        if len(sequences) == 2:
            seqs = dict(zip(sequences, chain_parts(sequences["greedy"], sequences["pareto"], ai_of, opts.confirm_step)))
        else:
            seqs = {m: thin_sequence(q, ai_of, opts.confirm_step) for m, q in sequences.items()}
        parts = confirm_chain(list(seqs.values()), measure_confirm, opts.max_drop, z_confirm)
        for c, q in zip(parts, seqs.values()):
            c["images"], c["sequence"] = confirm_eval.n, len(q)
        return dict(zip(seqs, parts))

    def answer(search_cfg, search_m, c, sequence_length, **extra) -> dict:
        """The searched entry: the configuration the confirm step accepts (the search's own answer without
        one), its search-split and confirm-split numbers, and the search's answer before confirmation."""
        if c is None:
            return describe(search_cfg, search_m, confirm_drop=None, confirm_drop_se=None, confirm_acc=None,
                            confirm_passed=None, confirm_images=0, confirm=None, **extra)
        accepted = c["config"] if c["config"] is not None else float_cfg
        cm_ = c["measured"]
        entry = describe(accepted, cache(accepted), confirm_drop=cm_.drop if cm_ else 0.0,
                         confirm_drop_se=cm_.se if cm_ else 0.0, confirm_acc=cm_.acc if cm_ else None,
                         confirm_passed=cm_ is not None, confirm_images=c["images"], **extra)
        entry["confirm"] = {"z": c["z"], "rule": f"confirm drop + {c['z']:.3f} x SE <= {opts.max_drop}, tested in "
                                                 f"the order the search fixed; the last pass before the first failure",
                            "sequence": c["sequence"], "search_sequence": sequence_length,
                            "ai_step": opts.confirm_step, "reached": c["reached"],
                            "accepted": c["accepted"], "first_failure": c["first_failure"],
                            "evaluations": c["evaluations"], "tested": c["tested"],
                            "cut_back": accepted != search_cfg}
        entry["search_answer"] = describe(search_cfg, search_m)
        return entry

    header = results_header("3", s)
    result = {**header, "eval_images": evaluator.n, "max_drop": opts.max_drop,
              "budget": budget.to_json(), "rank_by": opts.rank_by, "baseline_val_acc": base.accuracy,
              "objective": opts.objective, "fp32_bitops": bitops(s.table, float_cfg), "fp32_ai": ai_of(float_cfg),
              "bits": w_ladder, "a_bits": a_ladder, "joint": joint,
              "search_space": {"weight_groups": len(space.layers), "weight_widths": [FLOAT_BITS] + w_ladder,
                               "tensor_groups": len(space.tensors) if joint else 0,
                               "tensor_widths": [FLOAT_BITS] + a_ladder if joint else [FLOAT_BITS]},
              "quantization": s.recipe.to_json(), "activation_calibration": s.calibration, "ptq_fit": s.ptq_fit,
              "confirm_images": confirm_eval.n if confirming else 0,
              "confirm_z": z_confirm if confirming else None,
              "search_margin": {"z": z, "why": "the confirm step carries the 5% guarantee; z chosen by simulation"
                                if confirming else "no confirm split: the margin alone keeps the budget on fresh "
                                                   "data of the search's size"},
              "max_evaluations": cap, "prune_infeasible": not opts.no_prune_infeasible,
              "early_stop": early.to_json() if early else None,
              "fast_forward": not opts.no_fast_forward,
              "layers": [{"name": li.name, "params": li.weights, "macs": li.macs, "segment": header["segments"][li.name]}
                         for li in s.table.layers],
              "tensors": [{"name": t, "elements": s.table.elements[t], "traffic": s.table.traffic(t),
                           "segment": header["segments"][t]} for t in space.tensors],
              "greedy": None, "pareto": None}
    greedy_cfg = None
    searched, notes = {}, {}   # method -> (search answer, its Measured, the fixed sequence, entry fields); summaries
    min_ai = getattr(opts, "min_ai", None)
    if min_ai is not None:
        result["min_ai"] = min_ai_search(opts, result, frontier_options(ladders, bytes_of, lambda grp, b: est(sig, grp, b)),
                                         cache, ai_of, describe, confirm_eval)
    if min_ai is None and method in ("greedy", "both"):
        bar = tqdm(desc="greedy steps", unit="step", dynamic_ncols=True)

        def progress(step, entry):
            bar.update()
            bar.set_postfix(group=f"{entry['kind']}:{entry['name']}", bits=entry["bits"], ai=f"{entry['ai']:.2f}",
                            drop="-" if entry["drop"] is None else f"{entry['drop']:.2f}",
                            evals=entry.get("evaluations"))

        reserve = min(opts.pareto_verify, cap // 4) if cap and method == "both" else 0   # left for pareto
        g = greedy_search(ladders, bytes_of, lambda grp, b: est(sig, grp, b), cache, budget,
                          verify_top_k=opts.verify_top_k, ai_of=ai_of,
                          on_accept=lambda cfg, m: evaluator.set_base(cfg), progress=progress,
                          prune_infeasible=not opts.no_prune_infeasible,
                          max_evaluations=cap - reserve if cap else None,
                          score_eps=SCORE_EPS[opts.rank_by], fast_forward=not opts.no_fast_forward,
                          objective=objective)
        bar.close()
        greedy_cfg = g["config"]
        if opts.audit_pruning:
            result["pruning_audit"] = audit_pruning(g["skipped_moves"], cache, budget, opts.audit_pruning, s.seed)
        searched["greedy"] = (greedy_cfg, g["measured"], greedy_sequence(g, float_cfg),
                              dict(evaluations=g["evaluations"], steps=g["steps"], stopped_by=g["stopped_by"],
                                   pruned_moves=g["pruned_moves"], infeasible_evaluations=g["infeasible_evaluations"],
                                   trajectory=g["trajectory"]))
        notes["greedy"] = (f"greedy: AI {g['ai']:.2f} at {g['measured'].acc:.2f}% after {g['steps']} steps, "
                           f"{g['evaluations']} evaluations"
                           + (f"; stopped by --max-evaluations {cap}" if g["stopped_by"] else ""))

    if min_ai is None and method in ("pareto", "both"):
        t = time.time()
        frontier = pareto_frontier(frontier_options(ladders, bytes_of, lambda grp, b: est(sig, grp, b)))
        dp_seconds = time.time() - t
        left = None if cap is None else max(1, cap - cache.count)
        p = verify_frontier(frontier, cache, budget, ai_of, min(opts.pareto_verify, left or opts.pareto_verify),
                            seed_config=greedy_cfg)
        if p["config"] is None:
            p.update(config=float_cfg, ai=ai_of(float_cfg), measured=cache(float_cfg), source="float")
        seq = pareto_sequence(p, ai_of)   # the verified frontier points below its answer, then the answer
        searched["pareto"] = (p["config"], p["measured"], seq, dict(
            source=p["source"], evaluations=p["evaluations"],
            note=p["note"], frontier_size=len(frontier), dp_seconds=dp_seconds,
            verified=[{"ai": v["ai"], "estimated": v["est"], "val_acc": v["measured"].acc, "drop": v["measured"].drop,
                       "drop_se": v["measured"].se, "feasible": v["feasible"],
                       "stopped_at": v["measured"].stopped_at} for v in p["verified"]],
            frontier=[{"ai": flops / (const + pt.bytes), "estimated": pt.est,
                       "estimated_drop": sum(est(drops, grp, b) for grp, b in pt.config.items()) if drops else None}
                      for pt in thin(frontier, FRONTIER_POINTS_SAVED)]))
        notes["pareto"] = (f"pareto: {len(frontier)} frontier points ({dp_seconds:.2f} s); answer AI {p['ai']:.2f} at "
                           f"{p['measured'].acc:.2f}% ({p['source']}), {p['evaluations']} evaluations"
                           + (f"; {p['note']}" if p["note"] else ""))

    confirmed = confirm({m: q[2] for m, q in searched.items()}) if confirming and searched else {}
    for m, (cfg, meas, seq, extra) in searched.items():
        result[m] = answer(cfg, meas, confirmed.get(m), len(seq), **extra)
        print(notes[m] + confirmed_note(result[m]))
    if len(confirmed) == 2:
        result["confirm_chain"] = {"order": ["greedy", "pareto"], "rule": CHAIN_RULE, "z": z_confirm}
    ran = [m for m in ("greedy", "pareto") if result[m]]
    result["best"] = max(ran, key=lambda m: (result[m]["ai"], result[m]["val_acc"])) if ran else None
    for m in ran:
        if result[m]["ai"] == result["fp32_ai"]:
            result[m]["why_float"] = why_float(result[m], budget, evaluator.n)
    result["evaluations"] = cache.count
    if early:
        result["early_stop"].update(stopped=len(stopped), images_evaluated=sum(stopped),
                                    images_saved=len(stopped) * evaluator.n - sum(stopped))
    path = write_results(result, opts, s, {"checkpoint": s.checkpoint, "per_layer": s2_path}, t0, RESULTS_FILES["3"])
    print_search(result)
    print(f"{cache.count} evaluations in {result['seconds']:.1f} s; wrote {path}")
    return result


def frontier_options(ladders, bytes_of, est) -> dict:
    """pareto_frontier's options: each group's widths (float first) with their bytes and stage-2 estimate."""
    return {grp: [(b, bytes_of(grp, b), est(grp, b)) for b in [FLOAT_BITS] + lad] for grp, lad in ladders.items()}


def min_ai_search(opts: SearchOptions, result, options, cache, ai_of, describe, confirm_eval):
    """--min-ai X: the most accurate configuration with at least X times the FP32 AI, from the Pareto frontier of
    the estimate (quant.search.most_accurate_above, --pareto-verify evaluations), stored as the "pareto" entry with
    source "min-ai". It is a starting point for fine-tuning, not a post-training answer: no budget chooses it, and
    its confirm-split drop is measured and reported (``confirm_passed``: whether it would pass stage 3's rule)
    but never swaps it for a wider configuration."""
    target = opts.min_ai * result["fp32_ai"]
    frontier = pareto_frontier(options)
    p = most_accurate_above(frontier, target, cache, ai_of, opts.pareto_verify)
    if p["config"] is None:
        raise UserError(f"--min-ai {opts.min_ai:g}: {p['note']} (the narrowest configuration reaches "
                        f"{ai_of(frontier[-1].config) / result['fp32_ai']:.2f}x FP32). Give a smaller --min-ai, or "
                        f"let stage 2 measure narrower widths (--bits, --a-bits).")
    extra = {"confirm_drop": None, "confirm_drop_se": None, "confirm_acc": None, "confirm_passed": None,
             "confirm_images": 0}
    if confirm_eval is not None:
        out = confirm_eval.evaluate(p["config"])
        pd = paired_drop(confirm_eval.float_outcome.correct, out.correct)
        extra = {"confirm_drop": pd.drop, "confirm_drop_se": pd.se, "confirm_acc": out.accuracy,
                 "confirm_passed": pd.drop + result["confirm_z"] * pd.se <= opts.max_drop,
                 "confirm_images": confirm_eval.n}
    result["pareto"] = describe(p["config"], p["measured"], source="min-ai", evaluations=p["evaluations"],
                                frontier_size=len(frontier), note=None, **extra,
                                verified=[{"ai": v["ai"], "estimated": v["est"], "val_acc": v["measured"].acc,
                                           "drop": v["measured"].drop, "drop_se": v["measured"].se}
                                          for v in p["verified"]])
    print(f"--min-ai {opts.min_ai:g}: {p['eligible']} frontier points reach AI {target:.2f}; of the {len(p['verified'])} "
          f"evaluated, the most accurate: AI {p['ai']:.2f} ({p['ai'] / result['fp32_ai']:.2f}x) at "
          f"{p['measured'].acc:.2f}% (drop {p['measured'].drop:.2f})")
    return {"x_fp32": opts.min_ai, "ai": target, "eligible": p["eligible"], "evaluated": len(p["verified"]),
            "rule": "the most accurate (on the search images) of the frontier points with the smallest estimates "
                    "that reach the AI; no budget, no confirm cut-back"}


def why_float(entry: dict, budget: Budget, images: int) -> str:
    """Why a searched entry's answer is the float model."""
    c = entry.get("confirm")
    if c is not None and entry["search_answer"]["ai"] > entry["ai"]:
        if not c["sequence"]:
            return "it had no candidate above the greedy's AI to confirm"
        if not c["reached"]:
            return "the confirm chain did not reach its candidates: a configuration of the greedy's sequence failed first"
        return "its first candidate failed the confirm test"
    return (f"no single narrowing of any layer held the budget (drop + {budget.z:.2f} x SE <= {budget.max_drop}) on "
            f"{images} search images")


def confirmed_note(entry: dict) -> str:
    c = entry.get("confirm")
    if c is None:
        return "; no confirm split"
    if not c["sequence"]:
        return "; no candidate to confirm (of Pareto's, none above the greedy's AI), so the answer is float"
    if not c["reached"]:
        return "; confirm chain: not reached (the greedy's sequence failed first), so the answer is float"
    if not entry["confirm_passed"]:
        return f"; confirm split: the first configuration of {c['sequence']} failed, so the answer is float"
    cut = f", cut back to step {c['accepted'] + 1} of {c['sequence']}" if c["cut_back"] else ""
    return (f"; confirmed on {entry['confirm_images']} held-back images: drop {entry['confirm_drop']:.2f} +- "
            f"{entry['confirm_drop_se']:.2f}{cut}, AI {entry['ai']:.2f}")


def print_search(result: dict):
    label = " (synthetic data)" if result["dataset"].get("synthetic") else ""
    b = result["budget"]
    print(f"\nsearch{label}: float {result['baseline_val_acc']:.2f}% at modelled AI {result['fp32_ai']:.2f}; budget: drop + "
          f"{b['z']:.2f} x SE <= {b['max_drop']} points on {result['eval_images']} {result['eval_split']} images")
    for m in ("greedy", "pareto"):
        r = result[m]
        if r:
            print(f"  {m:<7} AI {r['ai']:.2f} ({r['ai'] / result['fp32_ai']:.2f}x)  {result['eval_split']} "
                  f"{r['val_acc']:.2f}% (drop {r['drop']:.2f} +- {r['drop_se']:.2f}, margin {r['margin']:.2f})")
    if result["greedy"] and result["pareto"]:
        print(f"  higher AI within budget: {result['best']}")
