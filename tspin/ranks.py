"""The process group, and the trainer's rank discipline under torchrun.

Every rank runs the same computations (FSDP2 forwards are collectives); rank 0 alone writes files, then all ranks
meet at a barrier so that the next existence check (``if path.exists()``) gives the same answer everywhere. In one
process (no launcher) there is no group and every helper here is the trivial one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}: expected an integer in the environment, got {value!r}") from None


def _group_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def dist_info() -> DistInfo:
    """Where this process stands, whether or not a process group exists."""
    if _group_ready():
        rank, world, backend = dist.get_rank(), dist.get_world_size(), dist.get_backend()
    else:
        rank, world, backend = 0, 1, None
    local_rank = _env_int("LOCAL_RANK", rank)
    if torch.cuda.is_available() and backend != "gloo":
        device = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    else:
        device = torch.device("cpu")
    return DistInfo(rank, world, local_rank, device, backend)


def init_distributed(backend: str | None = None, *, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group described by the launcher's environment (torchrun and ``accelerate launch`` both set
    ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).

    ``backend`` defaults to nccl with CUDA, gloo otherwise. Without a launcher (``WORLD_SIZE`` unset) this is one
    process and no group is created. Idempotent.
    """
    if backend is not None and backend not in ("nccl", "gloo"):
        raise ValueError(f"backend: expected 'nccl', 'gloo' or None, got {backend!r}")
    if _group_ready():
        return dist_info()
    if _env_int("WORLD_SIZE", 1) <= 1 and "MASTER_ADDR" not in os.environ:
        return dist_info()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ValueError("backend: 'nccl' needs CUDA; use 'gloo' on CPU")
        torch.cuda.set_device(_env_int("LOCAL_RANK", 0) % torch.cuda.device_count())
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return dist_info()


def cleanup_distributed() -> None:
    """Leave the process group together (a no-op in one process)."""
    if _group_ready():
        dist.barrier()
        dist.destroy_process_group()


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) without a process group."""
    return (dist.get_rank(), dist.get_world_size()) if _group_ready() else (0, 1)


def is_main() -> bool:
    return world()[0] == 0


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def on_main(fn, *args, **kwargs) -> None:
    """fn(*args, **kwargs) on rank 0 only (a file write), then a barrier."""
    if is_main():
        fn(*args, **kwargs)
    barrier()


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks of a tensor on this rank's device (one collective, the tensor itself in one
    process). Nothing is read back to the host: the caller decides when to look at the values."""
    if world()[1] > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t

