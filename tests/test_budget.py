"""Tests of quant/stats.py: intervals, paired drops, the budget rule, and whether the budget rule
keeps its promise out of sample on a simulated model whose true drops are known."""
import math

import numpy as np
import pytest
import torch

from quant.search import Measured, greedy_search
from quant.stats import (BUDGET_Z, FEASIBILITY_TOL, Z95, Budget, PairedDrop, bootstrap_drop_interval,
                         paired_drop, wilson_interval)
from quant.widths import FLOAT_BITS, W


# ---------------------------------------------------------------- wilson_interval

def test_wilson_interval_known_value():
    """90 of 100 correct: the 95% Wilson interval is about [82.6, 94.5] percent (hand computation:
    centre (0.9 + z^2/200) / (1 + z^2/100), half-width z sqrt(0.0009 + z^2/40000) / (1 + z^2/100))."""
    lo, hi = wilson_interval(90, 100)
    z = Z95
    denom = 1 + z * z / 100
    centre = (0.9 + z * z / 200) / denom
    half = z * math.sqrt(0.9 * 0.1 / 100 + z * z / 40000) / denom
    assert lo == pytest.approx(100 * (centre - half), abs=1e-9)
    assert hi == pytest.approx(100 * (centre + half), abs=1e-9)
    assert lo == pytest.approx(82.56, abs=0.01) and hi == pytest.approx(94.48, abs=0.01)


def test_wilson_interval_edges():
    """k = 0 starts at 0 and k = n ends at 100, each with a non-zero width (about 3.7 points at n =
    100); no images gives the uninformative [0, 100]; the interval is symmetric under k -> n - k."""
    lo, hi = wilson_interval(0, 100)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(3.70, abs=0.01)
    lo, hi = wilson_interval(100, 100)
    assert lo == pytest.approx(96.30, abs=0.01) and hi == pytest.approx(100.0, abs=1e-12)
    assert wilson_interval(0, 0) == [0.0, 100.0]
    for k in (0, 3, 37, 50, 99):
        a, b = wilson_interval(k, 100)
        c, d = wilson_interval(100 - k, 100)
        assert a == pytest.approx(100 - d, abs=1e-9) and b == pytest.approx(100 - c, abs=1e-9)
        assert -1e-12 <= a <= k + 1e-12 and k <= b <= 100.0


def test_wilson_interval_narrows_with_more_images():
    """The same accuracy measured on more images has a narrower interval that still contains it."""
    widths = []
    for n in (100, 1000, 10000):
        lo, hi = wilson_interval(9 * n // 10, n)
        assert lo < 90.0 < hi
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]


# ---------------------------------------------------------------- paired_drop

REF = [1, 1, 1, 1, 1, 1, 1, 0, 0, 0]
CAND = [1, 1, 0, 1, 1, 0, 1, 1, 0, 0]   # loses images 2 and 5, gains image 7


def test_paired_drop_hand_computation():
    """10 images, 2 lost and 1 gained: drop = (2 - 1) / 10 = 10 points; the per-image differences
    are +1, +1, -1 and seven zeros, sample variance (3 - 10 * 0.1^2) / 9, so
    SE = 100 * sqrt(variance / 10) = 17.95 points."""
    p = paired_drop(REF, CAND)
    assert (p.lost, p.gained, p.n) == (2, 1, 10)
    assert p.drop == pytest.approx(10.0)
    assert p.se == pytest.approx(100 * math.sqrt((3 - 10 * 0.01) / 9 / 10))
    assert p.se == pytest.approx(17.951, abs=1e-3)


@pytest.mark.parametrize("kind", ["list", "numpy", "torch"])
def test_paired_drop_input_types(kind):
    """Bool lists, numpy arrays and torch tensors give the same PairedDrop."""
    conv = {"list": lambda x: [bool(v) for v in x], "numpy": lambda x: np.array(x, dtype=bool),
            "torch": lambda x: torch.tensor(x, dtype=torch.bool)}[kind]
    assert paired_drop(conv(REF), conv(CAND)) == paired_drop(REF, CAND)


def test_paired_drop_se_is_the_sample_sd_of_per_image_differences():
    """On random data, SE equals the sample standard deviation (ddof 1) of the per-image
    differences ref_i - cand_i over sqrt(n), in points, and drop is their mean."""
    rng = np.random.default_rng(0)
    ref = rng.random(3000) < 0.9
    cand = np.where(rng.random(3000) < 0.05, ~ref, ref)
    p = paired_drop(ref, cand)
    d = ref.astype(float) - cand.astype(float)
    assert p.drop == pytest.approx(100 * d.mean())
    assert p.se == pytest.approx(100 * d.std(ddof=1) / math.sqrt(len(d)))
    assert p.lost == int((ref & ~cand).sum()) and p.gained == int((~ref & cand).sum())


def test_paired_drop_no_flips_and_bad_shapes():
    """A candidate identical to the reference has drop 0 and SE 0 (whatever its accuracy); arrays
    of different lengths are refused."""
    p = paired_drop(REF, REF)
    assert (p.drop, p.se, p.lost, p.gained) == (0.0, 0.0, 0, 0)
    with pytest.raises(ValueError):
        paired_drop(REF, CAND[:-1])


# ---------------------------------------------------------------- bootstrap_drop_interval

def test_bootstrap_interval_contains_the_estimate_and_is_deterministic():
    """The percentile interval contains the point estimate, is the same for the same seed, and a
    lower level gives a narrower interval."""
    p = paired_drop(REF * 50, CAND * 50)
    a = bootstrap_drop_interval(p, seed=3)
    assert a[0] <= p.drop <= a[1]
    assert bootstrap_drop_interval(p, seed=3) == a
    b = bootstrap_drop_interval(p, level=0.5, seed=3)
    assert a[0] <= b[0] <= p.drop <= b[1] <= a[1] and b[1] - b[0] < a[1] - a[0]


def test_bootstrap_interval_without_flips_is_zero():
    """Nothing flips: every resample has drop 0, so the interval is [0, 0]."""
    assert bootstrap_drop_interval(paired_drop(REF, REF)) == [0.0, 0.0]


def test_bootstrap_interval_matches_normal_for_large_n():
    """n = 10,000 with 300 lost and 100 gained images: drop 2 points; the bootstrap interval is
    about drop +- 1.96 * SE (within 0.05 points at each end)."""
    q = paired_drop(np.r_[np.ones(300, bool), np.zeros(100, bool), np.ones(9600, bool)],
                    np.r_[np.zeros(300, bool), np.ones(100, bool), np.ones(9600, bool)])
    assert (q.lost, q.gained, q.n) == (300, 100, 10000) and q.drop == pytest.approx(2.0)
    assert isinstance(q, PairedDrop)
    lo, hi = bootstrap_drop_interval(q, seed=1)
    assert lo == pytest.approx(q.drop - Z95 * q.se, abs=0.05)
    assert hi == pytest.approx(q.drop + Z95 * q.se, abs=0.05)


# ---------------------------------------------------------------- Budget

def test_budget_rule():
    """Feasible iff drop + z * se <= max_drop (boundary included, within FEASIBILITY_TOL); z = 0 is
    the plain 'drop within budget'; the default z is BUDGET_Z = 1.645 * sqrt(2)."""
    b = Budget(1.0, 2.5)
    assert b.holds(0.5, 0.2)                            # exactly on the boundary
    assert b.holds(0.5, 0.2 + 0.4 * FEASIBILITY_TOL)
    assert not b.holds(0.5, 0.2001)
    assert not b.holds(1.0 + 1e-6, 0.0)
    assert b.holds(-0.3, 0.5)
    assert Budget(1.0, 0.0).holds(1.0, 100.0) and not Budget(1.0, 0.0).holds(1.01, 0.0)
    assert Budget(1.0).z == BUDGET_Z == pytest.approx(1.6448536 * math.sqrt(2))
    assert Budget(1.0).holds(1.0 - BUDGET_Z * 0.1, 0.1) and not Budget(1.0).holds(1.0 - BUDGET_Z * 0.1, 0.1001)
    j = Budget(0.5, 1.0).to_json()
    assert j["max_drop"] == 0.5 and j["z"] == 1.0 and "rule" in j


# ---------------------------------------------------------------- the budget out of sample, on a simulated model

N_IMAGES = 5000                 # images of the search split, and of a fresh split of the same size
N_LAYERS = 8
W_LADDER = (8, 4, 2)
NAMES = [f"layer{i}" for i in range(N_LAYERS)]
GROUPS = [(W, n) for n in NAMES]       # weight groups only: the simulated search narrows weights
PARAMS = dict(zip(GROUPS, [432, 2304, 2304, 4608, 9216, 9216, 18432, 36864]))
MAX_DROP = 1.0
FLOAT_ACC = 0.9


def _phi(x):
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


class SimulatedModel:
    """A model whose true drops are known, evaluated on a finite split.

    Each (weight group, width) has a true drop in points (8 bits: 0-0.06, 4 bits: 0.05-0.5, 2 bits:
    0.8-4); a configuration's true drop d (a fraction) is their sum, and its total flip rate is
    f = 3 d + 0.005 * (quantized layers). Image i of a split has float-correctness c_i ~
    Bernoulli(0.9) and uniform latents u_i, v_i, shared by all configurations (so neighbouring
    configurations flip nested sets of images, as a real network's do): it flips right -> wrong
    iff c_i and u_i < (f + d) / 2 / 0.9, wrong -> right iff not c_i and v_i < (f - d) / 2 / 0.1.
    Expected lost fraction (f + d) / 2, gained (f - d) / 2: drop d, flip rate f."""

    def __init__(self, seed):
        rng = np.random.default_rng(seed)
        self.true = {(g, 8): rng.uniform(0.0, 0.06) for g in GROUPS}
        self.true.update({(g, 4): rng.uniform(0.05, 0.5) for g in GROUPS})
        self.true.update({(g, 2): rng.uniform(0.8, 4.0) for g in GROUPS})
        self.c = rng.random(N_IMAGES) < FLOAT_ACC
        self.u = rng.random(N_IMAGES)
        self.v = rng.random(N_IMAGES)

    def truth(self, config):
        """(true drop d, true flip rate f), both fractions."""
        q = [(g, b) for g, b in config.items() if b != FLOAT_BITS]
        d = sum(self.true[k] for k in q) / 100
        return d, 3 * d + 0.005 * len(q)

    def correct(self, config):
        d, f = self.truth(config)
        p_lose = min(1.0, (f + d) / 2 / FLOAT_ACC)
        p_gain = min(1.0, (f - d) / 2 / (1 - FLOAT_ACC))
        return np.where(self.c, self.u >= p_lose, self.v < p_gain)

    def evaluate(self, config) -> Measured:
        cand = self.correct(config)
        p = paired_drop(self.c, cand)
        return Measured(100.0 * cand.mean(), p.drop, p.se, p.drop)

    def fresh_exceedance(self, config, max_drop=MAX_DROP):
        """P(the drop on a fresh split of N_IMAGES exceeds max_drop), normal approximation with the
        known d and f: the per-image difference has mean d and variance f - d^2."""
        d, f = self.truth(config)
        sd = 100 * math.sqrt(max(f - d * d, 0.0) / N_IMAGES)
        if sd == 0:
            return 0.0 if 100 * d <= max_drop else 1.0
        return 1.0 - _phi((max_drop - 100 * d) / sd)


def _bytes_of(group, bits):
    return PARAMS[group] * bits / 8


def _ai_of(config):
    return 1.0 / sum(PARAMS[g] * b for g, b in config.items())


def search_on_simulated_model(seed, z):
    """Stage 2 (each layer alone, on the search split) then the real greedy_search (defaults:
    fast-forward, pruning, top-3 verification) with Budget(MAX_DROP, z) on the same split.
    Returns the chosen config and its fresh-split exceedance probability."""
    m = SimulatedModel(seed)
    fl = {g: FLOAT_BITS for g in GROUPS}
    est = {(g, w): m.evaluate({**fl, g: w}).drop for g in GROUPS for w in W_LADDER}
    g = greedy_search({grp: W_LADDER for grp in GROUPS}, _bytes_of, lambda grp, b: est[grp, b], m.evaluate,
                      Budget(MAX_DROP, z), score_eps=0.005, ai_of=_ai_of)
    assert Budget(MAX_DROP, z).holds(g["measured"].drop, g["measured"].se)
    assert set(g["config"]) == set(GROUPS)
    ai_gain = _ai_of(g["config"]) / _ai_of(fl)
    return dict(config=g["config"], p=m.fresh_exceedance(g["config"]), true_drop=100 * m.truth(g["config"])[0],
                ai_gain=ai_gain)


SEEDS_MARGIN = 100     # Monte Carlo SE of the mean exceedance about 0.008 (per-seed SD about 0.08)
SEEDS_NAIVE = 40


@pytest.fixture(scope="module")
def simulated_searches():
    return {"margin": [search_on_simulated_model(s, BUDGET_Z) for s in range(SEEDS_MARGIN)],
            "naive": [search_on_simulated_model(s, 0.0) for s in range(SEEDS_NAIVE)]}


def test_simulated_model_realizes_its_truth():
    """The simulator is what it claims: on a large split the measured drop and flip rate of a
    configuration are its true d and f (so the exceedance formula below describes it)."""
    m = SimulatedModel(0)
    m.c = np.random.default_rng(1).random(400_000) < FLOAT_ACC
    m.u, m.v = np.random.default_rng(2).random((2, 400_000))
    config = {g: (4 if i % 2 else 8) for i, g in enumerate(GROUPS)}
    d, f = m.truth(config)
    p = paired_drop(m.c, m.correct(config))
    assert p.drop == pytest.approx(100 * d, abs=0.05)
    assert (p.lost + p.gained) / p.n == pytest.approx(f, abs=0.002)
    assert p.se == pytest.approx(100 * math.sqrt((f - d * d) / p.n), rel=0.05)


def test_budget_margin_holds_out_of_sample(simulated_searches):
    """The issue's requirement: the configuration the search picks with Budget(1.0, BUDGET_Z) on a
    5,000-image search split exceeds the 1-point budget on a fresh 5,000-image split with
    probability at most about 5%, averaged over simulated models and search splits (selection by
    the greedy included). Measured: about 4.1% over 2,000 seeds (SE 0.2%); the tolerance covers
    the Monte Carlo error of SEEDS_MARGIN seeds. The margin must not make the search useless:
    it still quantizes (AI gain well above 1)."""
    runs = simulated_searches["margin"]
    p = np.array([r["p"] for r in runs])
    mc_se = p.std(ddof=1) / math.sqrt(len(p))
    assert p.mean() <= 0.05 + 0.015, (p.mean(), mc_se)
    assert np.mean([r["ai_gain"] for r in runs]) > 2.0
    assert np.mean([r["true_drop"] for r in runs]) > 0.1


def test_naive_budget_fails_out_of_sample(simulated_searches):
    """z = 0 (accept whatever is within budget on the search split) exceeds the budget on fresh
    data far more often than 5% (about 45%): the search drives the drop up to the budget and
    selects configurations that were lucky on the search split. This is what the margin fixes."""
    naive = np.array([r["p"] for r in simulated_searches["naive"]])
    margin = np.array([r["p"] for r in simulated_searches["margin"][:SEEDS_NAIVE]])
    assert naive.mean() > 0.25
    assert naive.mean() > 4 * margin.mean()


def test_bootstrap_interval_ends_are_attainable_drops():
    """Both ends are drops a resample can have (whole images: multiples of 100/n), so reports read
    -0.04, never an interpolated -0.040249999999995796."""
    n, lost, gained = 10000, 40, 25     # at level 0.9999 plain interpolation gives 0.4600004999999874
    p = paired_drop(np.r_[np.ones(lost, bool), np.zeros(gained, bool), np.ones(n - lost - gained, bool)],
                    np.r_[np.zeros(lost, bool), np.ones(gained, bool), np.ones(n - lost - gained, bool)])
    for end in bootstrap_drop_interval(p, level=0.9999, seed=0):
        k = end * p.n / 100
        assert k == pytest.approx(round(k), abs=1e-6) and end == round(end, 2)
