"""Global positions of a rank's piece of a sharded sequence dimension.

A dim of whole size n sharded over P ranks (``tensor_split`` sizes, :mod:`longseq.sharding`):
rank r holds the global indices ``position_range(n, P, r)``. Anything built from indices on a
rank's piece (``arange(num_frames)`` for a temporal embedding, a rotary embedding's positions, a
causal mask) must use these, not ``0..n_r-1``. ``positions(n, group)`` gives them as a tensor.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed

from . import comm
from .sharding import shard_range

__all__ = ["positions", "position_range", "position_offset"]


def position_range(n: int, parts: int, index: int) -> range:
    """The global indices of piece ``index`` of a dim of size ``n`` split into ``parts``."""
    a, b = shard_range(n, parts, index)
    return range(a, b)


def _size_rank(group: Any) -> tuple[int, int]:
    """(size, rank) of a process group or a ``ParallelGroups``' SP group; None without
    torch.distributed initialised is one rank."""
    g = group.sp_group if hasattr(group, "sp_group") else group
    if g is None and not torch.distributed.is_initialized():
        return 1, 0
    return comm.group_size(g), comm.group_rank(g)


def position_offset(n: int, group: Any) -> int:
    """The global index of this rank's first element of a dim of whole size ``n`` sharded over
    ``group`` (a process group or a ``longseq.ParallelGroups``: its SP group; None: one rank)."""
    return position_range(n, *_size_rank(group)).start


def positions(n: int, group: Any, *, device: Any = None, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """This rank's global indices ``[start, stop)`` along a dim of whole size ``n`` sharded over
    ``group`` (``tensor_split`` sizes): what ``arange`` must give on this rank's piece."""
    r = position_range(n, *_size_rank(group))
    return torch.arange(r.start, r.stop, device=device, dtype=dtype)
