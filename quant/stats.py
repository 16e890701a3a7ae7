"""Statistics of accuracies measured on finite image sets: intervals, paired drops, the budget test.

On n images one image is 100/n points, and two models evaluated on the same images disagree on
only a few percent of them, so a drop is a *paired* quantity: its standard error comes from the
images that flip (right -> wrong, wrong -> right), not from two independent accuracies.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

Z95 = 1.959963984540054          # two-sided 95%
# The margin of the rule used when there is no confirm split (--confirm-size 0): with drop d measured
# at standard error s, a fresh split of the same size measures about N(d, 2 s^2), so d + 1.645 *
# sqrt(2) * s <= budget keeps a fixed configuration within budget on fresh data 95% of the time. A
# configuration *selected* by a search is not fixed, and the rule can fail under selection (10% on a
# harsher simulated network), which is why the pipeline confirms its answer on held-back images
# (quant/confirm.py) and searches with margin 0. README "A budget that holds out of sample".
BUDGET_Z = 1.6448536269514722 * math.sqrt(2)
FEASIBILITY_TOL = 1e-9


def wilson_interval(k: int, n: int, z: float = Z95) -> list[float]:
    """Wilson score interval of an accuracy k/n, in percent."""
    if n <= 0:
        return [0.0, 100.0]
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return [0.0 if k == 0 else 100.0 * max(0.0, centre - half), 100.0 if k == n else 100.0 * min(1.0, centre + half)]


@dataclass(frozen=True)
class PairedDrop:
    """Accuracy drop of a candidate against a reference on the same n images."""
    drop: float      # points: reference accuracy - candidate accuracy
    se: float        # points: standard error of the mean per-image difference
    lost: int        # images the reference gets right and the candidate wrong
    gained: int      # the other way round
    n: int


def paired_drop(ref_correct, cand_correct) -> PairedDrop:
    ref = torch.as_tensor(ref_correct, dtype=torch.bool)
    cand = torch.as_tensor(cand_correct, dtype=torch.bool)
    if ref.shape != cand.shape:
        raise ValueError(f"paired_drop needs the same images: {tuple(ref.shape)} vs {tuple(cand.shape)}")
    n = len(ref)
    lost, gained = int((ref & ~cand).sum()), int((~ref & cand).sum())
    d = (lost - gained) / n
    var = max(0.0, (lost + gained) / n - d * d) * n / max(n - 1, 1)   # sample variance of d_i in {-1, 0, 1}
    return PairedDrop(100.0 * d, 100.0 * math.sqrt(var / n), lost, gained, n)


def bootstrap_drop_interval(p: PairedDrop, level: float = 0.95, resamples: int = 20000, seed: int = 0) -> list[float]:
    """Percentile interval of a paired drop by the paired bootstrap: images resampled with replacement,
    each keeping its (reference, candidate) pair. Only the counts of lost / gained / unchanged images
    matter, so a resample is one multinomial draw."""
    if p.lost + p.gained == 0:
        return [0.0, 0.0]
    probs = [p.lost / p.n, p.gained / p.n, 1.0 - (p.lost + p.gained) / p.n]
    counts = np.random.default_rng(seed).multinomial(p.n, probs, size=resamples)
    drops = 100.0 * (counts[:, 0] - counts[:, 1]) / p.n
    a = (1.0 - level) / 2
    # Ends on the grid of attainable drops (multiples of 100/n), rounded outward: no interpolated
    # -0.15025, and never narrower than the interpolated interval.
    lo, hi = np.quantile(drops, a, method="lower"), np.quantile(drops, 1 - a, method="higher")
    return [round(float(lo), 10), round(float(hi), 10)]


@dataclass(frozen=True)
class Budget:
    """The accuracy promise: drop + z * SE <= max_drop, on the search images."""
    max_drop: float
    z: float = BUDGET_Z

    def holds(self, drop: float, se: float) -> bool:
        return drop + self.z * se <= self.max_drop + FEASIBILITY_TOL

    def to_json(self) -> dict:
        return {"max_drop": self.max_drop, "z": self.z,
                "rule": "search drop + z * paired standard error <= max_drop"}
