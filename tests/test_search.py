"""Property tests for utils/search.py, with fake evaluators instead of models."""
import itertools
import math
import random
import time
import zlib

import pytest

from utils.config import FLOAT_BITS
from utils.search import (EvalCache, FrontierPoint, clamp_drop, greedy_search, pareto_frontier,
                          verify_frontier)

BASELINE = 92.0


def rkey(drop):
    return round(drop, 6)


def random_problem(seed, n_layers=5, widths=(8, 4, 2), step=0.02, allow_negative=True):
    """Options, true drops and sizes of a small random problem; drops are multiples of `step`."""
    rng = random.Random(seed)
    options, params = {}, {}
    for i in range(n_layers):
        name = f"layer{i}.conv"
        p = rng.choice([64, 128, 256, 512, 1000])   # repeats make byte ties likely
        params[name] = p
        opts = [(FLOAT_BITS, p * 4.0, 0.0)]
        for k, b in enumerate(sorted(widths, reverse=True)):
            d = rng.randint(0, 10 * (k + 1) ** 2) * step
            if allow_negative and rng.random() < 0.15:
                d = -rng.randint(1, 5) * step
            opts.append((b, p * b / 8, d))
        options[name] = opts
    return options, params


def brute_force_frontier(options):
    names = list(options)
    pts = set()
    for combo in itertools.product(*(options[n] for n in names)):
        d = sum(clamp_drop(o[2]) for o in combo)
        b = sum(o[1] for o in combo)
        pts.add((rkey(d), b))
    return {p for p in pts if not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in pts)}


def recompute(options, config):
    d = b = 0.0
    for n, bits in config.items():
        (opt,) = [o for o in options[n] if o[0] == bits]
        d += clamp_drop(opt[2])
        b += opt[1]
    return d, b


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("step", [0.02, 0.0137])
def test_frontier_equals_brute_force(seed, step):
    """The DP frontier is exactly the non-dominated set of all configurations, and each point's
    config recomputes to its stated drop and bytes (even for drops that are not exact floats)."""
    options, _ = random_problem(seed, step=step)
    front = pareto_frontier(options)
    assert {(rkey(p.est_drop), p.bytes) for p in front} == brute_force_frontier(options)
    assert len(front) == len({(rkey(p.est_drop), p.bytes) for p in front})
    for p in front:
        assert list(p.config) == list(options)
        d, b = recompute(options, p.config)
        assert d == pytest.approx(p.est_drop, abs=1e-9) and b == p.bytes


@pytest.mark.parametrize("seed", range(5))
def test_frontier_sorted_and_nondominated(seed):
    """Sorted by drop ascending with bytes strictly descending; first point has zero drop and
    the last has the global minimum bytes."""
    options, _ = random_problem(seed, n_layers=7, widths=(8, 6, 4, 3, 2))
    front = pareto_frontier(options)
    for a, b in zip(front, front[1:]):
        assert a.est_drop < b.est_drop and a.bytes > b.bytes
    assert front[0].est_drop == 0.0
    assert front[-1].bytes == sum(min(o[1] for o in opts) for opts in options.values())


def test_negative_drops_are_clamped():
    """A layer that gained accuracy alone does not pay for another layer's loss: estimates are
    never negative and the zero-drop point does not quantize the lossy layer."""
    options = {"a": [(32, 400.0, 0.0), (4, 50.0, -0.5)],
               "b": [(32, 400.0, 0.0), (4, 50.0, 0.5)]}
    front = pareto_frontier(options)
    assert all(p.est_drop >= 0 for p in front)
    assert front[0].config == {"a": 4, "b": 32} and front[0].est_drop == 0.0
    assert front[-1].config == {"a": 4, "b": 4} and front[-1].est_drop == pytest.approx(0.5)
    assert len(front) == 2


def test_frontier_cap_is_the_restricted_frontier():
    """With max_est_drop the result is the full frontier's points with est_drop <= cap."""
    options, _ = random_problem(3, n_layers=8, widths=(8, 6, 4, 3, 2))
    full = pareto_frontier(options)
    capped = pareto_frontier(options, max_est_drop=1.0)
    assert [(rkey(p.est_drop), p.bytes) for p in capped] == \
           [(rkey(p.est_drop), p.bytes) for p in full if p.est_drop <= 1.0 + 1e-9]


def test_frontier_rejects_bad_input():
    with pytest.raises(ValueError):
        pareto_frontier({})
    with pytest.raises(ValueError):
        pareto_frontier({"a": []})
    with pytest.raises(ValueError):
        pareto_frontier({"a": [(32, 4.0, 0.0), (4, 1.0, float("nan"))]})


def test_frontier_is_fast():
    """22 layers x 6 options with drops in multiples of 0.02 (a ResNet-20 sized problem) < 1 s."""
    options, _ = random_problem(0, n_layers=22, widths=(8, 6, 4, 3, 2), allow_negative=True)
    t = time.perf_counter()
    front = pareto_frontier(options)
    assert time.perf_counter() - t < 1.0
    assert len(front) > 10


# ---------------------------------------------------------------- greedy

def greedy_fixture(seed, noise=0.3):
    """Layer sizes, the per-layer drop table the search sees, and a fake evaluate whose real
    accuracy is baseline - additive true drops +/- deterministic per-config interaction noise."""
    options, params = random_problem(seed, n_layers=5, widths=(8, 6, 4, 3, 2), step=0.02)
    names = list(options)
    table = {(n, o[0]): o[2] for n in names for o in options[n]}
    calls = []

    def bytes_of(name, bits):
        return params[name] * bits / 8

    def est_drop(name, bits):
        return table[(name, bits)]

    def evaluate(config):
        calls.append(tuple(config.items()))
        true = sum(clamp_drop(table[(n, b)]) for n, b in config.items())
        h = zlib.crc32(repr(sorted(config.items())).encode())
        return BASELINE - true + noise * ((h % 2001) / 1000.0 - 1.0)

    return names, bytes_of, est_drop, evaluate, calls


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("max_drop", [0.5, 1.0, 3.0])
def test_greedy_invariants(seed, max_drop):
    """Every accepted step is within budget, AI strictly increases, the search stops only when
    every single narrower move from the final config is infeasible, and the evaluation count is
    the number of distinct configs evaluated (no config evaluated twice)."""
    ladder = [8, 6, 4, 3, 2]
    names, bytes_of, est_drop, evaluate, calls = greedy_fixture(seed)
    accepted = []
    res = greedy_search(names, ladder, bytes_of, est_drop, evaluate, BASELINE, max_drop,
                        verify_top_k=3, on_accept=accepted.append)
    traj = res["trajectory"]
    assert traj[0]["layer"] is None and traj[0]["val_acc"] == BASELINE
    assert res["steps"] == len(traj) - 1 == len(accepted)
    for e in traj:
        assert e["val_acc"] >= BASELINE - max_drop - 1e-9
    for a, b in zip(traj, traj[1:]):
        assert b["ai"] > a["ai"]
        assert b["bits"] < b["from_bits"]
    assert res["val_acc"] >= BASELINE - max_drop - 1e-9
    assert res["val_acc"] == traj[-1]["val_acc"] and res["ai"] == traj[-1]["ai"]
    assert list(res["config"]) == names
    if accepted:
        assert accepted[-1] == res["config"]
    # Stop condition: no single narrower move is feasible.
    for n in names:
        for b in ladder:
            if b < res["config"][n]:
                assert evaluate(dict(res["config"], **{n: b})) < BASELINE - max_drop
    del calls[res["evaluations"]:]
    # Caching: distinct configs only, and the count is the real call count.
    assert len(calls) == len(set(calls)) == res["evaluations"]
    # Trajectory est_drop is the additive estimate of the config at that step.
    cfg = {n: FLOAT_BITS for n in names}
    for e in traj[1:]:
        cfg[e["layer"]] = e["bits"]
        assert e["est_drop"] == pytest.approx(sum(clamp_drop(est_drop(n, b)) if b != FLOAT_BITS else 0
                                                  for n, b in cfg.items()))
    assert cfg == res["config"]


def test_greedy_moves_past_an_infeasible_batch():
    """If every move in the top-k batch fails for real, the next batch is verified and a feasible
    move there is accepted: the estimate only orders verification, it never decides."""
    names = ["a", "b", "c"]
    size = {"a": 1000, "b": 1000, "c": 100}
    est = {"a": 0.0, "b": 0.0, "c": 0.5}           # table says a and b are free
    real = {"a": 5.0, "b": 5.0, "c": 0.4}           # but they are not

    def evaluate(config):
        return BASELINE - sum(real[n] * (b < FLOAT_BITS) for n, b in config.items())

    res = greedy_search(names, [4], lambda n, b: size[n] * b / 8,
                        lambda n, b: est[n] if b < FLOAT_BITS else 0.0,
                        evaluate, BASELINE, 1.0, verify_top_k=2)
    assert res["config"] == {"a": 32, "b": 32, "c": 4}
    assert res["evaluations"] == 3 + 2          # step 1: a, b, c; step 2: a, b (both infeasible)


def test_greedy_picks_best_real_score_in_batch():
    """Within a verified batch the move with the best measured AI-per-point wins, not the best
    estimate."""
    names = ["a", "b"]
    res = greedy_search(names, [4], lambda n, b: 1000 * b / 8,
                        lambda n, b: {"a": 0.1, "b": 0.2}[n] if b < FLOAT_BITS else 0.0,
                        lambda c: BASELINE - (0.9 if c["a"] < 32 else 0) - (0.1 if c["b"] < 32 else 0),
                        BASELINE, 1.0, verify_top_k=2)
    assert res["trajectory"][1]["layer"] == "b"
    assert res["config"] == {"a": 4, "b": 4}


def test_greedy_zero_budget_stays_float():
    """With no budget and every move lossy the search accepts nothing and returns all-float."""
    names, bytes_of, est_drop, _, _ = greedy_fixture(0)
    res = greedy_search(names, [8, 4, 2], bytes_of, est_drop, lambda c: BASELINE - 0.5, BASELINE, 0.0)
    assert res["steps"] == 0 and res["config"] == {n: 32 for n in names}
    assert res["val_acc"] == BASELINE and res["evaluations"] == len(names) * 3


def test_greedy_progress_and_custom_ai():
    """progress sees each accepted step; ai_of, when given, is what the trajectory reports."""
    names, bytes_of, est_drop, evaluate, _ = greedy_fixture(1)
    flops = 1e6
    seen = []
    res = greedy_search(names, [8, 4], bytes_of, est_drop, evaluate, BASELINE, 2.0,
                        ai_of=lambda c: flops / sum(bytes_of(n, b) for n, b in c.items()),
                        progress=lambda step, info: seen.append((step, info["evaluations"])))
    assert [s for s, _ in seen] == list(range(1, res["steps"] + 1))
    assert res["ai"] == pytest.approx(flops / sum(bytes_of(n, b) for n, b in res["config"].items()))


# ---------------------------------------------------------------- verify_frontier

def frontier_fixture(seed):
    options, params = random_problem(seed, n_layers=6, widths=(8, 4, 3, 2))
    front = pareto_frontier(options)

    def ai_of(config):
        return 1e6 / sum(params[n] * b / 8 for n, b in config.items())

    return options, front, ai_of


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("max_evaluations", [1, 3, 10])
def test_verify_frontier_picks_highest_ai_feasible_verified(seed, max_evaluations):
    """The result is feasible and has the highest AI of all feasible points it evaluated; it
    evaluates at most max_evaluations configs, only candidates within slack x budget."""
    options, front, ai_of = frontier_fixture(seed)
    calls = []

    def evaluate(config):
        calls.append(tuple(config.items()))
        d, _ = recompute(options, config)
        h = zlib.crc32(repr(config).encode())
        return BASELINE - 1.3 * d + 0.2 * (h % 3)      # estimate is optimistic by 30%

    res = verify_frontier(front, evaluate, BASELINE, 1.0, ai_of, max_evaluations=max_evaluations)
    assert res["evaluations"] == len(calls) == len(set(calls)) <= max_evaluations
    assert all(v["est_drop"] <= 2.0 + 1e-9 for v in res["verified"])
    assert res["val_acc"] >= BASELINE - 1.0 - 1e-9
    feas = [v for v in res["verified"] if v["val_acc"] >= BASELINE - 1.0 - 1e-9]
    if feas:
        assert res["ai"] == max(v["ai"] for v in feas)
        assert res["config"] == max(feas, key=lambda v: v["ai"])["config"]
    else:
        assert res["config"] == {n: 32 for n in options} and res["note"]


@pytest.mark.parametrize("seed", range(6))
def test_verify_frontier_bisection_finds_the_boundary(seed):
    """With feasibility monotone along the frontier, the answer is exactly the highest-AI
    feasible candidate, found in at most ceil(log2(n + 1)) evaluations of n candidates."""
    options, front, ai_of = frontier_fixture(seed)
    cands = [p for p in front if p.est_drop <= 2.0 + 1e-9]
    evaluate = lambda c: BASELINE - 1.3 * recompute(options, c)[0]   # monotone in the estimate
    res = verify_frontier(front, evaluate, BASELINE, 1.0, ai_of, max_evaluations=50)
    feasible = [p for p in cands if BASELINE - 1.3 * p.est_drop >= BASELINE - 1.0 - 1e-9]
    best = max(feasible, key=lambda p: ai_of(p.config))
    assert res["config"] == best.config and res["note"] is None
    assert res["evaluations"] <= math.ceil(math.log2(len(cands) + 1))


def test_verify_frontier_all_float_fallback():
    """When every verified point is infeasible the answer is all-float at baseline accuracy,
    with a note, and no evaluation is spent on the float model; the bisection walks down to the
    lowest-estimate point."""
    options, front, ai_of = frontier_fixture(2)
    cache = EvalCache(lambda c: BASELINE - 50.0)
    res = verify_frontier(front, cache, BASELINE, 1.0, ai_of, max_evaluations=20)
    assert res["config"] == {n: 32 for n in options}
    assert res["val_acc"] == BASELINE and res["est_drop"] == 0.0 and res["note"]
    assert res["evaluations"] == cache.count <= 20
    assert front[0].config in [v["config"] for v in res["verified"]]


def test_verify_frontier_budget_note():
    """A budget too small for the bisection to converge is reported in the note."""
    options, front, ai_of = frontier_fixture(4)
    res = verify_frontier(front, lambda c: BASELINE - 0.5 * recompute(options, c)[0], BASELINE, 1.0, ai_of,
                          max_evaluations=1)
    assert res["evaluations"] == 1 and "budget" in res["note"]


def test_shared_cache_between_searches():
    """A config measured by the greedy is not evaluated again by verify_frontier."""
    names, bytes_of, est_drop, evaluate, calls = greedy_fixture(5)
    cache = EvalCache(evaluate)
    g = greedy_search(names, [8, 6, 4, 3, 2], bytes_of, est_drop, cache, BASELINE, 1.0)
    n_greedy = len(calls)
    assert g["evaluations"] == n_greedy == cache.count
    options = {n: [(b, bytes_of(n, b), est_drop(n, b) if b != 32 else 0.0) for b in (32, 8, 6, 4, 3, 2)]
               for n in names}
    front = pareto_frontier(options)
    ai_of = lambda c: 1.0 / sum(bytes_of(n, b) for n, b in c.items())
    v = verify_frontier(front, cache, BASELINE, 1.0, ai_of, max_evaluations=50)
    assert v["evaluations"] == len(calls) - n_greedy == cache.count - n_greedy
    assert len(calls) == len(set(calls))
    cached_hits = sum(1 for x in v["verified"] if tuple(x["config"].items()) in calls[:n_greedy])
    assert len(v["verified"]) == v["evaluations"] + cached_hits


def test_frontier_point_is_a_dataclass():
    p = FrontierPoint(config={"a": 4}, est_drop=0.1, bytes=2.0)
    assert p.config == {"a": 4} and p.bytes == 2.0
