"""quant/correct.py: statistics correction of a quantized, folded network (bias correction, BN re-estimation).

On the random ResNet-20 B of tests/test_evaluation.py under uniform W4A4: after the correction every corrected
layer's output has the float network's per-channel mean (and, under "bn", spread) on the calibration images,
the integer levels of every weight are unchanged, and a float network needs no correction.
"""
import pytest
import torch

from quant.correct import apply_, channel_stats, corrections, output_stats
from quant.fold import fold_bn
from quant.place import quantize_
from test_evaluation import (NORMALIZE, build_setup, identical, make_evaluator, random_config, random_data,
                             walk_candidates)


@pytest.fixture(scope="module")
def w4a4():
    s = build_setup("B")
    conv_layers = [c for c, _ in s["model"].conv_bn_pairs()]
    x = NORMALIZE(random_data(seed=5, n=48)[0])
    fm = fold_bn(s["model"])
    cfg = s["space"].uniform(4, 4)

    def quantized():
        return quantize_(fold_bn(s["model"]), cfg, s["ranges"], "generic", clip="maxabs")
    return s, conv_layers, x, fm, output_stats(fm, conv_layers, x), quantized


def test_bn_correction_restores_the_float_statistics_and_keeps_the_levels(w4a4):
    s, layers, x, fm, fstats, quantized = w4a4
    qm = quantized()
    before = output_stats(qm, layers, x)
    quantized_w = {n: qm.get_submodule(n).weight.clone() for n in layers}
    found = corrections(qm, fstats, x, "bn")
    assert set(found) == set(layers)
    assert output_stats(qm, layers, x).keys() == before.keys()     # corrections() leaves the model as it was
    apply_(qm, found)
    after = output_stats(qm, layers, x)
    worst_before = max(float((before[n][0] - fstats[n][0]).abs().max()) for n in layers)
    for n in layers:
        assert torch.allclose(after[n][0], fstats[n][0], atol=1e-4, rtol=1e-4), n
        assert torch.allclose(after[n][1], fstats[n][1], atol=1e-4, rtol=1e-3), n
        # levels x (r x scale): r divided back out is the quantized weight, so the levels on their scales
        w, r = qm.get_submodule(n).weight, found[n].r.view(-1, 1, 1, 1)
        assert (r > 0).all() and torch.allclose(w / r, quantized_w[n], rtol=1e-6, atol=0), n
    assert worst_before > 1e-2       # there was something to correct


def test_bias_correction_moves_only_the_means(w4a4):
    s, layers, x, fm, fstats, quantized = w4a4
    qm = quantized()
    weights = {n: qm.get_submodule(n).weight.clone() for n in layers}
    apply_(qm, corrections(qm, fstats, x, "bias"))
    after = output_stats(qm, layers, x)
    assert all(torch.equal(qm.get_submodule(n).weight, weights[n]) for n in layers)
    assert all(torch.allclose(after[n][0], fstats[n][0], atol=1e-4, rtol=1e-4) for n in layers)
    assert any(not torch.allclose(after[n][1], fstats[n][1], atol=1e-3, rtol=1e-2) for n in layers)


def test_a_float_network_needs_no_correction(w4a4):
    """Its statistics are the float ones bit for bit, so no layer is touched (a float prefix stays exact)."""
    s, layers, x, fm, fstats, _ = w4a4
    assert corrections(fold_bn(s["model"]), fstats, x, "bn") == {}


def test_channel_stats_and_bad_mode(w4a4):
    y = torch.arange(24.0).view(2, 3, 2, 2)
    mean, sd = channel_stats(y)
    assert torch.allclose(mean, y.transpose(0, 1).reshape(3, -1).mean(1))
    assert torch.allclose(sd, torch.sqrt(y.transpose(0, 1).reshape(3, -1).var(1, correction=0) + 1e-5))
    s, layers, x, fm, fstats, quantized = w4a4
    with pytest.raises(ValueError, match="correction mode"):
        corrections(quantized(), fstats, x, "none")


# ----------------------------------------------------------------------------- in the cached evaluator

def corrected_reference(s, cfg, calib_u8, mode):
    """Outcome-free reference: the corrected folded model's log-probabilities on the set-up's images."""
    layers = [c for c, _ in s["model"].conv_bn_pairs()]
    xc = NORMALIZE(calib_u8)
    fstats = output_stats(fold_bn(s["model"]), layers, xc)
    qm = quantize_(fold_bn(s["model"]), s["space"].full(cfg), s["ranges"], "generic", clip="maxabs")
    apply_(qm, corrections(qm, fstats, xc, mode))
    with torch.no_grad():
        return torch.log_softmax(qm(NORMALIZE(s["x"])), 1)


@pytest.mark.parametrize("mode", ("bias", "bn"))
def test_evaluator_correction_is_the_corrected_model(mode):
    """The evaluator's corrected configuration computes what the whole corrected model computes (loss to 1e-5),
    and a float configuration stays bit for bit the uncorrected float network."""
    s = build_setup("B")
    calib = random_data(seed=6, n=40)[0]
    ev = make_evaluator(s, correction=(mode, calib), cache_activations=False)
    plain = make_evaluator(s, cache_activations=False)
    assert identical(ev.float_outcome, plain.float_outcome)
    for seed in (11, 12):
        cfg = random_config(s["space"], seed)
        out = ev.evaluate(cfg)
        ref = torch.nn.functional.nll_loss(corrected_reference(s, cfg, calib, mode), s["y"]).item()
        assert out.loss == pytest.approx(ref, rel=1e-5), seed
        assert out.loss != pytest.approx(plain.evaluate(cfg).loss, rel=1e-3)   # the correction did something


def test_corrected_prefix_cache_and_promotion_are_exact():
    """A greedy-like walk with the correction on: the cached evaluator (base corrections in front of the first
    changed segment, calibration inputs cached, candidates promoted) gives bit-identical outcomes to one that
    recomputes everything, and a promoted base leaves the same corrections as a recomputed one."""
    s = build_setup("B")
    space, calib = s["space"], random_data(seed=6, n=40)[0]
    fast = make_evaluator(s, correction=("bn", calib), pending_bytes=4 << 30)
    slow = make_evaluator(s, correction=("bn", calib), cache_activations=False)
    assert sum(fast.keep) > 0
    current = random_config(space, 31, act=False)
    for ev in (fast, slow):
        ev.set_base(current)
    for step in range(3):
        cands = walk_candidates(space, current, step)
        for cand in cands:
            assert identical(fast.evaluate(cand), slow.evaluate(cand)), (step, cand)
        current = cands[step % 3]
        for ev in (fast, slow):
            ev.set_base(current)
        assert identical(fast.base_outcome, slow.base_outcome)
    assert fast.promoted == 3
    ref = corrected_reference(s, current, calib, "bn")
    assert fast.base_outcome.loss == pytest.approx(torch.nn.functional.nll_loss(ref, s["y"]).item(), rel=1e-5)
    with fast.float_network() as net:      # the float network, uncorrected, for quant/fisher.py
        plain = fold_bn(s["model"])
        for n in fast.corr_layers:
            assert torch.equal(net.get_submodule(n).weight, plain.get_submodule(n).weight)
            assert torch.equal(net.get_submodule(n).bias, plain.get_submodule(n).bias)


# ----------------------------------------------------------------------------- in the export

def test_export_keeps_the_learned_levels_and_computes_what_the_evaluator_does():
    """The export's placed model (weights parametrized by their quantizers) with the correction folded in:
    its quantizers' integers and the ONNX file's int8 weights are still the learned levels, and it computes
    what the evaluator's corrected configuration computes."""
    from onnx import numpy_helper

    import utils.onnx_export as G
    from models import build_model
    from quant.adaround import AdaRoundSettings, fit_levels, layer_inputs
    from quant.calibrate import calibrate
    from quant.cost import kernel_table
    from quant.evaluation import CachedEvaluator
    from quant.recipe import Recipe
    from quant.widths import FLOAT_BITS
    from utils.export import correct_placed_
    torch.manual_seed(0)
    model = build_model("resnet8", "B").eval()
    x_u8 = torch.randint(0, 256, (48, 32, 32, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    x, folded, table = NORMALIZE(x_u8), fold_bn(model), kernel_table(model, "ort-cpu")
    cfg = table.space.uniform(8, 8, FLOAT_BITS)
    pairs = [("layer1.0.conv1", 8), ("layer3.0.conv2", 8)]
    levels = fit_levels(folded, pairs, layer_inputs(folded, [n for n, _ in pairs], x), weight_range=7,
                        settings=AdaRoundSettings(iterations=30, batch_size=16))
    ranges = calibrate(folded, "ort-cpu", [x], [8])
    recipe = Recipe(weight_range=7, ptq="adaround", correction="bn", correction_images=32)
    placed = G.placed_model(model, cfg, ranges, "ort-cpu", recipe, levels)
    correct_placed_(placed, model, recipe, x_u8, NORMALIZE)
    for (name, _), lv in levels.items():
        layer = placed.get_submodule(name)
        assert torch.equal(layer.parametrizations.weight[0].integers(layer.parametrizations.weight.original),
                           lv.to(torch.int32))
    inits = {i.name: i for i in G.to_onnx(placed).graph.initializer}
    for (name, _), lv in levels.items():
        assert torch.equal(torch.from_numpy(numpy_helper.to_array(inits[f"{name}.weight_int8"]).copy()), lv)
    # what it computes, where the correction matters: generic kernels, W4A4, 4-bit learned levels
    table, cfg = kernel_table(model, "generic"), kernel_table(model, "generic").space.uniform(4, 4, FLOAT_BITS)
    pairs = [(n, 4) for n in ("layer1.0.conv1", "layer3.0.conv2")]
    levels = fit_levels(folded, pairs, layer_inputs(folded, [n for n, _ in pairs], x),
                        settings=AdaRoundSettings(iterations=30, batch_size=16))
    ranges = calibrate(folded, "generic", [x], [8, 4])
    recipe = Recipe(ptq="adaround", correction="bn", correction_images=32)
    placed = G.placed_model(model, cfg, ranges, "generic", recipe, levels)
    correct_placed_(placed, model, recipe, x_u8, NORMALIZE)
    with torch.no_grad():
        ref, logp = torch.log_softmax(folded(x), 1), torch.log_softmax(placed(x), 1)
    kl = (ref.exp() * (ref - logp)).sum(1).mean().item()
    y = torch.zeros(48, dtype=torch.long)
    got = CachedEvaluator(model, table, x_u8, y, NORMALIZE, ranges, levels=levels, correction=("bn", x_u8[:32]),
                          cache_activations=False).evaluate(cfg)
    plain = CachedEvaluator(model, table, x_u8, y, NORMALIZE, ranges, levels=levels,
                            cache_activations=False).evaluate(cfg)
    assert got.kl == pytest.approx(kl, rel=1e-3) and got.loss == pytest.approx(-logp[:, 0].mean().item(), rel=1e-5)
    assert plain.kl != pytest.approx(kl, rel=0.01)       # the correction changed the network (10x the tolerance above)
