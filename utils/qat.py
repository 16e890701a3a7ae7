"""Quantization-aware fine-tuning (QAT) of one width configuration.

* **BN is kept during fine-tuning and folded at the end** (the default, ``bn="kept"``; torch.ao's
  ConvBn QAT modules and NNCF/ModelOpt do the same). Each narrowed conv weight is quantized in its
  folded form: the parametrization chain is w -> w * gamma / sqrt(running_var + eps) (``BNScale``)
  -> the weight quantizer -> / (gamma / sqrt(running_var + eps)), so the conv computes with exactly the
  quantized folded weight, rescaled, and its BN follows. In training BN normalizes with the batch
  statistics and re-estimates its running statistics on the quantized network, until ``finetune``'s
  ``freeze_bn_step`` (stage 4: half-way, DEFAULT_FREEZE_BN), from which it uses the running ones, as in
  evaluation: the network is then the folded one. ``deployable`` folds it: w' = w * gamma /
  sigma, b' = beta - mu * gamma / sigma, the quantizer kept as it is. The folded model is what the
  checkpoint's ``model`` holds, what stage 4 evaluates and what the export writes: what is fine-tuned
  is what deploys (tests show the folded model predicts what the fine-tuned one predicts).
* ``bn="folded"`` folds BN first and trains the folded conv (weights and bias), the recipe before
  issue 20. It can collapse at 3 bits (README, "Quantization-aware fine-tuning"): the folded
  parametrization multiplies each output channel's effective learning rate by sigma^2 / gamma^2 relative
  to the BN form (up to 15x in the shipped ResNet-20), and the damaged 3-bit start has large gradients,
  so one step can move weights by several quantization steps; tests/test_qat.py reproduces it.
* The configuration is placed by the quantization core's ``quantize_`` (quant/place.py) in its
  trainable form: each quantized weight is a ``torch.nn.utils.parametrize`` parametrization (the float
  original trains, the forward pass uses its fake-quantized view, per-channel scales), and each
  quantized tensor has a trainable quantizer in its Slot. Gradients are LSQ's (quant/quantizer.py).
* Scales start at the post-training values (MSE clip of the folded weights, calibrated ranges for
  tensors) and are learned, or held there (``learn_scales=False``). Before any training step the
  fine-tuned model is exactly the post-training one.
* Optional distillation from the float model (``Distilled``): the gradient of the trainer's
  cross-entropy is replaced by that of KL(teacher || student) on the logits.

Training reuses stage 1's device-resident epoch (utils.train.train_one_epoch), its augmentation
and its atomic checkpoints; a fine-tune resumes to identical weights.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize

from models import build_from_args
from quant.fold import bn_scale, fold_bn
from quant.place import quantize_, skeleton_, slots, tensor_grids
from quant.quantizer import Quantizer, levels_weight
from quant.recipe import Recipe
from quant.widths import FLOAT_BITS, W, tensors_of, weights_of
from utils.checkpoint import read_checkpoint, save_checkpoint
from utils.errors import UserError
from utils.options import DEFAULT_FREEZE_BN, DEFAULT_QAT_LR, DEFAULT_QAT_START
from utils.split import QUICK_TRAIN_IMAGES, indices_sha256, quick_images, quick_subset
from utils.train import PAD, WarmupCosine, to_device_uint8, train_one_epoch

QAT_FORMAT = 2           # "model" is the folded, deployable state (as in format 2 before BN was kept)
WEIGHT_DECAY = 5e-4      # on the conv/linear weights (their float originals); none on biases, BN and scales
MOMENTUM = 0.9
BN_MODES = ("kept", "folded")
DEFAULT_BN = "kept"
QAT_STARTS = ("post-training", "nearest")   # stage 4's --qat-start: the weights a fine-tune starts from
BN_HANDLING = {
    "kept": "kept during fine-tuning (batch statistics, running statistics re-estimated on the quantized "
            "network, then frozen from bn_frozen_from_step on), each conv weight quantized in its folded form; "
            "folded at the end, and the folded model is what is evaluated, saved and exported",
    "folded": "folded before fine-tuning; the folded conv (weights and bias) is trained",
}
DISTILL = "KL(float teacher || student) on the logits, temperature 1, in place of the cross-entropy"


class BNScale(nn.Module):
    """Parametrization w -> w * gamma / sqrt(running_var + eps) per output channel (``inverse``: divided by
    it), with the BN's current values: the conv weight as BN folding computes it (quant.fold.bn_scale, the same
    function, so the same floats). The BN is held in a tuple, not as a submodule, so that it is neither
    saved nor trained twice."""

    def __init__(self, bn: nn.Module, inverse: bool = False):
        super().__init__()
        self._bn = (bn,)
        self.inverse = inverse

    def factor(self) -> torch.Tensor:
        return bn_scale(self._bn[0])

    def apply(self, w: torch.Tensor, divide: bool) -> torch.Tensor:
        f = self.factor()
        if divide:   # a channel with gamma exactly 0 has a zero folded weight: divide by 1 there, not 0
            f = torch.where(f == 0, torch.ones_like(f), f)
        f = f.view(-1, *([1] * (w.dim() - 1)))
        return w / f if divide else w * f

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.apply(w, self.inverse)

    def extra_repr(self) -> str:
        return "inverse" if self.inverse else ""


def prepare_qat(model: nn.Module, config: dict, ranges: dict, target: str, learn_scales: bool = True,
                per_channel: bool = True, clip: str = "mse", bn: str = DEFAULT_BN, weight_range: int = 8,
                levels: dict | None = None) -> nn.Module:
    """A copy of the float `model` with the full configuration `config` ({group: bits}) fake-quantized for
    training, in train mode. ``bn="kept"``: BN stays, each narrowed conv weight paired with a BN is quantized
    in its folded form (``deployable`` folds the result); ``bn="folded"``: a BN-folded copy. Either way, weight
    scales start at the post-training ones of the folded weights and tensor scales at the calibrated
    `ranges`, so that ``deployable(prepare_qat(...))`` computes exactly what post-training placement does:
    with `levels` ({(layer, bits): learned integer levels}, quant/adaround.py), the fine-tune starts from those
    levels (each float original set to levels x scale, unfolded), else from round-to-nearest."""
    if bn not in BN_MODES:
        raise ValueError(f"bn must be one of {BN_MODES}, got {bn!r}")
    if bn == "folded":
        qat = quantize_(fold_bn(model), config, ranges, target, per_channel, clip, trainable=True,
                        learn_scales=learn_scales, weight_range=weight_range, levels=levels)
        return qat.train()
    qat = copy.deepcopy(model)
    pairs = dict(qat.conv_bn_pairs())
    narrowed = [n for n, w in weights_of(config).items() if w != FLOAT_BITS and n in pairs]
    for n in narrowed:   # quantize_ then searches the weight scales on the folded weights
        parametrize.register_parametrization(qat.get_submodule(n), "weight", BNScale(qat.get_submodule(pairs[n])))
    levels = levels or {}
    quantize_(qat, config, ranges, target, per_channel, clip, trainable=True, learn_scales=learn_scales,
              weight_range=weight_range, levels={k: v for k, v in levels.items() if k[0] not in narrowed})
    for n in narrowed:
        layer = qat.get_submodule(n)
        scale, q = layer.parametrizations.weight
        if (n, config[W, n]) in levels:   # the original whose folded form is levels x scale
            with torch.no_grad():
                original = layer.parametrizations.weight.original
                folded = levels_weight(q, scale(original), levels[n, config[W, n]])
                original.copy_(scale.apply(folded, divide=True))
        parametrize.register_parametrization(layer, "weight", BNScale(qat.get_submodule(pairs[n]), inverse=True))
    return qat.train()


def bn_kept(qat: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in qat.modules())


def weight_quantizer_of(module: nn.Module) -> Quantizer | None:
    if not parametrize.is_parametrized(module, "weight"):
        return None
    return next(p for p in module.parametrizations.weight if isinstance(p, Quantizer))


@torch.no_grad()
def deployable(qat: nn.Module, target: str) -> nn.Module:
    """The folded model (eval mode) that a fine-tune with BN kept deploys: BN folded into each conv with its
    running statistics (quant/fold.py), each weight quantizer kept with its scales on the folded weight,
    each tensor quantizer kept. A model without BN (``bn="folded"``) is returned as it is, in eval mode."""
    if not bn_kept(qat):
        return qat.eval()
    float_state = {}
    for k, v in qat.state_dict().items():
        if ".parametrizations.weight." in k:
            if k.endswith(".parametrizations.weight.original"):
                float_state[k[:-len(".parametrizations.weight.original")] + ".weight"] = v
        elif ".quant." not in k and not k.startswith("quant."):
            float_state[k] = v
    plain = build_from_args(qat.model_args)
    plain.load_state_dict(float_state)
    folded = fold_bn(plain.to(next(qat.parameters()).device))
    for name, m in qat.named_modules():
        q = weight_quantizer_of(m)
        if q is not None:
            with torch.enable_grad():
                parametrize.register_parametrization(folded.get_submodule(name), "weight", copy.deepcopy(q))
    source = slots(qat, target)
    for name, slot in slots(folded, target).items():
        slot.quant = copy.deepcopy(source[name].quant)
    return folded.eval()


def qat_skeleton(model_args: dict, config: dict, grids: dict, target: str, per_channel: bool = True,
                 weight_range: int = 8) -> nn.Module:
    """The structure of a fine-tuned (folded) model, with placeholder scales, for loading its state dict."""
    return skeleton_(fold_bn(build_from_args(model_args)), config, grids, target, per_channel, weight_range)


def param_groups(qat: nn.Module, weight_decay: float = WEIGHT_DECAY) -> list[dict]:
    """Decay on the float originals of conv/linear weights; none on biases, BN and quantizer scales."""
    decay, no_decay = [], []
    for name, p in qat.named_parameters():
        if not p.requires_grad:
            continue
        (decay if name.endswith(("weight", "original")) and p.dim() > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class _DistillGrad(torch.autograd.Function):
    """Identity on the student's logits whose backward is the gradient of KL(teacher || student), batch mean,
    temperature 1: (softmax(student) - softmax(teacher)) / batch. It stands in for the gradient of the
    trainer's loss (the batch-mean cross-entropy of these logits), which it ignores; the trainer's reported
    loss and accuracy stay the student's cross-entropy and accuracy."""

    @staticmethod
    def forward(ctx, student, teacher):
        ctx.save_for_backward(student, teacher)
        return student.clone()

    @staticmethod
    def backward(ctx, grad):
        student, teacher = ctx.saved_tensors
        g = (student.float().softmax(1) - teacher.float().softmax(1)) / student.shape[0]
        return g.to(grad.dtype), None


class Distilled(nn.Module):
    """The student, trained on KL divergence to the float teacher's logits instead of the labels (see
    ``_DistillGrad``). The teacher runs in eval mode without gradients and is not a submodule: neither
    trained, nor saved, nor switched to train mode."""

    def __init__(self, student: nn.Module, teacher: nn.Module):
        super().__init__()
        self.student = student
        self._teacher = (teacher.eval(),)

    def forward(self, x):
        out = self.student(x)
        if not (self.training and torch.is_grad_enabled()):
            return out
        with torch.no_grad():
            t = self._teacher[0](x)
        return _DistillGrad.apply(out, t)


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student), batch mean, temperature 1: the loss whose gradient ``Distilled`` trains on."""
    return F.kl_div(F.log_softmax(student_logits.float(), 1), F.log_softmax(teacher_logits.float(), 1),
                    log_target=True, reduction="batchmean")


def load_qat(path, map_location="cpu"):
    """(model in eval mode, checkpoint) of a fine-tuned model, from its file alone: the folded model the
    checkpoint's ``model`` holds (the answer: the fine-tuned weights, or the post-training ones where the
    fine-tune ended below them, ``ck["answer"]``)."""
    ck = read_checkpoint(path)
    if not isinstance(ck, dict) or ck.get("qat_format") != QAT_FORMAT:
        raise UserError(f"{path} is not a fine-tuning checkpoint of this version of AI-QS (no qat_format "
                        f"{QAT_FORMAT}). Re-run 4_create_baselines.py --qat-epochs N.")
    config = {(g[0], g[1]): int(b) for g, b in ck["config"]}
    recipe = Recipe.from_json(ck["quantization"])
    qat = qat_skeleton(ck["model_args"], config, ck["tensor_grids"], ck["target"], recipe.per_channel,
                       recipe.weight_range)
    qat.load_state_dict(ck["model"])
    return qat.to(map_location).eval(), ck


def keep_post_training(path, post_training: nn.Module):
    """Make the post-training model the answer of the fine-tune checkpoint at `path` (the fine-tune ended below
    it): ``model`` becomes its folded state and the fine-tuned one moves to ``fine_tuned_model``. Idempotent."""
    ck = read_checkpoint(path)
    if ck.get("answer") == "post-training":
        return
    ck["fine_tuned_model"] = ck["model"]
    ck["model"] = post_training.state_dict()
    ck["answer"] = "post-training"
    save_checkpoint(path, ck)


@dataclass(frozen=True)
class FineTuneRecipe:
    """One fine-tuning recipe (stage 4's --qat-* options), the same for every configuration it fine-tunes. Its
    JSON (``to_json``) is what results files record as ``qat_recipe`` and what a fine-tune's checkpoint key
    holds, so stage 4 and benchmarks/qat_ablation.py, built from the same recipe, write checkpoints the other
    reuses."""
    epochs: int
    lr: float = DEFAULT_QAT_LR              # peak, per 128 images
    batch_size: int = 128
    warmup: float = 0.0                     # fraction of the steps
    freeze_bn: float | None = DEFAULT_FREEZE_BN   # fraction of the steps (BN kept), None: never frozen
    scales: str = "learned"
    bn: str = DEFAULT_BN
    distill: bool = False
    start: str = DEFAULT_QAT_START

    def steps(self, n_images: int) -> int:
        return max(1, n_images // self.batch_size) * self.epochs

    def warmup_steps(self, n_images: int) -> int:
        steps = self.steps(n_images)
        return min(steps, int(round(self.warmup * steps)))

    def freeze_step(self, n_images: int) -> int | None:
        return None if self.freeze_bn is None or self.bn != "kept" else int(round(self.freeze_bn * self.steps(n_images)))

    def start_from(self, ptq: str) -> str:
        """The rounding the fine-tune starts from: the learned one where the post-training weights have it."""
        return ptq if self.start == "post-training" else "nearest"

    def to_json(self, pool, device: torch.device, ptq: str) -> dict:
        steps, warmup = self.steps(len(pool)), self.warmup_steps(len(pool))
        return {"epochs": self.epochs, "lr": self.lr, "batch_size": self.batch_size, "momentum": MOMENTUM,
                "nesterov": True, "weight_decay": WEIGHT_DECAY,
                "schedule": f"linear warm-up over {warmup} of {steps} steps, then cosine to zero" if warmup else
                            "cosine to zero, no warm-up",
                "warmup_steps": warmup, "scales": self.scales, "bn": self.bn, "bn_handling": BN_HANDLING[self.bn],
                "bn_frozen_from_step": self.freeze_step(len(pool)),
                "loss": DISTILL if self.distill else "cross-entropy on the labels",
                "train_images": len(pool), "train_indices_sha256": indices_sha256(pool),
                "amp": "bf16 autocast (quantizers in fp32)" if device.type == "cuda" else "none (fp32)",
                "start": self.start_from(ptq)}


def fine_tune_images(s, quick: bool) -> tuple:
    """(pool, padded uint8 images, labels) a fine-tune of the set-up `s` trains on: its calibration pool (training
    images, never validation or test), under --quick a seeded subset sized for the model, padded for the random
    crops, on the device. The pool's identity is part of every checkpoint key (FineTuneRecipe.to_json)."""
    pool = s.split.calibration_pool
    if quick:
        pool = quick_subset(pool, quick_images(QUICK_TRAIN_IMAGES, s.table.layers), s.seed)
    padded = F.pad(to_device_uint8(s.data.train_x[pool], s.device), (0, 0, PAD, PAD, PAD, PAD))
    return pool, padded, torch.from_numpy(s.data.train_y[pool]).to(s.device)


def checkpoint_name(config_name: str, seed_index: int, seed: int) -> str:
    """`qat_<name>.pt` for the first seed, `qat_<name>_seed<s>.pt` for the others (stage 4's names)."""
    return f"qat_{config_name}.pt" if seed_index == 0 else f"qat_{config_name}_seed{seed}.pt"


def fine_tune_config(s, name: str, cfg: dict, ft: FineTuneRecipe, recipe_json: dict, quant: dict, base_sha: str,
                     seed: int, path, padded, labels, teacher=None, resume: bool = False, desc: str | None = None) -> dict:
    """Fine-tune configuration `cfg` of the post-training set-up `s` (utils.stages.common.Setup: model, ranges,
    target, recipe, learned levels) under `ft` with one seed, checkpointed at `path` (``finetune``). The key holds
    the base checkpoint's hash, the configuration, the recipe, the weight quantization, the target, the tensor
    scales and the seed. Returns ``finetune``'s result."""
    key = {"base_sha256": base_sha, "config": s.space.to_file(cfg), "recipe": recipe_json, "quantization": quant,
           "target": s.target, "tensor_scales": {n: s.ranges[n]["scales"][str(a)]
                                                 for n, a in tensors_of(cfg).items() if a != FLOAT_BITS},
           "seed": seed}
    meta = {"name": name, "config": [[list(g), b] for g, b in cfg.items()], "model_args": s.meta["model_args"],
            "normalization": s.meta["normalization"], "quantization": quant, "recipe": recipe_json,
            "target": s.target, "seed": seed}
    qat = prepare_qat(s.model, cfg, s.ranges, s.target, learn_scales=ft.scales == "learned",
                      **s.recipe.weight_kwargs(), bn=ft.bn,
                      levels=s.levels if recipe_json["start"] != "nearest" else None).to(s.device)
    n = len(labels)
    return finetune(qat, path, key, meta, padded, labels, s.normalize, ft.epochs, ft.lr, ft.batch_size, seed,
                    resume=resume, desc=desc or f"qat {name}", teacher=teacher if ft.distill else None,
                    warmup_steps=ft.warmup_steps(n), freeze_bn_step=ft.freeze_step(n))


def finetune(qat: nn.Module, path, key: dict, meta: dict, padded, labels, normalize, epochs: int, lr: float,
             batch_size: int, seed: int, resume: bool = False, desc: str = "qat", teacher: nn.Module | None = None,
             warmup_steps: int = 0, freeze_bn_step: int | None = None) -> dict:
    """Train `qat` (from ``prepare_qat``) for `epochs` with SGD + Nesterov and a cosine schedule (after
    `warmup_steps` of linear warm-up), checkpointing every epoch to `path` (atomic, weights_only-loadable).
    With `teacher`, the student learns the teacher's logits (``Distilled``). With `resume`, a checkpoint with
    the same `key` continues where it stopped (or is reused when finished); any other is started afresh.

    Returns status, history, seconds (the training time of every epoch, reused ones included), wall_seconds
    (this call's) and ``model``: the deployable (folded) fine-tuned model, in eval mode."""
    optimizer = torch.optim.SGD(param_groups(qat), lr=lr * batch_size / 128, momentum=MOMENTUM, nesterov=True)
    steps = max(1, len(labels) // batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(epochs * steps, warmup_steps))
    target = meta["target"]
    start, history, status = 0, [], "trained"
    if resume and path.is_file():
        ck = read_checkpoint(path)
        if isinstance(ck, dict) and ck.get("key") == key:
            qat.load_state_dict(ck["train_model"] if "train_model" in ck else ck.get("fine_tuned_model", ck["model"]))
            optimizer.load_state_dict(ck["optimizer"])
            scheduler.load_state_dict(ck["scheduler"])
            start, history = int(ck["epoch"]), list(ck["history"])
            status = "reused" if ck.get("finished") else f"resumed after epoch {start}"
        else:
            print(f"note: {path} was fine-tuned from another base checkpoint, configuration or recipe; starting afresh")

    def state(epoch, finished):
        folded = deployable(qat, target)
        out = {"qat_format": QAT_FORMAT, "key": key, **meta, "tensor_grids": tensor_grids(folded, target),
               "model": folded.state_dict(), "answer": "fine-tuned",
               "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch,
               "epochs": epochs, "finished": finished, "history": history}
        if folded is not qat:
            out["train_model"] = qat.state_dict()
        qat.train()
        return out

    trained = qat if teacher is None else Distilled(qat, teacher)
    bns = [m for m in qat.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def freeze(module, args):   # from step freeze_bn_step on, BN normalizes with its running statistics
        if module.training and scheduler.last_epoch >= freeze_bn_step:
            for m in bns:
                m.eval()
    hook = qat.register_forward_pre_hook(freeze) if freeze_bn_step is not None and bns else None
    t0 = time.time()
    try:
        for epoch in range(start, epochs):
            t = time.perf_counter()
            stats = train_one_epoch(trained, optimizer, scheduler, padded, labels, normalize, batch_size, seed, epoch,
                                    use_amp=padded.device.type == "cuda", desc=f"{desc} epoch {epoch + 1}/{epochs}")
            history.append({"epoch": epoch + 1, **stats, "lr": scheduler.get_last_lr()[0],
                            "seconds": time.perf_counter() - t})
            save_checkpoint(path, state(epoch + 1, epoch + 1 == epochs))
    finally:
        if hook is not None:
            hook.remove()
    # seconds: the training time of all its epochs, those of a reused or resumed checkpoint included
    return {"status": status, "history": history, "seconds": float(sum(h["seconds"] for h in history)),
            "wall_seconds": time.time() - t0, "model": deployable(qat, target)}
