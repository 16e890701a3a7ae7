"""Accuracy (and loss, and divergence from the float model) under many width configurations,
reusing what does not change.

The model declares itself as a chain of segments (models/structure.py). A configuration that
differs from the current base only in layers of segment k computes exactly what the base computes
in front of k, so the base's input activations of segments are kept and a candidate runs from
segment k on. Stage 2 (one layer at a time against the float base) and the greedy search (one
move at a time against the current configuration) both evaluate mostly suffixes this way.

A configuration is ``{layer: (w, a)}``: weights fake-quantized at w bits (utils/quantization.py),
and the layer's *input* fake-quantized at a bits where a < 32, by a forward pre-hook, i.e. what
the layer reads. Residual additions and pooling stay in float.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.structure import quantizable_layers
from utils.config import FLOAT_BITS, parse_config, weight_config
from utils.errors import UserError

# Default bound on the cached activations (bytes). ResNet-20 on 5,000 images needs about 2 GB;
# ResNet-110 about 10 GB, so it caches every few segments and recomputes in between.
DEFAULT_CACHE_BYTES = 4 << 30


class FoldedModel:
    """An inference copy of `model` with every declared conv-BN pair folded into the conv.

    Folding happens after weight quantization (sync() reads the source model's current, possibly
    fake-quantized, weights): with per-channel scales the folded conv is still on a per-channel
    grid, and the BN pass (a fifth of CPU inference time for ResNet-20) is saved. A BN that the
    model does not pair with a conv stays a BN. The conv bias folds too: b' = beta + (b - mu) * gamma / sigma.
    """

    def __init__(self, model: nn.Module):
        self.src = model
        self.model = copy.deepcopy(model).eval()
        src_mods = dict(model.named_modules())
        bn_of = dict(model.conv_bn_pairs())
        self.pairs = {}  # layer name -> (source layer, folded layer, source BN or None)
        for name in quantizable_layers(model):
            dst = self.model.get_submodule(name)
            bn = src_mods[bn_of[name]] if name in bn_of else None
            if bn is not None:
                if dst.bias is None:
                    dst.bias = nn.Parameter(torch.zeros(dst.out_channels, device=dst.weight.device,
                                                        dtype=dst.weight.dtype))
                parent, _, leaf = bn_of[name].rpartition(".")
                setattr(self.model.get_submodule(parent) if parent else self.model, leaf, nn.Identity())
            self.pairs[name] = (src_mods[name], dst, bn)
        self.sync()

    @torch.no_grad()
    def sync(self, names=None):
        """Re-fold the listed layers (default all) from the source model's current weights."""
        for name in (self.pairs if names is None else names):
            src, dst, bn = self.pairs[name]
            if bn is None:
                dst.weight.copy_(src.weight)
                if src.bias is not None:
                    dst.bias.copy_(src.bias)
            else:
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                dst.weight.copy_(src.weight * scale.view(-1, *([1] * (src.weight.dim() - 1))))
                bias = src.bias if src.bias is not None else torch.zeros_like(bn.running_mean)
                dst.bias.copy_(bn.bias + (bias - bn.running_mean) * scale)


@dataclass
class Outcome:
    """One configuration evaluated on n images."""
    correct: torch.Tensor   # bool [n], on the CPU: which images are classified right
    loss: float             # mean cross-entropy against the labels
    kl: float               # mean KL(float model || this configuration), nats per image

    @property
    def n(self) -> int:
        return len(self.correct)

    @property
    def n_correct(self) -> int:
        return int(self.correct.sum())

    @property
    def accuracy(self) -> float:
        return 100.0 * self.n_correct / max(self.n, 1)


def cached_segments(sizes: list[int], limit: int) -> list[bool]:
    """Which segment inputs to keep: all of them (but the first, the image itself, rebuilt from
    uint8 for free) if they fit into `limit` bytes, else every m-th, the smallest m that fits."""
    keep = [False] + [True] * (len(sizes) - 1)
    for m in range(1, len(sizes) + 1):
        keep = [k > 0 and k % m == 0 for k in range(len(sizes))]
        if sum(s for s, k in zip(sizes, keep) if k) <= limit:
            return keep
    return [False] * len(sizes)


class CachedEvaluator:
    """Accuracy, loss and KL to the float model of `model` under width configurations.

    `quantizer` is a utils.quantization.WeightQuantizer of the same model; `act_quant` maps
    (layer, bits) to an ActQuant for every activation width that may be asked for. The inputs of
    segments under the base configuration are cached for the whole split, within `cache_bytes`;
    segments that do not fit are recomputed from the nearest cached one (identical results).
    """

    def __init__(self, model, quantizer, x_u8, labels, normalize, batch_size=1000, base_config=None,
                 act_quant=None, cache_bytes: int = DEFAULT_CACHE_BYTES, cache_activations: bool = True):
        self.model, self.quantizer = model.eval(), quantizer
        self.folded = FoldedModel(model)
        self.x_u8, self.labels, self.normalize = x_u8, labels, normalize
        self.batch_size = batch_size
        self.act_quant = dict(act_quant or {})
        self.segments = self.folded.model.segments()
        self.layer_names = [n for seg in self.segments for n in seg.layers]
        self.segment_of = {n: i for i, seg in enumerate(self.segments) for n in seg.layers}
        self._act = {n: None for n in self.layer_names}
        mods = dict(self.folded.model.named_modules())
        for n in self.layer_names:
            mods[n].register_forward_pre_hook(self._hook(n))
        sizes = self._segment_input_bytes() if cache_activations else [0] * len(self.segments)
        self.keep = cached_segments(sizes, cache_bytes) if cache_activations else [False] * len(self.segments)
        self.cached_bytes = sum(s for s, k in zip(sizes, self.keep) if k)
        self.cache: list[list[torch.Tensor] | None] = [None] * len(self.segments)
        self.applied = None
        self.float_logp = None
        self.evaluations = 0
        self.base = self.full({})
        self.float_outcome = self._run(self.base, 0, store=True)   # also keeps the float log-probs
        self.base_outcome = self.float_outcome
        if base_config:
            self.set_base(base_config)

    def _hook(self, name):
        def hook(_module, inputs):
            q = self._act[name]
            return None if q is None else (q(inputs[0]),)
        return hook

    @torch.no_grad()
    def _segment_input_bytes(self) -> list[int]:
        shapes = []
        h = self.normalize(self.x_u8[:1])
        for seg in self.segments:
            shapes.append(h[0].numel() * h.element_size())
            h = seg.fn(h)
        return [s * self.n for s in shapes]

    @property
    def n(self) -> int:
        return len(self.labels)

    def full(self, config: dict) -> dict[str, tuple[int, int]]:
        """{name: (w, a)} for every layer; accepts file-form configs (default activations float)."""
        if config and all(isinstance(v, tuple) for v in config.values()) and list(config) == self.layer_names:
            return config
        return parse_config(config, self.layer_names, FLOAT_BITS, source="configuration")

    def _first_changed_segment(self, a: dict, b: dict) -> int:
        changed = [self.segment_of[n] for n in self.layer_names if a[n] != b[n]]
        return min(changed) if changed else len(self.segments)

    def _apply(self, config: dict):
        missing = [(n, a) for n, (_, a) in config.items() if a != FLOAT_BITS and (n, a) not in self.act_quant]
        if missing:   # before anything changes, so a refused configuration leaves no trace
            raise UserError(f"no activation range was calibrated for {missing[0][0]} at {missing[0][1]} bits; "
                            f"calibrate that width (stage 2's --a-bits) before evaluating it.")
        weights = weight_config(config)
        prev = weight_config(self.applied) if self.applied is not None else None
        if weights != prev:
            self.quantizer.apply(weights)   # the source model may be shared: always apply, fold what changed
            self.folded.sync(None if prev is None else [n for n in self.layer_names if weights[n] != prev[n]])
        for n, (_, a) in config.items():
            self._act[n] = None if a == FLOAT_BITS else self.act_quant[n, a]
        self.applied = config

    @torch.inference_mode()
    def _run(self, config: dict, start: int, store: bool) -> Outcome:
        """Evaluate `config`, running segments from `start` (or the nearest cached one before it).

        With store=True the kept segment inputs computed on the way replace the cache."""
        self._apply(config)
        while start > 0 and not self.keep[start]:
            start -= 1
        correct, loss, kl = [], torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        first = self.float_logp is None
        logps = []
        for b, s in enumerate(range(0, self.n, self.batch_size)):
            h = self.normalize(self.x_u8[s:s + self.batch_size]) if start == 0 else self.cache[start][b]
            for k in range(start, len(self.segments)):
                if store and k > start and self.keep[k]:
                    self.cache[k] = self.cache[k] or []
                    if len(self.cache[k]) > b:
                        self.cache[k][b] = h
                    else:
                        self.cache[k].append(h)
                h = self.segments[k].fn(h)
            y = self.labels[s:s + self.batch_size]
            logp = F.log_softmax(h.float(), dim=1)
            correct.append((h.argmax(1) == y).cpu())
            loss += F.nll_loss(logp, y, reduction="sum").double().cpu()
            if first:
                logps.append(logp)
            else:
                ref = self.float_logp[b]
                kl += (ref.exp() * (ref - logp)).sum().double().cpu()
        if first:
            self.float_logp = logps
        self.evaluations += 1
        return Outcome(torch.cat(correct), float(loss) / self.n, float(kl) / self.n)

    def set_base(self, config: dict, outcome: Outcome | None = None):
        """Make `config` the base: recompute the cached activations behind its first change.
        `outcome`, if known, saves that pass when nothing is cached."""
        config = self.full(config)
        start = self._first_changed_segment(self.base, config)
        if start < len(self.segments):
            if any(self.keep):
                self.base_outcome = self._run(config, start, store=True)
            else:
                self.base_outcome = outcome if outcome is not None else self._run(config, 0, store=False)
        self.base = config

    def evaluate(self, config: dict) -> Outcome:
        config = self.full(config)
        start = self._first_changed_segment(self.base, config)
        if start == len(self.segments):
            return self.base_outcome
        return self._run(config, start if any(self.keep) else 0, store=False)

    def correct(self, config: dict) -> int:
        return self.evaluate(config).n_correct

    def accuracy(self, config: dict) -> float:
        return self.evaluate(config).accuracy
