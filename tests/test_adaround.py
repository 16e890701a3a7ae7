"""Learned rounding (quant/adaround.py), its placement (quant.place.quantize_, the evaluator), its cache
(utils/ptq.py) and its export: the levels stay on the round-to-nearest grid, reconstruct the layer better
than rounding to nearest, are reproducible, cached per key, and what the ONNX file stores."""
import dataclasses

import numpy as np
import pytest
import torch
from onnx import numpy_helper

import utils.onnx_export as G
from quant.adaround import (AdaRoundSettings, fit_levels, initial_v, layer_inputs, learn_rounding, nearest_levels,
                            reconstruction_error, rectified_sigmoid)
from quant.calibrate import calibrate
from quant.cost import kernel_table
from quant.evaluation import CachedEvaluator
from quant.fold import fold_bn
from quant.place import quantize_
from quant.quantizer import learned_weight, weight_quantizer
from quant.widths import FLOAT_BITS, W
from utils.ptq import cached_levels, learned_levels
from utils.train import Normalizer

NORM = Normalizer([0.5] * 3, [0.25] * 3, "cpu")
FAST = AdaRoundSettings(iterations=60, batch_size=16)


def test_rectified_sigmoid_starts_at_the_fraction():
    f = torch.linspace(0.01, 0.99, 50)
    assert torch.allclose(rectified_sigmoid(initial_v(f)), f, atol=1e-5)
    assert rectified_sigmoid(torch.tensor([-50.0, 50.0])).tolist() == [0.0, 1.0]


@pytest.mark.parametrize("bits", (4, 3, 2))
def test_levels_are_floor_or_ceil_on_the_grid_and_reconstruct_better(net, bits):
    """Each learned level is floor(w/s) or floor(w/s) + 1 (clamped to the grid), the scales are the nearest
    ones, and the layer's output error on its inputs is no worse than rounding to nearest's (the fit starts
    from the fractional parts and minimizes exactly that error)."""
    name = "layer2.0.conv1"
    layer = net["folded"].get_submodule(name)
    x = layer_inputs(net["folded"], [name], net["x"])[name]
    q = weight_quantizer(layer.weight, bits)
    levels = learn_rounding(layer, q, x, FAST)
    v = layer.weight.detach() / q._scale(layer.weight).detach()
    assert levels.shape == layer.weight.shape and levels.min() >= q.qmin and levels.max() <= q.qmax
    lo, hi = torch.floor(v).clamp(q.qmin, q.qmax), (torch.floor(v) + 1).clamp(q.qmin, q.qmax)
    assert torch.all((levels == lo) | (levels == hi))
    nearest = nearest_levels(layer, q)
    assert (levels != nearest).any()
    assert reconstruction_error(layer, levels, q, x) <= reconstruction_error(layer, nearest, q, x)
    assert torch.equal(levels, learn_rounding(layer, q, x, FAST))      # seeded: reproducible


def test_learned_levels_are_placed_evaluated_and_exported_exactly(net, tmp_path):
    """quantize_ with levels puts exactly those levels on each layer (its quantizer's integers), the evaluator
    computes the same network, and the ONNX file's int8 weights are the learned levels."""
    model, folded = net["model"], net["folded"]
    table = kernel_table(model, "ort-cpu")
    cfg = table.space.uniform(8, 8, FLOAT_BITS)
    cfg[W, "layer1.0.conv1"], cfg[W, "layer3.0.conv2"] = 8, 8
    pairs = [(n, 8) for n in ("layer1.0.conv1", "layer3.0.conv2")]
    inputs = layer_inputs(folded, [n for n, _ in pairs], net["x"])
    levels = fit_levels(folded, pairs, inputs, weight_range=7, settings=FAST)
    ranges = calibrate(folded, "ort-cpu", [net["x"]], [8])
    placed = quantize_(fold_bn(model), cfg, ranges, "ort-cpu", trainable=True, learn_scales=False, weight_range=7,
                       levels=levels).eval()
    for (name, bits), lv in levels.items():
        layer = placed.get_submodule(name)
        q = layer.parametrizations.weight[0]
        assert torch.equal(q.integers(layer.parametrizations.weight.original), lv.to(torch.int32))
    proto = G.to_onnx(placed)
    inits = {i.name: i for i in proto.graph.initializer}
    for (name, _), lv in levels.items():
        assert np.array_equal(numpy_helper.to_array(inits[f"{name}.weight_int8"]), lv.numpy())
    ev = CachedEvaluator(model, table, net["x_u8"], torch.zeros(48, dtype=torch.long), NORM, ranges,
                         weight_range=7, levels=levels)
    for name, bits in pairs:
        assert torch.equal(ev.weight(name, bits), learned_weight(folded.get_submodule(name).weight, bits,
                                                                  levels[name, bits], weight_range=7))
    with torch.no_grad():
        ref = placed(net["x"])
    baked = quantize_(fold_bn(model), cfg, ranges, "ort-cpu", weight_range=7, levels=levels)
    with torch.no_grad():
        assert torch.allclose(baked(net["x"]), ref, atol=1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        learned_weight(folded.conv1.weight, 4, torch.full_like(folded.conv1.weight, 9, dtype=torch.int8))


def test_cache_reuses_levels_and_keys_what_they_depend_on(net, tmp_path):
    """A second request with the same key fits nothing and returns identical levels; new pairs are added to
    the same file; other settings or other images are another key; a damaged file is refitted."""
    from quant.recipe import Recipe
    ckpt = tmp_path / "model.pt"
    torch.save({"model": net["model"].state_dict()}, ckpt)
    pairs = [("conv1", 4), ("linear", 4)]
    r = Recipe(ptq="adaround", ptq_images=48, ptq_settings=FAST)
    a = learned_levels(net["model"], ckpt, pairs, net["x_u8"], NORM, r, tmp_path, progress=False)
    assert a.fitted == 2 and a.path.exists() and set(a.levels) == set(pairs)
    b = learned_levels(net["model"], ckpt, pairs, net["x_u8"], NORM, r, tmp_path, progress=False)
    assert b.fitted == 0 and all(torch.equal(a.levels[p], b.levels[p]) for p in pairs) and b.path == a.path
    c = learned_levels(net["model"], ckpt, pairs + [("conv1", 3)], net["x_u8"], NORM, r, tmp_path, progress=False)
    assert c.fitted == 1 and c.path == a.path
    other = dataclasses.replace(r, ptq_settings=AdaRoundSettings(iterations=61, batch_size=16))
    d = learned_levels(net["model"], ckpt, pairs, net["x_u8"], NORM, other, tmp_path, progress=False)
    e = learned_levels(net["model"], ckpt, pairs, net["x_u8"], NORM, dataclasses.replace(r, ptq_images=40), tmp_path,
                       progress=False)
    assert d.path != a.path and e.path != a.path and d.fitted == e.fitted == 2
    a.path.write_bytes(b"damaged")
    assert cached_levels(ckpt, r, a.describe(), tmp_path) == {}
    f = learned_levels(net["model"], ckpt, pairs, net["x_u8"], NORM, r, tmp_path, progress=False)
    assert f.fitted == 2 and all(torch.equal(a.levels[p], f.levels[p]) for p in pairs)
    assert f.describe()["pairs"] == 2 and f.describe()["images"] == 48
    cached = cached_levels(ckpt, r, f.describe(), tmp_path)      # what the export reads, without the data
    assert set(cached) == set(pairs) and all(torch.equal(cached[p], f.levels[p]) for p in pairs)
