"""Bit configurations: which layers can be quantized, and {layer name: weight bits} mappings.

Layers are keyed by their module name (e.g. "layer3.1.conv2"), never by index, so a
configuration written by one stage means the same layers to every other stage.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch.nn as nn

from utils.errors import UserError

FLOAT_BITS = 32
WEIGHT_BITS = (2, 3, 4, 5, 6, 7, 8, FLOAT_BITS)


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Conv2d and Linear modules by name, in registration (= network) order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def validate_config(config: dict, layer_names, source: str = "bit configuration") -> dict[str, int]:
    """Check names and widths; return a clean {name: int bits} (missing layers stay float)."""
    if not isinstance(config, dict):
        raise UserError(f"{source} must be a JSON object mapping layer names to weight bits, "
                        f"e.g. {{\"layer3.0.conv1\": 4}}; got {type(config).__name__}.")
    names = list(layer_names)
    unknown = [k for k in config if k not in names]
    if unknown:
        raise UserError(f"{source} names layers this model does not have: {unknown}. "
                        f"Valid names are: {names}.")
    clean = {}
    for k, v in config.items():
        if isinstance(v, bool) or not isinstance(v, int) or v not in WEIGHT_BITS:
            raise UserError(f"{source}: layer {k!r} has weight width {v!r}; widths must be integers "
                            f"2-8, or 32 for float.")
        clean[k] = v
    return clean


def full_config(config: dict, layer_names) -> dict[str, int]:
    """Every layer explicitly, float where the config is silent, in network order."""
    return {n: int(config.get(n, FLOAT_BITS)) for n in layer_names}


def uniform_config(layer_names, bits: int) -> dict[str, int]:
    return {n: bits for n in layer_names}


def save_config(path, config: dict):
    from utils.io import atomic_write_json
    atomic_write_json(path, config)


def load_config(path, layer_names) -> dict[str, int]:
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"bit configuration file {path} does not exist.") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"bit configuration file {path} is not valid JSON ({e}). It must be an object "
                        f"mapping layer names to weight bits, e.g. {{\"layer3.0.conv1\": 4}}.") from None
    return validate_config(obj, layer_names, source=str(path))
