"""longseq's collectives as ``torch.library`` custom ops, so ``torch.compile(fullgraph=True)`` traces
them without graph breaks.

Each op is opaque to the compiler: its fake implementation gives the output's shape (from the
group's size and this rank's position), its autograd formula is the adjoint in
:mod:`longseq.functional`'s convention, and its real implementation is the eager function of
:mod:`longseq.comm`. The ledger row is therefore written when the collective *runs* (eager, or
each call of a compiled graph), never while tracing, and a compiled step records the same rows as
an eager one.

Process groups cannot be op arguments: an op takes the group's registered name
(torch's ``ProcessGroup.group_name``) with this rank appended (:func:`group_name`) and resolves it
at run time (:func:`resolve_group`). Everything else is a static int, int list or string (the ledger tag).

=====================================  ============================  ===============================
op (``torch.ops.longseq.*``)           forward                       backward
=====================================  ============================  ===============================
``all_to_all(x, group, sd, gd, gs, tag, ss)`` ``comm.all_to_all``     ``all_to_all`` back, tag ``.bwd``
``all_gather(x, group, dim, sizes, tag)``   ``comm.all_gather``       ``reduce_scatter``, ``.bwd``
``reduce_scatter(x, group, dim, tag)``      ``comm.reduce_scatter``   ``all_gather``, ``.bwd``
``gather_whole(x, group, dim, sizes, tag)`` ``comm.all_gather``       this rank's piece (no comm)
``shard_whole(x, group, dim, tag)``         this rank's piece         ``all_gather``, ``.bwd``
``all_reduce_sum(x, group, tag)``           ``comm.all_reduce``       identity
=====================================  ============================  ===============================
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group

from . import comm
from .groups import require_initialized
from .sharding import shard_range, split_sizes

__all__ = ["group_name", "resolve_group", "size_rank", "OPS"]


def group_name(group: Any) -> str:
    """How the ops name ``group`` (``None``: the default group): ``"<registered name>/<this rank>"``.

    The rank is part of the name because the fake implementations give rank-dependent shapes
    (uneven shards; a rank's scan state) while the ranks of one machine share torch.compile's
    caches: with the rank in an argument, two ranks never share a compiled graph."""
    require_initialized("a longseq collective")
    g = dist.group.WORLD if group is None else group
    return f"{g.group_name}/{dist.get_rank(g)}"


def resolve_group(name: str) -> Any:
    """The process group named ``name`` (inverse of :func:`group_name`)."""
    return _resolve_process_group(name.rsplit("/", 1)[0])


def size_rank(name: str) -> tuple[int, int]:
    """``(size, this rank)`` of the group named ``name``."""
    g = resolve_group(name)
    r = dist.get_rank(g)
    if name.rsplit("/", 1)[1] != str(r):
        raise RuntimeError(f"longseq op: group {name!r} was named on another rank; this process is rank {r}")
    return dist.get_world_size(g), r


def _with_dim(x: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    shape = list(x.shape)
    shape[dim] = n
    return x.new_empty(shape)


# ----------------------------------------------------------------------------------------------
# all_to_all: gather_dim (sharded, per-rank sizes gather_sizes) becomes whole, scatter_dim sharded
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("longseq::all_to_all", mutates_args=())
def _all_to_all(x: torch.Tensor, group: str, scatter_dim: int, gather_dim: int, gather_sizes: Sequence[int],
                tag: str, scatter_sizes: Optional[Sequence[int]] = None) -> torch.Tensor:
    y = comm.all_to_all(x, resolve_group(group), scatter_dim=scatter_dim, gather_dim=gather_dim,
                        gather_sizes=list(gather_sizes), tag=tag,
                        scatter_sizes=None if scatter_sizes is None else list(scatter_sizes))
    return y.contiguous()        # the strides the fake implementation promises


def _scatter_sizes(n: int, P: int, scatter_sizes: Optional[Sequence[int]]) -> list:
    return split_sizes(n, P) if scatter_sizes is None else list(scatter_sizes)


@_all_to_all.register_fake
def _(x, group, scatter_dim, gather_dim, gather_sizes, tag, scatter_sizes=None):
    P, r = size_rank(group)
    shape = list(x.shape)
    shape[scatter_dim] = _scatter_sizes(x.shape[scatter_dim], P, scatter_sizes)[r]
    shape[gather_dim] = sum(gather_sizes)
    return x.new_empty(shape)


def _a2a_setup(ctx, inputs, output):
    x, group, sd, gd, gather_sizes, tag, *rest = inputs
    scatter_sizes = rest[0] if rest else None
    # backward: the forward's scatter dim is gathered (its pieces' sizes) and its gather dim scattered
    # back into the pieces that came from each rank
    ctx.args = (group, gd, sd, _scatter_sizes(x.shape[sd], size_rank(group)[0], scatter_sizes), tag + ".bwd",
                list(gather_sizes))


def _a2a_backward(ctx, g):
    return torch.ops.longseq.all_to_all(g, *ctx.args), None, None, None, None, None, None


_all_to_all.register_autograd(_a2a_backward, setup_context=_a2a_setup)


# ----------------------------------------------------------------------------------------------
# all_gather (backward reduce_scatter) and reduce_scatter (backward all_gather)
# ----------------------------------------------------------------------------------------------
def _gathered(x: torch.Tensor, group: str, dim: int, sizes: Sequence[int], tag: str) -> torch.Tensor:
    """all_gather's and gather_whole's forward (they differ in backward only)."""
    return comm.all_gather(x, resolve_group(group), dim=dim, sizes=list(sizes), tag=tag).contiguous()


def _gathered_fake(x, group, dim, sizes, tag):
    return _with_dim(x, dim, sum(sizes))


_all_gather = torch.library.custom_op("longseq::all_gather", _gathered, mutates_args=())
_all_gather.register_fake(_gathered_fake)


def _ag_setup(ctx, inputs, output):
    _, group, dim, _, tag = inputs
    ctx.args = (group, dim, tag + ".bwd")


def _ag_backward(ctx, g):
    return torch.ops.longseq.reduce_scatter(g, *ctx.args), None, None, None, None


_all_gather.register_autograd(_ag_backward, setup_context=_ag_setup)


@torch.library.custom_op("longseq::reduce_scatter", mutates_args=())
def _reduce_scatter(x: torch.Tensor, group: str, dim: int, tag: str) -> torch.Tensor:
    return comm.reduce_scatter(x, resolve_group(group), dim=dim, tag=tag).contiguous()


@_reduce_scatter.register_fake
def _(x, group, dim, tag):
    P, r = size_rank(group)
    return _with_dim(x, dim, split_sizes(x.shape[dim], P)[r])


def _rs_setup(ctx, inputs, output):
    x, group, dim, tag = inputs
    ctx.args = (group, dim, split_sizes(x.shape[dim], size_rank(group)[0]), tag + ".bwd")


def _rs_backward(ctx, g):
    return torch.ops.longseq.all_gather(g, *ctx.args), None, None, None


_reduce_scatter.register_autograd(_rs_backward, setup_context=_rs_setup)


# ----------------------------------------------------------------------------------------------
# gather_whole / shard_whole: the whole is used identically on every rank
# ----------------------------------------------------------------------------------------------
_gather_whole = torch.library.custom_op("longseq::gather_whole", _gathered, mutates_args=())
_gather_whole.register_fake(_gathered_fake)


def _gw_setup(ctx, inputs, output):
    _, group, dim, sizes, _ = inputs
    r = size_rank(group)[1]
    ctx.dim, ctx.start, ctx.length = dim, sum(sizes[:r]), sizes[r]


def _gw_backward(ctx, g):
    return g.narrow(ctx.dim, ctx.start, ctx.length).contiguous(), None, None, None, None


_gather_whole.register_autograd(_gw_backward, setup_context=_gw_setup)


@torch.library.custom_op("longseq::shard_whole", mutates_args=())
def _shard_whole(x: torch.Tensor, group: str, dim: int, tag: str) -> torch.Tensor:
    P, r = size_rank(group)
    start, stop = shard_range(x.shape[dim], P, r)
    return x.narrow(dim, start, stop - start).clone(memory_format=torch.contiguous_format)


@_shard_whole.register_fake
def _(x, group, dim, tag):
    P, r = size_rank(group)
    return _with_dim(x, dim, split_sizes(x.shape[dim], P)[r]).contiguous()


def _sw_setup(ctx, inputs, output):
    x, group, dim, tag = inputs
    ctx.args = (group, dim, split_sizes(x.shape[dim], size_rank(group)[0]), tag + ".bwd")


def _sw_backward(ctx, g):
    return torch.ops.longseq.all_gather(g.contiguous(), *ctx.args), None, None, None


_shard_whole.register_autograd(_sw_backward, setup_context=_sw_setup)


# ----------------------------------------------------------------------------------------------
# all_reduce_sum: partial values -> their sum, used identically on every rank (backward identity)
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("longseq::all_reduce_sum", mutates_args=())
def _all_reduce_sum(x: torch.Tensor, group: str, tag: str) -> torch.Tensor:
    return comm.all_reduce(x.clone(memory_format=torch.contiguous_format), resolve_group(group), tag=tag)


@_all_reduce_sum.register_fake
def _(x, group, tag):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _ar_backward(ctx, g):
    return g, None, None


_all_reduce_sum.register_autograd(_ar_backward)

#: The registered ops, for ``torch.library.opcheck`` and docs.
OPS = {name: getattr(torch.ops.longseq, name) for name in
       ("all_to_all", "all_gather", "reduce_scatter", "gather_whole", "shard_whole", "all_reduce_sum")}
