"""Public local (single-device) GLA operator: forward, backward, differentiable op.

No communication happens here; the sequence-parallel layer calls :func:`gla_fwd`
with a piece's initial state and :func:`gla_bwd` with the gradient ``dht`` of the
piece's final state.

Shapes (fla layout):
    q, k: ``[B, T, H, K]``;  v: ``[B, T, H, V]``
    g: ``[B, T, H, K]`` (per-key decay, GLA) or ``[B, T, H]`` (one decay per head:
       simple GLA / Lightning / RetNet / Mamba2-style); chosen by ``g.ndim``.
       Log space.  ``g <= 0`` is the intended domain and is *not* checked (a
       data-dependent check would synchronise the device); with ``g > 0`` the
       recurrence is still computed as defined, but the chunked kernels' overflow
       safety (all exponents <= 0) no longer holds.
    initial_state / final state: ``[B, H, K, V]``.

Recurrence: ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``, ``o_t = S_t^T (scale q_t)``,
``scale = K ** -0.5`` by default.

Dtypes: q, k, v share one floating dtype; g may be any floating dtype.  ``o`` and
``dq, dk, dv, dg`` come back in their inputs' dtypes; the final state and ``dh0`` in
float32 (float64 when the torch backend is given float64 inputs).

Backends: ``"torch"`` (pure PyTorch chunked kernels, any device/dtype), ``"fla"``
(flash-linear-attention's Triton kernels; CUDA, not float64), ``"auto"`` (fla on
CUDA when it is importable and the dtype is not float64, else torch).  ``"fla"``
raises ImportError naming ``pip install flash-linear-attention`` when fla cannot be
imported, and falls back to torch (with a warning) for CPU tensors.
"""
from __future__ import annotations

import numbers
import warnings

import torch

from . import chunk as _chunk
from . import fla_backend as _fla

__all__ = ["gla_fwd", "gla_bwd", "gla", "GLAFunction", "BACKENDS", "resolve_backend", "DECAY_FLOOR", "floor_decay"]

BACKENDS = ("auto", "torch", "fla")

# Log-decays below this are raised to it: exp(-100) is below every float's resolution next to 1 (a
# decay of 0 for practical purposes), while -inf would make the chunked form's differences of
# cumulative sums -inf - (-inf) = NaN where the recurrence is finite. Their gradient is 0.
DECAY_FLOOR = -100.0


def floor_decay(g: torch.Tensor) -> torch.Tensor:
    """``g`` with values below :data:`DECAY_FLOOR` (``-inf`` included) raised to it (NaN stays NaN)."""
    return g.clamp(min=DECAY_FLOOR)


def _validate(q, k, v, g, scale, initial_state, chunk_size, do=None, dht=None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v), ("g", g)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, K], got shape {tuple(q.shape)}")
    B, T, H, K = q.shape
    if k.shape != q.shape:
        raise ValueError(
            f"k must have q's shape [B, T, H, K] = {tuple(q.shape)}, got {tuple(k.shape)}"
            + (" (K mismatch)" if k.dim() == 4 and k.shape[:3] == q.shape[:3] else "")
        )
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"v must be [B, T, H, V] with B, T, H = {tuple(q.shape[:3])} as in q, "
            f"got shape {tuple(v.shape)}"
        )
    V = v.shape[-1]
    if g.shape != q.shape and g.shape != q.shape[:3]:
        raise ValueError(
            f"g must be [B, T, H, K] = {tuple(q.shape)} (per-key decay) or "
            f"[B, T, H] = {tuple(q.shape[:3])} (scalar decay per head), got {tuple(g.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    devices = {t.device for t in (q, k, v, g)}
    if initial_state is not None:
        devices.add(initial_state.device)
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if scale is not None and (not isinstance(scale, numbers.Real) or isinstance(scale, bool)):
        raise TypeError(f"scale must be a real number or None, got {scale!r}")
    if initial_state is not None:
        if not isinstance(initial_state, torch.Tensor) or not initial_state.is_floating_point():
            raise TypeError("initial_state must be a floating-point tensor [B, H, K, V]")
        if tuple(initial_state.shape) != (B, H, K, V):
            raise ValueError(
                f"initial_state must be [B, H, K, V] = {(B, H, K, V)}, "
                f"got {tuple(initial_state.shape)}"
            )
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if do is not None and do.shape != v.shape:
        raise ValueError(f"do must have v's shape {tuple(v.shape)}, got {tuple(do.shape)}")
    if dht is not None and tuple(dht.shape) != (B, H, K, V):
        raise ValueError(f"dht must be [B, H, K, V] = {(B, H, K, V)}, got {tuple(dht.shape)}")


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """Map ``"auto" | "torch" | "fla"`` to the backend that will run: ``"torch"`` or ``"fla"``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "fla":
        _fla.require_fla()  # ImportError naming `pip install flash-linear-attention`
        if not q.is_cuda:
            warnings.warn(
                "backend='fla' needs CUDA tensors; falling back to the PyTorch chunked kernels",
                RuntimeWarning,
                stacklevel=3,
            )
            return "torch"
        if q.dtype == torch.float64:
            raise TypeError("backend='fla' does not support float64; use backend='torch'")
        return "fla"
    # auto
    if q.is_cuda and q.dtype != torch.float64 and _fla.fla_available():
        return "fla"
    return "torch"


def _default_scale(q: torch.Tensor, scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def _state_dtype(*tensors) -> torch.dtype:
    return _chunk.compute_dtype(*tensors)


def gla_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    backend: str = "auto",
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Local GLA forward.

    Returns ``(o [B, T, H, V] in q.dtype, final_state [B, H, K, V] float32)``
    (float64 state for float64 inputs on the torch backend).
    """
    _validate(q, k, v, g, scale, initial_state, chunk_size)
    scale = _default_scale(q, scale)
    g = floor_decay(g)
    if resolve_backend(backend, q) == "fla":
        return _fla.fla_gla_fwd(q, k, v, g, scale, initial_state)
    o, ht = _chunk.chunk_gla_fwd(q, k, v, g, scale, initial_state, chunk_size)
    return o, ht.to(_state_dtype(q, k, v, g))


def gla_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    do: torch.Tensor,
    dht: torch.Tensor | None = None,
    backend: str = "auto",
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Local GLA backward from ``do`` (gradient of o) and ``dht`` (of the final state).

    Returns ``(dq, dk, dv, dg, dh0)``: gradients in the dtypes of q, k, v, g (``dg``
    has g's shape), ``dh0 [B, H, K, V]`` float32 (float64 on torch with float64
    inputs), returned even when ``initial_state`` is None.  ``dht=None`` means zero.
    """
    _validate(q, k, v, g, scale, initial_state, chunk_size, do=do, dht=dht)
    scale = _default_scale(q, scale)
    low, g = g < DECAY_FLOOR, floor_decay(g)
    if resolve_backend(backend, q) == "fla":
        dq, dk, dv, dg, dh0 = _fla.fla_gla_bwd(q, k, v, g, scale, initial_state, do, dht)
    else:
        dq, dk, dv, dg, dh0 = _chunk.chunk_gla_bwd(q, k, v, g, scale, initial_state, do, dht, chunk_size)
    return dq, dk, dv, dg.masked_fill(low, 0), dh0


class GLAFunction(torch.autograd.Function):
    """Autograd over :func:`gla_fwd` / :func:`gla_bwd` (inputs saved, states recomputed).

    ``apply(q, k, v, g, initial_state, scale, backend, chunk_size) -> (o, final_state)``.
    """

    @staticmethod
    def forward(ctx, q, k, v, g, initial_state, scale, backend, chunk_size):
        ctx.set_materialize_grads(False)
        o, ht = gla_fwd(q, k, v, g, scale=scale, initial_state=initial_state,
                        backend=backend, chunk_size=chunk_size)
        ctx.save_for_backward(q, k, v, g, initial_state)
        ctx.scale, ctx.backend, ctx.chunk_size = scale, backend, chunk_size
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, h0 = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(v)
        dq, dk, dv, dg, dh0 = gla_bwd(q, k, v, g, scale=ctx.scale, initial_state=h0,
                                      do=do, dht=dht, backend=ctx.backend,
                                      chunk_size=ctx.chunk_size)
        dh0 = dh0.to(h0.dtype) if (h0 is not None and ctx.needs_input_grad[4]) else None
        return dq, dk, dv, dg, dh0, None, None, None


def gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
    chunk_size: int = 64,
    cu_seqlens=None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Differentiable local GLA: ``(o, final_state or None)``.

    Gradients flow to q, k, v, g and initial_state (and from the final state when
    ``output_final_state`` is True). ``cu_seqlens`` (``[D+1]`` or ``[B, D+1]``, or a
    :class:`longseq.documents.Documents`): packed documents; the state does not cross a
    boundary (:mod:`zeco.resets`), ``initial_state`` feeds the first document and the final
    state is the last one's, as a loop over the documents would give.
    """
    _validate(q, k, v, g, scale, initial_state, chunk_size)
    resolve_backend(backend, q)  # fail early on a bad backend name or a missing fla
    if cu_seqlens is not None:
        from longseq.documents import resolve
        from longseq.zeco.resets import reset_decay
        g = reset_decay(g, resolve(cu_seqlens, q.shape[1], batch=q.shape[0], what="gla: cu_seqlens"))
    o, ht = GLAFunction.apply(q, k, v, g, initial_state, _default_scale(q, scale),
                              backend, chunk_size)
    return o, (ht if output_final_state else None)
