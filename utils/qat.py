"""Quantization-aware fine-tuning (QAT) of one width configuration.

* BN is folded first (quant/fold.py) and the folded conv, weights and bias, is what trains: the
  fine-tuned weights are exactly what a deployment without BN runs.
* The configuration is placed by the quantization core's ``quantize_`` (quant/place.py) in its
  trainable form: each quantized weight is a ``torch.nn.utils.parametrize`` parametrization (the
  float original trains, the forward pass uses its fake-quantized view, per-channel scales), and
  each quantized tensor has a trainable quantizer in its Slot, so every reader of the tensor, the
  residual add included, reads what post-training evaluation and the export read. Gradients are
  LSQ's (quant/quantizer.py).
* Scales start at the post-training values (MSE clip for weights, calibrated ranges for tensors)
  and are learned, or held there (``learn_scales=False``).

Training reuses stage 1's device-resident epoch (utils.train.train_one_epoch), its augmentation
and its atomic checkpoints; a fine-tune resumes to identical weights.
"""
from __future__ import annotations

import time

import torch
import torch.nn as nn

from models import build_from_args
from quant.fold import fold_bn
from quant.place import quantize_, skeleton_, tensor_grids
from utils.checkpoint import read_checkpoint, save_checkpoint
from utils.errors import UserError
from utils.train import WarmupCosine, train_one_epoch

QAT_FORMAT = 2
WEIGHT_DECAY = 5e-4      # on the conv/linear weights (their float originals); none on biases and scales
MOMENTUM = 0.9
BN_HANDLING = "folded before fine-tuning; the folded conv (weights and bias) is trained"


def prepare_qat(model: nn.Module, config: dict, ranges: dict, target: str, learn_scales: bool = True,
                per_channel: bool = True, clip: str = "mse") -> nn.Module:
    """A BN-folded copy of the float `model` with the full configuration `config` ({group: bits})
    fake-quantized for training. Weight scales start at the post-training ones of the folded weights;
    tensor scales at the calibrated `ranges`."""
    qat = quantize_(fold_bn(model), config, ranges, target, per_channel, clip, trainable=True,
                    learn_scales=learn_scales)
    return qat.train()


def qat_skeleton(model_args: dict, config: dict, grids: dict, target: str, per_channel: bool = True) -> nn.Module:
    """The structure of a fine-tuned model, with placeholder scales, for loading its state dict."""
    return skeleton_(fold_bn(build_from_args(model_args)), config, grids, target, per_channel)


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
    config = {(g[0], g[1]): int(b) for g, b in ck["config"]}
    qat = qat_skeleton(ck["model_args"], config, ck["tensor_grids"], ck["target"],
                       ck["quantization"]["granularity"] == "channel")
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
        return {"qat_format": QAT_FORMAT, "key": key, **meta, "tensor_grids": tensor_grids(qat, meta["target"]),
                "model": qat.state_dict(),
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
