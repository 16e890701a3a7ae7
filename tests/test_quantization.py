"""Properties of the one quantizer (quant/quantizer.py), of calibrated tensor ranges
(quant/calibrate.py), of BN folding before weight quantization (quant/fold.py) and of placement at
the model's declared tensors and layers (quant/place.py)."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize
from torch.ao.quantization.observer import HistogramObserver

from models import build_model
from models.resnet import PadShortcut, Subsample
from models.structure import INPUT, Add, Slot, Tensor, quantizable_layers, widths_of_their_own
from quant.calibrate import calibrate, quantizers_from
from quant.errors import UserError
from quant.fold import fold_bn
from quant.place import (check_ranges, quantize_, skeleton_, slots, tensor_grids, tensor_quantizers,
                         weight_quantizers)
from quant.quantizer import (Quantizer, fake_quantize, quantize_weight, tensor_grid, tensor_quantizer, weight_grid,
                             weight_quantizer)
from quant.widths import ACT_BITS, FLOAT_BITS, A, Space, W

BITS = range(2, 9)
CLIPS = ("mse", "maxabs")


def gaussian(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def skewed(seed=0):
    """Channels whose magnitudes span three orders, as in trained CIFAR ResNets (and worse)."""
    w = gaussian(16, 8, 3, 3, seed=seed)
    return w * torch.logspace(-3, 0, 16).view(-1, 1, 1, 1)


def channel_sse(q, w):
    return (q.double() - w.double()).square().flatten(1).sum(1)


def quantization_error(w, bits, per_channel=True, clip="mse"):
    """Mean squared error of the fake-quantized weight."""
    return (quantize_weight(w, bits, per_channel, clip).double() - w.double()).square().mean().item()


def on_grid(x, scale, qmin, qmax, atol=1e-3):
    """Whether every value of `x` is k * scale with k an integer in qmin..qmax."""
    k = x.double() / scale
    return bool(torch.allclose(k, k.round(), atol=atol) and k.min() >= qmin - atol and k.max() <= qmax + atol)


# ----------------------------------------------------------------------------- weights

@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("bits", BITS)
def test_levels_per_channel(bits, clip):
    """Each output channel holds at most 2^b - 1 values, all k*s with |k| <= 2^(b-1) - 1 (zero exact, symmetric)."""
    w = gaussian(8, 4096)  # enough weights per channel to fill every level
    q = quantize_weight(w, bits, clip=clip)
    qmax = 2 ** (bits - 1) - 1
    assert weight_grid(bits) == (-qmax, qmax)
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
    """32 bits means 'leave in float': the weight comes back unchanged (the very tensor), and a
    quantizer for float weights is refused."""
    w = gaussian(4, 3, 3, 3)
    assert quantize_weight(w, 32, per_channel) is w
    with pytest.raises(ValueError, match="float"):
        weight_quantizer(w, FLOAT_BITS, per_channel)


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


@pytest.mark.parametrize("seed", range(4))
def test_arithmetic_fake_quantize_is_torchs_op_bit_for_bit(seed):
    """The evaluation form (mul, round half to even, clamp, mul) gives torch's fake_quantize values exactly, per
    tensor and per channel, signed and unsigned, also on the half-way points x = (k + 1/2) s where rounding ties."""
    g = torch.Generator().manual_seed(seed)
    for bits in (2, 4, 8):
        for signed in (False, True):
            qmin, qmax = tensor_grid(bits, signed)
            s = float(torch.rand(1, generator=g)) * 0.3 + 1e-4
            x = torch.randn(4, 8, 16, 16, generator=g) * s * (qmax - qmin) / 3
            ties = (torch.arange(qmin - 3, qmax + 3, dtype=torch.float32) + 0.5) * s
            for t in (x, ties):
                want = torch.fake_quantize_per_tensor_affine(t, s, 0, qmin, qmax)
                assert torch.equal(fake_quantize(t, torch.tensor([s]), qmin, qmax), want)
                assert torch.equal(Quantizer(s, qmin, qmax).eval()(t), want)
        w = torch.randn(16, 8, 3, 3, generator=g) * torch.logspace(-3, 0, 16).view(-1, 1, 1, 1)
        q = weight_quantizer(w, bits).eval()
        want = torch.fake_quantize_per_channel_affine(w, q.scale.detach(), torch.zeros(16, dtype=torch.int32), 0,
                                                      q.qmin, q.qmax)
        assert torch.equal(q(w), want)


def test_quantizer_output_stays_float32_for_half_inputs():
    """Levels x scale are not exact in bf16: a bf16 input (autocast) comes back on the float32 grid."""
    q = tensor_quantizer(0.037, 8, signed=False).eval()
    x = torch.rand(1000) * 9
    y = q(x.bfloat16())
    assert y.dtype == torch.float32
    assert torch.equal(y, q(x.bfloat16().float()))
    assert torch.equal(y, q.integers(x.bfloat16()).float() * q.scale.detach())   # levels x scale, not re-rounded
    assert q(x.double()).dtype == torch.float64


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
    """Widths outside 2-8 and 32 are refused with a message, not a torch error or a silent no-op,
    by every weight entry point and by the tensor quantizer (which refuses 32 too)."""
    with pytest.raises(UserError):
        quantize_weight(gaussian(2, 2), bad)
    with pytest.raises(UserError):
        weight_quantizer(gaussian(2, 2), bad)
    if not isinstance(bad, float):   # (the tensor quantizer takes 4.0 as 4: configurations are validated upstream)
        with pytest.raises(UserError):
            tensor_quantizer(0.1, bad, False)
    with pytest.raises(UserError):
        tensor_quantizer(0.1, FLOAT_BITS, False)   # float tensors have no quantizer


def test_bad_clip_is_user_error():
    """Unknown clip modes are refused up front: by quantize_weight, weight_quantizer and quantize_."""
    with pytest.raises(UserError):
        quantize_weight(gaussian(2, 2), 4, clip="percentile")
    with pytest.raises(UserError):
        weight_quantizer(gaussian(2, 2), 4, clip="max")
    model = fold_bn(build_model("resnet8"))
    space = Space(tuple(quantizable_layers(model)), tuple(t.name for t in model.tensors()))
    with pytest.raises(UserError):
        quantize_(model, space.full({(W, "conv1"): 4}), {}, "generic", clip="max")


# ----------------------------------------------------------------------------- the Quantizer's forms

@pytest.mark.parametrize("per_channel", (True, False))
@pytest.mark.parametrize("bits", (2, 4, 8))
def test_weight_quantizer_forms(bits, per_channel):
    """A weight quantizer (eval mode) computes quantize_weight; its integers are on the symmetric grid
    and times the scale give the fake-quantized values back; its qparams are what an int8 exporter
    writes (one scale per channel, or one float, zero point 0)."""
    w = skewed(1)
    q = weight_quantizer(w, bits, per_channel).eval()
    qmax = 2 ** (bits - 1) - 1
    assert (q.qmin, q.qmax, q.bits, q.signed) == (-qmax, qmax, bits, True)
    assert q.axis == (0 if per_channel else None) and q.scale.shape == ((16,) if per_channel else (1,))
    assert not q.scale.requires_grad
    fq = q(w)
    assert torch.equal(fq, quantize_weight(w, bits, per_channel))
    k = q.integers(w)
    assert k.dtype == torch.int32 and k.min() >= -qmax and k.max() <= qmax
    s = q.scale.view(-1, 1, 1, 1) if per_channel else q.scale
    assert torch.allclose(k.float() * s, fq, rtol=1e-6, atol=0)
    p = q.qparams()
    assert (p["zero_point"], p["dtype"], p["qmin"], p["qmax"], p["axis"]) == (0, "int8", -qmax, qmax, q.axis)
    if per_channel:
        assert torch.equal(p["scale"], q.scale.detach())
    else:
        assert isinstance(p["scale"], float) and p["scale"] == pytest.approx(float(q.scale))
    with pytest.raises(ValueError, match="one scale"):
        Quantizer(torch.ones(3), -1, 1, axis=None)


@pytest.mark.parametrize("per_channel", (True, False))
def test_weight_range_7_levels_and_scales(per_channel):
    """An 8-bit weight in range 7 lies on -63..63 (the levels of a 7-bit weight), with exactly the scales the MSE
    search picks for that grid; narrower widths are unchanged by the range; range 8 is the full grid. The pair
    bound that makes range 7 exact on x86 without VNNI: 2 x 255 x 63 fits int16, 2 x 255 x 127 does not."""
    from quant.quantizer import WEIGHT_RANGES, check_weight_range, search_scales
    assert WEIGHT_RANGES == (7, 8)
    assert weight_grid(8, 7) == (-63, 63) and weight_grid(8, 8) == weight_grid(8) == (-127, 127)
    assert all(weight_grid(b, 7) == weight_grid(b) for b in range(2, 8))
    assert 2 * 255 * 63 <= 2 ** 15 - 1 < 2 * 255 * 127
    w = skewed(2)
    q = weight_quantizer(w, 8, per_channel, weight_range=7).eval()
    assert (q.qmin, q.qmax) == (-63, 63)
    rows = w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)
    assert torch.equal(q.scale.detach(), search_scales(rows, 63, "mse"))
    k = q.integers(w)
    assert k.min() >= -63 and k.max() <= 63 and {int(k.min()), int(k.max())} & {-63, 63}
    s = q.scale.view(-1, 1, 1, 1) if per_channel else q.scale
    assert torch.equal(q(w), quantize_weight(w, 8, per_channel, weight_range=7))
    assert torch.allclose(k.float() * s, q(w), rtol=1e-6, atol=0)
    assert torch.equal(quantize_weight(w, 8, per_channel, weight_range=7), quantize_weight(w, 7, per_channel))
    for bad in (6, 9, True, "7"):
        with pytest.raises(UserError, match="weight range"):
            check_weight_range(bad)


def test_recipe_defaults_json_and_placement():
    """The Recipe: the target's default range (7 under ort-cpu, 8 under generic), its JSON round trip, files
    written before the range existed read as range 8, bad settings refused; quantize_ with it places 8-bit
    weights on -63..63."""
    from quant.recipe import Recipe
    assert Recipe.for_target("ort-cpu").weight_range == 7 and Recipe.for_target("generic").weight_range == 8
    assert Recipe.for_target("ort-cpu", weight_range=8).weight_range == 8
    r = Recipe("tensor", "maxabs", 7)
    assert Recipe.from_json(r.to_json()) == r and r.to_json()["weights"] == "BN-folded"
    legacy = Recipe.from_json({"granularity": "channel", "clip": "mse"})
    assert legacy == Recipe(logits="quantized") == Recipe.from_json(None) and Recipe().logits == "float"
    assert r.weight_kwargs() == {"per_channel": False, "clip": "maxabs", "weight_range": 7}
    for bad in ({"granularity": "row"}, {"clip": "max"}, {"weight_range": 4}, {"logits": "int8"}):
        with pytest.raises(UserError):
            Recipe.from_json(bad)
    model = build_model("resnet8", "B").eval()
    space = Space(tuple(quantizable_layers(model)), tuple(t.name for t in model.tensors()))
    qm = quantize_(fold_bn(model), space.full({(W, n): 8 for n in space.layers}), {}, "generic", trainable=True,
                   **Recipe.for_target("ort-cpu").weight_kwargs())
    for n in space.layers:
        m = qm.get_submodule(n)
        assert (m.parametrizations.weight[0].qmin, m.parametrizations.weight[0].qmax) == (-63, 63)



def test_recipe_keeps_the_logits_float_in_uniform_configurations():
    """The logits are the tensor the last kernel writes; the default recipe leaves them float in uniform
    configurations and out of the search (narrows), a "quantized" recipe puts them at the uniform width."""
    from quant.cost import kernel_table
    from quant.recipe import Recipe
    for arch in ("resnet8", "mobilenetv2"):
        for target in ("generic", "ort-cpu"):
            space = kernel_table(build_model(arch, "B" if arch == "resnet8" else None), target).space
            assert space.logits == space.tensors[-1] == "linear"
            cfg = Recipe().uniform(space, 4, 4)
            assert cfg[A, "linear"] == FLOAT_BITS and all(b == 4 for g, b in cfg.items() if g != (A, "linear"))
            assert Recipe(logits="quantized").uniform(space, 4, 4) == space.uniform(4, 4)
            assert not Recipe().narrows(space, (A, "linear")) and Recipe().narrows(space, (A, space.tensors[0]))
            assert Recipe(logits="quantized").narrows(space, (A, "linear")) and Recipe().narrows(space, (W, "linear"))


@pytest.mark.parametrize("bits", range(2, 9))
def test_tensor_grid(bits):
    """Unsigned grids are 0..2^b-1, signed grids the two's complement -2^(b-1)..2^(b-1)-1; a tensor
    quantizer has that grid, that many bits, zero point 0 and the storage type of its sign."""
    assert tensor_grid(bits, False) == (0, 2 ** bits - 1)
    assert tensor_grid(bits, True) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    for signed in (False, True):
        q = tensor_quantizer(0.25, bits, signed)
        assert ((q.qmin, q.qmax), q.bits, q.signed, q.axis) == (tensor_grid(bits, signed), bits, signed, None)
        p = q.qparams()
        assert (p["dtype"], p["zero_point"], p["scale"]) == ("int8" if signed else "uint8", 0, 0.25)


def test_tensor_quantizer_by_hand():
    """A tensor quantizer rounds to the nearest level of its grid and clamps: a hand-made 2-bit unsigned
    quantizer with scale 0.5 maps to {0, 0.5, 1, 1.5}, a signed one to {-1, -0.5, 0, 0.5}; its integers
    are the levels' indices."""
    x = torch.tensor([-3.0, -0.8, -0.2, 0.2, 0.3, 0.74, 0.76, 1.6, 9.0])
    u, s = tensor_quantizer(0.5, 2, False).eval(), tensor_quantizer(0.5, 2, True).eval()
    assert u(x).tolist() == [0.0, 0.0, 0.0, 0.0, 0.5, 0.5, 1.0, 1.5, 1.5]
    assert s(x).tolist() == [-1.0, -1.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5, 0.5]
    assert u.integers(x).tolist() == [0, 0, 0, 0, 1, 1, 2, 3, 3]
    assert s.integers(x).tolist() == [-2, -2, 0, 0, 1, 1, 1, 1, 1]


@pytest.mark.parametrize("train", (False, True))
@pytest.mark.parametrize("signed", (False, True))
def test_tensor_quantizer_straight_through_gradient(signed, train):
    """Fake-quantized tensors pass the gradient straight through: 1 inside the clip range (where
    rounding happens), 0 outside it (where values are clamped), in eval (torch's fake-quant op) and in
    train mode (LSQ) alike."""
    aq = tensor_quantizer(0.25, 3, signed, learn=train).train(train)
    lo, hi = aq.qmin * 0.25, aq.qmax * 0.25
    inside = torch.linspace(lo + 0.01, hi - 0.01, 101)
    outside = torch.cat([torch.linspace(lo - 5.0, lo - 0.3, 20), torch.linspace(hi + 0.3, hi + 5.0, 20)])
    x = torch.cat([inside, outside]).requires_grad_()
    y = aq(x)
    (y * torch.arange(1.0, len(x) + 1)).sum().backward()  # weighted: the gradient is elementwise
    assert torch.equal(x.grad[:len(inside)], torch.arange(1.0, len(inside) + 1))
    assert torch.equal(x.grad[len(inside):], torch.zeros(len(outside)))
    assert not torch.equal(y[:len(inside)].detach(), inside)   # it did round
    assert (aq.scale.grad is not None) == train


def away_from_edges(x, s, qmin, qmax):
    """`x` with the values whose x/s lies within half a level outside the grid moved a full level out:
    there torch's learnable op counts them as inside (it tests the rounded value), LSQ as outside."""
    v = x / s
    edge = ((v > qmax) & (v <= qmax + 0.5)) | ((v < qmin) & (v >= qmin - 0.5))
    return torch.where(edge, torch.where(v > 0, (qmax + 1) * s, (qmin - 1) * s), x)


@pytest.mark.parametrize("per_channel", (True, False))
def test_lsq_gradients_match_torch_learnable_fake_quant(per_channel):
    """In train mode the Quantizer's forward equals torch's fake-quant, and its gradients (input and
    scale) equal torch's learnable fake-quant (LSQ) with grad factor 1/sqrt(N * Qmax), N the elements
    per sample (per channel), on values away from the half-level band just outside the grid."""
    g = torch.Generator().manual_seed(5)
    if per_channel:
        w = torch.randn(6, 4, 3, 3, generator=g) * torch.logspace(-1, 0, 6).view(-1, 1, 1, 1)
        q = weight_quantizer(w, 3, True, clip="mse", learn=True).train()
        s0 = q.scale.detach().clone()
        x = away_from_edges(w, s0.view(-1, 1, 1, 1), q.qmin, q.qmax)
    else:
        q = tensor_quantizer(0.3, 3, True, learn=True).train()
        s0 = q.scale.detach().clone()
        x = away_from_edges(2 * torch.randn(4, 3, 5, 5, generator=g), s0, q.qmin, q.qmax)
    up = torch.randn(x.shape, generator=g)
    xa = x.clone().requires_grad_()
    y = q(xa)
    (y * up).sum().backward()
    factor = 1.0 / math.sqrt(x[0].numel() * max(-q.qmin, q.qmax))
    xb, sb = x.clone().requires_grad_(), s0.clone().requires_grad_()
    if per_channel:
        yt = torch._fake_quantize_learnable_per_channel_affine(xb, sb, torch.zeros(len(s0)), 0, q.qmin, q.qmax, factor)
    else:
        yt = torch._fake_quantize_learnable_per_tensor_affine(xb, sb, torch.zeros(1), q.qmin, q.qmax, factor)
    (yt * up).sum().backward()
    assert torch.allclose(y, yt, rtol=1e-6, atol=1e-7)
    assert torch.equal(xa.grad, xb.grad)
    assert torch.allclose(q.scale.grad, sb.grad, rtol=1e-4, atol=1e-6)
    assert (q.scale.grad != 0).all()
    with torch.no_grad():   # and the eval form is the same function
        assert torch.equal(q.eval()(x), y.detach())


# ----------------------------------------------------------------------------- calibration

class Probe(nn.Module):
    """One Linear layer whose input is a declared tensor ("input", signed or not): calibrate() observes
    it where its Slot writes it."""

    def __init__(self, features, signed):
        super().__init__()
        self.q_in, self.linear, self.q_out = Slot(), nn.Linear(features, 4), Slot()
        self.signed = signed

    def tensors(self, target="generic"):
        return [Tensor(INPUT, "q_in", self.signed), Tensor("linear", "q_out", True)]

    def forward(self, x):
        return self.q_out(self.linear(self.q_in(x)))


def one_tensor(batches, widths, signed=True):
    """The calibrated range of the probe's input tensor."""
    return calibrate(Probe(batches[0].shape[1], signed), "generic", batches, widths, tensors=[INPUT])[INPUT]


def quant_of(r, bits, name=INPUT):
    return quantizers_from({name: r})[name, bits].eval()


def clip_range(q):
    """The largest representable value of a tensor quantizer."""
    return q.qmax * float(q.scale)


@pytest.mark.parametrize("signed", (False, True))
@pytest.mark.parametrize("bits", (2, 3, 4, 8))
def test_calibrated_quantizer_levels_are_exactly_the_grid(bits, signed):
    """A calibrated tensor quantizer has zero point 0 and the grid of its sign; its outputs are exactly
    the levels k*scale, k in qmin..qmax (0..2^b-1 for post-ReLU tensors, -2^(b-1)..2^(b-1)-1 for signed
    ones), every level is reachable, inputs beyond the range clamp to the extreme levels, and values
    already on the grid pass unchanged."""
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(256, 32, generator=g)
    r = one_tensor([x if signed else x.abs()], [bits], signed)
    assert r["signed"] == signed and set(r["scales"]) == {str(bits)}
    aq = quant_of(r, bits)
    assert (aq.bits, aq.signed, aq.qparams()["zero_point"]) == (bits, signed, 0)
    assert (aq.qmin, aq.qmax) == tensor_grid(bits, signed)
    scale = float(aq.scale)
    assert scale > 0 and scale == pytest.approx(r["scales"][str(bits)])
    levels = torch.arange(aq.qmin, aq.qmax + 1, dtype=torch.float32) * scale
    assert len(levels) == 2 ** bits
    lo, hi = levels[0].item(), levels[-1].item()
    dense = torch.linspace(lo - 3 * scale - 1.0, hi + 3 * scale + 1.0, 20_001)
    out = aq(dense)
    assert on_grid(out, scale, aq.qmin, aq.qmax, atol=1e-4)
    assert torch.allclose(out.unique(), levels, rtol=1e-5, atol=1e-6 * scale)  # every level, nothing else
    assert (out[dense < lo] == out.min()).all() and (out[dense > hi] == out.max()).all()
    assert torch.allclose(aq(levels), levels, rtol=1e-6, atol=0)


def test_calibration_on_resnet_follows_declared_signedness():
    """On a BN-folded ResNet, every declared tensor gets a range at each requested width (32 skipped:
    float needs none), signed exactly where the model declares it (the image, the projections, the
    logits; under ort-cpu also the pre-add conv outputs); its quantizers have the matching grids; the
    model's training mode is restored and no hook is left behind."""
    torch.manual_seed(0)
    model = build_model("resnet20", "B")
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 3, 16, 16, generator=g) for _ in range(2)]
    for target in ("generic", "ort-cpu"):
        folded = fold_bn(model).train()
        ranges = calibrate(folded, target, batches, [8, FLOAT_BITS])  # one width: low-bit searches are slow
        declared = {t.name: t.signed for t in folded.tensors(target)}
        assert list(ranges) == list(declared)
        assert {n: r["signed"] for n, r in ranges.items()} == declared
        assert all(set(r["scales"]) == {"8"} and r["scales"]["8"] > 0 for r in ranges.values())
        signed = {n for n, s in declared.items() if s}
        expected = {INPUT, "linear", "layer2.0.shortcut.0", "layer3.0.shortcut.0"}
        if target == "ort-cpu":
            expected |= {f"layer{s}.{i}.conv2" for s in (1, 2, 3) for i in range(3)}
        assert signed == expected
        for (n, b), q in quantizers_from(ranges).items():
            assert b == 8 and (q.qmin, q.qmax) == tensor_grid(8, declared[n])
        assert folded.training
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in folded.modules())
        assert all(s.quant is None for s in slots(folded, target).values())


def test_calibration_refuses_wrong_declarations_and_quantized_models():
    """A tensor declared never negative that calibration sees negative is a ValueError (the model's
    declaration is wrong); a model with a tensor quantizer attached is refused (calibration observes
    float tensors); the `tensors` argument restricts what is calibrated; no width (or only 32) gives no
    ranges."""
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="never negative"):
        calibrate(Probe(8, signed=False), "generic", [x], [8])
    assert set(calibrate(Probe(8, signed=False), "generic", [x.abs()], [8])) == {INPUT, "linear"}
    assert set(calibrate(Probe(8, True), "generic", [x], [8], tensors=["linear"])) == {"linear"}
    assert calibrate(Probe(8, True), "generic", [x], [FLOAT_BITS]) == {}
    probe = Probe(8, True)
    probe.q_in.quant = tensor_quantizer(0.1, 8, True)
    with pytest.raises(ValueError, match="float model"):
        calibrate(probe, "generic", [x], [8])


@pytest.mark.parametrize("bad", ([1], [9], [4, 0], [16]))
def test_calibration_rejects_bad_width(bad):
    """Tensor widths outside 2-8 (and 32) are a UserError."""
    with pytest.raises(UserError):
        one_tensor([torch.randn(4, 8)], bad)
    assert set(ACT_BITS) == {2, 3, 4, 5, 6, 7, 8, FLOAT_BITS}


def test_calibration_returns_every_requested_width():
    """Every listed tensor gets one range per requested width, duplicates and 32 (float) dropped,
    with the signedness shared across its widths; quantizers_from builds one quantizer per
    (tensor, width) with that grid and scale."""
    r = one_tensor([torch.randn(16, 8)], [6, 3, 6, FLOAT_BITS, 2])
    assert r["signed"] and set(r["scales"]) == {"2", "3", "6"}
    qs = quantizers_from({INPUT: r})
    assert set(qs) == {(INPUT, b) for b in (2, 3, 6)}
    for (_, b), q in qs.items():
        assert q.signed and q.bits == b and (q.qmin, q.qmax) == tensor_grid(b, True)
        assert float(q.scale) == pytest.approx(r["scales"][str(b)])
        assert not q.scale.requires_grad
    assert all(q.scale.requires_grad for q in quantizers_from({INPUT: r}, learn=True).values())


def test_calibrated_range_shrinks_as_bits_fall():
    """The range search models the grid's real number of levels: on post-ReLU-like (half-normal)
    tensors the clip range falls with the width (8 > 6 > 4 > 3 > 2 bits), the 4-bit range is well
    inside the 8-bit one (torch's plain HistogramObserver, which models 256 levels whatever the grid,
    returns the 8-bit range for a 4-bit grid), and at 4 bits it has less squared error than the
    8-bit range spread over 16 levels."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g).abs()
    r = one_tensor([x[:256], x[256:]], [8, 6, 4, 3, 2], signed=False)
    ranges = [clip_range(quant_of(r, b)) for b in (8, 6, 4, 3, 2)]
    assert all(b < a for a, b in zip(ranges, ranges[1:])), ranges
    r8, r4 = ranges[0], ranges[2]
    assert r8 > 0.9 * x.max().item()           # 8 bits: hardly any clipping
    assert r4 < 0.85 * r8                       # 4 bits: a real clip
    plain = HistogramObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine, quant_min=0, quant_max=15)
    plain(x[:256])
    plain(x[256:])
    s, z = plain.calculate_qparams()
    assert float(s) * (15 - int(z)) > 0.95 * r8  # what the range would be without the level count
    mse4 = (quant_of(r, 4)(x) - x).square().mean()
    squeezed = tensor_quantizer(r8 / 15, 4, False).eval()
    assert mse4 < 0.8 * (squeezed(x) - x).square().mean()


def test_calibrated_ranges_on_resnet_shrink_with_bits():
    """On a real network's post-ReLU tensors too, the 3-bit clip range is never above the 8-bit one and
    is below it for most tensors."""
    torch.manual_seed(0)
    model = fold_bn(build_model("resnet20", "A"))
    names = [t.name for t in model.tensors() if not t.signed][1::3]  # from every stage, and the pool
    ranges = calibrate(model, "generic", [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))],
                       [8, 3], tensors=names)
    assert list(ranges) == names
    r8 = [clip_range(quant_of(ranges[n], 8, n)) for n in names]
    r3 = [clip_range(quant_of(ranges[n], 3, n)) for n in names]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(r8, r3))
    smaller = [b < 0.9 * a for a, b in zip(r8, r3)]
    assert sum(smaller) >= 0.75 * len(names), smaller


def test_signed_range_is_near_mse_optimal():
    """For signed (e.g. normalized-image, linear-bottleneck) tensors the calibrated 4-bit range, like the
    unsigned one, clips: its squared error is within 25% of the best scale on the same grid."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g)
    aq = quant_of(one_tensor([x], [4]), 4)
    mse = (aq(x) - x).square().mean().item()
    best = min((torch.fake_quantize_per_tensor_affine(x, s, 0, aq.qmin, aq.qmax) - x).square().mean().item()
               for s in torch.linspace(0.05, 1.0, 200).tolist())
    assert mse <= 1.25 * best, (float(aq.scale), mse, best)


# ----------------------------------------------------------------------------- folding, then quantizing

@torch.no_grad()
def spread_bn(model, seed=0):
    """Random BN statistics with per-channel gains spread over a factor of ~50 (log-normal gamma), so
    that folding moves output channels onto very different scales. Returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.weight.copy_(torch.exp(torch.randn(bn.num_features, generator=g)) * torch.sign(
                torch.rand(bn.num_features, generator=g) - 0.1))   # a few negative gains too
            bn.bias.uniform_(-0.3, 0.3, generator=g)
            bn.running_mean.normal_(0, 0.2, generator=g)
            bn.running_var.uniform_(0.5, 2.0, generator=g)
    return model.eval()


def space_of(model, target="generic"):
    return Space(tuple(quantizable_layers(model)), tuple(t.name for t in widths_of_their_own(model.tensors(target))))


def bn_gain(model, conv):
    bn = model.get_submodule(dict(model.conv_bn_pairs())[conv])
    return (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()


@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("bits", (2, 4, 8))
def test_per_tensor_weights_are_quantized_after_folding(bits, clip):
    """Per-tensor granularity quantizes the FOLDED weights: in every layer of the quantized, folded
    ResNet all weights are integer multiples of ONE scale, at most 2^b - 1 distinct values, the scale
    being the one weight_quantizer finds on the folded weight. Quantizing first and folding after (the
    old way) puts every output channel on its own grid, with far more values than the grid has:
    checked too, so the test tells the two apart."""
    torch.manual_seed(0)
    model = spread_bn(build_model("resnet20", "B"))
    folded = fold_bn(model)
    float_folded = {n: m.weight.detach().clone() for n, m in quantizable_layers(folded).items()}
    quantize_(folded, space_of(model).full({(W, n): bits for n in float_folded}), {}, "generic",
              per_channel=False, clip=clip)
    qmax = 2 ** (bits - 1) - 1
    old_way_violations = 0
    for name, m in quantizable_layers(folded).items():
        q = m.weight.detach()
        s = float(weight_quantizer(float_folded[name], bits, per_channel=False, clip=clip).scale)
        assert on_grid(q, s, -qmax, qmax), name
        assert q.unique().numel() <= 2 ** bits - 1, name
        assert q.abs().max().item() == pytest.approx(qmax * s, rel=1e-6)   # the top level is used
        if name in dict(model.conv_bn_pairs()):
            old = quantize_weight(model.get_submodule(name).weight.detach(), bits, False, clip) * \
                bn_gain(model, name).view(-1, 1, 1, 1)
            old_way_violations += old.unique().numel() > 2 ** bits - 1
    assert old_way_violations >= 20   # every conv but a few
    assert torch.equal(folded.linear.bias, fold_bn(model).linear.bias)   # biases stay float


@pytest.mark.parametrize("clip", CLIPS)
def test_per_channel_quantization_commutes_with_folding(clip):
    """Per channel, folding multiplies each output channel by one gain, so quantizing after folding
    gives (to float rounding) the gain times the channel quantized before folding, negative gains
    included: the folded per-channel grid is the unfolded one, scaled; each channel on its own grid."""
    torch.manual_seed(1)
    model = spread_bn(build_model("resnet8", "B"), seed=1)
    folded = fold_bn(model)
    for conv, _ in model.conv_bn_pairs():
        fw = folded.get_submodule(conv).weight.detach()
        after = quantize_weight(fw, 3, True, clip)
        before = quantize_weight(model.get_submodule(conv).weight.detach(), 3, True, clip) * \
            bn_gain(model, conv).view(-1, 1, 1, 1)
        assert torch.allclose(after, before, rtol=1e-5, atol=1e-7 * fw.abs().max().item()), conv
        for row in after:
            assert row.unique().numel() <= 7


def test_fold_bn_leaves_the_source_and_matches_it():
    """fold_bn returns an eval-mode copy with every declared BN replaced by an identity and a bias on its
    conv, computing what the model with its BNs computes; the source keeps its BNs, weights and mode."""
    torch.manual_seed(2)
    model = spread_bn(build_model("resnet8", "A"), seed=2).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_bn(model)
    assert not folded.training and model.training
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert all(folded.get_submodule(c).bias is not None for c, _ in model.conv_bn_pairs())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        ref, got = model(x), folded(x)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


# ----------------------------------------------------------------------------- placement

def hand_ranges(model, target, bits=(4,), base=0.05):
    """A distinct, fixed scale per tensor (no calibration: these tests need grids that tell tensors
    apart, not good ones): tensor i gets base * (1 + 0.137 i) at every width in `bits`, divided by
    the width's level count over 15."""
    out = {}
    for i, t in enumerate(model.tensors(target)):
        levels = {b: 2 ** b - 1 for b in bits}
        out[t.name] = {"signed": t.signed,
                       "scales": {str(b): base * (1 + 0.137 * i) * 15 / levels[b] for b in bits}}
    return out


def test_quantize_bakes_weights_and_attaches_tensor_quantizers():
    """quantize_ (evaluation form) replaces each quantized layer's folded weight by quantize_weight of it,
    leaves float layers bit for bit, and attaches to the Slot of every quantized tensor an eval-mode
    quantizer with the calibrated scale and the tensor's grid; float tensors keep an empty Slot. The float
    configuration computes exactly the folded model."""
    torch.manual_seed(3)
    model = spread_bn(build_model("resnet8", "B"), seed=3)
    space = space_of(model)
    ranges = hand_ranges(model, "generic", bits=(4, 8))
    cfg = space.full({(W, "conv1"): 3, (W, "layer2.0.shortcut.0"): 2, (W, "linear"): 8,
                      (A, INPUT): 8, (A, "layer1.0.conv1"): 4, (A, "layer2.0.shortcut.0"): 4, (A, "pool"): 8})
    ref = fold_bn(model)
    q = quantize_(fold_bn(model), cfg, ranges, "generic", clip="maxabs")
    for name, m in quantizable_layers(q).items():
        w = ref.get_submodule(name).weight
        expected = w if cfg[W, name] == FLOAT_BITS else quantize_weight(w, cfg[W, name], True, "maxabs")
        assert torch.equal(m.weight, expected), name
        assert not parametrize.is_parametrized(m)
    attached = tensor_quantizers(q, "generic")
    assert set(attached) == {INPUT, "layer1.0.conv1", "layer2.0.shortcut.0", "pool"}
    for name, tq in attached.items():
        bits = cfg[A, name]
        assert not tq.training and (tq.qmin, tq.qmax) == tensor_grid(bits, ranges[name]["signed"])
        assert float(tq.scale) == pytest.approx(ranges[name]["scales"][str(bits)])
    assert tensor_grids(q, "generic") == {n: list(tensor_grid(cfg[A, n], ranges[n]["signed"])) for n in attached}
    assert weight_quantizers(q, list(quantizable_layers(q))) == {}
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(quantize_(fold_bn(model), space.full({}), {}, "generic")(x), ref(x))


def test_quantize_refuses_uncalibrated_width_before_changing_anything():
    """A configuration asking for a tensor width with no calibrated range is a UserError naming the tensor
    and width; the model is left as it was (no quantizer attached, no weight changed)."""
    model = fold_bn(build_model("resnet8", "B"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = space_of(model).full({(W, "conv1"): 4, (A, "conv1"): 4, (A, "layer1.0.conv1"): 6})
    with pytest.raises(UserError, match="'layer1.0.conv1' at 6 bits"):
        quantize_(model, cfg, hand_ranges(model, "generic"), "generic")
    with pytest.raises(UserError, match="'conv1' at 4 bits"):
        check_ranges(cfg, {})
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not tensor_quantizers(model, "generic")


def test_trainable_form_and_skeleton_round_trip():
    """quantize_(trainable=True) parametrizes the quantized layers (the float original trains, the forward
    reads its quantized view, equal to the baked weight) and puts LSQ quantizers in the Slots, scales
    learned unless learn_scales=False; gradients reach the float weights and the scales. Its state
    dict loads strictly into skeleton_ (the same structure with placeholder scales, from tensor_grids),
    which then computes the same outputs."""
    torch.manual_seed(4)
    model = spread_bn(build_model("resnet8", "B"), seed=4)
    space = space_of(model)
    ranges = hand_ranges(model, "generic")
    cfg = space.full({(W, "conv1"): 4, (W, "layer1.0.conv2"): 3, (W, "linear"): 4,
                      (A, "layer1.0.conv1"): 4, (A, "layer1.0.conv2"): 4, (A, "pool"): 4})
    baked = quantize_(fold_bn(model), cfg, ranges, "generic", clip="maxabs")
    qat = quantize_(fold_bn(model), cfg, ranges, "generic", clip="maxabs", trainable=True)
    wq = weight_quantizers(qat, space.layers)
    assert set(wq) == {"conv1", "layer1.0.conv2", "linear"}
    for name, q in wq.items():
        assert q.scale.requires_grad
        assert torch.equal(qat.get_submodule(name).weight, baked.get_submodule(name).weight)
    tqs = tensor_quantizers(qat, "generic")
    assert set(tqs) == {"layer1.0.conv1", "layer1.0.conv2", "pool"}
    assert all(q.scale.requires_grad for q in tqs.values())
    frozen = quantize_(fold_bn(model), cfg, ranges, "generic", clip="maxabs", trainable=True, learn_scales=False)
    assert not any(q.scale.requires_grad for q in tensor_quantizers(frozen, "generic").values())
    assert not any(q.scale.requires_grad for q in weight_quantizers(frozen, space.layers).values())

    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    qat.train()   # (as utils/qat.py does: the weight quantizers take their host's mode when registered)
    assert all(q.training for q in [*tqs.values(), *wq.values()])
    qat(x).square().sum().backward()
    assert qat.conv1.parametrizations.weight.original.grad.abs().sum() > 0
    assert all(q.scale.grad is not None for q in [*tqs.values(), *wq.values()])

    qat.eval()
    skel = skeleton_(fold_bn(build_model("resnet8", "B")), cfg, tensor_grids(qat, "generic"), "generic")
    skel.load_state_dict(qat.state_dict())
    skel.eval()
    with torch.no_grad():
        assert torch.equal(skel(x), qat(x))
        assert torch.allclose(qat(x), baked(x), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def reads_by_op(model, target, x):
    """{op module name: its positional tensor inputs} for every op of every declared kernel, from one
    forward pass (forward pre-hooks); and {tensor: what its Slot wrote}."""
    seen, written = {}, {}

    def on_read(op):
        def hook(_m, inputs):
            seen.setdefault(op, [t.clone() for t in inputs])
        return hook

    def on_write(tensor):
        def hook(_m, _inputs, out):
            written.setdefault(tensor, out.clone())
        return hook

    handles = [model.get_submodule(op).register_forward_pre_hook(on_read(op))
               for k in model.kernels(target) for op in k.ops]
    handles += [model.get_submodule(t.slot).register_forward_hook(on_write(t.name)) for t in model.tensors(target)]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return seen, written


def grid_of(model, target, tensor):
    q = slots(model, target)[tensor].quant
    return float(q.scale), q.qmin, q.qmax


@pytest.mark.parametrize("arch,shortcut", [("resnet20", "A"), ("resnet20", "B"), ("mobilenetv2", None)])
def test_every_consumer_reads_the_quantized_tensor(arch, shortcut):
    """A tensor quantizer placed in a Slot makes every consumer read the quantized tensor: for every
    declared kernel, its convolutions / linear layer, the residual add (its shortcut operand), shortcut
    A's subsampling and the pooling receive values on the grid of the tensor the kernel declares it
    reads (each tensor has its own scale, so the right grid is told from a wrong one), at most 2^b
    distinct values; a block input read by conv1, the projection and the add is the very tensor its Slot
    wrote. The add's other operand (the conv2 output, fused into the same kernel under the generic
    target) is off every grid, and so is a float model's input to the same layers: the check
    discriminates."""
    torch.manual_seed(5)
    model = spread_bn(build_model(arch, shortcut), seed=5)
    target = "generic"
    space = space_of(model, target)
    q = quantize_(fold_bn(model), space.full({(A, t): 4 for t in space.tensors}),
                  hand_ranges(model, target), target)
    size = 32 if arch == "mobilenetv2" else 16
    x = torch.randn(1 if arch == "mobilenetv2" else 2, 3, size, size, generator=torch.Generator().manual_seed(2))
    seen, written = reads_by_op(q, target, x)
    float_seen, _ = reads_by_op(fold_bn(model), target, x)
    checked = {"conv": 0, "add": 0, "pad": 0, "pool": 0}
    for k in q.kernels(target):
        main = k.reads[0].tensor
        for op in k.ops:
            m = q.get_submodule(op)
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                (inp,) = seen[op]
                assert on_grid(inp, *grid_of(q, target, main)), (k.name, op)
                assert (inp != 0).float().mean() > 0.05, op   # not trivially on every grid
                assert not on_grid(float_seen[op][0], *grid_of(q, target, main)), op
                assert inp.unique().numel() <= 16
                assert torch.equal(inp, written[main]), op   # the tensor its Slot wrote
                checked["conv"] += 1
            elif isinstance(m, Add):
                a, b = seen[op]
                sc = k.reads[-1].tensor
                assert on_grid(b, *grid_of(q, target, sc)), (k.name, op)
                if not isinstance(q.get_submodule(op.rpartition(".")[0]).shortcut, PadShortcut):
                    assert torch.equal(b, written[sc]), op   # the block input, or the projection's tensor
                assert not on_grid(a, *grid_of(q, target, sc)) and not on_grid(a, *grid_of(q, target, main))
                checked["add"] += 1
            elif isinstance(m, nn.AdaptiveAvgPool2d):
                assert on_grid(seen[op][0], *grid_of(q, target, main)) and torch.equal(seen[op][0], written[main])
                checked["pool"] += 1
            else:   # shortcut A: subsamples the block input (declared as the quarter it keeps), then pads that
                sc = k.reads[-1]
                assert sc.fraction == 0.25 and on_grid(seen[op][0], *grid_of(q, target, sc.tensor))
                kept = written[sc.tensor] if isinstance(m, Subsample) else written[sc.tensor][:, :, ::2, ::2]
                assert torch.equal(seen[op][0], kept)
                checked["pad"] += 1
    assert checked["conv"] == len(space.layers) and checked["pool"] == 1
    assert checked["add"] == (9 if arch != "mobilenetv2" else 14)
    assert checked["pad"] == (4 if shortcut == "A" else 0)   # two shortcuts, each a subsample and a pad
    if arch == "resnet20":   # spelled out for one block input: conv1, the projection (B) and the add
        block_in = written["layer1.2.conv2"]
        assert torch.equal(seen["layer2.0.conv1"][0], block_in)
        if shortcut == "B":
            assert torch.equal(seen["layer2.0.shortcut.0"][0], block_in)
            assert torch.equal(seen["layer2.0.add"][1], written["layer2.0.shortcut.0"])
        assert torch.equal(seen["layer1.1.add"][1], written["layer1.0.conv2"])
        assert torch.equal(seen["layer1.1.conv1"][0], written["layer1.0.conv2"])


@pytest.mark.parametrize("arch,shortcut", [("resnet20", "B"), ("mobilenetv2", None)])
def test_ort_cpu_extra_tensors_are_quantized_where_declared(arch, shortcut):
    """Under ort-cpu the conv output before the add and the add's output are tensors of their own: with
    only those quantized, the add reads the pre-add conv output on its grid (and the shortcut in float),
    the add's Slot writes on the add's grid, and the next kernel reads that. Under the generic target the
    pre-add Slot (q_mid) is no tensor: quantizing every generic tensor leaves it empty."""
    torch.manual_seed(6)
    model = spread_bn(build_model(arch, shortcut), seed=6)
    ort = space_of(model, "ort-cpu")
    adds = [t for t in ort.tensors if t.endswith(".add")]
    pre = [t[:-len("add")] + ("conv2" if arch == "resnet20" else "conv3") for t in adds]
    assert len(adds) == (9 if arch == "resnet20" else 14)
    cfg = ort.full({(A, t): 4 for t in adds + pre})
    q = quantize_(fold_bn(model), cfg, hand_ranges(model, "ort-cpu"), "ort-cpu")
    for t in pre:
        assert q.get_submodule(t.rpartition(".")[0] + ".q_mid").quant is slots(q, "ort-cpu")[t].quant is not None
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    seen, written = reads_by_op(q, "ort-cpu", x)
    consumers = {}
    for k in q.kernels("ort-cpu"):
        for r in k.reads:
            consumers.setdefault(r.tensor, k)   # the first reader, whose first op reads it
    for add, conv in zip(adds, pre):
        a, b = seen[add]
        assert on_grid(a, *grid_of(q, "ort-cpu", conv)) and torch.equal(a, written[conv])
        assert not on_grid(b, *grid_of(q, "ort-cpu", conv)) and not on_grid(b, *grid_of(q, "ort-cpu", add))
        assert on_grid(written[add], *grid_of(q, "ort-cpu", add))
        nxt = consumers[add]
        assert torch.equal(seen[nxt.ops[0]][0], written[add]), nxt.name   # a conv1, the pool or the head conv
    generic = space_of(model, "generic")
    g = quantize_(fold_bn(model), generic.uniform(FLOAT_BITS, 4), hand_ranges(model, "generic"), "generic")
    mids = [m for n, m in g.named_modules() if n.endswith(".q_mid")]
    assert len(mids) == (9 if arch == "resnet20" else 17)
    assert all(m.quant is None for m in mids)
    assert all(s.quant is not None for s in slots(g, "generic").values())


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
    """Uniform 8-bit weights (per channel, MSE clip, after folding) on a briefly trained ResNet-8 cost
    <= 0.5 points, and with every tensor at 8 bits too (ranges calibrated on training images) <= 1 point.

    The ResNet is fully convolutional with global pooling, so 16x16 inputs exercise the same
    layers as CIFAR's 32x32 at a quarter of the cost.
    """
    (xtr, ytr), (xte, yte) = synthetic_task(n_train=100 * 32, n_test=1000)
    torch.manual_seed(0)
    model = build_model("resnet8")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for i in range(0, len(xtr), 32):
        loss = F.cross_entropy(model(xtr[i:i + 32]), ytr[i:i + 32])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()

    def accuracy(net):
        with torch.no_grad():
            return 100.0 * (net(xte).argmax(1) == yte).float().mean().item()

    float_acc = accuracy(model)
    assert float_acc > 50.0
    space = space_of(model)
    w8 = quantize_(fold_bn(model), space.uniform(8, FLOAT_BITS), {}, "generic")
    assert not torch.equal(w8.conv1.weight, fold_bn(model).conv1.weight)  # really quantized
    acc8 = accuracy(w8)
    assert abs(acc8 - float_acc) <= 0.5, (float_acc, acc8)
    ranges = calibrate(fold_bn(model), "generic", [xtr[:256], xtr[256:512]], [8])
    w8a8 = quantize_(fold_bn(model), space.uniform(8, 8), ranges, "generic")
    assert len(tensor_quantizers(w8a8, "generic")) == len(space.tensors)
    acc8a8 = accuracy(w8a8)
    assert abs(acc8a8 - float_acc) <= 1.0, (float_acc, acc8a8)
