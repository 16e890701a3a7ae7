"""Fake quantization of weights (per channel, MSE clip) and activations (per tensor, calibrated).

Weights: symmetric signed uniform quantize-dequantize, 2-8 bits or float.

The grid is restricted-range signed with zero point 0 (levels -q..q, q = 2^(b-1) - 1), so zero
is exact and the grid is symmetric; 2 bits is ternary {-s, 0, s}. Scales are per output channel
(dim 0 of Conv2d/Linear weights) by default because CIFAR ResNet channels differ in magnitude by
orders of magnitude and one shared scale wastes most levels on the small ones.

All rounding is PyTorch's own fake_quantize_* ops, so the results match what torch.ao would
produce and carry a straight-through gradient for later quantization-aware training.

Activations: one scale per tensor, on an unsigned grid 0..2^a-1 where the tensor is never negative
(post-ReLU) and a symmetric signed grid otherwise (the stem's normalized image, MobileNetV2's linear
bottlenecks), measured on the calibration images. Ranges minimize the squared quantization error
of the calibration histogram (torch.ao's HistogramObserver, told the real number of levels).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from torch.ao.quantization.observer import HistogramObserver

from models.structure import quantizable_layers
from utils.config import ACT_BITS, FLOAT_BITS, WEIGHT_BITS
from utils.errors import UserError

CLIP_MODES = ("mse", "maxabs")
# Candidate clip ratios of max|w| for the MSE search: a log grid from 1.0 down to 0.03, largest first
# so that ties (all-zero channels, already-quantized weights) resolve to plain max-abs. 1.0 is exact,
# so the MSE clip is never worse than max-abs. The floor is low because one outlier can hold max|w|:
# a channel whose largest weight is 16 sigma out needs a clip near 0.1 of it at 2 bits, or every
# other weight rounds to zero.
MSE_RATIOS = torch.logspace(0.0, float(torch.log10(torch.tensor(0.03))), 120)
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
        self.current: dict[str, int] = {n: FLOAT_BITS for n in self.layers}
        self.originals = {n: m.weight.detach().clone() for n, m in self.layers.items()}
        self._cache: dict[tuple[str, int], torch.Tensor] = {}

    def quantized(self, name: str, bits: int) -> torch.Tensor:
        """The weight of layer `name` at `bits` (the float original at 32), computed once."""
        key = (name, bits)
        if key not in self._cache:
            self._cache[key] = quantize_weight(self.originals[name], bits, self.per_channel, self.clip)
        return self._cache[key]

    def apply(self, config: dict) -> dict[str, int]:
        """Set every layer to its weight width in `config` ({name: bits}, float if absent); return
        the full {name: bits} applied. Only layers whose width changes are copied."""
        unknown = [k for k in config if k not in self.layers]
        if unknown:
            raise UserError(f"bit configuration names layers this model does not have: {unknown}.")
        full = {n: config.get(n, FLOAT_BITS) for n in self.layers}
        for name, bits in full.items():
            _check(bits, self.clip)
        with torch.no_grad():
            for name, bits in full.items():
                if self.current[name] != bits:
                    self.layers[name].weight.copy_(self.quantized(name, bits))
                    self.current[name] = bits
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


# ---------------------------------------------------------------------------------------------
# activations


class _LevelsHistogramObserver(HistogramObserver):
    """HistogramObserver whose range search models the real number of levels.

    Its error model assumes 2^8 destination bins whatever quant_min/quant_max say, which would pick
    an 8-bit range for a 4-bit grid; this sets the bin count from the grid."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.dst_nbins = self.quant_max - self.quant_min + 1


@dataclass(frozen=True)
class ActQuant:
    """Per-tensor fake quantization of one layer's input at one width."""
    bits: int
    scale: float
    zero_point: int
    qmin: int
    qmax: int
    signed: bool

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, self.qmin, self.qmax)

    def levels(self) -> torch.Tensor:
        return (torch.arange(self.qmin, self.qmax + 1) - self.zero_point) * self.scale


def act_grid(bits: int, signed: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)


CALIBRATION_METHOD = ("mse: torch.ao HistogramObserver (2048 bins) with the grid's real number of levels; "
                      "signed inputs observed as |x| with 2^(a-1) levels")


@torch.no_grad()
def calibrate_activations(model: nn.Module, batches, layer_names, widths) -> dict[tuple[str, int], ActQuant]:
    """Ranges of every listed layer's input at every width, from float forward passes of `batches`
    (normalized image tensors of the calibration set, never validation or test images).

    A layer's input is signed unless it was >= 0 on every calibration value."""
    widths = sorted({int(b) for b in widths if b != FLOAT_BITS})
    for b in widths:
        if b not in ACT_BITS:
            raise UserError(f"activation width {b} is not supported; use 2-8, or 32 for float.")
    mods = dict(model.named_modules())
    batches = list(batches)
    lows = {n: float("inf") for n in layer_names}

    def record_min(name):
        def hook(_m, inputs):
            lows[name] = min(lows[name], float(inputs[0].min()))
        return hook

    def run(hooks):
        handles = [mods[n].register_forward_pre_hook(h) for n, h in hooks.items()]
        try:
            for x in batches:
                model(x)
        finally:
            for h in handles:
                h.remove()

    was_training = model.training
    model.eval()
    try:
        run({n: record_min(n) for n in layer_names})
        signed = {n: lows[n] < 0 for n in layer_names}
        # A signed input is observed as |x| on an unsigned grid of 2^(b-1) levels: the symmetric grid's
        # clip is then MSE-optimal too (a signed histogram search clips one side only, and the symmetric
        # scale would undo it by taking the larger side).
        observers = {(n, b): _LevelsHistogramObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine,
                                                       quant_min=0, quant_max=2 ** (b - 1 if signed[n] else b) - 1)
                     for n in layer_names for b in widths}

        def observe(name):
            def hook(_m, inputs):
                x = inputs[0].detach().float().cpu()
                x = x.abs() if signed[name] else x
                for b in widths:
                    observers[name, b](x)
            return hook
        run({n: observe(n) for n in layer_names})
    finally:
        model.train(was_training)
    out = {}
    for (n, b), obs in observers.items():
        scale, _ = obs.calculate_qparams()
        qmin, qmax = act_grid(b, signed[n])
        out[n, b] = ActQuant(b, float(scale), 0, qmin, qmax, signed[n])
    return out
