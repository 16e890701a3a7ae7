"""The one quantizer of AI-QS, used by evaluation, fine-tuning and export alike.

``Quantizer`` is uniform with zero point 0, per tensor or per output channel (axis 0):

* weights: a restricted-range signed grid, levels -q..q with q = 2^(b-1) - 1, so zero is exact and
  the grid symmetric (2 bits is ternary); one scale per output channel by default, chosen to
  minimize the squared error over a log grid of clip ratios (``weight_quantizer``). A weight
  *range* r < b keeps a b-bit weight on the levels of an r-bit one, q = 2^(r-1) - 1, still stored
  (and charged) in b bits: 8-bit weights in range 7 use -63..63, which ONNX Runtime's x86 kernels
  without VNNI multiply exactly (``weight_grid``);
* tensors: one scale per tensor, an unsigned grid 0..2^b - 1 where the tensor is never negative
  (after a ReLU) and a signed grid -2^(b-1)..2^(b-1) - 1 otherwise, with calibrated ranges
  (``tensor_quantizer``; quant/calibrate.py).

One object, three forms:

* **fake-quantize** (eval mode): ``fake_quantize``, the arithmetic of torch's
  ``fake_quantize_per_{tensor,channel}_affine`` bit for bit, without its mask (several times faster on the
  CPU); where autograd needs a gradient to x, torch's op itself (straight through where round(x/s) is on the
  grid);
* **trainable** (train mode): the same forward, with the LSQ gradients (Esser et al. 2019,
  arXiv 1902.08153): straight-through inside the clip range, zero outside, and d/ds as the paper's
  eq. 3 scaled by g = 1/sqrt(N * Qmax); the scale is a parameter, learned or held fixed;
* **integers** (export): ``integers(x)`` are the levels an int8/uint8 tensor stores, and
  ``qparams()`` the scale, zero point and storage type.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from quant.errors import UserError
from quant.widths import ACT_BITS, FLOAT_BITS, WEIGHT_BITS

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


# The weight ranges (bits of levels an 8-bit weight uses): 8 is the full int8 grid -127..127. ONNX Runtime's x86
# kernel for uint8 x int8 without VNNI (AVX2 `vpmaddubsw`) adds two products in int16 and saturates:
# 2 x 255 x 127 = 64,770 > 32,767. In range 7 (-63..63) the pair is at most 2 x 255 x 63 = 32,130: exact.
WEIGHT_RANGES = (7, 8)
# By target: ort-cpu runs on any x86 CPU, with or without VNNI (a file made on one runs on the other), so
# it simulates the range every one of them computes exactly; generic models hardware without that defect.
DEFAULT_WEIGHT_RANGE = {"generic": 8, "ort-cpu": 7}


def check_weight_range(weight_range):
    if isinstance(weight_range, bool) or weight_range not in WEIGHT_RANGES:
        raise UserError(f"weight range {weight_range!r} is not supported; use 8 (int8 weights on the full grid "
                        f"-127..127) or 7 (-63..63, which ONNX Runtime's x86 kernels compute exactly on CPUs "
                        f"without VNNI).")


def check_weight_args(bits, clip="mse"):
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in WEIGHT_BITS:
        raise UserError(f"weight width {bits!r} is not supported; widths must be integers 2-8, "
                        f"or {FLOAT_BITS} to leave the weights in float.")
    if clip not in CLIP_MODES:
        raise UserError(f"clip mode {clip!r} is not supported; use 'mse' (search the clip range "
                        f"that minimizes squared error) or 'maxabs' (clip at the largest weight).")


def weight_grid(bits: int, weight_range: int = 8) -> tuple[int, int]:
    """Levels (-q, q) of a `bits`-wide weight: the r-bit grid within it when the range r is narrower."""
    q = 2 ** (min(bits, weight_range) - 1) - 1
    return -q, q


def tensor_grid(bits: int, signed: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)


def search_scales(rows: torch.Tensor, qmax: int, clip: str) -> torch.Tensor:
    """One scale per row of a 2-D float32 view (rows are channels, or the whole tensor as one row)
    for the grid -qmax..qmax: max-abs, or the clip ratio of max-abs with the least squared error."""
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
        q = fake_quantize(x, scales[:, None], -qmax, qmax)
        err = (q - x).square().sum(dim=1).view(len(r), c)
        err_min, idx = err.min(dim=0)  # first minimum = largest ratio on ties
        better = err_min < best_err
        best_err = torch.where(better, err_min, best_err)
        best_scale = torch.where(better, scales.view(len(r), c).gather(0, idx[None])[0], best_scale)
    return best_scale


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """`x` (float32) on the grid qmin..qmax of `scale` (float32, broadcast against x): round(x * (1/s)), half to
    even, clamped, times s. Bit for bit the values of torch.fake_quantize_per_{tensor,channel}_affine (which also
    multiply by the float32 reciprocal), in a fraction of their time on the CPU: no mask is kept."""
    return (x * scale.reciprocal()).round_().clamp_(qmin, qmax).mul_(scale)


def _out(q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The quantized values in x's dtype, but never rounded to a half type: 16-bit floats (bf16 autocast) cannot
    hold levels x scale exactly, so the grid stays float32 there."""
    return q if x.dtype in (torch.float16, torch.bfloat16) else q.to(x.dtype)


class _LSQ(torch.autograd.Function):
    """Fake quantization with the LSQ gradients; `scale` broadcasts against x (per tensor: shape [1];
    per channel: [C, 1, ...]). d/dx = 1 where qmin <= x/s <= qmax, else 0; d/ds = round(x/s) - x/s
    inside, qmin or qmax outside, times `g`, summed per scale."""

    @staticmethod
    def forward(ctx, x, scale, qmin, qmax, g):
        v = x * scale.reciprocal()
        q = v.clamp(qmin, qmax)
        inside = q == v
        q.round_()
        if ctx.needs_input_grad[1]:
            ctx.save_for_backward(inside, torch.where(inside, q - v, q))
        else:
            ctx.save_for_backward(inside)
        ctx.g, ctx.scale_shape = g, scale.shape
        return q.mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        gx = grad * saved[0]
        if not ctx.needs_input_grad[1]:
            return gx, None, None, None, None
        prod = grad * saved[1]
        if len(ctx.scale_shape) == 1 and ctx.scale_shape[0] == 1:
            gs = prod.sum().reshape(1)
        else:
            gs = prod.sum(dim=tuple(range(1, prod.dim())), keepdim=True).reshape(ctx.scale_shape)
        return gx, gs * ctx.g, None, None, None


class Quantizer(nn.Module):
    """Uniform quantization with zero point 0 on the integer grid qmin..qmax, one scale per tensor
    (axis None) or per slice along axis 0. See the module docstring for its three forms."""

    kernel = "arithmetic"   # of the no-gradient form; "torch" (its op) only to measure the difference (quant.evaluation)

    def __init__(self, scale, qmin: int, qmax: int, axis: int | None = None, learn: bool = False,
                 per_sample: bool = True):
        super().__init__()
        scale = torch.as_tensor(scale, dtype=torch.float32).detach().clone().reshape(-1)
        if axis is None and scale.numel() != 1:
            raise ValueError("a per-tensor quantizer has one scale")
        self.qmin, self.qmax, self.axis = int(qmin), int(qmax), axis
        self.per_sample = per_sample   # dim 0 is the batch (a tensor), not output channels (a weight)
        self.scale = nn.Parameter(scale, requires_grad=learn)

    @property
    def signed(self) -> bool:
        return self.qmin < 0

    @property
    def bits(self) -> int:
        return math.ceil(math.log2(self.qmax - self.qmin + 1))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, grid=[{self.qmin}, {self.qmax}], axis={self.axis}, learn={self.scale.requires_grad}"

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scale.clamp_min(SCALE_EPS)
        return s if self.axis is None else s.view(-1, *([1] * (x.dim() - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self._scale(x)
        if self.training and torch.is_grad_enabled():
            # LSQ's N: the elements one scale covers, per sample for a tensor
            n = x[0].numel() if x.dim() > 1 and (self.per_sample or self.axis is not None) else x.numel()
            g = 1.0 / math.sqrt(n * max(abs(self.qmin), self.qmax))
            return _out(_LSQ.apply(x.float(), s, self.qmin, self.qmax, g), x)
        s = s.detach()
        if (torch.is_grad_enabled() and x.requires_grad) or self.kernel == "torch":
            # torch's op: straight through where round(x/s) fits the grid
            if self.axis is None:
                return _out(torch.fake_quantize_per_tensor_affine(x.float(), float(s), 0, self.qmin, self.qmax), x)
            zero = torch.zeros(s.numel(), dtype=torch.int32, device=x.device)
            return _out(torch.fake_quantize_per_channel_affine(x.float(), s.reshape(-1), zero, self.axis, self.qmin,
                                                                self.qmax), x)
        return _out(fake_quantize(x.float(), s, self.qmin, self.qmax), x)

    @torch.no_grad()
    def integers(self, x: torch.Tensor) -> torch.Tensor:
        """The integer levels of `x` on this grid (int32): what the fake-quantized value divides by its scale."""
        s = self._scale(x).detach().float()
        return torch.clamp(torch.round(x.float() * s.reciprocal()), self.qmin, self.qmax).to(torch.int32)

    def qparams(self) -> dict:
        """Scale(s), zero point and the storage type an exporter writes."""
        s = self.scale.detach().clamp_min(SCALE_EPS).float().cpu()
        dtype = "int8" if self.signed else "uint8"
        return {"scale": s if self.axis is not None else float(s), "zero_point": 0, "dtype": dtype,
                "qmin": self.qmin, "qmax": self.qmax, "axis": self.axis}


def weight_quantizer(w: torch.Tensor, bits: int, per_channel: bool = True, clip: str = "mse",
                     learn: bool = False, weight_range: int = 8) -> Quantizer:
    """The quantizer of weight `w` at `bits` (not 32): symmetric signed grid (within `weight_range`), MSE (or
    max-abs) scales."""
    check_weight_args(bits, clip)
    check_weight_range(weight_range)
    if bits == FLOAT_BITS:
        raise ValueError("float weights have no quantizer")
    qmin, qmax = weight_grid(bits, weight_range)
    with torch.no_grad():
        x = w.detach().float()
        rows = x.reshape(x.shape[0], -1) if per_channel and x.dim() >= 1 else x.reshape(1, -1)
        scale = search_scales(rows, qmax, clip)
    return Quantizer(scale, qmin, qmax, 0 if per_channel and x.dim() >= 1 else None, learn, per_sample=False)


def learned_weight(w: torch.Tensor, bits: int, levels: torch.Tensor, per_channel: bool = True, clip: str = "mse",
                   weight_range: int = 8) -> torch.Tensor:
    """The weight `w` at `bits` with learned integer `levels` (quant/adaround.py) on the grid and scales that
    round-to-nearest would use: levels x scale, a value the quantizer maps back to exactly `levels`."""
    return levels_weight(weight_quantizer(w, bits, per_channel, clip, weight_range=weight_range), w, levels)


def levels_weight(q: Quantizer, w: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Integer `levels` on the weight quantizer `q` (made for `w`): levels x its scales, in `w`'s dtype."""
    if levels.shape != w.shape or int(levels.min()) < q.qmin or int(levels.max()) > q.qmax:
        raise ValueError(f"learned levels of shape {tuple(levels.shape)} in [{int(levels.min())}, {int(levels.max())}] "
                         f"do not fit a weight of shape {tuple(w.shape)} on the grid [{q.qmin}, {q.qmax}]")
    return (levels.to(w.device).float() * q._scale(w).detach()).to(w.dtype)


def tensor_quantizer(scale: float, bits: int, signed: bool, learn: bool = False) -> Quantizer:
    if bits not in ACT_BITS or bits == FLOAT_BITS:
        raise UserError(f"tensor width {bits!r} is not supported; use 2-8 bits, or 32 to leave a tensor in float.")
    return Quantizer(torch.tensor([float(scale)]), *tensor_grid(bits, signed), axis=None, learn=learn)


def quantize_weight(w: torch.Tensor, bits: int, per_channel: bool = True, clip: str = "mse",
                    weight_range: int = 8) -> torch.Tensor:
    """Fake-quantized copy of `w` (same shape and dtype); `bits` 32 returns `w` itself."""
    check_weight_args(bits, clip)
    if bits == FLOAT_BITS:
        return w
    return weight_quantizer(w, bits, per_channel, clip, weight_range=weight_range).eval()(w)
