"""Bit-width search: choose a weight width per layer to maximize arithmetic intensity under an
accuracy-drop budget.

FLOPs do not depend on weight bits, so maximizing AI = FLOPs / bytes is the same as minimizing
total bytes. Two searches live here, both free of models and I/O so they can be tested with fakes:

* ``pareto_frontier`` + ``verify_frontier``: an exact multiple-choice-knapsack DP over an
  *additive* per-layer drop estimate, followed by real evaluation of the best frontier points.
* ``greedy_search``: the reference work's greedy, one layer narrowed per step, each step checked
  by real evaluation.

Per-layer drops are clamped at 0 before they are summed. A layer whose accuracy happened to rise
when quantized alone (evaluation noise, or mild regularization) must not earn credit that pays
for the real loss of other layers: such gains do not add up when layers are combined, and letting
them subtract would make the estimate promise configurations that are in fact over budget.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from utils.config import FLOAT_BITS

FEASIBILITY_TOL = 1e-9   # accuracy is a float; an exact hit on the budget edge must count as within
SCORE_EPS = 0.01         # points; a move estimated (or measured) free must not divide by zero
DROP_RESOLUTION = 1e-9   # points; drop sums are compared as integers of this unit


def clamp_drop(drop: float) -> float:
    """Per-layer drop as the additive estimate uses it (see module docstring for why >= 0)."""
    return max(0.0, float(drop))


def _drop_key(drop: float, resolution: float) -> int:
    # Drops are measured as multiples of 100/N (N validation images); summing such floats in
    # different orders gives different last bits. Integer units make equal sums compare equal.
    return int(round(clamp_drop(drop) / resolution))


@dataclass
class FrontierPoint:
    config: dict          # {layer name: bits}, every layer, in layer order
    est_drop: float       # additive estimate: sum of clamped per-layer drops, in points
    bytes: float          # total weight bytes


class EvalCache:
    """Wraps ``evaluate(config) -> val accuracy (%)`` so that no configuration is evaluated twice.

    Real evaluations are the expensive part of a search (a pass over the validation set each), so
    the greedy and the frontier verification may share one cache: whatever one measured, the
    other reuses for free. ``count`` is the number of real evaluate calls (= distinct configs).
    """

    def __init__(self, evaluate: Callable[[dict], float]):
        self._evaluate = evaluate
        self._acc: dict[tuple, float] = {}
        self.count = 0

    @staticmethod
    def key(config: dict) -> tuple:
        return tuple(sorted(config.items()))

    def __contains__(self, config: dict) -> bool:
        return self.key(config) in self._acc

    def get(self, config: dict):
        return self._acc.get(self.key(config))

    def remember(self, config: dict, acc: float):
        """Record an accuracy known without evaluating (e.g. the float baseline); not counted."""
        self._acc.setdefault(self.key(config), float(acc))

    def __call__(self, config: dict) -> float:
        k = self.key(config)
        if k not in self._acc:
            self._acc[k] = float(self._evaluate(dict(config)))
            self.count += 1
        return self._acc[k]


def _as_cache(evaluate) -> EvalCache:
    return evaluate if isinstance(evaluate, EvalCache) else EvalCache(evaluate)


def pareto_frontier(options: dict, max_est_drop: float | None = None,
                    resolution: float = DROP_RESOLUTION) -> list[FrontierPoint]:
    """All non-dominated (estimated total drop, total bytes) configurations, exactly.

    ``options`` maps each layer name (in layer order) to a list of ``(bits, bytes, est_drop)``.
    Dynamic programming over layers keeps only non-dominated partial states: with both objectives
    additive, a dominated partial state can never complete into a frontier point, so pruning is
    exact. Of states with identical (drop, bytes) one is kept (the first in layer/option order),
    which loses alternative configs but no frontier value.

    ``max_est_drop`` (optional) drops states whose estimate already exceeds it; drops only grow, so
    the result is exactly the frontier restricted to est_drop <= max_est_drop, found faster.

    Bytes are summed as floats; widths x parameter counts / 8 are multiples of 1/8, exact in float.
    Returned sorted by est_drop ascending (bytes then strictly descending): first the cheapest
    zero-estimated-drop configuration, last the minimum-bytes configuration.
    """
    names = list(options)
    if not names:
        raise ValueError("pareto_frontier needs at least one layer")
    per_layer = []
    for name in names:
        opts = list(options[name])
        if not opts:
            raise ValueError(f"layer {name!r} has no width options")
        for bits, b, d in opts:
            if not (math.isfinite(float(b)) and math.isfinite(float(d))):
                raise ValueError(f"layer {name!r}, {bits} bits: bytes and drop must be finite, got {b}, {d}")
        per_layer.append(opts)
    cap = None if max_est_drop is None else _drop_key(max_est_drop, resolution)

    keys = np.zeros(1, dtype=np.int64)
    byts = np.zeros(1, dtype=np.float64)
    back = []   # per layer: (parent state index, option index) of each surviving state
    for opts in per_layer:
        ok = np.array([_drop_key(d, resolution) for _, _, d in opts], dtype=np.int64)
        ob = np.array([float(b) for _, b, _ in opts], dtype=np.float64)
        ck = (keys[:, None] + ok[None, :]).ravel()
        cb = (byts[:, None] + ob[None, :]).ravel()
        order = np.lexsort((cb, ck))          # by drop, then bytes; stable, so ties keep index order
        sb = cb[order]
        keep = np.empty(len(order), dtype=bool)
        keep[0] = True
        keep[1:] = sb[1:] < np.minimum.accumulate(sb)[:-1]   # strictly fewer bytes than all cheaper-drop states
        sel = order[keep]
        if cap is not None:
            sel = sel[ck[sel] <= cap]
            if len(sel) == 0:
                raise ValueError(f"no configuration has an estimated drop <= {max_est_drop}")
        back.append((sel // len(opts), sel % len(opts)))
        keys, byts = ck[sel], cb[sel]

    # Walk the back-pointers for all final states at once.
    n = len(keys)
    choice = np.empty((len(names), n), dtype=np.int64)
    idx = np.arange(n)
    for li in range(len(names) - 1, -1, -1):
        parent, opt = back[li]
        choice[li] = opt[idx]
        idx = parent[idx]

    bits_tab = [[int(o[0]) for o in opts] for opts in per_layer]
    drop_tab = [np.array([clamp_drop(o[2]) for o in opts]) for opts in per_layer]
    byte_tab = [np.array([float(o[1]) for o in opts]) for opts in per_layer]
    # Stated values are re-summed in layer order, as anyone recomputing them from a config would.
    est = np.zeros(n)
    tot = np.zeros(n)
    for li in range(len(names)):
        est = est + drop_tab[li][choice[li]]
        tot = tot + byte_tab[li][choice[li]]
    cols = [[bits_tab[li][j] for j in choice[li]] for li in range(len(names))]
    points = [FrontierPoint(config=dict(zip(names, (c[i] for c in cols))), est_drop=float(est[i]),
                            bytes=float(tot[i])) for i in range(n)]
    # States come out sorted by drop key with strictly falling bytes; keep that order explicit.
    order = sorted(range(n), key=lambda i: (int(keys[i]), -float(byts[i])))
    return [points[i] for i in order]


def _ai_from_bytes(layer_names, bytes_of):
    # AI = FLOPs / bytes with FLOPs fixed, so 1/bytes ranks configurations (and score ratios) the same.
    def ai_of(config):
        return 1.0 / sum(float(bytes_of(n, config[n])) for n in layer_names)
    return ai_of


def greedy_search(layer_names, ladder, bytes_of, est_drop, evaluate, baseline_acc: float,
                  max_drop: float = 1.0, verify_top_k: int = 3, ai_of=None, on_accept=None,
                  progress=None) -> dict:
    """The reference greedy: from all-float, repeatedly narrow the one layer that buys the most AI
    per point of accuracy, until no single narrowing keeps validation accuracy within budget.

    Moves are ranked by the *estimated* score (AI gained / estimated loss, the loss from the
    clamped per-layer table) because evaluating every move every step would cost one validation
    pass per (layer, width). The estimate ignores interactions, so moves are verified for real,
    ``verify_top_k`` at a time, best estimate first; within a batch the best *real* score among
    feasible moves wins. A later batch is only opened when a whole batch is infeasible, so the
    search stops exactly when every remaining move has been measured infeasible.

    ``bytes_of(name, bits)`` gives a layer's weight bytes; ``est_drop(name, bits)`` its measured
    single-layer drop; ``ai_of(config)`` the AI (default 1/total bytes, which ranks the same);
    ``evaluate(config)`` the validation accuracy in percent, or an ``EvalCache`` to share.
    ``on_accept(config)`` runs after each accepted move; ``progress(step, entry)`` gets each
    accepted trajectory entry (with the running ``evaluations`` count).
    """
    names = list(layer_names)
    index = {n: i for i, n in enumerate(names)}
    ladder = sorted({int(b) for b in ladder if int(b) != FLOAT_BITS}, reverse=True)
    if verify_top_k < 1:
        raise ValueError("verify_top_k must be >= 1")
    cache = _as_cache(evaluate)
    start_count = cache.count
    ai_of = ai_of or _ai_from_bytes(names, bytes_of)
    floor = baseline_acc - max_drop - FEASIBILITY_TOL

    def layer_drop(name, bits):
        return 0.0 if bits == FLOAT_BITS else clamp_drop(est_drop(name, bits))

    config = {n: FLOAT_BITS for n in names}
    cache.remember(config, baseline_acc)
    ai, acc, total_est = ai_of(config), float(baseline_acc), 0.0
    trajectory = [dict(step=0, layer=None, from_bits=None, bits=None, ai=ai, val_acc=acc, est_drop=0.0)]

    while True:
        moves = []
        for name in names:
            cur = config[name]
            for bits in ladder:
                if bits >= cur:
                    continue
                new = dict(config)
                new[name] = bits
                d_ai = ai_of(new) - ai
                if d_ai <= 0:       # cannot happen with monotone bytes; keeps AI strictly rising
                    continue
                est_loss = layer_drop(name, bits) - layer_drop(name, cur)
                moves.append((d_ai / max(est_loss, SCORE_EPS), d_ai, index[name], bits, name, new, est_loss))
        moves.sort(key=lambda m: (-m[0], -m[1], m[2], m[3]))

        chosen = None
        for start in range(0, len(moves), verify_top_k):
            best = None
            for rank, (_, d_ai, _, bits, name, new, est_loss) in enumerate(moves[start:start + verify_top_k]):
                new_acc = cache(new)
                if new_acc < floor:
                    continue
                real = (d_ai / max(acc - new_acc, SCORE_EPS), d_ai, -rank)
                if best is None or real > best[0]:
                    best = (real, name, bits, new, new_acc, est_loss)
            if best is not None:
                chosen = best
                break
        if chosen is None:
            break

        _, name, bits, new, new_acc, est_loss = chosen
        from_bits = config[name]
        config, acc, ai = new, new_acc, ai_of(new)
        total_est += est_loss
        entry = dict(step=len(trajectory), layer=name, from_bits=from_bits, bits=bits, ai=ai,
                     val_acc=acc, est_drop=total_est)
        trajectory.append(entry)
        if on_accept is not None:
            on_accept(dict(config))
        if progress is not None:
            progress(entry["step"], dict(entry, evaluations=cache.count - start_count))

    return dict(trajectory=trajectory, config=dict(config), ai=ai, val_acc=acc,
                evaluations=cache.count - start_count, steps=len(trajectory) - 1)


def verify_frontier(frontier, evaluate, baseline_acc: float, max_drop: float, ai_of,
                    max_evaluations: int = 10, slack: float = 2.0) -> dict:
    """The highest-AI frontier point that real evaluation keeps within budget, by bisection.

    Along the frontier, estimated drop and AI rise together, and the real drop tends to rise with
    the estimate, so feasibility is (close to) monotone along it: bisecting between the all-float
    end (feasible by definition) and the last candidate finds the boundary in about log2(n)
    evaluations, where a scan down from the top could spend the whole budget on points over
    budget. Candidates are the points estimated within ``slack`` x ``max_drop`` (the additive
    estimate is optimistic or pessimistic depending on layer interactions). The answer is the
    highest-AI feasible point verified, or all-float (accuracy = baseline, no evaluation) when
    none was. Cached accuracies (e.g. from a greedy run sharing the ``EvalCache``) cost nothing.
    """
    frontier = list(frontier)
    if not frontier:
        raise ValueError("verify_frontier needs a non-empty frontier")
    cache = _as_cache(evaluate)
    start_count = cache.count
    floor = baseline_acc - max_drop - FEASIBILITY_TOL
    names = list(frontier[0].config)
    float_cfg = {n: FLOAT_BITS for n in names}
    cache.remember(float_cfg, baseline_acc)

    limit = slack * max_drop + FEASIBILITY_TOL
    cands = sorted((p for p in frontier if p.est_drop <= limit), key=lambda p: (p.est_drop, -p.bytes))
    verified = []
    lo, hi = -1, len(cands)  # cands[lo] is known feasible (-1: all-float), cands[hi] known infeasible
    while hi - lo > 1:
        mid = (lo + hi) // 2
        p = cands[mid]
        if p.config not in cache and cache.count - start_count >= max_evaluations:
            break
        acc = cache(p.config)
        ok = acc >= floor
        verified.append(dict(config=dict(p.config), est_drop=p.est_drop, ai=ai_of(p.config), val_acc=acc,
                             feasible=ok))
        lo, hi = (mid, hi) if ok else (lo, mid)

    notes = []
    if hi - lo > 1:
        notes.append(f"the evaluation budget ({max_evaluations}) ran out before the bisection converged: "
                     f"{hi - lo - 1} frontier point(s) between the best feasible and the first infeasible one "
                     "were not verified")
    feasible = [v for v in verified if v["feasible"]]
    if feasible:
        best = max(feasible, key=lambda v: v["ai"])
        out = dict(config=best["config"], ai=best["ai"], val_acc=best["val_acc"], est_drop=best["est_drop"])
    else:
        notes.append(f"none of the {len(verified)} verified frontier points stayed within {max_drop} "
                     "points of the baseline; falling back to all-float")
        out = dict(config=float_cfg, ai=ai_of(float_cfg), val_acc=float(baseline_acc), est_drop=0.0)
    out.update(evaluations=cache.count - start_count, verified=verified, note="; ".join(notes) or None)
    return out
