"""Rank discipline of the trainer under torchrun: every rank runs the same computations (FSDP2 forwards are
collectives), rank 0 alone writes files, then all ranks meet at a barrier so that the next existence check
(`if path.exists()`) gives the same answer everywhere. In one process every helper is the trivial one."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world_size)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks (float64, one collective); the values themselves in one process."""
    if world()[1] == 1:
        return list(values)
    from .distributed import dist_info

    t = torch.tensor(values, dtype=torch.float64, device=dist_info().device)
    dist.all_reduce(t)
    return t.tolist()
