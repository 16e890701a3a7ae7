"""Quantization-aware fine-tuning (utils/qat.py, on quant.place.quantize_) and stage 4's fine-tuning part
(utils/stages/create_baselines.py): straight-through and LSQ gradients of the one Quantizer, the structure of
the prepared model (BN kept, each conv weight quantized in its folded form), the folded model predicting what
the fine-tuned one predicts, the 3-bit collapse of the folded recipe and its absence in the default one,
distillation's gradient, resume equivalence, stale checkpoints, and stage 4's seeds, selection on validation
images, never-worse fallback and --keep-ends. Small models (ResNet-8) on a few hundred synthetic images.

(The integer export tests that lived here moved to tests/test_export.py with the ONNX export.)"""
import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize

import utils.qat as Q
import utils.stages.create_baselines as CB
from models import build_model
from quant.calibrate import calibrate
from quant.cost import kernel_table
from quant.errors import UserError
from quant.fold import fold_bn
from quant.place import quantize_, slots
from quant.quantizer import Quantizer
from quant.widths import FLOAT_BITS, A, W
from utils.options import BaselineOptions
from utils.checkpoint import read_checkpoint
from utils.data import make_synthetic
from utils.train import PAD, Normalizer, WarmupCosine, correct_credit, evaluate, param_groups, train_one_epoch

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
            "labels": torch.from_numpy(data.train_y), "test_x": torch.from_numpy(data.test_x),
            "test_y": torch.from_numpy(data.test_y)}


def mixed_config(space):
    """Weights and tensors narrowed in different places, some left float; the image and the logits too."""
    layers, tensors = space.layers, space.tensors
    return space.full({(W, layers[0]): 8, (A, tensors[1]): 8, (W, layers[1]): 4, (A, layers[1]): 4,
                       (W, layers[2]): 2, (A, "input"): 8, (A, layers[-1]): 4, (A, tensors[-3]): 4})


def weights_only_config(space):
    """Weights narrowed (3 and 4 bits, the linear layer included), every tensor float."""
    return space.full({(W, n): 3 if i % 2 else 4 for i, n in enumerate(space.layers)})


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


@pytest.mark.parametrize("bn", Q.BN_MODES)
def test_prepared_model(setup, bn):
    """prepare_qat: with BN kept, every narrowed conv that has a BN computes with its quantized folded weight
    (parametrizations BNScale -> Quantizer -> inverse BNScale) and the BN stays; with BN folded, no BN is left.
    Quantized tensors get a trainable quantizer in their Slot. Before any training step the deployable (folded)
    model computes exactly what post-training placement computes, and an all-float configuration exactly the
    folded float model."""
    model, space, act = setup["model"], setup["space"], setup["act"]
    cfg = mixed_config(space)
    qat = Q.prepare_qat(model, cfg, act, TARGET, bn=bn)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in qat.modules()) == (bn == "kept") == Q.bn_kept(qat)
    paired = dict(model.conv_bn_pairs())
    by_slot = slots(qat, TARGET)
    for (kind, n), b in cfg.items():
        if kind == W:
            layer = qat.get_submodule(n)
            assert parametrize.is_parametrized(layer, "weight") == (b != FLOAT_BITS)
            if b != FLOAT_BITS:
                chain = list(layer.parametrizations.weight)
                q = Q.weight_quantizer_of(layer)
                if bn == "kept" and n in paired:
                    assert [type(p) for p in chain] == [Q.BNScale, Quantizer, Q.BNScale] and chain[2].inverse
                    folded_w = chain[0](layer.parametrizations.weight.original)
                else:
                    assert chain == [q]
                    folded_w = layer.parametrizations.weight.original
                assert q.integers(folded_w).abs().max() <= 2 ** (b - 1) - 1 and q.scale.requires_grad
        else:
            q = by_slot[n].quant
            assert (q is not None) == (b != FLOAT_BITS)
            if q is not None:
                assert q.bits == b and q.scale.requires_grad and q.training
    x = NORM(setup["test_x"][:16])
    plain = Q.deployable(Q.prepare_qat(model, space.uniform(FLOAT_BITS, FLOAT_BITS), act, TARGET, bn=bn), TARGET)
    with torch.no_grad():
        assert torch.equal(plain(x), fold_bn(model)(x))
        assert torch.equal(Q.deployable(qat, TARGET)(x), quantize_(fold_bn(model), cfg, act, TARGET)(x))
    with pytest.raises(UserError):
        Q.prepare_qat(model, space.full({(A, "input"): 6}), act, TARGET, bn=bn)     # 6 bits were never calibrated


@pytest.mark.parametrize("bn", Q.BN_MODES)
def test_prepared_model_starts_from_learned_levels(setup, bn):
    """With `levels` (learned rounding), before any step the fine-tuned weights sit on exactly those integer
    levels of the post-training grid, and the deployable model computes what post-training placement with the
    same levels computes (utils.export.placed_model, what stages 2-4 evaluate)."""
    from quant.quantizer import weight_grid, weight_quantizer
    from utils.export import placed_model
    model, space, act = setup["model"], setup["space"], setup["act"]
    cfg = mixed_config(space)
    folded = fold_bn(model)
    gen = torch.Generator().manual_seed(1)
    levels = {}
    for n, b in [(n, b) for (k, n), b in cfg.items() if k == W and b != FLOAT_BITS]:
        w = folded.get_submodule(n).weight
        near = weight_quantizer(w, b).integers(w)
        lo, hi = weight_grid(b)
        levels[n, b] = (near + torch.randint(-1, 2, near.shape, generator=gen)).clamp(lo, hi).to(torch.int32)
    qat = Q.prepare_qat(model, cfg, act, TARGET, bn=bn, levels=levels)
    dep = Q.deployable(qat, TARGET)
    for (n, b), lv in levels.items():
        layer = dep.get_submodule(n)
        q = Q.weight_quantizer_of(layer)
        assert torch.equal(q.integers(layer.weight).to(torch.int32), lv)
    x = NORM(setup["test_x"][:16])
    with torch.no_grad():
        assert torch.equal(dep(x), placed_model(model, cfg, act, TARGET, levels=levels)(x))
        assert not torch.equal(dep(x), Q.deployable(Q.prepare_qat(model, cfg, act, TARGET, bn=bn), TARGET)(x))


def run_finetune(setup, path, epochs=2, resume=False, key=None, interrupt_at=None, monkeypatch=None, cfg=None,
                 freeze=None):
    cfg = cfg or mixed_config(setup["space"])
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
        steps = epochs * (len(setup["labels"]) // 64)
        return qat, Q.finetune(qat, path, key, meta, setup["padded"], setup["labels"], NORM, epochs, 0.001, 64, 0,
                               resume=resume, freeze_bn_step=int(round((Q.DEFAULT_FREEZE_BN if freeze is None
                                                                        else freeze) * steps)))
    finally:
        if monkeypatch is not None:
            monkeypatch.undo()


@pytest.fixture(scope="module")
def straight(setup, tmp_path_factory):
    path = tmp_path_factory.mktemp("qat") / "qat_mixed.pt"
    qat, run = run_finetune(setup, path)
    return {"path": path, "qat": qat, "run": run}


def test_checkpoint_is_weights_only_and_complete(straight):
    """The fine-tuned checkpoint loads with weights_only and carries configuration, scales, key and recipe; its
    model is the folded one (what load_qat rebuilds, and what the export reads), and the BN-kept training state
    rides along for resuming."""
    ck = read_checkpoint(straight["path"])
    assert ck["finished"] and ck["epoch"] == 2 and ck["qat_format"] == Q.QAT_FORMAT and ck["key"] == {"config": "mixed"}
    assert ck["answer"] == "fine-tuned" and "train_model" in ck
    assert any(k.endswith("parametrizations.weight.0.scale") for k in ck["model"])
    assert not any("bn" in k for k in ck["model"]) and any(".bn1." in k for k in ck["train_model"])
    assert "q_input.quant.scale" in ck["model"] and "q_logits.quant.scale" in ck["model"]
    model, _ = Q.load_qat(straight["path"])
    for k, v in straight["run"]["model"].state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert straight["run"]["status"] == "trained" and len(straight["run"]["history"]) == 2


@pytest.mark.parametrize("which", ["mixed", "weights only"])
def test_folded_model_predicts_what_the_fine_tuned_one_predicts(setup, straight, tmp_path, which):
    """BN kept during fine-tuning, folded at the end: the folded model (what the checkpoint holds and deploys)
    gives the fine-tuned model's predictions, with its logits equal to float rounding; also where no tensor
    quantizer rounds the difference away (weights only). The fine-tune did change the model."""
    if which == "mixed":
        qat, run = straight["qat"], straight["run"]
    else:
        qat, run = run_finetune(setup, tmp_path / "w.pt", cfg=weights_only_config(setup["space"]))
    x = NORM(torch.cat([setup["test_x"], setup["padded"][:, PAD:-PAD, PAD:-PAD]]))
    folded, _ = Q.load_qat(straight["path"] if which == "mixed" else tmp_path / "w.pt")
    with torch.no_grad():
        a, b = qat.eval()(x), folded(x)
        before = Q.deployable(Q.prepare_qat(setup["model"], weights_only_config(setup["space"]) if which != "mixed"
                                            else mixed_config(setup["space"]), setup["act"], TARGET), TARGET)(x)
    assert torch.equal(a.argmax(1), b.argmax(1))
    # equal to float rounding; where the logits are quantized (mixed), a rare logit on a rounding boundary may land
    # one step of its grid away
    step = float(folded.q_logits.quant.scale) if which == "mixed" else 0.0
    off = (a - b).abs() > 1e-4
    assert off.float().mean() < 0.01 and (a - b).abs().max() <= step + 1e-4, (a - b).abs().max()
    assert not torch.allclose(b, before)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())


def test_resume_equals_uninterrupted(setup, straight, tmp_path, monkeypatch):
    """Interrupted in epoch 2 and resumed: bit-identical weights, BN statistics, scales and optimizer state."""
    path = tmp_path / "qat_mixed.pt"
    with pytest.raises(KeyboardInterrupt):
        run_finetune(setup, path, interrupt_at=1, monkeypatch=monkeypatch)
    assert read_checkpoint(path)["epoch"] == 1 and not read_checkpoint(path)["finished"]
    qat, run = run_finetune(setup, path, resume=True)
    assert run["status"] == "resumed after epoch 1"
    a, b = read_checkpoint(straight["path"]), read_checkpoint(path)
    for part in ("model", "train_model"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    for pid, st in a["optimizer"]["state"].items():
        assert torch.equal(st["momentum_buffer"], b["optimizer"]["state"][pid]["momentum_buffer"])
    # the weights did move during epoch 2: the comparison is not vacuous
    first = [k for k in a["train_model"] if k.endswith("original")][0]
    assert not torch.equal(a["train_model"][first], Q.prepare_qat(setup["model"], mixed_config(setup["space"]),
                                                                   setup["act"], TARGET).state_dict()[first])


def test_finished_matching_checkpoint_is_reused_and_stale_one_is_not(setup, straight, tmp_path, capsys):
    """--resume reuses a finished fine-tune with the same key; another key (other base checkpoint, configuration
    or recipe) starts afresh and says so; without --resume it always starts afresh."""
    path = tmp_path / "qat_mixed.pt"
    path.write_bytes(straight["path"].read_bytes())
    _, run = run_finetune(setup, path, resume=True)
    assert run["status"] == "reused" and run["history"] == read_checkpoint(straight["path"])["history"]
    assert run["seconds"] == sum(h["seconds"] for h in run["history"]) > 0     # the training it reuses, not 0
    _, run = run_finetune(setup, path, resume=True, key={"config": "other"}, epochs=1)
    assert run["status"] == "trained" and "starting afresh" in capsys.readouterr().out
    assert read_checkpoint(path)["key"] == {"config": "other"}
    _, run = run_finetune(setup, path, resume=False, key={"config": "other"}, epochs=1)
    assert run["status"] == "trained"


def test_bn_statistics_freeze_at_the_given_step(setup, tmp_path):
    """With freeze_bn_step, BN normalizes with batch statistics (and updates its running ones) before that step
    and with its running statistics after it: the running statistics of a fine-tune frozen from step 0 are
    still the float model's, and one frozen half-way has moved."""
    cfg = weights_only_config(setup["space"])
    frozen, _ = run_finetune(setup, tmp_path / "f.pt", epochs=1, cfg=cfg, freeze=0.0)
    half, _ = run_finetune(setup, tmp_path / "h.pt", epochs=1, cfg=cfg, freeze=0.5)
    float_bn = setup["model"].layer1[0].bn1.running_var
    assert torch.equal(frozen.layer1[0].bn1.running_var, float_bn)
    assert not torch.equal(half.layer1[0].bn1.running_var, float_bn)


# ---------------------------------------------------------------- the 3-bit collapse
@pytest.fixture(scope="module")
def quick_model():
    """A ResNet-8 trained for 96 steps (a few seconds) on 1,024 noisy 16x16 synthetic images, about 90% on held-out
    ones; then rescaled without changing its function: each block's first BN output divided by 8 and the next
    conv's weights multiplied by 8 (ReLU commutes with a positive scale). A trained network's folded form carries
    such imbalances (the shipped ResNet-20's block convs have sigma^2 / gamma^2 up to 15); the rescaling gives the
    quick model one, so that the folded recipe meets, in seconds, the conditioning that collapsed it at 3 bits."""
    rng = np.random.default_rng(1)
    data = make_synthetic(n_train=1024, n_test=1000)

    def small(x):
        t = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2).float(), size=(16, 16), mode="area")
        t = t + torch.from_numpy(rng.normal(0, 0.4 * 255, t.shape)).float()
        return t.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    x, test_x = small(data.train_x), small(data.test_x)
    padded = F.pad(x, (0, 0, PAD, PAD, PAD, PAD))
    y, test_y = torch.from_numpy(data.train_y), torch.from_numpy(data.test_y)
    torch.manual_seed(0)
    model = build_model("resnet8", "B")
    opt = torch.optim.SGD(param_groups(model, 5e-4), lr=0.05, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(6 * (1024 // 64)))
    for e in range(6):
        train_one_epoch(model, opt, sched, padded, y, NORM, 64, 0, e)
    model.eval()
    before = evaluate(model, test_x, test_y, NORM)["acc"]
    with torch.no_grad():
        for b in (b for stage in (model.layer1, model.layer2, model.layer3) for b in stage):   # its BasicBlocks
            b.bn1.weight.div_(8)
            b.bn1.bias.div_(8)
            b.conv2.weight.mul_(8)
    return {"model": model, "x": x, "padded": padded, "y": y, "test_x": test_x, "test_y": test_y, "float_acc": before}


def test_three_bit_fine_tune_never_ends_below_post_training(quick_model, tmp_path):
    """The collapse, in seconds: uniform 3-bit weights, 192 steps at the learning rate per step of stage 4's
    recipe. The folded recipe (BN folded first, the recipe before issue 20) falls far below the post-training
    accuracy; the default recipe (BN kept, conv weights quantized in their folded form, BN frozen half-way, folded
    at the end) ends above it."""
    m = quick_model
    model = m["model"]
    assert m["float_acc"] > 80 and evaluate(model, m["test_x"], m["test_y"], NORM)["acc"] == pytest.approx(
        m["float_acc"], abs=0.2)                                       # the rescaling kept the function
    cfg = kernel_table(model, TARGET).space.uniform(3, FLOAT_BITS)
    ptq = evaluate(quantize_(fold_bn(model), cfg, {}, TARGET), m["test_x"], m["test_y"], NORM)["acc"]
    assert ptq < m["float_acc"] - 3                                    # 3 bits did damage it
    acc = {}
    for bn in Q.BN_MODES:
        qat = Q.prepare_qat(model, cfg, {}, TARGET, bn=bn)
        meta = {"name": "w3", "config": [], "model_args": model.model_args, "normalization": {}, "quantization": {},
                "target": TARGET}
        steps = 6 * (len(m["y"]) // 32)
        run = Q.finetune(qat, tmp_path / f"{bn}.pt", {}, meta, m["padded"], m["y"], NORM, 6, 0.004, 32, 0,
                         freeze_bn_step=int(Q.DEFAULT_FREEZE_BN * steps) if bn == "kept" else None)
        acc[bn] = evaluate(run["model"], m["test_x"], m["test_y"], NORM)["acc"]
    assert acc["folded"] < ptq - 20, (ptq, acc)                        # the collapse is reproduced ...
    assert acc[Q.DEFAULT_BN] >= ptq, (ptq, acc)                        # ... and the default recipe is not hit


# ---------------------------------------------------------------- distillation
def test_distillation_gradient_is_that_of_kl_to_the_teacher(setup):
    """Distilled(student, teacher): the forward pass returns the student's logits (the trainer's reported loss
    and accuracy are the student's); the gradient that reaches the student is that of KL(teacher || student),
    whatever loss the trainer puts on the logits; the teacher gets no gradient and stays in eval mode."""
    cfg = weights_only_config(setup["space"])
    x, y = NORM(setup["test_x"][:32]), setup["test_y"][:32]
    teacher = fold_bn(setup["model"])
    a = Q.prepare_qat(setup["model"], cfg, setup["act"], TARGET)
    b = Q.prepare_qat(setup["model"], cfg, setup["act"], TARGET)
    wrapped = Q.Distilled(b, teacher).train()
    out, plain = wrapped(x), a.train()(x)            # one forward each: BN updates its statistics in both alike
    assert torch.equal(out, plain)
    F.cross_entropy(out, y).backward()               # what train_one_epoch computes
    with torch.no_grad():
        t = teacher(x)
    Q.kl_loss(plain, t).backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        if pa.grad is not None:
            assert torch.allclose(pa.grad, pb.grad, rtol=1e-4, atol=1e-7), n
    assert all(p.grad is None for p in teacher.parameters()) and not teacher.training
    assert [n for n, _ in wrapped.named_parameters()] == [f"student.{n}" for n, _ in b.named_parameters()]


# ---------------------------------------------------------------- stage 4: seeds, selection, never worse, ends
def stage4_args(tmp_path, **kw):
    base = dict(qat_epochs=1, qat_configs=None, qat_lr=0.001, qat_batch_size=64, qat_seeds=1, qat_warmup=0.0,
                qat_freeze_bn=Q.DEFAULT_FREEZE_BN, qat_scales="learned", qat_bn=Q.DEFAULT_BN, qat_distill=False,
                keep_ends=None, quick=False, checkpoint_dir=tmp_path, resume=False, eval_batch_size=200,
                qat_start=Q.DEFAULT_QAT_START)
    return BaselineOptions(**{**base, **kw})


@pytest.fixture(scope="module")
def stage4(quick_model, tmp_path_factory):
    """A stage-4 Setup on the quick ResNet-8: its 1,024 training images, and of its 1,000 held-out images 200
    to search on, 200 to confirm on, 200 to select on and 400 to report on."""
    from types import SimpleNamespace

    from utils.split import Part, SearchSplit
    from utils.stages.common import Setup
    m = quick_model
    root = tmp_path_factory.mktemp("stage4")
    torch.save(m["model"].state_dict(), root / "base.pt")
    data = SimpleNamespace(train_x=m["x"].numpy(), train_y=m["y"].numpy())
    table = kernel_table(m["model"], TARGET)
    split = SearchSplit(Part("test-search", "test", np.arange(200)), Part("test-report", "test", np.arange(600, 1000)),
                        np.arange(len(m["y"])), "test halves", Part("test-confirm", "test", np.arange(200, 400)),
                        Part("test-select", "test", np.arange(400, 600)))
    tx, ty = m["test_x"], m["test_y"]
    s = Setup(m["model"], {"model_args": m["model"].model_args, "normalization": {"mean": [0.5] * 3,
                                                                                  "std": [0.25] * 3}},
              root / "base.pt", torch.device("cpu"), NORM, {"seed": 0}, split, tx[:200], ty[:200], tx[600:], ty[600:],
              table, m["x"][:256], data, confirm_x=tx[200:400], confirm_y=ty[200:400], select_x=tx[400:600],
              select_y=ty[400:600])
    s.calibrate([4])
    return s


def ptq_entries(s, candidates):
    """The post-training part of stage 4's entries (what fine_tune adds qat_* fields to)."""
    val = s.evaluator(s.eval_x, s.eval_y, 200, cache_activations=False)
    test = s.evaluator(s.report_x, s.report_y, 200, cache_activations=False)
    return [CB.score(n, cfg, s, val, test, val.float_outcome, test.float_outcome)[0] for n, cfg in candidates], val, test


def test_stage4_seeds_selection_and_never_worse(stage4, tmp_path):
    """Two seeds at a learning rate that wrecks every fine-tune: each entry records its seeds, the mean test
    accuracy with its standard deviation, the validation accuracy, that the selection was made on the select
    images (top level: qat_selected_on), and that the fine-tunes ended below post-training, so the post-training
    weights stay the answer: the checkpoint's model is the post-training one, and the fine-tuned one is kept
    beside it; the paired drop against fp32 averages the seeds per image."""
    s = stage4
    cands = [("fp32", s.space.uniform(FLOAT_BITS, FLOAT_BITS)), ("uniform_w4a4", s.space.uniform(4, 4))]
    configs, val, test = ptq_entries(s, cands)
    args = stage4_args(tmp_path, qat_seeds=2, qat_lr=50.0)
    top = CB.fine_tune(args, s, cands, configs, val.float_outcome, test.float_outcome, s.ranges,
                       {"granularity": "channel", "clip": "mse"})
    assert top["qat_selected_on"] == "select" and top["qat_seeds"] == [0, 1]
    assert top["qat_recipe"]["start"] == "nearest"      # the recipe rounds to nearest: its post-training weights
    assert top["qat_comparisons"] == {}     # no searched configuration among the fine-tuned ones
    assert top["qat_recipe"]["bn"] == Q.DEFAULT_BN and top["qat_recipe"]["lr"] == 50.0
    for e in configs:
        accs = [r["test_acc"] for r in e["qat_runs"]]
        assert e["qat_seeds"] == [0, 1] and [r["seed"] for r in e["qat_runs"]] == [0, 1]
        assert e["qat_test_acc"] == pytest.approx(np.mean(accs)) and e["qat_test_acc_sd"] == pytest.approx(
            np.std(accs, ddof=1))
        assert 0 <= e["qat_val_acc"] <= 100 and len(e["qat_test_acc_ci95"]) == 2
        assert e["qat_below_post_training"] == [True, True] and e["qat_answer"] == "post-training"
        assert e["qat_answer_test_acc"] == e["test_acc"] and e["qat_answer_seed"] is None
        assert e["qat_budget_test"] is None            # the post-training answer passed stage 3's confirm step
        assert all(r["selection_gain"] < 0 and r["selection_gain"] == pytest.approx(
            r["selection_acc"] - e["qat_post_training_selection_acc"]) for r in e["qat_runs"])
        ck = read_checkpoint(e["qat_checkpoint"])
        assert ck["answer"] == "post-training" and "fine_tuned_model" in ck
        model, _ = Q.load_qat(e["qat_checkpoint"])      # the answer: exactly the post-training model
        cfg = dict(cands)[e["name"]]
        with torch.no_grad():
            assert torch.equal(model(NORM(s.report_x)), quantize_(fold_bn(s.model), cfg, s.ranges, TARGET)(
                NORM(s.report_x)))
        assert (tmp_path / f"qat_{e['name']}_seed1.pt").exists()
    w = configs[1]
    assert w["qat_test_drop"] == pytest.approx(configs[0]["qat_test_acc"] - w["qat_test_acc"])
    lo, hi = w["qat_test_drop_ci95"]
    assert lo <= w["qat_test_drop"] <= hi
    assert w["qat_test_drop_vs_float"] == pytest.approx(configs[0]["test_acc"] - w["qat_test_acc"])


def test_stage4_one_seed_answer_is_the_fine_tune_and_passes_the_budget_test(stage4, tmp_path):
    """One seed, the default recipe: selection on the select images; a fine-tune whose paired gain over
    post-training there is not negative is the answer, its checkpoint qat_<name>.pt, and it is tested on the
    confirm images against the fine-tuned fp32: drop + 1.645 x SE <= 1 point, recorded as computed."""
    from quant.stats import paired_drop
    s = stage4
    cands = [("fp32", s.space.uniform(FLOAT_BITS, FLOAT_BITS)), ("uniform_w8", s.space.uniform(8, FLOAT_BITS))]
    configs, val, test = ptq_entries(s, cands)
    top = CB.fine_tune(stage4_args(tmp_path), s, cands, configs, val.float_outcome, test.float_outcome, s.ranges,
                       {"granularity": "channel", "clip": "mse"})
    assert top["qat_selected_on"] == "select" and "select images" in top["qat_selection_rule"]
    sel = s.evaluator(s.select_x, s.select_y, 200, cache_activations=False)
    models = {}
    for e in configs:
        assert e["qat_seeds"] == [0] and e["qat_test_acc_sd"] is None
        assert e["qat_post_training_selection_acc"] == pytest.approx(sel.evaluate(dict(cands)[e["name"]]).accuracy)
        (r,) = e["qat_runs"]
        below = r["selection_acc"] < e["qat_post_training_selection_acc"]
        assert r["below_post_training"] == below and e["qat_answer"] == ("post-training" if below else "fine-tuned")
        assert e["qat_checkpoint"].endswith(f"qat_{e['name']}.pt")
        models[e["name"]] = Q.load_qat(e["qat_checkpoint"])[0]
        if not below:
            assert e["qat_answer_test_acc"] == e["qat_test_acc"] and read_checkpoint(e["qat_checkpoint"])["answer"] \
                == "fine-tuned"
    w8 = configs[1]
    assert configs[0]["qat_budget_test"] is None          # fp32 is the reference, not tested against itself
    if w8["qat_answer"] == "fine-tuned":
        t = w8["qat_budget_test"]
        if configs[0]["qat_answer"] == "fine-tuned":     # the checkpoint's model is the fine-tuned fp32
            pd = paired_drop(correct_credit(models["fp32"], s.confirm_x, s.confirm_y, NORM),
                             correct_credit(models["uniform_w8"], s.confirm_x, s.confirm_y, NORM))
            assert t["drop"] == pytest.approx(pd.drop) and t["se"] == pytest.approx(pd.se)
        assert t["reference"] == "fine-tuned fp32" and t["images"] == 200 and t["budget"] == 1.0
        assert t["passed"] == (t["drop"] + 1.645 * t["se"] <= 1.0)


def test_stage4_reuses_a_fine_tune_made_outside_it(stage4, tmp_path):
    """A fine-tune made with utils.qat.fine_tune_config and the FineTuneRecipe of stage 4's flags (what
    benchmarks/qat_ablation.py does) has stage 4's checkpoint name and key: stage 4 with --resume reuses it
    instead of training again, and reports its weights."""
    from utils.io import sha256_file
    s = stage4
    cands = [("fp32", s.space.uniform(FLOAT_BITS, FLOAT_BITS)), ("uniform_w4a4", s.space.uniform(4, 4))]
    args = stage4_args(tmp_path, resume=True, qat_configs=["uniform_w4a4"])
    ft = Q.FineTuneRecipe(args.qat_epochs, args.qat_lr, args.qat_batch_size, args.qat_warmup, args.qat_freeze_bn,
                          args.qat_scales, args.qat_bn, args.qat_distill, args.qat_start)
    pool = s.split.calibration_pool
    padded = F.pad(torch.from_numpy(s.data.train_x[pool]), (0, 0, PAD, PAD, PAD, PAD))   # as stage 4 pads
    labels = torch.from_numpy(s.data.train_y[pool])
    quant = {"granularity": "channel", "clip": "mse"}
    path = tmp_path / Q.checkpoint_name("uniform_w4a4", 0, s.seed)
    outside = Q.fine_tune_config(s, "uniform_w4a4", cands[1][1], ft, ft.to_json(pool, s.device, s.recipe.ptq), quant,
                                 sha256_file(s.checkpoint), s.seed, path, padded, labels)
    assert outside["status"] == "trained" and path.name == "qat_uniform_w4a4.pt"
    configs, val, test = ptq_entries(s, cands)
    CB.fine_tune(args, s, cands, configs, val.float_outcome, test.float_outcome, s.ranges, quant)
    e = configs[1]
    assert e["qat_status"] == "reused" and e["qat_runs"][0]["test_acc"] == pytest.approx(
        100 * float(correct_credit(outside["model"], s.report_x, s.report_y, NORM).mean()))


def test_stage4_fine_tuning_needs_the_select_part(stage4, tmp_path):
    """Without select images (--select-size 0) fine-tuning refuses to run: no decision falls back to images an
    earlier step selected on."""
    from dataclasses import replace
    s = replace(stage4, select_x=None, select_y=None)
    cands = [("fp32", s.space.uniform(FLOAT_BITS, FLOAT_BITS))]
    configs, val, test = ptq_entries(s, cands)
    with pytest.raises(UserError, match="select"):
        CB.fine_tune(stage4_args(tmp_path), s, cands, configs, val.float_outcome, test.float_outcome, s.ranges, {})


def test_choose_answer():
    """The best fine-tune on the selection images, first seed on ties, unless it is below post-training."""
    runs = [{"seed": 0, "selection_acc": 80.0, "below_post_training": False},
            {"seed": 1, "selection_acc": 82.0, "below_post_training": False},
            {"seed": 2, "selection_acc": 82.0, "below_post_training": False}]
    assert CB.choose_answer(runs) == ("fine-tuned", runs[1])
    low = [{"seed": 0, "selection_acc": 50.0, "below_post_training": True}]
    assert CB.choose_answer(low) == ("post-training", low[0])


def test_keep_ends(stage4):
    """--keep-ends 8: uniform configurations keep the first layer's weights, the image, the last layer's weights
    and the pooled features at 8 bits where narrower (float stays float); fp32 and searched ones are untouched;
    without the flag nothing changes."""
    s = stage4
    ends = CB.end_groups(s.model, TARGET)
    assert ends == [(W, "conv1"), (A, "input"), (W, "linear"), (A, "pool")]
    cands = [("fp32", s.space.uniform(FLOAT_BITS, FLOAT_BITS)), ("uniform_w3", s.space.uniform(3, FLOAT_BITS)),
             ("uniform_w4a4", s.space.uniform(4, 4)), ("greedy", s.space.uniform(2, 4))]
    assert CB.with_ends(cands, s.model, TARGET, None) == cands
    kept = dict(CB.with_ends(cands, s.model, TARGET, 8))
    assert kept["fp32"] == cands[0][1] and kept["greedy"] == cands[3][1]
    w3, w4a4 = kept["uniform_w3"], kept["uniform_w4a4"]
    assert w3[W, "conv1"] == w3[W, "linear"] == 8 and w3[A, "input"] == w3[A, "pool"] == FLOAT_BITS
    assert all(w4a4[g] == 8 for g in ends)
    assert {g: b for g, b in w4a4.items() if g not in ends} == {g: b for g, b in cands[2][1].items() if g not in ends}
    with pytest.raises(UserError):
        CB.check_qat_args(stage4_args(Path("."), keep_ends=9), None)


def test_compared_configs_add_uniform_w3a3_when_three_bits_were_measured(stage4):
    """Stage 4 compares uniform W3A3 (every weight and tensor at 3 bits, logits float) when stage 2 measured 3-bit
    weights and 3-bit tensors, and not otherwise."""
    from quant.recipe import Recipe
    space = stage4.space
    base = ["fp32", "uniform_w8", "uniform_w4", "uniform_w8a8", "uniform_w4a8", "uniform_w4a4"]
    assert [n for n, _ in CB.compared_configs({"joint": True, "bits": [8, 4, 3], "a_bits": [8, 4]}, space, [8, 4])] \
        == base
    got = dict(CB.compared_configs({"joint": True, "bits": [8, 4, 3], "a_bits": [8, 4, 3]}, space, [8, 4]))
    assert list(got) == base + ["uniform_w3a3"]
    w3a3 = got["uniform_w3a3"]
    assert w3a3 == Recipe().uniform(space, 3, 3) and w3a3[A, space.logits] == FLOAT_BITS
    assert {b for g, b in w3a3.items() if g != (A, space.logits)} == {3}


def test_seeds_drop_matches_quant_stats_for_one_seed():
    """One seed each: exactly quant.stats' paired drop and bootstrap interval; several: the drop of the per-image
    means, inside its interval."""
    from quant.stats import bootstrap_drop_interval, paired_drop
    g = torch.Generator().manual_seed(0)
    ref = [torch.rand(500, generator=g) < 0.8 for _ in range(3)]
    cand = [torch.rand(500, generator=g) < 0.7 for _ in range(3)]
    pd = paired_drop(ref[0], cand[0])
    assert CB.seeds_drop(ref[:1], cand[:1]) == (pd.drop, bootstrap_drop_interval(pd))
    drop, (lo, hi) = CB.seeds_drop(ref, cand)
    expect = 100 * (torch.stack(ref).float().mean() - torch.stack(cand).float().mean()).item()
    assert drop == pytest.approx(expect) and lo <= drop <= hi and lo > 0


def test_qat_comparisons_pair_fine_tuned_searched_with_fine_tuned_uniforms():
    """After fine-tuning, each searched configuration is compared with each fine-tuned uniform one (never with
    fp32, never a uniform with another) on the per-image mean over seeds; "dominates" needs the interval above
    zero, equal masks are an accuracy not significantly different, and less AI at significantly more accuracy a
    trade-off."""
    g = torch.Generator().manual_seed(1)
    base = [torch.rand(2000, generator=g) < 0.85 for _ in range(2)]
    worse = [m & (torch.rand(2000, generator=g) < 0.9) for m in base]     # about 8.5 points below
    configs = [{"name": "fp32", "ai": 26.3}, {"name": "uniform_w8a8", "ai": 105.0},
               {"name": "uniform_w4a4", "ai": 209.3}, {"name": "greedy", "ai": 110.0}, {"name": "pareto", "ai": 150.0}]
    masks = {"fp32": base, "uniform_w8a8": worse, "uniform_w4a4": worse, "greedy": base, "pareto": worse}
    out = CB.qat_comparisons(configs, masks)
    assert set(out) == {"greedy", "pareto"}
    rel = {(m, r["vs"]): r for m, rows in out.items() for r in rows}
    assert set(rel) == {(m, u) for m in ("greedy", "pareto") for u in ("uniform_w8a8", "uniform_w4a4")}
    assert rel["greedy", "uniform_w8a8"]["relation"] == CB.DOMINATES
    assert rel["greedy", "uniform_w4a4"]["relation"] == "trade-off"
    assert rel["pareto", "uniform_w8a8"]["relation"] == CB.EQUAL_ACC
    assert rel["pareto", "uniform_w8a8"]["acc_diff_ci95"] == [0.0, 0.0]
    assert rel["pareto", "uniform_w4a4"]["relation"] == "dominated or equal"
    r = rel["greedy", "uniform_w8a8"]
    assert (r["acc_diff"], r["acc_diff_ci95"]) == CB.seeds_drop(base, worse) and r["acc_diff_ci95"][0] > 5
    assert "pareto" not in CB.qat_comparisons(configs, {k: v for k, v in masks.items() if k != "pareto"})
