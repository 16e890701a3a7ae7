"""The training step as one graph (utils.train.GraphStep) on the CPU: torch.compile with the aot_eager
backend gives the same losses, weights, optimizer and scheduler state as the eager step, its LR schedule
needs no recompilation, and a run resumed from saved state continues exactly. (The CUDA-graph capture,
--graph cuda, needs a GPU: benchmarks/gpu_suite.py measures it.)"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.errors import UserError
from utils.train import (PAD, GraphStep, Normalizer, WarmupCosine, check_graph_mode, load_optimizer_state,
                         param_groups, train_one_epoch)

N, BATCH, EPOCHS = 96, 16, 2   # 6 steps per epoch


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (N, 32, 32, 3), dtype=torch.uint8, generator=g)
    return {"padded": F.pad(x, (0, 0, PAD, PAD, PAD, PAD)), "labels": torch.randint(0, 10, (N,), generator=g),
            "normalize": Normalizer([0.5] * 3, [0.25] * 3, "cpu")}


def make_run(state=None):
    """Model, SGD (two groups, Nesterov, decay) and a warm-up + cosine schedule, so the LR changes every step."""
    model = small_net()
    opt = torch.optim.SGD(param_groups(model, 5e-4), lr=0.1, momentum=0.9, nesterov=True)
    steps = N // BATCH
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(EPOCHS * steps, steps))
    if state is not None:
        model.load_state_dict(state["model"])
        load_optimizer_state(opt, state["optimizer"])
        sched.load_state_dict(state["scheduler"])
    return model, opt, sched


def train(data, epochs, graph_mode, state=None):
    """Train `epochs` (after `state`, if given); returns per-epoch stats and the final state."""
    model, opt, sched = make_run(state)
    d = data
    step = GraphStep(model, opt, d["padded"], d["labels"], d["normalize"], False, graph_mode) if graph_mode else None
    start = state["epoch"] if state else 0
    stats = []
    for epoch in range(start, start + epochs):
        # past the first epoch (first optimizer step, then the steps with momentum buffers), the compiled
        # step must not recompile: the LR changes every step, and is read from a tensor
        with torch._dynamo.config.patch(error_on_recompile=epoch > 0 and step is not None and state is None):
            stats.append(train_one_epoch(model, opt, sched, d["padded"], d["labels"], d["normalize"], BATCH, 3,
                                         epoch, graph=step))
    assert all(isinstance(g["lr"], float) for g in opt.param_groups)   # checkpoints as before
    return stats, {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(opt.state_dict()),
                   "scheduler": copy.deepcopy(sched.state_dict()), "epoch": start + epochs, "lr": sched.get_last_lr()}


@pytest.fixture(scope="module")
def runs(data):
    torch._dynamo.reset()
    eager = train(data, EPOCHS, None)
    graph = train(data, EPOCHS, "compile")
    _, half = train(data, 1, "compile")
    resumed = train(data, EPOCHS - 1, "compile", state=half)
    return {"eager": eager, "graph": graph, "half": half, "resumed": resumed}


def assert_states_close(a, b, exact=False):
    for k in a["model"]:
        if exact:
            assert torch.equal(a["model"][k], b["model"][k]), k
        else:
            torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-5, atol=1e-6, msg=k)
    bufs = [(s["momentum_buffer"], b["optimizer"]["state"][i]["momentum_buffer"])
            for i, s in a["optimizer"]["state"].items()]
    assert len(bufs) == len(a["model"]) - 3   # every parameter has one (BN's 3 buffers are no parameters)
    for u, v in bufs:
        assert torch.equal(u, v) if exact else torch.allclose(u, v, rtol=1e-5, atol=1e-6)
    assert a["scheduler"] == b["scheduler"] and a["lr"] == b["lr"]


def test_compiled_step_matches_eager(runs):
    """Same losses and accuracies per epoch, same weights, BN statistics, momentum buffers and schedule,
    within float rounding; training moved the weights."""
    (se, ae), (sg, ag) = runs["eager"], runs["graph"]
    for a, b in zip(se, sg):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert b["train_acc"] == pytest.approx(a["train_acc"], abs=1e-9)
    assert_states_close(ae, ag)
    assert not torch.equal(ae["model"]["5.weight"], small_net().state_dict()["5.weight"])


def test_compiled_resume_is_exact(runs):
    """One epoch, saved, loaded into a fresh model, optimizer, scheduler and GraphStep, then one more: the
    weights, optimizer and schedule of two straight epochs, bit for bit."""
    (sg, ag), (sr, ar) = runs["graph"], runs["resumed"]
    assert sr == sg[1:]
    assert_states_close(ag, ar, exact=True)


def test_graph_step_misuse(data):
    """--graph cuda on the CPU and an unknown mode are UserErrors that name the way out; a GraphStep
    for mode off, a non-fused optimizer for a CUDA graph, or another optimizer than the step's are
    programming errors."""
    with pytest.raises(UserError, match="--graph compile"):
        check_graph_mode("cuda", "cpu")
    with pytest.raises(UserError, match="off, cuda, compile"):
        check_graph_mode("always", "cpu")
    model, opt, sched = make_run()
    d = data
    with pytest.raises(UserError, match="CUDA graph"):
        GraphStep(model, opt, d["padded"], d["labels"], d["normalize"], False, "cuda")
    with pytest.raises(ValueError, match="no GraphStep"):
        GraphStep(model, opt, d["padded"], d["labels"], d["normalize"], False, "off")
    step = GraphStep(model, opt, d["padded"], d["labels"], d["normalize"], False, "compile")
    _, other, _ = make_run()
    with pytest.raises(ValueError, match="one GraphStep per run"):
        train_one_epoch(model, other, sched, d["padded"], d["labels"], d["normalize"], BATCH, 0, 0, graph=step)
    with pytest.raises(ValueError, match="one GraphStep per run"):
        train_one_epoch(model, opt, sched, d["padded"], d["labels"], d["normalize"], BATCH, 0, 0, use_amp=True,
                        graph=step)


def test_load_optimizer_state_keeps_this_runs_kernels():
    """A state saved by a fused SGD (--graph cuda) loads into a plain one and the other way round: the
    numbers come from the state, the kernel choice stays the run's."""
    p = nn.Parameter(torch.ones(3))
    fused = torch.optim.SGD([p], lr=0.1, momentum=0.9, fused=True)
    p.grad = torch.ones(3)
    fused.step()
    plain = torch.optim.SGD([nn.Parameter(torch.ones(3))], lr=0.5, momentum=0.9)
    load_optimizer_state(plain, fused.state_dict())
    g = plain.param_groups[0]
    assert g["fused"] is None and g["lr"] == 0.1
    assert torch.equal(plain.state_dict()["state"][0]["momentum_buffer"], torch.ones(3))
    load_optimizer_state(fused, plain.state_dict())
    assert fused.param_groups[0]["fused"] is True
