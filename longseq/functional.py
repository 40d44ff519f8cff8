"""Autograd-aware collectives: thin ``torch.autograd.Function`` wrappers over :mod:`longseq.comm`.

Gradient convention: a tensor sharded over a group carries the gradient of its own piece; a
parameter's gradient on each rank is that rank's share and the shares are summed over the group
(``longseq.sync_gradients``). Each wrapper's backward is the adjoint of its forward under that rule:

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
from .sharding import shard_range, split_sizes

__all__ = ["all_to_all", "all_gather", "reduce_scatter", "gather_whole", "shard_whole", "all_reduce_sum", "gather_halo"]


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim, gather_sizes, tag):
        ctx.group, ctx.scatter_dim, ctx.gather_dim, ctx.tag = group, scatter_dim, gather_dim, tag
        ctx.scatter_sizes = split_sizes(x.shape[scatter_dim], comm.group_size(group))
        return comm.all_to_all(x, group, scatter_dim=scatter_dim, gather_dim=gather_dim,
                               gather_sizes=gather_sizes, tag=tag)

    @staticmethod
    def backward(ctx, g):
        dx = comm.all_to_all(g, ctx.group, scatter_dim=ctx.gather_dim, gather_dim=ctx.scatter_dim,
                             gather_sizes=ctx.scatter_sizes, tag=ctx.tag + ".bwd")
        return dx, None, None, None, None, None


def all_to_all(x: torch.Tensor, group: Any, *, scatter_dim: int, gather_dim: int, gather_size: int | None = None,
               tag: str = "all_to_all") -> torch.Tensor:
    """Differentiable all-to-all: ``gather_dim`` (sharded, whole size ``gather_size``) becomes whole and
    ``scatter_dim`` (whole) becomes sharded. Backward is the all-to-all the other way.
    ``gather_size`` defaults to ``P * local size`` (even shards)."""
    P = comm.group_size(group)
    nd = x.dim()
    scatter_dim, gather_dim = scatter_dim % nd, gather_dim % nd
    full = gather_size if gather_size is not None else x.shape[gather_dim] * P
    return _AllToAll.apply(x, group, scatter_dim, gather_dim, split_sizes(full, P), tag)


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim, sizes, tag):
        ctx.group, ctx.dim, ctx.tag = group, dim, tag
        return comm.all_gather(x, group, dim=dim, sizes=sizes, tag=tag)

    @staticmethod
    def backward(ctx, g):
        return comm.reduce_scatter(g, ctx.group, dim=ctx.dim, tag=ctx.tag + ".bwd"), None, None, None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim, tag):
        ctx.group, ctx.dim, ctx.tag = group, dim, tag
        ctx.sizes = split_sizes(x.shape[dim], comm.group_size(group))
        return comm.reduce_scatter(x, group, dim=dim, tag=tag)

    @staticmethod
    def backward(ctx, g):
        return comm.all_gather(g, ctx.group, dim=ctx.dim, sizes=ctx.sizes, tag=ctx.tag + ".bwd"), None, None, None


def _sizes(x: torch.Tensor, dim: int, full: int | None, P: int) -> list[int]:
    return split_sizes(full if full is not None else x.shape[dim] * P, P)


def all_gather(x: torch.Tensor, group: Any, *, dim: int, full_size: int | None = None, tag: str = "all_gather") -> torch.Tensor:
    """Differentiable all-gather along ``dim`` (whole size ``full_size``, default even); backward
    reduce-scatters, for a gathered tensor that each rank consumes with its own work."""
    dim = dim % x.dim()
    return _AllGather.apply(x, group, dim, _sizes(x, dim, full_size, comm.group_size(group)), tag)


def reduce_scatter(x: torch.Tensor, group: Any, *, dim: int, tag: str = "reduce_scatter") -> torch.Tensor:
    """Differentiable reduce-scatter (sum) along ``dim``; backward all-gathers."""
    return _ReduceScatter.apply(x, group, dim % x.dim(), tag)


class _GatherWhole(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim, sizes, tag):
        ctx.group, ctx.dim, ctx.sizes = group, dim, sizes
        return comm.all_gather(x, group, dim=dim, sizes=sizes, tag=tag)

    @staticmethod
    def backward(ctx, g):
        r = comm.group_rank(ctx.group)
        start = sum(ctx.sizes[:r])
        return g.narrow(ctx.dim, start, ctx.sizes[r]).contiguous(), None, None, None, None


class _ShardWhole(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim, tag):
        P, r = comm.group_size(group), comm.group_rank(group)
        ctx.group, ctx.dim, ctx.tag = group, dim, tag
        ctx.sizes = split_sizes(x.shape[dim], P)
        start, stop = shard_range(x.shape[dim], P, r)
        return x.narrow(dim, start, stop - start).contiguous()

    @staticmethod
    def backward(ctx, g):
        return comm.all_gather(g.contiguous(), ctx.group, dim=ctx.dim, sizes=ctx.sizes, tag=ctx.tag + ".bwd"), None, None, None


def gather_whole(x: torch.Tensor, group: Any, *, dim: int, full_size: int | None = None, tag: str = "gather") -> torch.Tensor:
    """All-gather a sharded tensor whose whole is then used identically on every rank (an output, a
    loss); backward keeps this rank's piece of the gradient (no communication)."""
    dim = dim % x.dim()
    return _GatherWhole.apply(x, group, dim, _sizes(x, dim, full_size, comm.group_size(group)), tag)


def shard_whole(x: torch.Tensor, group: Any, *, dim: int, tag: str = "shard") -> torch.Tensor:
    """Keep this rank's piece (tensor_split) of a tensor that is identical on every rank; forward needs
    no communication, backward all-gathers the pieces' gradients so the whole gets its full gradient."""
    return _ShardWhole.apply(x, group, dim % x.dim(), tag)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, tag):
        return comm.all_reduce(x.clone(), group, tag=tag)

    @staticmethod
    def backward(ctx, g):
        return g, None, None


def all_reduce_sum(x: torch.Tensor, group: Any, *, tag: str = "all_reduce") -> torch.Tensor:
    """Sum of every rank's ``x``, e.g. per-shard loss terms into the loss. The result is used
    identically on every rank, so each partial's gradient is the result's gradient (backward: identity)."""
    return _AllReduceSum.apply(x, group, tag)


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
