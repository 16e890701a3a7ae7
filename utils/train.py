"""Device-resident training and evaluation: the whole data set lives on the device as uint8,
batches are gathered, cropped and flipped there, so no per-batch host work is done."""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from quant.stats import top1_credit
from utils import distributed as dist
from utils.errors import UserError

PAD = 4  # random-crop padding, as in He et al. 2015


class Normalizer:
    """uint8 NHWC -> normalized float NCHW (channels_last memory, free from NHWC)."""

    def __init__(self, mean, std, device):
        self.scale = (1.0 / (255.0 * torch.tensor(std, dtype=torch.float32, device=device))).view(1, -1, 1, 1)
        self.shift = (-torch.tensor(mean, dtype=torch.float32, device=device) /
                      torch.tensor(std, dtype=torch.float32, device=device)).view(1, -1, 1, 1)

    def __call__(self, x_u8):
        return x_u8.permute(0, 3, 1, 2).float() * self.scale + self.shift


def to_device_uint8(x: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).to(device)


class WarmupCosine:
    """Per-step LR factor: linear warm-up, then cosine to zero. A plain object, so LambdaLR's
    state_dict saves it and a resumed run continues the same curve."""

    def __init__(self, total_steps: int, warmup_steps: int = 0):
        self.total_steps, self.warmup_steps = total_steps, warmup_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        t = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def param_groups(model: torch.nn.Module, weight_decay: float, decay_norm_and_bias: bool = False) -> list[dict]:
    """SGD parameter groups: weight decay on conv/linear weights only, not on normalization
    layers or biases (torchvision references' --norm-weight-decay 0 --bias-weight-decay 0),
    unless `decay_norm_and_bias` (the recipe before checkpoint version 2: one group, decay on all)."""
    if decay_norm_and_bias:
        return [{"params": list(model.parameters()), "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for m in model.modules():
        for name, p in m.named_parameters(recurse=False):
            norm = isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm, torch.nn.LayerNorm))
            (no_decay if norm or name == "bias" else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def epoch_plan(n: int, seed: int, epoch: int):
    """Order, crop offsets and flips of one epoch, from (seed, epoch) alone: a resumed run
    draws exactly what the uninterrupted one drew, on any device."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    offsets = torch.randint(0, 2 * PAD + 1, (n, 2), generator=g)
    flips = torch.randint(0, 2, (n,), generator=g, dtype=torch.bool)
    return perm, offsets, flips


def augmented_batch(padded: torch.Tensor, idx, offsets, flips) -> torch.Tensor:
    """Random crop + horizontal flip as one gather on the padded uint8 NHWC tensor."""
    size = padded.shape[1] - 2 * PAD
    ar = torch.arange(size, device=padded.device)
    rows = offsets[:, 0:1] + ar                                          # (B, H)
    cols = offsets[:, 1:2] + torch.where(flips[:, None], size - 1 - ar, ar)  # (B, W)
    return padded[idx[:, None, None], rows[:, :, None], cols[:, None, :]]


def _train_step(model, optimizer, padded, labels, normalize, idx, offsets, flips, sums, use_amp,
                autocast_cache=None):
    """One SGD step on the images `idx` of the epoch plan. The loss sum and the correct count are added
    to `sums` (two device tensors), so the step never waits for the device."""
    x = normalize(augmented_batch(padded, idx, offsets, flips))
    y = labels[idx]
    with torch.autocast(padded.device.type, dtype=torch.bfloat16, enabled=use_amp, cache_enabled=autocast_cache):
        out = model(x)
        loss = F.cross_entropy(out, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    loss_sum, correct = sums
    loss_sum += loss.detach() * len(idx)
    correct += (out.argmax(1) == y).sum()


GRAPH_MODES = ("off", "cuda", "compile")
CAPTURE_WARMUP_STEPS = 3   # eager steps before a CUDA graph is captured: cuDNN autotuning, momentum buffers


def check_graph_mode(mode: str, device):
    """--graph `mode` can run on `device`, or a UserError that says what to do instead."""
    if mode not in GRAPH_MODES:
        raise UserError(f"--graph {mode}: the choices are {', '.join(GRAPH_MODES)}.")
    if mode == "cuda" and torch.device(device).type != "cuda":
        raise UserError(f"--graph cuda captures the training step as a CUDA graph, but this run trains on "
                        f"{device}. Run on a GPU, or use --graph compile (torch.compile; on the CPU with the "
                        f"aot_eager backend) or --graph off.")


class GraphStep:
    """The whole training step (augmentation, forward, backward, optimizer update, loss and accuracy
    sums) as one graph, replayed every step: the same computation as the eager step, without its
    hundreds of kernel launches and with no host synchronisation.

    mode "cuda": captured with torch.cuda.graphs into static input buffers, after CAPTURE_WARMUP_STEPS
    eager steps (real steps of the plan, run on a side stream). The optimizer must read its LR from a
    tensor without a host sync: build it with fused=True (SGD) or capturable=True.
    mode "compile": torch.compile of the step, mode="reduce-overhead" (CUDA graphs) on a GPU; with
    `backend` (default aot_eager on the CPU, where it exists to be tested).

    The optimizer's param groups keep their float LRs, so the scheduler, its state and checkpoints are
    those of the eager path: the step reads the LRs from device tensors refilled before every step, so
    the schedule needs no re-capture. Build one GraphStep per run, after loading any resumed state, and
    pass it to every train_one_epoch. Models whose forward the capture cannot follow (data-dependent
    control flow, host syncs) keep the eager step: pass no GraphStep."""

    def __init__(self, model, optimizer, padded, labels, normalize, use_amp: bool, mode: str,
                 backend: str | None = None):
        device = padded.device
        check_graph_mode(mode, device)
        if mode == "off":
            raise ValueError("GraphStep(mode='off'): for the eager step pass no GraphStep to train_one_epoch")
        if mode == "cuda" and not all(g.get("fused") or g.get("capturable") for g in optimizer.param_groups):
            raise ValueError("GraphStep(mode='cuda') needs an optimizer that reads its LR from a tensor inside "
                             "a CUDA graph: build it with fused=True (SGD) or capturable=True.")
        self.model, self.optimizer, self.normalize = model, optimizer, normalize
        self.padded, self.labels = padded, labels
        self.use_amp, self.mode, self.device = bool(use_amp), mode, device
        self.sums = (torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long))
        self.lrs = [torch.tensor(float(g["lr"]), dtype=torch.float32, device=device) for g in optimizer.param_groups]
        self.inputs = None      # static idx, offsets, flips buffers (mode "cuda")
        self.graph, self.calls = None, 0
        self.compiled = None
        if mode == "compile":
            if device.type == "cuda":
                fixed = (padded, labels, getattr(normalize, "scale", None), getattr(normalize, "shift", None),
                         *self.sums, *self.lrs)
                for t in fixed:   # not copied into the CUDA graph's input buffers every step
                    if isinstance(t, torch.Tensor):
                        torch._dynamo.mark_static_address(t)
            backend = backend or ("inductor" if device.type == "cuda" else "aot_eager")
            self.compiled = torch.compile(self._body, backend=backend,
                                          mode="reduce-overhead" if backend == "inductor" else None)

    def _body(self, idx, offsets, flips):
        # autocast's weight cache must be off inside a CUDA graph capture: the same for every mode
        _train_step(self.model, self.optimizer, self.padded, self.labels, self.normalize, idx, offsets, flips,
                    self.sums, self.use_amp, autocast_cache=False)

    @contextlib.contextmanager
    def _tensor_lrs(self):
        """The param groups hold the LR tensors while the step is traced or captured, floats otherwise."""
        floats = [g["lr"] for g in self.optimizer.param_groups]
        for g, t in zip(self.optimizer.param_groups, self.lrs):
            g["lr"] = t
        try:
            yield
        finally:
            for g, f in zip(self.optimizer.param_groups, floats):
                g["lr"] = f

    def check(self, model, optimizer, padded, labels, use_amp):
        mine = (self.model, self.optimizer, self.padded, self.labels)
        if any(a is not b for a, b in zip((model, optimizer, padded, labels), mine)) or bool(use_amp) != self.use_amp:
            raise ValueError("train_one_epoch got another model, optimizer, data or precision than its GraphStep "
                             "was built with; build one GraphStep per run and pass the same objects.")

    def new_epoch(self):
        for t in self.sums:
            t.zero_()
        return self.sums

    def __call__(self, idx, offsets, flips):
        for g, t in zip(self.optimizer.param_groups, self.lrs):
            t.fill_(g["lr"])   # a kernel with the value as argument: no host sync
        self.calls += 1
        if self.mode == "compile":
            if self.device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()
            with self._tensor_lrs():
                self.compiled(idx, offsets, flips)
            return
        if self.inputs is None:
            self.inputs = (idx.clone(), offsets.clone(), flips.clone())
        for static, t in zip(self.inputs, (idx, offsets, flips)):
            static.copy_(t)
        if self.graph is None and self.calls <= CAPTURE_WARMUP_STEPS:
            self._warmup_step()
            return
        if self.graph is None:
            self._capture()
        self.graph.replay()

    def _warmup_step(self):
        side, main = torch.cuda.Stream(self.device), torch.cuda.current_stream(self.device)
        side.wait_stream(main)
        with torch.cuda.stream(side), self._tensor_lrs():
            self._body(*self.inputs)
        main.wait_stream(side)

    def _capture(self):
        self.optimizer.zero_grad(set_to_none=True)   # gradients are then allocated in the graph's memory pool
        graph = torch.cuda.CUDAGraph()
        with self._tensor_lrs(), torch.cuda.graph(graph):
            self._body(*self.inputs)
        self.graph = graph


def train_one_epoch(model, optimizer, scheduler, padded, labels, normalize, batch_size, seed, epoch,
                    use_amp=False, desc="train", log_every=20, graph: GraphStep | None = None):
    """One epoch of the plan for (seed, epoch). Under torchrun `batch_size` is the global batch: rank r
    takes the r-th equal share of every step's images, so any world size walks the same plan.
    With `graph` (a GraphStep built on the same model, optimizer, data and precision) every step is
    one graph replay, and the progress bar shows no running loss (reading it would wait for the device)."""
    model.train()
    device = padded.device
    n = len(labels)
    rank = dist.rank()
    local = dist.local_batch(batch_size)
    perm, offsets, flips = (t.to(device) for t in epoch_plan(n, seed, epoch))
    steps = max(1, n // batch_size)  # drop the ragged last batch: BN dislikes tiny batches
    if graph is None:
        sums = (torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long))

        def step_fn(idx, offs, fl):
            _train_step(model, optimizer, padded, labels, normalize, idx, offs, fl, sums, use_amp)
    else:
        graph.check(model, optimizer, padded, labels, use_amp)
        sums, step_fn = graph.new_epoch(), graph
    loss_sum, correct = sums
    seen = 0
    bar = tqdm(range(steps), desc=desc, leave=False, dynamic_ncols=True, disable=rank > 0)
    for step in bar:
        start = step * batch_size + rank * local
        sl = slice(start, min(n, start + local))
        idx = perm[sl]
        step_fn(idx, offsets[sl], flips[sl])
        scheduler.step()
        seen += len(idx)
        if graph is None and rank == 0 and (step % log_every == 0 or step == steps - 1):  # .item() syncs
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{100 * correct.item() / seen:.1f}",
                            lr=f"{scheduler.get_last_lr()[0]:.4f}")
    totals = dist.all_reduce_sum(torch.stack([loss_sum.double(), correct.double(),
                                              torch.tensor(float(seen), device=device, dtype=torch.float64)]))
    return {"train_loss": float(totals[0] / totals[2]), "train_acc": 100.0 * float(totals[1] / totals[2])}


def load_optimizer_state(optimizer, state: dict):
    """optimizer.load_state_dict, keeping this run's choice of kernels (fused, foreach): the checkpoint
    carries the numbers, the run chooses how to compute them."""
    kernels = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for g, k in zip(optimizer.param_groups, kernels):
        g.update(k)


@torch.inference_mode()
def evaluate(model, x_u8: torch.Tensor, labels: torch.Tensor, normalize, batch_size: int = 1000,
             desc: str | None = None) -> dict:
    """Loss and accuracy (percent) of `model` on device-resident uint8 images, in fp32. Under torchrun
    each rank evaluates an equal share of the images and the sums are all-reduced."""
    was_training = model.training
    model.eval()
    n = len(labels)
    share = -(-n // dist.world_size())
    lo, hi = min(n, dist.rank() * share), min(n, (dist.rank() + 1) * share)
    totals = torch.zeros(2, device=x_u8.device, dtype=torch.float64)   # loss sum, correct
    starts = range(lo, hi, batch_size)
    for s in (tqdm(starts, desc=desc, leave=False) if desc else starts):
        e = min(hi, s + batch_size)
        out = model(normalize(x_u8[s:e]))
        y = labels[s:e]
        totals[0] += F.cross_entropy(out.float(), y, reduction="sum").double()
        totals[1] += top1_credit(out, y).sum()
    model.train(was_training)
    dist.all_reduce_sum(totals)
    c = totals[1].item()          # ties count 1/k (quant.stats.top1_credit)
    c = int(c) if float(c).is_integer() else c
    return {"loss": totals[0].item() / max(n, 1), "acc": 100.0 * c / max(n, 1), "correct": c, "n": n}


@torch.inference_mode()
def correct_credit(model, x_u8: torch.Tensor, labels: torch.Tensor, normalize, batch_size: int = 1000) -> torch.Tensor:
    """Each image's credit (float64, on the CPU: 1 right, 0 wrong, 1/k in a k-way top-1 tie holding the label,
    quant.stats.top1_credit), for paired comparisons."""
    was_training = model.training
    model.eval()
    out = [top1_credit(model(normalize(x_u8[s:s + batch_size])), labels[s:s + batch_size]).cpu()
           for s in range(0, len(labels), batch_size)]
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)
