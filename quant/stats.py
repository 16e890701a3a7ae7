"""Statistics of accuracies measured on finite image sets: intervals, paired drops, the budget test.

On n images one image is 100/n points, and two models evaluated on the same images disagree on
only a few percent of them, so a drop is a *paired* quantity: its standard error comes from the
images that flip (right -> wrong, wrong -> right), not from two independent accuracies.

**Ties.** Quantized logits can tie (4-bit logits take a dozen values), and ``argmax`` would give every
tie to the lowest class index, so accuracy would depend on the order of the classes. Here an image
whose top-1 is a tie among k classes, the label among them, counts 1/k correct: the expectation of a
random tie-break, computed deterministically (``top1_credit``). Every accuracy, paired drop and
interval is computed from these per-image credits.
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
# The search's early stop (EarlyStop): a configuration is dropped once its paired drop on the images seen so
# far exceeds the budget by this many standard errors, at the earliest after this many images.
EARLY_STOP_Z = 3.0
EARLY_STOP_MIN_IMAGES = 500


def top1_credit(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per image (float64): 1 if the label is the only top-1 class, 1/k if it is one of k tied top-1
    classes, else 0 (also for logits holding a NaN: no class wins)."""
    top = _top1(logits)
    hit = top.gather(1, labels.view(-1, 1).long()).squeeze(1)
    return hit.double() / top.sum(dim=1).clamp_min(1).double()


def _top1(logits: torch.Tensor) -> torch.Tensor:
    """[n, classes] bool: the classes that share the top logit (none in a row that holds a NaN)."""
    return logits == logits.max(dim=1, keepdim=True).values


def top1_tied(logits: torch.Tensor) -> torch.Tensor:
    """Per image: is the top-1 a tie between two or more classes?"""
    return _top1(logits).sum(dim=1) > 1


def top1_agreement(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image (float64): the probability that two models' top-1 classes agree when each breaks its ties
    at random, |T_a & T_b| / (|T_a| |T_b|) for their tied top-1 sets (1 or 0 without ties)."""
    ta, tb = _top1(a), _top1(b)
    return (ta & tb).sum(1).double() / (ta.sum(1) * tb.sum(1)).clamp_min(1).double()


def wilson_interval(k: float, n: int, z: float = Z95) -> list[float]:
    """Wilson score interval of an accuracy k/n, in percent (k may be fractional: ties count 1/k)."""
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
    lost: float      # images the reference gets right and the candidate wrong (ties: in part)
    gained: float    # the other way round
    n: int
    # (difference, images) for every per-image difference ref - cand that occurs, for the bootstrap;
    # empty: the differences are in {-1, 0, 1} and `lost` / `gained` count them
    values: tuple = ()


def paired_drop(ref_correct, cand_correct) -> PairedDrop:
    """The paired drop of two per-image credit vectors (bool, or float in [0, 1] with ties at 1/k)."""
    ref = torch.as_tensor(ref_correct).double()
    cand = torch.as_tensor(cand_correct).double()
    if ref.shape != cand.shape:
        raise ValueError(f"paired_drop needs the same images: {tuple(ref.shape)} vs {tuple(cand.shape)}")
    return drop_of_differences(ref - cand)


def drop_of_differences(d) -> PairedDrop:
    """The paired drop whose per-image differences (reference - candidate, in [-1, 1]) are `d`."""
    d = np.asarray(torch.as_tensor(d, dtype=torch.float64), dtype=np.float64)
    n = len(d)
    lost, gained = float(d[d > 0].sum()), float(-d[d < 0].sum())
    mean = float(d.mean()) if n else 0.0
    var = max(0.0, float(np.square(d).mean()) - mean * mean) * n / max(n - 1, 1) if n else 0.0
    values = ()
    if not np.isin(d, (-1.0, 0.0, 1.0)).all():
        u, c = np.unique(np.round(d, 12), return_counts=True)
        values = tuple(zip(u.tolist(), c.tolist()))
    else:
        lost, gained = int(lost), int(gained)
    return PairedDrop(100.0 * mean, 100.0 * math.sqrt(var / max(n, 1)), lost, gained, n, values)


def bootstrap_drop_interval(p: PairedDrop, level: float = 0.95, resamples: int = 20000, seed: int = 0) -> list[float]:
    """Percentile interval of a paired drop by the paired bootstrap: images resampled with replacement,
    each keeping its (reference, candidate) pair. Only how many images have each difference matters,
    so a resample is one multinomial draw (lost / gained / unchanged when there are no partial credits)."""
    if p.lost + p.gained == 0:
        return [0.0, 0.0]
    rng = np.random.default_rng(seed)
    if p.values:
        values = np.array([v for v, _ in p.values])
        counts = rng.multinomial(p.n, np.array([c for _, c in p.values]) / p.n, size=resamples)
        drops = 100.0 * (counts @ values) / p.n
    else:
        probs = [p.lost / p.n, p.gained / p.n, 1.0 - (p.lost + p.gained) / p.n]
        counts = rng.multinomial(p.n, probs, size=resamples)
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


@dataclass(frozen=True)
class EarlyStop:
    """A sequential test for the search (stage 3 --early-stop): after each batch, a configuration whose paired
    drop on the first m images exceeds the budget by z standard errors stops being evaluated, and counts as
    infeasible. It only ever rejects: a configuration it stops has drop > max_drop on the images seen, so
    ``Budget.holds`` is false for it at any margin z >= 0. One that would have held on all the images is
    stopped with probability about Phi(-z) per look at the boundary (0.13% at z = 3), so the answers can
    differ from the full evaluation's; benchmarks/search_speed.py measures by how much."""
    max_drop: float
    z: float = EARLY_STOP_Z
    min_images: int = EARLY_STOP_MIN_IMAGES

    def stopper(self, ref_correct):
        """``stop(credits so far)`` for quant.evaluation.CachedEvaluator.evaluate, against the reference's
        per-image credits `ref_correct` on the same images, in the same order."""
        def stop(correct) -> bool:
            m = len(correct)
            if m < self.min_images:
                return False
            pd = paired_drop(ref_correct[:m], correct)
            return pd.drop - self.z * pd.se > self.max_drop + FEASIBILITY_TOL
        return stop

    def to_json(self) -> dict:
        return {"z": self.z, "min_images": self.min_images,
                "rule": "after each batch: stop once drop - z * SE > max_drop on the images so far (infeasible)"}
