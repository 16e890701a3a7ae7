"""The confirm step: fixed-sequence testing of the search's candidates on images the search never saw.

The search (stage 3) asks hundreds of questions of its own images and stops at the budget's edge,
so its answer is selected for luck on those images (the winner's curse), and no margin on the
search images removes that for every structure of network. The guarantee therefore comes from a
separate *confirm split*:

1. On its own images the search fixes an ordered list of candidate configurations **before any
   confirm image is seen**: the greedy's trajectory from the float end (``greedy_sequence``), or
   Pareto frontier points in order of AI (``frontier_sequence``).
   Two lists (greedy and Pareto) are chained into one (``confirm_chain``): the second is reached only
   when every configuration of the first passed.
2. ``confirm_sequence`` then evaluates them on the confirm split in that order. A configuration
   passes when ``confirm drop + z * SE <= max_drop`` (``z = CONFIRM_Z``: one-sided 5%); the test
   stops at the first failure and accepts the last configuration before it (none: the caller
   keeps the float model).

Why this bounds P(true drop of the accepted configuration > budget) by 5% with no correction for
multiplicity. Let H_i be "configuration i's true (population) drop exceeds the budget"; passing
configuration i is rejecting H_i with a one-sided z test of level alpha = 5%. The order is fixed
independently of the confirm images. A wrong acceptance means some accepted configuration k has
H_k true; every configuration before k passed too. Let j be the *first* index in the sequence
whose H_j is true (fixed by the sequence, not by the data): k >= j, so a wrong acceptance implies
that H_j was rejected, and P(reject H_j) <= alpha. Hence P(any true H rejected) <= alpha — the
family-wise error of fixed-sequence testing — and in particular P(the accepted configuration is
over budget) <= alpha, however long the sequence and however the true drops vary along it
(they need not be monotone). The bound holds conditionally on the search split, so for any
search procedure that only looks at the search images.

Why stepping back from the search's answer until something passes does not have this property:
that order starts at the *end* (the most aggressive configuration), and keeps testing as long as
tests *fail*. If the last m configurations all have true drops just over the budget, each gets
its own 5% chance to pass by luck, and the first lucky one is accepted: P(wrong acceptance) is
about 1 - 0.95^m, not 5%. Fixed-sequence testing stops at the first failure instead, so only one
over-budget hypothesis (the first) ever gets a chance to be rejected wrongly.

The z test is a normal approximation (a paired drop on ~2,000 images is a mean of ~100-200 nonzero
per-image differences); tests/test_budget.py measures the rate on simulated networks with the
real greedy search.
"""
from __future__ import annotations

import math
import statistics
from typing import Callable

from quant.stats import Budget
from quant.widths import FLOAT_BITS, config_key

CONFIRM_Z = 1.6448536269514722    # one-sided 5%: P(N(0, 1) > z) = 0.05
CONFIRM_ALPHA = 0.05


def confirm_z(sequences: int, alpha: float = CONFIRM_ALPHA) -> float:
    """The one-sided z of each of `sequences` fixed-sequence tests whose accepted answers compete: level
    alpha / sequences each (Bonferroni), so that whichever accepted answer is shipped is over budget with
    probability at most alpha. Stage 3 chains its two sequences instead (``confirm_chain``), at the full alpha."""
    return statistics.NormalDist().inv_cdf(1.0 - alpha / max(1, sequences))


def thin_sequence(sequence, ai_of: Callable, step: float) -> list[dict]:
    """The configurations of `sequence` (rising AI) kept for the confirm test at AI granularity `step`: each
    one whose AI is at least (1 + step) times the last kept one's, and always the last. Thinning is fixed by
    the search alone, so the thinned list is a fixed sequence too and the guarantee stands. Along a sequence of
    rising AI, every kept configuration up to the one the full test accepts passes as it did there, so the
    thinned test accepts at least 1 / (1 + step) of that AI (more, if it skips the full test's first failure),
    and saves the evaluations in between. ``step`` 0 keeps every configuration."""
    if not (isinstance(step, (int, float)) and math.isfinite(step) and step >= 0):
        raise ValueError(f"step must be a finite number >= 0, got {step!r}")
    sequence = list(sequence)
    if step == 0 or len(sequence) < 2:
        return sequence
    out, last = [], None
    for i, config in enumerate(sequence):
        ai = ai_of(config)
        if last is None or ai >= last * (1.0 + step) or i == len(sequence) - 1:
            out.append(config)
            last = ai
    return out


def confirm_sequence(sequence, evaluate: Callable, max_drop: float, z: float = CONFIRM_Z,
                     max_evaluations: int | None = None) -> dict:
    """Test ``sequence`` (configurations fixed before the confirm images were seen) in order on the
    confirm split and accept the last one before the first failure.

    ``evaluate(config) -> quant.search.Measured`` measures a configuration on the confirm split
    (``drop`` and ``se`` in points, paired against the float model). A configuration passes when
    ``drop + z * se <= max_drop`` (within ``quant.stats.FEASIBILITY_TOL``, as ``Budget.holds``).
    A configuration equal to one tested before is not evaluated again. ``max_evaluations`` caps the
    evaluations: when the cap is reached before a failure, the last passing configuration is
    accepted and ``stopped_by`` is ``"max_evaluations"`` (the tested prefix is still a fixed
    sequence, so the guarantee stands).

    Returns ``{"accepted": index or -1, "config": the accepted config or None, "measured": its
    Measured or None, "first_failure": index or None, "tested": [{"index", "drop", "se",
    "passed"}], "evaluations": n, "z": z, "stopped_by": "max_evaluations" or None}``. ``accepted``
    -1 (nothing passed, or nothing tested) means the caller falls back to the float model.
    """
    sequence = list(sequence)
    if not (isinstance(max_drop, (int, float)) and math.isfinite(max_drop)):
        raise ValueError(f"max_drop must be a finite number, got {max_drop!r}")
    if not (isinstance(z, (int, float)) and math.isfinite(z)):
        raise ValueError(f"z must be a finite number, got {z!r}")
    if max_evaluations is not None and max_evaluations < 0:
        raise ValueError(f"max_evaluations must be >= 0 or None, got {max_evaluations}")
    rule = Budget(float(max_drop), float(z))
    seen: dict[tuple, object] = {}
    tested, evaluations = [], 0
    accepted, first_failure, stopped_by, measured = -1, None, None, None
    for i, config in enumerate(sequence):
        key = config_key(config)
        m = seen.get(key)
        if m is None:
            if max_evaluations is not None and evaluations >= max_evaluations:
                stopped_by = "max_evaluations"
                break
            m = evaluate(dict(config))
            evaluations += 1
            seen[key] = m
        passed = bool(rule.holds(m.drop, m.se))
        tested.append({"index": i, "drop": m.drop, "se": m.se, "passed": passed})
        if not passed:
            first_failure = i
            break
        accepted, measured = i, m
    return {"accepted": accepted, "config": dict(sequence[accepted]) if accepted >= 0 else None,
            "measured": measured, "first_failure": first_failure, "tested": tested,
            "evaluations": evaluations, "z": float(z), "stopped_by": stopped_by}


def confirm_chain(parts, evaluate: Callable, max_drop: float, z: float = CONFIRM_Z,
                  max_evaluations: int | None = None) -> list[dict]:
    """Serial gatekeeping: the sequences in ``parts`` (each fixed before the confirm images were seen) tested as
    *one* fixed sequence, part after part, with ``confirm_sequence``. A later part is reached only when every
    configuration of the parts before it passed, so the family-wise error is that of one fixed sequence
    (``alpha``, not ``alpha`` per part) and no level is split between the parts (Bonferroni would test each of
    two at ``alpha / 2``). The accepted configuration is the chain's last pass before its first failure.

    Returns one result per part, in ``confirm_sequence``'s form with indices within the part, plus
    ``"reached"`` (whether its first configuration was tested; a part that is empty or not reached has
    ``accepted`` -1 and nothing tested). ``evaluations`` counts the part's own (a configuration equal to one
    tested earlier in the chain is not evaluated again); ``stopped_by`` is the chain's."""
    parts = [list(p) for p in parts]
    flat = [c for p in parts for c in p]
    measured = {}

    def remember(config):
        m = measured[config_key(config)] = evaluate(config)
        return m
    c = confirm_sequence(flat, remember, max_drop, z, max_evaluations)
    first = {}
    for i, config in enumerate(flat):
        first.setdefault(config_key(config), i)
    evaluated = sorted(first[k] for k in measured)   # where each evaluation happened (repeats are not evaluated)
    out, start = [], 0
    for p in parts:
        stop = start + len(p)
        tested = [dict(t, index=t["index"] - start) for t in c["tested"] if start <= t["index"] < stop]
        accepted = c["accepted"] - start if c["accepted"] >= start else -1
        accepted = min(accepted, len(p) - 1)
        ff = c["first_failure"]
        out.append({"accepted": accepted, "config": dict(p[accepted]) if accepted >= 0 else None,
                    "measured": measured[config_key(p[accepted])] if accepted >= 0 else None,
                    "first_failure": ff - start if ff is not None and start <= ff < stop else None,
                    "tested": tested, "reached": bool(tested),
                    "evaluations": sum(start <= i < stop for i in evaluated),
                    "z": c["z"], "stopped_by": c["stopped_by"]})
        start = stop
    return out


def chain_parts(greedy: list, pareto: list, ai_of: Callable, step: float = 0.0) -> list[list[dict]]:
    """Stage 3's two lists as ``confirm_chain``'s parts: the greedy's, and the Pareto candidates with more AI than
    its last configuration (all of Pareto's when the greedy's is empty, from float), each thinned to `step`."""
    greedy = thin_sequence(greedy, ai_of, step)
    top = ai_of(greedy[-1]) if greedy else None
    return [greedy, thin_sequence([c for c in pareto if top is None or ai_of(c) > top], ai_of, step)]


def greedy_sequence(result: dict, start_config: dict) -> list[dict]:
    """The greedy's trajectory as a fixed sequence: the configuration after each step, from the
    all-float ``start_config`` (every group of the search at ``FLOAT_BITS``; a caller's base widths
    for groups the search does not move may be in it too).

    ``result`` is ``greedy_search``'s return value: each trajectory entry after step 0 narrows group
    ``(kind, name)`` to ``bits``. The last configuration equals ``result["config"]`` (checked:
    a mismatch raises ``ValueError``); a search that took no step gives an empty list.
    """
    config = dict(start_config)
    out = []
    for entry in result["trajectory"]:
        if entry.get("kind") is None:        # step 0: the start
            continue
        group = (entry["kind"], entry["name"])
        if group not in config:
            raise ValueError(f"trajectory step {entry.get('step')} moves {group}, which the start config lacks")
        config[group] = entry["bits"]
        out.append(dict(config))
    final = result.get("config")
    if final is not None:
        last = out[-1] if out else dict(start_config)
        if any(last.get(g) != b for g, b in final.items()):
            raise ValueError("replaying the trajectory from the start config does not reach result['config']")
    return out


def pareto_sequence(result: dict, ai_of) -> list[dict]:
    """``verify_frontier``'s result (its answer in ``config``) as a fixed sequence: the frontier points it verified
    within budget below the answer's AI, then the answer, in order of AI."""
    answer_ai = ai_of(result["config"])
    return frontier_sequence([v["config"] for v in result["verified"] if v["feasible"] and v["ai"] < answer_ai]
                             + [result["config"]], ai_of)


def frontier_sequence(points, ai_of) -> list[dict]:
    """Pareto frontier configurations (``FrontierPoint`` or plain config dicts) as a fixed sequence:
    in order of AI, lowest first, without the all-float point and without repeats. Fix it (and
    any thinning) before the confirm images are seen."""
    configs = [dict(getattr(p, "config", p)) for p in points]
    configs = [c for c in configs if any(b != FLOAT_BITS for b in c.values())]
    configs.sort(key=ai_of)
    out, seen = [], set()
    for c in configs:
        k = config_key(c)
        if k not in seen:
            seen.add(k)
            out.append(c)
    return out
