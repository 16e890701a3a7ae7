"""Bit widths and configurations: one width per weight layer, one width per tensor.

A model's quantizable things are its weight layers and its tensors (models/structure.py): a
``Space``. In memory a configuration is a full ``{group: bits}`` with a group per weight layer,
``("w", layer)``, and per tensor, ``("a", tensor)``, 32 meaning float. In files (the
``tensor-widths/1`` format):

    {"format": "tensor-widths/1", "input": {"a": 8}, "conv1": {"w": 8, "a": 8},
     "layer1.0.conv1": {"w": 4, "a": 6}, ..., "pool": {"a": 8}, "linear": {"w": 8, "a": 32}}

``"w"`` is a layer's weight width; ``"a"`` is the width of the tensor its kernel **writes**
(``"input"`` names the image, ``"pool"`` the pooled features, a layer name the tensor its kernel
writes). Every consumer reads that one quantized tensor. A bare integer is a layer's weight width.
Names left out: float weights, and tensors at the default width (float unless given).

Files written before tensors had their own widths used ``"a"`` for the width a layer *read*; one
tensor read by two layers could then have two widths, which has no equivalent here, so an unmarked
file that uses ``"a"`` is refused. Unmarked files with bare integers (weight widths) still load.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from quant.errors import UserError

FLOAT_BITS = 32
WEIGHT_BITS = (2, 3, 4, 5, 6, 7, 8, FLOAT_BITS)
ACT_BITS = (2, 3, 4, 5, 6, 7, 8, FLOAT_BITS)
DEFAULT_W_LADDER = (8, 6, 4, 3, 2)     # stage 2's weight widths
QUICK_W_LADDER = (8, 4, 2)             # --quick
SUGGESTED_A_LADDER = (8, 6, 4)         # what the README suggests for --a-bits
FORMAT = "tensor-widths/1"
W, A = "w", "a"
EXAMPLE = f'{{"format": "{FORMAT}", "input": {{"a": 8}}, "layer3.0.conv1": {{"w": 4, "a": 8}}, "conv1": 8}}'


def check_widths(bits, flag: str, allowed=WEIGHT_BITS):
    """Refuse an empty or out-of-range width list from the command line."""
    bad = [b for b in bits if b not in allowed]
    if bad or not bits:
        kind = "weight" if flag == "--bits" else "activation"
        raise UserError(f"{flag} {bad or list(bits)}: {kind} widths must be among 2-8 bits, or 32 for float. "
                        f"For example: {flag} {' '.join(map(str, SUGGESTED_A_LADDER if kind == 'activation' else DEFAULT_W_LADDER))}.")


def _width(v, allowed, what, source, name):
    if isinstance(v, bool) or not isinstance(v, int) or v not in allowed:
        raise UserError(f"{source}: {name!r} has {what} width {v!r}; widths must be integers 2-8, or 32 for "
                        f"float. Example: {EXAMPLE}.")
    return v


@dataclass(frozen=True)
class Space:
    """The weight layers and tensors of a model (under one target), in kernel order; `logits`: the tensor the
    last kernel writes (the classifier's output), when known."""
    layers: tuple[str, ...]
    tensors: tuple[str, ...]
    logits: str | None = field(default=None, compare=False)

    @property
    def groups(self) -> list[tuple[str, str]]:
        return [(W, n) for n in self.layers] + [(A, t) for t in self.tensors]

    @property
    def names(self) -> list[str]:
        """Every name a configuration file may use, tensors' order first where both lists share one."""
        return list(dict.fromkeys([*self.tensors, *self.layers]))

    def full(self, partial: dict | None = None, default_a: int = FLOAT_BITS) -> dict[tuple[str, str], int]:
        """{group: bits} for every group, from a partial {group: bits} (absent: float weights, tensors
        at `default_a`)."""
        partial = partial or {}
        unknown = [g for g in partial if g not in set(self.groups)]
        if unknown:
            raise UserError(f"configuration names groups this model does not have: {unknown[:5]}. Weight layers "
                            f"are {list(self.layers)[:5]}...; tensors are {list(self.tensors)[:5]}...")
        out = {(W, n): partial.get((W, n), FLOAT_BITS) for n in self.layers}
        out.update({(A, t): partial.get((A, t), default_a) for t in self.tensors})
        for (kind, name), b in out.items():
            _width(b, WEIGHT_BITS if kind == W else ACT_BITS, "weight" if kind == W else "tensor", "configuration", name)
        return out

    def uniform(self, w: int, a: int, logits: int | None = None) -> dict[tuple[str, str], int]:
        """Every weight layer at `w` and every tensor at `a`; the logits at `logits` where given."""
        cfg = {**{(W, n): w for n in self.layers}, **{(A, t): a for t in self.tensors}}
        if logits is not None and self.logits is not None:
            cfg[A, self.logits] = logits
        return self.full(cfg)

    def parse(self, obj, default_a: int = FLOAT_BITS, source: str = "bit configuration") -> dict[tuple[str, str], int]:
        """A file's configuration (see the module docstring) -> the full {group: bits}."""
        if not isinstance(obj, dict):
            raise UserError(f"{source} must be a JSON object mapping layer and tensor names to widths, e.g. "
                            f"{EXAMPLE}; got {type(obj).__name__}.")
        obj = dict(obj)
        marker = obj.pop("format", None)
        if marker is not None and marker != FORMAT:
            raise UserError(f"{source} has \"format\": {marker!r}; this version reads \"{FORMAT}\".")
        layers, tensors = set(self.layers), set(self.tensors)
        unknown = [k for k in obj if k not in layers and k not in tensors]
        if unknown:
            raise UserError(f"{source} names layers or tensors this model does not have: {unknown}. Valid names "
                            f"are: {self.names}.")
        if marker is None and any(isinstance(v, dict) and "a" in v for v in obj.values()):
            raise UserError(
                f"{source} gives \"a\" widths but has no \"format\": \"{FORMAT}\" marker, so it was written by an "
                f"earlier version, in which \"a\" was the width of a layer's *input*. Now \"a\" is the width of the "
                f"tensor a layer's kernel *writes*, and every reader of a tensor reads it at that one width; the old "
                f"meaning has no single-width equivalent when one tensor was read at two widths. Rewrite the "
                f"widths in the new meaning and add the marker, e.g. {EXAMPLE}.")
        partial = {}
        for name, v in obj.items():
            if isinstance(v, dict):
                extra = set(v) - {W, A}
                if extra:
                    raise UserError(f"{source}: {name!r} has keys {sorted(extra)}; only \"w\" and \"a\" are "
                                    f"understood. Example: {EXAMPLE}.")
                w, a = v.get(W), v.get(A)
            else:
                w, a = v, None
            if w is not None:
                if name not in layers:
                    raise UserError(f"{source}: {name!r} is a tensor without weights; give it only \"a\".")
                partial[W, name] = _width(w, WEIGHT_BITS, "weight", source, name)
            if a is not None:
                if name not in tensors:
                    raise UserError(f"{source}: {name!r} writes no tensor of its own; give it only \"w\".")
                partial[A, name] = _width(a, ACT_BITS, "tensor", source, name)
        return self.full(partial, default_a)

    def to_file(self, config: dict) -> dict:
        """The file form of a full configuration, with the format marker; float entries are written too."""
        out = {"format": FORMAT}
        for name in self.names:
            entry = {}
            if (W, name) in config:
                entry[W] = config[W, name]
            if (A, name) in config:
                entry[A] = config[A, name]
            out[name] = entry
        return out


def config_key(config: dict) -> tuple:
    """A configuration ({group: bits}) as a hashable key, the same whatever order its groups come in."""
    return tuple(sorted(config.items()))


def weights_of(config: dict) -> dict[str, int]:
    return {n: b for (k, n), b in config.items() if k == W}


def tensors_of(config: dict) -> dict[str, int]:
    return {n: b for (k, n), b in config.items() if k == A}


def narrows_tensors(config: dict) -> bool:
    return any(b != FLOAT_BITS for b in tensors_of(config).values())
