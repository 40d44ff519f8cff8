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

Cross-rank check (``check=True``, the default): before the collective, :func:`longseq.agree.exchange`
all-gathers one 24-byte header (tag ``<tag>.check``, control bytes in the ledger) with this rank's
argument error status, a digest of what must match on every rank (dtype, device type, the dims that
are not sharded, the dims and sizes asked for) and this rank's size of the sharded dim, on every
call; on a mismatch or an error every rank raises the same exception (details: ``<tag>.check.detail``,
only then). Without ``gather_size`` / ``full_size`` the sizes come from that header, so a checked call
makes no separate size exchange. Skip it in hot loops once validated: ``check=False``, or
``with dsp.unchecked(): ...`` (every rank must then skip it alike: a rank that checks while another
does not is a disagreement no message can reveal). A rank that is not a member of ``group`` raises
on that rank before any collective.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import torch

from longseq import agree, comm
from longseq import functional as LF
from longseq.groups import sp_group_of
from longseq.sharding import check_shardable, split_sizes

__all__ = ["switch", "shard", "gather", "sp_group_of", "whole_size", "check_agree", "unchecked", "checks_enabled"]

_CHECKS = [True]


@contextlib.contextmanager
def unchecked():
    """Within this block, switch / shard / gather called with ``check=None`` skip the cross-rank check."""
    _CHECKS.append(False)
    try:
        yield
    finally:
        _CHECKS.pop()


def checks_enabled(check: Optional[bool] = None) -> bool:
    """Whether a primitive called with ``check`` runs :func:`check_agree` (None: the current default)."""
    return _CHECKS[-1] if check is None else bool(check)


def check_agree(group: Any, what: str, signature: tuple, error: Optional[str], *, tag: str) -> None:
    """Raise the same ``ValueError`` on every rank of ``group`` unless all ranks have the same
    ``signature`` and no rank has an ``error`` (its own argument error, a message, or None): one
    :func:`longseq.agree.exchange` (tag ``tag``). Every rank must call it."""
    agree.exchange(group, what, signature, None if error is None else ValueError(error), tag=tag)


def _signature(x: torch.Tensor, skip: Optional[int], **asked) -> tuple:
    """dtype, device type and the shape with dim ``skip`` (the sharded one, which may differ) left out."""
    shape = tuple(-1 if i == skip else int(n) for i, n in enumerate(x.shape))
    return (str(x.dtype).replace("torch.", ""), x.device.type, shape, tuple(sorted(asked.items())))


def _whole_from(sizes: list, what: str) -> int:
    n, P = sum(sizes), len(sizes)
    if sizes != split_sizes(n, P):
        raise ValueError(
            f"{what}: the ranks hold {sizes} elements of the sharded dimension, which is not the tensor_split "
            f"layout of {n} over {P} ranks ({split_sizes(n, P)}); shard with dsp.shard or pass the sizes")
    return n


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
    return _whole_from(comm.all_gather_int(local, group, tag=tag), "whole_size")


def _check_local(x: torch.Tensor, dim: int, full: int, P: int, r: int, what: str) -> None:
    check_shardable(full, P, what)
    expect = split_sizes(full, P)[r]
    if x.shape[dim] != expect:
        raise ValueError(
            f"{what}: this rank ({r} of {P}) holds {x.shape[dim]} elements along dim {dim} of a tensor of shape "
            f"{list(x.shape)}, but a whole size of {full} gives it {expect} (tensor_split sizes "
            f"{split_sizes(full, P)})")


def switch(x: torch.Tensor, group: Any, scatter_dim: int, gather_dim: int, gather_size: int | None = None,
           *, tag: str = "dsp.switch", comm_dtype: torch.dtype | None = None,
           check: Optional[bool] = None) -> torch.Tensor:
    """Move the sharding of ``x`` from ``gather_dim`` to ``scatter_dim`` with one all-to-all.

    ``x`` holds this rank's piece of ``gather_dim`` (whole size ``gather_size``) and all of
    ``scatter_dim``; the result holds all of ``gather_dim`` and this rank's piece of
    ``scatter_dim``. Backward is the switch back (tag ``<tag>.bwd``).
    ``comm_dtype`` (e.g. ``torch.bfloat16``): send in this dtype and cast back to ``x.dtype`` after,
    forward and backward; default: ``x.dtype``.
    Raises ``ValueError`` (on every rank, before the all-to-all) if ``scatter_dim`` or
    ``gather_size`` is smaller than the group, if this rank's size does not match ``gather_size``,
    or (``check``, see the module docstring) if the ranks disagree on dtype or the other dims.
    """
    group = sp_group_of(group)
    comm.require_member(group, "dsp.switch")
    P, r = comm.group_size(group), comm.group_rank(group)

    def validate():
        sd = _dim(x, scatter_dim, "dsp.switch scatter_dim")
        gd = _dim(x, gather_dim, "dsp.switch gather_dim")
        if sd == gd:
            raise ValueError(f"dsp.switch: scatter_dim and gather_dim are both {sd}")
        check_shardable(x.shape[sd], P, f"dim {sd} (scatter_dim) of a tensor of shape {list(x.shape)}")
        if gather_size is not None:
            _check_local(x, gd, int(gather_size), P, r, f"dim {gd} (gather_dim)")
        return sd, gd

    if checks_enabled(check):
        _, err = agree.local_error(validate)
        gd0 = gather_dim % x.dim() if x.dim() else None
        sig = _signature(x, gd0, scatter_dim=scatter_dim % max(1, x.dim()),
                         gather_dim=gather_dim % max(1, x.dim()), gather_size=gather_size, comm_dtype=str(comm_dtype))
        local = int(x.shape[gd0]) if err is None and gd0 is not None else 0
        sizes = agree.exchange(group, "dsp.switch", sig, err, tag=tag + ".check", value=local)
        if gather_size is None:
            gather_size = _whole_from(sizes, "dsp.switch")    # the same on every rank: all raise alike
    sd, gd = validate()
    if gather_size is None:
        gather_size = whole_size(x.shape[gd], group, tag=tag + ".sizes")
        _check_local(x, gd, int(gather_size), P, r, f"dim {gd} (gather_dim)")
    if comm_dtype is not None and comm_dtype != x.dtype:
        y = LF.all_to_all(x.to(comm_dtype), group, scatter_dim=sd, gather_dim=gd, gather_size=int(gather_size), tag=tag)
        return y.to(x.dtype)
    return LF.all_to_all(x, group, scatter_dim=sd, gather_dim=gd, gather_size=int(gather_size), tag=tag)


def shard(x: torch.Tensor, dim: int, group: Any, *, tag: str = "dsp.shard",
          check: Optional[bool] = None) -> torch.Tensor:
    """This rank's ``tensor_split`` piece of ``x`` along ``dim``; ``x`` must be the same on every
    rank. No communication forward (except the shape check, ``check``); backward all-gathers the
    gradient (tag ``<tag>.bwd``)."""
    group = sp_group_of(group)
    comm.require_member(group, "dsp.shard")
    P = comm.group_size(group)

    def validate():
        d = _dim(x, dim, "dsp.shard")
        check_shardable(x.shape[d], P, f"dim {d} of a tensor of shape {list(x.shape)}")
        return d

    if checks_enabled(check):
        agree.exchange(group, "dsp.shard", _signature(x, None, dim=dim % max(1, x.dim())),
                       agree.local_error(validate)[1], tag=tag + ".check")
    return LF.shard_whole(x, group, dim=validate(), tag=tag)


def gather(x: torch.Tensor, dim: int, group: Any, full_size: int | None = None, *,
           tag: str = "dsp.gather", check: Optional[bool] = None) -> torch.Tensor:
    """All-gather the pieces of ``x`` along ``dim`` (whole size ``full_size``) into the whole, the same
    on every rank; backward keeps this rank's piece of the gradient (no communication)."""
    group = sp_group_of(group)
    comm.require_member(group, "dsp.gather")
    P, r = comm.group_size(group), comm.group_rank(group)

    def validate():
        d = _dim(x, dim, "dsp.gather")
        if full_size is not None:
            _check_local(x, d, int(full_size), P, r, f"dim {d}")
        return d

    if checks_enabled(check):
        d0 = dim % x.dim() if x.dim() else None
        sig = _signature(x, d0, dim=dim % max(1, x.dim()), full_size=full_size)
        _, err = agree.local_error(validate)
        local = int(x.shape[d0]) if err is None and d0 is not None else 0
        sizes = agree.exchange(group, "dsp.gather", sig, err, tag=tag + ".check", value=local)
        if full_size is None:
            full_size = _whole_from(sizes, "dsp.gather")
    d = validate()
    if full_size is None:
        full_size = whole_size(x.shape[d], group, tag=tag + ".sizes")
    _check_local(x, d, int(full_size), P, r, f"dim {d}")
    return LF.gather_whole(x, group, dim=d, full_size=int(full_size), tag=tag)
