"""Chunked gated linear attention in pure PyTorch, forward and hand-written backward.

Recurrence (per batch ``b``, head ``h``; state ``S`` is ``[K, V]``)::

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T
    o_t = S_t^T (scale * q_t)

Shapes (fla layout): q, k ``[B, T, H, K]``; v ``[B, T, H, V]``; g ``[B, T, H, K]``
(per-key decay) or ``[B, T, H]`` (scalar decay per head, broadcast over K; its
gradient is summed back over K); states ``[B, H, K, V]``.

Numerical approach
------------------
The sequence is cut into chunks of ``C`` tokens (the last one is zero-padded:
``q = k = v = 0`` and ``g = 0`` there, which changes neither outputs nor state), and
each chunk into ``NS`` sub-chunks of ``c`` tokens (``c`` = the largest divisor of
``C`` not above 16).  Write ``q' = scale * q`` and, inside a chunk, ``G_i = sum_{u<=i} g_u``.

* Inter-chunk (state passing): with ``S`` the state entering the chunk,
  ``o_i += (q'_i * exp(G_i)) S`` and
  ``S_next = diag(exp(G_last)) S + sum_j (k_j * exp(G_last - G_j)) v_j^T``.
  ``G_last - G_j`` is computed directly as the reverse exclusive cumulative sum
  ``sum_{u>j} g_u``, never as a difference, so every exponent is a sum of
  non-positive terms: no overflow, and the exponent's rounding error is relative to
  its own size.  The chunk-to-chunk recurrence itself is a short Python loop over
  chunks of ``[K, V]`` element-wise updates (the matrix products are batched).
* Intra-chunk, ``A_ij = sum_k q'_ik k_jk exp(G_ik - G_jk)`` for ``j <= i``:
  - sub-chunk ``I`` against an earlier sub-chunk ``J < I``: the decay factorises at
    the start of sub-chunk ``I``:  ``exp(L_i) * exp(M_IJ + R_j)`` with ``L_i`` the
    cumulative sum inside ``I`` up to ``i``, ``M_IJ`` the sum of the sub-chunks strictly
    between ``J`` and ``I``, ``R_j`` the sum of ``g`` after ``j`` inside ``J``.  All
    three are sums of non-positive terms (exponents <= 0), and the products become
    ``[c, K] @ [K, C]`` matrix products;
  - inside one sub-chunk (``i, j`` in the same ``I``): the pairwise ``[c, c, K]``
    tensor ``exp(L_i - L_j)``, masked to ``i >= j`` *before* the exponential
    (``-inf`` above the diagonal), so no positive exponent is ever formed.
  Memory: ``O(B H T c K)`` for the pairwise tensor and ``O(B H T NS K)`` for the
  off-diagonal factors; no ``[C, C, K]`` tensor is formed.
* Backward (hand-written): the reverse state recurrence
  ``dS_in = diag(exp(G_last)) dS_out + (q' * exp(G))^T dO`` gives the gradient of
  every chunk's exit state; ``dv, dq, dk`` follow from the same factorised decays.
  ``dg`` uses the identity (``Gamma_t`` = global cumulative sum of ``g``; ``q``
  enters through ``q' exp(Gamma)``, ``k`` through ``k exp(-Gamma)`` and the final
  state through ``exp(Gamma_T)``):
  ``dg_u = sum_{t>=u} (q_t dq_t - k_t dk_t) + sum_V(S_T * dS_T)``.  Cut at a chunk
  boundary, the part beyond the chunk collapses to ``sum_V(S_end * dS_end)`` of that
  chunk's exit state, so ``dg`` is a within-chunk reversed cumulative sum plus one
  per-chunk term (no long cancelling sums across the sequence).

Everything is computed in float32 (float64 when any input is float64); ``o`` and the
gradients are returned in their inputs' dtypes, states in the compute dtype.
"""
from __future__ import annotations

import torch

__all__ = [
    "chunk_gla_fwd",
    "chunk_gla_bwd",
    "ChunkGLAFunction",
    "chunk_gla",
    "compute_dtype",
    "sub_chunk_size",
]


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any given tensor is float64, else float32."""
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def sub_chunk_size(chunk_size: int, max_sub: int = 16) -> int:
    """Largest divisor of ``chunk_size`` that is at most ``max_sub``."""
    for c in range(min(chunk_size, max_sub), 0, -1):
        if chunk_size % c == 0:
            return c
    return 1


def _chunked(x: torch.Tensor, C: int, dtype: torch.dtype) -> torch.Tensor:
    """``[B, T, H, D]`` -> ``[B, H, N, C, D]`` (zero-padded to ``N * C`` tokens)."""
    B, T, H, D = x.shape
    N = -(-T // C)
    x = x.to(dtype).transpose(1, 2)
    if N * C != T:
        x = torch.nn.functional.pad(x, (0, 0, 0, N * C - T))
    return x.reshape(B, H, N, C, D)


def _unchunked(x: torch.Tensor, T: int) -> torch.Tensor:
    """``[B, H, N, C, D]`` -> ``[B, T, H, D]`` (padding dropped)."""
    B, H, N, C, D = x.shape
    return x.reshape(B, H, N * C, D)[:, :, :T].transpose(1, 2)


def _rev_excl_cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``y_i = sum_{u > i} x_u`` along ``dim``, summed directly (no differences)."""
    return _shift_left(_rev_cumsum(x, dim), dim)


def _shift_left(y: torch.Tensor, dim: int) -> torch.Tensor:
    """Drop the first element along ``dim`` and append zeros (``y_i <- y_{i+1}``)."""
    n = y.shape[dim]
    zeros_shape = list(y.shape)
    zeros_shape[dim] = 1
    return torch.cat([y.narrow(dim, 1, n - 1), y.new_zeros(zeros_shape)], dim=dim)


def _rev_cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``y_i = sum_{u >= i} x_u`` along ``dim``."""
    return x.flip(dim).cumsum(dim).flip(dim)


class _Prep:
    """Chunked inputs and the decay factors shared by forward and backward.

    Attributes (``N`` chunks of ``C`` tokens, ``NS`` sub-chunks of ``c``):
        q (scaled), k, g: ``[B, H, N, C, K]``; v: ``[B, H, N, C, V]``
        Gc: inclusive cumulative sum of g inside each chunk ``[B, H, N, C, K]``
        Rc: ``sum_{u > i} g_u`` inside each chunk ``[B, H, N, C, K]``
        gsum: whole-chunk sum ``[B, H, N, K]``
        Ed: ``exp(L_i - L_j)`` masked to ``i >= j`` ``[B, H, N, NS, c, c, K]``
        Qe: ``exp(L_i)`` ``[B, H, N, NS, c, K]``
        Ke: ``exp(M_IJ + R_j)`` for ``J < I`` else 0, ``[B, H, N, NS(I), C, K]``
    """

    def __init__(self, q, k, v, g, scale, chunk_size):
        B, T, H, K = q.shape
        V = v.shape[-1]
        if g.dim() == 3:
            g = g.unsqueeze(-1).expand(B, T, H, K)
        dt = compute_dtype(q, k, v, g)
        C = int(chunk_size)
        c = sub_chunk_size(C)
        NS = C // c
        self.B, self.T, self.H, self.K, self.V = B, T, H, K, V
        self.C, self.c, self.NS, self.dtype, self.scale = C, c, NS, dt, scale

        self.q = _chunked(q, C, dt) * scale
        self.k = _chunked(k, C, dt)
        self.v = _chunked(v, C, dt)
        g = _chunked(g, C, dt)
        N = g.shape[2]
        self.N = N
        self.Gc = g.cumsum(3)
        self.Rc = _rev_excl_cumsum(g, 3)
        self.gsum = g.sum(3)

        gs = g.reshape(B, H, N, NS, c, K)
        L = gs.cumsum(4)                                   # [.., NS, c, K], <= 0
        R = _rev_excl_cumsum(gs, 4)                        # [.., NS, c, K], <= 0
        tot = gs.sum(4)                                    # [.., NS, K]
        dev = g.device
        # diagonal blocks: exp(L_i - L_j), i >= j, masked before exp
        tri = torch.ones(c, c, dtype=torch.bool, device=dev).tril()
        diff = L.unsqueeze(5) - L.unsqueeze(4)             # [.., NS, c(i), c(j), K]
        diff = diff.masked_fill(~tri[:, :, None], float("-inf"))
        self.Ed = diff.exp()
        self.Qe = L.exp()
        # off-diagonal blocks: M[I, J] = sum_{J < J' < I} tot[J']
        idx = torch.arange(NS, device=dev)
        between = (idx[None, :, None] < idx[None, None, :]) & (idx[None, None, :] < idx[:, None, None])
        M = torch.einsum("ijl,bhnlk->bhnijk", between.to(dt), tot)     # [.., NS(I), NS(J), K]
        expo = M.unsqueeze(5) + R.unsqueeze(3)             # [.., I, J, c, K]
        lower = idx[:, None] > idx[None, :]                # J < I
        expo = expo.masked_fill(~lower[:, :, None, None], float("-inf"))
        self.Ke = expo.exp().reshape(B, H, N, NS, C, K)

    def intra_A(self) -> torch.Tensor:
        """Within-chunk scores ``A [B, H, N, C, C]`` (lower triangular, incl. diagonal)."""
        B, H, N, NS, c, C, K = self.B, self.H, self.N, self.NS, self.c, self.C, self.K
        qs = self.q.reshape(B, H, N, NS, c, K)
        ks = self.k.reshape(B, H, N, NS, c, K)
        Qf = qs * self.Qe                                  # [.., NS, c, K]
        KF = self.k.unsqueeze(3) * self.Ke                 # [.., NS, C, K]
        A_off = Qf @ KF.transpose(-1, -2)                  # [.., NS, c, C]
        Ad = torch.einsum("bhnsik,bhnsijk,bhnsjk->bhnsij", qs, self.Ed, ks)
        eye = torch.eye(NS, dtype=self.dtype, device=qs.device)
        A_diag = torch.einsum("bhnsij,st->bhnsitj", Ad, eye).reshape(B, H, N, NS, c, C)
        return (A_off + A_diag).reshape(B, H, N, C, C)

    def states(self, h0: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """States entering each chunk ``[B, H, N, K, V]`` and the final state ``[B, H, K, V]``."""
        kd = self.k * self.Rc.exp()                        # k decayed to the chunk's end
        U = kd.transpose(-1, -2) @ self.v                  # [B, H, N, K, V]
        dec = self.gsum.exp().unsqueeze(-1)                # [B, H, N, K, 1]
        if h0 is None:
            S = self.q.new_zeros(self.B, self.H, self.K, self.V)
        else:
            S = h0.to(self.dtype)
        hs = []
        for n in range(self.N):
            hs.append(S)
            S = dec[:, :, n] * S + U[:, :, n]
        return torch.stack(hs, dim=2), S


def _check_chunk_size(chunk_size: int) -> None:
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def chunk_gla_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    h0: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked GLA forward.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``;
        g: ``[B, T, H, K]`` or ``[B, T, H]`` (log-space decay);
        scale: ``K ** -0.5`` when ``None``; h0: ``[B, H, K, V]`` or ``None``;
        chunk_size: tokens per chunk (any positive int; T need not be a multiple).

    Returns:
        ``(o [B, T, H, V] in q.dtype, ht [B, H, K, V] in the compute dtype)``.
    """
    _check_chunk_size(chunk_size)
    B, T, H, K = q.shape
    if scale is None:
        scale = K ** -0.5
    if T == 0:
        dt = compute_dtype(q, k, v, g)
        ht = q.new_zeros(B, H, K, v.shape[-1], dtype=dt) if h0 is None else h0.to(dt).clone()
        return v.new_zeros(B, 0, H, v.shape[-1], dtype=q.dtype), ht
    p = _Prep(q, k, v, g, scale, chunk_size)
    hs, ht = p.states(h0)
    o = p.intra_A() @ p.v + (p.q * p.Gc.exp()) @ hs
    return _unchunked(o, T).to(q.dtype), ht


def chunk_gla_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None,
    h0: torch.Tensor | None,
    do: torch.Tensor,
    dht: torch.Tensor | None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chunked GLA backward (recomputes the forward's chunk states).

    Args:
        q, k, v, g, scale, h0, chunk_size: as for :func:`chunk_gla_fwd`.
        do: ``[B, T, H, V]`` gradient of ``o``.
        dht: ``[B, H, K, V]`` gradient of the final state, or ``None`` (zeros).

    Returns:
        ``(dq, dk, dv, dg, dh0)`` in the dtypes of ``q, k, v, g`` (``dg`` has g's
        shape: summed over K for scalar decay) and ``dh0 [B, H, K, V]`` in the compute
        dtype.  ``dh0`` is returned even when ``h0`` is ``None`` (gradient with
        respect to the zero initial state), as sequence parallelism needs it.
    """
    _check_chunk_size(chunk_size)
    B, T, H, K = q.shape
    V = v.shape[-1]
    if scale is None:
        scale = K ** -0.5
    dt = compute_dtype(q, k, v, g, do)
    if T == 0:
        dh0 = q.new_zeros(B, H, K, V, dtype=dt) if dht is None else dht.to(dt).clone()
        return (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v),
                torch.zeros_like(g), dh0)
    p = _Prep(q, k, v, g, scale, chunk_size)
    N, NS, c, C = p.N, p.NS, p.c, p.C
    hs, ht = p.states(h0)
    dO = _chunked(do, C, p.dtype)

    # reverse state recurrence: dS_out[n] = gradient of the state leaving chunk n
    qg = p.q * p.Gc.exp()                                  # [B, H, N, C, K]
    W = qg.transpose(-1, -2) @ dO                          # [B, H, N, K, V]
    dec = p.gsum.exp().unsqueeze(-1)
    dS = q.new_zeros(B, H, K, V, dtype=p.dtype) if dht is None else dht.to(p.dtype)
    douts = [None] * N
    for n in range(N - 1, -1, -1):
        douts[n] = dS
        dS = dec[:, :, n] * dS + W[:, :, n]
    dh0 = dS
    dSo = torch.stack(douts, dim=2)                        # [B, H, N, K, V]
    S_end = torch.cat([hs[:, :, 1:], ht.unsqueeze(2)], dim=2)

    A = p.intra_A()
    kd = p.k * p.Rc.exp()
    dv = A.transpose(-1, -2) @ dO + kd @ dSo
    dA = dO @ p.v.transpose(-1, -2)                        # entries above the diagonal meet zero factors

    # dq' (gradient w.r.t. the scaled q)
    qs = p.q.reshape(B, H, N, NS, c, K)
    ks = p.k.reshape(B, H, N, NS, c, K)
    dA_rows = dA.reshape(B, H, N, NS, c, C)                # rows of sub-chunk I, all columns
    KF = p.k.unsqueeze(3) * p.Ke                           # [.., NS, C, K]
    dq = p.Gc.exp() * (dO @ hs.transpose(-1, -2))
    dq_off = p.Qe * (dA_rows @ KF)                         # [.., NS, c, K]
    dAd = torch.stack([dA_rows[:, :, :, s, :, s * c:(s + 1) * c] for s in range(NS)], dim=3)
    dq_diag = torch.einsum("bhnsij,bhnsijk,bhnsjk->bhnsik", dAd, p.Ed, ks)
    dq = dq + (dq_off + dq_diag).reshape(B, H, N, C, K)

    dk = p.Rc.exp() * (p.v @ dSo.transpose(-1, -2))
    Qf = qs * p.Qe
    dk_off = (p.Ke * (dA_rows.transpose(-1, -2) @ Qf)).sum(3)      # [.., C, K]
    dk_diag = torch.einsum("bhnsij,bhnsijk,bhnsik->bhnsjk", dAd, p.Ed, qs)
    dk = dk + dk_off + dk_diag.reshape(B, H, N, C, K)

    # dg: reversed within-chunk sum plus the chunk exit-state term
    dg = _rev_cumsum(p.q * dq - p.k * dk, 3) + (S_end * dSo).sum(-1).unsqueeze(3)
    dq = dq * scale

    dq = _unchunked(dq, T).to(q.dtype)
    dk = _unchunked(dk, T).to(k.dtype)
    dv = _unchunked(dv, T).to(v.dtype)
    dg = _unchunked(dg, T)
    if g.dim() == 3:
        dg = dg.sum(-1)
    return dq, dk, dv, dg.to(g.dtype), dh0


class ChunkGLAFunction(torch.autograd.Function):
    """Autograd over :func:`chunk_gla_fwd` / :func:`chunk_gla_bwd`.

    ``apply(q, k, v, g, scale, initial_state, chunk_size) -> (o, final_state)``.
    Saves only the inputs; the backward recomputes the chunk states.
    """

    @staticmethod
    def forward(ctx, q, k, v, g, scale, initial_state, chunk_size):
        o, ht = chunk_gla_fwd(q, k, v, g, scale, initial_state, chunk_size)
        ctx.save_for_backward(q, k, v, g, initial_state)
        ctx.scale, ctx.chunk_size = scale, chunk_size
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, h0 = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(v)
        dq, dk, dv, dg, dh0 = chunk_gla_bwd(q, k, v, g, ctx.scale, h0, do, dht, ctx.chunk_size)
        dh0 = dh0.to(h0.dtype) if (h0 is not None and ctx.needs_input_grad[5]) else None
        return dq, dk, dv, dg, None, dh0, None


def chunk_gla(q, k, v, g, scale=None, initial_state=None, chunk_size: int = 64):
    """Differentiable chunked GLA (pure PyTorch): returns ``(o, final_state)``."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return ChunkGLAFunction.apply(q, k, v, g, scale, initial_state, chunk_size)

