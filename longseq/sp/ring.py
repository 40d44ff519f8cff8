"""Ring attention: k and v travel around the ring of the SP group; partial results are merged with
a numerically stable online softmax (log-sum-exp); the backward passes dk and dv around the ring.

``ring_attention(q, k, v, group, ...)``: q ``[B, Lq_r, H, D]``, k and v ``[B, Lk_r, Hkv, D]`` (this
rank's piece of the sequence; flash-attn's layout, grouped-query attention allowed: k and v travel
with their ``Hkv`` heads) -> out ``[B, Lq_r, H, D]``, this rank's piece of the output.

Forward, on rank r of P: step i = 0 .. P-1 attends q to the k, v block of rank ``(r - i) mod P``;
before computing step i it posts the send of the block it holds to rank r+1 and the receive of the
next one from rank r-1 (``longseq.comm.batch_isend_irecv``), so the transfer overlaps the block's
compute. P-1 transfers of (k, v) per rank: ``2·m·(P-1)`` elements for k, v as large as q (m).
Each block's output and log-sum-exp are merged into float32 accumulators::

    lse' = logaddexp(lse, lse_b);   out' = out·exp(lse - lse') + out_b·exp(lse_b - lse')

Backward (a hand-written backward, a custom op as the forward is; no all-gather of the sequence): k, v travel
around the ring again (P-1 transfers); each block's gradient is computed with the *final* output
and log-sum-exp (``dS = P ⊙ (dP - rowsum(dO ⊙ O))``, as flash-attention's backward). dq accumulates
locally. The gradient of rank j's block is summed by an accumulator that starts at rank j+1 (step
1), travels with the block and reaches rank j after P-1 hops, where j adds its own contribution:
``2·m·(P-1)`` elements of (dk, dv) per rank, sent in float32 by default (``grad_comm_dtype``), as
ring-flash-attn does. Backward total: ``4·m·(P-1)``.

Masks and layouts (``layout=``):

* ``"contiguous"`` (default): rank r holds the r-th contiguous piece of the sequence, of any length
  (:mod:`longseq.sp.pieces`: ``seq_sizes``, ``seq_len``'s ``tensor_split`` pieces, or neither: one int
  all-gather learns them). Non-causal: every step is a full block. Causal: the own block is causal
  (q and k are the same tokens), blocks of earlier ranks full, later ranks skipped (rank P-1 does P
  times rank 0's work); uneven pieces need nothing else, each received block has its sender's length.
* ``"zigzag"`` (causal load balance): the sequence is cut into 2P equal chunks and rank r holds
  chunks r and 2P-1-r, concatenated (:func:`zigzag_shard` / :func:`zigzag_unshard`); every step
  costs every rank half a block: own block causal; a block from an earlier rank: all of q against
  the block's first chunk; from a later rank: the second half of q against the whole block.
  Needs the sequence length divisible by 2P.

Block kernels (``kernel=``): ``"math"`` (pure PyTorch, float32 accumulation, any device),
``"aten_cpu"`` (PyTorch's CPU flash kernel and its backward op, which accept the final output and
log-sum-exp), ``"auto"`` (aten_cpu for CPU tensors, else math). Half-precision inputs are merged and
accumulated in float32 (the kernels return each block in the input dtype, as flash-attention does).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch

from longseq import comm
from longseq.ops import group_name, resolve_group
from .pieces import given_sizes, piece_sizes
from .ulysses import agree

__all__ = [
    "ring_attention", "zigzag_shard", "zigzag_unshard", "zigzag_indices", "ring_schedule", "LAYOUTS", "KERNELS",
]

LAYOUTS = ("contiguous", "zigzag")
KERNELS = ("auto", "math", "aten_cpu")
_HALF = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# Zigzag layout helpers (pure: no communication)
# ----------------------------------------------------------------------------------------------
def _check_zigzag(n: int, P: int, what: str = "sequence") -> None:
    if n % (2 * P):
        raise ValueError(
            f"the zigzag layout cuts the {what} into 2·P = {2 * P} equal chunks, but its length {n} is not "
            f"divisible by {2 * P}: pad the {what} to a multiple of {2 * P}, or use layout='contiguous'")


def zigzag_indices(n: int, P: int, rank: int) -> torch.Tensor:
    """Positions (int64) of the ``n``-long sequence that rank ``rank`` of ``P`` holds in the zigzag
    layout: chunk ``rank`` then chunk ``2P-1-rank`` of ``2P`` equal chunks."""
    _check_zigzag(n, P)
    c = n // (2 * P)
    return torch.cat([torch.arange(rank * c, (rank + 1) * c), torch.arange((2 * P - 1 - rank) * c, (2 * P - rank) * c)])


def zigzag_shard(x: torch.Tensor, dim: int, P: int, rank: int) -> torch.Tensor:
    """This rank's zigzag piece of the whole ``x`` along ``dim`` (chunks ``rank`` and ``2P-1-rank`` of
    2P, concatenated). Differentiable; no communication."""
    dim = dim % x.dim()
    _check_zigzag(x.shape[dim], P)
    chunks = x.chunk(2 * P, dim)
    return torch.cat([chunks[rank], chunks[2 * P - 1 - rank]], dim)


def zigzag_unshard(pieces: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    """The whole sequence from every rank's zigzag piece (a list in rank order). Differentiable."""
    P = len(pieces)
    dim = dim % pieces[0].dim()
    halves = [p.chunk(2, dim) for p in pieces]
    return torch.cat([h[0] for h in halves] + [h[1] for h in reversed(halves)], dim)


# ----------------------------------------------------------------------------------------------
# Which sub-blocks a step computes
# ----------------------------------------------------------------------------------------------
_ALL = slice(None)


def ring_schedule(P: int, rank: int, src: int, causal: bool, layout: str, lq: int, lk: int):
    """The attention calls of the step where ``rank`` holds the k, v block of ``src``: a list of
    ``(q slice, k slice, causal)`` over the local sequence dim (empty: the block is fully masked)."""
    if not causal:
        return [(_ALL, _ALL, False)]
    if src == rank:
        return [(_ALL, _ALL, True)]
    if layout == "contiguous":
        return [(_ALL, _ALL, False)] if src < rank else []
    # zigzag: local = [chunk rank, chunk 2P-1-rank]; the block = [chunk src, chunk 2P-1-src]
    if src < rank:
        return [(_ALL, slice(0, lk // 2), False)]
    return [(slice(lq // 2, lq), _ALL, False)]


# ----------------------------------------------------------------------------------------------
# Block kernels: [B, L, H, D] in; out in the input dtype (math: the accumulation dtype), lse float32
# ----------------------------------------------------------------------------------------------
def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _repeat(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    rep = q.shape[2] // k.shape[2]
    if rep == 1:
        return k, v
    return k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)


def _fold(g: torch.Tensor, hkv: int) -> torch.Tensor:
    """Sum the gradient of repeated k/v heads back onto the ``hkv`` original heads."""
    b, l, h, d = g.shape
    return g if h == hkv else g.view(b, l, hkv, h // hkv, d).sum(3)


def _scores(q, k, causal, scale):
    acc = _acc(q.dtype)
    s = torch.einsum("bqhd,bkhd->bhqk", q.to(acc), k.to(acc)) * scale
    if causal:
        lq, lk = q.shape[1], k.shape[1]
        i = torch.arange(lq, device=q.device)[:, None]
        j = torch.arange(lk, device=q.device)[None, :]
        s = s.masked_fill(j > i + (lk - lq), float("-inf"))
    return s


def _math_fwd(q, k, v, causal, scale):
    k, v = _repeat(q, k, v)
    s = _scores(q, k, causal, scale)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    return torch.einsum("bhqk,bkhd->bqhd", p, v.to(p.dtype)), lse


def _math_bwd(dout, q, k, v, out, lse, causal, scale):
    hkv = k.shape[2]
    kr, vr = _repeat(q, k, v)
    s = _scores(q, kr, causal, scale)
    acc = s.dtype
    p = torch.exp(s - lse.to(acc)[..., None])
    do = dout.to(acc)
    dv = torch.einsum("bhqk,bqhd->bkhd", p, do)
    dp = torch.einsum("bqhd,bkhd->bhqk", do, vr.to(acc))
    delta = (do * out.to(acc)).sum(-1).transpose(1, 2)          # [B, H, Lq]
    ds = p * (dp - delta[..., None])
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, kr.to(acc)) * scale
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, q.to(acc)) * scale
    return dq, _fold(dk, hkv), _fold(dv, hkv)


def _aten_fwd(q, k, v, causal, scale):
    k, v = _repeat(q, k, v)
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    out, lse = op(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, causal, scale=scale)
    return out.transpose(1, 2), lse.float() if lse.dtype != torch.float64 else lse


def _aten_bwd(dout, q, k, v, out, lse, causal, scale):
    hkv = k.shape[2]
    kr, vr = _repeat(q, k, v)
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    dt = q.dtype
    dq, dk, dv = op(dout.to(dt).transpose(1, 2), q.transpose(1, 2), kr.transpose(1, 2), vr.transpose(1, 2),
                    out.to(dt).transpose(1, 2), lse, 0.0, causal, scale=scale)
    return dq.transpose(1, 2), _fold(dk.transpose(1, 2), hkv), _fold(dv.transpose(1, 2), hkv)


def _kernel(name: str, q: torch.Tensor, causal_lq_ne_lk: bool = False):
    if name not in KERNELS:
        raise ValueError(f"unknown ring attention kernel {name!r}; valid: {', '.join(KERNELS)}")
    has_aten = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None) is not None
    if name == "aten_cpu" and not (has_aten and q.device.type == "cpu"):
        raise RuntimeError("kernel='aten_cpu' needs PyTorch's CPU flash kernel and CPU tensors; use kernel='math'")
    if name == "auto":
        name = "aten_cpu" if (has_aten and q.device.type == "cpu") else "math"
    return (_aten_fwd, _aten_bwd) if name == "aten_cpu" else (_math_fwd, _math_bwd)


# ----------------------------------------------------------------------------------------------
# The autograd function
# ----------------------------------------------------------------------------------------------
def _merge(out: torch.Tensor, lse: torch.Tensor, qs: slice, o_b: torch.Tensor, l_b: torch.Tensor) -> None:
    """Fold a block's (out ``[B, l, H, D]``, lse ``[B, H, l]``) into the accumulators' rows ``qs``."""
    l_old = lse[:, :, qs]
    l_b = l_b.to(lse.dtype)
    l_new = torch.logaddexp(l_old, l_b)
    finite = torch.isfinite(l_new)
    w_old = torch.where(finite, torch.exp(l_old - l_new), torch.zeros_like(l_new))
    w_b = torch.where(finite, torch.exp(l_b - l_new), torch.zeros_like(l_new))
    out[:, qs] = out[:, qs] * w_old.transpose(1, 2)[..., None] + o_b.to(out.dtype) * w_b.transpose(1, 2)[..., None]
    lse[:, :, qs] = l_new


def _post(ops: list, group: Any, tag: str) -> list:
    return comm.batch_isend_irecv(ops, group, tag=tag) if ops else []


def _wait(works: list) -> None:
    for w in works:
        w.wait()


def _ring_fwd(q, k, v, group, causal, scale, layout, sizes, kernel, tag):
    """This rank's ``(out, lse)``: the ring's forward (module docstring)."""
    P, r = comm.group_size(group), comm.group_rank(group)
    fwd, _ = _kernel(kernel, q)
    nxt, prv = (r + 1) % P, (r - 1) % P
    acc = _acc(q.dtype)
    B, lq, H, D = q.shape
    out = torch.zeros((B, lq, H, D), dtype=acc, device=q.device)
    lse = torch.full((B, H, lq), float("-inf"), dtype=acc, device=q.device)
    cur_k, cur_v = k.contiguous(), v.contiguous()
    for i in range(P):
        src = (r - i) % P
        works = []
        if i < P - 1:   # post the next block's transfer first: it overlaps this block's compute
            n_in = sizes[(r - i - 1) % P]
            buf_k = torch.empty((B, n_in, *k.shape[2:]), dtype=k.dtype, device=k.device)
            buf_v = torch.empty((B, n_in, *v.shape[2:]), dtype=v.dtype, device=v.device)
            works = _post([comm.P2POp("send", cur_k, nxt), comm.P2POp("send", cur_v, nxt),
                           comm.P2POp("recv", buf_k, prv), comm.P2POp("recv", buf_v, prv)], group, f"{tag}.kv")
        for qs, ks, c in ring_schedule(P, r, src, causal, layout, lq, cur_k.shape[1]):
            o_b, l_b = fwd(q[:, qs], cur_k[:, ks], cur_v[:, ks], c, scale)
            _merge(out, lse, qs, o_b, l_b)
        if works:
            _wait(works)
            cur_k, cur_v = buf_k, buf_v
    return out.to(q.dtype), lse


def _ring_bwd(dout, q, k, v, out, lse, group, causal, scale, layout, sizes, kernel, gdt, tag):
    """``(dq, dk, dv)`` of this rank's pieces: the ring's backward (module docstring)."""
    P, r = comm.group_size(group), comm.group_rank(group)
    _, bwd = _kernel(kernel, q)
    nxt, prv = (r + 1) % P, (r - 1) % P
    acc = _acc(q.dtype)
    dout = dout.contiguous()
    lq = q.shape[1]
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk_own = dv_own = None
    cur_k, cur_v = k.contiguous(), v.contiguous()
    pending: list = []        # sends in flight and the tensors they read
    B = q.shape[0]

    def kv_shape(t, n):
        return (B, n, *t.shape[2:])

    for i in range(P):
        src = (r - i) % P
        n_src = cur_k.shape[1]
        # Posting order on the channel r-1 -> r must match rank r-1's sending order:
        # (k, v) of step i-1, then the (dk, dv) accumulator of step i-1, then (k, v) of step i.
        acc_works, acc_k, acc_v = [], None, None
        if i >= 2:     # the accumulator of block src, sent by rank r-1 after its step i-1
            acc_k = torch.empty(kv_shape(k, n_src), dtype=gdt, device=k.device)
            acc_v = torch.empty(kv_shape(v, n_src), dtype=gdt, device=v.device)
            acc_works = _post([comm.P2POp("recv", acc_k, prv), comm.P2POp("recv", acc_v, prv)], group,
                              f"{tag}.bwd.dkv")
        kv_works = []
        if i < P - 1:
            n_in = sizes[(r - i - 1) % P]
            buf_k = torch.empty(kv_shape(k, n_in), dtype=k.dtype, device=k.device)
            buf_v = torch.empty(kv_shape(v, n_in), dtype=v.dtype, device=v.device)
            kv_works = _post([comm.P2POp("send", cur_k, nxt), comm.P2POp("send", cur_v, nxt),
                              comm.P2POp("recv", buf_k, prv), comm.P2POp("recv", buf_v, prv)], group,
                             f"{tag}.bwd.kv")
        dk_b = torch.zeros(cur_k.shape, dtype=acc, device=k.device)
        dv_b = torch.zeros(cur_v.shape, dtype=acc, device=v.device)
        for qs, ks, c in ring_schedule(P, r, src, causal, layout, lq, n_src):
            dq_s, dk_s, dv_s = bwd(dout[:, qs], q[:, qs], cur_k[:, ks], cur_v[:, ks], out[:, qs],
                                   lse[:, :, qs].contiguous(), c, scale)
            dq[:, qs] += dq_s.to(acc)
            dk_b[:, ks] += dk_s.to(acc)
            dv_b[:, ks] += dv_s.to(acc)
        if i == 0:
            dk_own, dv_own = dk_b, dv_b
        else:
            if acc_works:
                _wait(acc_works)
                dk_b += acc_k.to(acc)
                dv_b += acc_v.to(acc)
            send_k, send_v = dk_b.to(gdt).contiguous(), dv_b.to(gdt).contiguous()
            pending.append((_post([comm.P2POp("send", send_k, nxt), comm.P2POp("send", send_v, nxt)], group,
                                  f"{tag}.bwd.dkv"), send_k, send_v))
        if kv_works:
            _wait(kv_works)
            cur_k, cur_v = buf_k, buf_v
    if P > 1:   # this rank's block, summed over the other P-1 ranks, arrives from rank r-1
        fin_k = torch.empty(k.shape, dtype=gdt, device=k.device)
        fin_v = torch.empty(v.shape, dtype=gdt, device=v.device)
        _wait(_post([comm.P2POp("recv", fin_k, prv), comm.P2POp("recv", fin_v, prv)], group, f"{tag}.bwd.dkv"))
        dk_own = dk_own + fin_k.to(acc)
        dv_own = dv_own + fin_v.to(acc)
    for works, _, _ in pending:
        _wait(works)
    return dq.to(q.dtype), dk_own.to(k.dtype), dv_own.to(v.dtype)


# The ring as two custom ops (forward, backward), so torch.compile(fullgraph=True) traces it as one
# opaque node each way; the overlapped p2p steps and their ledger rows run in the real implementation.
@torch.library.custom_op("longseq::ring_attention_fwd", mutates_args=())
def _ring_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: str, causal: bool, scale: float,
                 layout: str, sizes: Sequence[int], kernel: str, grad_dtype: torch.dtype,
                 tag: str) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _ring_fwd(q, k, v, resolve_group(group), causal, scale, layout, list(sizes), kernel, tag)
    return out.contiguous(), lse.contiguous()


@_ring_fwd_op.register_fake
def _(q, k, v, group, causal, scale, layout, sizes, kernel, grad_dtype, tag):
    B, lq, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, lq), dtype=_acc(q.dtype))


def _ring_setup(ctx, inputs, output):
    q, k, v, *static = inputs
    ctx.static = static
    ctx.save_for_backward(q, k, v, *output)
    ctx.mark_non_differentiable(output[1])


def _ring_backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.longseq.ring_attention_bwd(dout, q, k, v, out, lse, *ctx.static)
    return (dq, dk, dv) + (None,) * len(ctx.static)


_ring_fwd_op.register_autograd(_ring_backward, setup_context=_ring_setup)


@torch.library.custom_op("longseq::ring_attention_bwd", mutates_args=())
def _ring_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, group: str, causal: bool, scale: float, layout: str, sizes: Sequence[int],
                 kernel: str, grad_dtype: torch.dtype, tag: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = _ring_bwd(dout, q, k, v, out, lse, resolve_group(group), causal, scale, layout, list(sizes), kernel,
                      grad_dtype, tag)
    return tuple(t.contiguous() for t in grads)


@_ring_bwd_op.register_fake
def _(dout, q, k, v, out, lse, group, causal, scale, layout, sizes, kernel, grad_dtype, tag):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: Any, *, causal: bool = False,
                   softmax_scale: Optional[float] = None, layout: str = "contiguous", seq_len: Optional[int] = None,
                   seq_sizes: Optional[Sequence[int]] = None, kernel: str = "auto",
                   grad_comm_dtype: Optional[torch.dtype] = None,
                   dropout_p: float = 0.0, backend: Optional[str] = None, check: Optional[bool] = None,
                   tag: str = "ring") -> torch.Tensor:
    """Ring attention over ``group`` (module docstring). q ``[B, Lq_r, H, D]``, k, v ``[B, Lk_r, Hkv, D]``:
    this rank's piece of a sequence laid out by ``layout``; returns this rank's piece of the output.

    The contiguous pieces' lengths (:mod:`longseq.sp.pieces`): ``seq_sizes`` (every rank's k length,
    e.g. USP's ring of Ulysses groups), ``seq_len`` (the whole length, ``tensor_split`` pieces), or
    neither (learned with one int all-gather, tag ``<tag>.sizes``; equal pieces under torch.compile).
    Causal contiguous pieces may be uneven (q and k pieces alike). ``grad_comm_dtype``: the
    dtype of the dk/dv accumulators sent in backward (default float32 for half inputs, else the input
    dtype). ``backend`` is accepted (and ignored) so the function fits ``SelfAttention.attn_fn``.
    Raises ``ValueError`` before any communication for bad shapes, layouts or lengths; with ``check``
    (as :func:`longseq.sp.ulysses.ulysses_attention`'s: one 8-byte all-gather, tag ``<tag>.check``)
    the same one on every rank, also when the ranks disagree on dtype, B, heads, head dim or lengths.
    """
    del backend
    if dropout_p:
        raise NotImplementedError("ring_attention does not implement dropout")
    P, r = comm.group_size(group), comm.group_rank(group)

    def validate():
        nonlocal layout
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape != v.shape[:3] + k.shape[3:]:
            raise ValueError(f"q, k, v must be [B, L, H, D] with k, v alike; got {list(q.shape)}, {list(k.shape)}, "
                             f"{list(v.shape)}")
        lq, lk = q.shape[1], k.shape[1]
        if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[2] % k.shape[2]:
            raise ValueError(f"incompatible q {list(q.shape)} and k {list(k.shape)} (heads of q must be a multiple "
                             f"of k's)")
        if layout not in LAYOUTS:
            raise ValueError(f"unknown ring layout {layout!r}; valid: {', '.join(LAYOUTS)}")
        if layout == "zigzag":
            if not causal:
                layout = "contiguous"   # without a mask, the zigzag order changes nothing
            if lq != lk or lq % 2:
                raise ValueError(f"the zigzag layout holds two equal chunks per rank: q and k need the same even "
                                 f"local length, got {lq} and {lk}")
            if (seq_len is not None and seq_len != P * lk) or (seq_sizes is not None and set(seq_sizes) != {lk}):
                raise ValueError(f"the zigzag layout has {P} equal pieces of {lk}; got seq_len={seq_len}, "
                                 f"seq_sizes={seq_sizes}")
        if causal and lq != lk:
            raise ValueError(f"causal ring attention needs q and k pieces of the same length, got {lq} and {lk}")
        sizes = given_sizes(lk, P, r, seq_len=seq_len, seq_sizes=seq_sizes, what="ring_attention")
        if sizes is not None and min(sizes) == 0:
            raise ValueError(f"ring_attention: every rank needs at least one token, got pieces {sizes}: use a "
                             f"sequence of at least {P} tokens or a smaller group")
        _kernel(kernel, q)   # validate early
    agree(group, "ring_attention", (q, k, v), validate, check, tag=f"{tag}.check", causal=bool(causal),
          layout=layout, seq_len=seq_len, seq_sizes=None if seq_sizes is None else tuple(int(n) for n in seq_sizes))
    if layout == "zigzag" and not causal:
        layout = "contiguous"
    if layout == "zigzag":
        sizes = [k.shape[1]] * P
    else:
        sizes = piece_sizes(k.shape[1], group, seq_len=seq_len, seq_sizes=seq_sizes, tag=tag, what="ring_attention")
        if min(sizes) == 0:   # learned: the same list, so the same error, on every rank
            raise ValueError(f"ring_attention: every rank needs at least one token, got pieces {sizes}: use a "
                             f"sequence of at least {P} tokens or a smaller group")
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    if grad_comm_dtype is None:
        grad_comm_dtype = torch.float32 if q.dtype in _HALF else q.dtype
    out, _ = torch.ops.longseq.ring_attention_fwd(q, k, v, group_name(group), bool(causal), scale, layout, sizes,
                                                  kernel, grad_comm_dtype, tag)
    return out
