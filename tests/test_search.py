"""Property tests for utils/search.py, with fake evaluators instead of models.

Options are (w, a) tuples (32 = float); evaluations return ``Measured(acc, drop, se, signal)`` and
feasibility is ``Budget.holds(drop, se)``."""
import itertools
import math
import random
import zlib

import pytest

from utils.config import FLOAT_BITS
from utils.search import (EvalCache, FrontierPoint, Measured, clamp, greedy_search, pareto_frontier,
                          verify_frontier)
from utils.stats import BUDGET_Z, Budget

BASELINE = 92.0
FLOAT = (FLOAT_BITS, FLOAT_BITS)


def h(*parts) -> float:
    """Deterministic pseudo-random number in [-1, 1] for any repr-able key."""
    return (zlib.crc32(repr(parts).encode()) % 20001) / 10000.0 - 1.0


def rkey(x):
    return round(x, 6)


def ckey(config):
    return tuple(sorted(config.items()))


# ---------------------------------------------------------------- pareto_frontier

def random_options(seed, n_layers=5, w_widths=(8, 4, 2), a_widths=(), step=0.02, allow_negative=True):
    """{layer: [((w, a), bytes, est), ...]} of a small random problem. Bytes are integers (so byte
    sums are exact in any order); estimates are multiples of `step` (0.1 or 0.0137 are not exact
    binary floats, so sums in different orders differ in the last bits), sometimes negative."""
    rng = random.Random(seed)
    options = {}
    for i in range(n_layers):
        p = rng.choice([64, 128, 256, 512, 1000]) * 8     # repeats make byte ties likely
        q = rng.choice([256, 512]) * 8
        opts = []
        for w, a in itertools.product((FLOAT_BITS,) + tuple(w_widths), (FLOAT_BITS,) + tuple(a_widths)):
            rank = sum(FLOAT_BITS - v for v in (w, a)) // 8
            est = 0.0 if (w, a) == FLOAT else rng.randint(0, 4 * rank * rank) * step
            if allow_negative and (w, a) != FLOAT and rng.random() < 0.15:
                est = -rng.randint(1, 5) * step
            opts.append(((w, a), p * w // 8 + q * a // 8, est))
        options[f"layer{i}.conv"] = opts
    return options


def recompute(options, config):
    """(sum of clamped estimates, total bytes) of a config, summed in layer order."""
    e = b = 0.0
    for name, opt in config.items():
        (o,) = [o for o in options[name] if o[0] == opt]
        e += clamp(o[2])
        b += o[1]
    return e, b


def brute_force_frontier(options):
    """Every configuration enumerated; the non-dominated (estimate, bytes) values, by definition."""
    names = list(options)
    pts = set()
    for combo in itertools.product(*(options[n] for n in names)):
        pts.add((rkey(sum(clamp(o[2]) for o in combo)), sum(o[1] for o in combo)))
    front, best = set(), math.inf
    for e, b in sorted(pts):      # by estimate, then bytes: keep strictly fewer bytes than anything cheaper
        if b < best:
            front.add((e, b))
            best = b
    return front


def check_frontier(options, front):
    """Shape, order and self-consistency of a frontier."""
    assert front
    for p in front:
        assert list(p.config) == list(options)
        e, b = recompute(options, p.config)
        assert e == pytest.approx(p.est, abs=1e-9) and b == p.bytes
        assert p.est >= 0.0
    for a, b in zip(front, front[1:]):
        assert a.est < b.est and a.bytes > b.bytes


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("step", [0.02, 0.1, 0.0137])
def test_frontier_equals_brute_force_weights_only(seed, step):
    """Weight-only options (w, 32): the DP frontier is exactly the set of non-dominated (estimate,
    bytes) values over all configurations, and each point's config recomputes to its stated est
    and bytes, also for estimates that are not exact binary floats."""
    options = random_options(seed, n_layers=5, w_widths=(8, 4, 2), step=step)
    front = pareto_frontier(options)
    check_frontier(options, front)
    assert {(rkey(p.est), p.bytes) for p in front} == brute_force_frontier(options)
    # brute force by the definition of dominance too (small enough here)
    pts = {(rkey(sum(clamp(o[2]) for o in c)), sum(o[1] for o in c)) for c in itertools.product(*options.values())}
    nondom = {p for p in pts if not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in pts)}
    assert {(rkey(p.est), p.bytes) for p in front} == nondom


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("step", [0.02, 0.1, 0.0137])
def test_frontier_equals_brute_force_joint(seed, step):
    """Joint (w, a) options, 4 layers x (3 weight widths + float) x (2 activation widths + float)
    = 12 options per layer, 20,736 configurations: the DP equals brute force."""
    options = random_options(seed, n_layers=4, w_widths=(8, 4, 2), a_widths=(8, 4), step=step)
    assert all(len(o) == 12 for o in options.values())
    front = pareto_frontier(options)
    check_frontier(options, front)
    assert {(rkey(p.est), p.bytes) for p in front} == brute_force_frontier(options)
    assert any(p.config[n][1] != FLOAT_BITS for p in front for n in options)   # activations do move


@pytest.mark.parametrize("seed", range(4))
def test_frontier_ends(seed):
    """The first point has the least possible estimate (sum of per-layer minimum clamped
    estimates), the last the least possible bytes."""
    options = random_options(seed, n_layers=7, w_widths=(8, 6, 4, 3, 2), a_widths=(8,))
    front = pareto_frontier(options)
    check_frontier(options, front)
    assert front[0].est == pytest.approx(sum(min(clamp(o[2]) for o in opts) for opts in options.values()), abs=1e-9)
    assert front[-1].bytes == sum(min(o[1] for o in opts) for opts in options.values())


def test_negative_estimates_are_clamped():
    """A layer whose estimate is negative (it 'gained' alone) counts as 0, not as a credit for
    another layer's loss: the zero-estimate point quantizes it, and no estimate is negative."""
    options = {"a": [(FLOAT, 400, 0.0), ((4, 32), 50, -0.5)],
               "b": [(FLOAT, 400, 0.0), ((4, 32), 50, 0.5)]}
    front = pareto_frontier(options)
    assert [(p.config, p.est, p.bytes) for p in front] == [
        ({"a": (4, 32), "b": FLOAT}, 0.0, 450.0), ({"a": (4, 32), "b": (4, 32)}, 0.5, 100.0)]
    assert clamp(-1.0) == 0.0 and clamp(0.25) == 0.25


@pytest.mark.parametrize("seed", range(3))
def test_max_est_gives_the_restricted_frontier(seed):
    """With max_est the result is exactly the full frontier's points with est <= max_est, for caps
    between points and exactly on a point."""
    options = random_options(seed, n_layers=8, w_widths=(8, 6, 4, 3, 2), step=0.0137)
    full = pareto_frontier(options)
    caps = [full[len(full) // 3].est, (full[len(full) // 2].est + full[len(full) // 2 + 1].est) / 2,
            full[0].est, full[-1].est + 1.0]
    for cap in caps:
        capped = pareto_frontier(options, max_est=cap)
        assert [(p.config, rkey(p.est), p.bytes) for p in capped] == \
               [(p.config, rkey(p.est), p.bytes) for p in full if p.est <= cap + 1e-9]


def test_frontier_rejects_bad_input():
    """No layers, a layer without options, a non-finite estimate or byte count, and a cap no
    configuration meets are ValueErrors."""
    with pytest.raises(ValueError):
        pareto_frontier({})
    with pytest.raises(ValueError):
        pareto_frontier({"a": []})
    with pytest.raises(ValueError):
        pareto_frontier({"a": [(FLOAT, 4.0, 0.0), ((4, 32), 1.0, float("nan"))]})
    with pytest.raises(ValueError):
        pareto_frontier({"a": [(FLOAT, 4.0, 0.0), ((4, 32), float("inf"), 0.1)]})
    with pytest.raises(ValueError):
        pareto_frontier({"a": [((8, 32), 4.0, 0.5), ((4, 32), 1.0, 0.7)]}, max_est=0.1)


def test_frontier_point_fields():
    """FrontierPoint carries config, est and bytes."""
    p = FrontierPoint(config={"a": (4, 32)}, est=0.1, bytes=2.0)
    assert (p.config, p.est, p.bytes) == ({"a": (4, 32)}, 0.1, 2.0)


def test_frontier_of_pairs_for_a_resnet20_sized_problem():
    """22 layers x (5 weight widths + float) x (3 activation widths + float) = 24 options per layer
    with continuous estimates: the DP completes and returns a sorted, non-dominated frontier whose
    points recompute (no timing assertion)."""
    rng = random.Random(0)
    options = {}
    for i in range(22):
        p, q = rng.choice([432, 2304, 4608, 9216, 18432, 36864]), rng.choice([4096, 8192, 16384])
        wd = {FLOAT_BITS: 0.0, **{w: rng.random() * 0.05 * (9 - w) ** 2 for w in (8, 6, 4, 3, 2)}}
        ad = {FLOAT_BITS: 0.0, **{a: rng.random() * 0.05 * (9 - a) ** 2 for a in (8, 6, 4)}}
        options[f"layer{i}"] = [((w, a), p * w / 8 + q * a / 8, wd[w] + ad[a]) for w, a in itertools.product(wd, ad)]
    front = pareto_frontier(options)
    assert len(front) > 100
    check_frontier(options, front)
    assert front[0].config == {n: FLOAT for n in options}
    assert front[-1].config == {n: (2, 4) for n in options}


# ---------------------------------------------------------------- fakes for the searches

class Fake:
    """A fake network: per-layer, per-coordinate drops in points (monotone: a narrower width never
    drops less), a configuration's true drop is their sum plus deterministic per-configuration
    noise (`noise` points, which breaks monotonicity), and its SE comes from a flip model
    (flip rate f = 3 d + 0.002 per quantized width, SE = 100 sqrt((f - d^2) / n), so with noise 0
    drop + z SE also only grows as widths narrow). The estimate is the per-layer drop, optionally
    off by a relative `est_error`; the measured signal is the measured drop."""

    def __init__(self, seed, n_layers=5, w_ladder=(8, 6, 4, 3, 2), a_ladder=(), noise=0.0, est_error=0.0,
                 n_images=10000, step=0.02):
        rng = random.Random(seed)
        self.names = [f"layer{i}.conv" for i in range(n_layers)]
        self.ladders = [list(w_ladder), list(a_ladder)]
        self.params = {n: rng.choice([64, 128, 256, 512, 1000]) * 8 for n in self.names}
        self.acts = {n: rng.choice([256, 512, 1024]) * 8 for n in self.names}
        self.part = {}
        for n in self.names:
            for coord, lad in enumerate(self.ladders):
                acc = 0.0
                for k, b in enumerate(sorted(lad, reverse=True)):
                    acc += rng.randint(0, 5 * (k + 1) ** 2) * step
                    self.part[n, coord, b] = acc
        self.noise, self.est_error, self.n_images = noise, est_error, n_images
        self.calls = []

    def bytes_of(self, name, opt):
        return self.params[name] * opt[0] / 8 + self.acts[name] * opt[1] / 8

    def ai_of(self, config):
        return 1.0 / sum(self.bytes_of(n, o) for n, o in config.items())

    def layer_drop(self, name, opt):
        return sum(self.part[name, c, v] for c, v in enumerate(opt) if v != FLOAT_BITS)

    def est(self, name, opt):
        return self.layer_drop(name, opt) * (1 + self.est_error * h(name, opt))

    def measure(self, config) -> Measured:
        if all(o == FLOAT for o in config.values()):
            return Measured(BASELINE, 0.0, 0.0, 0.0)
        d = sum(self.layer_drop(n, o) for n, o in config.items()) + self.noise * h(ckey(config))
        k = sum(v != FLOAT_BITS for o in config.values() for v in o)
        f = min(1.0, 3 * max(d, 0.0) / 100 + 0.002 * k)
        se = 100 * math.sqrt(max(f - (d / 100) ** 2, 0.0) / self.n_images)
        return Measured(BASELINE - d, d, se, d)

    def evaluate(self, config) -> Measured:
        self.calls.append(ckey(config))
        return self.measure(config)

    def run(self, budget, **kw):
        return greedy_search(self.names, self.ladders, self.bytes_of, self.est, self.evaluate, budget, **kw)

    def single_moves(self, config):
        """Every configuration one narrowing of one coordinate of one layer away."""
        for n in self.names:
            for coord, lad in enumerate(self.ladders):
                for v in lad:
                    if v < config[n][coord]:
                        new = list(config[n])
                        new[coord] = v
                        yield dict(config, **{n: tuple(new)})


def replay(names, trajectory):
    """The configuration after each trajectory step, checking that each step narrows exactly one
    coordinate of one layer, from the width the previous configuration had."""
    cfg = {n: FLOAT for n in names}
    configs = [dict(cfg)]
    for e in trajectory[1:]:
        coord = "wa".index(e["width"])
        old = cfg[e["layer"]]
        assert old[coord] == e["from_bits"] and e["bits"] < e["from_bits"]
        cfg[e["layer"]] = old[:coord] + (e["bits"],) + old[coord + 1:]
        configs.append(dict(cfg))
    for a, b in zip(configs, configs[1:]):
        changed = [(n, c) for n in names for c in (0, 1) if a[n][c] != b[n][c]]
        assert len(changed) == 1 and b[changed[0][0]][changed[0][1]] < a[changed[0][0]][changed[0][1]]
    return configs


# ---------------------------------------------------------------- greedy_search

@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("max_drop", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("joint", [False, True])
@pytest.mark.parametrize("fast_forward", [True, False])
def test_greedy_invariants(seed, max_drop, joint, fast_forward):
    """On a noisy, non-monotone fake: every verified trajectory entry (and every configuration
    passed to on_accept) holds the budget; AI strictly increases; each step narrows exactly one
    coordinate; the replayed trajectory ends at the returned config, which holds the budget and
    whose measurement is returned; `estimated` is the additive estimate of each step's config;
    no config is evaluated twice (real calls == distinct calls == evaluations); on_accept's last
    config is the final one; progress sees every step in order with a non-decreasing evaluation
    count; a custom ai_of is what is reported."""
    f = Fake(seed, noise=0.3, a_ladder=(8, 4) if joint else ())
    budget = Budget(max_drop, BUDGET_Z)
    accepted, seen = [], []
    flops = 1e6
    ai_of = lambda c: flops * f.ai_of(c)
    res = f.run(budget, verify_top_k=3, ai_of=ai_of, fast_forward=fast_forward,
                on_accept=lambda c, m: accepted.append((c, m)), progress=lambda s, e: seen.append((s, e)))
    traj = res["trajectory"]
    assert traj[0]["layer"] is None and traj[0]["val_acc"] == BASELINE and traj[0]["verified"]
    assert res["steps"] == len(traj) - 1
    configs = replay(f.names, traj)
    assert configs[-1] == res["config"] and list(res["config"]) == f.names
    assert all(isinstance(o, tuple) and len(o) == 2 for o in res["config"].values())
    for e, c in zip(traj, configs):
        assert e["ai"] == pytest.approx(ai_of(c))
        assert e["estimated"] == pytest.approx(sum(clamp(f.est(n, o)) for n, o in c.items() if o != FLOAT))
        if e["verified"]:
            m = f.measure(c)
            assert (e["val_acc"], e["drop"], e["drop_se"]) == (m.acc, m.drop, m.se)
            assert budget.holds(e["drop"], e["drop_se"])
        else:
            assert e["phase"] == "fast-forward" and e["val_acc"] is None and e["drop"] is None
    for a, b in zip(traj, traj[1:]):
        assert b["ai"] > a["ai"]
    assert all(e["phase"] in ("fast-forward", "verified") for e in traj[1:])
    phases = [e["phase"] for e in traj[1:]]
    assert phases == sorted(phases)                      # fast-forward entries first
    if not fast_forward:
        assert "fast-forward" not in phases
    assert res["measured"] == f.measure(res["config"]) and budget.holds(res["measured"].drop, res["measured"].se)
    assert res["ai"] == pytest.approx(ai_of(res["config"]))
    assert res["stopped_by"] is None
    assert len(f.calls) == len(set(f.calls)) == res["evaluations"]
    for c, m in accepted:
        assert c in configs[1:] and budget.holds(m.drop, m.se)
    if res["steps"]:
        assert accepted and accepted[-1][0] == res["config"]
    else:
        assert not accepted and res["config"] == {n: FLOAT for n in f.names}
    assert [s for s, _ in seen] == list(range(1, res["steps"] + 1))
    for (s, e), t in zip(seen, traj[1:]):
        assert {k: v for k, v in e.items() if k != "evaluations"} == t
    evals = [e["evaluations"] for _, e in seen]
    assert evals == sorted(evals) and all(v <= res["evaluations"] for v in evals)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("max_drop", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("noise", [0.0, 0.3])
def test_greedy_stop_condition(seed, max_drop, noise):
    """Without pruning and fast-forward, the greedy stops only when every single narrowing of one
    coordinate of the final config is infeasible, even on a non-monotone model."""
    f = Fake(seed, noise=noise, a_ladder=(8, 4) if seed % 2 else ())
    budget = Budget(max_drop, BUDGET_Z)
    res = f.run(budget, prune_infeasible=False, fast_forward=False)
    assert res["stopped_by"] is None
    moves = list(f.single_moves(res["config"]))
    assert moves or all(o == (min(f.ladders[0]), min(f.ladders[1] or [FLOAT_BITS])) for o in res["config"].values())
    for c in moves:
        m = f.measure(c)
        assert not budget.holds(m.drop, m.se), c


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("max_drop", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("est_error,verify_top_k", [(0.0, 1), (0.0, 3), (0.5, 1)])
def test_pruning_is_free_on_a_monotone_model(seed, max_drop, est_error, verify_top_k):
    """The pruning assumption: accuracy only falls as widths narrow, so a move found infeasible
    from one config is infeasible from every narrower config, and so is narrowing the same
    coordinate further. On a model where that holds (drop + z SE monotone in every width), pruning
    only skips truly infeasible moves: it returns the same config as prune_infeasible=False with
    no more evaluations, and the stop condition still holds. (With verify_top_k > 1 and an
    estimate that ranks moves unlike the measurement, the batches differ in composition, so the
    answers may differ slightly; hence exact estimates or verify_top_k = 1 here.)"""
    budget = Budget(max_drop, BUDGET_Z)
    runs = {}
    for prune in (True, False):
        f = Fake(seed, est_error=est_error, a_ladder=(8, 4) if seed % 3 == 0 else ())
        runs[prune] = f.run(budget, prune_infeasible=prune, verify_top_k=verify_top_k)
    assert runs[True]["config"] == runs[False]["config"]
    assert runs[True]["evaluations"] <= runs[False]["evaluations"]
    for c in f.single_moves(runs[True]["config"]):
        m = f.measure(c)
        assert not budget.holds(m.drop, m.se)


def test_pruning_saves_evaluations_on_a_monotone_model():
    """Across monotone problems pruning strictly saves evaluations somewhere (it is not a no-op)."""
    saved = 0
    for seed in range(6):
        ev = []
        for prune in (True, False):
            f = Fake(seed, n_layers=6)
            ev.append(f.run(Budget(3.0, BUDGET_Z), prune_infeasible=prune, fast_forward=False)["evaluations"])
        saved += ev[1] - ev[0]
    assert saved > 0


def two_layer_non_monotone():
    """Layers a and b of equal size, ladder [4, 2] for weights. The estimate says 4 bits is cheap
    and 2 bits costly for both; really a@4 costs 0.2, a@2 5.0, but b is non-monotone: b@4 costs
    5.0 and b@2 only 0.3."""
    true = {("a", 4): 0.2, ("a", 2): 5.0, ("b", 4): 5.0, ("b", 2): 0.3}
    est = {4: 0.1, 2: 10.0}
    calls = []

    def evaluate(config):
        calls.append(ckey(config))
        d = sum(true[n, o[0]] for n, o in config.items() if o[0] != FLOAT_BITS)
        return Measured(BASELINE - d, d, 0.0, d)

    def search(prune):
        return greedy_search(["a", "b"], [[4, 2], []], lambda n, o: 1000 * o[0] / 8,
                             lambda n, o: est[o[0]], evaluate, Budget(1.0, 0.0), verify_top_k=2,
                             prune_infeasible=prune, fast_forward=False)
    return search, calls


def test_pruning_trade_off_on_a_non_monotone_model():
    """The documented trade-off: where narrower is sometimes better (b@2 beats b@4), pruning
    assumes b@2 infeasible once b@4 was measured infeasible and stops at {a: 4}, while
    prune_infeasible=False goes on to find the higher-AI {a: 4, b: 2} (at more evaluations)."""
    search, calls = two_layer_non_monotone()
    on = search(True)
    n_on = len(calls)
    off = search(False)
    assert on["config"] == {"a": (4, 32), "b": FLOAT}
    assert off["config"] == {"a": (4, 32), "b": (2, 32)}
    assert off["ai"] > on["ai"]
    assert on["evaluations"] == n_on < off["evaluations"]
    assert on["pruned_moves"] >= 1


def test_greedy_moves_past_an_infeasible_batch():
    """If every move of the top-k batch fails for real, the next batch is verified and a feasible
    move there is accepted: the estimate only orders verification, it never decides. Pruned moves
    are not evaluated again from the narrower config."""
    size = {"a": 1000, "b": 1000, "c": 100}
    est = {"a": 0.0, "b": 0.0, "c": 0.5}           # the table says a and b are free
    real = {"a": 5.0, "b": 5.0, "c": 0.4}          # but they are not

    def evaluate(config):
        d = sum(real[n] for n, o in config.items() if o[0] != FLOAT_BITS)
        return Measured(BASELINE - d, d, 0.0, d)

    def search(prune):
        return greedy_search(["a", "b", "c"], [[4], []], lambda n, o: size[n] * o[0] / 8,
                             lambda n, o: est[n], evaluate, Budget(1.0, 0.0), verify_top_k=2,
                             fast_forward=False, prune_infeasible=prune)
    on, off = search(True), search(False)
    for r in (on, off):
        assert r["config"] == {"a": FLOAT, "b": FLOAT, "c": (4, 32)}
        assert r["trajectory"][1]["layer"] == "c"
    assert on["evaluations"] == 1 + 3          # float; a, b (batch 1, infeasible), c (batch 2)
    assert off["evaluations"] == 1 + 3 + 2     # ... and a, b again from {c: 4}
    assert on["infeasible_evaluations"] == 2 and off["infeasible_evaluations"] == 4


def test_greedy_picks_the_best_measured_score_in_a_batch():
    """Within a verified batch the feasible move with the best measured score (AI gained per unit
    of measured signal) wins, not the best estimate; with verify_top_k=1 the estimate's first
    choice is taken instead."""
    est = {"a": 0.1, "b": 0.2}                     # a looks better
    real = {"a": 0.9, "b": 0.1}                    # b is better

    def evaluate(config):
        d = sum(real[n] for n, o in config.items() if o[0] != FLOAT_BITS)
        return Measured(BASELINE - d, d, 0.0, d)

    def search(k):
        return greedy_search(["a", "b"], [[4], []], lambda n, o: 1000 * o[0] / 8, lambda n, o: est[n],
                             evaluate, Budget(1.0, 0.0), verify_top_k=k, fast_forward=False)
    r = search(2)
    assert [e["layer"] for e in r["trajectory"][1:]] == ["b", "a"]
    assert r["config"] == {"a": (4, 32), "b": (4, 32)}
    assert [e["layer"] for e in search(1)["trajectory"][1:]] == ["a", "b"]


@pytest.mark.parametrize("fast_forward", [True, False])
def test_greedy_zero_budget_stays_float(fast_forward):
    """With no budget and every narrowing lossy, nothing is accepted: all-float, 0 steps; without
    fast-forward each layer's widest move is evaluated once (besides the float model) and its
    narrower widths are pruned within the same step, or every move is evaluated without pruning."""
    f = Fake(0)

    def evaluate(config):
        d = 0.0 if all(o == FLOAT for o in config.values()) else 0.5
        return Measured(BASELINE - d, d, 0.0, d)
    res = greedy_search(f.names, f.ladders, f.bytes_of, f.est, evaluate, Budget(0.0, 0.0), fast_forward=fast_forward)
    assert res["steps"] == 0 and res["config"] == {n: FLOAT for n in f.names}
    assert res["measured"] == Measured(BASELINE, 0.0, 0.0, 0.0) and res["stopped_by"] is None
    if not fast_forward:
        assert res["evaluations"] == 1 + len(f.names)
        res = greedy_search(f.names, f.ladders, f.bytes_of, f.est, evaluate, Budget(0.0, 0.0), fast_forward=False,
                            prune_infeasible=False)
        assert res["evaluations"] == 1 + len(f.names) * len(f.ladders[0]) and res["pruned_moves"] == 0


def test_greedy_rejects_bad_verify_top_k():
    """verify_top_k < 1 is a ValueError."""
    f = Fake(0)
    with pytest.raises(ValueError):
        f.run(Budget(1.0), verify_top_k=0)


@pytest.mark.parametrize("seed", range(4))
def test_joint_mode_moves_both_coordinates(seed):
    """With ladders [[8, 4], [8, 4]] the greedy narrows both weights and activations, and the
    final config maps every layer to a (w, a) tuple with values from the ladders."""
    f = Fake(seed, n_layers=4, w_ladder=(8, 4), a_ladder=(8, 4), step=0.01)
    res = f.run(Budget(2.0, BUDGET_Z))
    assert {e["width"] for e in res["trajectory"][1:]} == {"w", "a"}
    for w, a in res["config"].values():
        assert w in (8, 4, FLOAT_BITS) and a in (8, 4, FLOAT_BITS)
    assert any(o[0] != FLOAT_BITS for o in res["config"].values())
    assert any(o[1] != FLOAT_BITS for o in res["config"].values())
    replay(f.names, res["trajectory"])


def estimate_path(f):
    """The configurations the estimate alone walks through (each step its best-ranked move), from
    a run whose budget nothing exceeds: then fast-forward goes to the end of its path."""
    g = greedy_search(f.names, f.ladders, f.bytes_of, f.est, f.measure, Budget(1e9, 0.0))
    assert all(e["phase"] == "fast-forward" for e in g["trajectory"][1:])
    return replay(f.names, g["trajectory"])[1:]


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("verify_top_k", [1, 3])
def test_fast_forward_on_a_monotone_model(seed, verify_top_k):
    """On a monotone model with exact estimates, fast-forward reaches the same config as the
    step-by-step greedy (so no lower AI) with fewer evaluations on a long descent; its phase
    bisects the estimate's path: at most ceil(log2(path length + 1)) <= ceil(log2(path length)) + 1
    evaluations, ending at the last path config that holds the budget."""
    budget = Budget(3.0, BUDGET_Z)
    runs, fakes = {}, {}
    for ff in (True, False):
        fakes[ff] = Fake(seed, n_layers=8)
        runs[ff] = fakes[ff].run(budget, fast_forward=ff, verify_top_k=verify_top_k)
    assert runs[True]["config"] == runs[False]["config"]
    assert runs[True]["ai"] >= runs[False]["ai"]
    assert runs[True]["evaluations"] < runs[False]["evaluations"]

    f = fakes[True]
    path = estimate_path(f)
    on_path = {ckey(c) for c in path}
    assert f.calls[0] == ckey({n: FLOAT for n in f.names})
    ff_calls = 0
    for c in f.calls[1:]:
        if c not in on_path:
            break
        ff_calls += 1
    assert 1 <= ff_calls <= math.ceil(math.log2(len(path) + 1)) <= math.ceil(math.log2(len(path))) + 1
    feasible = [c for c in path if budget.holds(f.measure(c).drop, f.measure(c).se)]
    ff_entries = [e for e in runs[True]["trajectory"][1:] if e["phase"] == "fast-forward"]
    assert ff_entries and replay(f.names, runs[True]["trajectory"])[len(ff_entries)] == feasible[-1]
    assert feasible[-1] == path[len(feasible) - 1]          # feasibility is monotone along the path
    assert ff_entries[-1]["verified"]
    assert sum(e["verified"] for e in ff_entries) <= ff_calls
    if len(feasible) < len(path):
        # the move out of the last feasible path config was measured infeasible: it is pruned, so
        # no later evaluation narrows that coordinate of that layer as far (prune_infeasible=True)
        a, b = path[len(feasible) - 1], path[len(feasible)]
        ((name, coord),) = [(n, c) for n in f.names for c in (0, 1) if a[n][c] != b[n][c]]
        later = [dict(c) for c in f.calls[1 + ff_calls:]]
        assert later and all(c[name][coord] > b[name][coord] for c in later)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("fast_forward", [True, False])
def test_max_evaluations_is_a_hard_cap(seed, fast_forward):
    """evaluations <= max_evaluations always (the float model counts as one here); stopped_by is
    "max_evaluations" exactly when the cap is below what the uncapped search uses (then
    evaluations == cap), None otherwise (then the result is the uncapped one); a capped answer
    still holds the budget."""
    budget = Budget(1.0, BUDGET_Z)
    free = Fake(seed, noise=0.2).run(budget, fast_forward=fast_forward)
    total = free["evaluations"]
    assert free["stopped_by"] is None
    for cap in range(1, total + 3):
        f = Fake(seed, noise=0.2)
        r = f.run(budget, fast_forward=fast_forward, max_evaluations=cap)
        assert r["evaluations"] == len(f.calls) <= cap
        if cap < total:
            assert r["stopped_by"] == "max_evaluations" and r["evaluations"] == cap
        else:
            assert r["stopped_by"] is None and r["config"] == free["config"] and r["evaluations"] == total
        assert budget.holds(r["measured"].drop, r["measured"].se)
        assert r["measured"] == f.measure(r["config"])


def test_eval_cache():
    """EvalCache evaluates each distinct config once (dict order does not matter), counts real
    evaluations, and remember() stores a known result without counting it."""
    calls = []
    cache = EvalCache(lambda c: calls.append(dict(c)) or Measured(90.0, 1.0, 0.1, 0.2))
    a, b = {"x": (4, 32), "y": FLOAT}, {"y": FLOAT, "x": (4, 32)}
    assert a not in cache and cache.get(a) is None
    m = cache(a)
    assert cache(b) is m and a in cache and cache.get(b) is m and cache.count == 1 and len(calls) == 1
    cache.remember({"x": FLOAT, "y": FLOAT}, Measured(92.0, 0.0, 0.0, 0.0))
    assert cache({"x": FLOAT, "y": FLOAT}).acc == 92.0 and cache.count == 1 and len(calls) == 1


# ---------------------------------------------------------------- verify_frontier

def frontier_problem(seed, factor=1.3, noise=0.0, se_images=None):
    """A weight-only random problem, its frontier, ai_of, and a fake evaluate whose drop is
    `factor` x the additive estimate (+ deterministic noise), SE from a flip model or 0."""
    options = random_options(seed, n_layers=6, w_widths=(8, 4, 3, 2))
    front = pareto_frontier(options)
    calls = []

    def ai_of(config):
        return 1e6 / recompute(options, config)[1]

    def measure(config):
        if all(o == FLOAT for o in config.values()):
            return Measured(BASELINE, 0.0, 0.0, 0.0)
        d = factor * recompute(options, config)[0] + noise * h(ckey(config))
        se = 0.0 if se_images is None else 100 * math.sqrt(min(1.0, 3 * max(d, 0) / 100 + 0.01) / se_images)
        return Measured(BASELINE - d, d, se, d)

    def evaluate(config):
        calls.append(ckey(config))
        return measure(config)
    return options, front, ai_of, measure, evaluate, calls


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("max_evaluations", [1, 3, 10, 24])
def test_verify_frontier_answer_is_the_best_feasible_verified(seed, max_evaluations):
    """On a noisy (non-monotone) fake: at most max_evaluations distinct evaluations; each verified
    point's `feasible` is the budget rule applied to its measurement; the answer holds the budget
    and has the highest AI of the feasible verified points; with none, config None and a note."""
    options, front, ai_of, measure, evaluate, calls = frontier_problem(seed, noise=0.4, se_images=10000)
    budget = Budget(1.0, BUDGET_Z)
    res = verify_frontier(front, evaluate, budget, ai_of, max_evaluations=max_evaluations)
    assert res["evaluations"] == len(calls) == len(set(calls)) <= max_evaluations
    for v in res["verified"]:
        assert v["feasible"] == budget.holds(v["measured"].drop, v["measured"].se)
        assert v["measured"] == measure(v["config"]) and v["ai"] == ai_of(v["config"])
    feas = [v for v in res["verified"] if v["feasible"]]
    if feas:
        assert budget.holds(res["measured"].drop, res["measured"].se)
        assert res["ai"] == max(v["ai"] for v in feas)
        assert res["config"] in [v["config"] for v in feas if v["ai"] == res["ai"]]
        assert res["source"] == "frontier"
    else:
        assert res["config"] is None and res["ai"] is None and res["note"]


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("where", [0.1, 0.33, 0.5, 0.9])
def test_verify_frontier_bisection_finds_the_boundary(seed, where):
    """With feasibility monotone along the frontier (drop = 1.3 x estimate, SE 0), the answer is
    exactly the highest-AI feasible frontier point, found in at most ceil(log2(n + 1))
    evaluations of n points (about log2(n) + 1), with no note."""
    options, front, ai_of, measure, evaluate, calls = frontier_problem(seed)
    n = len(front)
    j = max(1, min(n - 2, int(where * n)))        # the last feasible index (a non-float point)
    budget = Budget(1.3 * (front[j].est + front[j + 1].est) / 2, 0.0)
    res = verify_frontier(front, evaluate, budget, ai_of, max_evaluations=50)
    assert res["config"] == front[j].config and res["source"] == "frontier" and res["note"] is None
    assert res["evaluations"] <= math.ceil(math.log2(n + 1))


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("noise", [0.0, 0.5])
@pytest.mark.parametrize("max_evaluations", [2, 24])
def test_verify_frontier_never_below_the_seed(seed, noise, max_evaluations):
    """Seeded with the greedy's answer through a shared EvalCache, the answer's AI is never below
    the seed's, it holds the budget, verify_frontier spends at most max_evaluations, and no
    configuration is evaluated twice across both searches."""
    f = Fake(seed, n_layers=6, w_ladder=(8, 4, 3, 2), noise=noise)
    budget = Budget(1.0, BUDGET_Z)
    cache = EvalCache(f.evaluate)
    g = greedy_search(f.names, f.ladders, f.bytes_of, f.est, cache, budget)
    options = {n: [((w, FLOAT_BITS), f.bytes_of(n, (w, FLOAT_BITS)), f.est(n, (w, FLOAT_BITS)))
                   for w in (FLOAT_BITS, 8, 4, 3, 2)] for n in f.names}
    front = pareto_frontier(options)
    before = cache.count
    res = verify_frontier(front, cache, budget, f.ai_of, max_evaluations=max_evaluations, seed_config=g["config"])
    assert res["ai"] >= g["ai"]
    assert budget.holds(res["measured"].drop, res["measured"].se)
    assert res["evaluations"] == cache.count - before <= max_evaluations
    assert len(f.calls) == len(set(f.calls)) == cache.count
    if res["source"] == "seed":
        assert res["config"] == g["config"] and res["note"]


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("max_drop", [0.5, 1.0, 3.0])
def test_verify_frontier_seed_is_the_lower_end(seed, max_drop):
    """With feasibility monotone in the estimate (exact estimates, z = 0), the frontier point
    first reaching the seed's AI is feasible and becomes the lower end of the bisection: the
    answer is exactly the highest-AI feasible point, in at most 1 + ceil(log2(n - i)) evaluations
    (i: that point's index)."""
    f = Fake(seed, n_layers=6, w_ladder=(8, 4, 3, 2))
    budget = Budget(max_drop, 0.0)
    cache = EvalCache(f.measure)
    g = greedy_search(f.names, f.ladders, f.bytes_of, f.est, cache, budget)
    options = {n: [((w, FLOAT_BITS), f.bytes_of(n, (w, FLOAT_BITS)), f.est(n, (w, FLOAT_BITS)))
                   for w in (FLOAT_BITS, 8, 4, 3, 2)] for n in f.names}
    front = pareto_frontier(options)
    i = next(k for k, p in enumerate(front) if f.ai_of(p.config) >= g["ai"])
    best = max((p for p in front if p.est <= max_drop + 1e-9), key=lambda p: f.ai_of(p.config))
    res = verify_frontier(front, cache, budget, f.ai_of, max_evaluations=50, seed_config=g["config"])
    assert res["config"] == best.config and res["source"] == "frontier"
    assert res["verified"][0]["index"] == i and res["verified"][0]["feasible"]
    assert all(v["index"] >= i for v in res["verified"])      # nothing below the lower end is verified
    assert res["evaluations"] <= 1 + math.ceil(math.log2(len(front) - i))


def test_verify_frontier_all_infeasible():
    """When no verified frontier point holds the budget (the float model included), the result has
    config None (the caller falls back to float) and a note saying so, within max_evaluations."""
    options, front, ai_of, measure, _, _ = frontier_problem(2)
    cache = EvalCache(lambda c: Measured(BASELINE - 50.0, 50.0, 0.0, 50.0))
    res = verify_frontier(front, cache, Budget(1.0, 0.0), ai_of, max_evaluations=20)
    assert res["config"] is None and res["ai"] is None and res["measured"] is None
    assert "none of the" in res["note"]
    assert res["evaluations"] == cache.count <= 20
    assert not any(v["feasible"] for v in res["verified"])


def line_frontier(float_first=False):
    """Seven frontier points on one layer, w = 8 .. 2 (est rising, bytes falling); optionally the
    all-float point in front."""
    pts = [FrontierPoint({"a": (w, 32)}, 0.1 * (9 - w), float(w)) for w in (8, 7, 6, 5, 4, 3, 2)]
    if float_first:
        pts.insert(0, FrontierPoint({"a": FLOAT}, 0.0, 32.0))
    return pts


@pytest.mark.parametrize("feasible_w", [6, 4])
def test_verify_frontier_scans_up_from_the_float_end(feasible_w):
    """Non-monotone feasibility the bisection misses (only one mid-frontier point holds): the
    bisection finds no feasible point, so verification continues up from the float end until the
    first feasible non-float point, and stops there."""
    front = line_frontier()
    calls = []

    def evaluate(c):
        calls.append(c["a"][0])
        d = 0.5 if c["a"][0] == feasible_w else 5.0
        return Measured(BASELINE - d, d, 0.0, d)
    res = verify_frontier(front, evaluate, Budget(1.0, 0.0), lambda c: 1.0 / c["a"][0], max_evaluations=24)
    assert res["config"] == {"a": (feasible_w, 32)} and res["source"] == "frontier"
    assert calls[:3] == [5, 7, 8]                      # the bisection: indices 3, 1, 0
    scanned = calls[3:]
    assert scanned == [w for w in (6, 4, 3, 2) if w >= feasible_w]   # up from the float end, skipping done ones
    assert len(calls) == len(set(calls)) == res["evaluations"]


def test_verify_frontier_scans_past_a_feasible_float_point():
    """With the all-float config first on the frontier (every quantized option has a positive
    estimate, the usual case with KL) and remembered as feasible, finding only it does not end the
    search: verification goes on up for a feasible non-float point."""
    front = line_frontier(float_first=True)
    cache = EvalCache(lambda c: Measured(BASELINE - (0.5 if c["a"][0] == 4 else 5.0),
                                         0.5 if c["a"][0] == 4 else 5.0, 0.0, 0.0))
    cache.remember({"a": FLOAT}, Measured(BASELINE, 0.0, 0.0, 0.0))
    res = verify_frontier(front, cache, Budget(1.0, 0.0), lambda c: 1.0 / c["a"][0], max_evaluations=24)
    assert res["config"] == {"a": (4, 32)}
    assert any(v["config"] == {"a": FLOAT} and v["feasible"] for v in res["verified"])


def test_verify_frontier_budget_note():
    """An evaluation budget too small for the bisection to converge is said in the note."""
    options, front, ai_of, measure, evaluate, calls = frontier_problem(4, factor=0.5)
    res = verify_frontier(front, evaluate, Budget(1.0, 0.0), ai_of, max_evaluations=1)
    assert res["evaluations"] == 1 == len(calls) and "budget" in res["note"]


def test_verify_frontier_rejects_an_empty_frontier():
    """An empty frontier is a ValueError."""
    with pytest.raises(ValueError):
        verify_frontier([], lambda c: None, Budget(1.0), lambda c: 1.0)


@pytest.mark.parametrize("seed", range(4))
def test_shared_cache_between_greedy_and_verify_frontier(seed):
    """A configuration measured by the greedy is not evaluated again by verify_frontier: with one
    EvalCache, every real call is distinct, and verify_frontier's evaluations are exactly its new
    calls (verified points already measured by the greedy cost nothing)."""
    f = Fake(seed, n_layers=5, w_ladder=(8, 4, 2), noise=0.2)
    budget = Budget(1.0, BUDGET_Z)
    cache = EvalCache(f.evaluate)
    g = greedy_search(f.names, f.ladders, f.bytes_of, f.est, cache, budget)
    n_greedy = len(f.calls)
    assert g["evaluations"] == n_greedy == cache.count
    options = {n: [((w, FLOAT_BITS), f.bytes_of(n, (w, FLOAT_BITS)), f.est(n, (w, FLOAT_BITS)))
                   for w in (FLOAT_BITS, 8, 4, 2)] for n in f.names}
    front = pareto_frontier(options)
    v = verify_frontier(front, cache, budget, f.ai_of, max_evaluations=50, seed_config=g["config"])
    assert v["evaluations"] == len(f.calls) - n_greedy == cache.count - n_greedy
    assert len(f.calls) == len(set(f.calls))
    greedy_seen = set(f.calls[:n_greedy])
    verified_keys = {ckey(x["config"]) for x in v["verified"]}
    assert len(verified_keys) == v["evaluations"] + len(verified_keys & greedy_seen)
