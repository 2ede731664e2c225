"""The process group a tensor-parallel program's collectives run on: part of the step ABI.

A sharded program calls functional collectives (`_c10d_functional.all_reduce(x, "sum", GROUP)`)
that name their group by a string compiled into the package, and resolve it when they run. Builder
and runtime agree on that string, TP_GROUP, and register the group they hold under it: the builder
a `fake` group (the package is compiled without any communication), each serving or verifying rank
its gloo (CPU) or NCCL (CUDA) group of every rank.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import timedelta

import torch
import torch.distributed as dist

TP_GROUP = "llama_aot_tp"
BACKENDS = {"cpu": "gloo", "cuda": "nccl"}


def register_group(group: dist.ProcessGroup) -> None:
    """Makes `group` the one the compiled collectives resolve TP_GROUP to, in this process."""
    with contextlib.suppress(Exception):  # a process registers once; a later group replaces it
        torch._C._distributed_c10d._unregister_process_group(TP_GROUP)
    torch._C._distributed_c10d._register_process_group(TP_GROUP, group)


@contextlib.contextmanager
def fake_group(world_size: int) -> Iterator[None]:
    """A `fake` world of `world_size` ranks (this process is rank 0) under TP_GROUP, for tracing and
    compiling a sharded program: its collectives return tensors of the right shape and move no data."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group is already initialized in this process; build in a fresh one")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        register_group(dist.group.WORLD)
        yield
    finally:
        with contextlib.suppress(Exception):
            torch._C._distributed_c10d._unregister_process_group(TP_GROUP)
        dist.destroy_process_group()


def join_group(rank: int, world_size: int, device_type: str, init_method: str,
               timeout: timedelta | None = None) -> None:
    """Joins the world of `world_size` ranks at `init_method` (a tcp:// or file:// address) as
    `rank`, over gloo on CPU and NCCL on CUDA, and registers it under TP_GROUP. `timeout`: how
    long a collective may wait for the other ranks before it fails instead of hanging."""
    dist.init_process_group(BACKENDS[device_type], init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timeout)
    register_group(dist.group.WORLD)
