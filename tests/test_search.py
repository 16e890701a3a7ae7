"""Property tests for quant/search.py, with fake evaluators instead of models.

A group is ``("w", layer)`` (a weight layer) or ``("a", tensor)`` (a tensor); a configuration is a
full ``{group: bits}`` (32 = float). Evaluations return ``Measured(acc, drop, se, signal)`` and
feasibility is ``Budget.holds(drop, se)``."""
import itertools
import math
import random
import zlib

import pytest

from quant.search import (EvalCache, FrontierPoint, Measured, clamp, greedy_search, pareto_frontier,
                          verify_frontier)
from quant.stats import BUDGET_Z, Budget
from quant.widths import FLOAT_BITS, A, W

BASELINE = 92.0
TRAJECTORY_KEYS = {"step", "kind", "name", "from_bits", "bits", "ai", "val_acc", "drop", "drop_se", "estimated",
                   "verified", "phase"}


def h(*parts) -> float:
    """Deterministic pseudo-random number in [-1, 1] for any repr-able key."""
    return (zlib.crc32(repr(parts).encode()) % 20001) / 10000.0 - 1.0


def rkey(x):
    return round(x, 6)


def ckey(config):
    return tuple(sorted(config.items()))


def is_float(config):
    return all(b == FLOAT_BITS for b in config.values())


# ---------------------------------------------------------------- pareto_frontier

def random_options(seed, n_layers=5, w_widths=(8, 4, 2), a_widths=(), step=0.02, allow_negative=True):
    """{group: [(bits, bytes, est), ...]} of a small random problem: a weight group per layer and,
    with `a_widths`, a tensor group per layer (the tensor the layer reads: "input" for the first,
    else the previous layer's output, so weight and tensor groups share names), in Space.groups
    order (weights first). Bytes are integers (so byte sums are exact in any order); estimates are
    multiples of `step` (0.1 or 0.0137 are not exact binary floats, so sums in different orders
    differ in the last bits), sometimes negative."""
    rng = random.Random(seed)
    names = [f"layer{i}.conv" for i in range(n_layers)]
    tensors = ["input"] + names[:-1]
    w_opts, a_opts = {}, {}
    for name, tensor in zip(names, tensors):
        p = rng.choice([64, 128, 256, 512, 1000]) * 8     # repeats make byte ties likely
        q = rng.choice([256, 512]) * 8
        for group, widths, size, out in (((W, name), w_widths, p, w_opts), ((A, tensor), a_widths, q, a_opts)):
            if not widths:
                continue
            opts = []
            for b in (FLOAT_BITS,) + tuple(widths):
                rank = (FLOAT_BITS - b) // 8
                est = 0.0 if b == FLOAT_BITS else rng.randint(0, 4 * rank * rank) * step
                if allow_negative and b != FLOAT_BITS and rng.random() < 0.15:
                    est = -rng.randint(1, 5) * step
                opts.append((b, size * b // 8, est))
            out[group] = opts
    return {**w_opts, **a_opts}


def recompute(options, config):
    """(sum of clamped estimates, total bytes) of a config, summed in group order."""
    e = b = 0.0
    for group, bits in config.items():
        (o,) = [o for o in options[group] if o[0] == bits]
        e += clamp(o[2])
        b += o[1]
    return e, b


def all_points(options):
    """(rounded estimate, bytes) of every configuration."""
    return {(rkey(sum(clamp(o[2]) for o in combo)), sum(o[1] for o in combo))
            for combo in itertools.product(*options.values())}


def brute_force_frontier(options):
    """Every configuration enumerated; the non-dominated (estimate, bytes) values, by definition."""
    front, best = set(), math.inf
    for e, b in sorted(all_points(options)):   # by estimate, then bytes: keep strictly fewer bytes than any cheaper
        if b < best:
            front.add((e, b))
            best = b
    return front


def check_frontier(options, front):
    """Shape, order and self-consistency of a frontier."""
    assert front
    for p in front:
        assert list(p.config) == list(options)
        assert all(p.config[g] in [o[0] for o in options[g]] for g in options)
        e, b = recompute(options, p.config)
        assert e == pytest.approx(p.est, abs=1e-9) and b == p.bytes
        assert p.est >= 0.0
    for a, b in zip(front, front[1:]):
        assert a.est < b.est and a.bytes > b.bytes


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("step", [0.02, 0.1, 0.0137])
def test_frontier_equals_brute_force_weights_only(seed, step):
    """Weight groups only: the DP frontier is exactly the set of non-dominated (estimate, bytes)
    values over all configurations, and each point's config recomputes to its stated est and
    bytes, also for estimates that are not exact binary floats."""
    options = random_options(seed, n_layers=5, w_widths=(8, 4, 2), step=step)
    assert all(g[0] == W for g in options)
    front = pareto_frontier(options)
    check_frontier(options, front)
    assert {(rkey(p.est), p.bytes) for p in front} == brute_force_frontier(options)
    # brute force by the definition of dominance too (small enough here)
    pts = all_points(options)
    nondom = {p for p in pts if not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in pts)}
    assert {(rkey(p.est), p.bytes) for p in front} == nondom


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("step", [0.02, 0.1, 0.0137])
def test_frontier_equals_brute_force_weights_and_tensors(seed, step):
    """Weight and tensor groups: 4 weight groups x (3 widths + float) and 4 tensor groups x
    (2 widths + float), 4^4 x 3^4 = 20,736 configurations: the DP equals brute force, and tensor
    groups do move along the frontier."""
    options = random_options(seed, n_layers=4, w_widths=(8, 4, 2), a_widths=(8, 4), step=step)
    assert [len(o) for o in options.values()] == [4] * 4 + [3] * 4
    assert [g[0] for g in options] == [W] * 4 + [A] * 4
    front = pareto_frontier(options)
    check_frontier(options, front)
    assert {(rkey(p.est), p.bytes) for p in front} == brute_force_frontier(options)
    assert any(p.config[g] != FLOAT_BITS for p in front for g in options if g[0] == A)   # tensors do move
    assert any(p.config[g] != FLOAT_BITS for p in front for g in options if g[0] == W)


@pytest.mark.parametrize("seed", range(4))
def test_frontier_ends(seed):
    """The first point has the least possible estimate (sum of per-group minimum clamped
    estimates), the last the least possible bytes."""
    options = random_options(seed, n_layers=7, w_widths=(8, 6, 4, 3, 2), a_widths=(8,))
    front = pareto_frontier(options)
    check_frontier(options, front)
    assert front[0].est == pytest.approx(sum(min(clamp(o[2]) for o in opts) for opts in options.values()), abs=1e-9)
    assert front[-1].bytes == sum(min(o[1] for o in opts) for opts in options.values())


def test_negative_estimates_are_clamped():
    """A group whose estimate is negative (it 'gained' alone) counts as 0, not as a credit for
    another group's loss: the zero-estimate point quantizes it, and no estimate is negative."""
    wa, ab = (W, "a"), (A, "b")
    options = {wa: [(FLOAT_BITS, 400, 0.0), (4, 50, -0.5)],
               ab: [(FLOAT_BITS, 400, 0.0), (4, 50, 0.5)]}
    front = pareto_frontier(options)
    assert [(p.config, p.est, p.bytes) for p in front] == [
        ({wa: 4, ab: FLOAT_BITS}, 0.0, 450.0), ({wa: 4, ab: 4}, 0.5, 100.0)]
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
    """No groups, a group without options, a non-finite estimate or byte count, a negative cap and a
    cap no configuration meets are ValueErrors."""
    g = (W, "a")
    with pytest.raises(ValueError):
        pareto_frontier({})
    with pytest.raises(ValueError):
        pareto_frontier({g: []})
    with pytest.raises(ValueError):
        pareto_frontier({g: [(FLOAT_BITS, 4.0, 0.0), (4, 1.0, float("nan"))]})
    with pytest.raises(ValueError):
        pareto_frontier({g: [(FLOAT_BITS, 4.0, 0.0), (4, float("inf"), 0.1)]})
    with pytest.raises(ValueError):
        pareto_frontier({g: [(FLOAT_BITS, 4.0, 0.0)]}, max_est=-0.1)
    with pytest.raises(ValueError):
        pareto_frontier({g: [(8, 4.0, 0.5), (4, 1.0, 0.7)]}, max_est=0.1)


def test_frontier_point_fields():
    """FrontierPoint carries config, est and bytes."""
    p = FrontierPoint(config={(W, "a"): 4}, est=0.1, bytes=2.0)
    assert (p.config, p.est, p.bytes) == ({(W, "a"): 4}, 0.1, 2.0)


def test_frontier_for_a_resnet20_sized_problem():
    """22 weight groups x (5 widths + float) and 24 tensor groups x (3 widths + float), with
    continuous estimates: the DP completes and returns a sorted, non-dominated frontier whose points
    recompute, from all-float to all-narrowest (no timing assertion)."""
    rng = random.Random(0)
    options = {}
    for i in range(22):
        p = rng.choice([432, 2304, 4608, 9216, 18432, 36864])
        options[W, f"layer{i}"] = [(w, p * w / 8, 0.0 if w == FLOAT_BITS else rng.random() * 0.05 * (9 - w) ** 2)
                                   for w in (FLOAT_BITS, 8, 6, 4, 3, 2)]
    for i in range(24):
        q = rng.choice([4096, 8192, 16384])
        options[A, f"tensor{i}"] = [(a, q * a / 8, 0.0 if a == FLOAT_BITS else rng.random() * 0.05 * (9 - a) ** 2)
                                    for a in (FLOAT_BITS, 8, 6, 4)]
    front = pareto_frontier(options)
    assert len(front) > 100
    check_frontier(options, front)
    assert front[0].config == {g: FLOAT_BITS for g in options}
    assert front[-1].config == {g: (2 if g[0] == W else 4) for g in options}


# ---------------------------------------------------------------- fakes for the searches

class Fake:
    """A fake network: a weight group per layer and a tensor group per layer (the tensor it reads:
    "input", then the previous layer's name), with per-group drops in points (monotone: a narrower
    width never drops less). A configuration's true drop is their sum plus deterministic
    per-configuration noise (`noise` points, which breaks monotonicity), and its SE comes from a
    flip model (flip rate f = 3 d + 0.002 per quantized group, SE = 100 sqrt((f - d^2) / n), so with
    noise 0 drop + z SE also only grows as widths narrow). The estimate is the group's drop,
    optionally off by a relative `est_error`; the measured signal is the measured drop.

    Every group is in `ladders` (as stage 3 passes them); with `a_ladder=()` the tensor groups have
    empty ladders and stay float, as in a weight-only search."""

    def __init__(self, seed, n_layers=5, w_ladder=(8, 6, 4, 3, 2), a_ladder=(), noise=0.0, est_error=0.0,
                 n_images=10000, step=0.02):
        rng = random.Random(seed)
        self.names = [f"layer{i}.conv" for i in range(n_layers)]
        self.tensors = ["input"] + self.names[:-1]
        self.groups = [(W, n) for n in self.names] + [(A, t) for t in self.tensors]
        self.ladders = {**{(W, n): list(w_ladder) for n in self.names},
                        **{(A, t): list(a_ladder) for t in self.tensors}}
        self.size = {(W, n): rng.choice([64, 128, 256, 512, 1000]) * 8 for n in self.names}
        self.size.update({(A, t): rng.choice([256, 512, 1024]) * 8 for t in self.tensors})
        self.part = {}
        for n, t in zip(self.names, self.tensors):
            for g in ((W, n), (A, t)):
                acc = 0.0
                for k, b in enumerate(sorted(self.ladders[g], reverse=True)):
                    acc += rng.randint(0, 5 * (k + 1) ** 2) * step
                    self.part[g, b] = acc
        self.noise, self.est_error, self.n_images = noise, est_error, n_images
        self.calls = []

    def bytes_of(self, group, bits):
        return self.size[group] * bits / 8

    def ai_of(self, config):
        return 1.0 / sum(self.bytes_of(g, b) for g, b in config.items())

    def group_drop(self, group, bits):
        return 0.0 if bits == FLOAT_BITS else self.part[group, bits]

    def est(self, group, bits):
        return self.group_drop(group, bits) * (1 + self.est_error * h(group, bits))

    def measure(self, config) -> Measured:
        assert set(config) == set(self.groups)     # full configurations only
        if is_float(config):
            return Measured(BASELINE, 0.0, 0.0, 0.0)
        d = sum(self.group_drop(g, b) for g, b in config.items()) + self.noise * h(ckey(config))
        k = sum(b != FLOAT_BITS for b in config.values())
        f = min(1.0, 3 * max(d, 0.0) / 100 + 0.002 * k)
        se = 100 * math.sqrt(max(f - (d / 100) ** 2, 0.0) / self.n_images)
        return Measured(BASELINE - d, d, se, d)

    def evaluate(self, config) -> Measured:
        self.calls.append(ckey(config))
        return self.measure(config)

    def run(self, budget, **kw):
        return greedy_search(self.ladders, self.bytes_of, self.est, self.evaluate, budget, **kw)

    def single_moves(self, config):
        """Every configuration one narrowing of one group away."""
        for g in self.groups:
            for v in self.ladders[g]:
                if v < config[g]:
                    yield {**config, g: v}

    def frontier_options(self):
        """pareto_frontier's input for the same problem: every group, float included."""
        return {g: [(b, self.bytes_of(g, b), self.est(g, b)) for b in (FLOAT_BITS, *self.ladders[g])]
                for g in self.groups}


def replay(groups, trajectory):
    """The configuration after each trajectory step, checking that each step narrows exactly one
    group (named by the entry's kind and name), from the width the previous configuration had."""
    cfg = {g: FLOAT_BITS for g in groups}
    configs = [dict(cfg)]
    for e in trajectory[1:]:
        g = (e["kind"], e["name"])
        assert e["kind"] in (W, A) and g in cfg
        assert cfg[g] == e["from_bits"] and e["bits"] < e["from_bits"]
        cfg[g] = e["bits"]
        configs.append(dict(cfg))
    for a, b in zip(configs, configs[1:]):
        changed = [g for g in groups if a[g] != b[g]]
        assert len(changed) == 1 and b[changed[0]] < a[changed[0]]
    return configs


# ---------------------------------------------------------------- greedy_search

@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("max_drop", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("joint", [False, True])
@pytest.mark.parametrize("fast_forward", [True, False])
def test_greedy_invariants(seed, max_drop, joint, fast_forward):
    """On a noisy, non-monotone fake: every verified trajectory entry (and every configuration
    passed to on_accept) holds the budget; AI strictly increases; each step narrows exactly one
    group; the replayed trajectory ends at the returned config (every group, in ladder order, int
    widths from the ladders), which holds the budget and whose measurement is returned;
    `estimated` is the additive estimate of each step's config; no config is evaluated twice (real
    calls == distinct calls == evaluations); on_accept's last config is the final one; progress
    sees every step in order with a non-decreasing evaluation count; a custom ai_of is what is
    reported."""
    f = Fake(seed, noise=0.3, a_ladder=(8, 4) if joint else ())
    budget = Budget(max_drop, BUDGET_Z)
    accepted, seen = [], []
    flops = 1e6
    ai_of = lambda c: flops * f.ai_of(c)
    res = f.run(budget, verify_top_k=3, ai_of=ai_of, fast_forward=fast_forward,
                on_accept=lambda c, m: accepted.append((c, m)), progress=lambda s, e: seen.append((s, e)))
    traj = res["trajectory"]
    assert traj[0]["kind"] is None and traj[0]["name"] is None and traj[0]["val_acc"] == BASELINE
    assert traj[0]["verified"] and traj[0]["step"] == 0
    assert all(set(e) == TRAJECTORY_KEYS for e in traj[1:])
    assert [e["step"] for e in traj] == list(range(len(traj)))
    assert res["steps"] == len(traj) - 1
    configs = replay(f.groups, traj)
    assert configs[-1] == res["config"] and list(res["config"]) == f.groups
    for g, b in res["config"].items():
        assert type(b) is int and b in (FLOAT_BITS, *f.ladders[g])
    if not joint:
        assert all(e["kind"] == W for e in traj[1:])
    for e, c in zip(traj, configs):
        assert e["ai"] == pytest.approx(ai_of(c))
        assert e["estimated"] == pytest.approx(sum(clamp(f.est(g, b)) for g, b in c.items() if b != FLOAT_BITS))
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
        assert not accepted and res["config"] == {g: FLOAT_BITS for g in f.groups}
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
    group of the final config is infeasible, even on a non-monotone model."""
    f = Fake(seed, noise=noise, a_ladder=(8, 4) if seed % 2 else ())
    budget = Budget(max_drop, BUDGET_Z)
    res = f.run(budget, prune_infeasible=False, fast_forward=False)
    assert res["stopped_by"] is None
    moves = list(f.single_moves(res["config"]))
    assert moves or all(b == min(f.ladders[g], default=FLOAT_BITS) for g, b in res["config"].items())
    for c in moves:
        m = f.measure(c)
        assert not budget.holds(m.drop, m.se), c


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("max_drop", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("est_error,verify_top_k", [(0.0, 1), (0.0, 3), (0.5, 1)])
def test_pruning_is_free_on_a_monotone_model(seed, max_drop, est_error, verify_top_k):
    """The pruning assumption: accuracy only falls as widths narrow, so a move found infeasible
    from one config is infeasible from every narrower config, and so is narrowing the same
    group further. On a model where that holds (drop + z SE monotone in every width), pruning
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
    assert runs[False]["pruned_moves"] == 0
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


def two_group_non_monotone():
    """A weight group and a tensor group of equal size, ladder [4, 2] for both. The estimate says 4
    bits is cheap and 2 bits costly for both; really the weights at 4 cost 0.2 and at 2 5.0, but
    the tensor is non-monotone: at 4 it costs 5.0 and at 2 only 0.3."""
    wa, ab = (W, "a"), (A, "b")
    true = {(wa, 4): 0.2, (wa, 2): 5.0, (ab, 4): 5.0, (ab, 2): 0.3}
    est = {4: 0.1, 2: 10.0}
    calls = []

    def evaluate(config):
        calls.append(ckey(config))
        d = sum(true[g, b] for g, b in config.items() if b != FLOAT_BITS)
        return Measured(BASELINE - d, d, 0.0, d)

    def search(prune):
        return greedy_search({wa: [4, 2], ab: [4, 2]}, lambda g, b: 1000 * b / 8, lambda g, b: est[b], evaluate,
                             Budget(1.0, 0.0), verify_top_k=2, prune_infeasible=prune, fast_forward=False)
    return search, calls, wa, ab


def test_pruning_trade_off_on_a_non_monotone_model():
    """The documented trade-off: where narrower is sometimes better (the tensor at 2 beats it at 4),
    pruning assumes the tensor at 2 infeasible once 4 was measured infeasible and stops at
    {weights: 4}, while prune_infeasible=False goes on to find the higher-AI {weights: 4, tensor:
    2} (at more evaluations)."""
    search, calls, wa, ab = two_group_non_monotone()
    on = search(True)
    n_on = len(calls)
    off = search(False)
    assert on["config"] == {wa: 4, ab: FLOAT_BITS}
    assert off["config"] == {wa: 4, ab: 2}
    assert off["ai"] > on["ai"]
    assert on["evaluations"] == n_on < off["evaluations"]
    assert on["pruned_moves"] >= 1


def test_pruning_audit_measures_what_the_rule_skipped():
    """The greedy records every move its pruning rule kept from being measured, with the configuration it
    was skipped from; audit_pruning measures a seeded sample and counts the ones that would have held
    (on the non-monotone model: the tensor at 2 bits, skipped after 4 failed, would have held)."""
    from quant.search import audit_pruning
    search, calls, wa, ab = two_group_non_monotone()
    on = search(True)
    skipped = on["skipped_moves"]
    assert skipped and all(cfg[g] > b for cfg, g, b in skipped)
    assert (({wa: 4, ab: FLOAT_BITS}, ab, 2) in skipped)
    audit = audit_pruning(skipped, lambda c: pytest.fail("k = 0 measures nothing"), Budget(1.0, 0.0), 0)
    assert audit == {"skipped": len(skipped), "checked": 0, "would_have_held": 0}

    def evaluate(config):
        d = {(wa, 4): 0.2, (wa, 2): 5.0, (ab, 4): 5.0, (ab, 2): 0.3}
        drop = sum(d[g, b] for g, b in config.items() if b != FLOAT_BITS)
        return Measured(BASELINE - drop, drop, 0.0, drop)
    audit = audit_pruning(skipped, evaluate, Budget(1.0, 0.0), 100)
    expect = sum(evaluate({**cfg, g: b}).drop <= 1.0 for cfg, g, b in skipped)
    assert audit == {"skipped": len(skipped), "checked": len(skipped), "would_have_held": expect} and expect >= 1
    assert audit_pruning(skipped, evaluate, Budget(1.0, 0.0), 1)["checked"] == 1


def test_pruning_is_per_group_not_per_name():
    """A weight layer and a tensor may share a name ("conv1" the layer, "conv1" the tensor its kernel
    writes); they are different groups. A weight move measured infeasible prunes only the weight
    group: the same-named tensor is still narrowed, and the evaluations tell the two apart."""
    wg, ag = (W, "conv1"), (A, "conv1")
    real = {wg: 5.0, ag: 0.4}
    calls = []

    def evaluate(config):
        calls.append(ckey(config))
        d = sum(real[g] for g, b in config.items() if b != FLOAT_BITS)
        return Measured(BASELINE - d, d, 0.0, d)
    est = {(wg, 4): 0.1, (wg, 2): 10.0, (ag, 4): 0.5}     # weights at 4 look best, then the tensor at 4
    res = greedy_search({wg: [4, 2], ag: [4]}, lambda g, b: 1000 * b / 8, lambda g, b: est[g, b],
                        evaluate, Budget(1.0, 0.0), verify_top_k=1, fast_forward=False)
    assert res["config"] == {wg: FLOAT_BITS, ag: 4}
    assert [(e["kind"], e["name"], e["bits"]) for e in res["trajectory"][1:]] == [(A, "conv1", 4)]
    # float; w@4 (infeasible, prunes w@2 too); a@4 (feasible); then from {a: 4} nothing is left
    assert calls == [ckey({wg: 32, ag: 32}), ckey({wg: 4, ag: 32}), ckey({wg: 32, ag: 4})]
    assert res["pruned_moves"] == 1 and res["infeasible_evaluations"] == 1


def test_greedy_moves_past_an_infeasible_batch():
    """If every move of the top-k batch fails for real, the next batch is verified and a feasible
    move there is accepted: the estimate only orders verification, it never decides. Pruned moves
    are not evaluated again from the narrower config."""
    ga, gb, gc = (W, "a"), (W, "b"), (A, "c")
    size = {ga: 1000, gb: 1000, gc: 100}
    est = {ga: 0.0, gb: 0.0, gc: 0.5}           # the table says a and b are free
    real = {ga: 5.0, gb: 5.0, gc: 0.4}          # but they are not

    def evaluate(config):
        d = sum(real[g] for g, b in config.items() if b != FLOAT_BITS)
        return Measured(BASELINE - d, d, 0.0, d)

    def search(prune):
        return greedy_search({ga: [4], gb: [4], gc: [4]}, lambda g, b: size[g] * b / 8, lambda g, b: est[g],
                             evaluate, Budget(1.0, 0.0), verify_top_k=2, fast_forward=False, prune_infeasible=prune)
    on, off = search(True), search(False)
    for r in (on, off):
        assert r["config"] == {ga: FLOAT_BITS, gb: FLOAT_BITS, gc: 4}
        assert (r["trajectory"][1]["kind"], r["trajectory"][1]["name"]) == gc
    assert on["evaluations"] == 1 + 3          # float; a, b (batch 1, infeasible), c (batch 2)
    assert off["evaluations"] == 1 + 3 + 2     # ... and a, b again from {c: 4}
    assert on["infeasible_evaluations"] == 2 and off["infeasible_evaluations"] == 4


def test_greedy_picks_the_best_measured_score_in_a_batch():
    """Within a verified batch the feasible move with the best measured score (AI gained per unit
    of measured signal) wins, not the best estimate; with verify_top_k=1 the estimate's first
    choice is taken instead."""
    gx, gy = (W, "x"), (A, "y")
    est = {gx: 0.1, gy: 0.2}                    # x looks better
    real = {gx: 0.9, gy: 0.1}                   # y is better

    def evaluate(config):
        d = sum(real[g] for g, b in config.items() if b != FLOAT_BITS)
        return Measured(BASELINE - d, d, 0.0, d)

    def search(k):
        return greedy_search({gx: [4], gy: [4]}, lambda g, b: 1000 * b / 8, lambda g, b: est[g],
                             evaluate, Budget(1.0, 0.0), verify_top_k=k, fast_forward=False)
    r = search(2)
    assert [(e["kind"], e["name"]) for e in r["trajectory"][1:]] == [gy, gx]
    assert r["config"] == {gx: 4, gy: 4}
    assert [(e["kind"], e["name"]) for e in search(1)["trajectory"][1:]] == [gx, gy]


@pytest.mark.parametrize("fast_forward", [True, False])
def test_greedy_objective_ranks_moves_and_ai_is_still_reported(fast_forward):
    """With an objective (e.g. 1 / BitOps) the moves are ranked by what it gains, not by AI: two groups of
    equal estimated loss, x moving more bytes and y more "compute", are taken in opposite orders; the budget
    then stops each search after one move, and the trajectory's and the result's `ai` stay ai_of's."""
    gx, gy = (W, "x"), (W, "y")
    size, compute = {gx: 1000, gy: 100}, {gx: 10, gy: 1000}
    ai_of = lambda c: 1.0 / sum(size[g] * b / 8 for g, b in c.items())   # noqa: E731
    inverse_bitops = lambda c: 1.0 / sum(compute[g] * b for g, b in c.items())   # noqa: E731

    def evaluate(config):
        d = 0.6 * sum(b != FLOAT_BITS for b in config.values())   # any two narrowings break the 1-point budget
        return Measured(BASELINE - d, d, 0.0, d)

    def search(objective):
        return greedy_search({gx: [4], gy: [4]}, lambda g, b: size[g] * b / 8, lambda g, b: 0.5, evaluate,
                             Budget(1.0, 0.0), fast_forward=fast_forward, ai_of=ai_of, objective=objective)
    by_ai, by_bitops = search(None), search(inverse_bitops)
    assert by_ai["config"] == {gx: 4, gy: FLOAT_BITS} and by_bitops["config"] == {gx: FLOAT_BITS, gy: 4}
    for r in (by_ai, by_bitops):
        assert r["ai"] == ai_of(r["config"]) and [e["ai"] for e in r["trajectory"]] == \
            [ai_of(c) for c in replay([gx, gy], r["trajectory"])]


@pytest.mark.parametrize("joint", [False, True])
@pytest.mark.parametrize("fast_forward", [True, False])
def test_greedy_zero_budget_stays_float(fast_forward, joint):
    """With no budget and every narrowing lossy, nothing is accepted: all-float, 0 steps; without
    fast-forward each group's widest move is evaluated once (besides the float model; groups with
    an empty ladder have none) and its narrower widths are pruned within the same step, or every
    move is evaluated without pruning. (The estimate (32 - bits)^3 ranks each group's widest move
    before its narrower ones; with a flat estimate a narrower move can rank first and the wider
    one is then evaluated too, since pruning only blocks widths at or below an infeasible one.)"""
    f = Fake(0, a_ladder=(8, 4) if joint else ())
    movable = [g for g in f.groups if f.ladders[g]]
    assert len(movable) == len(f.names) * (2 if joint else 1)

    def evaluate(config):
        d = 0.0 if is_float(config) else 0.5
        return Measured(BASELINE - d, d, 0.0, d)
    est = lambda g, b: float((FLOAT_BITS - b) ** 3)
    res = greedy_search(f.ladders, f.bytes_of, est, evaluate, Budget(0.0, 0.0), fast_forward=fast_forward)
    assert res["steps"] == 0 and res["config"] == {g: FLOAT_BITS for g in f.groups}
    assert res["measured"] == Measured(BASELINE, 0.0, 0.0, 0.0) and res["stopped_by"] is None
    if not fast_forward:
        assert res["evaluations"] == 1 + len(movable)
        res = greedy_search(f.ladders, f.bytes_of, est, evaluate, Budget(0.0, 0.0), fast_forward=False,
                            prune_infeasible=False)
        assert res["evaluations"] == 1 + sum(len(f.ladders[g]) for g in movable) and res["pruned_moves"] == 0


def test_greedy_rejects_bad_verify_top_k():
    """verify_top_k < 1 is a ValueError."""
    f = Fake(0)
    with pytest.raises(ValueError):
        f.run(Budget(1.0), verify_top_k=0)


def test_greedy_ladders_are_normalized():
    """A ladder may be unsorted, repeat widths and list float: 32 is never a move and the search is
    the one on the clean descending ladder (same config, trajectory and evaluations)."""
    clean, messy = Fake(1, a_ladder=(8, 4)), Fake(1, a_ladder=(8, 4))
    messy.ladders = {g: [*reversed(lad), FLOAT_BITS, *lad] for g, lad in messy.ladders.items()}
    budget = Budget(2.0, BUDGET_Z)
    a, b = clean.run(budget), messy.run(budget)
    assert a["steps"] > 0
    assert (a["config"], a["trajectory"], a["evaluations"]) == (b["config"], b["trajectory"], b["evaluations"])
    assert clean.calls == messy.calls
    assert all(e["bits"] != FLOAT_BITS for e in b["trajectory"][1:])


def test_greedy_clamps_negative_estimates():
    """A group whose stage-2 estimate is negative (it 'gained' alone) is estimated at 0 in the
    greedy too: it ranks first (AI for no estimated loss) and the trajectory's running `estimated`
    never goes below 0."""
    gx, gy = (W, "x"), (A, "y")
    est = {gx: -0.5, gy: 0.3}

    def evaluate(config):
        d = 0.1 * sum(b != FLOAT_BITS for b in config.values())
        return Measured(BASELINE - d, d, 0.0, d)
    res = greedy_search({gx: [4], gy: [4]}, lambda g, b: 1000 * b / 8, lambda g, b: est[g], evaluate,
                        Budget(1.0, 0.0), verify_top_k=1, fast_forward=False)
    assert [((e["kind"], e["name"]), e["estimated"]) for e in res["trajectory"][1:]] == [(gx, 0.0), (gy, 0.3)]


@pytest.mark.parametrize("reverse", [False, True])
def test_greedy_ties_follow_ladder_order(reverse):
    """Moves with equal estimated score and equal AI gain are taken in the order of the ladders'
    groups (deterministic, whatever the kinds)."""
    groups = [(W, "p"), (A, "q"), (W, "r")]
    if reverse:
        groups.reverse()

    def evaluate(config):
        d = 0.1 * sum(b != FLOAT_BITS for b in config.values())
        return Measured(BASELINE - d, d, 0.0, d)
    res = greedy_search({g: [8] for g in groups}, lambda g, b: 1000 * b / 8, lambda g, b: 0.2, evaluate,
                        Budget(1.0, 0.0), verify_top_k=1, fast_forward=False)
    assert [(e["kind"], e["name"]) for e in res["trajectory"][1:]] == groups


@pytest.mark.parametrize("seed", range(4))
def test_joint_mode_moves_weights_and_tensors(seed):
    """With ladders [8, 4] for every weight group and every tensor group the greedy narrows both
    kinds, and the final config maps every group to a width from its ladder."""
    f = Fake(seed, n_layers=4, w_ladder=(8, 4), a_ladder=(8, 4), step=0.01)
    res = f.run(Budget(2.0, BUDGET_Z))
    assert {e["kind"] for e in res["trajectory"][1:]} == {W, A}
    assert set(res["config"]) == set(f.groups)
    for b in res["config"].values():
        assert b in (8, 4, FLOAT_BITS)
    assert any(b != FLOAT_BITS for g, b in res["config"].items() if g[0] == W)
    assert any(b != FLOAT_BITS for g, b in res["config"].items() if g[0] == A)
    replay(f.groups, res["trajectory"])


def estimate_path(f):
    """The configurations the estimate alone walks through (each step its best-ranked move), from
    a run whose budget nothing exceeds: then fast-forward goes to the end of its path."""
    g = greedy_search(f.ladders, f.bytes_of, f.est, f.measure, Budget(1e9, 0.0))
    assert all(e["phase"] == "fast-forward" for e in g["trajectory"][1:])
    return replay(f.groups, g["trajectory"])[1:]


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
    assert path[-1] == {g: min(f.ladders[g], default=FLOAT_BITS) for g in f.groups}   # down to the narrowest
    on_path = {ckey(c) for c in path}
    assert f.calls[0] == ckey({g: FLOAT_BITS for g in f.groups})
    ff_calls = 0
    for c in f.calls[1:]:
        if c not in on_path:
            break
        ff_calls += 1
    assert 1 <= ff_calls <= math.ceil(math.log2(len(path) + 1)) <= math.ceil(math.log2(len(path))) + 1
    feasible = [c for c in path if budget.holds(f.measure(c).drop, f.measure(c).se)]
    ff_entries = [e for e in runs[True]["trajectory"][1:] if e["phase"] == "fast-forward"]
    assert ff_entries and replay(f.groups, runs[True]["trajectory"])[len(ff_entries)] == feasible[-1]
    assert feasible[-1] == path[len(feasible) - 1]          # feasibility is monotone along the path
    assert ff_entries[-1]["verified"]
    assert sum(e["verified"] for e in ff_entries) <= ff_calls
    if len(feasible) < len(path):
        # the move out of the last feasible path config was measured infeasible: it is pruned, so
        # no later evaluation narrows that group as far (prune_infeasible=True)
        a, b = path[len(feasible) - 1], path[len(feasible)]
        (group,) = [g for g in f.groups if a[g] != b[g]]
        later = [dict(c) for c in f.calls[1 + ff_calls:]]
        assert later and all(c[group] > b[group] for c in later)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("fast_forward", [True, False])
def test_max_evaluations_is_a_hard_cap(seed, fast_forward):
    """evaluations <= max_evaluations always (the float model counts as one here); stopped_by is
    "max_evaluations" exactly when the cap is below what the uncapped search uses (then
    evaluations == cap), None otherwise (then the result is the uncapped one); a capped answer
    still holds the budget. The default ai_of is 1 / total bytes over every group."""
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
        assert r["ai"] == pytest.approx(f.ai_of(r["config"]), rel=1e-12)


def test_eval_cache():
    """EvalCache evaluates each distinct config once (dict order does not matter; a weight group
    and a tensor group of the same name are different keys), counts real evaluations, and
    remember() stores a known result without counting it."""
    calls = []
    cache = EvalCache(lambda c: calls.append(dict(c)) or Measured(90.0, 1.0 + len(calls), 0.1, 0.2))
    wx, ax = (W, "x"), (A, "x")
    a, b = {wx: 4, ax: FLOAT_BITS}, {ax: FLOAT_BITS, wx: 4}
    assert a not in cache and cache.get(a) is None
    m = cache(a)
    assert cache(b) is m and a in cache and cache.get(b) is m and cache.count == 1 and len(calls) == 1
    assert calls == [a]
    swapped = {wx: FLOAT_BITS, ax: 4}
    assert swapped not in cache and cache(swapped) is not m and cache.count == 2
    cache.remember({wx: FLOAT_BITS, ax: FLOAT_BITS}, Measured(92.0, 0.0, 0.0, 0.0))
    assert cache({wx: FLOAT_BITS, ax: FLOAT_BITS}).acc == 92.0 and cache.count == 2 and len(calls) == 2


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
        if is_float(config):
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
        assert v["config"] == front[v["index"]].config and v["est"] == front[v["index"]].est
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
    configuration is evaluated twice across both searches. Odd seeds search tensor widths too."""
    f = Fake(seed, n_layers=6, w_ladder=(8, 4, 3, 2), a_ladder=(8, 4) if seed % 2 else (), noise=noise)
    budget = Budget(1.0, BUDGET_Z)
    cache = EvalCache(f.evaluate)
    g = greedy_search(f.ladders, f.bytes_of, f.est, cache, budget)
    front = pareto_frontier(f.frontier_options())
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
    g = greedy_search(f.ladders, f.bytes_of, f.est, cache, budget)
    front = pareto_frontier(f.frontier_options())
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
    assert res["config"] is None and res["ai"] is None and res["measured"] is None and res["source"] is None
    assert "none of the" in res["note"]
    assert res["evaluations"] == cache.count <= 20
    assert res["verified"] and not any(v["feasible"] for v in res["verified"])


G = (W, "conv1")


def line_frontier(float_first=False):
    """Seven frontier points on one weight group, w = 8 .. 2 (est rising, bytes falling);
    optionally the all-float point in front."""
    pts = [FrontierPoint({G: w}, 0.1 * (9 - w), float(w)) for w in (8, 7, 6, 5, 4, 3, 2)]
    if float_first:
        pts.insert(0, FrontierPoint({G: FLOAT_BITS}, 0.0, 32.0))
    return pts


@pytest.mark.parametrize("feasible_w", [6, 4])
def test_verify_frontier_scans_up_from_the_float_end(feasible_w):
    """Non-monotone feasibility the bisection misses (only one mid-frontier point holds): the
    bisection finds no feasible point, so verification continues up from the float end until the
    first feasible non-float point, and stops there."""
    front = line_frontier()
    calls = []

    def evaluate(c):
        calls.append(c[G])
        d = 0.5 if c[G] == feasible_w else 5.0
        return Measured(BASELINE - d, d, 0.0, d)
    res = verify_frontier(front, evaluate, Budget(1.0, 0.0), lambda c: 1.0 / c[G], max_evaluations=24)
    assert res["config"] == {G: feasible_w} and res["source"] == "frontier"
    assert calls[:3] == [5, 7, 8]                      # the bisection: indices 3, 1, 0
    scanned = calls[3:]
    assert scanned == [w for w in (6, 4, 3, 2) if w >= feasible_w]   # up from the float end, skipping done ones
    assert len(calls) == len(set(calls)) == res["evaluations"]


def test_verify_frontier_scans_past_a_feasible_float_point():
    """With the all-float config first on the frontier (every quantized option has a positive
    estimate, the usual case with KL) and remembered as feasible, finding only it does not end the
    search: verification goes on up for a feasible non-float point."""
    front = line_frontier(float_first=True)
    cache = EvalCache(lambda c: Measured(BASELINE - (0.5 if c[G] == 4 else 5.0), 0.5 if c[G] == 4 else 5.0, 0.0, 0.0))
    cache.remember({G: FLOAT_BITS}, Measured(BASELINE, 0.0, 0.0, 0.0))
    res = verify_frontier(front, cache, Budget(1.0, 0.0), lambda c: 1.0 / c[G], max_evaluations=24)
    assert res["config"] == {G: 4}
    assert any(v["config"] == {G: FLOAT_BITS} and v["feasible"] for v in res["verified"])


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
    calls (verified points already measured by the greedy cost nothing). Odd seeds search tensor
    widths too."""
    f = Fake(seed, n_layers=5, w_ladder=(8, 4, 2), a_ladder=(8,) if seed % 2 else (), noise=0.2)
    budget = Budget(1.0, BUDGET_Z)
    cache = EvalCache(f.evaluate)
    g = greedy_search(f.ladders, f.bytes_of, f.est, cache, budget)
    n_greedy = len(f.calls)
    assert g["evaluations"] == n_greedy == cache.count
    front = pareto_frontier(f.frontier_options())
    v = verify_frontier(front, cache, budget, f.ai_of, max_evaluations=50, seed_config=g["config"])
    assert v["evaluations"] == len(f.calls) - n_greedy == cache.count - n_greedy
    assert len(f.calls) == len(set(f.calls))
    greedy_seen = set(f.calls[:n_greedy])
    verified_keys = {ckey(x["config"]) for x in v["verified"]}
    assert len(verified_keys) == v["evaluations"] + len(verified_keys & greedy_seen)


def test_most_accurate_above_evaluates_the_cheapest_estimates_that_reach_the_ai():
    """most_accurate_above: only frontier points with AI >= the floor are evaluated, the smallest estimates first,
    at most max_evaluations of them, and the answer is the most accurate measured; an unreachable floor gives no
    configuration and says why."""
    from quant.search import FrontierPoint, Measured, most_accurate_above
    frontier = [FrontierPoint(config={"g": b}, est=e, bytes=by) for b, e, by in
                ((32, 0.0, 100.0), (8, 0.1, 50.0), (6, 0.2, 40.0), (4, 0.5, 25.0), (3, 0.9, 20.0), (2, 2.0, 10.0))]
    acc = {32: 90.0, 8: 89.9, 6: 89.0, 4: 88.5, 3: 88.7, 2: 60.0}
    seen = []

    def evaluate(cfg):
        seen.append(cfg["g"])
        return Measured(acc[cfg["g"]], 90.0 - acc[cfg["g"]], 0.1, 0.0)
    ai_of = lambda c: 1000.0 / next(p.bytes for p in frontier if p.config == c)   # noqa: E731
    out = most_accurate_above(frontier, 1000.0 / 30, evaluate, ai_of, max_evaluations=2)
    assert seen == [4, 3] and out["config"] == {"g": 3} and out["eligible"] == 3 and out["evaluations"] == 2
    assert out["ai"] == 1000.0 / 20 and out["source"] == "min-ai"
    seen.clear()
    assert most_accurate_above(frontier, 1000.0 / 30, evaluate, ai_of, max_evaluations=1)["config"] == {"g": 4}
    none = most_accurate_above(frontier, 1000.0 / 5, evaluate, ai_of)
    assert none["config"] is None and "reaches" in none["note"] and seen == [4]
