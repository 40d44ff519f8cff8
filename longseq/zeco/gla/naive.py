"""Step-by-step reference for gated linear attention (GLA).

This is the "naive reference beside every fast kernel": a literal loop over
time steps of the recurrence, written for clarity, not speed.  It computes in
the dtype of its inputs (promoted to at least float32), so float64 inputs give
a float64 reference; fla's own ``naive_recurrent_gla`` only upcasts to float32.

Recurrence, per batch ``b`` and head ``h`` (state ``S`` is ``[K, V]``)::

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T
    o_t = S_t^T (scale * q_t)

Shapes (fla layout):
    q, k: ``[B, T, H, K]``;  v: ``[B, T, H, V]``
    g:    ``[B, T, H, K]`` (per-key decay) or ``[B, T, H]`` (one decay per head),
          log space, normally ``g <= 0``
    initial_state / final state: ``[B, H, K, V]``
"""
from __future__ import annotations

import torch

__all__ = ["recurrent_gla_reference"]


def recurrent_gla_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the GLA recurrence one step at a time.

    Args:
        q, k: ``[B, T, H, K]``.
        v: ``[B, T, H, V]``.
        g: ``[B, T, H, K]`` or ``[B, T, H]`` (scalar decay per head), log space.
        scale: query scale, ``K ** -0.5`` when ``None``.
        initial_state: ``[B, H, K, V]`` or ``None`` (zeros).

    Returns:
        ``(o, final_state)``: ``o`` is ``[B, T, H, V]`` in ``q.dtype``;
        ``final_state`` is ``[B, H, K, V]`` in the compute dtype (float32, or
        float64 for float64 inputs).  Differentiable by autograd.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    if scale is None:
        scale = K ** -0.5
    dtype = torch.promote_types(q.dtype, torch.float32)
    if g.dim() == 3:
        g = g.unsqueeze(-1).expand(B, T, H, K)
    q, k, v, g = (x.to(dtype) for x in (q, k, v, g))
    if initial_state is None:
        state = q.new_zeros(B, H, K, V)
    else:
        state = initial_state.to(dtype)
    outs = []
    for t in range(T):
        decay = g[:, t].exp()                                   # [B, H, K]
        kv = k[:, t].unsqueeze(-1) * v[:, t].unsqueeze(-2)      # [B, H, K, V]
        state = decay.unsqueeze(-1) * state + kv
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, state))
    if T > 0:
        o = torch.stack(outs, dim=1)
    else:
        o = v.new_zeros(B, 0, H, V, dtype=dtype)
    return o.to(q.dtype), state
