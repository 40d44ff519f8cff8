"""DeepSpeed-Ulysses: all-to-all q, k, v from sequence-sharded to head-sharded, attend over the
whole sequence with a slice of the heads, all-to-all the output back.

``ulysses_attention(q, k, v, group, ...)``: q ``[B, L_r, H, D]``, k and v ``[B, L_r, Hkv, D]`` (this
rank's contiguous piece of the sequence, dim 1 sharded; the pieces may have any lengths, see
:mod:`longseq.sp.pieces`: ``seq_sizes``, ``seq_len`` or neither, when one int all-gather learns
them) -> ``[B, L_r, H, D]``. Two all-to-alls (``longseq.functional``; each one's backward is the
all-to-all the other way): q, k and v packed into ONE (:func:`longseq.functional.all_to_all_packed`:
rank j's message holds head block j of all three), then the output back. Each sends ``(P-1)/P`` of
what it carries: ``(m_q + m_k + m_v + m_o)·(P-1)/P`` elements per rank forward (``4·m·(P-1)/P`` when
k, v are as large as q), the same backward.

The heads must be divisible by P, as in DeepSpeed (``ValueError`` before any communication). The
key/value heads need not be: grouped-query / multi-query k, v are repeated to the fewest heads
``Hkv·rep`` that P divides (``rep`` the smallest divisor of ``H/Hkv`` that makes it,
:func:`kv_head_repeat`), so every rank gets whole groups; k and v then move ``rep`` times their size.
Cross-rank check (``check``, as ``dsp.switch``'s: None follows ``dsp.unchecked()``, default on): one
24-byte header all-gather (:func:`longseq.agree.exchange`, tag ``<tag>.check``, control bytes)
before the all-to-alls, on every call, so ranks that disagree on the dtype, B, heads, head dim,
``seq_len`` / ``seq_sizes`` or ``causal``, or that got a bad argument, all raise the same
``ValueError`` instead of hanging. Causal attention needs nothing special: after the all-to-all
each rank sees the whole sequence in order (contiguous layout).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import torch

from longseq import comm
from longseq import functional as LF
from longseq.attention import attention
from longseq.agree import exchange, local_error
from longseq.documents import Documents, check_cu_seqlens
from longseq.dsp.primitives import checks_enabled

from .pieces import given_sizes, piece_sizes

__all__ = ["ulysses_attention", "check_heads", "kv_head_repeat", "agree", "parallelize"]


def agree(group: Any, what: str, tensors, validate: Callable[[], Any], check: Optional[bool], *, tag: str,
          local: Optional[int] = None, **asked) -> tuple[Any, Optional[list]]:
    """Run ``validate()`` (which raises ``ValueError`` / ``TypeError`` for bad arguments) and, when the
    cross-rank check is on (:func:`longseq.dsp.primitives.checks_enabled`), make every rank of
    ``group`` raise the same exception unless all agree on the tensors' dtypes, device types and
    shapes but dim 1 (the sharded sequence), on ``asked`` and on having no error: one
    :func:`longseq.agree.exchange` (skipped under torch.compile). Returns ``(validate()'s result,
    every rank's local piece length)``: the lengths ride in the check's header when ``local`` (this
    rank's length) is given and the check runs, else None."""
    result, error = local_error(validate)
    sizes = None
    if checks_enabled(check) and not torch.compiler.is_compiling():   # eager only: compiled graphs carry no check
        sig = tuple((str(t.dtype).replace("torch.", ""), t.device.type,
                     tuple(-1 if i == 1 else int(n) for i, n in enumerate(t.shape))) for t in tensors)
        got = exchange(group, what, sig + tuple(sorted(asked.items())), error, tag=tag,
                       value=0 if local is None or error is not None else int(local))
        sizes = None if local is None else got
    elif error is not None:
        raise error
    return result, sizes


def check_heads(num_heads: int, P: int, what: str = "Ulysses", kv_heads: Optional[int] = None) -> None:
    """Raise a ``ValueError`` when ``P`` does not divide the (key/value) heads."""
    for name, h in (("attention heads", num_heads), ("key/value heads", kv_heads)):
        if h is not None and h % P:
            ok = [d for d in range(1, h + 1) if h % d == 0]
            raise ValueError(
                f"{what} splits the {name} over the group, so its size {P} must divide the number of {name} "
                f"({h}): use a group size in {ok}, a model with more heads, or DSP / ring attention, which have "
                f"no such limit")


def kv_head_repeat(num_heads: int, kv_heads: int, P: int, what: str = "Ulysses") -> int:
    """How many times to repeat each of the ``kv_heads`` key/value heads so that ``P`` divides them
    and every rank's slice of the query heads finds its own groups: the smallest divisor ``rep`` of
    ``num_heads / kv_heads`` with ``(kv_heads · rep) % P == 0`` (1 when P divides ``kv_heads``).
    ``ValueError`` when ``P`` does not divide ``num_heads`` or ``kv_heads`` does not divide it."""
    check_heads(num_heads, P, what)
    if kv_heads < 1 or num_heads % kv_heads:
        raise ValueError(f"{what}: the {num_heads} query heads must be a multiple of the {kv_heads} key/value heads")
    group = num_heads // kv_heads
    return next(rep for rep in range(1, group + 1) if group % rep == 0 and (kv_heads * rep) % P == 0)


def _whole_window(cu_seqlens, sizes, batch: int) -> Documents:
    """The whole window's :class:`Documents` after the all-to-all (checked against the pieces)."""
    if isinstance(cu_seqlens, Documents):
        cu_seqlens = cu_seqlens.cu_seqlens
    return Documents.whole(check_cu_seqlens(cu_seqlens, sum(sizes), batch=batch, what="ulysses_attention: cu_seqlens"))


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: Any, *, causal: bool = False,
                      dropout_p: float = 0.0, softmax_scale: Optional[float] = None, backend: Optional[str] = None,
                      seq_len: Optional[int] = None, attn_fn: Optional[Callable] = None,
                      check: Optional[bool] = None, tag: str = "ulysses",
                      seq_sizes: Optional[Sequence[int]] = None, cu_seqlens=None) -> torch.Tensor:
    """Ulysses attention over ``group`` (module docstring). The pieces' lengths: ``seq_sizes`` (every
    rank's, in rank order), ``seq_len`` (the whole length, ``tensor_split`` pieces) or neither (learned:
    one int all-gather, tag ``<tag>.sizes``; :mod:`longseq.sp.pieces`). ``attn_fn``: the local
    attention (default ``longseq.attention.attention``; called with ``causal``, ``dropout_p``,
    ``softmax_scale``, ``backend``, and k, v with ``Hkv·rep / P`` heads). ``check``: the cross-rank
    check (module docstring). Tags: ``<tag>.qkv`` and ``<tag>.out`` (backward: ``+ .bwd``).
    ``cu_seqlens`` (packed documents: the whole window's boundaries, or this rank's
    :class:`longseq.documents.Documents`): after the all-to-all every rank holds the whole window, so
    the local attention runs with the window's block-diagonal (causal) mask (``attn_fn`` is then
    called with ``cu_seqlens=`` the whole window's :class:`~longseq.documents.Documents`)."""
    P, r = comm.group_size(group), comm.group_rank(group)

    def validate():
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            raise ValueError(f"q, k, v must be [B, L, H, D]; got {list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
        if k.shape[:3] != v.shape[:3] or q.shape[:2] != k.shape[:2]:
            raise ValueError(f"ulysses_attention: q {list(q.shape)}, k {list(k.shape)} and v {list(v.shape)} must "
                             f"share B and the local length, k and v their heads")
        rep = kv_head_repeat(q.shape[2], k.shape[2], P)
        given_sizes(q.shape[1], P, r, seq_len=seq_len, seq_sizes=seq_sizes, what="ulysses_attention")
        return rep
    rep, learned = agree(group, "ulysses_attention", (q, k, v), validate, check, tag=f"{tag}.check",
                         local=q.shape[1], seq_len=seq_len, causal=bool(causal),
                         seq_sizes=None if seq_sizes is None else tuple(int(n) for n in seq_sizes))
    fn = attention if attn_fn is None else attn_fn
    if P == 1:
        if cu_seqlens is not None:
            fn = functools.partial(fn, cu_seqlens=_whole_window(cu_seqlens, [q.shape[1]], q.shape[0]))
        return fn(q, k, v, causal=causal, dropout_p=dropout_p, softmax_scale=softmax_scale, backend=backend)
    if seq_sizes is None and seq_len is None and learned is not None:
        seq_sizes = learned                 # the check's header carried every rank's length
    sizes = piece_sizes(q.shape[1], group, seq_len=seq_len, seq_sizes=seq_sizes, tag=tag, what="ulysses_attention")
    if cu_seqlens is not None:
        fn = functools.partial(fn, cu_seqlens=_whole_window(cu_seqlens, sizes, q.shape[0]))
    if rep > 1:      # grouped k, v: whole groups per rank (module docstring)
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    qh, kh, vh = LF.all_to_all_packed((q, k, v), group, gather_sizes=sizes, tag=f"{tag}.qkv")
    out = fn(qh, kh, vh, causal=causal, dropout_p=dropout_p, softmax_scale=softmax_scale, backend=backend)
    return LF.all_to_all(out, group, scatter_dim=1, gather_dim=2, gather_size=q.shape[2], scatter_sizes=sizes,
                         tag=f"{tag}.out")


def parallelize(model: torch.nn.Module, group: Any, **options):
    """``longseq.sp.parallelize(model, group, method="ulysses", **options)``."""
    from .plans import parallelize as _parallelize
    return _parallelize(model, group, method="ulysses", **options)
