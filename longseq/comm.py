"""Collectives, each recorded in the ledger. The only module in longseq that calls torch.distributed
collectives; everything else (dsp, zeco, baselines, training) goes through here.

Every function takes an explicit ``group`` and a ``tag`` naming the call site. Peers in p2p calls
are ranks *within the group*. Tensors handed to the backend are made contiguous and receive buffers
are fresh ``torch.empty`` tensors: gloo silently computes wrong results on non-contiguous tensors.
Uneven sizes follow ``torch.tensor_split`` (see :mod:`longseq.sharding`).

Device tensors on a gloo group (gloo moves host memory only, except a few collectives) are staged
through host memory: copied to the CPU before the call and the result copied back (for ``irecv``,
when its handle's ``wait()`` returns). That lets several processes share one GPU over gloo (NCCL
refuses two ranks on one device), e.g. to test SP code on a single-GPU machine. The ledger counts
the collective's bytes, not the host copies. Use NCCL for speed.

Faults: every backend call runs under the process group's timeout (``longseq.launch.init_distributed``,
``init_parallel_groups``); while it runs, :func:`in_flight` names it (op, ledger tag, the group's
global ranks). A backend failure, a peer that stopped answering or died, comes out as a
:class:`CollectiveError` whose message names the collective and its tag. A rank that is not a member
of the group it passes raises ``ValueError`` on that rank before any collective.
"""
from __future__ import annotations

import contextlib
import functools
import math
import pickle
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from . import kernels
from .groups import collective_timeout_s, require_initialized
from .ledger import LEDGER
from .sharding import split_sizes

__all__ = [
    "group_size", "group_rank", "all_to_all_single", "all_to_all", "all_gather", "reduce_scatter",
    "all_reduce", "broadcast", "send", "recv", "isend", "irecv", "P2POp", "batch_isend_irecv",
    "all_gather_object", "collective_device", "all_gather_int", "require_member", "CollectiveError", "in_flight",
]


class CollectiveError(RuntimeError):
    """A collective failed in the backend (a peer stopped answering past the timeout, died, or
    raised before it); the message names the op, its ledger tag and the group's global ranks."""


def group_ranks(group: Any) -> list[int]:
    """The global ranks of ``group`` (None or WORLD: the whole world)."""
    if group is None or group is dist.group.WORLD:
        return list(range(dist.get_world_size()))
    return list(dist.get_process_group_ranks(group))


def require_member(group: Any, what: str = "a longseq collective") -> None:
    """Raise ``ValueError`` (on this rank, before any collective) when this rank is not in ``group``."""
    require_initialized(what)
    if group is not None and group is not dist.group.WORLD and dist.get_rank(group) < 0:
        raise ValueError(
            f"{what}: this rank (global rank {dist.get_rank()}) is not a member of the process group it was given "
            f"(global ranks {group_ranks(group)}); pass the group this rank belongs to, e.g. "
            "longseq.init_parallel_groups(sp_size).sp_group on every rank")


def group_size(group: Any) -> int:
    require_member(group)
    return dist.get_world_size(group)


def group_rank(group: Any) -> int:
    require_member(group)
    return dist.get_rank(group)


_IN_FLIGHT: list = []        # (op, tag, group) of the backend calls running now, innermost last


def in_flight() -> Optional[tuple[str, str, list[int]]]:
    """``(op, tag, global ranks)`` of the collective this process is waiting in now, or None (a
    timeout handler or an exception path can name it)."""
    if not _IN_FLIGHT:
        return None
    op, tag, group = _IN_FLIGHT[-1]
    return op, tag, group_ranks(group)


@contextlib.contextmanager
def _running(op: str, tag: str, group: Any):
    """Mark a backend call as in flight; turn a backend failure into a CollectiveError naming it."""
    _IN_FLIGHT.append((op, tag, group))
    try:
        yield
    except CollectiveError:
        raise
    except (RuntimeError, ConnectionError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise CollectiveError(
            f"collective {op} (ledger tag '{tag}') over global ranks {group_ranks(group)} failed on rank "
            f"{dist.get_rank()}: a peer stopped answering (timeout {collective_timeout_s():g} s), died or raised "
            f"before it -- see the first error of the other ranks. Backend: {first}") from e
    finally:
        _IN_FLIGHT.pop()


def collective_device(group: Any) -> torch.device:
    """Where small bookkeeping tensors (checks, scalars) for ``group`` go: the CPU, unless the group's
    backend is NCCL alone (then this process's current CUDA device)."""
    require_initialized("a longseq collective")
    backend = str(dist.get_backend(group))
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_int(value: int, group: Any, *, tag: str = "untagged") -> list[int]:
    """Every rank's integer (sizes, counts, digests), in rank order: one all-gather of one int64 per
    rank, on :func:`collective_device` (so it works on NCCL as on gloo)."""
    t = torch.tensor([int(value)], dtype=torch.int64, device=collective_device(group))
    return all_gather(t, group, dim=0, tag=tag).tolist()


def _global(group: Any, rank_in_group: int) -> int:
    return dist.get_global_rank(group, rank_in_group) if group is not None and group is not dist.group.WORLD else rank_in_group


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def _resized(shape: Sequence[int], dim: int, n: int) -> list[int]:
    s = list(shape)
    s[dim] = n
    return s


# torch >= 2.13 names the flat-tensor collectives *_single (the *_tensor names warn); older torch has only those
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

# Tests set this to stage CPU tensors too (through a copy), so the staging code runs without a GPU.
_STAGE_ALWAYS = False


def _stages(x: torch.Tensor, group: Any) -> bool:
    """True when ``x`` must go through host memory for ``group``'s backend (gloo + a device tensor)."""
    if _STAGE_ALWAYS:
        return True
    return x.device.type != "cpu" and str(dist.get_backend(group)) == "gloo"


def _to_host(x: torch.Tensor) -> torch.Tensor:
    return x.to("cpu", copy=True).contiguous()


class _Work:
    """A backend work handle whose ``wait()`` runs as an in-flight collective (see :func:`in_flight`),
    and, when staged, also copies a received host buffer to its device tensor (``after``) and keeps
    a staged send buffer alive until then."""

    def __init__(self, work: Any, op: str, tag: str, group: Any, after: Any = None, keep: Any = None):
        self._work, self._after, self._keep = work, after, keep
        self._what = (op, tag, group)

    def wait(self, *args: Any) -> bool:
        with _running(*self._what):
            out = self._work.wait(*args)
        if self._after is not None:
            self._after()
            self._after = None
        self._keep = None
        return out

    def is_completed(self) -> bool:
        return self._work.is_completed()


def all_to_all_single(x: torch.Tensor, input_split_sizes: Sequence[int], output_split_sizes: Sequence[int],
                      group: Any, *, tag: str = "untagged") -> torch.Tensor:
    """All-to-all over dim 0 of ``x``: rows ``input_split_sizes[j]`` go to rank j; returns the rows
    received, ``output_split_sizes[i]`` from rank i, concatenated in rank order."""
    P, me = group_size(group), group_rank(group)
    if len(input_split_sizes) != P or len(output_split_sizes) != P:
        raise ValueError(f"all_to_all_single: split sizes must have one entry per rank ({P})")
    if sum(input_split_sizes) != x.shape[0]:
        raise ValueError(f"all_to_all_single: input splits {list(input_split_sizes)} do not sum to dim 0 = {x.shape[0]}")
    x = x.contiguous()
    row = _numel(x.shape[1:])
    out = torch.empty((sum(output_split_sizes), *x.shape[1:]), dtype=x.dtype, device=x.device)
    sent = row * (sum(input_split_sizes) - input_split_sizes[me])
    got = row * (sum(output_split_sizes) - output_split_sizes[me])
    LEDGER.record("all_to_all", tag, P, x.dtype, sent, got)
    if P == 1:
        out.copy_(x)
        return out
    with _running("all_to_all", tag, group):
        if _stages(x, group):
            host = torch.empty(out.shape, dtype=out.dtype)
            dist.all_to_all_single(host, _to_host(x), list(output_split_sizes), list(input_split_sizes), group=group)
            return out.copy_(host)
        dist.all_to_all_single(out, x, list(output_split_sizes), list(input_split_sizes), group=group)
    return out


def all_to_all(x: torch.Tensor, group: Any, *, scatter_dim: int, gather_dim: int,
               gather_sizes: Sequence[int] | None = None, tag: str = "untagged",
               scatter_sizes: Sequence[int] | None = None) -> torch.Tensor:
    """Split ``x`` along ``scatter_dim`` into P pieces, send piece j to rank j, and concatenate what
    arrives along ``gather_dim`` in rank order.

    ``gather_sizes[i]`` is rank i's size of ``gather_dim`` (default: every rank has this rank's size).
    ``scatter_sizes[j]`` is the size of piece j of ``scatter_dim`` (default: ``tensor_split`` sizes);
    any non-negative sizes summing to the dim work (e.g. every rank's own sequence length).
    Input: scatter_dim whole, gather_dim sharded; output: scatter_dim sharded, gather_dim whole.
    """
    P, me = group_size(group), group_rank(group)
    nd = x.dim()
    scatter_dim, gather_dim = scatter_dim % nd, gather_dim % nd
    if scatter_dim == gather_dim:
        raise ValueError("all_to_all: scatter_dim and gather_dim must differ")
    if gather_sizes is None:
        gather_sizes = [x.shape[gather_dim]] * P
    if len(gather_sizes) != P or gather_sizes[me] != x.shape[gather_dim]:
        raise ValueError(
            f"all_to_all: this rank ({me}) holds {x.shape[gather_dim]} along dim {gather_dim} but gather_sizes "
            f"says {list(gather_sizes)}; pass the per-rank sizes of the sharded dimension")
    send_sizes = split_sizes(x.shape[scatter_dim], P) if scatter_sizes is None else [int(n) for n in scatter_sizes]
    if len(send_sizes) != P or sum(send_sizes) != x.shape[scatter_dim] or min(send_sizes) < 0:
        raise ValueError(f"all_to_all: scatter_sizes {list(send_sizes)} must be {P} sizes summing to dim "
                         f"{scatter_dim} = {x.shape[scatter_dim]}")
    # Pieces of different sizes cannot be rows of one matrix (all_to_all_single's unit), so the
    # exchange is of flat element streams: piece j of the scatter dim, in x's own dim order, goes to
    # rank j; rank i's piece arrives with the gather dim at its size. One fused pack kernel writes the
    # send buffer from x's strides and one unpack kernel writes the output (longseq.kernels).
    piece = _resized(x.shape, scatter_dim, send_sizes[me])      # what this rank keeps of the scatter dim
    send_elems = [_numel(_resized(x.shape, scatter_dim, s)) for s in send_sizes]
    recv_elems = [_numel(_resized(piece, gather_dim, g)) for g in gather_sizes]
    out_shape = _resized(piece, gather_dim, sum(gather_sizes))
    out = all_to_all_single(kernels.pack(x, scatter_dim, send_sizes), send_elems, recv_elems, group, tag=tag)
    return kernels.unpack(out, out_shape, gather_dim, gather_sizes)


def all_gather(x: torch.Tensor, group: Any, *, dim: int = 0, sizes: Sequence[int] | None = None,
               tag: str = "untagged") -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` in rank order. ``sizes[i]``: rank i's size of
    ``dim`` (default: all equal). Uneven pieces are padded for transport; padding is not counted."""
    P, me = group_size(group), group_rank(group)
    dim = dim % x.dim()
    if sizes is None:
        sizes = [x.shape[dim]] * P
    if len(sizes) != P or sizes[me] != x.shape[dim]:
        raise ValueError(f"all_gather: this rank ({me}) holds {x.shape[dim]} along dim {dim} but sizes says {list(sizes)}")
    row = _numel([s for i, s in enumerate(x.shape) if i != dim])
    LEDGER.record("all_gather", tag, P, x.dtype, x.numel() * (P - 1), row * (sum(sizes) - sizes[me]))
    if P == 1:
        return x.clone()
    front = x.movedim(dim, 0)
    m = max(sizes)
    buf = torch.zeros((m, *front.shape[1:]), dtype=x.dtype, device=x.device)
    buf[: sizes[me]].copy_(front)
    with _running("all_gather", tag, group):
        if _stages(x, group):
            out = torch.empty((P * m, *front.shape[1:]), dtype=x.dtype)
            _all_gather_flat(out, _to_host(buf), group=group)
            out = out.to(x.device)
        else:
            out = torch.empty((P * m, *front.shape[1:]), dtype=x.dtype, device=x.device)
            _all_gather_flat(out, buf, group=group)
    parts = [out[i * m: i * m + sizes[i]] for i in range(P)]
    return torch.cat(parts, 0).movedim(0, dim).contiguous()


def reduce_scatter(x: torch.Tensor, group: Any, *, dim: int = 0, op: Any = None, tag: str = "untagged") -> torch.Tensor:
    """Sum ``x`` over ranks and keep this rank's piece along ``dim`` (tensor_split sizes).

    Even pieces use the backend's reduce-scatter; uneven ones an all-to-all of the pieces followed by
    a local sum, which moves the same volume."""
    P, me = group_size(group), group_rank(group)
    dim = dim % x.dim()
    sizes = split_sizes(x.shape[dim], P)
    row = _numel([s for i, s in enumerate(x.shape) if i != dim])
    LEDGER.record("reduce_scatter", tag, P, x.dtype, row * (x.shape[dim] - sizes[me]), row * sizes[me] * (P - 1))
    front = x.movedim(dim, 0).contiguous()
    if P == 1:
        return front.movedim(0, dim).clone()
    if op not in (None, dist.ReduceOp.SUM) and len(set(sizes)) != 1:
        raise NotImplementedError("uneven reduce_scatter supports only SUM")
    if _stages(x, group):
        front = _to_host(front)
    with _running("reduce_scatter", tag, group):
        if len(set(sizes)) == 1:
            out = torch.empty((sizes[me], *front.shape[1:]), dtype=x.dtype, device=front.device)
            _reduce_scatter_flat(out, front, op=op or dist.ReduceOp.SUM, group=group)
        else:
            out = torch.empty((sizes[me] * P, *front.shape[1:]), dtype=x.dtype, device=front.device)
            dist.all_to_all_single(out, front, [sizes[me]] * P, sizes, group=group)
            out = out.view(P, sizes[me], *front.shape[1:]).sum(0)
    return out.to(x.device).movedim(0, dim).contiguous()


def all_reduce(x: torch.Tensor, group: Any, *, op: Any = None, tag: str = "untagged") -> torch.Tensor:
    """In-place all-reduce of ``x`` (made contiguous first); returns the reduced tensor."""
    P = group_size(group)
    vol = 2 * x.numel() * (P - 1) // P
    LEDGER.record("all_reduce", tag, P, x.dtype, vol, vol)
    if not x.is_contiguous():
        x = x.contiguous()
    if P > 1:
        with _running("all_reduce", tag, group):
            if _stages(x, group):
                host = _to_host(x)
                dist.all_reduce(host, op=op or dist.ReduceOp.SUM, group=group)
                x.copy_(host)
            else:
                dist.all_reduce(x, op=op or dist.ReduceOp.SUM, group=group)
    return x


def broadcast(x: torch.Tensor, src: int, group: Any, *, tag: str = "untagged") -> torch.Tensor:
    """Broadcast ``x`` from group rank ``src`` in place; returns it."""
    P, me = group_size(group), group_rank(group)
    LEDGER.record("broadcast", tag, P, x.dtype, x.numel() * (P - 1) if me == src else 0, 0 if me == src else x.numel())
    if not x.is_contiguous():
        x = x.contiguous()
    if P > 1:
        with _running("broadcast", tag, group):
            if _stages(x, group):
                host = _to_host(x)
                dist.broadcast(host, src=_global(group, src), group=group)
                x.copy_(host)
            else:
                dist.broadcast(x, src=_global(group, src), group=group)
    return x


def _check_p2p(x: torch.Tensor, peer: int, group: Any, what: str) -> None:
    P, me = group_size(group), group_rank(group)
    if not 0 <= peer < P or peer == me:
        raise ValueError(f"{what}: peer {peer} is not another rank of this group of {P} (this rank is {me})")
    if not x.is_contiguous():
        raise ValueError(f"{what}: tensor must be contiguous (gloo mis-handles strided tensors); call .contiguous()")


def send(x: torch.Tensor, dst: int, group: Any, *, tag: str = "untagged") -> None:
    x = x.contiguous()
    _check_p2p(x, dst, group, "send")
    LEDGER.record("send", tag, group_size(group), x.dtype, x.numel(), 0)
    with _running("send", tag, group):
        dist.send(_to_host(x) if _stages(x, group) else x, _global(group, dst), group=group)


def recv(shape: Sequence[int], dtype: torch.dtype, src: int, group: Any, *, device: Any = "cpu",
         tag: str = "untagged") -> torch.Tensor:
    buf = torch.empty(tuple(shape), dtype=dtype, device=device)
    _check_p2p(buf, src, group, "recv")
    LEDGER.record("recv", tag, group_size(group), dtype, 0, buf.numel())
    with _running("recv", tag, group):
        if _stages(buf, group):
            host = torch.empty(buf.shape, dtype=dtype)
            dist.recv(host, _global(group, src), group=group)
            return buf.copy_(host)
        dist.recv(buf, _global(group, src), group=group)
    return buf


def isend(x: torch.Tensor, dst: int, group: Any, *, tag: str = "untagged"):
    """Asynchronous send; returns the backend's work handle (call ``.wait()``). Keep ``x`` alive until then."""
    _check_p2p(x, dst, group, "isend")
    LEDGER.record("send", tag, group_size(group), x.dtype, x.numel(), 0)
    with _running("send", tag, group):
        if _stages(x, group):
            host = _to_host(x)
            return _Work(dist.isend(host, _global(group, dst), group=group), "send", tag, group, keep=host)
        return _Work(dist.isend(x, _global(group, dst), group=group), "send", tag, group)


def irecv(buf: torch.Tensor, src: int, group: Any, *, tag: str = "untagged"):
    """Asynchronous receive into ``buf`` (fresh and contiguous); returns the work handle."""
    _check_p2p(buf, src, group, "irecv")
    LEDGER.record("recv", tag, group_size(group), buf.dtype, 0, buf.numel())
    with _running("recv", tag, group):
        if _stages(buf, group):
            host = torch.empty(buf.shape, dtype=buf.dtype)
            return _Work(dist.irecv(host, _global(group, src), group=group), "recv", tag, group,
                         after=lambda: buf.copy_(host))
        return _Work(dist.irecv(buf, _global(group, src), group=group), "recv", tag, group)


class P2POp:
    """One point-to-point operation for :func:`batch_isend_irecv`: ``kind`` is "send" or "recv"."""

    def __init__(self, kind: str, tensor: torch.Tensor, peer: int):
        if kind not in ("send", "recv"):
            raise ValueError("P2POp kind must be 'send' or 'recv'")
        self.kind, self.tensor, self.peer = kind, tensor, peer


def batch_isend_irecv(ops: Sequence[P2POp], group: Any, *, tag: str = "untagged") -> list:
    """Issue several sends and receives together; returns their work handles."""
    P = group_size(group)
    torch_ops, afters, keep = [], [], []
    for o in ops:
        _check_p2p(o.tensor, o.peer, group, f"batch_isend_irecv({o.kind})")
        n = o.tensor.numel()
        LEDGER.record(o.kind, tag, P, o.tensor.dtype, n if o.kind == "send" else 0, n if o.kind == "recv" else 0)
        fn = dist.isend if o.kind == "send" else dist.irecv
        t, after = o.tensor, None
        if _stages(t, group):
            if o.kind == "send":
                t = _to_host(t)
            else:
                t = torch.empty(o.tensor.shape, dtype=o.tensor.dtype)
                after = functools.partial(o.tensor.copy_, t)
            keep.append(t)
        afters.append(after)
        torch_ops.append(dist.P2POp(fn, t, _global(group, o.peer), group=group))
    if not torch_ops:
        return []
    with _running("batch_isend_irecv", tag, group):
        works = dist.batch_isend_irecv(torch_ops)
    if not keep:
        return [_Work(w, "batch_isend_irecv", tag, group) for w in works]
    # gloo returns one handle per op (NCCL, which never stages, may return one for the batch)
    return [_Work(w, "batch_isend_irecv", tag, group, after=a, keep=keep) for w, a in zip(works, afters)]


def all_gather_object(obj: Any, group: Any, *, tag: str = "untagged") -> list:
    """Gather a picklable object from every rank (bookkeeping: shapes, ledgers, configs)."""
    P = group_size(group)
    n = len(pickle.dumps(obj))
    LEDGER.record("all_gather_object", tag, P, torch.uint8, n * (P - 1), 0)
    out: list = [None] * P
    if P == 1:
        return [obj]
    with _running("all_gather_object", tag, group):
        dist.all_gather_object(out, obj, group=group)
    return out
