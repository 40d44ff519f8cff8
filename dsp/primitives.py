"""DSP's communication primitives: the dimension switch, and shard / gather at entry and exit.

All three are autograd functions over :mod:`longseq.functional`, so every collective is recorded in
the ledger. Sizes follow ``torch.tensor_split`` in every dimension (the first ``n % P`` ranks hold
one element more); a dimension with fewer elements than ranks raises a ``ValueError`` naming it,
before any collective. Gradient convention (:mod:`longseq.functional`): a sharded tensor carries the
gradient of its own piece; parameter gradients are per-rank shares, summed by
``longseq.sync_gradients``.

``switch(x, group, scatter_dim, gather_dim, gather_size)``  one all-to-all: ``gather_dim`` (sharded,
    whole size ``gather_size``) becomes whole, ``scatter_dim`` (whole) becomes sharded. Each rank
    sends its local tensor minus the piece it keeps, ``(P-1)/P`` of it for even sizes. Backward is
    the switch the other way.
``shard(x, dim, group)``   keep this rank's piece of a tensor that is the same on every rank (no
    communication); backward all-gathers the gradient pieces.
``gather(x, dim, group, full_size)``   all-gather the pieces into the whole, which every rank then
    uses identically (an output, a loss); backward keeps this rank's piece of the gradient.

``gather_size`` / ``full_size`` are the whole size of the sharded dimension. When omitted, the
ranks exchange their local sizes first (one small all-gather tagged ``<tag>.sizes``), which also
checks that they form a ``tensor_split`` layout; pass the size to avoid that call.
"""
from __future__ import annotations

from typing import Any

import torch

from longseq import comm
from longseq import functional as LF
from longseq.groups import sp_group_of
from longseq.sharding import check_shardable, split_sizes

__all__ = ["switch", "shard", "gather", "sp_group_of", "whole_size"]


def _dim(x: torch.Tensor, dim: int, what: str) -> int:
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"{what}: dim {dim} is out of range for a tensor of shape {list(x.shape)}")
    return dim % x.dim()


def whole_size(local: int, group: Any, *, tag: str) -> int:
    """The whole size of a dimension of which every rank of ``group`` holds ``local`` elements:
    one all-gather of the local sizes, checked to be the ``tensor_split`` layout of their sum."""
    P = comm.group_size(group)
    if P == 1:
        return local
    sizes = comm.all_gather_int(local, group, tag=tag)
    n = sum(sizes)
    if sizes != split_sizes(n, P):
        raise ValueError(
            f"the ranks hold {sizes} elements of the sharded dimension, which is not the tensor_split "
            f"layout of {n} over {P} ranks ({split_sizes(n, P)}); shard with dsp.shard or pass the sizes")
    return n


def _check_local(x: torch.Tensor, dim: int, full: int, P: int, r: int, what: str) -> None:
    check_shardable(full, P, what)
    expect = split_sizes(full, P)[r]
    if x.shape[dim] != expect:
        raise ValueError(
            f"{what}: this rank ({r} of {P}) holds {x.shape[dim]} elements along dim {dim} of a tensor of shape "
            f"{list(x.shape)}, but a whole size of {full} gives it {expect} (tensor_split sizes "
            f"{split_sizes(full, P)})")


def switch(x: torch.Tensor, group: Any, scatter_dim: int, gather_dim: int, gather_size: int | None = None,
           *, tag: str = "dsp.switch", comm_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Move the sharding of ``x`` from ``gather_dim`` to ``scatter_dim`` with one all-to-all.

    ``x`` holds this rank's piece of ``gather_dim`` (whole size ``gather_size``) and all of
    ``scatter_dim``; the result holds all of ``gather_dim`` and this rank's piece of
    ``scatter_dim``. Backward is the switch back (tag ``<tag>.bwd``).
    ``comm_dtype`` (e.g. ``torch.bfloat16``): send in this dtype and cast back to ``x.dtype`` after,
    forward and backward; default: ``x.dtype``.
    Raises ``ValueError`` (before any collective) if ``scatter_dim`` or ``gather_size`` is smaller
    than the group, or if this rank's size does not match ``gather_size``.
    """
    group = sp_group_of(group)
    P, r = comm.group_size(group), comm.group_rank(group)
    sd = _dim(x, scatter_dim, "dsp.switch scatter_dim")
    gd = _dim(x, gather_dim, "dsp.switch gather_dim")
    if sd == gd:
        raise ValueError(f"dsp.switch: scatter_dim and gather_dim are both {sd}")
    check_shardable(x.shape[sd], P, f"dim {sd} (scatter_dim) of a tensor of shape {list(x.shape)}")
    if gather_size is None:
        gather_size = whole_size(x.shape[gd], group, tag=tag + ".sizes")
    _check_local(x, gd, int(gather_size), P, r, f"dim {gd} (gather_dim)")
    if comm_dtype is not None and comm_dtype != x.dtype:
        y = LF.all_to_all(x.to(comm_dtype), group, scatter_dim=sd, gather_dim=gd, gather_size=int(gather_size), tag=tag)
        return y.to(x.dtype)
    return LF.all_to_all(x, group, scatter_dim=sd, gather_dim=gd, gather_size=int(gather_size), tag=tag)


def shard(x: torch.Tensor, dim: int, group: Any, *, tag: str = "dsp.shard") -> torch.Tensor:
    """This rank's ``tensor_split`` piece of ``x`` along ``dim``; ``x`` must be the same on every
    rank. No communication forward; backward all-gathers the gradient (tag ``<tag>.bwd``)."""
    group = sp_group_of(group)
    P = comm.group_size(group)
    d = _dim(x, dim, "dsp.shard")
    check_shardable(x.shape[d], P, f"dim {d} of a tensor of shape {list(x.shape)}")
    return LF.shard_whole(x, group, dim=d, tag=tag)


def gather(x: torch.Tensor, dim: int, group: Any, full_size: int | None = None, *,
           tag: str = "dsp.gather") -> torch.Tensor:
    """All-gather the pieces of ``x`` along ``dim`` (whole size ``full_size``) into the whole, the same
    on every rank; backward keeps this rank's piece of the gradient (no communication)."""
    group = sp_group_of(group)
    P, r = comm.group_size(group), comm.group_rank(group)
    d = _dim(x, dim, "dsp.gather")
    if full_size is None:
        full_size = whole_size(x.shape[d], group, tag=tag + ".sizes")
    _check_local(x, d, int(full_size), P, r, f"dim {d}")
    return LF.gather_whole(x, group, dim=d, full_size=int(full_size), tag=tag)
