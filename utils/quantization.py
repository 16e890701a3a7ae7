"""Weight fake-quantization: symmetric signed uniform quantize-dequantize, 2-8 bits or float.

The grid is restricted-range signed with zero point 0 (levels -q..q, q = 2^(b-1) - 1), so zero
is exact and the grid is symmetric; 2 bits is ternary {-s, 0, s}. Scales are per output channel
(dim 0 of Conv2d/Linear weights) by default because CIFAR ResNet channels differ in magnitude by
orders of magnitude and one shared scale wastes most levels on the small ones.

All rounding is PyTorch's own fake_quantize_* ops, so the results match what torch.ao would
produce and carry a straight-through gradient for later quantization-aware training.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from utils.config import FLOAT_BITS, WEIGHT_BITS, full_config, quantizable_layers, validate_config
from utils.errors import UserError

CLIP_MODES = ("mse", "maxabs")
# Candidate clip ratios of max|w| for the MSE search, largest first so that ties (e.g. all-zero
# channels, already-quantized weights) resolve to plain max-abs. 1.0 is included exactly, which
# makes the MSE clip never worse than max-abs. 0.2 is well below the optimum even at 2 bits
# (about 0.4-0.5 of max|w| for Gaussian channels of CIFAR ResNet size).
MSE_RATIOS = torch.linspace(1.0, 0.2, 100)
# Floor on scales: all-zero channels would otherwise get scale 0 (division by zero, NaN).
SCALE_EPS = 1e-12
# Bound on the temporary (ratios x weights) tensor of the vectorized search, in elements.
_SEARCH_CHUNK = 1 << 20


def _check(bits, clip):
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in WEIGHT_BITS:
        raise UserError(f"weight width {bits!r} is not supported; widths must be integers 2-8, "
                        f"or {FLOAT_BITS} to leave the weights in float.")
    if clip not in CLIP_MODES:
        raise UserError(f"clip mode {clip!r} is not supported; use 'mse' (search the clip range "
                        f"that minimizes squared error) or 'maxabs' (clip at the largest weight).")


def _scales(rows: torch.Tensor, qmax: int, clip: str) -> torch.Tensor:
    """One scale per row of a 2-D float32 view; `rows` are channels, or the whole tensor as one row."""
    maxabs = rows.abs().amax(dim=1)
    if clip == "maxabs":
        return ((1.0 * maxabs) / qmax).clamp_min(SCALE_EPS)  # same expression as ratio 1.0 below
    c, k = rows.shape
    best_err = torch.full((c,), float("inf"), device=rows.device)
    best_scale = torch.empty(c, device=rows.device)
    step = max(1, _SEARCH_CHUNK // max(1, c * k))
    for start in range(0, len(MSE_RATIOS), step):
        r = MSE_RATIOS[start:start + step].to(rows.device)
        scales = ((r[:, None] * maxabs[None, :]) / qmax).clamp_min(SCALE_EPS).reshape(-1)
        x = rows.expand(len(r), c, k).reshape(len(r) * c, k)
        q = torch.fake_quantize_per_channel_affine(
            x, scales, torch.zeros_like(scales, dtype=torch.int32), 0, -qmax, qmax)
        err = (q - x).square().sum(dim=1).view(len(r), c)
        err_min, idx = err.min(dim=0)  # first minimum = largest ratio on ties
        better = err_min < best_err
        best_err = torch.where(better, err_min, best_err)
        best_scale = torch.where(better, scales.view(len(r), c).gather(0, idx[None])[0], best_scale)
    return best_scale


def quantize_weight(w: torch.Tensor, bits: int, per_channel: bool = True, clip: str = "mse") -> torch.Tensor:
    """Fake-quantized copy of `w` (same shape and dtype); `bits` 32 returns `w` itself.

    Gradients flow straight through (zero outside the clip range), as PyTorch's ops define.
    """
    _check(bits, clip)
    if bits == FLOAT_BITS:
        return w
    qmax = 2 ** (bits - 1) - 1
    x = w.float()
    if per_channel and x.dim() >= 1:
        with torch.no_grad():
            scale = _scales(x.detach().reshape(x.shape[0], -1), qmax, clip)
        zero = torch.zeros_like(scale, dtype=torch.int32)
        q = torch.fake_quantize_per_channel_affine(x, scale, zero, 0, -qmax, qmax)
    else:
        with torch.no_grad():
            scale = _scales(x.detach().reshape(1, -1), qmax, clip)[0]
        zero = torch.zeros((), dtype=torch.int32, device=x.device)
        q = torch.fake_quantize_per_tensor_affine(x, scale, zero, -qmax, qmax)
    return q.to(w.dtype)


def quantization_error(w: torch.Tensor, bits: int, per_channel: bool = True, clip: str = "mse") -> float:
    """Mean squared error that quantizing `w` introduces (0 for float)."""
    with torch.no_grad():
        return (quantize_weight(w, bits, per_channel, clip).float() - w.float()).square().mean().item()


class WeightQuantizer:
    """Switches a model's Conv2d/Linear weights between bit configurations, cheaply and reversibly.

    The float weights are snapshotted at construction (build it after training or loading), and
    every configuration is applied starting from them, so the order in which configurations are
    applied never matters. Quantized weights are cached per (layer, bits): a search over many
    configurations quantizes each layer at most once per width, and applying is a plain copy.
    """

    def __init__(self, model: nn.Module, per_channel: bool = True, clip: str = "mse"):
        _check(8, clip)
        self.model, self.per_channel, self.clip = model, per_channel, clip
        self.layers = quantizable_layers(model)
        self.originals = {n: m.weight.detach().clone() for n, m in self.layers.items()}
        self._cache: dict[tuple[str, int], torch.Tensor] = {}

    def quantized(self, name: str, bits: int) -> torch.Tensor:
        """The weight of layer `name` at `bits` (the float original at 32), computed once."""
        key = (name, bits)
        if key not in self._cache:
            self._cache[key] = quantize_weight(self.originals[name], bits, self.per_channel, self.clip)
        return self._cache[key]

    def apply(self, config: dict) -> dict[str, int]:
        """Set every layer to its width in `config` (float if absent); return the full config applied."""
        full = full_config(validate_config(config, self.layers), self.layers)
        with torch.no_grad():
            for name, bits in full.items():
                self.layers[name].weight.copy_(self.quantized(name, bits))
        return full

    def restore(self) -> None:
        """Put the original float weights back."""
        self.apply({})

    @contextmanager
    def applied(self, config: dict):
        """`with wq.applied(cfg) as full:` evaluates under `cfg`, restoring float weights on exit."""
        try:
            yield self.apply(config)
        finally:
            self.restore()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()
        return False
