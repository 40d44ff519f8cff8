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

__all__ = ["all_to_all", "all_gather", "reduce_scatter", "gather_whole", "shard_whole", "all_reduce_sum", "gather_halo",
           "halo_exchange", "halo_exchange_channels_first"]

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


def _prev_rows(x: torch.Tensor, h: int, dim: int, halo: torch.Tensor) -> torch.Tensor:
    """The last ``h`` rows along ``dim`` of ``[halo | x]`` (what the next rank needs)."""
    T = x.shape[dim]
    if T >= h:
        return x.narrow(dim, T - h, h).contiguous()
    return torch.cat([halo.narrow(dim, T, h - T), x], dim).contiguous()


class _HaloExchange(torch.autograd.Function):
    """Forward: this rank's halo from rank r-1 (see :func:`halo_exchange`); backward: the halo's
    gradient back to rank r-1, the same chain reversed."""

    @staticmethod
    def forward(ctx, x, h, dim, group, tag):
        P, r = comm.group_size(group), comm.group_rank(group)
        shape = list(x.shape)
        shape[dim] = h
        T = x.shape[dim]
        halo = torch.zeros(shape, dtype=x.dtype, device=x.device)
        ctx.meta = (h, dim, group, tag, T, tuple(x.shape))
        ctx.set_materialize_grads(True)
        prv, nxt = (r - 1 if r > 0 else None), (r + 1 if r < P - 1 else None)
        if T >= h:      # the rows to send are this rank's own: send and receive together
            ops = [comm.P2POp("send", _prev_rows(x, h, dim, halo), nxt)] if nxt is not None else []
            buf = torch.empty(shape, dtype=x.dtype, device=x.device)
            ops += [comm.P2POp("recv", buf, prv)] if prv is not None else []
            for w in comm.batch_isend_irecv(ops, group, tag=tag):
                w.wait()
            return buf if prv is not None else halo
        if prv is not None:   # a short piece: its own halo first, then the last h rows of [halo | x]
            halo = comm.recv(shape, x.dtype, prv, group, device=x.device, tag=tag)
        if nxt is not None:
            comm.send(_prev_rows(x, h, dim, halo), nxt, group, tag=tag)
        return halo

    @staticmethod
    def backward(ctx, dhalo):
        h, dim, group, tag, T, xshape = ctx.meta
        P, r = comm.group_size(group), comm.group_rank(group)
        prv, nxt = (r - 1 if r > 0 else None), (r + 1 if r < P - 1 else None)
        shape = list(xshape)
        shape[dim] = h
        dhalo = dhalo.contiguous()
        dx = dhalo.new_zeros(xshape)
        tag = tag + ".bwd"
        if T >= h:
            ops = [comm.P2POp("send", dhalo, prv)] if prv is not None else []
            dsent = torch.empty(shape, dtype=dhalo.dtype, device=dhalo.device)
            ops += [comm.P2POp("recv", dsent, nxt)] if nxt is not None else []
            for w in comm.batch_isend_irecv(ops, group, tag=tag):
                w.wait()
            if nxt is not None:
                dx.narrow(dim, T - h, h).add_(dsent)
            return dx, None, None, None, None
        if nxt is not None:   # the gradient of [halo | x][-h:] that went to rank r+1
            dsent = comm.recv(shape, dhalo.dtype, nxt, group, device=dhalo.device, tag=tag)
            dx.add_(dsent.narrow(dim, h - T, T))
            dhalo = dhalo.clone()
            dhalo.narrow(dim, T, h - T).add_(dsent.narrow(dim, 0, h - T))
        if prv is not None:
            comm.send(dhalo.contiguous(), prv, group, tag=tag)
        return dx, None, None, None, None


def halo_exchange(x: torch.Tensor, h: int, group: Any, *, dim: int = 1, tag: str = "halo") -> torch.Tensor:
    """The ``h`` rows along ``dim`` just before this rank's contiguous piece ``x`` of a sequence (zeros
    before the sequence start), for a causal convolution of width ``h + 1``; differentiable.

    Point to point: rank r receives exactly ``h`` rows from rank r-1 only, and sends exactly ``h`` to
    rank r+1 (ledger: one ``send`` and one ``recv`` of ``h`` rows per rank boundary, tag ``tag``;
    backward the same rows the other way, ``tag.bwd``). A piece shorter than ``h`` forwards the last
    ``h`` rows of ``[its own halo | x]``, so the rows chain through several ranks; such a rank waits for
    its halo before sending, a longer one sends at once. No sizes are exchanged. Layouts: ``[B, T, D]``
    (``dim=1``, fla's) and ``[B, C, T]`` (``dim=-1``, transformers' and ``nn.Conv1d``'s); see
    :func:`gather_halo` and :func:`halo_exchange_channels_first`."""
    P = comm.group_size(group)
    dim = dim % x.dim()
    if P == 1 or h == 0:
        shape = list(x.shape)
        shape[dim] = h
        return x.new_zeros(shape)
    return _HaloExchange.apply(x, int(h), dim, group, tag)


def gather_halo(x: torch.Tensor, h: int, group: Any, *, tag: str = "halo") -> torch.Tensor:
    """The ``h`` tokens just before this rank's piece ``x [B, T_r, D]`` (zeros before the sequence
    start): :func:`halo_exchange` along dim 1. Returns ``[B, h, D]``."""
    return halo_exchange(x, h, group, dim=1, tag=tag)


def halo_exchange_channels_first(x: torch.Tensor, h: int, group: Any, *, tag: str = "halo") -> torch.Tensor:
    """The ``h`` steps just before this rank's piece ``x [B, C, T_r]`` (``nn.Conv1d``'s layout, as
    transformers' causal convolutions use): :func:`halo_exchange` along the last dim. Returns ``[B, C, h]``."""
    return halo_exchange(x, h, group, dim=-1, tag=tag)
