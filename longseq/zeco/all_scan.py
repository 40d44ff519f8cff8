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

How it moves the state (DESIGN.md, "ZeCO"): the chain of LASP-1, pipelined. The state, viewed as a
``[rows, C]`` matrix (rows = every leading index: (b, h, k) for GLA, so the cut runs along K with B
and H outermost), is cut into ``N`` blocks of consecutive rows, each a contiguous piece of memory
(no copies). Rank ``i`` posts receives for the N blocks of ``in_i`` from its predecessor, and as
soon as block ``j`` arrives it computes block ``j`` of ``out_i = diag(d_i) in_i + L_i`` (the decay
is per row, so every block is independent) and forwards it to its successor. Block ``j``
therefore travels down the chain while block ``j+1`` is still arriving: time ≈
(P-1+N)·(α + state/(N·β)) instead of LASP-1's (P-1)·(α + state/β).

**Dense maps** (the gated delta rule, :mod:`zeco.sp_delta`). ``decay`` may also be a dense
transition ``A_i`` of shape ``[..., R, R]``: ``out_i = A_i · in_i + L_i`` (GLA's diagonal is the
special case). A row of ``out`` then mixes every row of ``in``, but the columns (V) transform
independently, so the blocks are column ranges ``[..., R, c0:c1]`` (each sent as its own contiguous
copy) and the pipeline is the same: block j is ``A_i · in[..., c0:c1] + L_i[..., c0:c1]``, one
batched matrix product, forwarded as soon as it is computed. N is clamped to ``[1, C]``. The
backward of such a scan is the reverse scan with the transposed maps ``A_iᵀ``.

**Why exactly one state per rank.** Rank ``i`` needs ``in_i = out_{i-1}``, which depends on every
earlier rank's data, but only through that one matrix: ``out_{i-1}`` already folds ranks
``0..i-1`` together. So the minimum any scheme can deliver to rank ``i`` is one state, and All-Scan
delivers exactly that: each rank receives its ``N`` blocks once (rank 0 receives nothing: its input
is the given initial state) and sends its ``N`` blocks of ``out_i`` once, to the next rank only
(rank P-1 sends nothing: nobody after it needs its state; it keeps the global final state). Total
per rank: ``numel(state)`` elements sent and received, independent of ``P``, against LASP-2's
all-gather, where every rank receives ``P-1`` states.

**The N rule** (:func:`num_blocks_for`). Minimising the time model above over N gives
``N* = sqrt((P-1) · state_bytes / (α·β))``, where ``α·β`` is the message size whose transfer time
equals the per-message latency. The rule is ``N = clamp(round(sqrt((P-1) · state_bytes /
DEFAULT_HALF_BYTES)), 1, rows)`` with ``DEFAULT_HALF_BYTES = 1 MiB``, the effective value fitted to
``python -m longseq.benchmarks.zeco_scan --sweep`` on gloo over loopback (per-block cost includes the relay's
update and thread hand-off, so it exceeds a bare ping-pong's α·β). Examples: a 2 MiB state gives
N = 1 at P=2, 2 at P=4, 11 at P=64; a 10 MiB state 3 at P=2, 5 at P=4. An explicit ``num_blocks``
overrides the rule; it is clamped to ``[1, rows]`` too (more blocks than rows is legal and means
one row per block); ``num_blocks < 1`` is a ``ValueError``. Every rank must use the same N: the
rule depends only on shape, dtype and P, which :func:`zeco.sp_gla` checks across ranks.

**Asynchronous use.** :func:`all_scan_start` posts the receives and sends and returns an
:class:`AllScanHandle` at once; ranks that relay (neither first nor last in the chain) do the
receive-update-forward loop on a helper thread, so the chain advances while the caller computes
its local, zero-initial-state output. :meth:`AllScanHandle.wait` returns ``(in_i, out_i | None)``
(``in_i`` is ``None`` on the first rank of the chain when it starts from zero).
:func:`all_scan` is start + wait.

**CUDA streams.** On CUDA the scan's own work (posting receives and sends, the block updates, the
buffers) runs on a side stream of high priority, one per device, which first waits for the caller's
stream (the local summary is ready) and which :meth:`AllScanHandle.wait` makes the caller's stream
wait for. Without it the relay's updates would queue on the default stream behind the caller's
local GLA kernels, and NCCL, which orders a send after the work queued on the issuing stream, would
forward each block only after this rank's local compute: the chain would serialise with compute,
the opposite of the method.

Messages go through :func:`longseq.comm.isend` / :func:`longseq.comm.irecv` with a ledger tag
(default ``"zeco.scan"``; ``zeco.sp_gla`` uses ``"zeco.scan.fwd"`` / ``"zeco.scan.bwd"``): one
``send`` record per block on every rank but the last of the chain, one ``recv`` record per block on
every rank but the first. Blocks are contiguous copies and receive buffers are fresh
``torch.empty`` tensors (gloo mis-handles strided tensors). Between the same two ranks the blocks
of one scan are matched in posting order; a process must not run two scans over the same group
and direction at once (``sp_gla`` waits for each before the next).
"""
from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Optional, Sequence

import torch

from longseq import comm, kernels
from longseq.sharding import split_sizes

__all__ = ["all_scan", "all_scan_start", "AllScanHandle", "num_blocks_for", "DEFAULT_HALF_BYTES", "set_default_half_bytes",
           "scan_reference"]

#: α·β of the N rule (bytes): the message size whose transfer time equals the per-message latency.
#: Fitted on gloo/TCP loopback (docs/zeco.md); :func:`set_default_half_bytes` tunes it for another
#: fabric (``zeco.all_scan`` is also the name of the function, which hides this module's attributes).
DEFAULT_HALF_BYTES = 1 << 20


def set_default_half_bytes(nbytes: int) -> int:
    """Set the α·β of the N rule for this process (e.g. measured on NVLink); returns the old value."""
    global DEFAULT_HALF_BYTES
    if not isinstance(nbytes, int) or nbytes < 1:
        raise ValueError(f"half_bytes must be a positive int, got {nbytes!r}")
    old, DEFAULT_HALF_BYTES = DEFAULT_HALF_BYTES, nbytes
    return old


def num_blocks_for(state_shape: Sequence[int], dtype: torch.dtype, num_blocks: Optional[int] = None, *,
                   world_size: int = 2, half_bytes: Optional[int] = None) -> int:
    """N for a state of this shape (``[..., R, C]``), dtype and group size: the rule of the module
    docstring. ``num_blocks`` given: clamped to ``[1, rows]`` (``ValueError`` unless a positive int)."""
    if len(state_shape) < 2:
        raise ValueError(f"a scanned state must be at least 2-D [..., rows, cols], got shape {tuple(state_shape)}")
    rows = math.prod([int(x) for x in state_shape[:-1]])
    if num_blocks is not None:
        if not isinstance(num_blocks, int) or isinstance(num_blocks, bool) or num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive int or None, got {num_blocks!r}")
        n = num_blocks
    else:
        nbytes = math.prod(state_shape) * dtype.itemsize
        hb = DEFAULT_HALF_BYTES if half_bytes is None else half_bytes
        n = int(round(math.sqrt(max(world_size - 1, 0) * nbytes / hb)))
    return max(1, min(n, max(rows, 1)))


_SIDE_STREAMS: dict = {}


def _side_stream(device: torch.device) -> Optional["torch.cuda.Stream"]:
    """The scan's side stream for a CUDA device (high priority, made once); None elsewhere."""
    if device.type != "cuda":
        return None
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SIDE_STREAMS:
        _SIDE_STREAMS[idx] = torch.cuda.Stream(device=idx, priority=-1)
    return _SIDE_STREAMS[idx]


def _on(stream: Optional["torch.cuda.Stream"]):
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def _fork(stream: Optional["torch.cuda.Stream"], device: torch.device) -> None:
    """The side stream waits for the work queued so far on the caller's current stream."""
    if stream is not None:
        stream.wait_stream(torch.cuda.current_stream(device))


def _join(stream: Optional["torch.cuda.Stream"], device: torch.device, *made_on_side: Optional[torch.Tensor]) -> None:
    """The caller's current stream waits for the side stream; tensors allocated on the side stream
    are marked as used by the caller's stream (so the allocator does not hand their memory out early)."""
    if stream is None:
        return
    cur = torch.cuda.current_stream(device)
    cur.wait_stream(stream)
    for t in made_on_side:
        if t is not None:
            t.record_stream(cur)


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


def _flat_rows(decay: Optional[torch.Tensor], local: torch.Tensor) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """``local`` as a contiguous ``[rows, C]`` matrix (rows = every leading index, e.g. (b, h, k)) and
    the decay as a ``[rows, 1]`` column (a per-matrix decay repeated over its rows)."""
    d, _ = _decay_view(decay, local, "all_scan")
    flat = local.contiguous().view(-1, local.shape[-1])
    if d is None:
        return None, flat
    return d.expand(*local.shape[:-1], 1).reshape(-1, 1), flat


class AllScanHandle:
    """An All-Scan in flight. :meth:`wait` returns ``(initial, final)``: this rank's incoming state
    ``in_i`` (``None`` on the first rank of the chain when no ``initial_state`` was given: zero, not
    materialised) and, when ``output_final_state`` was asked, its outgoing ``out_i`` (on the last
    rank of the chain: the global result), else ``None``."""

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


class _RowBlocks:
    """Diagonal (or scalar, or no) decay: blocks are contiguous row ranges of the flat ``[rows, C]``
    state (no copies); ``out = diag(d) in + L`` row by row."""

    def __init__(self, decay, local, N, need_local):
        self.shape, self.dt, self.dev = tuple(local.shape), local.dtype, local.device
        self.rows, self.cols = math.prod(self.shape[:-1]), self.shape[-1]
        sizes = split_sizes(self.rows, N)
        self.bounds = [(sum(sizes[:j]), sum(sizes[:j + 1])) for j in range(N)]
        self.d, self.loc = _flat_rows(decay, local) if need_local else (None, None)

    def flat(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dt).contiguous().view(self.rows, self.cols)

    def empty(self) -> torch.Tensor:
        return torch.empty(self.rows, self.cols, dtype=self.dt, device=self.dev)

    def block(self, buf: torch.Tensor, j: int) -> torch.Tensor:
        r0, r1 = self.bounds[j]
        return buf[r0:r1]

    def update(self, inp: Optional[torch.Tensor], out: torch.Tensor, j: int) -> torch.Tensor:
        """Block j of out = diag(d) inp + local, written into ``out`` (a contiguous row range)."""
        r0, r1 = self.bounds[j]
        # one fused kernel on the current (side) stream: decay, add local, cast, into the send buffer
        return kernels.scan_update(out[r0:r1], None if inp is None else inp[r0:r1], self.loc[r0:r1],
                                   None if self.d is None else self.d[r0:r1])

    def whole(self, buf: torch.Tensor) -> torch.Tensor:
        return buf.view(self.shape)


class _ColBlocks:
    """A dense map ``A`` (``[..., R, R]``): ``out = A · in + L``; columns transform independently, so
    blocks are column ranges, each held as its own contiguous ``[M, R, c_j]`` tensor (M = the
    leading dims flattened); a buffer is the list of its blocks."""

    def __init__(self, transition, local, N, need_local):
        self.shape, self.dt, self.dev = tuple(local.shape), local.dtype, local.device
        self.R, self.cols = self.shape[-2], self.shape[-1]
        self.M = math.prod(self.shape[:-2])
        sizes = split_sizes(self.cols, N)
        self.bounds = [(sum(sizes[:j]), sum(sizes[:j + 1])) for j in range(N)]
        self.A = transition.to(self.dt).reshape(self.M, self.R, self.R) if need_local else None
        self.loc = self.flat(local) if need_local else None

    def flat(self, x: torch.Tensor) -> list:
        x = x.to(self.dt).reshape(self.M, self.R, self.cols)
        return [x[..., c0:c1].contiguous() for c0, c1 in self.bounds]

    def empty(self) -> list:
        return [torch.empty(self.M, self.R, c1 - c0, dtype=self.dt, device=self.dev) for c0, c1 in self.bounds]

    def block(self, buf: list, j: int) -> torch.Tensor:
        return buf[j]

    def update(self, inp: Optional[list], out: list, j: int) -> torch.Tensor:
        """Block j of out = A · inp + local (one batched matrix product per block)."""
        if inp is None:
            return out[j].copy_(self.loc[j])
        return torch.baddbmm(self.loc[j], self.A, inp[j], out=out[j])

    def whole(self, buf: list) -> torch.Tensor:
        return torch.cat(buf, -1).view(self.shape)


def _is_dense(decay: Optional[torch.Tensor], local: torch.Tensor) -> bool:
    """A dense ``[..., R, R]`` transition (rather than a per-row or per-matrix decay)."""
    return (isinstance(decay, torch.Tensor) and decay.dim() == local.dim()
            and tuple(decay.shape) == tuple(local.shape[:-1]) + (local.shape[-2],))


def all_scan_start(decay: Optional[torch.Tensor], local: torch.Tensor, group: Any, *,
                   initial_state: Optional[torch.Tensor] = None, reverse: bool = False,
                   num_blocks: Optional[int] = None, output_final_state: bool = False,
                   background: bool = True, tag: str = "zeco.scan") -> AllScanHandle:
    """Start an All-Scan (see the module docstring); returns its :class:`AllScanHandle`.

    Args:
        decay: this rank's map. ``[..., R]`` (a decay per row), ``[...]`` (per matrix) or ``None``
            (identity): ``out = diag(d) in + L``, blocks along rows. ``[..., R, R]`` (a dense
            transition ``A``, e.g. the delta rule's): ``out = A · in + L``, blocks along columns.
        local: ``[..., R, C]`` floating tensor, this rank's ``L_i``; the scan runs in its dtype.
            On the last rank of the chain only its shape and dtype matter unless
            ``output_final_state`` (it sends nothing).
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
    if initial_state is not None and tuple(initial_state.shape) != tuple(local.shape):
        raise ValueError(f"all_scan: initial_state must have the state's shape {tuple(local.shape)}, "
                         f"got {tuple(initial_state.shape)}")
    if local.dtype in (torch.float16, torch.bfloat16):
        # States are scanned in float32: under autocast one rank's summary may come out in half
        # precision while its neighbour's (or a last rank's placeholder) is float32, and a sender and
        # receiver of different dtypes corrupt silently on gloo and may hang on NCCL.
        local = local.float()
    P, me = comm.group_size(group), comm.group_rank(group)
    dense = _is_dense(decay, local)
    if dense:
        N = max(1, min(num_blocks_for(local.shape, local.dtype, num_blocks, world_size=P), local.shape[-1]))
    else:
        N = num_blocks_for(local.shape, local.dtype, num_blocks, world_size=P)
    h = AllScanHandle()
    h.num_blocks = N
    dt, dev = local.dtype, local.device
    prev, nxt = (me + 1, me - 1) if reverse else (me - 1, me + 1)
    has_prev, has_next = 0 <= prev < P, 0 <= nxt < P
    need_local = has_next or output_final_state
    lay = (_ColBlocks if dense else _RowBlocks)(decay, local, N, need_local)
    inp0 = None
    if not has_prev and initial_state is not None:
        inp0 = lay.flat(initial_state)
    side = _side_stream(dev)
    _fork(side, dev)   # everything above (the caller's summary, these views) is ready first
    update = lay.update

    if not has_prev:
        # first of the chain: its input is known now
        inp = inp0
        out = None
        works = []
        with _on(side):
            if need_local:
                if inp is None:
                    out = lay.loc  # out = local: nothing to compute
                else:
                    out = lay.empty()
                    for j in range(N):
                        update(inp, out, j)
                if has_next:
                    works = [comm.isend(lay.block(out, j), nxt, group, tag=tag) for j in range(N)]

        def finish_first():
            with _on(side):
                for w in works:
                    w.wait()
            _join(side, dev, *_tensors(None if out is lay.loc else out))
            i = lay.whole(inp) if inp is not None else None
            if not output_final_state:
                return i, None
            res = lay.whole(out)
            return i, (res.clone() if out is lay.loc and not dense else res)

        h._finish = finish_first
        return h

    # receive N blocks (contiguous pieces of one fresh buffer) from the previous rank
    with _on(side):
        buf = lay.empty()
        rworks = [comm.irecv(lay.block(buf, j), prev, group, tag=tag) for j in range(N)]

    if not has_next:
        # last of the chain: only receive
        def finish_last():
            with _on(side):
                for w in rworks:
                    w.wait()
            _join(side, dev, *_tensors(buf))
            out = None
            if output_final_state:
                out = lay.empty()
                for j in range(N):
                    update(buf, out, j)
                out = lay.whole(out)
            return lay.whole(buf), out

        h._finish = finish_last
        return h

    # a relay: receive block j, update it, forward it
    with _on(side):
        out = lay.empty()
    sworks: list = []

    @torch.no_grad()
    def relay():
        with _on(side):   # stream contexts are per thread: the helper thread enters it itself
            for j in range(N):
                rworks[j].wait()
                sworks.append(comm.isend(update(buf, out, j), nxt, group, tag=tag))
            for w in sworks:
                w.wait()

    def finish_relay():
        if not background:
            relay()
        _join(side, dev, *_tensors(buf), *_tensors(out))
        return lay.whole(buf), (lay.whole(out) if output_final_state else None)

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


def _tensors(buf) -> tuple:
    """A buffer's tensors (one flat tensor, a list of blocks, or None)."""
    if buf is None:
        return ()
    return tuple(buf) if isinstance(buf, list) else (buf,)


def all_scan(decay: Optional[torch.Tensor], local: torch.Tensor, group: Any, *,
             initial_state: Optional[torch.Tensor] = None, reverse: bool = False,
             num_blocks: Optional[int] = None, output_final_state: bool = False,
             tag: str = "zeco.scan") -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Blocking All-Scan: ``(in_i, out_i or None)``; see :func:`all_scan_start` and
    :meth:`AllScanHandle.wait` (``in_i`` is ``None`` for a zero input on the first rank)."""
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
        if _is_dense(decays[i], locals_[i]):
            out = locals_[i] + decays[i] @ S
        else:
            d, _ = _decay_view(decays[i], locals_[i], "scan_reference")
            out = locals_[i] + (S if d is None else d * S)
        res[i] = (S, out)
        S = out
    return res
