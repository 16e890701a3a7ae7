"""Properties of weight fake-quantization and of activation fake-quantization and calibration
(utils/quantization.py)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.ao.quantization.observer import HistogramObserver

import utils.quantization as Q
from models import build_model
from models.resnet import CifarResNet
from models.structure import quantizable_layers
from utils.config import ACT_BITS, FLOAT_BITS
from utils.errors import UserError
from utils.quantization import (ActQuant, WeightQuantizer, act_grid, calibrate_activations, quantization_error,
                                quantize_weight)

BITS = range(2, 9)
CLIPS = ("mse", "maxabs")


def gaussian(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def skewed(seed=0):
    """Channels whose magnitudes span three orders, as in trained CIFAR ResNets (and worse)."""
    w = gaussian(16, 8, 3, 3, seed=seed)
    return w * torch.logspace(-3, 0, 16).view(-1, 1, 1, 1)



def uniform_config(names, bits):
    """{layer: bits} for every layer: the form WeightQuantizer.apply takes."""
    return {n: bits for n in names}


def channel_sse(q, w):
    return (q.double() - w.double()).square().flatten(1).sum(1)


@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("bits", BITS)
def test_levels_per_channel(bits, clip):
    """Each output channel holds at most 2^b - 1 values, all k*s with |k| <= 2^(b-1) - 1 (zero exact, symmetric)."""
    w = gaussian(8, 4096)  # enough weights per channel to fill every level
    q = quantize_weight(w, bits, clip=clip)
    qmax = 2 ** (bits - 1) - 1
    for row in q:
        assert row.unique().numel() <= 2 ** bits - 1
        s = row.abs().max() / qmax  # the largest level is always used: the clip is <= max|w|
        k = row / s
        assert torch.allclose(k, k.round(), atol=1e-4)
        assert k.abs().max() <= qmax + 1e-4
    if bits <= 4 and clip == "mse":  # MSE clips both tails, filling small grids: the bound is tight
        assert all(row.unique().numel() == 2 ** bits - 1 for row in q)


@pytest.mark.parametrize("per_channel", (True, False))
@pytest.mark.parametrize("clip", CLIPS)
def test_error_decreases_with_bits(clip, per_channel):
    """Quantization MSE strictly decreases from 2 to 8 bits.

    Not a theorem (the grids of b and b+1 bits are not nested), but each extra bit roughly
    quarters the error, so the strict comparison holds by a wide margin.
    """
    w = gaussian(64, 64, 3, 3)
    errs = [quantization_error(w, b, per_channel, clip) for b in BITS]
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert quantization_error(w, 32, per_channel, clip) == 0.0


@pytest.mark.parametrize("per_channel", (True, False))
@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("seed", range(3))
def test_idempotent(seed, clip, per_channel):
    """Quantizing an already quantized tensor again at the same width returns it bit for bit.

    Max-abs: the largest level is qmax*s, so the rebuilt scale is s again. MSE: ratio 1.0
    reproduces the tensor with zero error, every smaller ratio clips the +-qmax*s levels, and
    ties go to ratio 1.0, so the search finds the same scale.
    """
    w = skewed(seed)
    for bits in BITS:
        q = quantize_weight(w, bits, per_channel, clip)
        assert torch.equal(quantize_weight(q, bits, per_channel, clip), q)


@pytest.mark.parametrize("per_channel", (True, False))
def test_float_is_identity(per_channel):
    """32 bits means 'leave in float': the weight comes back unchanged."""
    w = gaussian(4, 3, 3, 3)
    assert torch.equal(quantize_weight(w, 32, per_channel), w)


def test_shape_and_dtype_kept():
    """Fake-quantized weights drop into the model unchanged in shape and dtype."""
    w = gaussian(5, 7).double()
    q = quantize_weight(w, 4)
    assert q.shape == w.shape and q.dtype == torch.float64


@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("bits", BITS)
def test_per_tensor_vs_per_channel(bits, clip):
    """Per tensor: at most 2^b - 1 values in the whole tensor. Per channel: that bound is per
    channel only, and on channels of very different scales it has less error than per tensor."""
    w = skewed()
    qt, qc = quantize_weight(w, bits, False, clip), quantize_weight(w, bits, True, clip)
    assert qt.unique().numel() <= 2 ** bits - 1
    assert qc.unique().numel() > 2 ** bits - 1
    assert channel_sse(qc, w).sum() < channel_sse(qt, w).sum()


@pytest.mark.parametrize("per_channel", (True, False))
@pytest.mark.parametrize("bits", BITS)
def test_mse_clip_no_worse_than_maxabs(bits, per_channel):
    """The MSE clip search includes the max-abs ratio 1.0, so its error never exceeds max-abs.

    Checked per channel (per tensor: in total) on Gaussian, uniform and heavy-tailed weights;
    the 1e-6 relative slack only absorbs float32 summation order inside the search.
    """
    g = torch.Generator().manual_seed(bits)
    for w in (torch.randn(32, 144, generator=g), torch.rand(32, 144, generator=g) - 0.5,
              torch.randn(32, 144, generator=g) ** 3):
        e_mse = channel_sse(quantize_weight(w, bits, per_channel, "mse"), w)
        e_max = channel_sse(quantize_weight(w, bits, per_channel, "maxabs"), w)
        if not per_channel:
            e_mse, e_max = e_mse.sum(), e_max.sum()
        assert torch.all(e_mse <= e_max * (1 + 1e-6))
    w = gaussian(32, 144)  # and the search pays off where clipping matters most
    assert quantization_error(w, 2, per_channel, "mse") < 0.5 * quantization_error(w, 2, per_channel, "maxabs")


@pytest.mark.parametrize("clip", CLIPS)
def test_straight_through_gradient(clip):
    """Gradients pass straight through the rounding (1 inside the clip range, 0 where clipped), for QAT."""
    w = gaussian(8, 3, 3, 3).requires_grad_()
    quantize_weight(w, 3, clip=clip).sum().backward()
    assert w.grad is not None and set(w.grad.unique().tolist()) <= {0.0, 1.0}
    assert w.grad.mean() > 0.5
    if clip == "maxabs":
        assert torch.equal(w.grad, torch.ones_like(w))


@pytest.mark.parametrize("per_channel", (True, False))
@pytest.mark.parametrize("clip", CLIPS)
def test_zero_weights(clip, per_channel):
    """All-zero channels (or tensors) stay exactly zero, with no NaN and a finite gradient."""
    w = gaussian(4, 3, 3, 3)
    w[1] = 0
    for x in (w, torch.zeros_like(w)):
        x = x.clone().requires_grad_()
        for bits in BITS:
            q = quantize_weight(x, bits, per_channel, clip)
            assert torch.isfinite(q).all()
            assert torch.equal(q[1], torch.zeros_like(q[1]))
        q.sum().backward()
        assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("sign", (1.0, -1.0))
@pytest.mark.parametrize("seed", range(3))
def test_outlier_channel_keeps_its_other_weights_at_2_bits(seed, sign):
    """A channel whose largest weight is one 16-sigma outlier still keeps most of its other weights
    nonzero at 2 bits: the MSE clip ratio goes far below 1 (below 0.15 of max|w|; a grid that stops
    at 0.2 would round all but ~10% of them to zero, max-abs all of them). The outlier itself is
    clipped to the top level, and the channels without outliers are unaffected by it."""
    w = gaussian(4, 512, 3, 3, seed=seed)  # 4,608 weights per channel, as in a 3x3x512 conv
    w[2].view(-1)[100] = sign * 16 * w[2].std()
    q = quantize_weight(w, 2)
    others = torch.ones(w[2].numel(), dtype=torch.bool)
    others[100] = False
    kept = (q[2].reshape(-1)[others] != 0).float().mean().item()
    assert kept >= 0.5, kept
    top = q[2].abs().max().item()
    assert top < 0.15 * abs(w[2].view(-1)[100].item())
    assert q[2].view(-1)[100].item() == pytest.approx(sign * top)  # clipped to the extreme level
    assert (q[2].view(-1)[others] != 0).sum() > 0 and set(q[2].unique().tolist()) == {-top, 0.0, top}
    assert torch.equal(q[[0, 1, 3]], quantize_weight(w[[0, 1, 3]], 2))  # per channel: no cross-talk
    assert channel_sse(q, w)[2] < channel_sse(quantize_weight(w, 2, clip="maxabs"), w)[2]
    assert (quantize_weight(w, 2, clip="maxabs")[2].view(-1)[others] == 0).all()  # what max-abs does


@pytest.mark.parametrize("bad", (1, 9, 0, 16, True, 4.0, "8"))
def test_bad_width_is_user_error(bad):
    """Widths outside 2-8 and 32 are refused with a message, not a torch error or a silent no-op."""
    with pytest.raises(UserError):
        quantize_weight(gaussian(2, 2), bad)


def test_bad_clip_is_user_error():
    """Unknown clip modes are refused up front, also when building a quantizer."""
    with pytest.raises(UserError):
        quantize_weight(gaussian(2, 2), 4, clip="percentile")
    with pytest.raises(UserError):
        WeightQuantizer(CifarResNet(8), clip="max")


# ----------------------------------------------------------------------------- WeightQuantizer

def small_model():
    torch.manual_seed(0)
    return CifarResNet(8)


def weights(model):
    return {n: m.weight.detach().clone() for n, m in quantizable_layers(model).items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_apply_restore_round_trip():
    """restore() (and leaving `applied`) brings back the exact float weights."""
    model = small_model()
    before = weights(model)
    wq = WeightQuantizer(model)
    names = list(wq.layers)
    full = wq.apply(uniform_config(names, 2))
    assert full == uniform_config(names, 2)
    assert not torch.equal(weights(model)[names[0]], before[names[0]])
    wq.restore()
    assert same(weights(model), before)
    with pytest.raises(RuntimeError):
        with wq.applied({names[0]: 3}) as full:
            assert full[names[0]] == 3 and full[names[1]] == 32
            raise RuntimeError("evaluation failed")
    assert same(weights(model), before)
    with WeightQuantizer(model) as wq2:
        wq2.apply(uniform_config(names, 4))
    assert same(weights(model), before)


def test_apply_is_order_independent():
    """apply(A) then apply(B) leaves exactly the weights of apply(B) alone: it starts from the floats."""
    model = small_model()
    names = list(quantizable_layers(model))
    a = {n: 2 + i % 3 for i, n in enumerate(names)}
    b = {names[0]: 8, names[-1]: 5}
    twin = copy.deepcopy(model)
    wq, wq_twin = WeightQuantizer(model), WeightQuantizer(twin)
    wq.apply(a)
    full = wq.apply(b)
    wq_twin.apply(b)
    assert same(weights(model), weights(twin))
    assert full == {n: b.get(n, 32) for n in names}
    for n in names:  # and those weights are quantize_weight of the originals
        assert torch.equal(weights(model)[n], quantize_weight(wq.originals[n], full[n]))


@pytest.mark.parametrize("config", ({"nope.conv": 4}, {"conv1": 9}, {"conv1": 1}, {"conv1": True}, [("conv1", 4)]))
def test_apply_rejects_bad_configs(config):
    """Unknown layer names and unsupported widths are UserErrors, and leave the weights untouched."""
    model = small_model()
    before = weights(model)
    wq = WeightQuantizer(model)
    with pytest.raises(UserError):
        wq.apply(config)
    assert same(weights(model), before)


def test_quantized_weights_are_cached(monkeypatch):
    """Each (layer, bits) is quantized once; re-applying a configuration only copies cached tensors."""
    calls = []
    real = Q.quantize_weight
    monkeypatch.setattr(Q, "quantize_weight", lambda w, bits, *a: calls.append(bits) or real(w, bits, *a))
    model = small_model()
    wq = WeightQuantizer(model)
    names = list(wq.layers)
    n = len(names)
    config = uniform_config(names, 4)
    wq.apply(config)
    assert len(calls) == n
    first = {name: wq.quantized(name, 4) for name in names}
    wq.apply(config)
    assert len(calls) == n
    wq.apply({names[0]: 4})  # the other layers at 32 bits: first use of their float entries
    wq.restore()  # names[0] at 32 bits: its float entry
    assert len(calls) == 2 * n
    wq.apply(config)
    wq.restore()
    assert len(calls) == 2 * n
    assert all(wq.quantized(name, 4) is first[name] for name in names)
    wq.apply({names[0]: 6})
    assert calls[2 * n:] == [6]


def test_apply_tracks_current_and_copies_only_changed_layers():
    """`current` holds every layer's applied width; apply() copies only layers whose width changes
    (a weight changed behind the quantizer's back in an unchanged layer is left alone), and the
    returned full configuration equals `current`."""
    model = small_model()
    wq = WeightQuantizer(model, clip="maxabs")
    names = list(wq.layers)
    assert wq.current == uniform_config(names, 32)
    full = wq.apply({names[0]: 4, names[-1]: 2})
    assert full == wq.current == {**uniform_config(names, 32), names[0]: 4, names[-1]: 2}
    with torch.no_grad():
        wq.layers[names[1]].weight.mul_(2.0)   # a layer whose width does not change next
        wq.layers[names[0]].weight.mul_(2.0)   # a layer whose width does change next
    wq.apply({names[0]: 3, names[-1]: 2})
    assert torch.equal(wq.layers[names[1]].weight, 2.0 * wq.originals[names[1]])  # not copied
    assert torch.equal(wq.layers[names[0]].weight, wq.quantized(names[0], 3))    # copied
    assert torch.equal(wq.layers[names[-1]].weight, wq.quantized(names[-1], 2))
    assert wq.current[names[0]] == 3
    with pytest.raises(UserError):
        wq.apply({names[0]: 5, names[1]: 9})  # refused before anything is copied
    assert wq.current[names[0]] == 3 and torch.equal(wq.layers[names[0]].weight, wq.quantized(names[0], 3))


# ----------------------------------------------------------------------------- activations

def one_layer(batches, widths):
    """Calibrate the input of a single Linear layer (named "0") on the given batches."""
    model = nn.Sequential(nn.Linear(batches[0].shape[1], 4))
    return calibrate_activations(model, batches, ["0"], widths)


def clip_range(aq):
    """The largest representable value of an activation quantizer."""
    return (aq.qmax - aq.zero_point) * aq.scale


@pytest.mark.parametrize("bits", range(2, 9))
def test_act_grid(bits):
    """Unsigned grids are 0..2^b-1, signed grids the symmetric two's complement -2^(b-1)..2^(b-1)-1."""
    assert act_grid(bits, False) == (0, 2 ** bits - 1)
    assert act_grid(bits, True) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


@pytest.mark.parametrize("signed", (False, True))
@pytest.mark.parametrize("bits", (2, 3, 4, 8))
def test_act_quant_levels_are_exactly_the_grid(bits, signed):
    """A calibrated ActQuant has zero point 0 and the grid of act_grid; its outputs are exactly the
    levels k*scale, k in qmin..qmax (0..2^b-1 for post-ReLU inputs, -2^(b-1)..2^(b-1)-1 for signed
    ones), every level is reachable, inputs beyond the range clamp to the extreme levels, and values
    already on the grid pass unchanged."""
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(256, 32, generator=g)
    aq = one_layer([x.abs() if not signed else x], [bits])["0", bits]
    assert (aq.bits, aq.signed, aq.zero_point) == (bits, signed, 0)
    assert (aq.qmin, aq.qmax) == act_grid(bits, signed)
    assert aq.scale > 0
    levels = aq.levels()
    expected = torch.arange(aq.qmin, aq.qmax + 1, dtype=torch.float32) * aq.scale
    assert torch.allclose(levels, expected, rtol=1e-6, atol=0)
    assert len(levels) == 2 ** bits
    if not signed:
        assert levels[0] == 0 and (levels >= 0).all()
    else:
        assert levels[0] == pytest.approx(-(2 ** (bits - 1)) * aq.scale) and (levels == 0).sum() == 1
    lo, hi = levels[0].item(), levels[-1].item()
    dense = torch.linspace(lo - 3 * aq.scale - 1.0, hi + 3 * aq.scale + 1.0, 20_001)
    out = aq(dense)
    k = out / aq.scale
    assert torch.allclose(k, k.round(), atol=1e-4)
    assert torch.allclose(out.unique(), levels, rtol=1e-5, atol=1e-6 * aq.scale)  # every level, nothing else
    assert (out[dense < lo] == out.min()).all() and (out[dense > hi] == out.max()).all()
    assert torch.allclose(aq(levels), levels, rtol=1e-6, atol=0)


def test_act_quant_by_hand():
    """ActQuant rounds to the nearest level of its grid and clamps: a hand-made 2-bit unsigned
    quantizer with scale 0.5 maps to {0, 0.5, 1, 1.5}, a signed one to {-1, -0.5, 0, 0.5}."""
    x = torch.tensor([-3.0, -0.8, -0.2, 0.2, 0.3, 0.74, 0.76, 1.6, 9.0])
    u = ActQuant(2, 0.5, 0, *act_grid(2, False), False)
    s = ActQuant(2, 0.5, 0, *act_grid(2, True), True)
    assert u(x).tolist() == [0.0, 0.0, 0.0, 0.0, 0.5, 0.5, 1.0, 1.5, 1.5]
    assert s(x).tolist() == [-1.0, -1.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5, 0.5]
    assert u.levels().tolist() == [0.0, 0.5, 1.0, 1.5] and s.levels().tolist() == [-1.0, -0.5, 0.0, 0.5]


@pytest.mark.parametrize("signed", (False, True))
def test_act_quant_straight_through_gradient(signed):
    """Fake-quantized activations pass the gradient straight through: 1 inside the clip range
    (where rounding happens), 0 outside it (where values are clamped)."""
    aq = ActQuant(3, 0.25, 0, *act_grid(3, signed), signed)
    lo, hi = aq.levels()[0].item(), aq.levels()[-1].item()
    inside = torch.linspace(lo + 0.01, hi - 0.01, 101)
    outside = torch.cat([torch.linspace(lo - 5.0, lo - 0.3, 20), torch.linspace(hi + 0.3, hi + 5.0, 20)])
    x = torch.cat([inside, outside]).requires_grad_()
    y = aq(x)
    (y * torch.arange(1.0, len(x) + 1)).sum().backward()  # weighted: the gradient is elementwise
    assert torch.equal(x.grad[:len(inside)], torch.arange(1.0, len(inside) + 1))
    assert torch.equal(x.grad[len(inside):], torch.zeros(len(outside)))
    assert not torch.equal(y[:len(inside)].detach(), inside)   # it did round


def test_calibration_marks_stem_signed_and_post_relu_unsigned():
    """On a ResNet, the stem conv reads the normalized image (negative values: signed grid) and every
    other layer reads a ReLU output or its average (never negative: unsigned grid 0..2^b-1); every
    listed layer gets the requested width (32 is skipped, float needs no range); hooks are removed
    and the training mode is restored."""
    torch.manual_seed(0)
    model = build_model("resnet20", "B").train()
    names = list(quantizable_layers(model))
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(8, 3, 32, 32, generator=g) for _ in range(2)]
    aq = calibrate_activations(model, batches, names, [8, FLOAT_BITS])  # one width: low-bit searches are slow
    assert set(aq) == {(n, 8) for n in names}
    assert {n for n in names if aq[n, 8].signed} == {"conv1"}
    for (n, b), q in aq.items():
        assert (q.qmin, q.qmax) == act_grid(b, q.signed)
        assert q.zero_point == 0 and q.scale > 0
    assert model.training
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_calibration_signedness_on_mobilenetv2():
    """MobileNetV2's linear bottlenecks make block inputs signed: a block's expansion conv and its
    projection shortcut read the previous block's un-ReLU'd output (signed), except block 0 which
    reads the stem's ReLU; the depthwise and projection convs and the classifier read ReLU outputs
    (unsigned); the head's 1x1 conv reads the last bottleneck (signed)."""
    torch.manual_seed(0)
    model = build_model("mobilenetv2").eval()
    names = list(quantizable_layers(model))
    aq = calibrate_activations(model, [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))],
                               names, [8])
    signed = {n for n in names if aq[n, 8].signed}
    expected = {"conv1", "conv2"} | {f"layers.{i}.conv1" for i in range(1, 17)} | {
        f"layers.{i}.shortcut.0" for i in (1, 10, 16)}
    assert signed == expected


@pytest.mark.parametrize("bad", ([1], [9], [4, 0]))
def test_calibration_rejects_bad_width(bad):
    """Activation widths outside 2-8 (and 32) are a UserError."""
    with pytest.raises(UserError):
        one_layer([torch.randn(4, 8)], bad)
    assert set(ACT_BITS) == {2, 3, 4, 5, 6, 7, 8, FLOAT_BITS}


def test_calibration_returns_every_requested_width():
    """Every listed layer gets one ActQuant per requested width, duplicates and 32 (float) dropped,
    with the signedness shared across its widths."""
    aq = one_layer([torch.randn(16, 8)], [6, 3, 6, FLOAT_BITS, 2])
    assert set(aq) == {("0", b) for b in (2, 3, 6)}
    assert all(q.signed and q.bits == b and (q.qmin, q.qmax) == act_grid(b, True) for (_, b), q in aq.items())


def test_calibrated_range_shrinks_as_bits_fall():
    """The range search models the grid's real number of levels: on post-ReLU-like (half-normal)
    inputs the clip range falls with the width (8 > 6 > 4 > 3 > 2 bits), the 4-bit range is well
    inside the 8-bit one (torch's plain HistogramObserver, which models 256 levels whatever the grid,
    returns the 8-bit range for a 4-bit grid), and at 4 bits it has less squared error than the
    8-bit range spread over 16 levels."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g).abs()
    aq = one_layer([x[:256], x[256:]], [8, 6, 4, 3, 2])
    ranges = [clip_range(aq["0", b]) for b in (8, 6, 4, 3, 2)]
    assert all(b < a for a, b in zip(ranges, ranges[1:])), ranges
    r8, r4 = ranges[0], ranges[2]
    assert r8 > 0.9 * x.max().item()           # 8 bits: hardly any clipping
    assert r4 < 0.85 * r8                       # 4 bits: a real clip
    plain = HistogramObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine, quant_min=0, quant_max=15)
    plain(x[:256])
    plain(x[256:])
    s, z = plain.calculate_qparams()
    assert float(s) * (15 - int(z)) > 0.95 * r8  # what the range would be without the level count
    mse4 = (aq["0", 4](x) - x).square().mean()
    squeezed = ActQuant(4, r8 / 15, 0, 0, 15, False)
    assert mse4 < 0.8 * (squeezed(x) - x).square().mean()


def test_calibrated_ranges_on_resnet_shrink_with_bits():
    """On a real network's post-ReLU inputs too, the 3-bit clip range is never above the 8-bit one and
    is below it for most layers."""
    torch.manual_seed(0)
    model = build_model("resnet20", "A").eval()
    names = list(quantizable_layers(model))[1::3]  # unsigned ones, from every stage and the head
    aq = calibrate_activations(model, [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))],
                               names, [8, 3])
    smaller = [clip_range(aq[n, 3]) < 0.9 * clip_range(aq[n, 8]) for n in names]
    assert all(clip_range(aq[n, 3]) <= clip_range(aq[n, 8]) * (1 + 1e-6) for n in names)
    assert sum(smaller) >= 0.75 * len(names), smaller


def test_signed_range_is_near_mse_optimal():
    """For signed (e.g. normalized-image, linear-bottleneck) inputs the calibrated 4-bit range, like the
    unsigned one, clips: its squared error is within 25% of the best scale on the same grid."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g)
    aq = one_layer([x], [4])["0", 4]
    mse = (aq(x) - x).square().mean().item()
    best = min((torch.fake_quantize_per_tensor_affine(x, s, 0, aq.qmin, aq.qmax) - x).square().mean().item()
               for s in torch.linspace(0.05, 1.0, 200).tolist())
    assert mse <= 1.25 * best, (aq.scale, mse, best)


# ----------------------------------------------------------------------------- accuracy

def synthetic_task(n_train, n_test, size=16, noise=3.0, seed=0):
    """10 classes, each a smooth random colour pattern, buried in heavy per-pixel noise.

    Learnable but not trivially (the float model ends near 90%, not 100%), so that some test
    images sit close to the decision boundary, where weight perturbations would show.
    """
    g = torch.Generator().manual_seed(seed)
    templates = F.interpolate(torch.randn(10, 3, 4, 4, generator=g), size=size, mode="bilinear",
                              align_corners=False)

    def draw(n):
        y = torch.arange(n) % 10
        return templates[y] + noise * torch.randn(n, 3, size, size, generator=g), y

    return draw(n_train), draw(n_test)


def test_8bit_costs_at_most_half_a_point():
    """Uniform 8-bit weights (per channel, MSE clip) on a briefly trained ResNet-8 cost <= 0.5 points.

    The ResNet is fully convolutional with global pooling, so 16x16 inputs exercise the same
    layers as CIFAR's 32x32 at a quarter of the cost.
    """
    (xtr, ytr), (xte, yte) = synthetic_task(n_train=100 * 32, n_test=1000)
    torch.manual_seed(0)
    model = CifarResNet(8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for i in range(0, len(xtr), 32):
        loss = F.cross_entropy(model(xtr[i:i + 32]), ytr[i:i + 32])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()

    def accuracy():
        with torch.no_grad():
            return 100.0 * (model(xte).argmax(1) == yte).float().mean().item()

    float_acc = accuracy()
    assert float_acc > 50.0
    wq = WeightQuantizer(model)
    with wq.applied(uniform_config(wq.layers, 8)):
        assert not torch.equal(model.conv1.weight, wq.originals["conv1"])  # really quantized
        acc8 = accuracy()
    assert abs(acc8 - float_acc) <= 0.5, (float_acc, acc8)
