"""Quantization-aware fine-tuning (utils/qat.py, on quant.place.quantize_): straight-through and LSQ
gradients of the one Quantizer, the structure of the prepared model, resume equivalence and stale
checkpoints (the export of a fine-tuned checkpoint is tested in tests/test_export.py). Small models
(ResNet-8) on a few hundred synthetic images."""
import inspect

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize

import utils.qat as Q
from models import build_model
from quant.calibrate import calibrate
from quant.cost import kernel_table
from quant.errors import UserError
from quant.fold import fold_bn
from quant.place import slots
from quant.quantizer import Quantizer
from quant.widths import FLOAT_BITS, A, W
from utils.checkpoint import read_checkpoint
from utils.data import make_synthetic
from utils.train import PAD, Normalizer

TARGET = "generic"

NORM = Normalizer([0.5, 0.5, 0.5], [0.25, 0.25, 0.25], "cpu")


@pytest.fixture(scope="module")
def setup():
    """A ResNet-8 with trained-like BN statistics, 256 training images, and 4-bit activation ranges."""
    torch.manual_seed(0)
    data = make_synthetic(n_train=256, n_test=64)
    model = build_model("resnet8", "B")
    x = torch.from_numpy(data.train_x)
    with torch.no_grad():   # BN statistics of real inputs, so the folded network is a sane one
        model.train()
        model(NORM(x))
    model.eval()
    table = kernel_table(model, TARGET)
    ranges = calibrate(fold_bn(model), TARGET, [NORM(x[:128])], [4, 8])
    padded = F.pad(x, (0, 0, PAD, PAD, PAD, PAD))
    return {"model": model, "space": table.space, "act": ranges, "padded": padded,
            "labels": torch.from_numpy(data.train_y), "test_x": torch.from_numpy(data.test_x)}


def mixed_config(space):
    """Weights and tensors narrowed in different places, some left float; the image and the logits too."""
    layers, tensors = space.layers, space.tensors
    return space.full({(W, layers[0]): 8, (A, tensors[1]): 8, (W, layers[1]): 4, (A, layers[1]): 4,
                       (W, layers[2]): 2, (A, "input"): 8, (A, layers[-1]): 4, (A, tensors[-3]): 4})


def test_weight_gradient_is_straight_through_and_scale_gradient_finite():
    """Inside the clip range the gradient to the float original is the identity, outside it is zero; the LSQ
    scale gets a finite, nonzero gradient, per channel."""
    w = torch.tensor([[-3.0, -0.2, 0.05, 0.3, 2.5], [0.01, 0.02, -0.5, 0.6, 0.0]], requires_grad=True)
    p = Quantizer(torch.tensor([0.1, 0.05]), -7, 7, axis=0, learn=True).train()   # grids +-0.7, +-0.35
    p(w).sum().backward()
    assert w.grad.tolist() == [[0.0, 1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0, 1.0]]
    assert torch.isfinite(p.scale.grad).all() and (p.scale.grad != 0).all() and p.scale.grad.shape == (2,)
    fixed = Quantizer(torch.tensor([0.1]), -7, 7, axis=0, learn=False).train()
    w.grad = None
    fixed(w[:1]).sum().backward()
    assert not fixed.scale.requires_grad and fixed.scale.grad is None and w.grad[0].tolist() == [0, 1, 1, 1, 0]


def test_activation_gradient_is_straight_through():
    """Per-tensor LSQ on an unsigned grid: identity inside [0, 15 * scale], zero outside; finite scale gradient."""
    x = torch.tensor([[-1.0, 0.1, 1.0, 1.4, 9.0]], requires_grad=True)      # one sample of 5 features
    q = Quantizer(torch.tensor([0.1]), 0, 15, learn=True).train()
    out = q(x)
    out.sum().backward()
    assert x.grad.tolist() == [[0.0, 1.0, 1.0, 1.0, 0.0]]
    assert torch.allclose(out.detach(), torch.tensor([[0.0, 0.1, 1.0, 1.4, 1.5]]))
    # LSQ's scale gradient: round(v) - v inside, qmin / qmax outside (v = x / s), times 1 / sqrt(N * Qmax)
    v = (x.detach() / 0.1).flatten()
    expect = sum(((15.0 if t > 15 else 0.0) if not 0 <= t <= 15 else round(float(t)) - float(t)) for t in v)
    assert q.scale.grad.item() == pytest.approx(expect / (5 * 15) ** 0.5, rel=1e-5)
    q.eval()     # evaluation computes exactly torch's fake_quantize_per_tensor_affine
    assert torch.equal(q(x.detach()), torch.fake_quantize_per_tensor_affine(x.detach(), 0.1, 0, 0, 15))


def test_prepared_model(setup):
    """prepare_qat: BN folded away, weights are a parametrization whose view lies on the grid, quantized tensors
    get a trainable quantizer in their Slot; an all-float configuration computes exactly the folded float model;
    in eval mode the prepared model computes what post-training placement computes."""
    model, space, act = setup["model"], setup["space"], setup["act"]
    cfg = mixed_config(space)
    qat = Q.prepare_qat(model, cfg, act, TARGET)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in qat.modules())
    by_slot = slots(qat, TARGET)
    for (kind, n), b in cfg.items():
        if kind == W:
            layer = qat.get_submodule(n)
            assert parametrize.is_parametrized(layer, "weight") == (b != FLOAT_BITS)
            if b != FLOAT_BITS:
                q = layer.parametrizations.weight[0]
                levels = q.integers(layer.parametrizations.weight.original)
                assert levels.abs().max() <= 2 ** (b - 1) - 1 and q.scale.requires_grad
        else:
            q = by_slot[n].quant
            assert (q is not None) == (b != FLOAT_BITS)
            if q is not None:
                assert q.bits == b and q.scale.requires_grad and q.training
    x = NORM(setup["test_x"][:16])
    plain = Q.prepare_qat(model, space.uniform(FLOAT_BITS, FLOAT_BITS), act, TARGET).eval()
    from quant.place import quantize_
    with torch.no_grad():
        assert torch.equal(plain(x), fold_bn(model)(x))
        assert torch.equal(qat.eval()(x), quantize_(fold_bn(model), cfg, act, TARGET)(x))
    with pytest.raises(UserError):
        Q.prepare_qat(model, space.full({(A, "input"): 6}), act, TARGET)     # 6 bits were never calibrated


def run_finetune(setup, path, epochs=2, resume=False, key=None, interrupt_at=None, monkeypatch=None):
    cfg = mixed_config(setup["space"])
    qat = Q.prepare_qat(setup["model"], cfg, setup["act"], TARGET)
    key = key or {"config": "mixed"}
    meta = {"name": "mixed", "config": [[list(g), b] for g, b in cfg.items()], "model_args": setup["model"].model_args,
            "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}, "quantization": {"granularity": "channel"},
            "target": TARGET}
    if interrupt_at is not None:
        real = Q.train_one_epoch

        def stopping(*a, **k):
            if inspect.signature(real).bind(*a, **k).arguments["epoch"] == interrupt_at:
                raise KeyboardInterrupt
            return real(*a, **k)
        monkeypatch.setattr(Q, "train_one_epoch", stopping)
    try:
        return qat, Q.finetune(qat, path, key, meta, setup["padded"], setup["labels"], NORM, epochs, 0.001, 64, 0,
                               resume=resume)
    finally:
        if monkeypatch is not None:
            monkeypatch.undo()


@pytest.fixture(scope="module")
def straight(setup, tmp_path_factory):
    path = tmp_path_factory.mktemp("qat") / "qat_mixed.pt"
    qat, run = run_finetune(setup, path)
    return {"path": path, "qat": qat, "run": run}


def test_checkpoint_is_weights_only_and_complete(straight):
    """The fine-tuned checkpoint loads with weights_only and carries configuration, scales, key and recipe."""
    ck = read_checkpoint(straight["path"])
    assert ck["finished"] and ck["epoch"] == 2 and ck["qat_format"] == Q.QAT_FORMAT and ck["key"] == {"config": "mixed"}
    assert any(k.endswith("parametrizations.weight.0.scale") for k in ck["model"])
    assert "q_input.quant.scale" in ck["model"] and "q_logits.quant.scale" in ck["model"]
    model, _ = Q.load_qat(straight["path"])
    for k, v in straight["qat"].state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert straight["run"]["status"] == "trained" and len(straight["run"]["history"]) == 2


def test_resume_equals_uninterrupted(setup, straight, tmp_path, monkeypatch):
    """Interrupted in epoch 2 and resumed: bit-identical weights, scales and optimizer state."""
    path = tmp_path / "qat_mixed.pt"
    with pytest.raises(KeyboardInterrupt):
        run_finetune(setup, path, interrupt_at=1, monkeypatch=monkeypatch)
    assert read_checkpoint(path)["epoch"] == 1 and not read_checkpoint(path)["finished"]
    qat, run = run_finetune(setup, path, resume=True)
    assert run["status"] == "resumed after epoch 1"
    a, b = read_checkpoint(straight["path"]), read_checkpoint(path)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for pid, st in a["optimizer"]["state"].items():
        assert torch.equal(st["momentum_buffer"], b["optimizer"]["state"][pid]["momentum_buffer"])
    # the weights did move during epoch 2: the comparison is not vacuous
    first = [k for k in a["model"] if k.endswith("original")][0]
    assert not torch.equal(a["model"][first], Q.prepare_qat(setup["model"], mixed_config(setup["space"]),
                                                            setup["act"], TARGET).state_dict()[first])


def test_finished_matching_checkpoint_is_reused_and_stale_one_is_not(setup, straight, tmp_path, capsys):
    """--resume reuses a finished fine-tune with the same key; another key (other base checkpoint, configuration
    or recipe) starts afresh and says so; without --resume it always starts afresh."""
    path = tmp_path / "qat_mixed.pt"
    path.write_bytes(straight["path"].read_bytes())
    _, run = run_finetune(setup, path, resume=True)
    assert run["status"] == "reused" and run["history"] == read_checkpoint(straight["path"])["history"]
    _, run = run_finetune(setup, path, resume=True, key={"config": "other"}, epochs=1)
    assert run["status"] == "trained" and "starting afresh" in capsys.readouterr().out
    assert read_checkpoint(path)["key"] == {"config": "other"}
    _, run = run_finetune(setup, path, resume=False, key={"config": "other"}, epochs=1)
    assert run["status"] == "trained"
