"""Process groups for sequence parallelism (SP) and data parallelism (DP).

The world (or a group handed in, e.g. Megatron's context-parallel group) is cut into SP groups of
``sp_size`` consecutive ranks, so an SP group stays inside a node when ranks are numbered node by
node; DP groups join the ranks that hold the same position in their SP groups.
For world 4, sp 2: SP groups {0,1} {2,3}; DP groups {0,2} {1,3}.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Any, Optional

import torch.distributed as dist

__all__ = ["ParallelGroups", "init_parallel_groups", "from_existing_groups", "require_initialized", "sp_dp_layout",
           "collective_timeout_s", "set_collective_timeout_s", "DEFAULT_TIMEOUT_S"]

# The library default for every collective's timeout (seconds): init_distributed and the SP/DP groups
# use it unless told otherwise; the environment variable LONGSEQ_COLLECTIVE_TIMEOUT_S overrides it.
DEFAULT_TIMEOUT_S = 600.0
_timeout_s: Optional[float] = None


def set_collective_timeout_s(seconds: float) -> None:
    """Record the timeout (seconds) that groups made from now on get (init_distributed calls it)."""
    global _timeout_s
    if not seconds > 0:
        raise ValueError(f"the collective timeout must be > 0 seconds, got {seconds}")
    _timeout_s = float(seconds)


def collective_timeout_s() -> float:
    """The timeout of longseq's collectives: the one given to ``init_distributed`` (or
    ``set_collective_timeout_s``), else ``$LONGSEQ_COLLECTIVE_TIMEOUT_S``, else ``DEFAULT_TIMEOUT_S``."""
    if _timeout_s is not None:
        return _timeout_s
    env = os.environ.get("LONGSEQ_COLLECTIVE_TIMEOUT_S")
    return float(env) if env else DEFAULT_TIMEOUT_S


def require_initialized(what: str = "this call") -> None:
    """Raise a RuntimeError that says how to start ``torch.distributed`` when it is not."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{what} needs torch.distributed, which is not initialised. Launch with "
            "`torchrun --nproc_per_node N your_script.py` and call longseq.launch.init_distributed() "
            "(or torch.distributed.init_process_group) first."
        )


def sp_dp_layout(world_size: int, sp_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """The SP groups and DP groups (as lists of positions 0..world-1) for a world of this size."""
    if sp_size < 1 or world_size % sp_size != 0:
        raise ValueError(
            f"sequence-parallel size {sp_size} does not divide the world size {world_size}: "
            f"choose sp_size among {[d for d in range(1, world_size + 1) if world_size % d == 0]} "
            f"or launch a multiple of {sp_size} processes."
        )
    dp_size = world_size // sp_size
    sp = [list(range(i * sp_size, (i + 1) * sp_size)) for i in range(dp_size)]
    dp = [list(range(j, world_size, sp_size)) for j in range(sp_size)]
    return sp, dp


@dataclasses.dataclass(frozen=True)
class ParallelGroups:
    """Who this rank talks to: its SP group and its DP group, with ranks and sizes in each."""

    sp_group: Any
    dp_group: Any
    sp_rank: int
    sp_size: int
    dp_rank: int
    dp_size: int
    sp_global_ranks: tuple[int, ...]
    dp_global_ranks: tuple[int, ...]

    @property
    def world_size(self) -> int:
        return self.sp_size * self.dp_size

    @property
    def is_sp_leader(self) -> bool:
        return self.sp_rank == 0


def init_parallel_groups(sp_size: int, base_group: Any = None, *, timeout_s: Optional[float] = None) -> ParallelGroups:
    """Build SP x DP groups over ``base_group`` (default: the world). Every rank must call it.

    The groups' collectives time out after ``timeout_s`` (default :func:`collective_timeout_s`, the
    one ``init_distributed`` got), not torch's 30-minute default for new groups.

    Errors (before any collective): torch.distributed not initialised; sp_size not dividing the size.
    """
    require_initialized("longseq.init_parallel_groups")
    base = base_group if base_group is not None else dist.group.WORLD
    size = dist.get_world_size(base)
    me = dist.get_rank(base)
    sp_layout, dp_layout = sp_dp_layout(size, sp_size)
    to_global = [dist.get_global_rank(base, i) for i in range(size)] if base_group is not None else list(range(size))
    mine_sp = mine_dp = None
    timeout = datetime.timedelta(seconds=float(timeout_s) if timeout_s is not None else collective_timeout_s())
    # new_group must be entered by every rank of the world, in the same order.
    for pos in sp_layout:
        ranks = [to_global[i] for i in pos]
        g = dist.new_group(ranks, timeout=timeout) if len(ranks) < dist.get_world_size() else dist.group.WORLD
        if me in pos:
            mine_sp = (g, tuple(ranks))
    for pos in dp_layout:
        ranks = [to_global[i] for i in pos]
        g = dist.new_group(ranks, timeout=timeout) if len(ranks) < dist.get_world_size() else dist.group.WORLD
        if me in pos:
            mine_dp = (g, tuple(ranks))
    assert mine_sp is not None and mine_dp is not None
    return ParallelGroups(
        sp_group=mine_sp[0], dp_group=mine_dp[0],
        sp_rank=me % sp_size, sp_size=sp_size,
        dp_rank=me // sp_size, dp_size=size // sp_size,
        sp_global_ranks=mine_sp[1], dp_global_ranks=mine_dp[1],
    )


def from_existing_groups(sp_group: Any, dp_group: Any = None) -> ParallelGroups:
    """Wrap groups built elsewhere (e.g. Megatron's context-parallel and data-parallel groups)."""
    require_initialized("longseq.from_existing_groups")
    def info(g):
        if g is None:
            return None, 0, 1, (dist.get_rank(),)
        n = dist.get_world_size(g)
        return g, dist.get_rank(g), n, tuple(dist.get_global_rank(g, i) for i in range(n))
    spg, spr, sps, spranks = info(sp_group)
    dpg, dpr, dps, dpranks = info(dp_group)
    return ParallelGroups(spg, dpg, spr, sps, dpr, dps, spranks, dpranks)
