"""Results and checkpoint I/O: atomic writes, hashes, provenance, validated JSON inputs."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from utils.distributed import world_size
from utils.errors import UserError
from utils.machine import allocator

# Per results file: bump a stage's version when the layout of its JSON changes; stages refuse other
# versions. Version 3 of stages 2-4: tensor widths, the kernel cost models, the confirm split.
SCHEMA_VERSIONS = {"1": 2, "2": 3, "3": 3, "4": 3}
SCHEMA_VERSION = SCHEMA_VERSIONS["4"]
REPO_ROOT = Path(__file__).resolve().parent.parent
_UMASK = os.umask(0)
os.umask(_UMASK)
# stage -> the results file it writes into --results-dir, and the script that writes it
RESULTS_FILES = {"1": "01_baseline.json", "2": "02_per_layer.json", "3": "03_search.json", "4": "04_baselines.json"}
PRODUCERS = {"1": "1_train_baseline.py", "2": "2_per_layer_analysis.py", "3": "3_greedy_search.py",
             "4": "4_create_baselines.py"}


def _atomic_write(path, write_fn, mode="wb"):
    """Write to a temp file in the same folder, fsync, then rename over `path`.

    A crash, Ctrl-C or full disk leaves the old file intact and no partial file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)   # mkstemp makes 0600; results are for sharing, like any new file
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise UserError(
                f"could not write {path}: {os.strerror(e.errno)}. Nothing was overwritten: "
                f"any earlier {path.name} is intact. Free some space (or choose another folder "
                f"with --results-dir / --checkpoint-dir) and run the stage again.") from None
        raise


def atomic_write_bytes(path, data: bytes):
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path, text: str):
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def atomic_torch_save(obj, path):
    _atomic_write(path, lambda f: torch.save(obj, f))


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def jsonable_options(options) -> dict:
    """The JSON form of a stage's options (utils/options.py) or of a mapping of settings."""
    if hasattr(options, "to_json"):
        return options.to_json()
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dict(options).items()}


def provenance(options, device, inputs: dict | None = None, seconds: float | None = None) -> dict:
    """What a reader needs to trust or reproduce a result: the options (as "args"), input hashes, code, versions."""
    dev = torch.device(device)
    return {
        "args": jsonable_options(options),
        "inputs": {name: {"path": str(p), "sha256": sha256_file(p)} for name, p in (inputs or {}).items()},
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device": str(dev) + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else
                              f" ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "world_size": world_size(),   # 1 without torchrun
        "allocator": allocator(),     # whether freed memory was kept for reuse (utils/machine.py)
        "seconds": seconds,
    }


def load_results_json(path, expected_stage: str, producer: str, force: bool = False) -> dict:
    """Load a stage's results JSON, refusing missing, malformed or (unless `force`) old-schema files.

    `producer` names the script that writes it, for the message that says what to run.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist. It is written by {producer}: run that stage first "
                        f"(with the same --results-dir), then run this one again.")
    try:
        obj = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}). It may have been edited or copied "
                        f"partially; re-run {producer} to write it again.") from None
    if not isinstance(obj, dict) or obj.get("stage") != expected_stage:
        raise UserError(f"{path} is not a stage-{expected_stage} results file (its 'stage' field is "
                        f"{obj.get('stage') if isinstance(obj, dict) else None!r}). Re-run {producer}.")
    version = SCHEMA_VERSIONS[expected_stage]
    if obj.get("schema_version") != version and not force:
        raise UserError(f"{path} was written with results schema version {obj.get('schema_version')!r}, "
                        f"this code reads version {version}. Re-run {producer} to refresh it "
                        f"(or pass --force to use it anyway).")
    return obj


def check_same_checkpoint(obj: dict, json_path, checkpoint_path, producer: str, force: bool):
    """Refuse results that were made from another checkpoint than the one given."""
    recorded = obj.get("provenance", {}).get("inputs", {}).get("checkpoint", {}).get("sha256")
    actual = sha256_file(checkpoint_path)
    if recorded != actual and not force:
        raise UserError(
            f"{json_path} was made from a different checkpoint (sha256 {str(recorded)[:12]}...) than "
            f"{checkpoint_path} (sha256 {actual[:12]}...). Its numbers would not describe this model: "
            f"re-run {producer} with --checkpoint {checkpoint_path}, or pass --force to use it anyway.")
    return actual
