"""utils/evaluation.py: the prefix-cached, BN-folded evaluator counts exactly what a plain
evaluation of the fake-quantized model counts, whatever the configuration and base.

Models are ResNet-20 (shortcuts A and B) with random but fixed weights and BatchNorm statistics,
on 64 random uint8 images evaluated in batches of 16 (so cached activations span 4 batches).
"""
import copy
import random

import pytest
import torch
import torch.nn as nn

from models.resnet import CifarResNet, resnet20
from utils.config import WEIGHT_BITS, full_config, quantizable_layers
from utils.evaluation import CachedEvaluator, FoldedModel, segment_layers
from utils.quantization import WeightQuantizer
from utils.train import Normalizer, evaluate

N_IMAGES, BATCH = 64, 16
MEAN, STD = [0.5, 0.45, 0.4], [0.25, 0.26, 0.27]



def random_model(shortcut, seed=0, depth=20):
    """A model in eval mode with random weights, BN affine and running statistics.

    Running statistics are first measured on random inputs (so activations keep a sane scale
    through 9 residual blocks and predictions vary between images), then perturbed randomly."""
    torch.manual_seed(seed)
    model = CifarResNet(depth, shortcut)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the calibration batches
        model.train()
        model(Normalizer(MEAN, STD, "cpu")(random_data(seed=seed + 100, n=64)[0]))
        for bn in bns:
            bn.momentum = 0.1
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
            bn.running_mean.add_(0.2 * torch.randn_like(bn.running_mean) * bn.running_var.sqrt())
            bn.running_var.mul_(torch.empty_like(bn.running_var).uniform_(0.6, 1.6))
        # Centre and scale the random head on the calibration features, so that predictions
        # spread over the classes instead of one class winning every image by its offset.
        model.eval()
        calib = Normalizer(MEAN, STD, "cpu")(random_data(seed=seed + 100, n=64)[0])
        feats = torch.flatten(nn.functional.adaptive_avg_pool2d(
            model.layer3(model.layer2(model.layer1(model.stem(calib)))), 1), 1)
        logits = feats @ model.linear.weight.T
        model.linear.weight.div_(logits.std(0, keepdim=True).T)
        model.linear.bias.copy_(-(logits / logits.std(0, keepdim=True)).mean(0))
        model.linear.bias.add_(0.1 * torch.randn(model.linear.out_features))
    return model.eval()


def random_data(seed=0, n=N_IMAGES):
    """Random uint8 NHWC images and labels. Each image is a random blocky colour pattern plus
    pixel noise: i.i.d. noise images all look alike after global pooling (one predicted class)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 4, 4, 3, generator=g).repeat_interleave(8, 1).repeat_interleave(8, 2)
    x = coarse * (0.5 + torch.rand(n, 1, 1, 1, generator=g)) + 0.15 * torch.randn(n, 32, 32, 3, generator=g)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y


def random_config(names, seed):
    rng = random.Random(seed)
    return {n: rng.choice(WEIGHT_BITS) for n in names}


def configs_for(names):
    """Single-layer changes in the stem, early, middle and late blocks, shortcut and head,
    and full random configurations."""
    singles = ["conv1", "layer1.0.conv1", "layer1.2.conv2", "layer2.0.conv1", "layer3.2.conv2", "linear"]
    singles += [n for n in names if "shortcut" in n]
    out = [{}]
    for i, n in enumerate(singles):
        out.append({n: (2, 3, 4)[i % 3]})
    out += [random_config(names, s) for s in range(4)]
    out += [{n: 2 for n in names}]
    return out


class Reference:
    """Plain evaluation: WeightQuantizer applied to the (unfolded) model, then utils.train.evaluate."""

    def __init__(self, model, quantizer, x, y, normalize):
        self.model, self.quantizer = model, quantizer
        self.x, self.y, self.normalize = x, y, normalize
        self._correct, self._pred = {}, {}  # memo: the model is fixed, so each config is evaluated once

    @staticmethod
    def key(config):
        return tuple(sorted(config.items()))

    def correct(self, config):
        k = self.key(config)
        if k not in self._correct:
            with self.quantizer.applied(config):
                self._correct[k] = evaluate(self.model, self.x, self.y, self.normalize, batch_size=BATCH)["correct"]
        return self._correct[k]

    def predictions(self, config):
        k = self.key(config)
        if k not in self._pred:
            with self.quantizer.applied(config), torch.no_grad():
                self._pred[k] = self.model(self.normalize(self.x)).argmax(1)
        return self._pred[k]


@pytest.fixture(scope="module", params=["A", "B"])
def setup(request):
    """One model and one quantizer per shortcut kind, shared by the reference and the evaluators
    (quantizing every layer at every width with the MSE clip search is the slow part; the
    evaluator runs on its own BN-folded copy, the reference on the model itself)."""
    model = random_model(request.param, seed=1 if request.param == "A" else 2)
    quantizer = WeightQuantizer(model)
    x, y = random_data(seed=3)
    normalize = Normalizer(MEAN, STD, "cpu")
    ref = Reference(model, quantizer, x, y, normalize)
    names = list(quantizable_layers(model))
    return dict(shortcut=request.param, model=model, quantizer=quantizer, x=x, y=y, normalize=normalize,
                ref=ref, names=names)


def make_evaluator(s, labels=None, **kw):
    return CachedEvaluator(s["model"], s["quantizer"], s["x"], s["y"] if labels is None else labels,
                           s["normalize"], batch_size=BATCH, **kw)


def test_fixture_is_discriminating(setup):
    """Sanity of the set-up itself: predictions vary across images and across configurations,
    so equal counts below are evidence, not a coincidence of a constant classifier."""
    ref = setup["ref"]
    p_float = ref.predictions({})
    assert len(torch.unique(p_float)) >= 3
    changed = [(ref.predictions(c) != p_float).sum().item() for c in configs_for(setup["names"])[1:]]
    assert max(changed) > N_IMAGES // 4   # some configurations change many predictions
    counts = {ref.correct(c) for c in configs_for(setup["names"])}
    assert len(counts) > 1


@pytest.mark.parametrize("labels", ["random", "float_predictions"])
def test_accuracy_matches_plain_evaluation(setup, labels):
    """CachedEvaluator.accuracy == plain evaluation of the quantized model, in correct counts, for
    every configuration, evaluated in an order that jumps between early and late layers."""
    ref = setup["ref"]
    y = setup["y"] if labels == "random" else ref.predictions({})
    if labels != "random":
        ref = Reference(setup["model"], setup["quantizer"], setup["x"], y, setup["normalize"])
    ev = make_evaluator(setup, labels=y)
    assert ev.n == N_IMAGES
    assert ev.base_correct == ref.correct({})
    configs = configs_for(setup["names"])
    order = configs + configs[::-1]  # revisit after later configs touched the cache
    for cfg in order:
        expected = ref.correct(cfg)
        assert ev.correct(cfg) == expected, cfg
        assert ev.accuracy(cfg) == pytest.approx(100.0 * expected / N_IMAGES, abs=1e-12)
    if labels == "float_predictions":
        assert ev.accuracy({}) == 100.0


def test_set_base_keeps_accuracy_exact(setup):
    """After set_base (a full recompute, then partial recomputes from a later segment), every
    configuration still counts exactly what plain evaluation counts."""
    names = setup["names"]
    base = random_config(names, 10)
    # Labels = the base's own predictions: every prediction a stale cache changes shows in the count.
    y = setup["ref"].predictions(base)
    ref = Reference(setup["model"], setup["quantizer"], setup["x"], y, setup["normalize"])
    ev = make_evaluator(setup, labels=y)
    ev.set_base(base)
    assert ev.base_accuracy == 100.0
    assert ev.base == full_config(base, names)
    assert ev.base_correct == ref.correct(base)

    # Greedy-like walk: each new base differs from the last in one layer, early or late.
    walk = ["layer3.1.conv1", "layer1.0.conv2", "linear", "layer2.2.conv1", "conv1"]
    current = dict(base)
    for i, layer in enumerate(walk):
        current = dict(current)
        current[layer] = (2, 5, 3)[i % 3] if current[layer] != (2, 5, 3)[i % 3] else 8
        ev.set_base(current)
        assert ev.base_correct == ref.correct(current), ("base", layer)
        for probe in ("conv1", "layer1.1.conv1", "layer2.0.conv2", "layer3.0.conv1", "linear"):
            cand = dict(current)
            cand[probe] = 2 if current[probe] != 2 else 32
            assert ev.correct(cand) == ref.correct(cand), (layer, probe)
    for cfg in configs_for(names)[-3:]:
        assert ev.correct(cfg) == ref.correct(cfg)
    # Setting the same base again is a no-op and still exact.
    before = ev.evaluations
    ev.set_base(current)
    assert ev.evaluations == before
    assert ev.correct(current) == ref.correct(current)


def test_ragged_last_batch(setup):
    """64 images in batches of 24 (24 + 24 + 16): cached activations of a short last batch."""
    names = setup["names"]
    y = setup["ref"].predictions({})
    ref = Reference(setup["model"], setup["quantizer"], setup["x"], y, setup["normalize"])
    ev = CachedEvaluator(setup["model"], setup["quantizer"], setup["x"], y, setup["normalize"], batch_size=24)
    base = {"layer1.1.conv2": 3}
    ev.set_base(base)
    for cfg in ({}, {"layer1.1.conv2": 3, "layer3.0.conv2": 2}, {"layer1.1.conv2": 3, "linear": 2},
                random_config(names, 11)):
        assert ev.correct(cfg) == ref.correct(cfg), cfg


def test_without_activation_cache_matches(setup):
    ref, names = setup["ref"], setup["names"]
    ev = make_evaluator(setup, cache_activations=False, base_config=random_config(names, 5))
    assert ev.base_correct == ref.correct(random_config(names, 5))
    for cfg in configs_for(names)[:6]:
        assert ev.correct(cfg) == ref.correct(cfg)


def test_evaluator_leaves_source_model_and_quantizer_consistent(setup):
    """Evaluating quantizes the evaluator's own model in place; restoring gives the float weights."""
    model = copy.deepcopy(setup["model"])
    floats = {n: m.weight.detach().clone() for n, m in quantizable_layers(model).items()}
    q = WeightQuantizer(model, clip="maxabs")
    ev = CachedEvaluator(model, q, setup["x"], setup["y"], setup["normalize"], batch_size=BATCH)
    ev.accuracy({n: 2 for n in setup["names"]})
    assert not torch.equal(model.linear.weight, floats["linear"])
    q.restore()
    for name, m in quantizable_layers(model).items():
        assert torch.equal(m.weight, floats[name])


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_folded_model_matches_unfolded(shortcut):
    """FoldedModel (BN folded into the conv before it) computes what the model with BN computes,
    in float and under a quantized configuration, and it contains no BatchNorm any more."""
    model = random_model(shortcut, seed=7)
    x = Normalizer(MEAN, STD, "cpu")(random_data(seed=8, n=32)[0])
    folded = FoldedModel(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.model.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the source keeps its BNs
    with torch.no_grad():
        ref = model(x)
        got = folded.model(x)
    scale = ref.abs().max().item()
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4 * scale)
    assert (got.argmax(1) == ref.argmax(1)).float().mean() >= 0.95

    q = WeightQuantizer(model, clip="maxabs")  # the clip mode is irrelevant here, maxabs is fast
    cfg = random_config(list(quantizable_layers(model)), 3)
    q.apply(cfg)
    folded.sync()
    with torch.no_grad():
        ref_q = model(x)
        got_q = folded.model(x)
    assert not torch.allclose(ref_q, ref, rtol=1e-3, atol=1e-3 * scale)  # quantization mattered
    assert torch.allclose(got_q, ref_q, rtol=1e-4, atol=1e-4 * ref_q.abs().max().item())


@pytest.mark.parametrize("depth,shortcut", [(20, "A"), (20, "B"), (8, "B"), (32, "A")])
def test_segment_layers_cover_every_layer_once(depth, shortcut):
    """Every quantizable layer is in exactly one segment, segments are in network order, each
    layer lies inside its segment's module, and chaining the segments is the forward pass."""
    model = CifarResNet(depth, shortcut).eval()
    names = list(quantizable_layers(model))
    segs = segment_layers(model)
    covered = [n for _, _, inside in segs for n in inside]
    assert covered == names                       # once each, in order
    assert len(set(covered)) == len(covered)
    seg_names = [s for s, _, _ in segs]
    n_blocks = 3 * (depth - 2) // 6
    assert seg_names[0] == "stem" and seg_names[-1] == "head" and len(segs) == n_blocks + 2
    assert segs[0][2] == ["conv1"] and segs[-1][2] == ["linear"]
    for seg, _, inside in segs[1:-1]:
        assert inside and all(n.startswith(seg + ".") for n in inside)
    expected_layers = depth + (2 if shortcut == "B" else 0)  # 6n+2 weighted layers + 2 projections
    assert len(names) == expected_layers
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = x
        for _, fn, _ in segs:
            h = fn(h)
        assert torch.allclose(h, model(x), atol=1e-5)


def test_resnet20_b_has_22_layers():
    assert len(list(quantizable_layers(resnet20("B")))) == 22
    assert len(list(quantizable_layers(resnet20("A")))) == 20
