"""Halo and statistics stages: the two ways a layer that mixes along the sharded dimension can run
on this rank's piece without gathering the tensor.

``halo_extend(x, dim, before, after, group, tag)``: this rank's piece of ``dim`` extended by the
last ``before`` rows of the previous rank and the first ``after`` rows of the next one, point to
point (``comm.batch_isend_irecv``; nothing beyond the sequence's ends: the module pads there as it
does on one process). A convolution of kernel k along ``dim`` (padding (k-1)/2 each side) needs
``before = after = (k-1)/2``. Backward sends each halo's gradient back to its owner, which adds it
to its edge rows (tag ``<tag>.bwd``). Per rank and direction: the halo rows, ``before + after``
rows of the other dims in all. Every piece must hold at least ``max(before, after)`` rows.

``group_norm(x, module, group, count, tag)``: ``nn.GroupNorm`` on ``x [B, C, ...]`` sharded along
any dim after C: per (sample, group) sums of x and x² on this rank, one all-reduce of the
``[B, G, 2]`` sums (backward: one all-reduce of their gradients, since every rank normalises its
own piece with them), mean and variance of the ``count`` elements each group holds in the whole.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from longseq import comm

__all__ = ["halo_extend", "group_norm", "all_reduce_shared"]


def _p2p(sends: list, recvs: list, group: Any, tag: str) -> None:
    """Post ``sends`` [(tensor, peer)] and ``recvs`` [(buffer, peer)] together and wait."""
    ops = [comm.P2POp("send", t.contiguous(), p) for t, p in sends] + [comm.P2POp("recv", b, p) for b, p in recvs]
    for w in comm.batch_isend_irecv(ops, group, tag=tag):
        w.wait()


def _empty(x: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    shape = list(x.shape)
    shape[dim] = n
    return torch.empty(shape, dtype=x.dtype, device=x.device)


class _Halo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, before, after, group, tag):
        P, r = comm.group_size(group), comm.group_rank(group)
        L = x.shape[dim]
        nb, na = (before if r > 0 else 0), (after if r < P - 1 else 0)
        ctx.args = (dim, before, after, group, tag, nb, na, L)
        sends, recvs = [], []
        if r < P - 1 and before:
            sends.append((x.narrow(dim, L - before, before), r + 1))
        if r > 0 and after:
            sends.append((x.narrow(dim, 0, after), r - 1))
        hb = _empty(x, dim, nb)
        ha = _empty(x, dim, na)
        if nb:
            recvs.append((hb, r - 1))
        if na:
            recvs.append((ha, r + 1))
        _p2p(sends, recvs, group, tag)
        return torch.cat([hb, x, ha], dim)

    @staticmethod
    def backward(ctx, g):
        dim, before, after, group, tag, nb, na, L = ctx.args
        P, r = comm.group_size(group), comm.group_rank(group)
        gx = g.narrow(dim, nb, L).clone()
        sends, recvs = [], []
        if nb:
            sends.append((g.narrow(dim, 0, nb), r - 1))
        if na:
            sends.append((g.narrow(dim, nb + L, na), r + 1))
        from_next = _empty(gx, dim, before) if r < P - 1 and before else None
        from_prev = _empty(gx, dim, after) if r > 0 and after else None
        if from_next is not None:
            recvs.append((from_next, r + 1))
        if from_prev is not None:
            recvs.append((from_prev, r - 1))
        _p2p(sends, recvs, group, tag + ".bwd")
        if from_next is not None:
            gx.narrow(dim, L - before, before).add_(from_next)
        if from_prev is not None:
            gx.narrow(dim, 0, after).add_(from_prev)
        return gx, None, None, None, None, None


def halo_extend(x: torch.Tensor, dim: int, before: int, after: int, group: Any, *, tag: str = "halo") -> torch.Tensor:
    """``x`` (this rank's piece along ``dim``) with its neighbours' edge rows attached (module
    docstring); differentiable. Raises ``ValueError`` if this piece is shorter than a halo."""
    dim = dim % x.dim()
    if comm.group_size(group) == 1 or not (before or after):
        return x
    if x.shape[dim] < max(before, after):
        raise ValueError(f"halo_extend: this rank holds {x.shape[dim]} rows along dim {dim}, fewer than the halo "
                         f"({before}, {after}); use fewer ranks or a longer dimension")
    return _Halo.apply(x, dim, int(before), int(after), group, tag)


class _AllReduceShared(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, tag):
        ctx.args = (group, tag)
        return comm.all_reduce(x.clone(memory_format=torch.contiguous_format), group, tag=tag)

    @staticmethod
    def backward(ctx, g):
        group, tag = ctx.args
        return comm.all_reduce(g.clone(memory_format=torch.contiguous_format), group, tag=tag + ".bwd"), None, None


def all_reduce_shared(x: torch.Tensor, group: Any, *, tag: str = "all_reduce") -> torch.Tensor:
    """The sum of every rank's ``x``, which each rank then uses for its own work (statistics of a
    sharded tensor): backward all-reduces the gradient too."""
    return _AllReduceShared.apply(x, group, tag)


def group_norm(x: torch.Tensor, module: nn.GroupNorm, group: Any, count: int, *, tag: str = "stats") -> torch.Tensor:
    """``module(x)`` for ``x [B, C, ...]`` sharded along a dim after C (module docstring); ``count``:
    the elements per (sample, group) in the whole tensor."""
    B, C = x.shape[:2]
    G = module.num_groups
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xg = x.reshape(B, G, -1).to(acc)
    sums = all_reduce_shared(torch.stack([xg.sum(-1), (xg * xg).sum(-1)], -1), group, tag=tag)
    mean = sums[..., 0:1] / count
    var = (sums[..., 1:2] / count - mean * mean).clamp_min(0)
    y = ((xg - mean) * torch.rsqrt(var + module.eps)).to(x.dtype).reshape(x.shape)
    if module.affine:
        shape = (1, C) + (1,) * (x.dim() - 2)
        y = y * module.weight.reshape(shape) + module.bias.reshape(shape)
    return y
