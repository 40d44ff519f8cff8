"""All-Scan: ZeCO's pipelined prefix scan of recurrent states over the ranks of a group.

Every rank ``i`` of a group of ``P`` holds a *local* state ``L_i`` (``[..., R, C]``, for GLA the
zero-initial-state final state ``[B, H, K, V]`` of its piece of the sequence) and a *decay*
``d_i`` (for GLA ``Γ_i = exp(sum of g over the piece)``: one value per row, ``[..., R]`` =
``[B, H, K]``, or one per matrix, ``[...]`` = ``[B, H]`` for scalar decay; ``None`` = no decay).
The scan is the affine recurrence over ranks::

    out_i = diag(d_i) · in_i + L_i          in_0 = initial_state (or 0),   in_i = out_{i-1}

so ``in_i`` is exactly the state rank ``i``'s piece starts from (``S⁰_i``) and ``out_{P-1}`` is the
global final state. ``reverse=True`` runs the same recurrence from rank P-1 down to rank 0
(``in_{P-1} = initial_state``, ``in_i = out_{i+1}``): the backward pass's
``dS⁰_i = dS⁰_i(local) + diag(Γ_i) · dS⁰_{i+1}``.

How it moves the state (DESIGN.md, "ZeCO"): the chain of LASP-1, pipelined. The state is cut into
``N`` blocks of rows (``R`` = K for GLA); rank ``i`` posts receives for the N blocks of ``in_i``
from its predecessor, and as soon as block ``j`` arrives it computes block ``j`` of
``out_i = diag(d_i) in_i + L_i`` (the decay is per row, so every block is independent) and
forwards it to its successor. Block ``j`` therefore travels down the chain while block ``j+1`` is
still arriving: time ≈ (P-1+N)·(α + state/(N·β)) instead of LASP-1's (P-1)·(α + state/β).

**Why exactly one state per rank.** Rank ``i`` needs ``in_i = out_{i-1}``, which depends on every
earlier rank's data, but only through that one matrix: ``out_{i-1}`` already folds ranks
``0..i-1`` together. So the minimum any scheme can deliver to rank ``i`` is one state, and All-Scan
delivers exactly that: each rank receives its ``N`` blocks once (rank 0 receives nothing: its input
is the given initial state) and sends its ``N`` blocks of ``out_i`` once, to the next rank only
(rank P-1 sends nothing: nobody needs the global final state from it, it keeps it). Total per
rank: ``numel(state)`` elements sent and received, independent of ``P``, against LASP-2's
all-gather, where every rank receives ``P-1`` states.

**The N rule** (:func:`num_blocks_for`): ``N = clamp(ceil(state_bytes / DEFAULT_BLOCK_BYTES), 1, R)``
with ``DEFAULT_BLOCK_BYTES = 256 KiB``: blocks of about 256 KiB, at least one, and never more blocks
than rows (a block is at least one row). An explicit ``num_blocks`` overrides the rule; it is
clamped to ``[1, R]`` as well (so ``num_blocks`` larger than the number of rows is legal and means
"one row per block"); ``num_blocks < 1`` is a ``ValueError``. Every rank must use the same N: the
rule depends only on shape and dtype, which :func:`zeco.sp_gla` checks across ranks.

**Asynchronous use.** :func:`all_scan_start` posts the receives and sends and returns an
:class:`AllScanHandle` at once; ranks that relay (neither first nor last in the chain) do the
receive-update-forward loop on a helper thread, so the chain advances while the caller computes
its local, zero-initial-state output. :meth:`AllScanHandle.wait` returns ``(in_i, out_i | None)``.
:func:`all_scan` is start + wait.

Messages go through :func:`longseq.comm.isend` / :func:`longseq.comm.irecv` with a ledger tag
(default ``"zeco.scan"``; ``zeco.sp_gla`` uses ``"zeco.scan.fwd"`` / ``"zeco.scan.bwd"``): one
``send`` record per block on every rank but the last of the chain, one ``recv`` record per block on
every rank but the first. Blocks are contiguous copies and receive buffers are fresh
``torch.empty`` tensors (gloo mis-handles strided tensors). Between the same two ranks the blocks
of one scan are matched in posting order; a process must not run two scans over the same group
and direction at once (``sp_gla`` waits for each before the next).
"""
from __future__ import annotations

import math
import threading
from typing import Any, Optional, Sequence

import torch

from longseq import comm
from longseq.sharding import split_sizes

__all__ = ["all_scan", "all_scan_start", "AllScanHandle", "num_blocks_for", "DEFAULT_BLOCK_BYTES",
           "scan_reference"]

#: Target block size of the N rule (bytes). Chosen from ``python -m benchmarks.zeco_scan --sweep``
#: on gloo/TCP loopback (see docs/zeco.md); on NVLink/InfiniBand a larger block suits better.
DEFAULT_BLOCK_BYTES = 256 * 1024


def num_blocks_for(state_shape: Sequence[int], dtype: torch.dtype, num_blocks: Optional[int] = None, *,
                   block_bytes: int = DEFAULT_BLOCK_BYTES) -> int:
    """N for a state of this shape (``[..., R, C]``) and dtype: the rule of the module docstring.

    ``num_blocks`` given: clamped to ``[1, R]`` (``ValueError`` if it is not a positive int)."""
    if len(state_shape) < 2:
        raise ValueError(f"a scanned state must be at least 2-D [..., rows, cols], got shape {tuple(state_shape)}")
    rows = int(state_shape[-2])
    if num_blocks is not None:
        if not isinstance(num_blocks, int) or isinstance(num_blocks, bool) or num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive int or None, got {num_blocks!r}")
        n = num_blocks
    else:
        nbytes = math.prod(state_shape) * torch.empty((), dtype=dtype).element_size()
        n = max(1, -(-nbytes // int(block_bytes)))
    return max(1, min(n, max(rows, 1)))


def _decay_view(decay: Optional[torch.Tensor], local: torch.Tensor, what: str) -> tuple[Optional[torch.Tensor], bool]:
    """The decay as a tensor broadcastable against ``local`` ([..., R, 1] or [..., 1, 1]), and
    whether it is per row."""
    if decay is None:
        return None, False
    if not isinstance(decay, torch.Tensor):
        raise TypeError(f"{what}: decay must be a tensor or None")
    if tuple(decay.shape) == tuple(local.shape[:-1]):
        return decay.to(local.dtype).unsqueeze(-1), True
    if tuple(decay.shape) == tuple(local.shape[:-2]):
        return decay.to(local.dtype).unsqueeze(-1).unsqueeze(-1), False
    raise ValueError(
        f"{what}: decay must have shape {tuple(local.shape[:-1])} (one per row) or {tuple(local.shape[:-2])} "
        f"(one per matrix) for a state of shape {tuple(local.shape)}, got {tuple(decay.shape)}")


def _row_slice(x: Optional[torch.Tensor], r0: int, r1: int, per_row: bool) -> Optional[torch.Tensor]:
    if x is None:
        return None
    return x[..., r0:r1, :] if per_row else x


class AllScanHandle:
    """An All-Scan in flight. :meth:`wait` returns ``(initial, final)``: this rank's incoming state
    ``in_i`` and, when ``output_final_state`` was asked, its outgoing ``out_i`` (on the last rank of
    the chain: the global result), else ``None``."""

    def __init__(self) -> None:
        self.num_blocks = 1
        self._result: Optional[tuple] = None
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self._finish = None  # callable producing the result on the calling thread

    def is_completed(self) -> bool:
        """True once :meth:`wait` can return without blocking on the helper thread."""
        return self._result is not None or (self._thread is not None and not self._thread.is_alive())

    def wait(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self._result is None:
            if self._thread is not None:
                self._thread.join()
                self._thread = None
            if self._error is not None:
                err, self._error = self._error, None
                raise err
            self._result = self._finish()
            self._finish = None
        return self._result


def all_scan_start(decay: Optional[torch.Tensor], local: torch.Tensor, group: Any, *,
                   initial_state: Optional[torch.Tensor] = None, reverse: bool = False,
                   num_blocks: Optional[int] = None, output_final_state: bool = False,
                   background: bool = True, tag: str = "zeco.scan") -> AllScanHandle:
    """Start an All-Scan (see the module docstring); returns its :class:`AllScanHandle`.

    Args:
        decay: ``[..., R]`` (per row), ``[...]`` (per matrix) or ``None``; this rank's ``d_i``.
        local: ``[..., R, C]`` floating tensor, this rank's ``L_i``; the scan runs in its dtype.
        group: the process group (ranks are taken in group order).
        initial_state: ``in`` of the first rank of the chain (rank 0, or P-1 when ``reverse``);
            ignored elsewhere. ``None`` = zeros.
        reverse: scan from rank P-1 down to rank 0.
        num_blocks: N, overriding the rule (:func:`num_blocks_for`); must agree on every rank.
        output_final_state: also return ``out_i`` from :meth:`AllScanHandle.wait`.
        background: relay on a helper thread (so the caller can compute meanwhile); with False the
            relay runs inside :meth:`AllScanHandle.wait`.
        tag: ledger tag of the sends and receives.
    """
    if not isinstance(local, torch.Tensor) or not local.is_floating_point() or local.dim() < 2:
        raise ValueError("all_scan: local must be a floating tensor [..., rows, cols]")
    d, per_row = _decay_view(decay, local, "all_scan")
    if initial_state is not None and tuple(initial_state.shape) != tuple(local.shape):
        raise ValueError(f"all_scan: initial_state must have the state's shape {tuple(local.shape)}, "
                         f"got {tuple(initial_state.shape)}")
    P, me = comm.group_size(group), comm.group_rank(group)
    N = num_blocks_for(local.shape, local.dtype, num_blocks)
    h = AllScanHandle()
    h.num_blocks = N
    dt = local.dtype
    prev = (me + 1 if reverse else me - 1)
    nxt = (me - 1 if reverse else me + 1)
    has_prev = 0 <= prev < P
    has_next = 0 <= nxt < P
    rows = local.shape[-2]
    sizes = split_sizes(rows, N)
    bounds = [(sum(sizes[:j]), sum(sizes[:j + 1])) for j in range(N)]
    block_shape = lambda j: (*local.shape[:-2], bounds[j][1] - bounds[j][0], local.shape[-1])  # noqa: E731

    def update(inp: torch.Tensor, j: int) -> torch.Tensor:
        r0, r1 = bounds[j]
        loc = local[..., r0:r1, :]
        if d is None:
            return (inp + loc).contiguous()
        dj = _row_slice(d, r0, r1, per_row)
        return torch.addcmul(loc, dj, inp).contiguous()

    if not has_prev:
        # first of the chain: the input is known now
        if initial_state is not None:
            inp = initial_state.to(dt)
        else:
            inp = torch.zeros(local.shape, dtype=dt, device=local.device)
        if has_next or output_final_state:
            outs = [update(inp[..., r0:r1, :], j) for j, (r0, r1) in enumerate(bounds)]
        else:
            outs = None
        works = [comm.isend(o, nxt, group, tag=tag) for o in outs] if has_next else []

        def finish_first():
            for w in works:
                w.wait()
            out = torch.cat(outs, dim=-2) if (output_final_state and outs) else None
            return inp, out

        h._finish = finish_first
        return h

    # receive N blocks from the previous rank
    bufs = [torch.empty(block_shape(j), dtype=dt, device=local.device) for j in range(N)]
    rworks = [comm.irecv(b, prev, group, tag=tag) for b in bufs]

    if not has_next:
        # last of the chain: just receive
        def finish_last():
            for w in rworks:
                w.wait()
            inp = torch.cat(bufs, dim=-2)
            out = None
            if output_final_state:
                out = (inp + local) if d is None else torch.addcmul(local, d, inp)
            return inp, out

        h._finish = finish_last
        return h

    # a relay: receive block j, update it, forward it
    outs: list = [None] * N
    sworks: list = []

    def relay():
        for j in range(N):
            rworks[j].wait()
            outs[j] = update(bufs[j], j)
            sworks.append(comm.isend(outs[j], nxt, group, tag=tag))
        for w in sworks:
            w.wait()

    def finish_relay():
        if not background:
            relay()
        inp = torch.cat(bufs, dim=-2)
        out = torch.cat(outs, dim=-2) if output_final_state else None
        return inp, out

    if background:
        def target():
            try:
                relay()
            except BaseException as e:  # noqa: BLE001 - re-raised in wait()
                h._error = e

        h._thread = threading.Thread(target=target, name="zeco-all-scan", daemon=True)
        h._thread.start()
    h._finish = finish_relay
    return h


def all_scan(decay: Optional[torch.Tensor], local: torch.Tensor, group: Any, *,
             initial_state: Optional[torch.Tensor] = None, reverse: bool = False,
             num_blocks: Optional[int] = None, output_final_state: bool = False,
             tag: str = "zeco.scan") -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Blocking All-Scan: ``(in_i, out_i or None)``; see :func:`all_scan_start`."""
    return all_scan_start(decay, local, group, initial_state=initial_state, reverse=reverse,
                          num_blocks=num_blocks, output_final_state=output_final_state,
                          background=False, tag=tag).wait()


def scan_reference(decays: Sequence[Optional[torch.Tensor]], locals_: Sequence[torch.Tensor],
                   initial_state: Optional[torch.Tensor] = None, reverse: bool = False) -> list:
    """Serial fold over all ranks' ``(decay, local)`` pairs (no communication): the list of
    ``(in_i, out_i)`` the scan gives each rank. For tests and for LASP-2's local fold."""
    P = len(locals_)
    order = range(P - 1, -1, -1) if reverse else range(P)
    res: list = [None] * P
    S = initial_state if initial_state is not None else torch.zeros_like(locals_[0])
    for i in order:
        d, _ = _decay_view(decays[i], locals_[i], "scan_reference")
        out = locals_[i] + (S if d is None else d * S)
        res[i] = (S, out)
        S = out
    return res
