"""Accuracy of a model under many bit configurations, reusing what does not change.

The network is a chain of segments (stem, blocks, head). A candidate configuration that
differs from the current base only in layers of segment k computes exactly what the base
computes in front of k, so the base's input activations of every segment are kept on the
device and a candidate runs from segment k on. Stage 2 (one layer at a time against the
float base) and the greedy search (one move at a time against the current configuration)
both evaluate mostly suffixes this way.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from utils.config import full_config, quantizable_layers


class FoldedModel:
    """An inference copy of `model` with every BatchNorm folded into the conv before it.

    Folding happens after quantization (sync() reads the source model's current, possibly
    fake-quantized, weights), so the quantized weights are those of the deployed conv and
    only the cheap per-channel affine of BN moves into it. Saves the BN pass (a fifth of
    CPU inference time for ResNet-20)."""

    def __init__(self, model: nn.Module):
        self.src = model
        self.model = copy.deepcopy(model).eval()
        src_mods, dst_mods = dict(model.named_modules()), dict(self.model.named_modules())
        self.pairs = []  # (layer name, source layer, folded layer, source BN or None)
        for name in quantizable_layers(model):
            parent, _, leaf = name.rpartition(".")
            bn_name = (f"{parent}." if parent else "") + (leaf.replace("conv", "bn") if leaf.startswith("conv")
                                                           else str(int(leaf) + 1) if leaf.isdigit() else "")
            bn = src_mods.get(bn_name)
            if isinstance(src_mods[name], nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                conv = dst_mods[name]
                conv.bias = nn.Parameter(torch.zeros(conv.out_channels, device=conv.weight.device))
                bn_parent, _, bn_leaf = bn_name.rpartition(".")
                setattr(dst_mods[bn_parent] if bn_parent else self.model, bn_leaf, nn.Identity())
            else:
                bn = None
            self.pairs.append((name, src_mods[name], dst_mods[name], bn))
        self.sync()

    @torch.no_grad()
    def sync(self):
        for _, src, dst, bn in self.pairs:
            if bn is None:
                dst.weight.copy_(src.weight)
                if src.bias is not None:
                    dst.bias.copy_(src.bias)
            else:
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                dst.weight.copy_(src.weight * scale.view(-1, 1, 1, 1))
                dst.bias.copy_(bn.bias - bn.running_mean * scale)


def segment_layers(model) -> list[tuple[str, object, list[str]]]:
    """(segment name, callable, names of the quantizable layers inside it), in order."""
    names = list(quantizable_layers(model))
    out = []
    for seg_name, fn in model.segments():
        if seg_name == "stem":
            inside = [n for n in names if "." not in n and n != "linear"]
        elif seg_name == "head":
            inside = [n for n in names if n == "linear"]
        else:
            inside = [n for n in names if n.startswith(seg_name + ".")]
        out.append((seg_name, fn, inside))
    covered = [n for _, _, inside in out for n in inside]
    assert sorted(covered) == sorted(names), f"segments miss layers: {set(names) - set(covered)}"
    return out


class CachedEvaluator:
    """Validation accuracy (percent) of `model` under bit configurations.

    `quantizer` is a utils.quantization.WeightQuantizer of the same model. The inputs of
    every segment under the base configuration are cached for the whole split (about 2 GB
    for ResNet-20 on 5,000 images in fp32).
    """

    def __init__(self, model, quantizer, x_u8, labels, normalize, batch_size=1000, base_config=None,
                 cache_activations=True):
        self.model, self.quantizer = model.eval(), quantizer
        self.folded = FoldedModel(model)
        self.cache_activations = cache_activations
        self.x_u8, self.labels, self.normalize = x_u8, labels, normalize
        self.batch_size = batch_size
        self.segments = segment_layers(self.folded.model)
        self.layer_names = [n for _, _, inside in self.segments for n in inside]
        self.segment_of = {n: i for i, (_, _, inside) in enumerate(self.segments) for n in inside}
        self.cache: list[list[torch.Tensor] | None] = [None] * len(self.segments)
        self.base = None
        self.base_correct = None
        self.evaluations = 0
        self.set_base(base_config or {})

    @property
    def n(self) -> int:
        return len(self.labels)

    def _first_changed_segment(self, a: dict, b: dict) -> int:
        changed = [self.segment_of[n] for n in self.layer_names if a[n] != b[n]]
        return min(changed) if changed else len(self.segments)

    @torch.inference_mode()
    def _run(self, config: dict, start: int, store: bool) -> int:
        """Correct predictions of `config`, running segments start.. from the cache.

        With store=True the segment inputs computed on the way replace the cache."""
        self.quantizer.apply(config)
        self.folded.sync()
        correct = torch.zeros((), dtype=torch.long, device=self.labels.device)
        for b, s in enumerate(range(0, self.n, self.batch_size)):
            h = self.normalize(self.x_u8[s:s + self.batch_size]) if start == 0 else self.cache[start][b]
            for k in range(start, len(self.segments)):
                if store and k > start:
                    self.cache[k] = self.cache[k] or []
                    if len(self.cache[k]) > b:
                        self.cache[k][b] = h
                    else:
                        self.cache[k].append(h)
                h = self.segments[k][1](h)
            correct += (h.argmax(1) == self.labels[s:s + self.batch_size]).sum()
        self.evaluations += 1
        return int(correct.item())

    def set_base(self, config: dict):
        """Make `config` the base: recompute the cached activations behind its first change."""
        config = full_config(config, self.layer_names)
        start = 0 if self.base is None else self._first_changed_segment(self.base, config)
        if start == len(self.segments):
            return
        if start == 0 or not self.cache_activations:
            start, self.cache = 0, [None] * len(self.segments)
        self.base_correct = self._run(config, start, store=self.cache_activations)
        self.base = config

    @property
    def base_accuracy(self) -> float:
        return 100.0 * self.base_correct / self.n

    def correct(self, config: dict) -> int:
        config = full_config(config, self.layer_names)
        start = self._first_changed_segment(self.base, config)
        if start == len(self.segments):
            return self.base_correct
        return self._run(config, start if self.cache_activations else 0, store=False)

    def accuracy(self, config: dict) -> float:
        return 100.0 * self.correct(config) / self.n
