"""Naive recurrent gated delta rule (Gated DeltaNet and KDA gates): the reference, one token at a time.

Shapes (fla layout): q, k ``[B, T, H, K]``; v ``[B, T, H, V]``; beta ``[B, T, H]``; g ``[B, T, H]``
(GDN: one log-decay per head and token) or ``[B, T, H, K]`` (KDA: one per key channel); states
``[B, H, K, V]``. The recurrence, per head, with ``D_t = diag(exp(g_t))`` (a scalar times I for GDN)::

    S_t = (I - beta_t k_t k_tᵀ) D_t S_{t-1} + beta_t k_t v_tᵀ        o_t = S_tᵀ (scale · q_t)

i.e. the affine map ``S_t = A_t S_{t-1} + beta_t k_t v_tᵀ`` with ``A_t = (I - beta_t k_t k_tᵀ) D_t``.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["recurrent_delta_rule_reference", "l2norm"]


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(sum x² + eps)`` over the last dim (the q/k normalisation Gated DeltaNet uses)."""
    xf = x if x.dtype == torch.float64 else x.float()
    return (xf * torch.rsqrt((xf * xf).sum(-1, keepdim=True) + eps)).to(x.dtype)


def recurrent_delta_rule_reference(q, k, v, g, beta, *, scale: Optional[float] = None,
                                   initial_state: Optional[torch.Tensor] = None,
                                   use_qk_l2norm: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o [B, T, H, V] in v's dtype, final_state [B, H, K, V])``; computed in float32 (float64 for
    float64 inputs), differentiable (autograd of the recurrence is the gradient reference)."""
    dt = torch.float64 if v.dtype == torch.float64 else torch.float32
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    K = q.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    q, k, v, g, beta = (x.to(dt) for x in (q, k, v, g, beta))
    B, T, H, _ = q.shape
    S = torch.zeros(B, H, K, v.shape[-1], dtype=dt, device=q.device)
    if initial_state is not None:
        S = S + initial_state.to(dt)
    per_key = g.dim() == 4
    outs = []
    for t in range(T):
        d = g[:, t].exp()
        S = S * (d.unsqueeze(-1) if per_key else d[..., None, None])
        kt, bt = k[:, t], beta[:, t]
        u = bt.unsqueeze(-1) * (v[:, t] - torch.einsum("bhk,bhkv->bhv", kt, S))
        S = S + kt.unsqueeze(-1) * u.unsqueeze(-2)
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S))
    o = torch.stack(outs, 1) if outs else v.new_zeros(B, 0, H, v.shape[-1], dtype=dt)
    return o.to(v.dtype), S
