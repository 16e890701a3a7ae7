"""Learned rounding of one weight layer: AdaRound (Nagel et al. 2020, "Up or Down? Adaptive Rounding for
Post-Training Quantization", ICML, arXiv 2004.10568), on this project's weight grid.

The grid is the one every stage uses (quant/quantizer.py): symmetric, zero point 0, levels -q..q, one
scale per output channel from the MSE clip. Rounding to nearest picks floor(w/s) or floor(w/s) + 1 by
distance alone. AdaRound learns that choice per weight so that the layer reconstructs its float output
on calibration inputs (the paper's eq. 21-25):

    levels = clamp(floor(w / s) + h(V), -q, q),   h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)
    loss   = mean ||W x - W~ x||^2  +  lambda * sum(1 - |2 h(V) - 1|^beta)

V starts where h(V) equals the fractional part of w / s. The regularizer is off for the first
``warmup`` share of the iterations, then beta anneals from 20 to 2 on a half cosine, pushing every h to 0 or 1; at the
end h is rounded (h >= 0.5 rounds up). The scale stays the MSE scale, so the result is the same grid
with other levels. x is the float network's input to the layer and W x its float output (bias
included, before any activation), so the levels of a (layer, width) pair do not depend on the other
layers' widths and can be computed once and reused (utils/ptq.py caches them).

No I/O: the caller hands in the inputs and gets integer levels back.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from quant.quantizer import Quantizer

ZETA, GAMMA = 1.1, -0.1        # the paper's stretch of the rectified sigmoid


@dataclass(frozen=True)
class AdaRoundSettings:
    """Hyper-parameters of the fit (README "Post-training quantization" says how they were chosen)."""
    iterations: int = 2000
    batch_size: int = 32        # calibration images per step
    lr: float = 1e-2            # Adam on V
    reg: float = 0.01           # lambda, the rounding regularizer's weight
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2         # share of the iterations without the regularizer
    seed: int = 0

    def to_json(self) -> dict:
        return asdict(self)


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def initial_v(fraction: torch.Tensor) -> torch.Tensor:
    """V with h(V) = fraction (in [0, 1)): the inverse of the rectified sigmoid."""
    p = ((fraction - GAMMA) / (ZETA - GAMMA)).clamp(1e-6, 1 - 1e-6)
    return torch.log(p / (1 - p))


def _beta(step: int, s: AdaRoundSettings) -> float | None:
    """None during warm-up, then beta annealed from beta_start to beta_end on a half cosine."""
    start = int(s.warmup * s.iterations)
    if step < start:
        return None
    t = (step - start) / max(1, s.iterations - start)
    return s.beta_end + 0.5 * (s.beta_start - s.beta_end) * (1 + math.cos(math.pi * t))


def _forward(layer: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, w, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x, w, layer.bias)


class Rounding(nn.Module):
    """One layer's learnable rounding on `quantizer`'s grid (its scales kept): ``weight()`` is
    s * clamp(floor(w / s) + h(V), -q, q), V starting where h(V) is the fractional part of w / s."""

    def __init__(self, w: torch.Tensor, quantizer: Quantizer):
        super().__init__()
        w = w.detach().float()
        self.register_buffer("s", quantizer._scale(w).detach().float())
        self.register_buffer("base", torch.floor(w / self.s))
        self.qmin, self.qmax = quantizer.qmin, quantizer.qmax
        self.v = nn.Parameter(initial_v(w / self.s - self.base))

    def weight(self) -> torch.Tensor:
        return self.s * torch.clamp(self.base + rectified_sigmoid(self.v), self.qmin, self.qmax)

    def regularizer(self, beta: float) -> torch.Tensor:
        return (1 - (2 * rectified_sigmoid(self.v) - 1).abs().pow(beta)).sum()

    @torch.no_grad()
    def levels(self) -> torch.Tensor:
        """The integer levels (int32): h rounded (h >= 0.5 rounds up)."""
        up = (rectified_sigmoid(self.v) >= 0.5).float()
        return torch.clamp(self.base + up, self.qmin, self.qmax).to(torch.int32)


def reconstruct(roundings: list[Rounding], output, inputs: torch.Tensor, target: torch.Tensor,
                settings: AdaRoundSettings) -> list[torch.Tensor]:
    """Fit `roundings` jointly so that ``output(batch)`` (computed with their weights) reconstructs `target` on
    `inputs` (the paper's loss, with the regularizer summed over them); their integer levels."""
    opt = torch.optim.Adam([r.v for r in roundings], lr=settings.lr)
    g = torch.Generator(device="cpu").manual_seed(settings.seed)
    n = len(inputs)
    for step in range(settings.iterations):
        idx = torch.randint(0, n, (min(settings.batch_size, n),), generator=g).to(inputs.device)
        loss = (output(inputs[idx]) - target[idx]).square().flatten(1).sum(1).mean()
        beta = _beta(step, settings)
        if beta is not None:
            loss = loss + settings.reg * sum(r.regularizer(beta) for r in roundings)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return [r.levels() for r in roundings]


def learn_rounding(layer: nn.Module, quantizer: Quantizer, inputs: torch.Tensor,
                   settings: AdaRoundSettings = AdaRoundSettings()) -> torch.Tensor:
    """The learned integer levels (int32, the weight's shape) of `layer`'s weight on `quantizer`'s grid (its
    scales kept), fitted to reconstruct the layer's float output on `inputs` (its float inputs, [N, ...])."""
    if not isinstance(layer, (nn.Conv2d, nn.Linear)):
        raise TypeError(f"learned rounding needs a Conv2d or Linear layer, not {type(layer).__name__}")
    r = Rounding(layer.weight, quantizer)
    with torch.no_grad():
        target = _forward(layer, inputs, layer.weight.detach().float())
    return reconstruct([r], lambda x: _forward(layer, x, r.weight()), inputs, target, settings)[0]


def reconstruction_error(layer: nn.Module, levels: torch.Tensor, quantizer: Quantizer, inputs: torch.Tensor) -> float:
    """Mean squared error per sample of the layer's output with the weight at `levels` x scale, against float."""
    with torch.no_grad():
        w = layer.weight.detach().float()
        wq = levels.float() * quantizer._scale(w).detach().float()
        return float((_forward(layer, inputs, wq) - _forward(layer, inputs, w)).square().flatten(1).sum(1).mean())


def nearest_levels(layer: nn.Module, quantizer: Quantizer) -> torch.Tensor:
    return quantizer.integers(layer.weight.detach())


@torch.no_grad()
def layer_inputs(model: nn.Module, names, x: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """{layer: its input} when the (float, folded) `model` runs on the normalized images `x`."""
    got: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: got[n].append(i[0].detach()))
             for n in names]
    try:
        for s in range(0, len(x), batch_size):
            model(x[s:s + batch_size])
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v) for n, v in got.items()}


def fit_levels(model: nn.Module, pairs, inputs: dict[str, torch.Tensor], per_channel: bool = True, clip: str = "mse",
               weight_range: int = 8, settings: AdaRoundSettings = AdaRoundSettings(), on_fit=None) -> dict:
    """{(layer, bits): int8 levels} learned for every (layer, bits) of `pairs` on the folded float `model`,
    each from the layer's float inputs `inputs[layer]`; ``on_fit(layer, bits, levels)`` after each one."""
    from quant.quantizer import weight_quantizer
    out = {}
    for name, bits in pairs:
        layer = model.get_submodule(name)
        q = weight_quantizer(layer.weight, bits, per_channel, clip, weight_range=weight_range)
        with torch.enable_grad():
            out[name, bits] = learn_rounding(layer, q, inputs[name], settings).to(torch.int8)
        if on_fit is not None:
            on_fit(name, bits, out[name, bits])
    return out
