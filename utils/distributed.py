"""torch.distributed for torchrun: one process per device, NCCL on GPUs, gloo on CPUs.

Without torchrun (no WORLD_SIZE in the environment, or 1) everything here is a no-op, so the same
code runs as one process. Only rank 0 writes files; every results JSON records the world size.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from utils.errors import UserError


def launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device_name: str) -> tuple[int, int, str]:
    """Join the torchrun group if launched by torchrun: (rank, world size, device name for this rank)."""
    if not launched():
        return 0, 1, device_name
    if not dist.is_initialized():
        use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if device_name in ("auto", "cuda") and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        return rank, world, f"cuda:{local}"
    return rank, world, "cpu" if device_name == "auto" else device_name


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_buffers(model: torch.nn.Module, src: int = 0):
    """Make every rank hold rank 0's buffers (BN running statistics) before evaluating or saving."""
    if world_size() > 1:
        for b in model.buffers():
            dist.broadcast(b, src)


def gather(obj) -> list | None:
    """Every rank's `obj`, in rank order, on rank 0 (None elsewhere)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier():
    if world_size() > 1:
        dist.barrier()


def local_batch(global_batch: int) -> int:
    """--batch-size is the global batch: each rank takes an equal share of every step."""
    world = world_size()
    if global_batch % world:
        raise UserError(f"--batch-size {global_batch} is the global batch and must split evenly over the "
                        f"{world} processes; use a multiple of {world}.")
    return global_batch // world


def shutdown():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
