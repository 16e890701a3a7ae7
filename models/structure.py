"""What a quantizable model declares about itself, so that no code guesses it from names.

A model registered in models/__init__.py has two methods:

* ``segments()``: the network as a chain of ``Segment(name, fn, layers)``; running every ``fn``
  in order equals ``forward``. ``layers`` names the Conv2d/Linear modules that run inside the
  segment. The prefix-cached evaluator (utils/evaluation.py) caches the input of each segment.
* ``conv_bn_pairs()``: ``(conv name, BN name)`` for every BatchNorm that directly normalizes one
  conv's output and nothing else, i.e. can be folded into that conv. A BN anywhere else (e.g. in
  front of a conv, as in pre-activation blocks) is simply not listed and stays a BN.

``check_structure`` verifies both declarations against the modules themselves.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn


@dataclass(frozen=True)
class Segment:
    name: str
    fn: Callable
    layers: tuple[str, ...]


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Conv2d and Linear modules by name, in registration order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def module_name(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    raise KeyError(f"{type(module).__name__} is not a submodule of {type(model).__name__}")


def check_structure(model: nn.Module) -> None:
    """Raise ValueError if the declared segments or conv-BN pairs do not fit the modules."""
    layers = quantizable_layers(model)
    declared = [n for seg in model.segments() for n in seg.layers]
    dupes = sorted({n for n in declared if declared.count(n) > 1})
    missing, unknown = sorted(set(layers) - set(declared)), sorted(set(declared) - set(layers))
    if dupes or missing or unknown:
        raise ValueError(f"{type(model).__name__}.segments() must name every Conv2d/Linear exactly once: "
                         f"repeated {dupes}, missing {missing}, unknown {unknown}")
    mods = dict(model.named_modules())
    seen_bn = set()
    for conv, bn in model.conv_bn_pairs():
        c, b = mods.get(conv), mods.get(bn)
        if not isinstance(c, nn.Conv2d) or not isinstance(b, nn.BatchNorm2d):
            raise ValueError(f"conv-BN pair ({conv!r}, {bn!r}) does not name a Conv2d and a BatchNorm2d")
        if c.out_channels != b.num_features or bn in seen_bn:
            raise ValueError(f"conv-BN pair ({conv!r}, {bn!r}): channel mismatch or BN folded twice")
        seen_bn.add(bn)
