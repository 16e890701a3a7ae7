"""What machine a runtime result comes from: the CPU's model and its integer dot-product instruction sets.

ONNX Runtime's x86 kernels for uint8 x int8 differ by instruction set: with VNNI (AVX512-VNNI, AVX-VNNI) or
AMX they accumulate each product in 32 bits; with AVX2 alone they add pairs of products in 16 bits and
saturate (`vpmaddubsw`). Results of an integer export record which one ran them.
"""
from __future__ import annotations

import ctypes
import os
import platform
from pathlib import Path

# The /proc/cpuinfo flags that matter to ONNX Runtime's int8 kernels, in that order.
INT8_FLAGS = ("avx2", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def _cpuinfo(path=Path("/proc/cpuinfo")) -> tuple[str | None, set[str] | None]:
    """(model name, flags) of the first processor listed, or (None, None) where there is no such file."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return None, None
    model, flags = None, None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "model name" and model is None:
            model = value.strip()
        elif key in ("flags", "features") and flags is None:
            flags = set(value.split())
    return model, flags


def cpu_info(path=Path("/proc/cpuinfo")) -> dict:
    """{"model", "machine", "logical_cpus", "int8_isa": [flags of INT8_FLAGS present], "vnni": True / False, or
    None where the flags cannot be read (not Linux)}. x86 only has these flags; elsewhere `vnni` is False."""
    model, flags = _cpuinfo(path)
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
    return {"model": model or platform.processor() or None, "machine": platform.machine(),
            "logical_cpus": os.cpu_count(),
            "int8_isa": [f for f in INT8_FLAGS if flags and f in flags],
            "vnni": None if flags is None else (x86 and any(f in flags for f in VNNI_FLAGS))}


def runtime_machine() -> dict:
    """The CPU and the ONNX Runtime build that ran a measurement."""
    import onnxruntime as ort
    return {"cpu": cpu_info(), "onnxruntime": ort.__version__, "providers": ["CPUExecutionProvider"]}


def describe_cpu(info: dict) -> str:
    vnni = {True: "with VNNI", False: "without VNNI", None: "VNNI unknown"}[info["vnni"]]
    return f"{info['model'] or info['machine']} ({vnni}; int8 instruction sets: {', '.join(info['int8_isa']) or 'none'})"


# glibc's mallopt parameters (malloc.h) and their defaults
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536
_allocator = {"keeps_freed_memory": False}


def _glibc():
    if platform.system() != "Linux":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def keep_freed_memory(enabled: bool = True) -> bool:
    """Keep the memory of freed tensors in the process for the next ones, instead of returning it to the system.

    glibc maps each large block (a batch of activations: 64 MiB for ResNet-20's first stage at 1,000 images) on
    its own and unmaps it when it is freed, so every new batch faults in fresh, zeroed pages. Evaluation frees and
    allocates such blocks all the time; on the 2-core virtual machine of the README's benchmarks, that took about
    as long as the convolutions (benchmarks/search_speed.py). With mmap off and the heap never trimmed, freed
    blocks are reused; the price is that the process keeps its peak memory until it exits.

    Applies to glibc on Linux only (returns False elsewhere, and when AIQS_KEEP_FREED_MEMORY=0). `enabled=False`
    restores glibc's defaults and returns the free heap to the system."""
    libc = _glibc()
    if libc is None or (enabled and os.environ.get("AIQS_KEEP_FREED_MEMORY", "1") == "0"):
        return False
    if enabled:
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1) == 1
    else:
        ok = libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX) == 1 and \
            libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD) == 1
        libc.malloc_trim(0)
    _allocator["keeps_freed_memory"] = bool(enabled and ok)
    return ok


def allocator() -> dict:
    """How this process allocates memory, for provenance."""
    return dict(_allocator)
