"""Device-resident training and evaluation: the whole data set lives on the device as uint8,
batches are gathered, cropped and flipped there, so no per-batch host work is done."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from utils import distributed as dist

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


def train_one_epoch(model, optimizer, scheduler, padded, labels, normalize, batch_size, seed, epoch,
                    use_amp=False, desc="train", log_every=20):
    """One epoch of the plan for (seed, epoch). Under torchrun `batch_size` is the global batch: rank r
    takes the r-th equal share of every step's images, so any world size walks the same plan."""
    model.train()
    device = padded.device
    n = len(labels)
    rank = dist.rank()
    local = dist.local_batch(batch_size)
    perm, offsets, flips = (t.to(device) for t in epoch_plan(n, seed, epoch))
    steps = max(1, n // batch_size)  # drop the ragged last batch: BN dislikes tiny batches
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    bar = tqdm(range(steps), desc=desc, leave=False, dynamic_ncols=True, disable=rank > 0)
    for step in bar:
        start = step * batch_size + rank * local
        sl = slice(start, min(n, start + local))
        idx = perm[sl]
        x = normalize(augmented_batch(padded, idx, offsets[sl], flips[sl]))
        y = labels[idx]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            out = model(x)
            loss = F.cross_entropy(out, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach() * len(idx)
        correct += (out.argmax(1) == y).sum()
        seen += len(idx)
        if rank == 0 and (step % log_every == 0 or step == steps - 1):  # .item() syncs: not every step
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{100 * correct.item() / seen:.1f}",
                            lr=f"{scheduler.get_last_lr()[0]:.4f}")
    totals = dist.all_reduce_sum(torch.stack([loss_sum.double(), correct.double(),
                                              torch.tensor(float(seen), device=device, dtype=torch.float64)]))
    return {"train_loss": float(totals[0] / totals[2]), "train_acc": 100.0 * float(totals[1] / totals[2])}


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
        totals[1] += (out.argmax(1) == y).sum()
    model.train(was_training)
    dist.all_reduce_sum(totals)
    c = int(totals[1].item())
    return {"loss": totals[0].item() / max(n, 1), "acc": 100.0 * c / max(n, 1), "correct": c, "n": n}


@torch.inference_mode()
def correct_mask(model, x_u8: torch.Tensor, labels: torch.Tensor, normalize, batch_size: int = 1000) -> torch.Tensor:
    """Which images `model` classifies right (bool, on the CPU), for paired comparisons."""
    was_training = model.training
    model.eval()
    out = [(model(normalize(x_u8[s:s + batch_size])).argmax(1) == labels[s:s + batch_size]).cpu()
           for s in range(0, len(labels), batch_size)]
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)
