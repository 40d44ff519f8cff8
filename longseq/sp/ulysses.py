"""DeepSpeed-Ulysses: all-to-all q, k, v from sequence-sharded to head-sharded, attend over the
whole sequence with a slice of the heads, all-to-all the output back.

``ulysses_attention(q, k, v, group, ...)``: q ``[B, L_r, H, D]``, k and v ``[B, L_r, Hkv, D]`` (this
rank's ``tensor_split`` piece of the sequence; uneven pieces allowed with ``seq_len``) ->
``[B, L_r, H, D]``. Two all-to-alls (``longseq.functional``; each one's backward is the all-to-all
the other way): q, k and v packed into ONE (:func:`longseq.functional.all_to_all_packed`: rank j's
message holds head block j of all three), then the output back. Each sends ``(P-1)/P`` of what it
carries: ``(m_q + m_k + m_v + m_o)·(P-1)/P`` elements per rank forward (``4·m·(P-1)/P`` when k, v
are as large as q), the same backward.

The heads (and the k/v heads) must be divisible by P, as in DeepSpeed: a ``ValueError`` says so
before any communication. Cross-rank check (``check``, as ``dsp.switch``'s: None follows
``dsp.unchecked()``, default on): one 24-byte header all-gather (:func:`longseq.agree.exchange`, tag
``<tag>.check``, control bytes) before the all-to-alls, on every call,
so ranks that disagree on the dtype, B, heads, head dim, ``seq_len`` or ``causal``, or that got a bad
argument, all raise the same ``ValueError`` instead of hanging. Causal attention needs nothing
special: after the all-to-all each rank sees the whole sequence in order (contiguous layout).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from longseq import comm
from longseq import functional as LF
from longseq.attention import attention
from longseq.agree import exchange, local_error
from longseq.dsp.primitives import checks_enabled
from longseq.sharding import split_sizes

__all__ = ["ulysses_attention", "check_heads", "agree", "parallelize"]


def agree(group: Any, what: str, tensors, validate: Callable[[], Any], check: Optional[bool], *, tag: str,
          **asked) -> Any:
    """Run ``validate()`` (which raises ``ValueError`` / ``TypeError`` for bad arguments) and, when the
    cross-rank check is on (:func:`longseq.dsp.primitives.checks_enabled`), make every rank of
    ``group`` raise the same exception unless all agree on the tensors' dtypes, device types and
    shapes but dim 1 (the sharded sequence), on ``asked`` and on having no error: one
    :func:`longseq.agree.exchange` (skipped under torch.compile). Returns ``validate()``'s result."""
    result, error = local_error(validate)
    if checks_enabled(check) and not torch.compiler.is_compiling():   # eager only: compiled graphs carry no check
        sig = tuple((str(t.dtype).replace("torch.", ""), t.device.type,
                     tuple(-1 if i == 1 else int(n) for i, n in enumerate(t.shape))) for t in tensors)
        exchange(group, what, sig + tuple(sorted(asked.items())), error, tag=tag)
    elif error is not None:
        raise error
    return result


def check_heads(num_heads: int, P: int, what: str = "Ulysses", kv_heads: Optional[int] = None) -> None:
    """Raise a ``ValueError`` when ``P`` does not divide the (key/value) heads."""
    for name, h in (("attention heads", num_heads), ("key/value heads", kv_heads)):
        if h is not None and h % P:
            ok = [d for d in range(1, h + 1) if h % d == 0]
            raise ValueError(
                f"{what} splits the {name} over the group, so its size {P} must divide the number of {name} "
                f"({h}): use a group size in {ok}, a model with more heads, or DSP / ring attention, which have "
                f"no such limit")


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: Any, *, causal: bool = False,
                      dropout_p: float = 0.0, softmax_scale: Optional[float] = None, backend: Optional[str] = None,
                      seq_len: Optional[int] = None, attn_fn: Optional[Callable] = None,
                      check: Optional[bool] = None, tag: str = "ulysses") -> torch.Tensor:
    """Ulysses attention over ``group`` (module docstring). ``seq_len``: the whole sequence length
    (default ``P ·`` local); the pieces must be its ``tensor_split`` pieces. ``attn_fn``: the local
    attention (default ``longseq.attention.attention``; called with ``causal``, ``dropout_p``,
    ``softmax_scale``, ``backend``). ``check``: the cross-rank check (module docstring).
    Tags: ``<tag>.qkv`` and ``<tag>.out`` (backward: ``+ .bwd``)."""
    P, r = comm.group_size(group), comm.group_rank(group)
    L = int(seq_len) if seq_len is not None else q.shape[1] * P

    def validate():
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            raise ValueError(f"q, k, v must be [B, L, H, D]; got {list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
        check_heads(q.shape[2], P, kv_heads=k.shape[2])
        sizes = split_sizes(L, P)
        if q.shape[1] != sizes[r] or k.shape[1] != sizes[r] or v.shape[1] != sizes[r]:
            raise ValueError(f"ulysses_attention: this rank ({r} of {P}) holds q/k/v pieces of {q.shape[1]}/"
                             f"{k.shape[1]}/{v.shape[1]} tokens, but seq_len={L} gives it {sizes[r]} (tensor_split "
                             f"sizes {sizes})")
    agree(group, "ulysses_attention", (q, k, v), validate, check, tag=f"{tag}.check", seq_len=L, causal=bool(causal))
    fn = attention if attn_fn is None else attn_fn
    if P == 1:
        return fn(q, k, v, causal=causal, dropout_p=dropout_p, softmax_scale=softmax_scale, backend=backend)
    qh, kh, vh = LF.all_to_all_packed((q, k, v), group, gather_size=L, tag=f"{tag}.qkv")
    out = fn(qh, kh, vh, causal=causal, dropout_p=dropout_p, softmax_scale=softmax_scale, backend=backend)
    return LF.all_to_all(out, group, scatter_dim=1, gather_dim=2, gather_size=q.shape[2], tag=f"{tag}.out")


def parallelize(model: torch.nn.Module, group: Any, **options):
    """``longseq.sp.parallelize(model, group, method="ulysses", **options)``."""
    from .plans import parallelize as _parallelize
    return _parallelize(model, group, method="ulysses", **options)
