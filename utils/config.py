"""Bit widths and per-layer configurations, in one place.

A configuration maps layer names (e.g. "layer3.1.conv2", never indices) to widths. In files:

    {"layer1.0.conv1": {"w": 4, "a": 8}, "conv1": 4, ...}

* ``{"w": .., "a": ..}``: weight and activation width (either may be left out: float weights,
  or the default activation width);
* a bare integer: weight bits, activations at the default width (today's files still load);
* an absent layer: float weights, default activation width.

The default activation width is ``--a-bits`` (32, i.e. float, unless given). In memory a full
configuration is ``{name: (w, a)}`` for every layer, in network order.
"""
from __future__ import annotations

import json
from pathlib import Path

from utils.errors import UserError

FLOAT_BITS = 32
WEIGHT_BITS = (2, 3, 4, 5, 6, 7, 8, FLOAT_BITS)
ACT_BITS = (2, 3, 4, 5, 6, 7, 8, FLOAT_BITS)
DEFAULT_W_LADDER = (8, 6, 4, 3, 2)     # stage 2's weight widths
QUICK_W_LADDER = (8, 4, 2)             # --quick
SUGGESTED_A_LADDER = (8, 6, 4)         # what the README suggests for --a-bits
EXAMPLE = '{"layer3.0.conv1": {"w": 4, "a": 8}, "conv1": 8}'


def check_widths(bits, flag: str, allowed=WEIGHT_BITS):
    """Refuse an empty or out-of-range width list from the command line."""
    bad = [b for b in bits if b not in allowed]
    if bad or not bits:
        kind = "weight" if flag == "--bits" else "activation"
        raise UserError(f"{flag} {bad or list(bits)}: {kind} widths must be among 2-8 bits, or 32 for float. "
                        f"For example: {flag} {' '.join(map(str, SUGGESTED_A_LADDER if kind == 'activation' else DEFAULT_W_LADDER))}.")


def _width(v, allowed, what, source, layer):
    if isinstance(v, bool) or not isinstance(v, int) or v not in allowed:
        raise UserError(f"{source}: layer {layer!r} has {what} width {v!r}; widths must be integers "
                        f"2-8, or 32 for float. Example: {EXAMPLE}.")
    return v


def parse_config(config, layer_names, default_a: int = FLOAT_BITS,
                 source: str = "bit configuration") -> dict[str, tuple[int, int]]:
    """A file's configuration -> the full {name: (w, a)} (every layer, network order)."""
    if not isinstance(config, dict):
        raise UserError(f"{source} must be a JSON object mapping layer names to widths, e.g. {EXAMPLE}; "
                        f"got {type(config).__name__}.")
    names = list(layer_names)
    unknown = [k for k in config if k not in names]
    if unknown:
        raise UserError(f"{source} names layers this model does not have: {unknown}. "
                        f"Valid names are: {names}.")
    full = {}
    for n in names:
        v = config.get(n, FLOAT_BITS)
        if isinstance(v, tuple) and len(v) == 2:   # the in-memory form
            v = {"w": v[0], "a": v[1]}
        if isinstance(v, dict):
            extra = set(v) - {"w", "a"}
            if extra:
                raise UserError(f"{source}: layer {n!r} has keys {sorted(extra)}; only \"w\" and \"a\" are "
                                f"understood. Example: {EXAMPLE}.")
            full[n] = (_width(v.get("w", FLOAT_BITS), WEIGHT_BITS, "weight", source, n),
                       _width(v.get("a", default_a), ACT_BITS, "activation", source, n))
        else:
            full[n] = (_width(v, WEIGHT_BITS, "weight", source, n), default_a)
    return full


def weight_config(full: dict) -> dict[str, int]:
    """{name: w} of a full configuration (what the weight quantizer applies)."""
    return {n: wa[0] for n, wa in full.items()}


def config_json(full: dict, joint: bool) -> dict:
    """The file form: bare weight widths in weight-only mode, {"w", "a"} objects in joint mode."""
    return {n: ({"w": w, "a": a} if joint else w) for n, (w, a) in full.items()}


def uniform(layer_names, w: int, a: int) -> dict[str, tuple[int, int]]:
    return {n: (w, a) for n in layer_names}


def save_config(path, config: dict):
    from utils.io import atomic_write_json
    atomic_write_json(path, config)


def load_config(path, layer_names, default_a: int = FLOAT_BITS) -> dict[str, tuple[int, int]]:
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"bit configuration file {path} does not exist.") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"bit configuration file {path} is not valid JSON ({e}). It must be an object "
                        f"mapping layer names to widths, e.g. {EXAMPLE}.") from None
    return parse_config(obj, layer_names, default_a, source=str(path))
