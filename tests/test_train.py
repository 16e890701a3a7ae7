"""Training (utils/train.py) and stage 1 (utils/baseline.py, 1_train_baseline.py): augmentation
against a naive reference, the seeded epoch plan, the LR schedule, exact resume equivalence, the
files stage 1 writes, and the script end to end."""
import importlib.util
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import utils.stages.train_baseline as B
from models import build_model
from utils.options import TrainOptions
from utils.checkpoint import load_model, read_checkpoint
from utils.data import make_synthetic
from utils.errors import UserError
from utils.io import load_results_json
from utils.train import PAD, Normalizer, WarmupCosine, augmented_batch, epoch_plan, evaluate

REPO = Path(__file__).resolve().parent.parent



def load_stage1():
    spec = importlib.util.spec_from_file_location("stage1_train_baseline", REPO / "1_train_baseline.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def stage1():
    return load_stage1()


@pytest.fixture(scope="module")
def small_data():
    return make_synthetic(n_train=300, n_test=100)


def uint8_images(n, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))


# ---------------------------------------------------------------- augmentation

def reference_augment(x, idx, offsets, flips):
    """Zero-pad by 4, crop 32x32 at (row, col) offset, then mirror left-right: pixel by pixel."""
    x = x.numpy()
    out = np.zeros((len(idx), 32, 32, 3), dtype=np.uint8)
    for b, (i, (oy, ox), f) in enumerate(zip(idx.tolist(), offsets.tolist(), flips.tolist())):
        padded = np.zeros((32 + 2 * PAD, 32 + 2 * PAD, 3), dtype=np.uint8)
        for r in range(32):
            for c in range(32):
                padded[r + PAD, c + PAD] = x[i, r, c]
        crop = np.zeros((32, 32, 3), dtype=np.uint8)
        for r in range(32):
            for c in range(32):
                crop[r, c] = padded[oy + r, ox + c]
        if f:
            mirrored = np.zeros_like(crop)
            for c in range(32):
                mirrored[:, c] = crop[:, 31 - c]
            crop = mirrored
        out[b] = crop
    return out


def pad_nhwc(x):
    return F.pad(x, (0, 0, PAD, PAD, PAD, PAD))


def test_augmented_batch_matches_reference_edges():
    """Extreme offsets (0 and 8 on either axis), both flips, repeated and unordered indices."""
    x = uint8_images(5)
    idx = torch.tensor([3, 0, 3, 4, 1, 2])
    offsets = torch.tensor([[0, 0], [8, 8], [0, 8], [8, 0], [2, 7], [4, 4]])
    flips = torch.tensor([True, False, False, True, True, False])
    out = augmented_batch(pad_nhwc(x), idx, offsets, flips)
    assert out.dtype == torch.uint8 and out.shape == (6, 32, 32, 3)
    np.testing.assert_array_equal(out.numpy(), reference_augment(x, idx, offsets, flips))
    assert torch.equal(out[5], x[2])                    # centre crop, no flip: the image itself
    assert (out[0, :, -4:] == 0).all() and (out[1, -4:] == 0).all()  # padding is zeros


def test_augmented_batch_matches_reference_epoch_plan():
    """A batch drawn by epoch_plan equals the naive pad + crop + flip of the same images."""
    x = uint8_images(8, seed=1)
    perm, offsets, flips = epoch_plan(8, seed=5, epoch=2)
    out = augmented_batch(pad_nhwc(x), perm, offsets, flips)
    np.testing.assert_array_equal(out.numpy(), reference_augment(x, perm, offsets, flips))


# ---------------------------------------------------------------- epoch plan, schedule

def test_epoch_plan_deterministic():
    """The plan depends on (seed, epoch) alone: equal when both match, different otherwise; the
    order is a permutation, offsets cover 0..2*PAD, flips are balanced-ish booleans."""
    a, b = epoch_plan(1000, 3, 7), epoch_plan(1000, 3, 7)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert not torch.equal(a[0], epoch_plan(1000, 3, 8)[0])
    assert not torch.equal(a[0], epoch_plan(1000, 4, 7)[0])
    perm, offsets, flips = a
    assert torch.equal(torch.sort(perm).values, torch.arange(1000))
    assert offsets.shape == (1000, 2) and offsets.min() == 0 and offsets.max() == 2 * PAD
    assert flips.dtype == torch.bool and 400 < int(flips.sum()) < 600
    torch.manual_seed(0)
    x = epoch_plan(50, 1, 1)
    torch.manual_seed(123)  # the global RNG plays no part
    assert all(torch.equal(u, v) for u, v in zip(x, epoch_plan(50, 1, 1)))


def test_warmup_cosine_without_warmup():
    f = WarmupCosine(total_steps=100)
    assert f(0) == 1.0
    assert f(50) == pytest.approx(0.5)
    assert f(100) == pytest.approx(0.0, abs=1e-12) and f(150) == pytest.approx(0.0, abs=1e-12)
    vals = [f(s) for s in range(101)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_warmup_cosine_with_warmup():
    """Linear ramp to 1 over the warm-up steps, then the cosine from 1 to 0 over the rest."""
    f = WarmupCosine(total_steps=100, warmup_steps=10)
    assert f(0) == pytest.approx(0.1) and f(4) == pytest.approx(0.5) and f(9) == pytest.approx(1.0)
    assert f(10) == 1.0
    assert f(55) == pytest.approx(0.5)
    assert f(100) == pytest.approx(0.0, abs=1e-12)
    ramp = [f(s) for s in range(10)]
    assert all(a < b for a, b in zip(ramp, ramp[1:]))


def test_warmup_cosine_survives_scheduler_state_dict():
    """LambdaLR saves the schedule object's state, so a loaded scheduler continues the same curve."""
    def make():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.2)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(20, 3))
    opt, s = make()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2 / 3)
    for _ in range(7):
        opt.step()
        s.step()
    state = s.state_dict()
    assert state["lr_lambdas"][0] == {"total_steps": 20, "warmup_steps": 3}
    opt2, s2 = make()
    s2.load_state_dict(state)
    opt2.load_state_dict(opt.state_dict())
    for _ in range(5):
        for o, sch in ((opt, s), (opt2, s2)):
            o.step()
            sch.step()
        assert s.get_last_lr() == s2.get_last_lr()
    assert s.get_last_lr()[0] == pytest.approx(0.2 * WarmupCosine(20, 3)(12))


def test_normalizer_matches_definition():
    x = uint8_images(3, seed=2)
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    out = Normalizer(mean, std, "cpu")(x)
    ref = (x.permute(0, 3, 1, 2).double() / 255 - torch.tensor(mean).double().view(1, 3, 1, 1)) \
        / torch.tensor(std).double().view(1, 3, 1, 1)
    assert out.shape == (3, 3, 32, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


def test_evaluate_batch_independent():
    """Accuracy is argmax agreement over all images whatever the batch size; mode is restored."""
    torch.manual_seed(0)
    model = build_model("resnet8", "A").train()
    x = uint8_images(23, seed=3)
    y = torch.randint(0, 10, (23,))
    norm = Normalizer([0.5] * 3, [0.25] * 3, "cpu")
    a = evaluate(model, x, y, norm, batch_size=1000)
    b = evaluate(model, x, y, norm, batch_size=7)
    assert model.training
    model.eval()
    with torch.no_grad():
        logits = model(norm(x))
    correct = int((logits.argmax(1) == y).sum())
    assert a["correct"] == b["correct"] == correct and a["n"] == 23
    assert a["acc"] == pytest.approx(100 * correct / 23)
    assert a["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)


# ---------------------------------------------------------------- stage 1 in process

def stage1_args(stage1, root, *extra):
    return TrainOptions.from_args(stage1.get_args_parser().parse_args([
        "--dataset", "synthetic", "--depth", "8", "--shortcut", "B", "--epochs", "2", "--val-size", "50",
        "--batch-size", "50", "--results-dir", str(root / "results"),
        "--checkpoint-dir", str(root / "ckpt"), "--device", "cpu", "--seed", "1", *extra]))


@pytest.fixture(scope="module")
def resume_runs(stage1, small_data, tmp_path_factory):
    """Run A: 2 epochs straight. Run B: interrupted during epoch 2, then --resume."""
    mp = pytest.MonkeyPatch()
    mp.setattr(B, "load_dataset", lambda name, data_dir=None, **k: small_data)
    root_a, root_b = tmp_path_factory.mktemp("run_a"), tmp_path_factory.mktemp("run_b")
    out = {"root_a": root_a, "root_b": root_b}
    try:
        args_a = stage1_args(stage1, root_a)
        given_a = dict(vars(args_a))
        out["results_a"] = B.train_baseline(args_a)
        out["caller_args_kept"] = [vars(args_a) == given_a]

        real = B.train_one_epoch
        epochs_seen = []

        def interrupting(*a, **k):
            epoch = inspect.signature(real).bind(*a, **k).arguments["epoch"]
            epochs_seen.append(epoch)
            if epoch == 1:
                raise KeyboardInterrupt
            return real(*a, **k)
        mp.setattr(B, "train_one_epoch", interrupting)
        with pytest.raises(SystemExit) as e:
            B.train_baseline(stage1_args(stage1, root_b))
        out["exit_code"] = e.value.code
        out["epochs_seen"] = list(epochs_seen)
        out["interrupted_ckpt"] = read_checkpoint(root_b / "ckpt" / "resnet8_baseline.pt")
        out["results_after_interrupt"] = (root_b / "results" / "01_baseline.json").exists()
        with pytest.raises(UserError, match="--resume"):
            load_model(root_b / "ckpt" / "resnet8_baseline.pt", require_finished=True)

        mp.setattr(B, "train_one_epoch", real)
        # Training flags on the command line are ignored on resume: the checkpoint's win.
        args_b = stage1_args(stage1, root_b, "--resume", "--lr", "0.5", "--epochs", "5")
        given_b = dict(vars(args_b))
        out["results_b"] = B.train_baseline(args_b)
        out["caller_args_kept"].append(vars(args_b) == given_b)
    finally:
        mp.undo()
    return out


def test_interrupt_leaves_resumable_checkpoint(resume_runs):
    """Ctrl-C during epoch 2 exits with 130, keeps a checkpoint of epoch 1 (unfinished, with
    optimizer and scheduler state) and writes no results file."""
    assert resume_runs["exit_code"] == 130
    assert resume_runs["epochs_seen"] == [0, 1]
    ck = resume_runs["interrupted_ckpt"]
    assert ck["epoch"] == 1 and ck["finished"] is False and len(ck["history"]) == 1
    assert "optimizer" in ck and "scheduler" in ck
    assert not resume_runs["results_after_interrupt"]


def test_resume_equals_uninterrupted(resume_runs):
    """Interrupt + --resume ends with bit-identical weights, optimizer state, history losses and
    accuracies to the uninterrupted run."""
    ca = read_checkpoint(resume_runs["root_a"] / "ckpt" / "resnet8_baseline.pt")
    cb = read_checkpoint(resume_runs["root_b"] / "ckpt" / "resnet8_baseline.pt")
    assert ca["epoch"] == cb["epoch"] == 2 and ca["finished"] and cb["finished"]
    assert set(ca["model"]) == set(cb["model"])
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    for pid, st in ca["optimizer"]["state"].items():
        assert torch.equal(st["momentum_buffer"], cb["optimizer"]["state"][pid]["momentum_buffer"])
    ra, rb = resume_runs["results_a"], resume_runs["results_b"]
    ja = json.loads((resume_runs["root_a"] / "results" / "01_baseline.json").read_text())
    jb = json.loads((resume_runs["root_b"] / "results" / "01_baseline.json").read_text())
    assert ja["test_acc"] == jb["test_acc"] == ra["test_acc"] == rb["test_acc"]
    assert ja["val_acc"] == jb["val_acc"] and ja["test_loss"] == jb["test_loss"]
    assert ja["epochs"] == jb["epochs"] == 2 and ja["lr"] == jb["lr"]  # --lr/--epochs on resume ignored
    for ha, hb in zip(ja["history"], jb["history"]):
        for k in ("epoch", "train_loss", "train_acc", "lr", "val_loss", "val_acc"):
            assert ha[k] == hb[k], k
    # training did something: epoch 1 weights differ from the final ones
    w1 = resume_runs["interrupted_ckpt"]["model"]["linear.weight"]
    assert not torch.equal(w1, ca["model"]["linear.weight"])


def test_caller_namespace_is_not_mutated(resume_runs):
    """train_baseline works on a copy of its arguments, resumed or not: the caller's Namespace keeps what
    it was given (the run itself used the checkpoint's settings, as test_resume_equals_uninterrupted shows)."""
    assert resume_runs["caller_args_kept"] == [True, True]


def test_graph_compile_matches_eager_stage1(stage1, resume_runs, small_data, tmp_path, monkeypatch):
    """Stage 1 with --graph compile (aot_eager on the CPU) trains the same model as the eager run A within
    float rounding, and records the flag in the checkpoint and the results' provenance."""
    monkeypatch.setattr(B, "load_dataset", lambda name, data_dir=None, **k: small_data)
    res = B.train_baseline(stage1_args(stage1, tmp_path, "--graph", "compile"))
    ca = read_checkpoint(resume_runs["root_a"] / "ckpt" / "resnet8_baseline.pt")
    cg = read_checkpoint(tmp_path / "ckpt" / "resnet8_baseline.pt")
    for k in ca["model"]:   # fused kernels round differently; 10 SGD steps drift ~1e-5 on AVX-512 CPUs
        torch.testing.assert_close(cg["model"][k], ca["model"][k], rtol=1e-4, atol=5e-5, msg=k)
    for ha, hg in zip(resume_runs["results_a"]["history"], res["history"]):
        assert hg["train_loss"] == pytest.approx(ha["train_loss"], rel=1e-5) and hg["lr"] == ha["lr"]
    assert cg["args"]["graph"] == "compile" and res["provenance"]["args"]["graph"] == "compile"
    assert ca["args"]["graph"] == "off"
    assert all(isinstance(g["lr"], float) for g in cg["optimizer"]["param_groups"])


def test_results_json_contents(resume_runs, small_data):
    """01_baseline.json has what stages 2-5 and a reader need; it passes the stage-1 loader."""
    path = resume_runs["root_a"] / "results" / "01_baseline.json"
    r = load_results_json(path, "1", "1_train_baseline.py")
    for k in ("test_acc", "val_acc", "epochs", "seconds_per_epoch", "train_seconds", "dataset",
              "provenance", "history", "model_args", "params", "normalization", "checkpoint"):
        assert k in r, k
    assert 0 <= r["test_acc"] <= 100 and 0 <= r["val_acc"] <= 100
    assert r["epochs"] == 2 and r["train_seconds"] > 0
    assert r["seconds_per_epoch"] == pytest.approx(r["train_seconds"] / 2)
    assert r["dataset"]["name"] == "synthetic" and r["dataset"]["source"] == small_data.source
    assert r["dataset"]["val_split_images"] == 50 and r["dataset"]["train_split_images"] == 250
    assert r["dataset"]["test_images_used"] == 100 and r["dataset"]["search_split"] == "val"
    prov = r["provenance"]
    for k in ("args", "git_commit", "torch_version", "device"):
        assert k in prov, k
    assert prov["args"]["depth"] == 8 and prov["args"]["seed"] == 1
    assert prov["torch_version"] == torch.__version__ and prov["device"].startswith("cpu")
    assert [h["epoch"] for h in r["history"]] == [1, 2]
    for h in r["history"]:
        assert np.isfinite(h["train_loss"]) and 0 <= h["train_acc"] <= 100
    assert r["model_args"] == {"arch": "resnet8", "shortcut": "B", "num_classes": 10}
    split = r["dataset"]["split"]
    assert split["seed"] == 1 and split["val_size"] == 50 and len(split["val_sha256"]) == 64
    assert "val_indices" not in split and len(split["val_indices_sha256"]) == 64


def test_checkpoint_contents_and_reload(resume_runs, small_data):
    """The final checkpoint carries model, optimizer, scheduler, epoch, args, model_args and
    normalization, and the model rebuilt from it alone reproduces the reported test accuracy."""
    path = resume_runs["root_a"] / "ckpt" / "resnet8_baseline.pt"
    ck = read_checkpoint(path)
    for k in ("model", "optimizer", "scheduler", "epoch", "args", "model_args", "normalization"):
        assert k in ck, k
    assert "rng" not in ck   # the epoch plan draws everything from (seed, epoch): nothing to restore
    assert ck["args"]["dataset"] == "synthetic" and ck["data"]["seed"] == 1 and ck["data"]["val_size"] == 50
    # the split's identity: indices and a hash of the validation images' content
    from utils.split import split_identity, train_val_split
    _, val_idx, _ = train_val_split(small_data, 1, 50)
    assert ck["data"]["split"] == split_identity(small_data, 1, 50, val_idx)
    assert len(ck["optimizer"]["param_groups"]) == 2    # decay / no decay
    model, meta = load_model(path)
    assert meta["foreign"] is False and meta["finished"] is True
    assert meta["model_args"]["arch"] == "resnet8"
    norm = Normalizer(meta["normalization"]["mean"], meta["normalization"]["std"], "cpu")
    res = evaluate(model, torch.from_numpy(small_data.test_x), torch.from_numpy(small_data.test_y), norm)
    assert res["acc"] == resume_runs["results_a"]["test_acc"]


def test_param_groups_exclude_norm_and_bias():
    """Weight decay on conv/linear weights only by default; BN parameters and biases get none. The
    legacy recipe (decay on all) is one group, as checkpoints before version 2 saved it."""
    from utils.train import param_groups
    m = build_model("resnet8", "B")
    decay, no_decay = param_groups(m, 5e-4)
    names = {id(p): n for n, p in m.named_parameters()}
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in decay["params"]} == {n for n, p in m.named_parameters()
                                                       if n.endswith("weight") and p.dim() > 1}
    assert {names[id(p)] for p in no_decay["params"]} == {n for n, p in m.named_parameters()
                                                          if "bn" in n or n.endswith("bias") or "shortcut.1" in n}
    (legacy,) = param_groups(m, 5e-4, decay_norm_and_bias=True)
    assert len(legacy["params"]) == len(list(m.parameters()))


def interrupted_after_one_epoch(stage1, small_data, tmp_path, monkeypatch, *extra):
    """Stage 1 for 2 epochs, stopped by Ctrl-C in epoch 2 (epochs themselves stubbed: no training
    needed here); returns the unfinished checkpoint's path."""
    monkeypatch.setattr(B, "load_dataset", lambda name, data_dir=None, **k: small_data)

    def epoch(*a, **k):
        if inspect.signature(B.train_one_epoch).bind(*a, **k).arguments["epoch"] == 1:
            raise KeyboardInterrupt
        return {"train_loss": 1.0, "train_acc": 50.0}
    real = B.train_one_epoch
    monkeypatch.setattr(B, "train_one_epoch", epoch)
    monkeypatch.setattr(epoch, "__signature__", inspect.signature(real), raising=False)
    with pytest.raises(SystemExit):
        B.train_baseline(stage1_args(stage1, tmp_path, "--eval-every", "0", *extra))
    monkeypatch.setattr(B, "train_one_epoch", lambda *a, **k: {"train_loss": 1.0, "train_acc": 50.0})
    return tmp_path / "ckpt" / "resnet8_baseline.pt"


def test_old_checkpoint_resumes_with_its_own_recipe(stage1, small_data, tmp_path, monkeypatch):
    """A checkpoint from before version 2 (one parameter group, legacy model_args, no split identity,
    no decay flag) resumes without a traceback: it keeps decaying every parameter, as it was trained,
    and records the split identity from then on."""
    path = interrupted_after_one_epoch(stage1, small_data, tmp_path, monkeypatch, "--decay-norm-and-bias")
    ck = read_checkpoint(path)
    assert len(ck["optimizer"]["param_groups"]) == 1 and ck["epoch"] == 1
    old = dict(ck, model_args={"arch": "resnet", "depth": 8, "shortcut": "B", "num_classes": 10},
               args={k: v for k, v in ck["args"].items() if k not in ("decay_norm_and_bias", "arch")},
               data={k: v for k, v in ck["data"].items() if k != "split"}, checkpoint_version=1)
    torch.save(old, path)
    res = B.train_baseline(stage1_args(stage1, tmp_path, "--resume"))
    ck = read_checkpoint(path)
    assert ck["finished"] and ck["args"]["decay_norm_and_bias"] is True and "split" in ck["data"]
    assert len(ck["optimizer"]["param_groups"]) == 1 and res["epochs"] == 2
    assert ck["model_args"] == {"arch": "resnet8", "shortcut": "B", "num_classes": 10}


def test_interrupt_with_graph_says_how_to_resume_with_it(stage1, small_data, tmp_path, monkeypatch, capsys):
    """--graph is not restored from the checkpoint (it does not shape the weights), so the resume command
    printed on Ctrl-C repeats it."""
    interrupted_after_one_epoch(stage1, small_data, tmp_path, monkeypatch, "--graph", "compile")
    hint = capsys.readouterr().err.split("Resume with:")[1]
    assert "--resume" in hint and "--graph compile" in hint


def test_checkpoint_that_cannot_resume_is_a_user_error(stage1, small_data, tmp_path, monkeypatch):
    """An optimizer state that does not fit the run (two groups saved, but the recipe asks for one) is
    refused in one paragraph, not a traceback."""
    path = interrupted_after_one_epoch(stage1, small_data, tmp_path, monkeypatch)
    ck = read_checkpoint(path)
    ck["args"]["decay_norm_and_bias"] = True
    torch.save(ck, path)
    with pytest.raises(UserError, match="cannot be resumed"):
        B.train_baseline(stage1_args(stage1, tmp_path, "--resume"))


def test_bad_flags_are_user_errors(stage1, tmp_path):
    for extra in (["--batch-size", "0"], ["--momentum", "1.0"], ["--epochs", "-1"], ["--val-size", "-5"],
                  ["--depth", "9"], ["--arch", "resnet56", "--depth", "20"], ["--graph", "cuda"],
                  ["--graph", "compile", "--compile"]):
        with pytest.raises(UserError):
            B.train_baseline(stage1_args(stage1, tmp_path, *extra))
    with pytest.raises(UserError, match="does not exist"):
        B.train_baseline(stage1_args(stage1, tmp_path, "--resume"))
    assert not (tmp_path / "results").exists()


# ---------------------------------------------------------------- the script, end to end

def test_stage1_script_quick_end_to_end(tmp_path):
    """`1_train_baseline.py --quick --dataset synthetic` exits 0 and writes a finished checkpoint
    and a results JSON that the later stages accept."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "1_train_baseline.py", "--quick", "--dataset", "synthetic",
                        "--results-dir", str(tmp_path), "--checkpoint-dir", str(tmp_path), "--device", "cpu"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r = load_results_json(tmp_path / "01_baseline.json", "1", "1_train_baseline.py")
    assert r["epochs"] == 1 and r["batch_size"] == 32 and r["dataset"]["quick"] is True
    assert r["dataset"]["name"] == "synthetic" and r["dataset"]["train_split_images"] == 2000
    assert r["params"] == 272_474 and len(r["history"]) == 1
    model, meta = load_model(tmp_path / "resnet20_baseline.pt")
    assert meta["finished"] and meta["model_args"]["arch"] == "resnet20"
    assert r["test_acc"] > 20  # the synthetic set is learnable: far above 10% chance after one epoch
