"""What a quantizable model says about itself, so that no code guesses it from names.

Every model's structure is derived from its traced graph (models/graph.py: the registry's models and those
from outside it alike); the registry's hand declarations of it are frozen test data (tests/declared.py) that the
derived structures equal. A model has:

* ``kernels(target)``: the kernels a deployment compiler runs, in order (``Kernel``). A kernel is
  what the runtime fuses into one pass over memory; ``target`` names the runtime's fusion:
  ``"generic"`` (TensorRT's usual fusion: conv + BN + ReLU, and the residual add fused into the
  conv in front of it) or ``"ort-cpu"`` (ONNX Runtime's CPU kernels: the residual add is its own
  kernel, reading a quantized conv output). Every kernel writes one tensor, named after it; it reads
  tensors written by earlier kernels, or ``"input"`` (the image).
* ``tensors(target)``: every tensor (``Tensor``): its name, the ``Slot`` module the forward pass
  runs it through where it is written, and whether it can be negative. A tensor's width is set
  there, once, and every consumer reads that same quantized tensor. A tensor the runtime materializes by
  moving another's elements, without requantizing them (shortcut A's Slice and Pad under ``ort-cpu``),
  ``follows`` that tensor: it has no width of its own, is written and read at its source's width, and
  its Slot holds no quantizer (the values are already on the source's grid; the padding is zero).
* ``segments(target)``: the network as a chain of ``Segment(name, fn, kernels)``; running every
  ``fn`` in order equals ``forward``. The prefix-cached evaluator caches the input of each segment.
* ``conv_bn_pairs()``: ``(conv name, BN name)`` for every BatchNorm that directly normalizes one
  conv's output and nothing else, i.e. can be folded into that conv.

``check_structure`` verifies the declarations against the modules themselves.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

TARGETS = ("generic", "ort-cpu")
DEFAULT_TARGET = "generic"
INPUT = "input"   # the image tensor: read by the stem, written by no kernel


class Slot(nn.Module):
    """Where a tensor is written: identity until a quantizer is attached (``slot.quant``), then the
    tensor every consumer reads is the quantized one. Holds no state of its own, so checkpoints of
    float models are unchanged by it."""

    def __init__(self):
        super().__init__()
        self.quant = None

    def forward(self, x):
        return x if self.quant is None else self.quant(x)


class Add(nn.Module):
    """The residual add, as a module so that what it reads can be hooked."""

    def forward(self, a, b):
        return a + b


@dataclass(frozen=True)
class Read:
    tensor: str
    fraction: float = 1.0   # the share of the tensor's elements the kernel reads (shortcut A: 1/4)


def covered(n: int, k: int, s: int, p: int, d: int) -> list[int]:
    """Input positions (0..n-1) along one axis that some window of a convolution touches (kernel k, stride s,
    padding p, dilation d): what it reads, as the trace measures it (quant/trace.py)."""
    out = (n + 2 * p - d * (k - 1) - 1) // s + 1
    return sorted({o * s - p + j * d for o in range(out) for j in range(k)} & set(range(n)))


def conv_read_fraction(conv: nn.Conv2d, spatial: tuple[int, ...]) -> float:
    """The share of an input of spatial size `spatial` that `conv` uses, exactly (a size its windows do not
    fit leaves the last rows or columns unread); the traced-graph structure charges this."""
    f = 1.0
    for n, k, s, p, d in zip(spatial, conv.kernel_size, conv.stride, conv.padding, conv.dilation):
        f *= len(covered(n, k, s, p, d)) / n
    return f


def strided_fraction(conv: nn.Conv2d) -> float:
    """The share of its input's elements a convolution uses: a kernel is charged the elements it uses. Where the
    kernel is narrower than the stride (a 1x1 stride-2 projection) each spatial axis uses k / s of its positions
    (exact when the size divides by the stride, as in every model here); where the windows overlap or touch,
    every element. quant/trace.py measures the same on the real tensors."""
    f = 1.0
    for k, s, d in zip(conv.kernel_size, conv.stride, conv.dilation):
        span = (k - 1) * d + 1
        if span < s:
            f *= k / s if d == 1 else min(k, span) / s
    return f


@dataclass(frozen=True)
class Kernel:
    name: str
    layers: tuple[str, ...]     # Conv2d/Linear modules whose weights the kernel reads
    reads: tuple[Read, ...]
    writes: str                 # the tensor it writes (named after the kernel)
    ops: tuple[str, ...]        # the modules that read the kernel's input tensors (hooked by the trace)


@dataclass(frozen=True)
class Tensor:
    name: str
    slot: str                   # module path of its Slot
    signed: bool                # False: never negative by construction (after a ReLU, or pooled from one)
    follows: str | None = None  # a copy of that tensor's elements at its width (no width, no quantizer of its own)


def widths_of_their_own(tensors) -> list:
    """The tensors that have a width of their own (a configuration's tensor groups): all but the followers."""
    return [t for t in tensors if t.follows is None]


@dataclass(frozen=True)
class Segment:
    name: str
    fn: Callable
    kernels: tuple[str, ...]


DEFAULT_INPUT_SHAPE = (1, 3, 32, 32)


def input_shape(model: nn.Module) -> tuple[int, ...]:
    """The shape of one image the model takes: a traced model records it; the registry's take 32x32."""
    return tuple(getattr(model, "input_shape", DEFAULT_INPUT_SHAPE))


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Conv2d and Linear modules by name, in registration order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def module_name(model: nn.Module, module: nn.Module) -> str:
    names = {id(m): n for n, m in model.named_modules()}
    if id(module) not in names:
        raise KeyError(f"{type(module).__name__} is not a submodule of {type(model).__name__}")
    return names[id(module)]


def check_target(target: str) -> str:
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    return target


def check_structure(model: nn.Module, target: str = DEFAULT_TARGET) -> None:
    """Raise ValueError if the declared kernels, tensors, segments or conv-BN pairs do not fit the
    modules or each other."""
    mods = dict(model.named_modules())
    layers = quantizable_layers(model)
    kernels = model.kernels(target)
    tensors = {t.name: t for t in model.tensors(target)}
    declared = [n for k in kernels for n in k.layers]
    dupes = sorted({n for n in declared if declared.count(n) > 1})
    missing, unknown = sorted(set(layers) - set(declared)), sorted(set(declared) - set(layers))
    if dupes or missing or unknown:
        raise ValueError(f"{type(model).__name__}.kernels() must name every Conv2d/Linear exactly once: "
                         f"repeated {dupes}, missing {missing}, unknown {unknown}")
    written = [INPUT]
    for k in kernels:
        for r in k.reads:
            if r.tensor not in written:
                raise ValueError(f"kernel {k.name!r} reads {r.tensor!r} before any kernel writes it")
            if not 0 < r.fraction <= 1:
                raise ValueError(f"kernel {k.name!r} reads a fraction {r.fraction} of {r.tensor!r}")
        if k.writes != k.name or k.writes in written:
            raise ValueError(f"kernel {k.name!r} must write one new tensor named after it, not {k.writes!r}")
        written.append(k.writes)
        bad_ops = [o for o in k.ops if o not in mods]
        if bad_ops or not k.ops:
            raise ValueError(f"kernel {k.name!r}: ops {bad_ops or '(none)'} are not modules of the model")
    names = [t.name for t in model.tensors(target)]   # a list: `tensors` would hide a name declared twice
    if sorted(written) != sorted(names):
        raise ValueError(f"tensors() must list exactly the input and one tensor per kernel: "
                         f"missing {sorted(set(written) - set(tensors))}, unknown {sorted(set(tensors) - set(written))}, "
                         f"repeated {sorted({n for n in names if names.count(n) > 1})}")
    for t in tensors.values():
        if not isinstance(mods.get(t.slot), Slot):
            raise ValueError(f"tensor {t.name!r}: {t.slot!r} is not a Slot of the model")
        src = tensors.get(t.follows) if t.follows is not None else None
        if t.follows is not None and (src is None or src.follows is not None or written.index(src.name) >=
                                      written.index(t.name) or t.signed != src.signed):
            raise ValueError(f"tensor {t.name!r} follows {t.follows!r}, which must be an earlier tensor with a "
                             f"width of its own and the same sign")
    slots = [t.slot for t in tensors.values()]
    if len(set(slots)) != len(slots):
        raise ValueError("two tensors share one Slot")
    seg_kernels = [k for seg in model.segments(target) for k in seg.kernels]
    if seg_kernels != [k.name for k in kernels]:
        raise ValueError(f"{type(model).__name__}.segments() must list every kernel once, in kernel order")
    seen_bn = set()
    for conv, bn in model.conv_bn_pairs():
        c, b = mods.get(conv), mods.get(bn)
        if not isinstance(c, nn.Conv2d) or not isinstance(b, nn.BatchNorm2d):
            raise ValueError(f"conv-BN pair ({conv!r}, {bn!r}) does not name a Conv2d and a BatchNorm2d")
        if c.out_channels != b.num_features or bn in seen_bn:
            raise ValueError(f"conv-BN pair ({conv!r}, {bn!r}): channel mismatch or BN folded twice")
        seen_bn.add(bn)

