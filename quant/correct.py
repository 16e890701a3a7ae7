"""Statistics correction of a quantized, BN-folded network: its layers' output statistics set back to the float
network's, per output channel, with the integer levels kept.

Quantization shifts the mean (and the spread) of each layer's output, and the shift compounds through the
network. Bias correction (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias
Correction", arXiv 1906.04721; the empirical form of Finkelstein et al. 2019, arXiv 1906.03193) moves each
output channel's mean back to the float one; BN re-estimation (re-computing BN's running statistics on the
quantized network before folding, as in Hubara et al. 2021, arXiv 2006.10518, and torch.ao's QAT recipes) also
restores the spread. In the folded form both are one affine map per output channel of a conv that had a BN:

    y' = (y - mu_q) * r + mu_f,   r = sigma_f / sigma_q   ("bn";  "bias": r = 1)

where mu and sigma are the channel's output mean and standard deviation over calibration images and positions,
_q in the quantized network (its inputs already corrected upstream), _f in the float one. The map folds into
the layer: W' = r W and b' = r (b - mu_q) + mu_f. A per-channel weight scale s becomes r s, so the integer
levels stay what they were (learned rounding included) and the grid stays symmetric.

The statistics of the quantized network depend on the whole configuration, so the correction is computed per
configuration, in one forward pass over the calibration images: each layer's output is corrected as it is
computed, so the layers after it see what the corrected network computes. No I/O.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

MODES = ("none", "bias", "bn")
EPS = 1e-5


@dataclass(frozen=True)
class Correction:
    """One layer's per-channel correction: y' = (y - mu_q) * r + mu_f (weights scaled by r, bias replaced)."""
    r: torch.Tensor
    mu_q: torch.Tensor
    mu_f: torch.Tensor

    def bias(self, b: torch.Tensor | None) -> torch.Tensor:
        b = torch.zeros_like(self.mu_q) if b is None else b
        return (b - self.mu_q) * self.r + self.mu_f

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.r.view(-1, *([1] * (w.dim() - 1)))


def _dims(y: torch.Tensor) -> list[int]:
    return [0, *range(2, y.dim())]


def _per_channel(v: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, *([1] * (y.dim() - 2)))


def _spread(centred: torch.Tensor) -> torch.Tensor:
    """The per-channel standard deviation (plus EPS under the root) of an already centred output."""
    n = centred.numel() // centred.shape[1]
    return torch.sqrt(torch.linalg.vector_norm(centred, dim=_dims(centred)).square() / n + EPS)


def channel_stats(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation of a layer output [N, C, ...] over images and positions (the same
    arithmetic as the correcting hook's, so equal outputs give equal statistics bit for bit)."""
    mean = y.mean(dim=_dims(y))
    return mean, _spread(y - _per_channel(mean, y))


@torch.no_grad()
def output_stats(model: nn.Module, layers, x) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (mean, std)} of each layer's output in `model` on the (normalized) images `x`, one pass (`x` may
    also be a callable that runs the pass)."""
    out = {}

    def hook(name):
        return lambda mod, inp, y: out.__setitem__(name, channel_stats(y))
    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in layers]
    try:
        x() if callable(x) else model(x)
    finally:
        for h in handles:
            h.remove()
    return out


def _correcting_hook(name: str, float_stats: dict, mode: str, found: dict):
    """A forward hook that corrects layer `name`'s output in place as it is computed and records the correction.
    Where the output's statistics equal the float ones exactly (nothing quantized in front of it), it changes
    nothing, so a float prefix stays bit for bit the float network."""
    def fn(mod, inp, y):
        mu_f, sd_f = float_stats[name]
        mu_q = y.mean(dim=_dims(y))
        if torch.equal(mu_q, mu_f) and torch.equal(channel_stats(y)[1], sd_f):
            return None
        y.sub_(_per_channel(mu_q, y))
        r = sd_f / _spread(y) if mode == "bn" else torch.ones_like(mu_q)
        found[name] = Correction(r, mu_q, mu_f)
        return y.mul_(_per_channel(r, y)).add_(_per_channel(mu_f, y))
    return fn


def check_mode(mode: str):
    if mode not in MODES or mode == "none":
        raise ValueError(f"correction mode {mode!r}: use 'bias' or 'bn'")


@torch.no_grad()
def correcting_pass(model: nn.Module, layers, float_stats: dict, mode: str, run) -> dict[str, Correction]:
    """Run `run()` (a forward pass of `model` over the calibration images, whole or in part) with every layer in
    `layers` corrected as it computes; returns the corrections found. `model` is left as it was."""
    check_mode(mode)
    found = {}
    handles = [model.get_submodule(n).register_forward_hook(_correcting_hook(n, float_stats, mode, found))
               for n in layers]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return found


@torch.no_grad()
def corrections(qmodel: nn.Module, float_stats: dict, x: torch.Tensor, mode: str = "bn") -> dict[str, Correction]:
    """The correction of every layer in `float_stats` for the quantized folded `qmodel` on the (normalized)
    calibration images `x` (the ones `float_stats` were taken on), each layer corrected before the next one
    sees its output. `qmodel` is left as it was; `apply_` folds the result into it."""
    return correcting_pass(qmodel, list(float_stats), float_stats, mode, lambda: qmodel(x))


@torch.no_grad()
def apply_(model: nn.Module, found: dict[str, Correction]) -> nn.Module:
    """Fold the corrections into `model`'s layers in place (weights x r, biases replaced) and return it. A weight
    parametrized by its quantizer (quant.place.quantize_(trainable=True), the export's form) gets the quantized
    weight x r as its original and its per-channel scales x r, so it keeps its integer levels."""
    for name, c in found.items():
        layer = model.get_submodule(name)
        if parametrize.is_parametrized(layer, "weight"):
            q, w = layer.parametrizations.weight[0], layer.weight
            if q.axis is None and not torch.all(c.r == 1):
                raise ValueError(f"{name}: a per-tensor weight scale cannot take a per-channel correction")
            if q.axis is not None:
                q.scale.mul_(c.r)
            layer.parametrizations.weight.original.copy_(c.weight(w))
        else:
            layer.weight.copy_(c.weight(layer.weight))
        if layer.bias is None:
            layer.bias = nn.Parameter(c.bias(None).to(layer.weight.dtype))
        else:
            layer.bias.copy_(c.bias(layer.bias))
    return model
