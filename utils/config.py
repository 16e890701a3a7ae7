"""Configuration files: read and write the tensor-widths/1 format (quant/widths.py defines it)."""
from __future__ import annotations

import json
from pathlib import Path

from quant.errors import UserError
from quant.widths import EXAMPLE, FLOAT_BITS, Space


def save_config(path, space: Space, config: dict):
    from utils.io import atomic_write_json
    atomic_write_json(path, space.to_file(config))


def load_config(path, space: Space, default_a: int = FLOAT_BITS) -> dict[tuple[str, str], int]:
    """The full {group: bits} of the configuration file at `path`; a stage-3 results file (03_search.json)
    gives its best searched configuration."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"bit configuration file {path} does not exist.") from None
    except OSError as e:
        raise UserError(f"bit configuration file {path} could not be read ({e.strerror}).") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"bit configuration file {path} is not valid JSON ({e}). It must be an object "
                        f"mapping layer and tensor names to widths, e.g. {EXAMPLE}.") from None
    if isinstance(obj, dict) and obj.get("stage") == "3":   # a stage-3 results file: its best configuration
        answer = searched_answer(obj)
        if answer is None:
            raise UserError(f"{path} is a stage-3 results file without a searched configuration to read.")
        best, entry = answer
        return space.parse(entry["config"], default_a, source=f"{path} ({best})")
    return space.parse(obj, default_a, source=str(path))


def searched_answer(s3: dict) -> tuple[str, dict] | None:
    """(method, its entry) of the answer a stage-3 results object names as ``best``, or None when it holds no
    searched configuration."""
    best = s3.get("best")
    entry = s3.get(best) if best in ("greedy", "pareto") else None
    return (best, entry) if isinstance(entry, dict) and "config" in entry else None
