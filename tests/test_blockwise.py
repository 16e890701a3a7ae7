"""Block reconstruction (quant/blockwise.py) and its cache (utils/ptq.py, ``--ptq block``): the blocks are the model's
segments and cover every weight layer once, their float inputs chain to the model's output, the levels stay on the
round-to-nearest grid, reconstruct the block better than rounding to nearest, are reproducible, and are cached per
(layer, width) with the block's other layers fitted alongside."""
import pytest
import torch
from torch.func import functional_call

from quant.adaround import AdaRoundSettings, nearest_levels
from quant.blockwise import block_inputs, blocks, fit_block_levels, learn_block_rounding
from quant.fold import fold_bn
from quant.quantizer import weight_quantizer
from quant.recipe import Recipe
from utils.ptq import cached_levels, learned_levels
from utils.qat import FineTuneRecipe

from test_adaround import FAST, NORM   # the `net` fixture (conftest.py) normalizes with NORM

FIT = AdaRoundSettings(iterations=300, batch_size=16)   # a block's joint fit needs more steps than one layer's


def test_blocks_partition_the_weight_layers_and_chain_to_the_output(net):
    folded = net["folded"]
    names = [n for _, layers in blocks(folded) for n in layers]
    expected = sorted(n for n, m in folded.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    assert sorted(names) == expected and len(names) == len(set(names))
    assert any(len(layers) >= 3 for _, layers in blocks(folded))       # a block with a projection shortcut
    inputs = block_inputs(folded, net["x"], batch_size=20)             # batches that split the images unevenly
    fns = [fn for fn, _ in blocks(folded)]
    with torch.no_grad():
        assert torch.equal(inputs[0], net["x"])
        assert torch.allclose(fns[-1](inputs[-1]), folded(net["x"]), atol=1e-6)
        assert torch.allclose(fns[1](inputs[1]), inputs[2], atol=1e-6)


def _block_error(fn, layers, quantizers, levels, x):
    w = {f"{n}.weight": levels[n].float() * quantizers[n]._scale(m.weight).detach() for n, m in layers.items()}
    with torch.no_grad():
        return float((functional_call(fn, w, (x,)) - fn(x)).square().flatten(1).sum(1).mean())


@pytest.mark.parametrize("bits", (4, 2))
def test_block_levels_are_on_the_grid_and_reconstruct_the_block_better(net, bits):
    """Each level is floor(w/s) or floor(w/s) + 1 on the nearest grid, some differ from rounding to nearest, and
    the block's output error on its inputs is below rounding to nearest's; seeded: the same levels twice."""
    folded = net["folded"]
    k, (fn, names) = next((k, b) for k, b in enumerate(blocks(folded)) if len(b[1]) >= 3)
    x = block_inputs(folded, net["x"])[k]
    layers = {n: folded.get_submodule(n) for n in names}
    qs = {n: weight_quantizer(m.weight, bits) for n, m in layers.items()}
    levels = learn_block_rounding(fn, layers, qs, x, FIT)
    nearest = {n: nearest_levels(m, qs[n]) for n, m in layers.items()}
    for n, m in layers.items():
        v = m.weight.detach() / qs[n]._scale(m.weight).detach()
        lo, hi = torch.floor(v).clamp(qs[n].qmin, qs[n].qmax), (torch.floor(v) + 1).clamp(qs[n].qmin, qs[n].qmax)
        assert levels[n].shape == m.weight.shape and torch.all((levels[n] == lo) | (levels[n] == hi)), n
    assert any((levels[n] != nearest[n]).any() for n in layers)
    assert _block_error(fn, layers, qs, levels, x) < _block_error(fn, layers, qs, nearest, x)
    again = learn_block_rounding(fn, layers, qs, x, FIT)
    assert all(torch.equal(levels[n], again[n]) for n in layers)


def test_fit_fits_whole_blocks_and_refuses_a_layer_no_block_holds(net):
    got = []
    out = fit_block_levels(net["folded"], [("layer1.0.conv1", 4), ("layer1.0.conv1", 3)], net["x"], settings=FAST,
                           on_fit=got.append)
    assert set(out) == {(n, b) for n in ("layer1.0.conv1", "layer1.0.conv2") for b in (4, 3)}
    assert [sorted(f) for f in got] == [[("layer1.0.conv1", 4), ("layer1.0.conv2", 4)],
                                       [("layer1.0.conv1", 3), ("layer1.0.conv2", 3)]]
    assert all(v.dtype == torch.int8 for v in out.values())
    with pytest.raises(ValueError, match="no block"):
        fit_block_levels(net["folded"], [("nothing", 4)], net["x"], settings=FAST)


def test_block_cache_holds_the_blocks_other_layers_and_is_its_own_key(net, tmp_path):
    ckpt = tmp_path / "model.pt"
    torch.save({"model": net["model"].state_dict()}, ckpt)
    r = Recipe(ptq="block", ptq_images=48, ptq_settings=FAST)
    a = learned_levels(net["model"], ckpt, [("layer2.0.conv1", 4)], net["x_u8"], NORM, r, tmp_path, progress=False)
    assert a.fitted == 1 and a.path.name.startswith("ptq-block-") and set(a.levels) == {("layer2.0.conv1", 4)}
    mates = [("layer2.0.conv2", 4), ("layer2.0.shortcut.0", 4)]
    b = learned_levels(net["model"], ckpt, mates, net["x_u8"], NORM, r, tmp_path, progress=False)
    assert b.fitted == 0 and b.path == a.path                          # fitted with layer2.0.conv1's block
    cached = cached_levels(ckpt, r, b.describe(), tmp_path)
    assert torch.equal(cached["layer2.0.conv1", 4], a.levels["layer2.0.conv1", 4]) and set(mates) <= set(cached)
    ada = Recipe(ptq="adaround", ptq_images=48, ptq_settings=FAST)
    c = learned_levels(net["model"], ckpt, [("layer2.0.conv1", 4)], net["x_u8"], NORM, ada, tmp_path, progress=False)
    assert c.fitted == 1 and c.path != a.path
    assert Recipe.from_json(r.to_json()) == r
    assert FineTuneRecipe(1, start="post-training").start_from("block") == "block"
    assert FineTuneRecipe(1, start="nearest").start_from("block") == "nearest"


def test_blocks_of_a_traced_torchvision_model_cover_it_and_fit():
    """A model from outside the registry (torchvision's MobileNetV2, random weights, traced): its blocks cover each
    weight layer once, and a fit at 4 bits returns levels on the grid for every layer of the blocks it fits."""
    import torchvision
    from models.graph import trace_model
    torch.manual_seed(0)
    model = trace_model(torchvision.models.mobilenet_v2(num_classes=10).eval(), input_shape=(1, 3, 32, 32))
    folded = fold_bn(model).eval()
    names = [n for _, layers in blocks(folded) for n in layers]
    expected = [n for n, m in folded.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert sorted(names) == sorted(expected) and len(names) == len(set(names))
    some = [expected[0], expected[len(expected) // 2], expected[-1]]
    out = fit_block_levels(folded, [(n, 4) for n in some], torch.randn(8, 3, 32, 32),
                           settings=AdaRoundSettings(iterations=3, batch_size=4))
    assert {n for n, _ in out} >= set(some)
    for (n, b), lv in out.items():
        q = weight_quantizer(folded.get_submodule(n).weight, b)
        assert lv.shape == folded.get_submodule(n).weight.shape and q.qmin <= lv.min() and lv.max() <= q.qmax
