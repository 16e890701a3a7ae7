"""Width search: choose a width per group (a weight layer, or a tensor) to maximize arithmetic
intensity under an accuracy budget.

FLOPs do not depend on widths, so maximizing AI = FLOPs / bytes is the same as minimizing total
bytes. Two searches live here, both free of models and I/O so they can be tested with fakes:

* ``pareto_frontier`` + ``verify_frontier``: a multiple-choice-knapsack DP that is exact for an
  *additive, clamped estimate* of the loss (not for accuracy), then real evaluation along the
  frontier, bisecting on the assumption that feasibility is monotone along it.
* ``greedy_search``: the reference work's greedy, one group's width narrowed per step, each step
  checked by real evaluation.

A group is ``("w", layer)`` or ``("a", tensor)`` and its option a width. The estimate of an option
is the group's sensitivity signal measured by stage 2 with only that group changed: by default the
KL divergence from the float model's outputs (continuous, so it does not move in whole images as
accuracy does). Per-group estimates are clamped at 0 before they are summed: a group whose loss
happened to fall when quantized alone must not pay for other groups.

Real evaluation returns a ``Measured``; a configuration is feasible when the ``Budget`` holds for
its paired drop and standard error (quant/stats.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from quant.stats import Budget
from quant.widths import FLOAT_BITS, config_key

EST_RESOLUTION = 1e-9   # estimates are compared as integers of this unit (sums in any order agree)


def clamp(x: float) -> float:
    return max(0.0, float(x))


def _key(x: float, resolution: float) -> int:
    return int(round(clamp(x) / resolution))


@dataclass(frozen=True)
class Measured:
    """A configuration evaluated on the search images."""
    acc: float        # percent
    drop: float       # points below the float model, paired
    se: float         # standard error of `drop`, points
    signal: float     # the same sensitivity signal as the estimate (e.g. KL to the float model)
    stopped_at: int | None = None   # images seen when a sequential test stopped it early (None: all of them)


@dataclass
class FrontierPoint:
    config: dict          # {group: width}, every group, in group order
    est: float            # additive estimate (sum of clamped per-group signals)
    bytes: float          # total bytes of the groups (without the constant the widths do not change)


class EvalCache:
    """Wraps ``evaluate(config) -> Measured`` so that no configuration is evaluated twice.

    The greedy and the frontier verification share one cache; ``count`` is the number of real
    evaluations (distinct configurations)."""

    def __init__(self, evaluate: Callable[[dict], Measured]):
        self._evaluate = evaluate
        self._seen: dict[tuple, Measured] = {}
        self.count = 0

    @staticmethod
    def key(config: dict) -> tuple:
        return config_key(config)

    def __contains__(self, config: dict) -> bool:
        return self.key(config) in self._seen

    def get(self, config: dict):
        return self._seen.get(self.key(config))

    def remember(self, config: dict, m: Measured):
        """Record a result known without evaluating (the float model); not counted."""
        self._seen.setdefault(self.key(config), m)

    def __call__(self, config: dict) -> Measured:
        k = self.key(config)
        if k not in self._seen:
            self._seen[k] = self._evaluate(dict(config))
            self.count += 1
        return self._seen[k]


def pareto_frontier(options: dict, max_est: float | None = None,
                    resolution: float = EST_RESOLUTION) -> list[FrontierPoint]:
    """All configurations not dominated in (additive estimate, bytes): exact for the estimate, which
    is a sum of clamped per-group signals, not for accuracy.

    ``options`` maps each group (in group order) to a list of ``(width, bytes, est)``. Dynamic
    programming over groups keeps only non-dominated partial states: with both objectives additive,
    a dominated partial state can never complete into a frontier point, so pruning is exact for the
    estimate. Of states with identical (estimate, bytes) one is kept (the first in group/option
    order), which loses alternative configs but no frontier value. ``max_est`` drops states whose
    estimate already exceeds it; estimates only grow, so the result is the restricted frontier.

    Returned sorted by estimate ascending (bytes strictly descending): first the cheapest
    zero-estimate configuration, last the minimum-bytes one.
    """
    names = list(options)
    if not names:
        raise ValueError("pareto_frontier needs at least one layer")
    per_layer = []
    for name in names:
        opts = list(options[name])
        if not opts:
            raise ValueError(f"layer {name!r} has no width options")
        for opt, b, d in opts:
            if not (math.isfinite(float(b)) and math.isfinite(float(d))):
                raise ValueError(f"layer {name!r}, option {opt}: bytes and estimate must be finite, got {b}, {d}")
        per_layer.append(opts)
    if max_est is not None and max_est < 0:
        raise ValueError(f"max_est must be >= 0, got {max_est}")
    cap = None if max_est is None else _key(max_est, resolution)

    keys = np.zeros(1, dtype=np.int64)
    byts = np.zeros(1, dtype=np.float64)
    back = []   # per layer: (parent state index, option index) of each surviving state
    for opts in per_layer:
        ok = np.array([_key(d, resolution) for _, _, d in opts], dtype=np.int64)
        ob = np.array([float(b) for _, b, _ in opts], dtype=np.float64)
        ck = (keys[:, None] + ok[None, :]).ravel()
        cb = (byts[:, None] + ob[None, :]).ravel()
        order = np.lexsort((cb, ck))          # by estimate, then bytes; stable, so ties keep index order
        sb = cb[order]
        keep = np.empty(len(order), dtype=bool)
        keep[0] = True
        keep[1:] = sb[1:] < np.minimum.accumulate(sb)[:-1]   # strictly fewer bytes than all lower-estimate states
        sel = order[keep]
        if cap is not None:
            sel = sel[ck[sel] <= cap]
            if len(sel) == 0:
                raise ValueError(f"no configuration has an estimate <= {max_est}")
        back.append((sel // len(opts), sel % len(opts)))
        keys, byts = ck[sel], cb[sel]

    n = len(keys)
    choice = np.empty((len(names), n), dtype=np.int64)
    idx = np.arange(n)
    for li in range(len(names) - 1, -1, -1):
        parent, opt = back[li]
        choice[li] = opt[idx]
        idx = parent[idx]

    est = np.zeros(n)
    tot = np.zeros(n)
    for li, opts in enumerate(per_layer):   # re-summed in layer order, as anyone checking a config would
        est = est + np.array([clamp(o[2]) for o in opts])[choice[li]]
        tot = tot + np.array([float(o[1]) for o in opts])[choice[li]]
    return [FrontierPoint(config={name: per_layer[li][choice[li, i]][0] for li, name in enumerate(names)},
                          est=float(est[i]), bytes=float(tot[i])) for i in range(n)]


@dataclass
class _Pruned:
    """Moves measured infeasible: group -> the widest width found infeasible.

    Assumption (stated in the README, tested, and switchable off with --no-prune-infeasible):
    accuracy only falls as widths narrow, so a move found infeasible from one configuration stays
    infeasible from any narrower configuration, and so does narrowing the same group further."""
    enabled: bool = True
    bound: dict = field(default_factory=dict)

    def blocks(self, group, value) -> bool:
        return self.enabled and value <= self.bound.get(group, -1)

    def add(self, group, value):
        if self.enabled:
            self.bound[group] = max(value, self.bound.get(group, -1))


def _ranked_moves(config, ladders, objective, group_est, score_eps, pruned=None):
    """Every single narrowing of `config`, best estimated score (objective gained per estimated loss) first."""
    moves = []
    ai = objective(config)
    for i, (group, ladder) in enumerate(ladders.items()):
        cur = config[group]
        for v in ladder:
            if v >= cur or (pruned is not None and pruned.blocks(group, v)):
                continue
            new = dict(config)
            new[group] = v
            d_ai = objective(new) - ai
            if d_ai <= 0:
                continue
            est_loss = group_est(group, v) - group_est(group, cur)
            moves.append((d_ai / max(est_loss, score_eps), d_ai, i, -v, group, new, est_loss))
    moves.sort(key=lambda m: (-m[0], -m[1], m[2], m[3]))
    return moves


def greedy_search(ladders: dict, bytes_of, est, evaluate, budget: Budget, verify_top_k: int = 3, ai_of=None,
                  on_accept=None, progress=None, prune_infeasible: bool = True, max_evaluations: int | None = None,
                  score_eps: float = 1e-6, fast_forward: bool = True, objective=None) -> dict:
    """The reference greedy: from all-float, repeatedly narrow the one group that buys the most AI per
    unit of estimated loss, until no single narrowing keeps the budget.

    ``ladders`` maps each group (e.g. ``("w", "conv1")``, ``("a", "input")``) to its candidate widths.
    Moves are ranked by the estimated score (AI gained / estimated signal increase); ``verify_top_k``
    of them are evaluated for real at a time, best first, and the best *measured* score among the
    feasible ones wins. A later batch is only opened when a whole batch is infeasible.

    ``fast_forward`` first walks the path the estimate alone would take (each step its best-ranked
    move, down to the narrowest configuration) and bisects it for the last configuration that holds
    the budget: about log2(path length) evaluations instead of one batch per step for the easy
    first part of the descent. The verified greedy continues from there.

    ``bytes_of(group, bits)``: a group's bytes; ``est(group, bits)``: its stage-2 signal;
    ``evaluate``: config -> Measured (or a shared EvalCache); ``ai_of(config)``: the AI (default
    1 / total bytes, which ranks the same). ``on_accept(config, measured)`` runs after each
    accepted configuration, ``progress(step, entry)`` gets each trajectory entry. ``max_evaluations``
    caps the real evaluations of this call; the result says whether the cap stopped it. ``objective(config)``,
    if given, is what the moves are ranked by instead of the AI (higher is better, e.g. 1 / BitOps); the
    trajectory and the result still report ``ai_of``.
    """
    ladders = {g: sorted({int(v) for v in lad if int(v) != FLOAT_BITS}, reverse=True) for g, lad in ladders.items()}
    if verify_top_k < 1:
        raise ValueError("verify_top_k must be >= 1")
    cache = evaluate if isinstance(evaluate, EvalCache) else EvalCache(evaluate)
    start_count = cache.count
    ai_of = ai_of or (lambda c: 1.0 / sum(float(bytes_of(g, c[g])) for g in c))
    objective = objective or ai_of
    pruned = _Pruned(prune_infeasible)

    def group_est(group, bits):
        return 0.0 if bits == FLOAT_BITS else clamp(est(group, bits))

    def out_of_budget(config):
        return config not in cache and max_evaluations is not None and cache.count - start_count >= max_evaluations

    config = {g: FLOAT_BITS for g in ladders}
    current = cache(config)
    ai = ai_of(config)
    trajectory = [dict(step=0, kind=None, name=None, from_bits=None, bits=None, ai=ai, val_acc=current.acc,
                       drop=current.drop, drop_se=current.se, estimated=0.0, verified=True)]
    total_est, stopped_by, infeasible_seen = 0.0, None, 0

    def record(group, from_bits, new, m, est_loss, phase):
        nonlocal total_est
        total_est += est_loss
        entry = dict(step=len(trajectory), kind=group[0], name=group[1], from_bits=from_bits, bits=new[group],
                     ai=ai_of(new), val_acc=m.acc if m else None, drop=m.drop if m else None,
                     drop_se=m.se if m else None, estimated=total_est, verified=m is not None, phase=phase)
        trajectory.append(entry)
        if progress is not None:
            progress(entry["step"], dict(entry, evaluations=cache.count - start_count))

    if fast_forward:
        path, c = [], config
        while True:
            moves = _ranked_moves(c, ladders, objective, group_est, score_eps)
            if not moves:
                break
            _, _, _, _, group, new, est_loss = moves[0]
            path.append((group, c[group], new, est_loss))
            c = new
        lo, hi = -1, len(path)     # path[lo] holds the budget (-1: the float start), path[hi] does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if out_of_budget(path[mid][2]):
                stopped_by = "max_evaluations"
                break
            m = cache(path[mid][2])
            if budget.holds(m.drop, m.se):
                lo = mid
            else:
                hi = mid
                infeasible_seen += 1
        if hi == lo + 1 and hi < len(path):   # the move out of path[lo] is measured infeasible
            group, _, new, _ = path[hi]
            pruned.add(group, new[group])
        for i in range(lo + 1):
            group, from_bits, new, est_loss = path[i]
            record(group, from_bits, new, cache.get(new), est_loss, "fast-forward")
        if lo >= 0:
            config, current, ai = path[lo][2], cache.get(path[lo][2]), ai_of(path[lo][2])
            if on_accept is not None:
                on_accept(dict(config), current)

    skipped = []   # (configuration, group, width): moves the pruning rule kept from being measured
    while stopped_by is None:
        moves = _ranked_moves(config, ladders, objective, group_est, score_eps, pruned)
        skipped += [(dict(config), g, v) for g, lad in ladders.items() for v in lad
                    if v < config[g] and pruned.blocks(g, v)]
        chosen = None
        for first in range(0, len(moves), verify_top_k):
            best = None
            for rank, (_, d_ai, _, _, group, new, est_loss) in enumerate(moves[first:first + verify_top_k]):
                if pruned.blocks(group, new[group]):   # found infeasible earlier in this step
                    continue
                if out_of_budget(new):
                    stopped_by = "max_evaluations"
                    break
                m = cache(new)
                if not budget.holds(m.drop, m.se):
                    infeasible_seen += 1
                    pruned.add(group, new[group])
                    continue
                real = (d_ai / max(m.signal - current.signal, score_eps), d_ai, -rank)
                if best is None or real > best[0]:
                    best = (real, group, new, m, est_loss)
            if best is not None or stopped_by:
                chosen = best
                break
        if chosen is None:
            break
        _, group, new, m, est_loss = chosen
        from_bits = config[group]
        config, current, ai = new, m, ai_of(new)
        record(group, from_bits, new, m, est_loss, "verified")
        if on_accept is not None:
            on_accept(dict(config), m)
    return dict(trajectory=trajectory, config=dict(config), ai=ai, measured=current,
                evaluations=cache.count - start_count, steps=len(trajectory) - 1, stopped_by=stopped_by,
                pruned_moves=len(pruned.bound), infeasible_evaluations=infeasible_seen, skipped_moves=skipped)


def audit_pruning(skipped, evaluate, budget: Budget, k: int, seed: int = 0) -> dict:
    """How often a move the pruning rule skipped would have held the budget: `k` of the greedy's
    skipped moves (a seeded sample), each measured from the configuration where it was skipped."""
    rng = np.random.default_rng(seed)
    picks = rng.permutation(len(skipped))[:k] if skipped else []
    held = []
    for i in picks:
        config, group, bits = skipped[i]
        m = evaluate({**config, group: bits})
        held.append(budget.holds(m.drop, m.se))
    return {"skipped": len(skipped), "checked": len(held), "would_have_held": int(sum(held))}


def verify_frontier(frontier, evaluate, budget: Budget, ai_of, max_evaluations: int = 24, seed_config=None) -> dict:
    """The highest-AI frontier point that real evaluation keeps within budget.

    Along the frontier the estimate and the AI rise together, and the real drop tends to rise with
    the estimate, so feasibility is close to monotone: bisecting between a known-feasible point
    (at first all-float, which is not on the list) and the end finds the boundary in about log2(n)
    evaluations. When ``seed_config`` (e.g. the greedy's answer, feasible by construction) is
    given, the first frontier point with at least its AI is verified first and, if feasible,
    becomes the lower end. If no non-float frontier point was verified feasible, the scan goes on
    up from the float end until one is, within the evaluation budget. The answer is the highest-AI
    feasible configuration verified, never below the seed's AI; all-float only when nothing
    narrower held, and the result says why.
    """
    frontier = sorted(frontier, key=lambda p: (p.est, -p.bytes))
    if not frontier:
        raise ValueError("verify_frontier needs a non-empty frontier")
    cache = evaluate if isinstance(evaluate, EvalCache) else EvalCache(evaluate)
    start_count = cache.count
    verified, notes = [], []
    is_float = [all(o == FLOAT_BITS for o in p.config.values()) for p in frontier]

    def check(i):
        done = next((v for v in verified if v["index"] == i), None)
        if done is not None:
            return done["feasible"]
        p = frontier[i]
        if p.config not in cache and cache.count - start_count >= max_evaluations:
            return None
        m = cache(p.config)
        ok = budget.holds(m.drop, m.se)
        verified.append(dict(config=dict(p.config), est=p.est, ai=ai_of(p.config), measured=m, feasible=ok, index=i))
        return ok

    lo, hi = -1, len(frontier)   # frontier[lo] known feasible (-1: only all-float), frontier[hi] infeasible
    if seed_config is not None:
        seed_ai = ai_of(seed_config)
        i = next((j for j, p in enumerate(frontier) if ai_of(p.config) >= seed_ai), None)
        if i is not None:
            ok = check(i)
            if ok:
                lo = i
            elif ok is False:
                hi = len(frontier)   # no monotone conclusion from one point off the greedy's path
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ok = check(mid)
        if ok is None:
            notes.append(f"the evaluation budget ({max_evaluations}) ran out before the bisection converged")
            break
        lo, hi = (mid, hi) if ok else (lo, mid)
    if not any(v["feasible"] and not is_float[v["index"]] for v in verified):
        done = {v["index"] for v in verified}
        for i in range(len(frontier)):   # keep verifying up from the float end
            if i in done or is_float[i]:
                continue
            ok = check(i)
            if ok is None:
                notes.append("the evaluation budget ran out before a feasible non-float frontier point was found")
                break
            if ok:
                break

    feasible = [v for v in verified if v["feasible"] and not is_float[v["index"]]]
    best = max(feasible, key=lambda v: (v["ai"], v["measured"].acc)) if feasible else None
    out = {"config": None, "ai": None, "measured": None, "est": None, "source": None}
    if best is not None:
        out.update(config=best["config"], ai=best["ai"], measured=best["measured"], est=best["est"], source="frontier")
    seed_m = None
    if seed_config is not None and (seed_config in cache or cache.count - start_count < max_evaluations):
        seed_m = cache(seed_config)
    if seed_m is not None and budget.holds(seed_m.drop, seed_m.se) and (best is None or ai_of(seed_config) > best["ai"]):
        out.update(config=dict(seed_config), ai=ai_of(seed_config), measured=seed_m, est=None, source="seed")
        notes.append("no verified frontier point reached the seed (greedy) configuration's AI, so it is the answer")
    if out["config"] is None:
        notes.append(f"none of the {sum(not f for f in is_float)} non-float frontier points verified "
                     f"({sum(not is_float[v['index']] for v in verified)}) held the budget")
    out.update(evaluations=cache.count - start_count, verified=verified, note="; ".join(notes) or None)
    return out


def most_accurate_above(frontier, min_ai: float, evaluate, ai_of, max_evaluations: int = 24) -> dict:
    """The most accurate configuration with at least `min_ai`, as far as real evaluation shows: the frontier is
    sorted by estimate, with the AI rising along it, so its points with AI >= min_ai are a suffix, and the first
    `max_evaluations` of them (the smallest estimates that reach the AI) are evaluated; the one with the highest
    measured accuracy is the answer (the higher AI on ties). No budget: this is the start of a fine-tune that
    has to win the accuracy back (stage 4), not a post-training answer."""
    eligible = sorted((p for p in frontier if ai_of(p.config) >= min_ai), key=lambda p: (p.est, -p.bytes))
    out = {"config": None, "ai": None, "measured": None, "est": None, "source": "min-ai", "verified": [],
           "eligible": len(eligible), "evaluations": 0, "note": None}
    if not eligible:
        out["note"] = f"no configuration of the search space reaches AI {min_ai:.4g}"
        return out
    cache = evaluate if isinstance(evaluate, EvalCache) else EvalCache(evaluate)
    start_count = cache.count
    for p in eligible[:max(1, max_evaluations)]:
        out["verified"].append(dict(config=dict(p.config), est=p.est, ai=ai_of(p.config), measured=cache(p.config),
                                    feasible=None))
    best = max(out["verified"], key=lambda v: (v["measured"].acc, v["ai"]))
    out.update(config=best["config"], ai=best["ai"], measured=best["measured"], est=best["est"],
               evaluations=cache.count - start_count)
    return out
