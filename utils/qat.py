"""Quantization-aware fine-tuning (QAT) of one width configuration.

* BN is folded first (utils.evaluation.FoldedModel) and the folded conv, weights and bias, is
  what trains: the fine-tuned weights are exactly what a deployment without BN runs.
* Weights are fake-quantized through ``torch.nn.utils.parametrize``: a layer's ``weight`` is the
  quantized view of a float ``original``, with one scale per output channel. The forward pass uses
  the quantized weight; the gradient flows straight through to the original inside the clip range
  (zero outside), and to the scales by LSQ (Esser et al. 2019, arXiv 1902.08153), through
  torch's own ``_fake_quantize_learnable_*`` ops with LSQ's gradient scale 1/sqrt(N * Qmax).
* A layer with a < 32 gets a child module ``input_quant`` (per-tensor LSQ) that a forward pre-hook
  applies to what the layer reads, as the post-training evaluator does.
* Scales start at the post-training values (MSE clip for weights, calibrated ranges for
  activations) and are learned, or held there (``learn_scales=False``).

Training reuses stage 1's device-resident epoch (utils.train.train_one_epoch), its augmentation
and its atomic checkpoints; a fine-tune resumes to identical weights.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize

from models import build_from_args
from utils.checkpoint import read_checkpoint, save_checkpoint
from utils.config import FLOAT_BITS
from utils.errors import UserError
from utils.evaluation import FoldedModel
from utils.quantization import SCALE_EPS, _scales
from utils.train import WarmupCosine, train_one_epoch

QAT_FORMAT = 1
WEIGHT_DECAY = 5e-4      # on the conv/linear weights (their float originals); none on biases and scales
MOMENTUM = 0.9
BN_HANDLING = "folded before fine-tuning; the folded conv (weights and bias) is trained"


class LSQWeight(nn.Module):
    """Parametrization: weight -> its fake-quantized view on a symmetric signed grid (per channel or
    per tensor), with LSQ scales."""

    def __init__(self, scale: torch.Tensor, bits: int, learn: bool = True):
        super().__init__()
        self.bits, self.qmax = bits, 2 ** (bits - 1) - 1
        self.scale = nn.Parameter(scale.detach().clone().float(), requires_grad=learn)
        self.register_buffer("zero_point", torch.zeros_like(self.scale))

    def forward(self, w):
        g = 1.0 / math.sqrt(w[0].numel() * self.qmax)
        s = self.scale.clamp_min(SCALE_EPS)
        if s.numel() == 1:
            return torch._fake_quantize_learnable_per_tensor_affine(w, s, self.zero_point, -self.qmax, self.qmax, g)
        return torch._fake_quantize_learnable_per_channel_affine(w, s, self.zero_point, 0, -self.qmax, self.qmax, g)

    def integers(self, w) -> torch.Tensor:
        """The integer levels of the quantized weight (what an int8 tensor stores)."""
        s = self.scale.clamp_min(SCALE_EPS).view(-1, *([1] * (w.dim() - 1)))
        return torch.round(self.forward(w) / s).to(torch.int8)


class _LSQ(torch.autograd.Function):
    """Per-tensor LSQ in training: the forward of torch.fake_quantize_per_tensor_affine (zero point 0),
    the gradients of the LSQ paper (eq. 3 and the straight-through estimator): d/dx = 1 where
    qmin <= x/s <= qmax, else 0; d/ds = round(x/s) - x/s inside, qmin or qmax outside, times `g`.
    About twice as fast on a CPU as torch._fake_quantize_learnable_per_tensor_affine, which decides
    "inside" on the rounded value instead; the activations are the largest tensors QAT quantizes."""

    @staticmethod
    def forward(ctx, x, scale, qmin, qmax, g):
        v = x * scale.reciprocal()
        q = v.clamp(qmin, qmax)
        inside = q == v
        q.round_()
        ctx.save_for_backward(inside, torch.where(inside, q - v, q))
        ctx.g = g
        return q.mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        inside, ds = ctx.saved_tensors
        return grad * inside, (torch.dot(grad.reshape(-1), ds.reshape(-1)) * ctx.g).reshape(1), None, None, None


class LSQAct(nn.Module):
    """Per-tensor fake quantization of a layer's input with an LSQ scale (zero point 0). In eval mode it
    is torch's own fake_quantize_per_tensor_affine, exactly what post-training evaluation and the
    integer export compute."""

    def __init__(self, scale: float, qmin: int, qmax: int, learn: bool = True):
        super().__init__()
        self.qmin, self.qmax = qmin, qmax
        self.scale = nn.Parameter(torch.tensor([float(scale)]), requires_grad=learn)

    def forward(self, x):
        s = self.scale.clamp_min(SCALE_EPS)
        if not self.training:
            return torch.fake_quantize_per_tensor_affine(x.float(), float(s.detach()), 0, self.qmin, self.qmax).to(x.dtype)
        g = 1.0 / math.sqrt(x[0].numel() * max(abs(self.qmin), self.qmax))
        return _LSQ.apply(x.float(), s, self.qmin, self.qmax, g).to(x.dtype)   # fp32 under bf16 autocast


def _quantize_input(module, inputs):
    return (module.input_quant(inputs[0]),)


def prepare_qat(model: nn.Module, config: dict, act_quant: dict | None = None, learn_scales: bool = True,
                per_channel: bool = True, clip: str = "mse") -> nn.Module:
    """A BN-folded copy of the float `model` with `config` ({layer: (w, a)}) fake-quantized for training.

    Weight scales start at the post-training ones of the folded weights; activation scales at the
    calibrated `act_quant[(layer, a)]`."""
    qat = FoldedModel(model).model
    for name, (w, a) in config.items():
        layer = qat.get_submodule(name)
        if w != FLOAT_BITS:
            qmax = 2 ** (w - 1) - 1
            with torch.no_grad():
                flat = layer.weight.detach().float().reshape(layer.weight.shape[0] if per_channel else 1, -1)
                scale = _scales(flat, qmax, clip)
            parametrize.register_parametrization(layer, "weight", LSQWeight(scale, w, learn_scales))
        if a != FLOAT_BITS:
            if act_quant is None or (name, a) not in act_quant:
                raise UserError(f"no calibrated activation range for {name} at {a} bits to start fine-tuning from.")
            q = act_quant[name, a]
            layer.input_quant = LSQAct(q.scale, q.qmin, q.qmax, learn_scales)
            layer.register_forward_pre_hook(_quantize_input)
    return qat.train()


def act_grids(qat: nn.Module) -> dict[str, list[int]]:
    """{layer: [qmin, qmax]} of every quantized input (signed or unsigned grid), for the checkpoint."""
    return {n: [m.input_quant.qmin, m.input_quant.qmax] for n, m in qat.named_modules() if hasattr(m, "input_quant")}


def qat_skeleton(model_args: dict, config: dict, grids: dict, per_channel: bool = True) -> nn.Module:
    """The structure of a fine-tuned model, with placeholder scales, for loading its state dict."""
    qat = FoldedModel(build_from_args(model_args)).model
    for name, (w, a) in config.items():
        layer = qat.get_submodule(name)
        if w != FLOAT_BITS:
            n = layer.weight.shape[0] if per_channel else 1
            parametrize.register_parametrization(layer, "weight", LSQWeight(torch.ones(n), w))
        if a != FLOAT_BITS:
            layer.input_quant = LSQAct(1.0, *grids[name])
            layer.register_forward_pre_hook(_quantize_input)
    return qat


def param_groups(qat: nn.Module, weight_decay: float = WEIGHT_DECAY) -> list[dict]:
    """Decay on the float originals of conv/linear weights; none on biases and quantizer scales."""
    decay, no_decay = [], []
    for name, p in qat.named_parameters():
        if not p.requires_grad:
            continue
        (decay if name.endswith(("weight", "original")) and p.dim() > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def load_qat(path, map_location="cpu"):
    """(model in eval mode, checkpoint) of a fine-tuned model, from its file alone."""
    ck = read_checkpoint(path)
    if not isinstance(ck, dict) or ck.get("qat_format") != QAT_FORMAT:
        raise UserError(f"{path} is not a fine-tuning checkpoint of this version of AI-QS (no qat_format "
                        f"{QAT_FORMAT}). Re-run 4_create_baselines.py --qat-epochs N.")
    config = {n: tuple(v) for n, v in ck["config"].items()}
    qat = qat_skeleton(ck["model_args"], config, ck["act_grids"], ck["quantization"]["granularity"] == "channel")
    qat.load_state_dict(ck["model"])
    return qat.to(map_location).eval(), ck


def finetune(qat: nn.Module, path, key: dict, meta: dict, padded, labels, normalize, epochs: int, lr: float,
             batch_size: int, seed: int, resume: bool = False, desc: str = "qat") -> dict:
    """Train `qat` for `epochs` with SGD + Nesterov and a cosine schedule, checkpointing every epoch to
    `path` (atomic, weights_only-loadable). With `resume`, a checkpoint with the same `key` continues
    where it stopped (or is reused when finished); any other is started afresh."""
    optimizer = torch.optim.SGD(param_groups(qat), lr=lr * batch_size / 128, momentum=MOMENTUM, nesterov=True)
    steps = max(1, len(labels) // batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(epochs * steps))
    start, history, status = 0, [], "trained"
    if resume and path.is_file():
        ck = read_checkpoint(path)
        if isinstance(ck, dict) and ck.get("key") == key:
            qat.load_state_dict(ck["model"])
            optimizer.load_state_dict(ck["optimizer"])
            scheduler.load_state_dict(ck["scheduler"])
            start, history = int(ck["epoch"]), list(ck["history"])
            status = "reused" if ck.get("finished") else f"resumed after epoch {start}"
        else:
            print(f"note: {path} was fine-tuned from another base checkpoint, configuration or recipe; starting afresh")

    def state(epoch, finished):
        return {"qat_format": QAT_FORMAT, "key": key, **meta, "act_grids": act_grids(qat), "model": qat.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch,
                "epochs": epochs, "finished": finished, "history": history}

    t0 = time.time()
    for epoch in range(start, epochs):
        t = time.perf_counter()
        stats = train_one_epoch(qat, optimizer, scheduler, padded, labels, normalize, batch_size, seed, epoch,
                                use_amp=padded.device.type == "cuda", desc=f"{desc} epoch {epoch + 1}/{epochs}")
        history.append({"epoch": epoch + 1, **stats, "lr": scheduler.get_last_lr()[0],
                        "seconds": time.perf_counter() - t})
        save_checkpoint(path, state(epoch + 1, epoch + 1 == epochs))
    qat.eval()
    return {"status": status, "history": history, "seconds": time.time() - t0}
