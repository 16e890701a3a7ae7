"""utils/evaluation.py: the BN-folded, prefix-cached evaluator computes exactly what a plain
evaluation of the fake-quantized model computes, whatever the configuration and base.

The plain evaluation ("Reference") runs the whole network batch by batch, its weights set by the
same WeightQuantizer and every quantized layer input fake-quantized by a forward pre-hook that
applies the same ActQuant. It runs the BN-folded network (its own FoldedModel) for every
configuration, and the model with its BatchNorms as well for weight-only configurations (see
Reference for why not with activation rounding). FoldedModel itself is checked against the model
with its BNs for every registered architecture and for a hand-built model with a biased conv and
pre-activation blocks. Models have random but fixed weights and BatchNorm statistics; ResNet-20
(shortcuts A and B) runs on 64 random uint8 images in batches of 16 (so cached activations span 4
batches), MobileNetV2 (slow on CPU) on 8. The models are fully convolutional with global pooling, so
the images are 16x16 (a quarter of CIFAR's cost; every layer still runs, on smaller maps).
"""
import copy
import functools
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import build_model
from models.resnet import SHORTCUTS
from models.structure import Segment, check_structure, quantizable_layers
from utils.config import FLOAT_BITS, WEIGHT_BITS
from utils.errors import UserError
from utils.evaluation import CachedEvaluator, FoldedModel, Outcome, cached_segments
from utils.quantization import ActQuant, WeightQuantizer, act_grid, calibrate_activations
from utils.train import Normalizer

N_IMAGES, BATCH, IMG = 64, 16, 16
MEAN, STD = [0.5, 0.45, 0.4], [0.25, 0.26, 0.27]
A_BITS = (8, 4, 3)   # calibrated activation widths (8 by calibrate_activations, 4 and 3 derived)
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


def make_act_quant(model, names, x_u8, bits=A_BITS):
    """ActQuants for every layer at every width in `bits`: 8 bits calibrated by calibrate_activations
    on these images; lower widths derived from the 8-bit range, clipped to 70% of it (the evaluator
    only needs *some* fixed quantizer per (layer, width); low-bit range searches are slow on CPU)."""
    cal = calibrate_activations(model, [NORMALIZE(x_u8)], names, [8])
    out = {}
    for n in names:
        q8 = cal[n, 8]
        top = q8.scale * q8.qmax
        for b in bits:
            if b == 8:
                out[n, b] = q8
            else:
                qmin, qmax = act_grid(b, q8.signed)
                out[n, b] = ActQuant(b, 0.7 * top / qmax, 0, qmin, qmax, q8.signed)
    return out


def expand(config, names):
    """The in-memory full form {layer: (w, a)}; a bare int is a weight width (float activations)."""
    out = {}
    for n in names:
        v = config.get(n, (FLOAT_BITS, FLOAT_BITS))
        out[n] = v if isinstance(v, tuple) else (v, FLOAT_BITS)
    return out


class Reference:
    """Plain evaluation: the whole forward pass, batch by batch, of the model with the
    WeightQuantizer's weights and a forward pre-hook on every layer whose activation width is below
    32 that applies the same ActQuant to its input.

    folded=True runs its own BN-folded copy (FoldedModel, re-synced for every configuration), i.e. the
    network the evaluator quantizes: activation rounding is then applied to bit-identical values.
    folded=False runs the model with its BatchNorms. Folding changes activations by float rounding
    (~1e-6); once activations are rounded to a few bits, such differences flip some roundings and the
    flips grow through the layers, so the unfolded model is the reference for weight-only
    configurations, where they stay at float rounding."""

    def __init__(self, model, quantizer, act_quant, x, y, batch_size=BATCH, folded=True):
        self.model, self.quantizer, self.act_quant = model, quantizer, act_quant
        self.x, self.y, self.batch_size = x, y, batch_size
        self.folded = FoldedModel(model) if folded else None
        self.names = list(quantizable_layers(model))
        self._memo = {}
        self.float_logp = F.log_softmax(self.logits({}), 1)

    @torch.no_grad()
    def logits(self, config):
        full = expand(config, self.names)
        if self.folded is None:
            assert all(a == FLOAT_BITS for _, a in full.values()), "unfolded reference: weight-only configurations"
        with self.quantizer.applied({n: w for n, (w, _) in full.items()}):
            if self.folded is not None:
                self.folded.sync()
            net = self.model if self.folded is None else self.folded.model
            mods = dict(net.named_modules())
            handles = [mods[n].register_forward_pre_hook((lambda q: lambda _m, inputs: (q(inputs[0]),))(
                self.act_quant[n, a])) for n, (_, a) in full.items() if a != FLOAT_BITS]
            try:
                self.model.eval()
                return torch.cat([net(NORMALIZE(self.x[s:s + self.batch_size]))
                                  for s in range(0, len(self.y), self.batch_size)])
            finally:
                for h in handles:
                    h.remove()

    def with_labels(self, y):
        """The same reference scoring other labels; logits (label-free) are shared."""
        other = copy.copy(self)
        other.y = y
        return other

    def cached_logits(self, config):
        """logits(config), computed once per configuration (the model and data are fixed)."""
        key = tuple(sorted(expand(config, self.names).items()))
        if key not in self._memo:
            self._memo[key] = self.logits(config)
        return self._memo[key]

    def outcome(self, config) -> Outcome:
        logits = self.cached_logits(config)
        logp = F.log_softmax(logits, 1)
        kl = (self.float_logp.exp() * (self.float_logp - logp)).sum(1).mean().item()
        return Outcome(logits.argmax(1) == self.y, F.cross_entropy(logits, self.y).item(), kl)

    def predictions(self, config):
        return self.cached_logits(config).argmax(1)


def weight_only(config):
    return all(not isinstance(v, tuple) or v[1] == FLOAT_BITS for v in config.values())


def assert_same(got: Outcome, ref: Outcome, what=""):
    """Identical per-image correctness (so identical counts); loss and KL equal to float tolerance."""
    assert got.n == ref.n, what
    assert got.n_correct == ref.n_correct, what
    assert torch.equal(got.correct, ref.correct), what
    assert got.loss == pytest.approx(ref.loss, rel=1e-4, abs=1e-5), what
    assert got.kl == pytest.approx(ref.kl, rel=1e-3, abs=2e-5), what
    assert got.kl >= 0.0, what


def check(got: Outcome, refs, config, what=""):
    """`got` against the folded plain evaluation, and against the unfolded model (with its BNs)
    too where the configuration quantizes weights only. refs = (folded, unfolded)."""
    assert_same(got, refs[0].outcome(config), what or config)
    if weight_only(config):
        assert_same(got, refs[1].outcome(config), ("unfolded", what or config))


def random_config(names, seed, act=True, p_float=0.25):
    """Random (w, a) per layer: weights 2-8 bits or float, activations among A_BITS or float."""
    rng = random.Random(seed)
    out = {}
    for n in names:
        w = FLOAT_BITS if rng.random() < p_float else rng.choice(WEIGHT_BITS[:-1])
        a = FLOAT_BITS if (not act or rng.random() < p_float) else rng.choice(A_BITS)
        out[n] = (w, a)
    return out


def configs_for(names):
    """Single-layer changes (weights, activations, both) in the stem, early, middle and late blocks,
    shortcut and head, then full random configurations and an all-low-width one."""
    singles = ["conv1", "layer1.0.conv1", "layer1.2.conv2", "layer2.0.conv1", "layer3.2.conv2", "linear"]
    singles += [n for n in names if "shortcut" in n][:1]
    kinds = [(2, FLOAT_BITS), (FLOAT_BITS, 3), (3, 4), (4, 8)]
    out = [{}]
    for i, n in enumerate(singles):
        out.append({n: kinds[i % len(kinds)]})
    out += [random_config(names, s) for s in range(3)]
    out += [random_config(names, 8, act=False)]
    out += [{n: (3, 4) for n in names}, {n: (2, FLOAT_BITS) for n in names}]
    return out


@functools.lru_cache(maxsize=None)
def build_setup(shortcut):
    """One ResNet-20 per shortcut kind with its quantizer and activation quantizers, shared by the
    references and the evaluators (the evaluator runs on its own BN-folded copy, the references on
    theirs and on the model itself)."""
    model = random_model("resnet20", shortcut, seed=1 if shortcut == "A" else 2)
    quantizer = WeightQuantizer(model, clip="maxabs")  # the clip search is tested elsewhere; maxabs is fast
    names = list(quantizable_layers(model))
    act_quant = make_act_quant(model, names, random_data(seed=4, n=32)[0])
    x, y = random_data(seed=3)
    refs = (Reference(model, quantizer, act_quant, x, y), Reference(model, quantizer, act_quant, x, y, folded=False))
    return dict(shortcut=shortcut, model=model, quantizer=quantizer, act_quant=act_quant, x=x, y=y,
                ref=refs[0], refs=refs, names=names)


@pytest.fixture(params=SHORTCUTS)
def setup(request):
    """The ResNet-20 set-up for shortcut A and for B: for the central equivalence properties.
    Evaluators leave the shared model's weights quantized; they are restored after each test."""
    s = build_setup(request.param)
    yield s
    s["quantizer"].restore()


@pytest.fixture
def setup_b():
    """The shortcut-B set-up only (it has every kind of layer, projections included): for the
    properties that do not depend on the shortcut kind, to keep the file quick."""
    s = build_setup("B")
    yield s
    s["quantizer"].restore()


def make_evaluator(s, labels=None, **kw):
    kw.setdefault("act_quant", s["act_quant"])
    return CachedEvaluator(s["model"], s["quantizer"], s["x"], s["y"] if labels is None else labels,
                           NORMALIZE, batch_size=kw.pop("batch_size", BATCH), **kw)


def relabelled(s, labels):
    """(folded, unfolded) references of the set-up scoring other labels."""
    return tuple(r.with_labels(labels) for r in s["refs"])


# ----------------------------------------------------------------------------- evaluator vs plain evaluation

def test_fixture_is_discriminating(setup):
    """Sanity of the set-up itself: predictions vary across images and across configurations (weight
    and activation changes alike), so equal counts below are evidence, not a coincidence of a
    constant classifier."""
    ref = setup["ref"]
    p_float = ref.predictions({})
    assert len(torch.unique(p_float)) >= 3
    configs = configs_for(setup["names"])
    changed = [(ref.predictions(c) != p_float).sum().item() for c in configs[1:]]
    assert max(changed) > N_IMAGES // 4
    act_only = {n: (FLOAT_BITS, 3) for n in setup["names"]}
    assert (ref.predictions(act_only) != p_float).sum() > 0
    assert len({ref.outcome(c).n_correct for c in configs}) > 1


def test_outcomes_match_plain_evaluation(setup):
    """CachedEvaluator.evaluate == plain evaluation of the same fake-quantized model (weights and
    activations): the same images correct (so the same counts), loss and KL to float tolerance, for
    every configuration, evaluated in an order that jumps between early and late layers and back."""
    refs = setup["refs"]
    ev = make_evaluator(setup)
    assert ev.n == N_IMAGES
    check(ev.float_outcome, refs, {}, "float")
    configs = configs_for(setup["names"])
    for cfg in configs + configs[::-1]:  # revisit after later configs touched the state
        check(ev.evaluate(cfg), refs, cfg)
    for cfg in configs[1], configs[-3]:  # the count and percentage shortcuts
        expected = refs[0].outcome(cfg)
        assert ev.correct(cfg) == expected.n_correct
        assert ev.accuracy(cfg) == pytest.approx(100.0 * expected.n_correct / N_IMAGES, abs=1e-12)


def test_set_base_keeps_outcomes_exact(setup):
    """After set_base (recomputing the cached activations behind the first change), every
    configuration still evaluates exactly as plain evaluation does, through a greedy-like walk of
    bases that change one layer's weight or activation width at a time, early or late."""
    names = setup["names"]
    base = random_config(names, 10)
    y = setup["ref"].predictions(base)  # labels = the base's own predictions: a stale cache shows
    refs = relabelled(setup, y)
    ev = make_evaluator(setup, labels=y)
    ev.set_base(base)
    assert ev.base == expand(base, names)
    assert ev.base_outcome.accuracy == 100.0
    check(ev.evaluate(base), refs, base, "base")
    walk = [("layer3.1.conv1", (2, 8)), ("layer1.0.conv2", (FLOAT_BITS, 3)), ("linear", (5, 4)),
            ("conv1", (4, 3)), ("layer2.2.conv1", (3, FLOAT_BITS))]
    probes = [("conv1", (2, 4)), ("layer1.1.conv1", (FLOAT_BITS, 3)), ("layer2.0.conv2", (3, FLOAT_BITS)),
              ("layer3.2.conv1", (2, 8)), ("linear", (2, 3))]
    current = dict(base)
    for i, (layer, wa) in enumerate(walk):
        current = {**current, layer: wa if current[layer] != wa else (6, FLOAT_BITS)}
        ev.set_base(current)
        check(ev.base_outcome, refs, current, ("base", layer))
        for probe, pwa in (probes[i % 5], probes[(i + 2) % 5], probes[(i + 4) % 5]):  # spread over the net
            cand = {**current, probe: pwa if current[probe] != pwa else (FLOAT_BITS, FLOAT_BITS)}
            check(ev.evaluate(cand), refs, cand, (layer, probe))
    for cfg in configs_for(names)[-3:]:
        check(ev.evaluate(cfg), refs, cfg)
    before = ev.evaluations
    ev.set_base(current)            # the same base again: nothing to recompute
    assert ev.evaluate(current) is ev.base_outcome
    assert ev.evaluations == before
    check(ev.evaluate(current), refs, current)


def test_base_config_argument_and_outcome_hint(setup_b):
    """A base given to the constructor equals set_base afterwards; with no cache, set_base(config,
    outcome) adopts the given outcome instead of recomputing it."""
    names = setup_b["names"]
    base = random_config(names, 12)
    ev = make_evaluator(setup_b, base_config=base)
    assert ev.base == expand(base, names)
    assert_same(ev.base_outcome, setup_b["ref"].outcome(base))
    ev0 = make_evaluator(setup_b, cache_activations=False)
    hint = ev.base_outcome
    before = ev0.evaluations
    ev0.set_base(base, hint)
    assert ev0.base_outcome is hint and ev0.evaluations == before


def test_ragged_last_batch(setup_b):
    """64 images in batches of 24 (24 + 24 + 16): cached activations of a short last batch."""
    names = setup_b["names"]
    refs = tuple(Reference(setup_b["model"], setup_b["quantizer"], setup_b["act_quant"], setup_b["x"], setup_b["y"],
                           batch_size=24, folded=f) for f in (True, False))
    ev = make_evaluator(setup_b, batch_size=24)
    ev.set_base({"layer1.1.conv2": (3, 4)})
    for cfg in ({}, {"layer1.1.conv2": (3, 4), "layer3.0.conv2": (2, 8)},
                {"layer1.1.conv2": (3, 4), "linear": (2, 3)}, random_config(names, 11),
                random_config(names, 11, act=False)):
        check(ev.evaluate(cfg), refs, cfg)


def test_without_activation_cache_matches(setup_b):
    """cache_activations=False (every evaluation from the image) gives the plain evaluation too,
    with a base set in the constructor and changed later."""
    refs, names = setup_b["refs"], setup_b["names"]
    ev = make_evaluator(setup_b, cache_activations=False, base_config=random_config(names, 5))
    assert not any(ev.keep) and ev.cached_bytes == 0
    check(ev.base_outcome, refs, random_config(names, 5))
    for cfg in configs_for(names)[:6] + [random_config(names, 6)]:
        check(ev.evaluate(cfg), refs, cfg)
    ev.set_base(random_config(names, 7, act=False))
    check(ev.base_outcome, refs, random_config(names, 7, act=False))
    for cfg in configs_for(names)[6:9]:
        check(ev.evaluate(cfg), refs, cfg)


def identical(a: Outcome, b: Outcome):
    return torch.equal(a.correct, b.correct) and a.loss == b.loss and a.kl == b.kl


def test_bounded_cache_gives_identical_results(setup_b):
    """A cache_bytes bound that keeps only some segment inputs (recomputing the rest from the nearest
    kept one), or none at all, gives results bit-identical to the unbounded cache, through base
    changes and candidates in every part of the network."""
    names = setup_b["names"]
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
    bases = [random_config(names, 20), {**random_config(names, 20), "layer2.1.conv1": (2, 3),
                                        "layer1.0.conv1": (8, 4)}, {}]
    for base in bases:
        for ev in evs:
            ev.set_base(base)
        assert identical(small.base_outcome, full.base_outcome) and identical(none.base_outcome, full.base_outcome)
        for layer in names[2::7] + ["linear"]:
            cand = {**base, layer: (2, 4)}
            got = [ev.evaluate(cand) for ev in evs]
            assert identical(got[1], got[0]) and identical(got[2], got[0]), (base, layer)
    check(full.evaluate(bases[0]), setup_b["refs"], bases[0])


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


# ----------------------------------------------------------------------------- KL, loss, errors

def test_kl_is_zero_for_float_and_positive_otherwise(setup_b):
    """The float configuration has KL exactly 0 against itself (and the float loss), also when
    evaluated against a quantized base; every other configuration has KL >= 0, and > 0 where
    predictions change."""
    names = setup_b["names"]
    ev = make_evaluator(setup_b)
    assert ev.float_outcome.kl == 0.0 and ev.evaluate({}).kl == 0.0
    float_loss = ev.float_outcome.loss
    for cfg in configs_for(names)[1:]:
        out = ev.evaluate(cfg)
        assert out.kl >= 0.0, cfg
        if not torch.equal(out.correct, ev.float_outcome.correct):
            assert out.kl > 0.0, cfg
    ev.set_base(random_config(names, 30))
    again = ev.evaluate({n: (FLOAT_BITS, FLOAT_BITS) for n in names})
    assert again.kl == pytest.approx(0.0, abs=1e-9)
    assert again.loss == pytest.approx(float_loss, rel=1e-6)
    assert torch.equal(again.correct, ev.float_outcome.correct)
    assert ev.evaluate({n: (2, 3) for n in names}).kl > 0.01


@pytest.mark.parametrize("bad", [{"nope": 4}, {"layer9.0.conv1": (4, 8)}, {"conv1": 4, "layer1.0.conv": (8, 8)},
                                 {"bn1": 4}])
def test_unknown_layer_is_user_error(setup_b, bad):
    """A configuration naming a layer the model does not have is a UserError (not silently evaluated
    as float), in evaluate, set_base and the constructor's base_config; the evaluator is unharmed."""
    ev = make_evaluator(setup_b)
    cfg = {"layer2.0.conv1": (3, 4)}
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
    assert ev.base == expand({}, setup_b["names"])


@pytest.mark.parametrize("bad", [{"conv1": (FLOAT_BITS, 6)}, {"layer2.0.conv2": (4, 2)}, {"linear": (8, 5)}])
def test_uncalibrated_activation_width_is_user_error(setup_b, bad):
    """Asking for an activation width no ActQuant was calibrated for is a UserError naming the
    layer, in evaluate, set_base and base_config; an evaluator given no act_quant refuses every
    activation width below 32."""
    ev = make_evaluator(setup_b)
    layer = next(iter(bad))
    with pytest.raises(UserError, match=layer):
        ev.evaluate(bad)
    with pytest.raises(UserError):
        ev.set_base(bad)
    with pytest.raises(UserError):
        make_evaluator(setup_b, base_config=bad)
    plain = make_evaluator(setup_b, act_quant=None, cache_activations=False)
    with pytest.raises(UserError):
        plain.evaluate({"layer1.0.conv1": (FLOAT_BITS, 8)})
    check(plain.evaluate({"layer1.0.conv1": (4, FLOAT_BITS)}), setup_b["refs"], {"layer1.0.conv1": (4, FLOAT_BITS)})


def test_evaluator_is_unharmed_by_uncalibrated_width_error(setup_b):
    """After a configuration is refused for an uncalibrated activation width, later evaluations
    still compute the plain evaluation of their own configuration (the refused one leaves nothing
    behind)."""
    ev = make_evaluator(setup_b, cache_activations=False)
    cfg = {"conv1": (4, FLOAT_BITS)}
    before = ev.evaluate(cfg)
    with pytest.raises(UserError):
        ev.evaluate({"layer3.0.conv1": (2, 6)})
    assert identical(ev.evaluate(cfg), before)


def test_evaluator_leaves_source_model_and_quantizer_consistent(setup_b):
    """Evaluating quantizes the source model's weights through its quantizer (the folded copy reads
    them); restoring gives the exact float weights back, and the source model keeps its BNs."""
    model = copy.deepcopy(setup_b["model"])
    floats = {n: m.weight.detach().clone() for n, m in quantizable_layers(model).items()}
    q = WeightQuantizer(model, clip="maxabs")
    ev = CachedEvaluator(model, q, setup_b["x"], setup_b["y"], NORMALIZE, batch_size=BATCH)
    ev.accuracy({n: 2 for n in setup_b["names"]})
    assert not torch.equal(model.linear.weight, floats["linear"])
    assert q.current == {n: 2 for n in setup_b["names"]}
    q.restore()
    for name, m in quantizable_layers(model).items():
        assert torch.equal(m.weight, floats[name])
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_file_form_configs(setup_b):
    """File-form configurations (bare weight widths, {"w", "a"} objects, absent layers float) mean
    the same as the in-memory {layer: (w, a)} form."""
    ev = make_evaluator(setup_b)
    assert identical(ev.evaluate({"conv1": 4, "linear": {"w": 3, "a": 8}}),
                     ev.evaluate({"conv1": (4, FLOAT_BITS), "linear": (3, 8)}))
    check(ev.evaluate({"layer2.0.conv1": {"a": 4}}), setup_b["refs"], {"layer2.0.conv1": (FLOAT_BITS, 4)})
    check(ev.evaluate({"layer2.0.conv1": 3}), setup_b["refs"], {"layer2.0.conv1": (3, FLOAT_BITS)})


# ----------------------------------------------------------------------------- folding

def every_model():
    from models import arch_names, takes_shortcut
    return [pytest.param(a, s, id=a + (s or "")) for a in arch_names()
            for s in (SHORTCUTS if takes_shortcut(a) else (None,))]


def assert_close(got, ref):
    scale = ref.abs().max().item()
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4 * scale), (got - ref).abs().max().item() / scale


@pytest.mark.parametrize("arch,shortcut", every_model())
def test_folded_model_matches_unfolded(arch, shortcut):
    """For every registered architecture, FoldedModel (each declared conv-BN pair folded into the
    conv) computes what the model with its BNs computes in eval mode, with random non-trivial BN
    statistics, in float and after a quantized configuration is applied and synced; every BN of these
    models follows a conv, so none is left, while the source model keeps its own."""
    model = random_model(arch, shortcut, seed=7, n_calib=16)
    x = NORMALIZE(random_data(seed=8, n=8)[0])
    folded = FoldedModel(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.model.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        ref, got = model(x), folded.model(x)
    assert_close(got, ref)
    assert (got.argmax(1) == ref.argmax(1)).float().mean() >= 0.75

    q = WeightQuantizer(model, clip="maxabs")  # the clip mode is irrelevant here, maxabs is fast
    names = list(quantizable_layers(model))
    rng = random.Random(3)
    q.apply({n: rng.choice((3, 4, 6, 8, FLOAT_BITS)) for n in names})
    folded.sync()
    with torch.no_grad():
        ref_q, got_q = model(x), folded.model(x)
    assert not torch.allclose(ref_q, ref, rtol=1e-3, atol=1e-3 * ref.abs().max().item())  # it mattered
    assert_close(got_q, ref_q)


class PreActBlock(nn.Module):
    """Pre-activation residual block: BN -> ReLU -> conv -> BN -> ReLU -> conv (+ x).

    bn1 normalizes the block *input* and must stay a BN; bn2 normalizes conv1's output only and
    folds into conv1; conv2 (with a bias) has no BN after it. Name-based pairing would fold
    bn1 into conv1 and bn2 into conv2, both wrong."""

    def __init__(self, c):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c)
        self.conv1 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=True)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + x


class PreActNet(nn.Module):
    """Stem conv WITH a bias followed by its BN; two pre-activation blocks; a final BN + ReLU after
    the last addition (foldable into nothing); linear. Declares its own structure."""

    def __init__(self, c=8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, 1, 1, bias=True)
        self.bn1 = nn.BatchNorm2d(c)
        self.blocks = nn.Sequential(PreActBlock(c), PreActBlock(c))
        self.bn_out = nn.BatchNorm2d(c)
        self.linear = nn.Linear(c, 10)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Conv2d) and m.bias is not None:
                    m.bias.uniform_(-0.5, 0.5)

    def stem(self, x):
        return F.relu(self.bn1(self.conv1(x)))

    def head(self, x):
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(F.relu(self.bn_out(x)), 1), 1))

    def segments(self):
        return [Segment("stem", self.stem, ("conv1",)),
                *(Segment(f"blocks.{i}", b, (f"blocks.{i}.conv1", f"blocks.{i}.conv2"))
                  for i, b in enumerate(self.blocks)),
                Segment("head", self.head, ("linear",))]

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
    bias; the folded model equals the unfolded one in float and quantized. Folding by names instead
    (bn1 into conv1, bn2 into conv2) changes the output: the check discriminates."""
    model = preact_model()
    check_structure(model)
    x = NORMALIZE(random_data(seed=12, n=16)[0])
    folded = FoldedModel(model)
    fm = dict(folded.model.named_modules())
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
        ref, got = model(x), folded.model(x)
    assert_close(got, ref)

    q = WeightQuantizer(model, clip="maxabs")
    q.apply({"conv1": 3, "blocks.0.conv1": 4, "blocks.0.conv2": 2, "blocks.1.conv1": 8, "linear": 3})
    folded.sync()
    with torch.no_grad():
        ref_q, got_q = model(x), folded.model(x)
    assert not torch.allclose(ref_q, ref, rtol=1e-3, atol=1e-3 * ref.abs().max().item())
    assert_close(got_q, ref_q)
    q.restore()

    by_name = copy.deepcopy(model)
    by_name.conv_bn_pairs = lambda: [("conv1", "bn1")] + [(f"blocks.{i}.conv{j}", f"blocks.{i}.bn{j}")
                                                          for i in range(2) for j in (1, 2)]
    check_structure(by_name)  # structurally plausible, semantically wrong
    with torch.no_grad():
        wrong = FoldedModel(by_name).model(x)
    assert not torch.allclose(wrong, ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


def test_cached_evaluator_on_preactivation_model():
    """The evaluator works from declared structure alone: on the pre-activation model (unfolded
    input BNs inside segments, biased convs) it matches plain evaluation, weights and activations."""
    model = preact_model(seed=13)
    names = list(quantizable_layers(model))
    quantizer = WeightQuantizer(model)
    act_quant = make_act_quant(model, names, random_data(seed=14, n=16)[0])
    x, y = random_data(seed=15, n=32)
    refs = tuple(Reference(model, quantizer, act_quant, x, y, batch_size=8, folded=f) for f in (True, False))
    ev = CachedEvaluator(model, quantizer, x, y, NORMALIZE, batch_size=8, act_quant=act_quant)
    check(ev.float_outcome, refs, {})
    configs = [{"blocks.1.conv1": (2, 4)}, {"conv1": (3, 8)}, {"blocks.0.conv2": (FLOAT_BITS, 3)},
               random_config(names, 1), random_config(names, 2), random_config(names, 2, act=False)]
    for base in ({}, random_config(names, 3)):
        ev.set_base(base)
        for cfg in configs:
            check(ev.evaluate(cfg), refs, cfg, (base, cfg))


def test_mobilenetv2_evaluator_matches_plain_evaluation():
    """MobileNetV2 (signed linear-bottleneck inputs, depthwise convs, projection shortcuts, a
    two-layer head segment): the cached, folded evaluator matches plain evaluation for weight and
    activation configurations, also after a base change; 8 images only, MobileNetV2 is slow on CPU."""
    model = random_model("mobilenetv2", None, seed=21, n_calib=8)
    names = list(quantizable_layers(model))
    quantizer = WeightQuantizer(model, clip="maxabs")
    act_quant = make_act_quant(model, names, random_data(seed=22, n=4)[0], bits=(8, 4))
    x, y = random_data(seed=23, n=8)
    refs = tuple(Reference(model, quantizer, act_quant, x, y, batch_size=4, folded=f) for f in (True, False))
    ev = CachedEvaluator(model, quantizer, x, y, NORMALIZE, batch_size=4, act_quant=act_quant)
    check(ev.float_outcome, refs, {})
    rng = random.Random(0)
    full = {n: (rng.choice((4, 6, 8)), rng.choice((8, 4, FLOAT_BITS))) for n in names}
    configs = [{"layers.5.conv2": (3, 4)}, {"conv2": (4, 8), "linear": (4, 4)}, full,
               {n: (w, FLOAT_BITS) for n, (w, _) in full.items()}]
    for base in ({}, {"layers.10.shortcut.0": (4, 8)}):
        ev.set_base(base)
        for cfg in configs:
            check(ev.evaluate(cfg), refs, cfg, (base, cfg))


def test_outcome_properties():
    """Outcome's n, n_correct and accuracy follow from its correct vector."""
    o = Outcome(torch.tensor([True, False, True, True]), 0.5, 0.1)
    assert (o.n, o.n_correct, o.accuracy) == (4, 3, 75.0)
    assert Outcome(torch.zeros(0, dtype=torch.bool), 0.0, 0.0).accuracy == 0.0
