"""Public local (single-device) gated delta rule: one differentiable op, two backends.

``delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
use_qk_l2norm=False, backend="auto", chunk_size=64) -> (o, final_state | None)``

Shapes (fla layout): q, k ``[B, T, H, K]``; v ``[B, T, H, V]``; beta ``[B, T, H]``; g ``[B, T, H]``
(Gated DeltaNet: a log-decay per head) or ``[B, T, H, K]`` (KDA: per key channel), log space, ``<= 0``
(not checked); states ``[B, H, K, V]`` float32 (float64 for float64 inputs on the torch backend).
``o`` comes back in v's dtype.

Backends: ``"torch"``: :func:`zeco.delta.chunk.chunk_delta_rule` (any device; backward by autograd
through the chunked WY form, with a hand-written backward for its sequential state pass,
``zeco.delta.chunk.StatePass``, so the cost is linear in T); ``"fla"``: fla's Triton kernels
``fla.ops.gated_delta_rule.chunk_gated_delta_rule`` / ``fla.ops.kda.chunk_kda`` (CUDA, not float64;
their own backward, including the initial state's gradient); ``"auto"``: fla on CUDA when importable
and not float64, else torch.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from .chunk import chunk_delta_rule
from .naive import l2norm

__all__ = ["delta_rule", "BACKENDS", "resolve_backend", "validate", "fla_available"]

BACKENDS = ("auto", "torch", "fla")
FLA_INSTALL_HINT = "pip install flash-linear-attention"


@functools.lru_cache(maxsize=1)
def _fla_ops():
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        from fla.ops.kda import chunk_kda
    except ImportError as e:
        raise ImportError(f"backend='fla' needs flash-linear-attention (>= 0.6): {FLA_INSTALL_HINT} ({e})") from e
    return chunk_gated_delta_rule, chunk_kda


def fla_available() -> bool:
    try:
        _fla_ops()
        return True
    except ImportError:
        return False


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """``"torch"`` or ``"fla"`` for this call (see the module docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "fla" if (x.is_cuda and x.dtype != torch.float64 and fla_available()) else "torch"
    if backend == "fla":
        _fla_ops()
        if not x.is_cuda:
            return "torch"   # fla's kernels are Triton/CUDA only: the PyTorch path on CPU
    return backend


def validate(q, k, v, g, beta, initial_state=None, what: str = "delta_rule") -> None:
    """Shapes and dtypes of the operator's inputs (clear errors naming the expected shape)."""
    for name, t in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{what}: {name} must be a floating-point tensor")
    if q.dim() != 4:
        raise ValueError(f"{what}: q must be [B, T, H, K], got shape {tuple(q.shape)}")
    if k.shape != q.shape:
        raise ValueError(f"{what}: k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{what}: v must be [B, T, H, V] with B, T, H = {tuple(q.shape[:3])}, got {tuple(v.shape)}")
    if g.shape != q.shape[:3] and g.shape != q.shape:
        raise ValueError(f"{what}: g must be [B, T, H] = {tuple(q.shape[:3])} (Gated DeltaNet) or "
                         f"[B, T, H, K] = {tuple(q.shape)} (KDA), got {tuple(g.shape)}")
    if beta.shape != q.shape[:3]:
        raise ValueError(f"{what}: beta must be [B, T, H] = {tuple(q.shape[:3])}, got {tuple(beta.shape)}")
    B, _, H, K = q.shape
    if initial_state is not None and tuple(initial_state.shape) != (B, H, K, v.shape[-1]):
        raise ValueError(f"{what}: initial_state must be [B, H, K, V] = {(B, H, K, v.shape[-1])}, "
                         f"got {tuple(initial_state.shape)}")


def delta_rule(q, k, v, g, beta, *, scale: Optional[float] = None, initial_state: Optional[torch.Tensor] = None,
               output_final_state: bool = False, use_qk_l2norm: bool = False, backend: str = "auto",
               chunk_size: int = 64, cu_seqlens=None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The gated delta rule over one whole sequence (module docstring); differentiable in every input.
    ``cu_seqlens`` (``[D+1]`` or ``[B, D+1]``, or a :class:`longseq.documents.Documents`): packed
    documents; the state does not cross a boundary (:mod:`zeco.resets`: a zero decay at each
    document's first token), ``initial_state`` feeds the first document, the final state is the
    last one's."""
    validate(q, k, v, g, beta, initial_state)
    if cu_seqlens is not None:
        from longseq.documents import resolve
        from longseq.zeco.resets import reset_decay
        g = reset_decay(g, resolve(cu_seqlens, q.shape[1], batch=q.shape[0], what="delta_rule: cu_seqlens"))
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if resolve_backend(backend, q) == "fla" and q.shape[1] > 0:
        gdn, kda = _fla_ops()
        fn = kda if g.dim() == 4 else gdn
        h0 = None if initial_state is None else initial_state.float()
        o, ht = fn(q.contiguous(), k.contiguous(), v.contiguous(), g.float().contiguous(),
                   beta.contiguous(), scale=scale, initial_state=h0, output_final_state=True)
        return o.to(v.dtype), (ht.float() if output_final_state else None)
    o, ht = chunk_delta_rule(q, k, v, g, beta, scale=scale, initial_state=initial_state, chunk_size=chunk_size)
    return o, (ht if output_final_state else None)
