"""Chunked (WY-form) gated delta rule in PyTorch, GDN and KDA gates; differentiable (autograd over the
chunk-parallel part, a hand-written backward for the sequential state pass: :class:`StatePass`).

Shapes as in :mod:`zeco.delta.naive`. Within a chunk of ``C`` tokens with initial state ``S0``
(``[K, V]`` per head) and in-chunk cumulative log-decay ``b_t = Σ_{s<=t} g_s`` (a scalar per token for
GDN, a ``K``-vector for KDA; ``Γ_t = diag(exp(b_t))``), write the recurrence as
``S_t = Γ_t Γ_{t-1}⁻¹ S_{t-1} + k_t u_tᵀ`` with the *new values* ``u_t = beta_t (v_t - (D_t S_{t-1})ᵀ k_t)``.
Unrolling gives a unit lower-triangular system for ``U = [u_1 .. u_C]``::

    (I + M) U = diag(beta) V - diag(beta) K̃ S0,    M_ts = beta_t k_tᵀ exp(b_t - b_s) k_s  (s < t)
    K̃_t = exp(b_t) ⊙ k_t  ->  U = Ũ - W S0,  Ũ = (I+M)⁻¹ diag(beta) V,  W = (I+M)⁻¹ diag(beta) K̃   (WY form)

and with ``P_ts = (scale q_t)ᵀ exp(b_t - b_s) k_s`` (s <= t), ``q̃_t = exp(b_t) ⊙ scale q_t``,
``k̄_s = exp(b_C - b_s) ⊙ k_s``, everything a chunk does is affine in ``S0``::

    O     = P Ũ  +  E S0,          E = q̃ - P W                 [C, K]
    S_end = H    +  A S0,          H = k̄ᵀ Ũ,  A = Γ_C - k̄ᵀ W   [K, V], [K, K]

Every exponent above is ``<= 0`` for ``g <= 0`` (pairwise differences are taken before ``exp``), so
nothing overflows. :func:`chunk_prepare` computes ``(P Ũ, E, A, H)`` for all chunks at once (parallel
over chunks); :func:`state_pass` runs the only sequential part, ``S0_{c+1} = A_c S0_c + H_c``;
:func:`chunk_outputs` adds ``E_c S0_c``. :func:`local_maps` runs the pass on ``[H | A]`` from
``[0 | I]``, which gives the rank-level map of a whole piece (``A_i = Π_c A_c``) and the prefix
transitions ``F_c = E_c Π_{c'<c} A_{c'}`` that ZeCO's correction ``o += F · S_in`` needs.

Cost per head (T tokens, chunk C): prepare ``~ 2T·C·(2K + V) + 2T·K·(K+V)``, the pass
``2(T/C)·K²·V``, outputs ``2T·K·V``; the maps' pass on ``K+V`` columns adds ``2(T/C)·K³ + 2T·K²``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

__all__ = ["Prep", "chunk_prepare", "state_pass", "state_pass_reference", "StatePass", "chunk_outputs",
           "chunk_delta_rule", "local_maps", "map_pass", "corrections", "state_dtype"]


def state_dtype(*ts) -> torch.dtype:
    """float64 if any input is float64, else float32 (states and chunk maths)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


class Prep(NamedTuple):
    """Per-chunk pieces ``[B, H, n, ...]`` of a sequence of ``T`` tokens (padded to ``n·C``)."""
    o_intra: torch.Tensor   # [B, H, n, C, V]  P Ũ
    E: torch.Tensor         # [B, H, n, C, K]  how the chunk's outputs read its initial state
    A: torch.Tensor         # [B, H, n, K, K]  the chunk's transition
    H: torch.Tensor         # [B, H, n, K, V]  the chunk's final state from zero
    T: int


def _exp_nonpos(x: torch.Tensor) -> torch.Tensor:
    """exp(x) for x <= 0 with values below e^-60 (e^-600 in float64) flushed to 0 (no subnormals)."""
    lo = -600.0 if x.dtype == torch.float64 else -60.0
    return torch.where(x > lo, x, torch.full((), float("-inf"), dtype=x.dtype, device=x.device)).exp()


def _chunks(x: torch.Tensor, C: int, dt: torch.dtype) -> torch.Tensor:
    """``[B, T, H, ...]`` -> ``[B, H, n, C, ...]`` in ``dt``, zero-padded at the end (a padded token has
    g = 0, beta = 0: it leaves the state unchanged and its output is dropped)."""
    B, T, H = x.shape[:3]
    n = -(-T // C)
    x = x.to(dt)
    if n * C != T:
        pad = [0, 0] * (x.dim() - 2) + [0, n * C - T]
        x = F.pad(x, pad)
    x = x.reshape(B, n, C, H, *x.shape[3:])
    return x.movedim(3, 1)


def chunk_prepare(q, k, v, g, beta, *, scale: float, chunk_size: int = 64) -> Prep:
    """The parallel part: per-chunk ``(P Ũ, E, A, H)`` (module docstring), in float32/float64."""
    dt = state_dtype(q, k, v, g, beta)
    T, K = q.shape[1], q.shape[-1]
    C = max(1, min(chunk_size, T))
    q, k, v, g, beta = (_chunks(x, C, dt) for x in (q, k, v, g, beta))
    per_key = g.dim() == q.dim()                             # KDA: a gate per key channel
    b = g.cumsum(3)                                          # [B, H, n, C] or [B, H, n, C, K]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    neg_inf = torch.full((), float("-inf"), dtype=dt, device=q.device)
    if per_key:
        diff = b.unsqueeze(4) - b.unsqueeze(3)               # [.., C(t), C(s), K]  b_t - b_s
        Dm = _exp_nonpos(torch.where(causal[..., None], diff, neg_inf))
        Mkk = torch.einsum("...tk,...sk,...tsk->...ts", k, k, Dm)
        Pqk = torch.einsum("...tk,...sk,...tsk->...ts", q, k, Dm) * scale
        eb, eb_end = _exp_nonpos(b), b[..., -1:, :]
        kbar = k * _exp_nonpos(eb_end - b)
        Gend = torch.diag_embed(_exp_nonpos(eb_end.squeeze(-2)))
    else:
        diff = b.unsqueeze(4) - b.unsqueeze(3)               # [.., C, C]
        Dm = _exp_nonpos(torch.where(causal, diff, neg_inf))
        Mkk = (k @ k.transpose(-1, -2)) * Dm
        Pqk = (q @ k.transpose(-1, -2)) * Dm * scale
        eb, eb_end = _exp_nonpos(b).unsqueeze(-1), b[..., -1:]
        kbar = k * _exp_nonpos(eb_end - b).unsqueeze(-1)
        Gend = _exp_nonpos(eb_end).unsqueeze(-1) * torch.eye(K, dtype=dt, device=q.device)
    bt = beta.unsqueeze(-1)
    IM = torch.eye(C, dtype=dt, device=q.device) + (bt * Mkk).tril(-1)
    rhs = torch.cat([bt * (eb * k), bt * v], -1)             # [β K̃ | β V]
    sol = torch.linalg.solve_triangular(IM, rhs, upper=False, unitriangular=True)
    W, Ut = sol[..., :K], sol[..., K:]
    kbT = kbar.transpose(-1, -2)
    return Prep(o_intra=Pqk @ Ut, E=eb * q * scale - Pqk @ W, A=Gend - kbT @ W, H=kbT @ Ut, T=T)


def state_pass(A: torch.Tensor, H: torch.Tensor, S0: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S0_c for every chunk [B, H, n, K, V'], final [B, H, K, V'])`` of ``S0_{c+1} = A_c S0_c + H_c``
    (``S0`` None: zero). Differentiable through :class:`StatePass` (hand-written backward, linear in
    the number of chunks); :func:`state_pass_reference` is the same pass under autograd, kept as the
    oracle the tests check it against."""
    if A.shape[2] == 0:
        return state_pass_reference(A, H, S0)
    return StatePass.apply(A, H, S0)


def _scan_fwd(A: torch.Tensor, H: torch.Tensor, S0: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward recurrence without autograd: ``(starts [B, H, n, K, V'], final [B, H, K, V'])``,
    written into one preallocated ``starts`` tensor (no per-chunk list, no stack)."""
    starts = torch.empty_like(H)
    S = S0
    for c in range(A.shape[2]):
        if S is None:
            starts[:, :, c].zero_()
            S = H[:, :, c].clone()
        else:
            starts[:, :, c].copy_(S)
            S = torch.matmul(A[:, :, c], S).add_(H[:, :, c])
    return starts, S


class StatePass(torch.autograd.Function):
    """``S0_{c+1} = A_c S0_c + H_c`` over the chunk axis with a hand-written backward.

    Forward: ``(A [B, H, n, K, K], H [B, H, n, K, V'], S0 [B, H, K, V'] or None) -> (starts [B, H, n, K, V'],
    final [B, H, K, V'])``. Backward, with ``G_c`` the gradient of the state *leaving* chunk ``c``
    (``G_{n-1} = dfinal``) and ``dS_c = dstarts_c + A_cᵀ G_c`` the gradient of the state entering it
    (``G_{c-1} = dS_c``, ``dS0 = dS_0``): ``dH_c = G_c``, ``dA_c = G_c · starts_cᵀ`` (one batched
    product after the loop). Only the ``n`` small ``[K, K] @ [K, V']`` products of the reverse
    recurrence run one chunk at a time, so the cost is linear in ``n``: no per-chunk autograd node,
    no full-size zero-filled gradient per chunk (the quadratic cost of indexing under autograd).
    """

    @staticmethod
    def forward(ctx, A, H, S0):
        starts, final = _scan_fwd(A, H, S0)
        ctx.save_for_backward(A, starts)
        ctx.has_s0 = S0 is not None
        return starts, final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dstarts, dfinal):
        A, starts = ctx.saved_tensors
        n = A.shape[2]
        G = torch.empty_like(starts)                        # G_c: gradient of the state leaving chunk c
        g = torch.zeros_like(starts[:, :, 0]) if dfinal is None else dfinal
        for c in range(n - 1, -1, -1):
            G[:, :, c].copy_(g)
            g = torch.matmul(A[:, :, c].transpose(-1, -2), g)
            if dstarts is not None:
                g = g.add_(dstarts[:, :, c])
        dA = torch.matmul(G, starts.transpose(-1, -2)) if ctx.needs_input_grad[0] else None
        dS0 = g if (ctx.has_s0 and ctx.needs_input_grad[2]) else None
        return dA, (G if ctx.needs_input_grad[1] else None), dS0


def state_pass_reference(A: torch.Tensor, H: torch.Tensor,
                         S0: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`state_pass` one chunk at a time under autograd: the oracle for :class:`StatePass`. Its
    backward is quadratic in the number of chunks (every ``A[:, :, c]`` index zero-fills a full-size
    gradient), so it serves tests on short sequences only."""
    starts = []
    S = S0
    for c in range(A.shape[2]):
        starts.append(torch.zeros_like(H[:, :, c]) if S is None else S)
        S = H[:, :, c] if S is None else A[:, :, c] @ S + H[:, :, c]
    if S is None:
        S = torch.zeros(*H.shape[:2], *H.shape[3:], dtype=H.dtype, device=H.device)
    return (torch.stack(starts, 2) if starts else H), S


def _unchunk(x: torch.Tensor, T: int) -> torch.Tensor:
    """``[B, H, n, C, D]`` -> ``[B, T, H, D]`` (padding dropped)."""
    B, H, n, C, D = x.shape
    return x.movedim(1, 3).reshape(B, n * C, H, D)[:, :T]


def chunk_outputs(prep: Prep, starts: torch.Tensor) -> torch.Tensor:
    """``o = P Ũ + E · S0_c`` as ``[B, T, H, V]`` (float32/64)."""
    return _unchunk(prep.o_intra + prep.E @ starts, prep.T)


def chunk_delta_rule(q, k, v, g, beta, *, scale: float, initial_state: Optional[torch.Tensor] = None,
                     chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o [B, T, H, V] in v's dtype, final_state [B, H, K, V] float32/64)``; differentiable. Runs
    with autocast off (the chunk maths and states stay float32 under bf16 autocast)."""
    with torch.autocast(q.device.type, enabled=False):
        return _chunk_delta_rule(q, k, v, g, beta, scale=scale, initial_state=initial_state, chunk_size=chunk_size)


def _chunk_delta_rule(q, k, v, g, beta, *, scale, initial_state, chunk_size):
    B, T, H, K = q.shape
    if T == 0:
        S = torch.zeros(B, H, K, v.shape[-1], dtype=state_dtype(q, k, v, g, beta), device=q.device)
        return v.new_zeros(v.shape), (S if initial_state is None else S + initial_state.to(S.dtype))
    prep = chunk_prepare(q, k, v, g, beta, scale=scale, chunk_size=chunk_size)
    S0 = None if initial_state is None else initial_state.to(prep.H.dtype)
    starts, final = state_pass(prep.A, prep.H, S0)
    return chunk_outputs(prep, starts).to(v.dtype), final


def map_pass(prep: Prep) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sequential pass on ``[H | A]`` from ``[0 | I]``: ``(per-chunk starts [B, H, n, K, V + K],
    A_piece [B, H, K, K], S_local [B, H, K, V])``; the piece's map is ``S_end = S_local + A_piece · S_in``."""
    V, K = prep.H.shape[-1], prep.A.shape[-1]
    B, Hh = prep.A.shape[:2]
    eye = torch.eye(K, dtype=prep.A.dtype, device=prep.A.device).expand(B, Hh, K, K)
    ext0 = torch.cat([torch.zeros(B, Hh, K, V, dtype=prep.A.dtype, device=prep.A.device), eye], -1)
    starts, final = state_pass(prep.A, torch.cat([prep.H, torch.zeros_like(prep.A)], -1), ext0)
    return starts, final[..., V:], final[..., :V]


def corrections(prep: Prep, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From :func:`map_pass`'s starts: ``(o_local [B, T, H, V] (zero initial state), F [B, T, H, K])``
    with ``o = o_local + F · S_in``: ``F_t = E_c Π_c`` for token t of chunk c, ``Π_c`` the product of the
    earlier chunks' transitions."""
    V = prep.H.shape[-1]
    oe = prep.E @ starts                                      # [B, H, n, C, V + K]
    return _unchunk(prep.o_intra + oe[..., :V], prep.T), _unchunk(oe[..., V:], prep.T)


def local_maps(prep: Prep) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A piece's affine map and ZeCO's correction operator: ``(o_local, F, A_piece, S_local)``
    (:func:`map_pass` then :func:`corrections`)."""
    starts, A, S_local = map_pass(prep)
    o_local, Fc = corrections(prep, starts)
    return o_local, Fc, A, S_local
