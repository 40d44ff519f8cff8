"""GLA forward/backward through flash-linear-attention's (fla's) Triton chunk kernels.

Same interface as :mod:`zeco.gla.chunk`; used on CUDA tensors when fla is installed.
fla is imported lazily (first call), so importing this module never needs fla.

What is called (fla 0.6, ``fla/ops/gla/chunk.py`` and ``fla/ops/simple_gla/chunk.py``),
all with keyword arguments, tensors made contiguous, states in float32:

Per-key decay (``g [B, T, H, K]``), chunk size ``BT = min(64, max(16, next_pow2(T)))``
(the rule of fla's own ``ChunkGLAFunction``):

* forward: ``chunk_gla_fwd(q, k, v, g, g_cumsum=None, scale, initial_state,
  output_final_state=True, chunk_size=BT) -> (g_cumsum, A, h, ht, o)``
* backward: ``gc = chunk_local_cumsum(g, chunk_size=BT, scale=RCP_LN2)``;
  ``A = chunk_gla_fwd_intra_gk(q, k, g=gc, scale, chunk_size=BT)``;
  ``chunk_gla_bwd(q, k, v, g, g_cumsum=gc, scale, initial_state, h=None, A, do, dht,
  chunk_size=BT) -> (dq, dk, dv, dg, dh0)`` (dg is already the gradient of the raw g).

Scalar decay (``g [B, T, H]``), ``BT = 64`` (fla's ``ChunkSimpleGLAFunction`` default):

* ``gc = chunk_local_cumsum(g, chunk_size=BT, scale=RCP_LN2)`` (log2-space cumsum)
* forward: ``chunk_simple_gla_fwd(q, k, v, g=gc, g_gamma=None, scale, initial_state,
  output_final_state=True, chunk_size=BT) -> (o, ht)``
* backward: ``chunk_simple_gla_bwd(q, k, v, g=gc, g_gamma=None, initial_state, do, dht,
  scale, chunk_size=BT) -> (dq, dk, dv, dg_c, dh0)``, then
  ``dg = chunk_local_cumsum(dg_c, chunk_size=BT, reverse=True)``.
  fla 0.6 raises RuntimeError in that backward on Hopper GPUs with
  3.4 <= Triton < 3.7.1 (its issue #640); then the backward runs the per-key GLA
  kernels above on ``g`` broadcast over K and sums ``dg`` over K (one warning).

fla returns no ``dh0`` without an initial state, so the backward passes a zero
``initial_state`` when none is given: ``dh0`` is always returned (SP needs it).
The ``chunk_size`` argument of the public API is ignored here (fla picks its own;
results do not depend on it mathematically).
"""
from __future__ import annotations

import functools
import warnings

import torch

__all__ = ["fla_available", "require_fla", "fla_gla_fwd", "fla_gla_bwd", "FLA_INSTALL_HINT"]

FLA_INSTALL_HINT = "pip install flash-linear-attention"


@functools.lru_cache(maxsize=1)
def _load():
    """Import fla's chunk functions once; raises ImportError naming the pip package."""
    try:
        from fla.ops.gla.chunk import chunk_gla_bwd, chunk_gla_fwd, chunk_gla_fwd_intra_gk
        from fla.ops.simple_gla.chunk import chunk_simple_gla_bwd, chunk_simple_gla_fwd
        from fla.ops.utils.constant import RCP_LN2
        from fla.ops.utils.cumsum import chunk_local_cumsum
    except ImportError as e:  # fla missing, or an fla without these functions
        raise ImportError(
            f"backend='fla' needs flash-linear-attention (>= 0.6): {FLA_INSTALL_HINT} "
            f"(import failed: {e})"
        ) from e
    return {
        "chunk_gla_fwd": chunk_gla_fwd,
        "chunk_gla_bwd": chunk_gla_bwd,
        "chunk_gla_fwd_intra_gk": chunk_gla_fwd_intra_gk,
        "chunk_simple_gla_fwd": chunk_simple_gla_fwd,
        "chunk_simple_gla_bwd": chunk_simple_gla_bwd,
        "chunk_local_cumsum": chunk_local_cumsum,
        "RCP_LN2": RCP_LN2,
    }


def require_fla() -> dict:
    """The fla functions used here; ImportError (naming the pip package) if unavailable."""
    return _load()


@functools.lru_cache(maxsize=None)
def _warn_once(msg: str) -> None:
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def fla_available() -> bool:
    """True when fla's chunk kernels can be imported."""
    try:
        _load()
    except ImportError:
        return False
    return True


def _gla_chunk_size(T: int) -> int:
    return min(64, max(16, 1 << max(T - 1, 0).bit_length()))


def _c(x: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    if x is None:
        return None
    if dtype is not None:
        x = x.to(dtype)
    return x.contiguous()


def fla_gla_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    h0: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fla forward: ``(o [B, T, H, V] in q.dtype, ht [B, H, K, V] float32)``."""
    f = require_fla()
    T = q.shape[1]
    q, k, v, g = _c(q), _c(k), _c(v), _c(g)
    h0 = _c(h0, torch.float32)
    with torch.cuda.device(q.device):
        if g.dim() == 4:
            _, _, _, ht, o = f["chunk_gla_fwd"](
                q=q, k=k, v=v, g=g, g_cumsum=None, scale=scale,
                initial_state=h0, output_final_state=True,
                chunk_size=_gla_chunk_size(T),
            )
        else:
            BT = 64
            gc = f["chunk_local_cumsum"](g, chunk_size=BT, scale=f["RCP_LN2"])
            o, ht = f["chunk_simple_gla_fwd"](
                q=q, k=k, v=v, g=gc, g_gamma=None, scale=scale,
                initial_state=h0, output_final_state=True, chunk_size=BT,
            )
    return o.to(q.dtype), ht.float()


def fla_gla_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    h0: torch.Tensor | None,
    do: torch.Tensor,
    dht: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """fla backward: ``(dq, dk, dv, dg, dh0)``; dh0 float32 even when ``h0`` is None."""
    f = require_fla()
    B, T, H, K = q.shape
    V = v.shape[-1]
    q, k, v, g = _c(q), _c(k), _c(v), _c(g)
    do = _c(do, v.dtype)
    dht = _c(dht, torch.float32)
    if h0 is None:
        h0 = q.new_zeros(B, H, K, V, dtype=torch.float32)
    h0 = _c(h0, torch.float32)
    with torch.cuda.device(q.device):
        if g.dim() == 4:
            BT = _gla_chunk_size(T)
            gc = f["chunk_local_cumsum"](g, chunk_size=BT, scale=f["RCP_LN2"])
            A = f["chunk_gla_fwd_intra_gk"](q=q, k=k, g=gc, scale=scale, chunk_size=BT)
            dq, dk, dv, dg, dh0 = f["chunk_gla_bwd"](
                q=q, k=k, v=v, g=g, g_cumsum=gc, scale=scale, initial_state=h0,
                h=None, A=A, do=do, dht=dht, chunk_size=BT,
            )
        else:
            try:
                BT = 64
                gc = f["chunk_local_cumsum"](g, chunk_size=BT, scale=f["RCP_LN2"])
                dq, dk, dv, dg, dh0 = f["chunk_simple_gla_bwd"](
                    q=q, k=k, v=v, g=gc, g_gamma=None, initial_state=h0, do=do, dht=dht,
                    scale=scale, chunk_size=BT,
                )
                dg = f["chunk_local_cumsum"](dg, chunk_size=BT, reverse=True)
            except RuntimeError as e:
                # fla 0.6 refuses its gated simple-GLA backward on Hopper with
                # 3.4 <= Triton < 3.7.1 (fla issue #640, wrong results).  The per-key GLA
                # kernels are unaffected: run them on g broadcast over K, sum dg over K.
                if "Triton" not in str(e):
                    raise
                _warn_once(f"fla simple-GLA backward unavailable ({e}); "
                           "using fla's per-key GLA backward with g broadcast over K")
                BT = _gla_chunk_size(T)
                ge = g.unsqueeze(-1).expand(B, T, H, K).contiguous()
                gc = f["chunk_local_cumsum"](ge, chunk_size=BT, scale=f["RCP_LN2"])
                A = f["chunk_gla_fwd_intra_gk"](q=q, k=k, g=gc, scale=scale, chunk_size=BT)
                dq, dk, dv, dg, dh0 = f["chunk_gla_bwd"](
                    q=q, k=k, v=v, g=ge, g_cumsum=gc, scale=scale, initial_state=h0,
                    h=None, A=A, do=do, dht=dht, chunk_size=BT,
                )
                dg = dg.float().sum(-1)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.to(g.dtype), dh0.float()
