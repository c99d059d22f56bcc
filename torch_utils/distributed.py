"""Distributed helpers over torch.distributed, started by torchrun (or one plain process).

    from torch_utils import distributed as dist
    dist.init()                       # reads RANK / WORLD_SIZE / LOCAL_RANK set by torchrun
    my_seeds = dist.split_for_rank(seeds)
    dist.print0('only rank 0 prints')
    dist.barrier(); dist.shutdown()

Backend: nccl when CUDA is available, gloo otherwise (CPU tests run two processes with gloo).
A process started without torchrun is rank 0 of 1 and never touches torch.distributed.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def is_launched() -> bool:
    """Whether torchrun (or an equivalent launcher) started this process as part of a group."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def init(backend: str | None = None, timeout_s: float = 1800) -> None:
    """Join the process group described by torchrun's environment variables (no-op for a lone process).

    backend: None picks nccl when CUDA is available, else gloo. On CUDA each process uses the GPU
    LOCAL_RANK. Safe to call twice.
    """
    if is_initialized() or not is_launched():
        if torch.cuda.is_available():
            torch.cuda.set_device(get_local_rank() % torch.cuda.device_count())
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
    if backend == "nccl":
        torch.cuda.set_device(get_local_rank() % torch.cuda.device_count())
    kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(seconds=timeout_s)}
    if backend == "nccl":
        kwargs["device_id"] = torch.device("cuda", torch.cuda.current_device())
    torch.distributed.init_process_group(**kwargs)


def shutdown() -> None:
    """Leave the process group (if any)."""
    if is_initialized():
        torch.distributed.destroy_process_group()


def get_rank() -> int:
    return torch.distributed.get_rank() if is_initialized() else _env_int("RANK", 0) if is_launched() else 0


def get_world_size() -> int:
    return torch.distributed.get_world_size() if is_initialized() else _env_int("WORLD_SIZE", 1) if is_launched() else 1


def get_local_rank() -> int:
    return _env_int("LOCAL_RANK", 0)


def is_main() -> bool:
    return get_rank() == 0


def device() -> torch.device:
    """This process's compute device: its GPU (LOCAL_RANK) if CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", get_local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every rank (no-op for a lone process)."""
    if is_initialized():
        if torch.distributed.get_backend() == "nccl":
            torch.distributed.barrier(device_ids=[torch.cuda.current_device()])
        else:
            torch.distributed.barrier()


def print0(*args: Any, **kwargs: Any) -> None:
    """print() on rank 0 only."""
    if is_main():
        print(*args, **kwargs)


def split_for_rank(items: Sequence[T], rank: int | None = None, world_size: int | None = None) -> list[T]:
    """This rank's share of items: every world_size-th item starting at rank (shares differ by at most one)."""
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    return list(items[rank::world_size])


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's obj, in rank order (picklable objects; a lone process gets [obj])."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def all_reduce_sum(value: float) -> float:
    """Sum of a number over all ranks."""
    if not is_initialized():
        return float(value)
    dev = device() if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([float(value)], dtype=torch.float64, device=dev)
    torch.distributed.all_reduce(t)
    return float(t.item())


def broadcast_object(obj: Any) -> Any:
    """Rank 0's obj on every rank (a lone process gets obj)."""
    if not is_initialized():
        return obj
    out = [obj]
    torch.distributed.broadcast_object_list(out, src=0)
    return out[0]
