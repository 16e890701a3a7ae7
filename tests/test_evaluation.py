"""quant/evaluation.py: the prefix-cached evaluator computes exactly what a plain evaluation of the
same quantized network computes, whatever the configuration and base.

The plain evaluation ("Reference") builds the simulated network from scratch for every
configuration: quant.fold.fold_bn of the model, then quant.place.quantize_ with the same calibrated
ranges (weights quantized after folding, each tensor fake-quantized in its Slot, where it is
written), and runs the whole network batch by batch. The evaluator must give the same images correct
(so the same counts), and loss and KL to float tolerance.

A configuration is a {group: bits} with groups ("w", layer) and ("a", tensor); partial ones leave
weights and tensors float. Models have random but fixed weights and BatchNorm statistics; ResNet-20
(shortcuts A and B) runs on 64 random uint8 images in batches of 16 (so cached activations span 4
batches), MobileNetV2 (slow on CPU) on 8. The models are fully convolutional with global pooling, so
the images are 16x16 (a quarter of CIFAR's cost; every layer still runs, on smaller maps).
Tensor ranges: 8 bits calibrated (quant.calibrate) on other random images, 4 and 3 bits derived
from them (the evaluator only needs *some* fixed range per tensor and width; low-bit range searches
are slow on CPU).
"""
import copy
import functools
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize

import quant.evaluation as E
from models import build_model
from models.resnet import SHORTCUTS
from models.structure import (INPUT, TARGETS, Add, Kernel, Read, Segment, Slot, Tensor, check_structure,
                              quantizable_layers)
from quant.calibrate import calibrate
from quant.cost import kernel_table
from quant.errors import UserError
from quant.evaluation import CachedEvaluator, Outcome, cached_segments
from quant.fold import fold_bn
from quant.place import quantize_, slots
from quant.quantizer import quantize_weight, tensor_grid
from quant.widths import FLOAT_BITS, FORMAT, WEIGHT_BITS, A, W
from utils.train import Normalizer

N_IMAGES, BATCH, IMG = 64, 16, 16
MEAN, STD = [0.5, 0.45, 0.4], [0.25, 0.26, 0.27]
A_BITS = (8, 4, 3)   # calibrated tensor widths (8 by calibrate, 4 and 3 derived)
NORMALIZE = Normalizer(MEAN, STD, "cpu")


# ----------------------------------------------------------------------------- fixtures' helpers

def random_data(seed=0, n=N_IMAGES, size=IMG):
    """Random uint8 NHWC images and labels. Each image is a random blocky colour pattern plus
    pixel noise: i.i.d. noise images all look alike after global pooling (one predicted class)."""
    g = torch.Generator().manual_seed(seed)
    block = size // 4
    coarse = torch.rand(n, 4, 4, 3, generator=g).repeat_interleave(block, 1).repeat_interleave(block, 2)
    x = coarse * (0.5 + torch.rand(n, 1, 1, 1, generator=g)) + 0.15 * torch.randn(n, size, size, 3, generator=g)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y


@torch.no_grad()
def randomize(model, seed, n_calib=32):
    """Give `model` random but sane BatchNorm statistics and a head that spreads its predictions.

    Running statistics are first measured on random images (so activations keep their scale through
    deep residual stacks and predictions vary between images), then BN affine parameters and
    statistics are perturbed randomly. The classifier is then centred and scaled on the features
    of those images, so that no class wins every image by its offset. Returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    calib = NORMALIZE(random_data(seed=seed + 100, n=n_calib)[0])
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration batch
    model.train()
    model(calib)
    for bn in bns:
        bn.momentum = 0.1
        bn.weight.uniform_(0.5, 1.5, generator=g)
        bn.bias.uniform_(-0.3, 0.3, generator=g)
        bn.running_mean.add_(0.2 * torch.randn(bn.running_mean.shape, generator=g) * bn.running_var.sqrt())
        bn.running_var.mul_(torch.empty_like(bn.running_var).uniform_(0.6, 1.6, generator=g))
    model.eval()
    feats = []
    hook = model.linear.register_forward_pre_hook(lambda _m, inputs: feats.append(inputs[0]))
    model(calib)
    hook.remove()
    logits = feats[0] @ model.linear.weight.T
    std = logits.std(0)
    model.linear.weight.div_(std[:, None])
    model.linear.bias.copy_(-(logits / std).mean(0) + 0.1 * torch.randn(model.linear.out_features, generator=g))
    return model


def random_model(arch, shortcut, seed, n_calib=32):
    torch.manual_seed(seed)
    return randomize(build_model(arch, shortcut), seed, n_calib)


def make_ranges(model, target, x_u8, bits=A_BITS):
    """Ranges of every tensor at every width in `bits`: 8 bits calibrated by quant.calibrate on these
    images (in the BN-folded model); lower widths derived from the 8-bit range, clipped to 70% of it."""
    cal = calibrate(fold_bn(model), target, [NORMALIZE(x_u8)], [8])
    out = {}
    for n, r in cal.items():
        top = r["scales"]["8"] * tensor_grid(8, r["signed"])[1]
        out[n] = {"signed": r["signed"],
                  "scales": {str(b): r["scales"]["8"] if b == 8 else 0.7 * top / tensor_grid(b, r["signed"])[1]
                             for b in bits}}
    return out


class Reference:
    """Plain evaluation: for every configuration a fresh fold_bn(model), quantize_ to the configuration
    with the same ranges, weight granularity and clip, and the whole forward pass batch by batch."""

    def __init__(self, model, table, ranges, x, y, batch_size=BATCH, per_channel=True, clip="maxabs"):
        self.model, self.table, self.ranges = model, table, ranges
        self.space, self.target = table.space, table.target
        self.x, self.y, self.batch_size = x, y, batch_size
        self.per_channel, self.clip = per_channel, clip
        self._memo = {}
        self.float_logp = F.log_softmax(self.logits({}), 1)

    def network(self, config):
        return quantize_(fold_bn(self.model), self.space.full(config), self.ranges, self.target,
                         self.per_channel, self.clip)

    @torch.no_grad()
    def logits(self, config):
        net = self.network(config)
        return torch.cat([net(NORMALIZE(self.x[s:s + self.batch_size]))
                          for s in range(0, len(self.y), self.batch_size)])

    def with_labels(self, y):
        """The same reference scoring other labels; logits (label-free) are shared."""
        other = copy.copy(self)
        other.y = y
        return other

    def cached_logits(self, config):
        """logits(config), computed once per configuration (the model and data are fixed)."""
        key = tuple(sorted(self.space.full(config).items()))
        if key not in self._memo:
            self._memo[key] = self.logits(config)
        return self._memo[key]

    def outcome(self, config) -> Outcome:
        logits = self.cached_logits(config)
        logp = F.log_softmax(logits, 1)
        kl = (self.float_logp.exp() * (self.float_logp - logp)).sum(1).mean().item()
        credit, tied = credit_by_hand(logits, self.y)
        return Outcome(credit, F.cross_entropy(logits, self.y).item(), kl, tied)

    def predictions(self, config):
        return self.cached_logits(config).argmax(1)


def credit_by_hand(logits, labels):
    """(per-image credit, images tied): 1/k for a k-way top-1 tie holding the label, row by row."""
    credit, tied = [], 0
    for row, y in zip(logits.tolist(), labels.tolist()):
        top = [c for c, v in enumerate(row) if v == max(row)]
        credit.append((y in top) / len(top))
        tied += len(top) > 1
    return torch.tensor(credit, dtype=torch.float64), tied


def assert_same(got: Outcome, ref: Outcome, what=""):
    """Identical per-image credits (so identical counts and ties); loss and KL equal to float tolerance."""
    assert got.n == ref.n, what
    assert got.n_correct == ref.n_correct and got.tied == ref.tied, what
    assert torch.equal(got.correct, ref.correct), what
    assert got.loss == pytest.approx(ref.loss, rel=1e-4, abs=1e-5), what
    assert got.kl == pytest.approx(ref.kl, rel=1e-3, abs=2e-5), what
    assert got.kl >= 0.0, what


def check(got: Outcome, ref: Reference, config, what=""):
    assert_same(got, ref.outcome(config), what or config)


def random_config(space, seed, act=True, p_float=0.25):
    """Random widths for every group: weights 2-8 bits or float, tensors among A_BITS or float."""
    rng = random.Random(seed)
    out = {(W, n): FLOAT_BITS if rng.random() < p_float else rng.choice(WEIGHT_BITS[:-1]) for n in space.layers}
    out.update({(A, t): FLOAT_BITS if (not act or rng.random() < p_float) else rng.choice(A_BITS)
                for t in space.tensors})
    return out


def configs_for(space):
    """Single-group changes (weights, tensors, both) in the stem, early, middle and late blocks, the
    projection shortcut, the pooled features and the head, then full random configurations, a
    weight-only one and two uniform ones."""
    out = [{}, {(W, "conv1"): 2}, {(A, "conv1"): 3}, {(A, INPUT): 8},
           {(W, "layer1.0.conv1"): 3, (A, "layer1.0.conv1"): 4}, {(W, "layer1.2.conv2"): 4, (A, "layer1.2.conv2"): 8},
           {(A, "layer2.0.conv1"): 3}, {(W, "layer3.2.conv2"): 2}, {(A, "pool"): 4},
           {(W, "linear"): 3, (A, "linear"): 8}]
    if "layer2.0.shortcut.0" in space.layers:
        out.append({(W, "layer2.0.shortcut.0"): 3, (A, "layer2.0.shortcut.0"): 4})
    out += [random_config(space, s) for s in range(3)]
    out += [random_config(space, 8, act=False), space.uniform(3, 4), space.uniform(2, FLOAT_BITS)]
    return out


@functools.lru_cache(maxsize=None)
def build_setup(shortcut, target="generic"):
    """One ResNet-20 per shortcut kind (and target) with its kernel table and tensor ranges, shared by
    the reference and the evaluators (each folds its own copy of the model; none changes it)."""
    model = random_model("resnet20", shortcut, seed=1 if shortcut == "A" else 2)
    table = kernel_table(model, target)
    ranges = make_ranges(model, target, random_data(seed=4, n=32)[0])
    x, y = random_data(seed=3)
    ref = Reference(model, table, ranges, x, y)
    return dict(shortcut=shortcut, model=model, table=table, space=table.space, ranges=ranges, x=x, y=y, ref=ref)


@pytest.fixture(params=SHORTCUTS)
def setup(request):
    """The ResNet-20 set-up for shortcut A and for B: for the central equivalence properties."""
    return build_setup(request.param)


@pytest.fixture
def setup_b():
    """The shortcut-B set-up only (it has every kind of layer, projections included): for the
    properties that do not depend on the shortcut kind, to keep the file quick."""
    return build_setup("B")


def make_evaluator(s, labels=None, **kw):
    kw.setdefault("ranges", s["ranges"])
    kw.setdefault("clip", "maxabs")  # the clip search is tested elsewhere; maxabs is fast
    return CachedEvaluator(s["model"], s["table"], s["x"], s["y"] if labels is None else labels,
                           NORMALIZE, batch_size=kw.pop("batch_size", BATCH), **kw)


def identical(a: Outcome, b: Outcome):
    return torch.equal(a.correct, b.correct) and a.loss == b.loss and a.kl == b.kl


# ----------------------------------------------------------------------------- evaluator vs plain evaluation

def test_fixture_is_discriminating(setup):
    """Sanity of the set-up itself: predictions vary across images and across configurations (weight
    and tensor changes alike), so equal counts below are evidence, not a coincidence of a constant
    classifier; the folded float network predicts what the model with its BatchNorms predicts."""
    ref, space = setup["ref"], setup["space"]
    p_float = ref.predictions({})
    assert len(torch.unique(p_float)) >= 3
    configs = configs_for(space)
    changed = [(ref.predictions(c) != p_float).sum().item() for c in configs[1:]]
    assert max(changed) > N_IMAGES // 4
    tensors_only = space.uniform(FLOAT_BITS, 3)
    assert (ref.predictions(tensors_only) != p_float).sum() > 0
    assert len({ref.outcome(c).n_correct for c in configs}) > 1
    with torch.no_grad():
        unfolded = torch.cat([setup["model"](NORMALIZE(setup["x"][s:s + BATCH])) for s in range(0, N_IMAGES, BATCH)])
    assert torch.equal(unfolded.argmax(1), p_float)


def test_outcomes_match_plain_evaluation(setup):
    """CachedEvaluator.evaluate == plain evaluation of the same quantized network (weights and
    tensors): the same images correct (so the same counts), loss and KL to float tolerance, for every
    configuration, evaluated in an order that jumps between early and late groups and back."""
    ref = setup["ref"]
    ev = make_evaluator(setup)
    assert ev.n == N_IMAGES
    check(ev.float_outcome, ref, {}, "float")
    configs = configs_for(setup["space"])
    for cfg in configs + configs[::-1]:  # revisit after later configs touched the state
        check(ev.evaluate(cfg), ref, cfg)
    for cfg in configs[1], configs[-3]:  # the count and percentage shortcuts
        expected = ref.outcome(cfg)
        assert ev.correct(cfg) == expected.n_correct
        assert ev.accuracy(cfg) == pytest.approx(100.0 * expected.n_correct / N_IMAGES, abs=1e-12)


def test_set_base_keeps_outcomes_exact(setup):
    """After set_base (recomputing the cached activations behind the first change), every
    configuration still evaluates exactly as plain evaluation does, through a greedy-like walk of
    bases that change one weight or tensor width at a time, early or late."""
    space = setup["space"]
    base = random_config(space, 10)
    y = setup["ref"].predictions(base)  # labels = the base's own predictions: a stale cache shows
    ref = setup["ref"].with_labels(y)
    ev = make_evaluator(setup, labels=y)
    ev.set_base(base)
    assert ev.base == space.full(base)
    # every image right, but ties (random_config quantizes the logits too) count 1/k
    tied = ev.base_outcome.correct < 1
    assert ev.base_outcome.tied == int(tied.sum()) and torch.all(ev.base_outcome.correct[~tied] == 1)
    check(ev.evaluate(base), ref, base, "base")
    walk = [((W, "layer3.1.conv1"), 2), ((A, "layer1.0.conv2"), 3), ((W, "linear"), 5), ((A, "conv1"), 3),
            ((W, "layer2.2.conv1"), 3), ((A, INPUT), 8), ((A, "pool"), 4)]
    probes = [((W, "conv1"), 2), ((A, "layer1.1.conv1"), 3), ((W, "layer2.0.conv2"), 3),
              ((A, "layer3.2.conv1"), 8), ((A, "linear"), 3)]
    current = dict(base)
    for i, (group, bits) in enumerate(walk):
        current = {**current, group: bits if current[group] != bits else 6}
        ev.set_base(current)
        check(ev.base_outcome, ref, current, ("base", group))
        for probe, pbits in (probes[i % 5], probes[(i + 2) % 5], probes[(i + 4) % 5]):  # spread over the net
            cand = {**current, probe: pbits if current[probe] != pbits else FLOAT_BITS}
            check(ev.evaluate(cand), ref, cand, (group, probe))
    for cfg in configs_for(space)[-3:]:
        check(ev.evaluate(cfg), ref, cfg)
    before = ev.evaluations
    ev.set_base(current)            # the same base again: nothing to recompute
    assert ev.evaluate(current) is ev.base_outcome
    assert ev.evaluations == before
    check(ev.evaluate(current), ref, current)


def test_base_config_argument_and_outcome_hint(setup_b):
    """A base given to the constructor equals set_base afterwards; with no cache, set_base(config,
    outcome) adopts the given outcome instead of recomputing it."""
    base = random_config(setup_b["space"], 12)
    ev = make_evaluator(setup_b, base_config=base)
    assert ev.base == base
    assert_same(ev.base_outcome, setup_b["ref"].outcome(base))
    ev0 = make_evaluator(setup_b, cache_activations=False)
    hint = ev.base_outcome
    before = ev0.evaluations
    ev0.set_base(base, hint)
    assert ev0.base_outcome is hint and ev0.evaluations == before


def test_ragged_last_batch(setup_b):
    """64 images in batches of 24 (24 + 24 + 16): cached activations of a short last batch."""
    space = setup_b["space"]
    ref = Reference(setup_b["model"], setup_b["table"], setup_b["ranges"], setup_b["x"], setup_b["y"], batch_size=24)
    ev = make_evaluator(setup_b, batch_size=24)
    ev.set_base({(W, "layer1.1.conv2"): 3, (A, "layer1.1.conv2"): 4})
    for cfg in ({}, {(W, "layer1.1.conv2"): 3, (A, "layer1.1.conv2"): 4, (W, "layer3.0.conv2"): 2,
                     (A, "layer3.0.conv2"): 8},
                {(W, "layer1.1.conv2"): 3, (A, "layer1.1.conv2"): 4, (W, "linear"): 2, (A, "linear"): 3},
                random_config(space, 11), random_config(space, 11, act=False)):
        check(ev.evaluate(cfg), ref, cfg)


def test_without_activation_cache_matches(setup_b):
    """cache_activations=False (every evaluation from the image) gives the plain evaluation too,
    with a base set in the constructor and changed later."""
    ref, space = setup_b["ref"], setup_b["space"]
    ev = make_evaluator(setup_b, cache_activations=False, base_config=random_config(space, 5))
    assert not any(ev.keep) and ev.cached_bytes == 0
    check(ev.base_outcome, ref, random_config(space, 5))
    configs = configs_for(space)
    for cfg in configs[:6] + [random_config(space, 6)]:
        check(ev.evaluate(cfg), ref, cfg)
    ev.set_base(random_config(space, 7, act=False))
    check(ev.base_outcome, ref, random_config(space, 7, act=False))
    for cfg in configs[6:9]:
        check(ev.evaluate(cfg), ref, cfg)


def test_bounded_cache_gives_identical_results(setup_b):
    """A cache_bytes bound that keeps only some segment inputs (recomputing the rest from the nearest
    kept one), or none at all, gives results bit-identical to the unbounded cache, through base
    changes and candidates in every part of the network."""
    space = setup_b["space"]
    full = make_evaluator(setup_b)
    assert full.keep == [False] + [True] * (len(full.segments) - 1)
    limit = full.cached_bytes // 3
    small = make_evaluator(setup_b, cache_bytes=limit)
    none = make_evaluator(setup_b, cache_bytes=0)
    assert 0 < small.cached_bytes <= limit
    assert 0 < sum(small.keep) < sum(full.keep)
    assert not any(none.keep) and none.cached_bytes == 0
    evs = (full, small, none)
    assert all(identical(ev.float_outcome, full.float_outcome) for ev in evs)
    bases = [random_config(space, 20), {**random_config(space, 20), (W, "layer2.1.conv1"): 2, (A, "layer2.1.conv1"): 3,
                                        (W, "layer1.0.conv1"): 8, (A, "layer1.0.conv1"): 4}, {}]
    for base in bases:
        for ev in evs:
            ev.set_base(base)
        assert identical(small.base_outcome, full.base_outcome) and identical(none.base_outcome, full.base_outcome)
        for layer in list(space.layers[2::7]) + ["linear"]:
            cand = {**space.full(base), (W, layer): 2, (A, layer): 4}
            got = [ev.evaluate(cand) for ev in evs]
            assert identical(got[1], got[0]) and identical(got[2], got[0]), (base, layer)
    check(full.evaluate(bases[0]), setup_b["ref"], bases[0])


def walk_candidates(space, current, step: int) -> list[dict]:
    """Three candidates of a greedy-like walk from `current` at `step`: each one layer's weights at 2 bits and
    one layer's output at 4, spread over the network."""
    layers = list(space.layers)
    return [{**space.full(current), (W, layers[(7 * step + 5 * j) % len(layers)]): 2,
             (A, layers[(3 * step + 2 * j) % len(layers)]): 4} for j in range(3)]


def _same_cache(a: CachedEvaluator, b: CachedEvaluator) -> bool:
    return all((x is None) == (y is None) and (x is None or all(torch.equal(u, v) for u, v in zip(x, y)))
               for x, y in zip(a.cache, b.cache))


@pytest.mark.parametrize("bound", ("full", "tight"))
def test_promoted_candidate_is_what_recomputing_gives(setup_b, bound):
    """A greedy-like walk: three candidates from each base, then the base moves to one of them. Taking its
    segment inputs from its evaluation (promote) leaves the cache, the base outcome and every later
    evaluation bit-identical to recomputing them; with a bound that the candidates' inputs do not fit, they are
    recomputed and still identical. A base that was never a candidate is recomputed."""
    space = setup_b["space"]
    limit = 4 << 30 if bound == "full" else 0   # full: what the greedy asks for, another --cache-gb
    fast, slow = make_evaluator(setup_b, pending_bytes=limit), make_evaluator(setup_b, pending_bytes=limit)
    slow.promote = False
    assert 0 < sum(fast.keep)
    current = random_config(space, 30, act=False)
    for ev in (fast, slow):
        ev.set_base(current)
    layers = list(space.layers)
    for step in range(5):
        cands = walk_candidates(space, current, step)
        for cand in cands:
            assert identical(fast.evaluate(cand), slow.evaluate(cand))
        current = cands[step % 3]
        for ev in (fast, slow):
            ev.set_base(current)
        assert identical(fast.base_outcome, slow.base_outcome) and _same_cache(fast, slow)
        probe = {**space.full(current), (A, layers[-3]): 3}
        assert identical(fast.evaluate(probe), slow.evaluate(probe))
    assert fast.promoted == (5 if bound == "full" else 0) and slow.promoted == 0
    assert fast.evaluations < slow.evaluations if bound == "full" else fast.evaluations == slow.evaluations
    never = {**space.full(current), (W, layers[1]): 3}
    for ev in (fast, slow):
        ev.set_base(never)
    assert identical(fast.base_outcome, slow.base_outcome) and _same_cache(fast, slow)
    assert fast.promoted == (5 if bound == "full" else 0)
    check(fast.evaluate(never), setup_b["ref"], never)


def test_starting_path_gives_the_same_outcomes(setup_b):
    """The pre-issue-28 path (torch's fake-quantize op, no promotion), kept for the speed benchmark, computes
    the same outcomes; the switch is restored on exit, also after an error."""
    from quant.evaluation import starting_path
    from quant.quantizer import Quantizer
    configs = configs_for(setup_b["space"])[1:4]
    new = [make_evaluator(setup_b).evaluate(c) for c in configs]
    with starting_path():
        assert Quantizer.kernel == "torch" and CachedEvaluator.promote is False
        old = [make_evaluator(setup_b).evaluate(c) for c in configs]
    assert Quantizer.kernel == "arithmetic" and CachedEvaluator.promote is True
    assert all(identical(a, b) for a, b in zip(new, old))
    with pytest.raises(RuntimeError), starting_path():
        raise RuntimeError
    assert Quantizer.kernel == "arithmetic" and CachedEvaluator.promote is True


def test_cached_segments():
    """All segment inputs but the image are kept when they fit; otherwise every m-th, the smallest m
    that fits; nothing when nothing fits."""
    sizes = [10] * 7
    assert cached_segments(sizes, 60) == [False] + [True] * 6
    assert cached_segments(sizes, 59) == [k > 0 and k % 2 == 0 for k in range(7)]
    assert cached_segments(sizes, 29) == [k > 0 and k % 3 == 0 for k in range(7)]
    assert cached_segments(sizes, 0) == [False] * 7
    keep = cached_segments([5, 40, 30, 20, 10], 35)
    assert sum(s for s, k in zip([5, 40, 30, 20, 10], keep) if k) <= 35 and not keep[0]


def test_ort_cpu_evaluator_matches_plain_evaluation():
    """Under the ort-cpu target (the add its own kernel, the pre-add conv output and the add output
    tensors of their own) the evaluator, built from that target's kernel table, matches plain
    evaluation of the same target, also after a base change; quantizing only the extra tensors changes
    predictions (they are really simulated)."""
    s = build_setup("B", "ort-cpu")
    space, ref = s["space"], s["ref"]
    adds = [t for t in space.tensors if t.endswith(".add")]
    assert len(adds) == 9 and set(space.tensors) - set(build_setup("B")["space"].tensors) == set(adds)
    ev = make_evaluator(s)
    assert ev.target == "ort-cpu"
    extra = {**{(A, t): 3 for t in adds}, **{(A, t[:-len("add")] + "conv2"): 3 for t in adds}}
    assert (ref.predictions(extra) != ref.predictions({})).sum() > 0
    configs = [extra, {(A, "layer2.1.add"): 3}, {(A, "layer1.0.conv2"): 4, (W, "layer1.0.conv2"): 3},
               {(A, "layer3.2.add"): 4, (A, "pool"): 8}, random_config(space, 40), space.uniform(4, 4)]
    for base in ({}, {(A, "layer2.0.add"): 4, (W, "layer2.0.conv2"): 4}):
        ev.set_base(base)
        check(ev.base_outcome, ref, base)
        for cfg in configs:
            check(ev.evaluate(cfg), ref, cfg, (base, cfg))


def test_per_tensor_evaluator_matches_plain_evaluation(setup_b):
    """With per-tensor weights (and the MSE clip) the evaluator still matches plain evaluation, and its
    quantized folded weights lie on one grid per layer."""
    s = setup_b
    ref = Reference(s["model"], s["table"], s["ranges"], s["x"], s["y"], per_channel=False, clip="mse")
    ev = make_evaluator(s, per_channel=False, clip="mse")
    for cfg in ({(W, "layer2.0.shortcut.0"): 3}, {(W, "conv1"): 4, (A, "conv1"): 4}, random_config(s["space"], 50)):
        check(ev.evaluate(cfg), ref, cfg)
    for name in ("conv1", "layer2.0.conv1", "layer3.2.conv2"):
        w = ev.weight(name, 3)
        assert w.unique().numel() <= 7
        k = w / (w.abs().max() / 3)
        assert torch.allclose(k, k.round(), atol=1e-3)


# ----------------------------------------------------------------------------- KL, loss, errors

def test_kl_is_zero_for_float_and_positive_otherwise(setup_b):
    """The float configuration has KL exactly 0 against itself (and the float loss), also when
    evaluated against a quantized base; every other configuration has KL >= 0, and > 0 where
    predictions change."""
    space = setup_b["space"]
    ev = make_evaluator(setup_b)
    assert ev.float_outcome.kl == 0.0 and ev.evaluate({}).kl == 0.0
    float_loss = ev.float_outcome.loss
    for cfg in configs_for(space)[1:]:
        out = ev.evaluate(cfg)
        assert out.kl >= 0.0, cfg
        if not torch.equal(out.correct, ev.float_outcome.correct):
            assert out.kl > 0.0, cfg
    ev.set_base(random_config(space, 30))
    again = ev.evaluate(space.uniform(FLOAT_BITS, FLOAT_BITS))
    assert again.kl == pytest.approx(0.0, abs=1e-9)
    assert again.loss == pytest.approx(float_loss, rel=1e-6)
    assert torch.equal(again.correct, ev.float_outcome.correct)
    assert ev.evaluate(space.uniform(2, 3)).kl > 0.01


@pytest.mark.parametrize("bad", [{(W, "nope"): 4}, {(A, "layer9.0.conv1"): 8}, {(W, "bn1"): 4},
                                 {(W, "conv1"): 4, (A, "layer1.0.q1"): 8}, {(W, "pool"): 4},
                                 {(A, "layer1.0.add"): 4}, {"nope": 4}, {"conv1": 4, "layer1.0.conv": {"w": 8}}])
def test_unknown_group_is_user_error(setup_b, bad):
    """A configuration naming a layer or tensor the model does not have (a module that is no layer, a
    Slot's module name, weights of a tensor without any, an ort-cpu-only tensor under the generic
    target; in memory or file form) is a UserError, not silently evaluated as float, in evaluate,
    correct, set_base and the constructor's base_config; the evaluator is unharmed."""
    ev = make_evaluator(setup_b)
    cfg = {(W, "layer2.0.conv1"): 3, (A, "layer2.0.conv1"): 4}
    before = ev.evaluate(cfg)
    with pytest.raises(UserError, match="does not have"):
        ev.evaluate(bad)
    with pytest.raises(UserError):
        ev.correct(bad)
    with pytest.raises(UserError):
        ev.set_base(bad)
    with pytest.raises(UserError):
        make_evaluator(setup_b, base_config=bad)
    assert identical(ev.evaluate(cfg), before)
    assert ev.base == setup_b["space"].full({})


@pytest.mark.parametrize("bad", [{(W, "conv1"): 9}, {(W, "conv1"): 1}, {(W, "conv1"): True}, {(A, "conv1"): 0},
                                 {(A, "pool"): 4.5}, {"conv1": 9}, {"format": FORMAT, "linear": {"a": 1}}])
def test_unsupported_width_is_user_error(setup_b, bad):
    """A width outside 2-8 and 32 (or not an integer) is a UserError in evaluate and set_base."""
    ev = make_evaluator(setup_b)
    with pytest.raises(UserError):
        ev.evaluate(bad)
    with pytest.raises(UserError):
        ev.set_base(bad)


def test_full_configuration_with_unsupported_width_leaves_no_trace(setup_b):
    """A FULL {group: bits} (every group given, as the searches build them) with an unsupported width is
    refused like a partial one, before anything is applied: a later evaluation computes the plain
    evaluation of its own configuration, not a mix with the refused one."""
    space = setup_b["space"]
    ev = make_evaluator(setup_b, cache_activations=False)
    bad = {**space.full({(W, "conv1"): 2, (W, "layer1.0.conv1"): 2}), (W, "linear"): 9}
    assert bad.keys() == space.full({}).keys()
    with pytest.raises(UserError):
        ev.evaluate(bad)
    cfg = {(W, "linear"): 4}
    check(ev.evaluate(cfg), setup_b["ref"], cfg)


@pytest.mark.parametrize("bad", [{(A, "conv1"): 6}, {(W, "layer2.0.conv2"): 4, (A, "layer2.0.conv2"): 2},
                                 {(W, "linear"): 8, (A, "linear"): 5}, {(A, INPUT): 7}])
def test_uncalibrated_tensor_width_is_user_error(setup_b, bad):
    """Asking for a tensor width no range was calibrated for is a UserError naming the tensor, in
    evaluate, set_base and base_config; an evaluator given no ranges refuses every tensor width below
    32, and still evaluates weight widths."""
    ev = make_evaluator(setup_b)
    tensor = next(n for k, n in bad if k == A)
    with pytest.raises(UserError, match=f"'{tensor}'"):
        ev.evaluate(bad)
    with pytest.raises(UserError):
        ev.set_base(bad)
    with pytest.raises(UserError):
        make_evaluator(setup_b, base_config=bad)
    plain = make_evaluator(setup_b, ranges=None, cache_activations=False)
    with pytest.raises(UserError):
        plain.evaluate({(A, "layer1.0.conv1"): 8})
    check(plain.evaluate({(W, "layer1.0.conv1"): 4}), setup_b["ref"], {(W, "layer1.0.conv1"): 4})


def test_evaluator_is_unharmed_by_uncalibrated_width_error(setup_b):
    """After a configuration is refused for an uncalibrated tensor width, later evaluations still
    compute the plain evaluation of their own configuration (the refused one leaves nothing behind)."""
    ev = make_evaluator(setup_b, cache_activations=False)
    cfg = {(W, "conv1"): 4}
    before = ev.evaluate(cfg)
    with pytest.raises(UserError):
        ev.evaluate({(W, "layer3.0.conv1"): 2, (W, "conv1"): 2, (A, "layer3.0.conv1"): 6})
    assert identical(ev.evaluate(cfg), before)
    check(ev.evaluate(cfg), setup_b["ref"], cfg)


def test_evaluator_never_modifies_the_source_model(setup_b):
    """The evaluator folds its own copy: the source model keeps its BatchNorms, its exact weights and
    statistics, no quantizer in any Slot and no parametrization, through evaluations and base changes;
    and changing the source model afterwards does not change what the evaluator computes."""
    model = copy.deepcopy(setup_b["model"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s = {**setup_b, "model": model}
    ev = make_evaluator(s)
    space = s["space"]
    ev.evaluate(space.uniform(2, 3))
    ev.set_base(random_config(space, 60))
    ev.evaluate(random_config(space, 61))
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == len(model.conv_bn_pairs())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in ev.model.modules())
    assert all(sl.quant is None for sl in slots(model, "generic").values())
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    cfgs = [{(W, "conv1"): 3, (A, INPUT): 8}, {(W, "layer1.0.conv1"): 3, (A, "layer1.0.conv1"): 4}]  # from the image
    outs = [ev.evaluate(c) for c in cfgs]
    with torch.no_grad():
        model.conv1.weight.mul_(-1.0)
        model.bn1.running_mean.add_(1.0)
    ev.set_base({})
    for c, out in zip(cfgs, outs):
        assert identical(ev.evaluate(c), out)
        check(ev.evaluate(c), setup_b["ref"], c)


def test_weight_cache_quantizes_each_layer_and_width_once(setup_b, monkeypatch):
    """CachedEvaluator.weight(layer, bits) is the layer's FOLDED weight quantized with the evaluator's
    granularity and clip (its float folded weight at 32 bits), computed once per (layer, bits) and the
    same tensor ever after, however often configurations come back to it; the layers of the simulated
    network hold the weights of the configuration last applied."""
    calls = []
    real = E.quantize_weight
    monkeypatch.setattr(E, "quantize_weight", lambda w, bits, *a: calls.append(bits) or real(w, bits, *a))
    space = setup_b["space"]
    ev = make_evaluator(setup_b, cache_activations=False)
    folded = fold_bn(setup_b["model"])
    n = len(space.layers)
    for name in space.layers:
        assert torch.equal(ev.weight(name, FLOAT_BITS), folded.get_submodule(name).weight)
    assert calls == []
    ev.evaluate(space.uniform(4, FLOAT_BITS))
    assert len(calls) == n
    first = {name: ev.weight(name, 4) for name in space.layers}
    for name in space.layers:
        assert torch.equal(first[name], quantize_weight(folded.get_submodule(name).weight, 4, True, "maxabs"))
        assert torch.equal(ev.layers[name].weight, first[name])
    ev.evaluate(space.uniform(4, 8))
    ev.evaluate({(W, space.layers[0]): 4})
    ev.set_base(space.uniform(4, FLOAT_BITS))
    ev.evaluate({})
    assert len(calls) == n
    assert all(ev.weight(name, 4) is first[name] for name in space.layers)
    ev.evaluate({(W, space.layers[0]): 6})
    assert calls[n:] == [6]
    assert torch.equal(ev.layers[space.layers[0]].weight, ev.weight(space.layers[0], 6))
    assert torch.equal(ev.layers[space.layers[1]].weight, folded.get_submodule(space.layers[1]).weight)


def test_file_form_configs(setup_b):
    """File-form configurations (the tensor-widths/1 format: {"w", "a"} objects, bare weight widths,
    absent names float) mean the same as the in-memory {group: bits} form; an unmarked file with bare
    weight widths still loads, an unmarked file that uses "a" is refused (its old meaning differs)."""
    ev = make_evaluator(setup_b)
    assert identical(ev.evaluate({"format": FORMAT, "conv1": 4, "linear": {"w": 3, "a": 8}, "pool": {"a": 4}}),
                     ev.evaluate({(W, "conv1"): 4, (W, "linear"): 3, (A, "linear"): 8, (A, "pool"): 4}))
    check(ev.evaluate({"format": FORMAT, "layer2.0.conv1": {"a": 4}}), setup_b["ref"], {(A, "layer2.0.conv1"): 4})
    check(ev.evaluate({"layer2.0.conv1": 3}), setup_b["ref"], {(W, "layer2.0.conv1"): 3})
    assert ev.full(setup_b["space"].to_file(random_config(setup_b["space"], 70))) == random_config(setup_b["space"], 70)
    with pytest.raises(UserError, match="format"):
        ev.evaluate({"layer2.0.conv1": {"w": 4, "a": 8}})


def test_outcome_properties():
    """Outcome's n, n_correct, accuracy and tie rate follow from its credits."""
    o = Outcome(torch.tensor([True, False, True, True]), 0.5, 0.1)
    assert (o.n, o.n_correct, o.accuracy, o.tie_rate) == (4, 3, 75.0, 0.0)
    o = Outcome(torch.tensor([1.0, 0.5, 0.0, 1 / 3], dtype=torch.float64), 0.5, 0.1, tied=2)
    assert (o.n_correct, o.tie_rate) == (pytest.approx(1.5 + 1 / 3), 0.5)
    assert Outcome(torch.zeros(0, dtype=torch.bool), 0.0, 0.0).accuracy == 0.0


def test_ties_count_one_over_k_not_the_lowest_class():
    """Quantized logits tie: the evaluator gives a k-way top-1 tie holding the label 1/k, never the class of
    lowest index; so permuting the classes (the order of the linear layer's rows) leaves every accuracy as it
    was, which argmax does not. With 4-bit logits a random ResNet-8 ties on many images."""
    from quant.stats import top1_credit, top1_tied
    logits = torch.tensor([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0], [5.0, 1.0, 0.0], [0.0, 4.0, 4.0]])
    labels = torch.tensor([1, 0, 0, 0])
    assert top1_credit(logits, labels).tolist() == [0.5, 1 / 3, 1.0, 0.0]
    assert top1_tied(logits).tolist() == [True, True, False, True]
    broken = torch.tensor([[float("nan"), 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert top1_credit(broken, torch.tensor([1, 0])).tolist() == [0.0, 1.0]
    assert top1_tied(broken).tolist() == [False, False]
    torch.manual_seed(0)
    model = build_model("resnet8", "B").eval()
    x, y = random_data(seed=5, n=64)
    table = kernel_table(model, "generic")
    cfg = table.space.uniform(FLOAT_BITS, FLOAT_BITS)
    cfg[A, "linear"] = 2
    ranges = calibrate(fold_bn(model), "generic", [NORMALIZE(x)], [2], ["linear"])
    perm = torch.randperm(10)
    permuted = copy.deepcopy(model)
    with torch.no_grad():
        permuted.linear.weight.copy_(model.linear.weight[perm])
        permuted.linear.bias.copy_(model.linear.bias[perm])
    inverse = torch.argsort(perm)
    a = CachedEvaluator(model, table, x, y, NORMALIZE, ranges).evaluate(cfg)
    b = CachedEvaluator(permuted, table, x, inverse[y], NORMALIZE, ranges).evaluate(cfg)
    assert a.tied > 10 and a.tied == b.tied and torch.allclose(a.correct, b.correct)
    assert any(0 < c < 1 for c in a.correct.tolist())


# ----------------------------------------------------------------------------- folding

def every_model():
    from models import arch_names, takes_shortcut
    return [pytest.param(a, s, id=a + (s or "")) for a in arch_names()
            for s in (SHORTCUTS if takes_shortcut(a) else (None,))]


def assert_close(got, ref, tol=1e-4):
    scale = ref.abs().max().item()
    assert torch.allclose(got, ref, rtol=tol, atol=tol * scale), (got - ref).abs().max().item() / scale


# Quantized, folding after or before is the same in exact arithmetic; in float, a weight within float
# rounding of a rounding boundary can land one level apart (a relative output error up to ~1e-3 on the
# deep models), while quantization itself moves the outputs by 0.4-2x their scale.
QUANTIZED_TOL, QUANTIZATION_EFFECT = 5e-3, 5e-2


@torch.no_grad()
def quantize_before_folding(model, bits):
    """A copy of `model` (with its BNs) whose layers' weights are quantized per channel as they are,
    before any folding: what per-channel quantization after folding must equal, channel gains aside."""
    m = copy.deepcopy(model)
    for name, layer in quantizable_layers(m).items():
        if bits[name] != FLOAT_BITS:
            layer.weight.copy_(quantize_weight(layer.weight, bits[name], True, "maxabs"))
    return m


@pytest.mark.parametrize("arch,shortcut", every_model())
def test_folded_model_matches_unfolded(arch, shortcut):
    """For every registered architecture, fold_bn (each declared conv-BN pair folded into the conv)
    computes what the model with its BNs computes in eval mode, with random non-trivial BN statistics;
    every BN of these models follows a conv, so none is left, while the source model keeps its own.
    Per-channel weight quantization commutes with folding (each channel is scaled by one gain), so the
    quantized folded network equals the unfolded one with its weights quantized per channel first."""
    model = random_model(arch, shortcut, seed=7, n_calib=16)
    x = NORMALIZE(random_data(seed=8, n=8)[0])
    folded = fold_bn(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        ref, got = model(x), folded(x)
    assert_close(got, ref)
    assert (got.argmax(1) == ref.argmax(1)).float().mean() >= 0.75

    names = list(quantizable_layers(model))
    rng = random.Random(3)
    bits = {n: rng.choice((3, 4, 6, 8, FLOAT_BITS)) for n in names}
    space = kernel_table(model).space
    quantized = quantize_(fold_bn(model), space.full({(W, n): b for n, b in bits.items()}), {}, "generic",
                          clip="maxabs")
    with torch.no_grad():
        ref_q, got_q = quantize_before_folding(model, bits)(x), quantized(x)
    assert not torch.allclose(ref_q, ref, rtol=QUANTIZATION_EFFECT, atol=QUANTIZATION_EFFECT * ref.abs().max().item())
    assert_close(got_q, ref_q, QUANTIZED_TOL)


class PreActBlock(nn.Module):
    """Pre-activation residual block: BN -> ReLU -> conv -> BN -> ReLU -> conv (+ x).

    bn1 normalizes the block *input* and must stay a BN; bn2 normalizes conv1's output only and
    folds into conv1; conv2 (with a bias) has no BN after it. Name-based pairing would fold
    bn1 into conv1 and bn2 into conv2, both wrong. Tensors: conv1's (after bn2 + ReLU, never
    negative) and the block output (the add, no ReLU: signed), each in its Slot."""

    def __init__(self, c):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c)
        self.conv1 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.q1 = Slot()
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=True)
        self.add = Add()
        self.q_out = Slot()

    def forward(self, x):
        out = self.q1(F.relu(self.bn2(self.conv1(F.relu(self.bn1(x))))))
        return self.q_out(self.add(self.conv2(out), x))


class PreActNet(nn.Module):
    """Stem conv WITH a bias followed by its BN; two pre-activation blocks; a final BN + ReLU after
    the last addition (foldable into nothing) fused with the pooling; linear. Declares its own
    structure, the same under both targets: kernels stem, per block conv1 (bn1 + ReLU + conv1 + bn2 +
    ReLU, reading the block input through bn1) and conv2 (+ the add, reading conv1's tensor and the block
    input), pool (bn_out + ReLU + pooling), linear."""

    def __init__(self, c=8):
        super().__init__()
        self.q_input = Slot()
        self.conv1 = nn.Conv2d(3, c, 3, 1, 1, bias=True)
        self.bn1 = nn.BatchNorm2d(c)
        self.q_stem = Slot()
        self.blocks = nn.Sequential(PreActBlock(c), PreActBlock(c))
        self.bn_out = nn.BatchNorm2d(c)
        self.q_pool = Slot()
        self.linear = nn.Linear(c, 10)
        self.q_logits = Slot()
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Conv2d) and m.bias is not None:
                    m.bias.uniform_(-0.5, 0.5)

    def stem(self, x):
        return self.q_stem(F.relu(self.bn1(self.conv1(self.q_input(x)))))

    def head(self, x):
        pooled = self.q_pool(torch.flatten(F.adaptive_avg_pool2d(F.relu(self.bn_out(x)), 1), 1))
        return self.q_logits(self.linear(pooled))

    def kernels(self, target="generic"):
        ks = [Kernel("conv1", ("conv1",), (Read(INPUT),), "conv1", ("conv1",))]
        prev = "conv1"
        for i in range(len(self.blocks)):
            p = f"blocks.{i}"
            ks += [Kernel(f"{p}.conv1", (f"{p}.conv1",), (Read(prev),), f"{p}.conv1", (f"{p}.bn1",)),
                   Kernel(f"{p}.conv2", (f"{p}.conv2",), (Read(f"{p}.conv1"), Read(prev)), f"{p}.conv2",
                          (f"{p}.conv2", f"{p}.add"))]
            prev = f"{p}.conv2"
        return ks + [Kernel("pool", (), (Read(prev),), "pool", ("bn_out",)),
                     Kernel("linear", ("linear",), (Read("pool"),), "linear", ("linear",))]

    def tensors(self, target="generic"):
        ts = [Tensor(INPUT, "q_input", True), Tensor("conv1", "q_stem", False)]
        for i in range(len(self.blocks)):
            ts += [Tensor(f"blocks.{i}.conv1", f"blocks.{i}.q1", False),
                   Tensor(f"blocks.{i}.conv2", f"blocks.{i}.q_out", True)]
        return ts + [Tensor("pool", "q_pool", False), Tensor("linear", "q_logits", True)]

    def segments(self, target="generic"):
        return [Segment("stem", self.stem, ("conv1",)),
                *(Segment(f"blocks.{i}", b, (f"blocks.{i}.conv1", f"blocks.{i}.conv2"))
                  for i, b in enumerate(self.blocks)),
                Segment("head", self.head, ("pool", "linear"))]

    def conv_bn_pairs(self):
        return [("conv1", "bn1")] + [(f"blocks.{i}.conv1", f"blocks.{i}.bn2") for i in range(len(self.blocks))]

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def preact_model(seed=11):
    torch.manual_seed(seed)
    return randomize(PreActNet(), seed)


def test_folding_conv_bias_and_preactivation_block():
    """Only declared conv-BN pairs fold: a conv with its own bias folds as b' = beta + (b - mu) *
    gamma / sigma, a pre-activation block's input BN stays a BN, a biased conv without a BN keeps its
    bias; the folded model equals the unfolded one in float, and quantized per channel (after folding
    vs. before). Folding by names instead (bn1 into conv1, bn2 into conv2) changes the output: the
    check discriminates."""
    model = preact_model()
    for target in TARGETS:
        check_structure(model, target)
    x = NORMALIZE(random_data(seed=12, n=16)[0])
    folded = fold_bn(model)
    fm = dict(folded.named_modules())
    assert isinstance(fm["bn1"], nn.Identity) and isinstance(fm["blocks.0.bn2"], nn.Identity)
    assert isinstance(fm["blocks.0.bn1"], nn.BatchNorm2d) and isinstance(fm["blocks.1.bn1"], nn.BatchNorm2d)
    assert isinstance(fm["bn_out"], nn.BatchNorm2d)
    bn, conv = model.bn1, model.conv1
    gain = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    assert torch.allclose(fm["conv1"].bias, bn.bias + (conv.bias - bn.running_mean) * gain, atol=1e-6)
    assert torch.allclose(fm["conv1"].weight, conv.weight * gain.view(-1, 1, 1, 1), atol=1e-6)
    assert torch.equal(fm["blocks.0.conv2"].bias, model.blocks[0].conv2.bias)
    assert torch.equal(fm["blocks.1.conv2"].weight, model.blocks[1].conv2.weight)
    assert fm["blocks.0.conv1"].bias is not None and model.blocks[0].conv1.bias is None
    with torch.no_grad():
        ref, got = model(x), folded(x)
    assert_close(got, ref)

    bits = {"conv1": 3, "blocks.0.conv1": 4, "blocks.0.conv2": 2, "blocks.1.conv1": 8, "blocks.1.conv2": FLOAT_BITS,
            "linear": 3}
    space = kernel_table(model).space
    quantized = quantize_(fold_bn(model), space.full({(W, n): b for n, b in bits.items()}), {}, "generic",
                          clip="maxabs")
    with torch.no_grad():
        ref_q, got_q = quantize_before_folding(model, bits)(x), quantized(x)
    assert not torch.allclose(ref_q, ref, rtol=QUANTIZATION_EFFECT, atol=QUANTIZATION_EFFECT * ref.abs().max().item())
    assert_close(got_q, ref_q, QUANTIZED_TOL)

    by_name = copy.deepcopy(model)
    by_name.conv_bn_pairs = lambda: [("conv1", "bn1")] + [(f"blocks.{i}.conv{j}", f"blocks.{i}.bn{j}")
                                                          for i in range(2) for j in (1, 2)]
    check_structure(by_name)  # structurally plausible, semantically wrong
    with torch.no_grad():
        wrong = fold_bn(by_name)(x)
    assert not torch.allclose(wrong, ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


def test_cached_evaluator_on_preactivation_model():
    """The evaluator works from declared structure alone: on the pre-activation model (unfolded
    input BNs inside segments, biased convs, a BN in the head) it matches plain evaluation, weights
    (with the MSE clip) and tensors, from two bases."""
    model = preact_model(seed=13)
    table = kernel_table(model)
    space = table.space
    assert space.layers == ("conv1", "blocks.0.conv1", "blocks.0.conv2", "blocks.1.conv1", "blocks.1.conv2", "linear")
    ranges = make_ranges(model, "generic", random_data(seed=14, n=16)[0])
    assert ranges["blocks.0.conv2"]["signed"] and not ranges["pool"]["signed"]
    x, y = random_data(seed=15, n=32)
    ref = Reference(model, table, ranges, x, y, batch_size=8, clip="mse")
    ev = CachedEvaluator(model, table, x, y, NORMALIZE, ranges=ranges, batch_size=8)
    check(ev.float_outcome, ref, {})
    configs = [{(W, "blocks.1.conv1"): 2, (A, "blocks.1.conv1"): 4}, {(W, "conv1"): 3, (A, "conv1"): 8},
               {(A, "blocks.0.conv2"): 3}, {(A, "pool"): 3}, random_config(space, 1), random_config(space, 2),
               random_config(space, 2, act=False)]
    for base in ({}, random_config(space, 3)):
        ev.set_base(base)
        for cfg in configs:
            check(ev.evaluate(cfg), ref, cfg, (base, cfg))


def test_mobilenetv2_evaluator_matches_plain_evaluation():
    """MobileNetV2 (signed linear-bottleneck tensors, depthwise convs, projection shortcuts, a
    three-kernel head segment): the cached, folded evaluator matches plain evaluation for weight and
    tensor configurations, also after a base change; 8 images only, MobileNetV2 is slow on CPU."""
    model = random_model("mobilenetv2", None, seed=21, n_calib=8)
    table = kernel_table(model)
    space = table.space
    ranges = make_ranges(model, "generic", random_data(seed=22, n=4)[0], bits=(8, 4))
    x, y = random_data(seed=23, n=8)
    ref = Reference(model, table, ranges, x, y, batch_size=4)
    ev = CachedEvaluator(model, table, x, y, NORMALIZE, ranges=ranges, clip="maxabs", batch_size=4)
    check(ev.float_outcome, ref, {})
    rng = random.Random(0)
    full = {**{(W, n): rng.choice((4, 6, 8)) for n in space.layers},
            **{(A, t): rng.choice((8, 4, FLOAT_BITS)) for t in space.tensors}}
    configs = [{(W, "layers.5.conv2"): 3, (A, "layers.5.conv2"): 4},
               {(W, "conv2"): 4, (A, "conv2"): 8, (W, "linear"): 4, (A, "linear"): 4, (A, "pool"): 8},
               {(A, "layers.2.conv3"): 4}, full, {g: (b if g[0] == W else FLOAT_BITS) for g, b in full.items()}]
    for base in ({}, {(W, "layers.10.shortcut.0"): 4, (A, "layers.10.shortcut.0"): 8}):
        ev.set_base(base)
        for cfg in configs:
            check(ev.evaluate(cfg), ref, cfg, (base, cfg))
