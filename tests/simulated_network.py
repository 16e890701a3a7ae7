"""Simulated networks whose true (population) drops are known exactly, for the budget simulations of
tests/test_budget.py and benchmarks/budget_simulation.py (which import this module; it is test and
benchmark code, not part of the quantization core).

Eight weight groups with widths 8, 4 and 2 bits. Each (group, width) has a true drop of its own in
points (8 bits: 0-0.06, 4 bits: 0.05-0.5, 2 bits: 0.8-4) and a flip rate ``3 * drop + 0.005``
(fractions); the float model is right on an image with probability 0.9. Two structures decide which
images a configuration flips:

* ``shared``: one latent per image, shared by all groups. A configuration with total drop d (the
  sum over its groups) and flip rate f = 3 d + 0.005 * (quantized groups) flips a right image iff
  u_i < (f + d) / 2 / 0.9 and a wrong one iff v_i < (f - d) / 2 / 0.1: configurations with more
  loss flip supersets of images (nested across *all* configurations), the kindest case for the
  winner's curse.
* ``independent``: each group has its own latent per image, independent of other groups'. Group g
  at width w flips a right image iff U[g, i] < a[g, w] and a wrong one iff U[g, i] < b[g, w] (from
  the group's drop and flip rate as above), with thresholds growing as the width narrows, so a
  group's narrower widths damage supersets of its wider widths' images (nested within a group) but
  different groups' sets are independent. A configuration flips the union over its groups:
  P(right -> wrong) = 1 - prod_g (1 - a[g, w_g]) = L, P(wrong -> right) = 1 - prod_g (1 - b[g, w_g])
  = G, so its true drop is 0.9 L - 0.1 G and its flip rate 0.9 L + 0.1 G, exactly. Selection now
  profits from noise that differs between groups: the harsher structure.

Per seed, one validation set is drawn and cut into a search split (the first ``search_size``
images) and a confirm split (the rest), so the old single-split search (5,000 images) and the new
3,000 + 2,000 split see the same images. The test (report) set is not drawn: its drop is a mean of
per-image differences with mean d and variance f - d^2, so P(report drop > budget) is computed with
the normal approximation from the exact d and f.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from quant.confirm import (CONFIRM_Z, chain_parts, confirm_chain, confirm_sequence, greedy_sequence,
                           pareto_sequence, thin_sequence)
from quant.confirm import confirm_z as bonferroni_z
from quant.search import Measured, greedy_search, pareto_frontier, verify_frontier
from quant.stats import Budget
from quant.widths import FLOAT_BITS, W

REPO = Path(__file__).resolve().parent.parent
N_LAYERS = 8
W_LADDER = (8, 4, 2)
NAMES = [f"layer{i}" for i in range(N_LAYERS)]
GROUPS = [(W, n) for n in NAMES]       # weight groups only: the simulated search narrows weights
PARAMS = dict(zip(GROUPS, [432, 2304, 2304, 4608, 9216, 9216, 18432, 36864]))
MAX_DROP = 1.0                          # points
FLOAT_ACC = 0.9
STRUCTURES = ("shared", "independent")

# The pipeline's sizes: the 5,000 validation images split 3:2 into search and confirm; the test set
# the answer is reported on has 10,000.
SEARCH_SIZE = 3000
CONFIRM_SIZE = 2000
VAL_SIZE = SEARCH_SIZE + CONFIRM_SIZE
REPORT_SIZE = 10000
SCORE_EPS = 0.005

FLOAT_CONFIG = {g: FLOAT_BITS for g in GROUPS}
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


def phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def measured_from_counts(lost: int, gained: int, n: int, acc: float) -> Measured:
    """quant.stats.paired_drop's drop and SE from the counts alone (tests check they agree)."""
    d = (lost - gained) / n
    var = max(0.0, (lost + gained) / n - d * d) * n / max(n - 1, 1)
    drop = 100.0 * d
    return Measured(acc, drop, 100.0 * math.sqrt(var / n), drop)


def exceedance(d: float, f: float, n: int, max_drop: float = MAX_DROP) -> float:
    """P(the paired drop on n fresh images exceeds max_drop points), normal approximation with the
    true drop d and flip rate f (fractions): per-image difference mean d, variance f - d^2."""
    sd = 100 * math.sqrt(max(f - d * d, 0.0) / n)
    if sd == 0:
        return 0.0 if 100 * d <= max_drop else 1.0
    return 1.0 - phi((max_drop - 100 * d) / sd)


def bytes_of(group, bits):
    return PARAMS[group] * bits / 8


def ai_of(config):
    return 1.0 / sum(PARAMS[g] * b for g, b in config.items())


FLOAT_AI = ai_of(FLOAT_CONFIG)


class SimulatedNetwork:
    """One simulated network of ``structure`` with its validation images (``n_images``), cut into
    ``splits`` = {name: (start, stop)}. ``truth(config)`` is exact; ``evaluate(config, split)``
    measures on a split as the pipeline would (paired against the float model)."""

    def __init__(self, structure: str, seed: int, n_images: int = VAL_SIZE, splits: dict | None = None):
        if structure not in STRUCTURES:
            raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")
        self.structure = structure
        ss = np.random.SeedSequence([int(seed)])
        truth_rng = np.random.default_rng(ss.spawn(1)[0])    # the same group truths for both structures
        rng = np.random.default_rng([int(seed), STRUCTURES.index(structure) + 1])
        self.group_drop = {}          # (group, width) -> true drop alone, fraction
        for w, (lo, hi) in zip(W_LADDER, [(0.0, 0.06), (0.05, 0.5), (0.8, 4.0)]):
            for g in GROUPS:
                self.group_drop[g, w] = truth_rng.uniform(lo, hi) / 100
        self.c = rng.random(n_images) < FLOAT_ACC
        self.splits = splits or {"all": (0, n_images)}
        self._index = {}
        if structure == "shared":
            self.u = rng.random(n_images)
            self.v = rng.random(n_images)
            for name, (a, b) in self.splits.items():
                c = self.c[a:b]
                self._index[name] = (np.sort(self.u[a:b][c]), np.sort(self.v[a:b][~c]), b - a, int(c.sum()))
        else:
            self.U = rng.random((N_LAYERS, n_images))
            # Per group: thresholds on its latent for right and wrong images, nested across widths
            # (cumulative maximum from the widest width to the narrowest).
            self.a = np.zeros((N_LAYERS, len(W_LADDER)))
            self.b = np.zeros((N_LAYERS, len(W_LADDER)))
            for gi, g in enumerate(GROUPS):
                for wi, w in enumerate(W_LADDER):
                    d = self.group_drop[g, w]
                    f = 3 * d + 0.005
                    self.a[gi, wi] = (f + d) / 2 / FLOAT_ACC
                    self.b[gi, wi] = (f - d) / 2 / (1 - FLOAT_ACC)
            self.a = np.maximum.accumulate(self.a, axis=1)
            self.b = np.maximum.accumulate(self.b, axis=1)
            for name, (a, b) in self.splits.items():
                c = self.c[a:b]
                # Per (group, width): the images it flips, as packed bit sets over the split's right
                # and wrong images; a configuration's flips are the OR over its groups.
                Ur, Uw = self.U[:, a:b][:, c], self.U[:, a:b][:, ~c]
                R = np.packbits(Ur[:, None, :] < self.a[:, :, None], axis=-1)
                G = np.packbits(Uw[:, None, :] < self.b[:, :, None], axis=-1)
                self._index[name] = (R, G, b - a, int(c.sum()))
        self._truth = {}

    def _widths(self, config):
        """Indices (group, width) of the configuration's quantized groups."""
        q = [(gi, W_LADDER.index(config[g])) for gi, g in enumerate(GROUPS) if config[g] != FLOAT_BITS]
        return np.array([x for x, _ in q], dtype=np.intp), np.array([y for _, y in q], dtype=np.intp)

    def _thresholds(self, config):
        """Per group: (a, b) thresholds of the configuration's width (0 for float)."""
        a = np.zeros(N_LAYERS)
        b = np.zeros(N_LAYERS)
        for gi, g in enumerate(GROUPS):
            bits = config[g]
            if bits != FLOAT_BITS:
                wi = W_LADDER.index(bits)
                a[gi], b[gi] = self.a[gi, wi], self.b[gi, wi]
        return a, b

    def _shared_probs(self, config):
        q = [(g, bits) for g, bits in config.items() if bits != FLOAT_BITS]
        d = sum(self.group_drop[k] for k in q)
        f = 3 * d + 0.005 * len(q)
        return min(1.0, (f + d) / 2 / FLOAT_ACC), min(1.0, (f - d) / 2 / (1 - FLOAT_ACC))

    def flip_probs(self, config):
        """(P(right -> wrong | right), P(wrong -> right | wrong)), exact."""
        if self.structure == "shared":
            return self._shared_probs(config)
        a, b = self._thresholds(config)
        return 1.0 - float(np.prod(1.0 - a)), 1.0 - float(np.prod(1.0 - b))

    def truth(self, config):
        """(true drop d, true flip rate f), fractions: population values (expectations over images)."""
        key = tuple(config[g] for g in GROUPS)
        t = self._truth.get(key)
        if t is None:
            pl, pg = self.flip_probs(config)
            t = self._truth[key] = (FLOAT_ACC * pl - (1 - FLOAT_ACC) * pg, FLOAT_ACC * pl + (1 - FLOAT_ACC) * pg)
        return t

    def correct(self, config, split="all"):
        """Per-image correctness of the configuration on a split (boolean array)."""
        s, e = self.splits[split]
        c = self.c[s:e]
        if self.structure == "shared":
            pl, pg = self._shared_probs(config)
            return np.where(c, self.u[s:e] >= pl, self.v[s:e] < pg)
        a, b = self._thresholds(config)
        U = self.U[:, s:e]
        return np.where(c, ~(U < a[:, None]).any(0), (U < b[:, None]).any(0))

    def counts(self, config, split):
        """(lost, gained, n, float-correct) on a split."""
        r, w, n, nc = self._index[split]
        if self.structure == "shared":
            pl, pg = self._shared_probs(config)
            return int(np.searchsorted(r, pl)), int(np.searchsorted(w, pg)), n, nc
        gi, wi = self._widths(config)
        if len(gi) == 0:
            return 0, 0, n, nc
        lost = _POPCOUNT[np.bitwise_or.reduce(r[gi, wi], axis=0)].sum()
        gained = _POPCOUNT[np.bitwise_or.reduce(w[gi, wi], axis=0)].sum()
        return int(lost), int(gained), n, nc

    def evaluate(self, config, split) -> Measured:
        lost, gained, n, nc = self.counts(config, split)
        return measured_from_counts(lost, gained, n, 100.0 * (nc - lost + gained) / n)


def run_trial(structure: str, seed: int, z_search: float, search_size: int = SEARCH_SIZE,
              confirm_size: int = CONFIRM_SIZE, confirm_z: float = CONFIRM_Z, report_size: int = REPORT_SIZE,
              max_drop: float = MAX_DROP, confirm_step: float = 0.0, rule: str = "greedy") -> dict:
    """Stage 2 (each group alone) and the project's greedy_search with Budget(max_drop, z_search) on
    the search split, then (confirm_size > 0) confirm_sequence on the greedy's trajectory, thinned to
    ``confirm_step`` (stage 3's ``--confirm-step``), on the confirm split. ``confirm_size`` 0 is the old
    pipeline: the search's answer is accepted as is.

    ``rule`` "greedy" confirms the greedy's list alone at ``confirm_z``; "chain" and "bonferroni" also run stage
    3's Pareto search (seeded by the greedy's answer, its verified frontier points as its list) and confirm both
    lists: as one chain at ``confirm_z`` (quant.confirm.confirm_chain, the Pareto part above the greedy's last
    AI), or each at 2.5% (z 1.96, quant.confirm.confirm_z(2); ``confirm_z`` unused), keeping the higher-AI answer.

    Returns the accepted configuration with its exact true drop (points), whether that exceeds the
    budget, P(drop on a fresh report set of ``report_size`` > budget), P(drop on a fresh split of
    the search split's size > budget) (the old promise), AI gains over float, and the counts."""
    net = SimulatedNetwork(structure, seed, search_size + confirm_size,
                           {"search": (0, search_size), "confirm": (search_size, search_size + confirm_size)})
    est = {(g, w): net.evaluate({**FLOAT_CONFIG, g: w}, "search").drop for g in GROUPS for w in W_LADDER}
    budget = Budget(max_drop, z_search)
    g = greedy_search({grp: W_LADDER for grp in GROUPS}, bytes_of, lambda grp, b: est[grp, b],
                      lambda cfg: net.evaluate(cfg, "search"), budget, score_eps=SCORE_EPS, ai_of=ai_of)
    search_config = g["config"]
    sequence = thin_sequence(greedy_sequence(g, FLOAT_CONFIG), ai_of, confirm_step)
    if confirm_size > 0 and rule != "greedy":
        accepted, index, confirm_evals = _confirm_both(net, g, est, budget, sequence, rule, max_drop, confirm_z,
                                                       confirm_step)
    elif confirm_size > 0:
        c = confirm_sequence(sequence, lambda cfg: net.evaluate(cfg, "confirm"), max_drop, confirm_z)
        accepted = c["config"] if c["config"] is not None else dict(FLOAT_CONFIG)
        index, confirm_evals = c["accepted"], c["evaluations"]
    else:
        accepted, index, confirm_evals = search_config, len(sequence) - 1, 0
    d, f = net.truth(accepted)
    sd, _ = net.truth(search_config)
    return dict(structure=structure, seed=seed, z_search=z_search, confirm_step=confirm_step, config=accepted, true_drop=100 * d, flip_rate=f,
                over=100 * d > max_drop, report_exceed=exceedance(d, f, report_size, max_drop),
                fresh_exceed=exceedance(d, f, search_size, max_drop),
                ai_gain=ai_of(accepted) / FLOAT_AI, search_ai_gain=ai_of(search_config) / FLOAT_AI,
                search_true_drop=100 * sd, sequence_length=len(sequence), accepted_index=index,
                cut_back=ai_of(accepted) < ai_of(search_config), confirm_evaluations=confirm_evals,
                search_evaluations=g["evaluations"])


def _confirm_both(net, g, est, budget, greedy_seq, rule, max_drop, confirm_z, confirm_step):
    """Stage 3's Pareto search after the greedy, then both lists confirmed under `rule`: (accepted configuration,
    its index in the greedy's list or -1 if it came from Pareto's or is float, confirm evaluations)."""
    options = {grp: [(FLOAT_BITS, bytes_of(grp, FLOAT_BITS), 0.0)] + [(w, bytes_of(grp, w), est[grp, w]) for w in W_LADDER]
               for grp in GROUPS}
    search = lambda cfg: net.evaluate(cfg, "search")   # noqa: E731
    p = verify_frontier(pareto_frontier(options), search, budget, ai_of, 24, seed_config=g["config"])
    pareto_seq = pareto_sequence({**p, "config": p["config"] or dict(FLOAT_CONFIG)}, ai_of)
    confirm = lambda cfg: net.evaluate(cfg, "confirm")   # noqa: E731
    if rule == "chain":   # greedy_seq is thinned already; thinning it again keeps it as it is
        gc, pc = confirm_chain(chain_parts(greedy_seq, pareto_seq, ai_of, confirm_step), confirm, max_drop, confirm_z)
        evals = gc["evaluations"] + pc["evaluations"]
    elif rule == "bonferroni":
        z2 = bonferroni_z(2)
        gc = confirm_sequence(greedy_seq, confirm, max_drop, z2)
        pc = confirm_sequence(thin_sequence(pareto_seq, ai_of, confirm_step), confirm, max_drop, z2)
        evals = gc["evaluations"] + pc["evaluations"]
    else:
        raise ValueError(f"rule must be greedy, chain or bonferroni, got {rule!r}")
    best = max((c for c in (gc, pc) if c["config"] is not None), key=lambda c: ai_of(c["config"]), default=None)
    if best is None:
        return dict(FLOAT_CONFIG), -1, evals
    return dict(best["config"]), gc["accepted"] if best is gc else -1, evals


def summarize(trials) -> dict:
    """Means over trials with Monte Carlo standard errors of the two rates."""
    n = len(trials)
    over = np.array([t["over"] for t in trials], dtype=float)
    rep = np.array([t["report_exceed"] for t in trials])
    fresh = np.array([t["fresh_exceed"] for t in trials])
    return dict(seeds=n, p_true_over=float(over.mean()), p_true_over_se=float(over.std(ddof=1) / math.sqrt(n)),
                report_exceed=float(rep.mean()), report_exceed_se=float(rep.std(ddof=1) / math.sqrt(n)),
                fresh_exceed=float(fresh.mean()), fresh_exceed_se=float(fresh.std(ddof=1) / math.sqrt(n)),
                ai_gain=float(np.mean([t["ai_gain"] for t in trials])),
                search_ai_gain=float(np.mean([t["search_ai_gain"] for t in trials])),
                true_drop=float(np.mean([t["true_drop"] for t in trials])),
                cut_back=float(np.mean([t["cut_back"] for t in trials])),
                confirm_evaluations=float(np.mean([t["confirm_evaluations"] for t in trials])),
                search_evaluations=float(np.mean([t["search_evaluations"] for t in trials])),
                float_answers=float(np.mean([t["ai_gain"] == 1.0 for t in trials])))
