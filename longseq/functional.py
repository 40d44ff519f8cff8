"""Autograd-aware collectives over :mod:`longseq.comm`, as ``torch.library`` custom ops
(:mod:`longseq.ops`), so the same code runs eagerly and under ``torch.compile(fullgraph=True)``.

Gradient convention: a tensor sharded over a group carries the gradient of its own piece; a
parameter's gradient on each rank is that rank's share and the shares are summed over the group
(``longseq.sync_gradients``). Each op's backward is the adjoint of its forward under that rule:

  all_to_all(scatter a, gather b)  <->  all_to_all(scatter b, gather a)
  all_gather (sharded -> whole, consumed by per-rank work)  backward: reduce_scatter
  reduce_scatter                                            backward: all_gather
  gather_whole (sharded -> whole, consumed identically on every rank, e.g. a loss)  backward: keep own piece
  shard_whole  (whole -> this rank's piece, the whole identical on every rank)      backward: all_gather
  all_reduce_sum (partial values -> their sum, consumed identically on every rank)  backward: identity
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from . import comm
from .ops import group_name
from .sharding import split_sizes

__all__ = ["all_to_all", "all_gather", "reduce_scatter", "gather_whole", "shard_whole", "all_reduce_sum", "gather_halo"]

_ops = torch.ops.longseq


def all_to_all(x: torch.Tensor, group: Any, *, scatter_dim: int, gather_dim: int, gather_size: int | None = None,
               tag: str = "all_to_all", gather_sizes: Sequence[int] | None = None,
               scatter_sizes: Sequence[int] | None = None) -> torch.Tensor:
    """Differentiable all-to-all: ``gather_dim`` (sharded) becomes whole and ``scatter_dim`` (whole)
    becomes sharded. Backward is the all-to-all the other way.

    Sizes of the sharded pieces: ``gather_sizes`` (every rank's size of ``gather_dim``, any sizes) or
    ``gather_size`` (the whole size, cut as ``tensor_split``; default ``P * local size``);
    ``scatter_sizes`` (the pieces ``scatter_dim`` is cut into, default ``tensor_split``)."""
    P = comm.group_size(group)
    nd = x.dim()
    scatter_dim, gather_dim = scatter_dim % nd, gather_dim % nd
    if gather_sizes is None:
        full = gather_size if gather_size is not None else x.shape[gather_dim] * P
        gather_sizes = split_sizes(full, P)
    return _ops.all_to_all(x, group_name(group), scatter_dim, gather_dim, [int(n) for n in gather_sizes], tag,
                           None if scatter_sizes is None else [int(n) for n in scatter_sizes])


def _sizes(x: torch.Tensor, dim: int, full: int | None, P: int) -> list[int]:
    return split_sizes(full if full is not None else x.shape[dim] * P, P)


def all_gather(x: torch.Tensor, group: Any, *, dim: int, full_size: int | None = None, tag: str = "all_gather") -> torch.Tensor:
    """Differentiable all-gather along ``dim`` (whole size ``full_size``, default even); backward
    reduce-scatters, for a gathered tensor that each rank consumes with its own work."""
    dim = dim % x.dim()
    return _ops.all_gather(x, group_name(group), dim, _sizes(x, dim, full_size, comm.group_size(group)), tag)


def reduce_scatter(x: torch.Tensor, group: Any, *, dim: int, tag: str = "reduce_scatter") -> torch.Tensor:
    """Differentiable reduce-scatter (sum) along ``dim``; backward all-gathers."""
    return _ops.reduce_scatter(x, group_name(group), dim % x.dim(), tag)


def gather_whole(x: torch.Tensor, group: Any, *, dim: int, full_size: int | None = None, tag: str = "gather") -> torch.Tensor:
    """All-gather a sharded tensor whose whole is then used identically on every rank (an output, a
    loss); backward keeps this rank's piece of the gradient (no communication)."""
    dim = dim % x.dim()
    return _ops.gather_whole(x, group_name(group), dim, _sizes(x, dim, full_size, comm.group_size(group)), tag)


def shard_whole(x: torch.Tensor, group: Any, *, dim: int, tag: str = "shard") -> torch.Tensor:
    """Keep this rank's piece (tensor_split) of a tensor that is identical on every rank; forward needs
    no communication, backward all-gathers the pieces' gradients so the whole gets its full gradient."""
    return _ops.shard_whole(x, group_name(group), dim % x.dim(), tag)


def all_reduce_sum(x: torch.Tensor, group: Any, *, tag: str = "all_reduce") -> torch.Tensor:
    """Sum of every rank's ``x``, e.g. per-shard loss terms into the loss. The result is used
    identically on every rank, so each partial's gradient is the result's gradient (backward: identity)."""
    return _ops.all_reduce_sum(x, group_name(group), tag)


def gather_halo(x: torch.Tensor, h: int, group: Any, *, tag: str = "halo") -> torch.Tensor:
    """The ``h`` tokens just before this rank's contiguous piece ``x [B, T_r, D]`` of a sequence
    (zeros before the sequence start), for a causal convolution of width ``h + 1``; differentiable.
    One all-gather of every rank's last ``min(T_r, h)`` tokens (front-padded to ``h``) and their counts
    (so pieces shorter than ``h`` work); backward reduce-scatters, so each tail gets the gradients of
    every rank that read it. Returns ``[B, h, D]``."""
    P, r = comm.group_size(group), comm.group_rank(group)
    B, T, D = x.shape
    if P == 1 or h == 0:
        return x.new_zeros(B, h, D)
    n = min(T, h)
    tail = torch.cat([x.new_zeros(B, h - n, D), x[:, T - n:]], dim=1)
    counts = comm.all_gather_int(n, group, tag=f"{tag}.sizes")
    tails = all_gather(tail.unsqueeze(0).contiguous(), group, dim=0, tag=tag)          # [P, B, h, D]
    # every rank's result depends on the gathered tensor (rank 0's on an empty slice), so every rank
    # runs the backward reduce-scatter
    pieces = [tails[j, :, h - counts[j]:] for j in range(r)] or [tails[0, :, :0]]
    return torch.cat([x.new_zeros(B, h, D), *pieces], dim=1)[:, -h:]
