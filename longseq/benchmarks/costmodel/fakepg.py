"""A fake process group: one process plays rank ``r`` of a world of ``P`` without moving data.

PyTorch's ``fake`` backend (``torch.testing._internal.distributed.fake_pg``) accepts every
collective and point-to-point call with the right shapes and returns at once, leaving receive
buffers as they were (uninitialised). Everything longseq records in its ledger is computed from
shapes before the backend is called (``longseq.comm``), so a step run on the fake group records
exactly the collectives, sizes and dtypes that rank would issue in a real run, and its run time is
the rank's own work with no communication. Data-dependent results are garbage, which the ledger
and the timing do not look at (denormal flushing is turned on while timing on CPU so that garbage
values cannot slow the arithmetic down).

Tested against real gloo runs (tests/test_costmodel.py): same records, rank by rank.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.distributed as dist

__all__ = ["fake_world"]


@contextlib.contextmanager
def fake_world(rank: int, world_size: int) -> Iterator[object]:
    """``with fake_world(r, P) as group:`` this process is rank ``r`` of ``P`` on a fake group
    (the default group while inside). Refuses to nest inside an initialised process group."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("fake_world: torch.distributed is already initialised in this process")
    if not 0 <= rank < world_size:
        raise ValueError(f"fake_world: rank {rank} is not in a world of {world_size}")
    dist.init_process_group("fake", rank=rank, world_size=world_size, store=FakeStore())
    old = torch.get_num_threads()
    flushed = torch.set_flush_denormal(True)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()
        torch.set_num_threads(old)
        if flushed:
            torch.set_flush_denormal(False)
        _forget_groups()


def _forget_groups() -> None:
    """Drop process groups that modules cached across calls (they die with the fake world)."""
    import sys
    usp = sys.modules.get("longseq.sp.usp")
    cache = getattr(usp, "_GROUP_CACHE", None)
    if isinstance(cache, dict):
        cache.clear()
