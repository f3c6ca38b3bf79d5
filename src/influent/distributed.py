"""torch.distributed, when it is running: the rank, the world size and the few collectives the passes need.

Every function is a no-op (world of one) when ``torch.distributed`` is not initialised, so the same code
runs in one process and under ``torchrun --nproc-per-node N -m influent ...``. :func:`init_from_env`
starts the process group from torchrun's environment (``gloo`` on CPU, ``nccl`` for CUDA devices).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def active() -> bool:
    """True when a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if active() else 1


def init_from_env(device: str = "cpu") -> bool:
    """Start the process group from torchrun's variables (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``...).

    Returns True when a group was started (or already runs), False when the environment names no world
    larger than one. Backend: ``nccl`` when ``device`` is CUDA, else ``gloo``.
    """
    if dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over ranks, in place (returned for chaining); unchanged in one process.

    Under nccl a CPU tensor travels through this rank's GPU (nccl reduces CUDA tensors only).
    """
    if not active():
        return tensor
    if dist.get_backend() == "nccl" and tensor.device.type == "cpu":
        on_gpu = tensor.to(f"cuda:{torch.cuda.current_device()}")
        dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
        tensor.copy_(on_gpu.cpu())
    else:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj):
    """``[obj of rank 0, obj of rank 1, ...]`` (JSON-like objects); ``[obj]`` in one process."""
    if not active():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every rank (nothing in one process)."""
    if active():
        dist.barrier()


def owned(items: int) -> list[int]:
    """The item indices this rank handles: ``rank, rank + world, ...`` (all of them in one process)."""
    return list(range(rank(), items, world_size()))
