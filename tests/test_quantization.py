"""Properties of weight fake-quantization (utils/quantization.py)."""
import copy

import pytest
import torch
import torch.nn.functional as F

import utils.quantization as Q
from models.resnet import CifarResNet
from utils.config import quantizable_layers, uniform_config
from utils.errors import UserError
from utils.quantization import WeightQuantizer, quantization_error, quantize_weight

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
