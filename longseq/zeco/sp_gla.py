"""Sequence-parallel gated linear attention: ZeCO (All-Scan), LASP-1 and LASP-2.

Each rank of ``group`` holds a contiguous piece of the sequence, in group-rank order (rank 0 the
first tokens); pieces may differ in length (uneven T, even empty). :func:`sp_gla` returns this
rank's piece of the output of GLA over the whole sequence; autograd gives every rank the gradient
of its own pieces of q, k, v, g.

The maths (DESIGN.md, "ZeCO"): everything rank i computes is linear in its initial state S0_i::

    o_i      = o_i(S0=0)     + (scale·q_i ⊙ A_i) · S0_i        A_i,t = exp(cumsum of g up to t)
    S_end_i  = S_end_i(S0=0) + diag(Γ_i) · S0_i                 Γ_i = exp(sum of g over the piece)
    S0_{i+1} = S_end_i

so S0_i is a prefix scan over ranks of (Γ_i, S_end_i(0)). The three methods obtain it differently:

* ``"zeco"``: rank i computes (Γ_i, S_end_i(0)) with one cheap pass (``(k ⊙ exp(Σ_{u>t} g_u))ᵀ v``,
  O(T·K·V)), starts :func:`zeco.all_scan.all_scan_start`, runs the local op with zero initial state
  while the scan travels, then adds ``(scale·q ⊙ A)·S0`` (another O(T·K·V) pass). Rank 0 knows its
  S0 at once and runs the local op with it; the last rank needs no summary (it sends nothing).
  Backward: rank i forms ``dS0_i(local) = (scale·q ⊙ A)ᵀ·dO + Γ_i ⊙ dht_i`` and starts the reverse
  scan (``dS0_i = dS0_i(local) + diag(Γ_i)·dS0_{i+1}``), runs the local backward with the user's
  ``dht`` while the scan travels, and then adds the (linear) contribution of ``dS0_{i+1}`` through
  the final state to dk, dv, dg. With ``overlap=False`` each rank instead waits for the (still
  pipelined) scan and runs one local pass with what it received: ``gla_fwd(initial_state=S0_i)``,
  ``gla_bwd(initial_state=S0_i, dht=dht_i + dS0_{i+1})``.
* ``"lasp1"``: the same chain with whole states and no overlap: rank i blocks on ``recv`` of S0_i
  from rank i-1, sends ``S_end_i`` to rank i+1 (one message per hop), then runs the local op with
  S0_i. Backward likewise from rank P-1 down.
* ``"lasp2"``: one all-gather of every rank's (S_end(0), Γ) packed in one flat tensor, then each
  rank folds the prefix itself and runs the local op with S0_i. Backward: one all-gather of every
  rank's ``dS0(local)`` (the Γ are kept from the forward), then a suffix fold.

Ledger per call (P ranks, S = B·H·K·V state elements, |Γ| = B·H·K for per-key decay, B·H for
scalar decay; float32 states, float64 for float64 inputs):

=========  ==================================================  =====================================
method     forward, per rank                                   backward, per rank
=========  ==================================================  =====================================
zeco       sends S in N msgs (rank P-1: 0), receives S in N    same, reverse: rank 0 sends 0, rank
           (rank 0: 0); tag ``zeco.scan.fwd``                  P-1 receives 0; ``zeco.scan.bwd``
lasp1      the same volume in 1 message; ``zeco.lasp1.fwd``    likewise; ``zeco.lasp1.bwd``
lasp2      one all_gather: sends and receives                  one all_gather: (P-1)·S;
           (P-1)·(S+|Γ|); ``zeco.lasp2.fwd``                   ``zeco.lasp2.bwd``
=========  ==================================================  =====================================

plus, unless ``check=False``, one 24-byte header all-gather (tag ``zeco.check``, control bytes in
the ledger; :func:`longseq.agree.exchange`).

Cross-rank check: ranks whose B, H, K, V, decay kind, dtypes, device, method, N or scale differ would
hang or compute garbage in the scan, and a rank whose own arguments are bad (a shape, a positive log
decay, an int dtype, ``initial_state``'s shape, ``num_blocks``) would leave its peers waiting. So
every rank validates its arguments and then exchanges one fixed-size header (its error status, a
digest of its signature): on any error or mismatch every rank raises the same exception
(``ValueError``, or ``TypeError`` for a non-float tensor) before the scan, with every rank's
differing fields. ``check=True`` (default, also ``"always"``) does this on every call, so a rank
whose shapes or dtype change on a later call is caught too. ``check="first"``: only the first time
this process sees a (group, signature), as a plan's layers may (a later disagreement can then hang);
``check=False``: never, and no value check (every rank must pass the same ``check``: a rank that
exchanges while another does not cannot be told apart from a hang). Unless ``check=False``, every
call refuses a positive log decay ``g`` (a local reduction over g), and log decays below
``zeco.gla.ops.DECAY_FLOOR`` (``-inf`` included) are raised to it, so a decay of exactly 0 gives the
recurrence's finite result; a NaN in ``g`` stays NaN (the output is NaN where one process's is). A
rank not in ``group`` raises before any collective.
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.distributed as dist

from longseq import comm
from longseq import documents as _docs
from longseq.agree import exchange, local_error
from longseq.groups import sp_group_of
from longseq.ops import group_name, resolve_group, size_rank
from longseq.zeco.all_scan import all_scan_start, num_blocks_for
from longseq.zeco.gla import gla_bwd, gla_fwd
from longseq.zeco.gla.ops import floor_decay
from longseq.zeco.resets import reset_decay

__all__ = ["sp_gla", "METHODS", "local_summary", "lasp1_scan", "lasp2_scan", "no_meta", "refuse_positive_decay"]

METHODS = ("zeco", "lasp1", "lasp2")

_CHECKED: set = set()


# ----------------------------------------------------------------------------------------------
# Local helpers (no communication)
# ----------------------------------------------------------------------------------------------
def _state_dtype(*ts) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


def _safe_exp(x: torch.Tensor) -> torch.Tensor:
    """``exp(x)`` for ``x <= 0`` with results below ~e^-60 (float32; e^-600 for float64) set to
    exactly 0: they are far below the precision of any sum they enter, and as subnormal floats
    they make CPU matrix products ~10x slower."""
    lo = -600.0 if x.dtype == torch.float64 else -60.0
    # ``x < lo`` is False for NaN, so a NaN stays NaN (exp(NaN)), as in one process
    return torch.where(x < lo, torch.full((), float("-inf"), dtype=x.dtype, device=x.device), x).exp()


def _rev_excl_cumsum_t(g: torch.Tensor) -> torch.Tensor:
    """``sum_{u > t} g_u`` along dim 1, summed directly from the end (no differences of large sums)."""
    r = g.flip(1).cumsum(1).flip(1)
    return r - g if g.shape[1] == 0 else torch.cat([r[:, 1:], torch.zeros_like(r[:, :1])], 1)


def _per_key(x: torch.Tensor, scalar: bool) -> torch.Tensor:
    return x.unsqueeze(-1) if scalar else x


def local_summary(k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, dt: torch.dtype):
    """``(Γ, S_end(0))`` of a piece: ``Γ = exp(Σ_t g_t)`` (``[B, H, K]`` or ``[B, H]``) and the final
    state from a zero initial state, ``Σ_t diag(exp(Σ_{u>t} g_u)) k_t v_tᵀ`` (``[B, H, K, V]``)."""
    gf = g.to(dt)
    scalar = g.dim() == 3
    gamma = _safe_exp(gf.sum(1))
    if k.shape[1] == 0:
        B, _, H, K = k.shape
        return gamma, torch.zeros(B, H, K, v.shape[-1], dtype=dt, device=k.device)
    b = _safe_exp(_rev_excl_cumsum_t(gf))
    kb = k.to(dt) * _per_key(b, scalar)
    s_end = torch.einsum("bthk,bthv->bhkv", kb, v.to(dt))
    return gamma, s_end


def _q_decayed(q: torch.Tensor, g: torch.Tensor, scale: float, dt: torch.dtype) -> torch.Tensor:
    """``scale · q_t ⊙ exp(Σ_{u<=t} g_u)`` in ``dt``: how o_t reads the piece's initial state."""
    A = _safe_exp(g.to(dt).cumsum(1))
    return q.to(dt) * (scale * _per_key(A, g.dim() == 3))


def _expand_decay(gamma: torch.Tensor) -> torch.Tensor:
    """Γ as a multiplier of a ``[B, H, K, V]`` state."""
    return gamma.unsqueeze(-1) if gamma.dim() == 3 else gamma.unsqueeze(-1).unsqueeze(-1)


def _final_state_grad_correction(q, k, v, g, S0, gamma, X, dt):
    """Gradients of ``<S_end, X>`` w.r.t. k, v, g for a piece started from S0 (``X = dS_end``):

        S_end = diag(Γ) S0 + Σ_j diag(b_j) k_j v_jᵀ,   b_j = exp(Σ_{u>j} g_u)
        dk_j = b_j ⊙ (X v_j),   dv_j = Xᵀ (b_j ⊙ k_j)
        dg_u = Σ_V X ⊙ (diag(Γ) S0 + Σ_{j<u} diag(b_j) k_j v_jᵀ)
             = Σ_V (X ⊙ Γ S0) + Σ_{j<u} k_j ⊙ dk_j
    (q does not enter). Returns ``(dk, dv, dg)`` in ``dt``; dg summed over K for scalar decay."""
    scalar = g.dim() == 3
    gf = g.to(dt)
    b = _per_key(_safe_exp(_rev_excl_cumsum_t(gf)), scalar)       # [B, T, H, K|1]
    kf, vf = k.to(dt), v.to(dt)
    Xv = torch.einsum("bhkv,bthv->bthk", X, vf)
    dk = b * Xv
    dv = torch.einsum("bhkv,bthk->bthv", X, kf * b)
    kdk = kf * dk
    dg = kdk.cumsum(1) - kdk                                       # exclusive: Σ_{j<u}
    if S0 is not None:
        dg = dg + (X * _expand_decay(gamma) * S0).sum(-1).unsqueeze(1)
    if scalar:
        dg = dg.sum(-1)
    return dk, dv, dg


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------
def _validate_local(q, k, v, g, initial_state, method):
    if method not in METHODS:
        raise ValueError(f"sp_gla: method must be one of {METHODS}, got {method!r}")
    for name, t in (("q", q), ("k", k), ("v", v), ("g", g)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"sp_gla: {name} must be a floating-point tensor")
    if q.dim() != 4:
        raise ValueError(f"sp_gla: q must be [B, T_local, H, K], got shape {tuple(q.shape)}")
    if k.shape != q.shape:
        raise ValueError(f"sp_gla: k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"sp_gla: v must be [B, T_local, H, V] with B, T_local, H = {tuple(q.shape[:3])}, "
                         f"got {tuple(v.shape)}")
    if g.shape != q.shape and g.shape != q.shape[:3]:
        raise ValueError(f"sp_gla: g must be [B, T_local, H, K] = {tuple(q.shape)} (per-key decay) or "
                         f"[B, T_local, H] = {tuple(q.shape[:3])} (scalar decay), got {tuple(g.shape)}")
    B, _, H, K = q.shape
    V = v.shape[-1]
    if initial_state is not None and tuple(initial_state.shape) != (B, H, K, V):
        raise ValueError(f"sp_gla: initial_state must be [B, H, K, V] = {(B, H, K, V)}, "
                         f"got {tuple(initial_state.shape)}")


def _group_key(group) -> tuple:
    try:
        return tuple(dist.get_process_group_ranks(group))
    except Exception:  # noqa: BLE001 - WORLD or an unusual group object
        return ("world", dist.get_world_size())


def _signature(q, k, v, g, method, N, scale) -> dict:
    """What must match on every rank (only the number of tokens may differ)."""
    B, _, H, K = q.shape
    name = lambda t: str(t.dtype).replace("torch.", "")  # noqa: E731
    return dict(method=method, B=B, H=H, K=K, V=v.shape[-1], decay="scalar" if g.dim() == 3 else "per-key",
                dtypes=(name(q), name(k), name(v), name(g)), state_dtype=str(_state_dtype(q, k, v, g)).replace("torch.", ""),
                device=q.device.type, num_blocks=N if method == "zeco" else None, scale=scale)


def no_meta(what: str, *ts) -> None:
    """A ``ValueError`` for a tensor on the meta device (no data: the collectives cannot run on it)."""
    if any(t is not None and t.device.type == "meta" for t in ts):
        raise ValueError(f"{what}: got a tensor on the meta device, which holds no data; materialize the inputs "
                         "(e.g. model.to_empty(device=...) and initialise) before calling it")


def refuse_positive_decay(what: str, g: torch.Tensor) -> None:
    """A ``ValueError`` when the log decay ``g`` has a positive entry (a local reduction; NaN passes)."""
    if g.numel() and bool((g > 0).any()):
        raise ValueError(
            f"{what}: g is a log decay and must be <= 0 (its largest value here is {float(g.max()):g}; a positive "
            "one makes the state grow without bound): pass e.g. torch.nn.functional.logsigmoid(x) (or check=False "
            "to skip this value check)")


def _check_mode(check) -> None:
    if check not in (True, False, "first", "always"):
        raise ValueError(f"sp_gla: check must be True, 'always', 'first' or False, got {check!r}")


# ----------------------------------------------------------------------------------------------
# The autograd function
# ----------------------------------------------------------------------------------------------
class _Cfg:
    __slots__ = ("group", "method", "scale", "N", "backend", "chunk_size", "P", "rank", "overlap", "dt")

    def __init__(self, **kw):
        for k_, v_ in kw.items():
            setattr(self, k_, v_)


def _fwd_zeco_impl(cfg, q, k, v, g, h0):
    """ZeCO forward; the last rank posts its receives before the local work too."""
    P, r, dt = cfg.P, cfg.rank, cfg.dt
    B, _, H, K = q.shape
    V = v.shape[-1]
    first, last = r == 0, r == P - 1
    S0_first = h0.to(dt) if (first and h0 is not None) else None
    gamma = None
    if last and not first:
        # receive only: no local summary needed; post the receives, then compute
        handle = all_scan_start(None, torch.empty(B, H, K, V, dtype=dt, device=q.device), cfg.group,
                                num_blocks=cfg.N, tag="zeco.scan.fwd")
    else:
        gamma, s_end0 = local_summary(k, v, g, dt)
        handle = all_scan_start(gamma, s_end0, cfg.group, initial_state=S0_first, num_blocks=cfg.N,
                                tag="zeco.scan.fwd")
    if first:
        o, ht = gla_fwd(q, k, v, g, scale=cfg.scale, initial_state=S0_first, backend=cfg.backend,
                        chunk_size=cfg.chunk_size)
        handle.wait()
        return o, ht.to(dt), S0_first, gamma
    if not cfg.overlap:
        # wait for S0 (the scan is still pipelined), then one local pass from it
        S0, _ = handle.wait()
        o, ht = gla_fwd(q, k, v, g, scale=cfg.scale, initial_state=S0, backend=cfg.backend,
                        chunk_size=cfg.chunk_size)
        return o, ht.to(dt), S0, gamma
    o0, ht0 = gla_fwd(q, k, v, g, scale=cfg.scale, initial_state=None, backend=cfg.backend,
                      chunk_size=cfg.chunk_size)
    S0, _ = handle.wait()
    if gamma is None:
        gamma = _safe_exp(g.to(dt).sum(1))
    if q.shape[1]:
        o = (o0.to(dt) + torch.einsum("bthk,bhkv->bthv", _q_decayed(q, g, cfg.scale, dt), S0)).to(q.dtype)
    else:
        o = o0
    ht = ht0.to(dt) + _expand_decay(gamma) * S0
    return o, ht, S0, gamma


def lasp1_scan(decay: Optional[torch.Tensor], local: Optional[torch.Tensor], group: Any, *, shape, dtype,
               device=None, initial_state: Optional[torch.Tensor] = None, reverse: bool = False,
               tag: str = "zeco.lasp1") -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """LASP-1's chain: the recurrence of :func:`zeco.all_scan.all_scan` with whole states and blocking
    point-to-point messages: rank i waits for ``in_i`` from its predecessor (one ``recv``), computes
    ``out_i = diag(d_i) in_i + L_i`` and sends it on (one ``send``). ``local`` may be None on the last
    rank of the chain (it sends nothing). Returns ``(in_i or None for a zero input, out_i or None)``."""
    P, me = comm.group_size(group), comm.group_rank(group)
    prev, nxt = (me + 1, me - 1) if reverse else (me - 1, me + 1)
    if 0 <= prev < P:
        inp = comm.recv(shape, dtype, prev, group, device=device if device is not None else "cpu", tag=tag)
    else:
        inp = initial_state.to(dtype) if initial_state is not None else None
    out = None
    if 0 <= nxt < P:
        out = local if inp is None else local + (inp if decay is None else _expand_decay(decay) * inp)
        out = out.to(dtype)  # the receiver's buffer dtype, whatever autocast made of this rank's summary
        comm.send(out, nxt, group, tag=tag)
    return inp, out


def lasp2_scan(decay: torch.Tensor, local: torch.Tensor, group: Any, *, initial_state: Optional[torch.Tensor] = None,
               reverse: bool = False, decays: Optional[torch.Tensor] = None,
               tag: str = "zeco.lasp2") -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """LASP-2: one all-gather of every rank's ``L_i`` (packed with its decay ``d_i`` unless ``decays``,
    the ``[P, ...]`` stack of all ranks' decays, is given), then a local fold over the ranks before
    this one (after it, with ``reverse``). The first rank of the chain folds ``initial_state`` into
    what it contributes. Returns ``(in_i or None for a zero input, all decays [P, ...])``."""
    P, me = comm.group_size(group), comm.group_rank(group)
    first = P - 1 if reverse else 0
    contrib = local
    if me == first and initial_state is not None:
        contrib = local + _expand_decay(decay) * initial_state.to(local.dtype)
    flat = [contrib.reshape(-1)] if decays is not None else [contrib.reshape(-1), decay.reshape(-1)]
    packed = torch.cat(flat) if len(flat) > 1 else flat[0].contiguous()
    allp = comm.all_gather(packed, group, dim=0, tag=tag).view(P, -1)
    n_s = local.numel()
    if decays is None:
        decays = allp[:, n_s:].reshape(P, *decay.shape)
    order = range(P - 1, me, -1) if reverse else range(me)
    S = None
    for j in order:
        sj = allp[j, :n_s].view(local.shape)
        S = sj if S is None else sj + _expand_decay(decays[j]) * S
    if me == first:
        S = initial_state.to(local.dtype) if initial_state is not None else None
    return S, decays


def _fwd_lasp1(cfg, q, k, v, g, h0):
    dt = cfg.dt
    B, _, H, K = q.shape
    V = v.shape[-1]
    gamma, s_end0 = local_summary(k, v, g, dt)
    S0, _ = lasp1_scan(gamma, s_end0, cfg.group, shape=(B, H, K, V), dtype=dt, device=q.device,
                       initial_state=h0, tag="zeco.lasp1.fwd")
    o, ht = gla_fwd(q, k, v, g, scale=cfg.scale, initial_state=S0, backend=cfg.backend, chunk_size=cfg.chunk_size)
    return o, ht.to(dt), S0, gamma


def _fwd_lasp2(cfg, q, k, v, g, h0):
    dt = cfg.dt
    gamma, s_end0 = local_summary(k, v, g, dt)
    S0, gammas = lasp2_scan(gamma, s_end0, cfg.group, initial_state=h0, tag="zeco.lasp2.fwd")
    o, ht = gla_fwd(q, k, v, g, scale=cfg.scale, initial_state=S0, backend=cfg.backend, chunk_size=cfg.chunk_size)
    return o, ht.to(dt), S0, (gamma, gammas)


def _bwd_local_dS0(cfg, q, g, do, gamma, dht):
    """``dS0(local) = (scale·q ⊙ A)ᵀ dO + Γ ⊙ dht`` (what this rank adds to the reverse scan)."""
    dt = cfg.dt
    if q.shape[1]:
        L = torch.einsum("bthk,bthv->bhkv", _q_decayed(q, g, cfg.scale, dt), do.to(dt))
    else:
        B, _, H, K = q.shape
        L = torch.zeros(B, H, K, do.shape[-1], dtype=dt, device=q.device)
    if dht is not None:
        L = L + _expand_decay(gamma) * dht.to(dt)
    return L


def _forward(cfg, q, k, v, g, h0):
    """This rank's ``(o, ht, S0, gamma, gammas)``: output, final state of the piece, the state the
    piece starts from (None: zero), Γ (None on one rank) and LASP-2's stack of every rank's Γ (else
    None). ``h0`` is the whole sequence's initial state, read on rank 0 only."""
    h0 = h0 if cfg.rank == 0 else None  # only rank 0 starts from the given initial state
    gammas = None
    if cfg.P == 1:
        o, ht = gla_fwd(q, k, v, g, scale=cfg.scale, initial_state=h0, backend=cfg.backend,
                        chunk_size=cfg.chunk_size)
        return o, ht.to(cfg.dt), h0, None, None
    if cfg.method == "zeco":
        o, ht, S0, gamma = _fwd_zeco_impl(cfg, q, k, v, g, h0)
    elif cfg.method == "lasp1":
        o, ht, S0, gamma = _fwd_lasp1(cfg, q, k, v, g, h0)
    else:
        o, ht, S0, (gamma, gammas) = _fwd_lasp2(cfg, q, k, v, g, h0)
    if gamma is None:
        gamma = _safe_exp(g.to(cfg.dt).sum(1))
    return o, ht.to(cfg.dt), S0, gamma, gammas


def _backward(cfg, q, k, v, g, S0, gamma, gammas, do, dht, h0_dtype):
    """``(dq, dk, dv, dg, dh0)`` of this rank's piece (``dh0`` None unless ``h0_dtype``: then the
    initial state's gradient on rank 0, zeros elsewhere). ``do`` / ``dht`` None: zero."""
    P, r, dt = cfg.P, cfg.rank, cfg.dt
    if do is None:
        do = torch.zeros_like(v)
    if dht is not None:
        dht = dht.to(dt)
    B, _, H, K = q.shape
    V = v.shape[-1]
    kw = dict(scale=cfg.scale, backend=cfg.backend, chunk_size=cfg.chunk_size)
    first, last = r == 0, r == P - 1
    X = None  # dS0_{i+1}: gradient reaching this piece's final state from later ranks
    if P == 1:
        dq, dk, dv, dg, dh0 = gla_bwd(q, k, v, g, initial_state=S0, do=do, dht=dht, **kw)
    elif cfg.method == "zeco":
        if first and not last:
            handle = all_scan_start(None, torch.empty(B, H, K, V, dtype=dt, device=q.device), cfg.group,
                                    reverse=True, num_blocks=cfg.N, tag="zeco.scan.bwd")
        else:
            L = _bwd_local_dS0(cfg, q, g, do, gamma, dht)
            handle = all_scan_start(gamma, L, cfg.group, reverse=True, num_blocks=cfg.N, tag="zeco.scan.bwd")
        if last:
            dq, dk, dv, dg, dh0 = gla_bwd(q, k, v, g, initial_state=S0, do=do, dht=dht, **kw)
            handle.wait()
        elif cfg.overlap:
            dq, dk, dv, dg, dh0 = gla_bwd(q, k, v, g, initial_state=S0, do=do, dht=dht, **kw)
            X, _ = handle.wait()
            ck, cv, cg = _final_state_grad_correction(q, k, v, g, S0, gamma, X, dt)
            dk = (dk.to(dt) + ck).to(k.dtype)
            dv = (dv.to(dt) + cv).to(v.dtype)
            dg = (dg.to(dt) + cg).to(g.dtype)
            dh0 = dh0.to(dt) + _expand_decay(gamma) * X
        else:
            X, _ = handle.wait()
            dq, dk, dv, dg, dh0 = gla_bwd(q, k, v, g, initial_state=S0, do=do,
                                          dht=X if dht is None else X + dht, **kw)
    elif cfg.method == "lasp1":
        L = _bwd_local_dS0(cfg, q, g, do, gamma, dht) if not first else None
        X, _ = lasp1_scan(gamma, L, cfg.group, shape=(B, H, K, V), dtype=dt, device=q.device, reverse=True,
                          tag="zeco.lasp1.bwd")
        D = X if dht is None else (dht if X is None else X + dht)
        dq, dk, dv, dg, dh0 = gla_bwd(q, k, v, g, initial_state=S0, do=do, dht=D, **kw)
    else:  # lasp2
        L = _bwd_local_dS0(cfg, q, g, do, gamma, dht)
        X, _ = lasp2_scan(gamma, L, cfg.group, reverse=True, decays=gammas, tag="zeco.lasp2.bwd")
        D = X if dht is None else (dht if X is None else X + dht)
        dq, dk, dv, dg, dh0 = gla_bwd(q, k, v, g, initial_state=S0, do=do, dht=D, **kw)
    dh0_out = None
    if h0_dtype is not None:
        dh0_out = dh0.to(h0_dtype) if first else torch.zeros(B, H, K, V, dtype=h0_dtype, device=q.device)
    return dq, dk, dv, dg, dh0_out


# ----------------------------------------------------------------------------------------------
# The custom ops (torch.library): one for the forward, one for the backward, so that
# torch.compile(fullgraph=True) traces sp_gla as one opaque node each way. The scan, its overlap
# with the local GLA and the ledger rows all happen in the real implementation (at run time).
# A missing tensor (None) travels as an empty one; the group as its registered name.
# ----------------------------------------------------------------------------------------------
def _cfg(q, k, v, g, group: str, method: str, scale: float, num_blocks: int, backend: str, chunk_size: int,
         overlap: bool) -> _Cfg:
    pg = resolve_group(group)
    return _Cfg(group=pg, method=method, scale=scale, N=num_blocks, backend=backend, chunk_size=chunk_size,
                P=dist.get_world_size(pg), rank=dist.get_rank(pg), overlap=overlap, dt=_state_dtype(q, k, v, g))


def _empty_if_none(t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0) if t is None else t


def _unaliased(outs: list, inputs: list) -> list:
    """``outs`` made contiguous (the strides the fake implementations promise), with a copy of each
    that shares memory with an input or an earlier output (a custom op's outputs may not alias; e.g.
    LASP-2's S0 and Γ stack are views of one gathered buffer)."""
    seen = {t.untyped_storage().data_ptr() for t in inputs if t is not None and t.numel()}
    res = []
    for t in outs:
        t = t.contiguous()
        if t.numel() and t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        res.append(t)
    return res


def _none_if_empty(t: torch.Tensor) -> Optional[torch.Tensor]:
    return None if t.numel() == 0 else t


@torch.library.custom_op("longseq::sp_gla_fwd", mutates_args=())
def _sp_gla_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, h0: Optional[torch.Tensor],
                group: str, method: str, scale: float, num_blocks: int, backend: str, chunk_size: int,
                overlap: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    cfg = _cfg(q, k, v, g, group, method, scale, num_blocks, backend, chunk_size, overlap)
    o, ht, S0, gamma, gammas = _forward(cfg, q, k, v, g, h0)
    outs = [o, ht, _empty_if_none(S0, ht), _empty_if_none(gamma, ht), _empty_if_none(gammas, ht)]
    return tuple(_unaliased(outs, [q, k, v, g, h0]))


@_sp_gla_fwd.register_fake
def _(q, k, v, g, h0, group, method, scale, num_blocks, backend, chunk_size, overlap):
    P, r = size_rank(group)
    dt = _state_dtype(q, k, v, g)
    B, _, H, K = q.shape
    V = v.shape[-1]
    state = q.new_empty((B, H, K, V), dtype=dt)
    none = q.new_empty(0, dtype=dt)
    S0 = (none if h0 is None else q.new_empty((B, H, K, V), dtype=h0.dtype if P == 1 else dt)) if r == 0 else state
    gshape = tuple(g.shape[:1]) + tuple(g.shape[2:])                  # [B, H, K] or [B, H]
    gamma = none if P == 1 else q.new_empty(gshape, dtype=dt)
    gammas = q.new_empty((P, *gshape), dtype=dt) if (P > 1 and method == "lasp2") else none
    return q.new_empty(v.shape), state, S0, gamma, gammas


def _sp_gla_setup(ctx, inputs, output):
    q, k, v, g, h0, *static = inputs
    _, _, S0, gamma, gammas = output
    ctx.static = static
    ctx.h0_dtype = None if h0 is None else h0.dtype
    ctx.save_for_backward(q, k, v, g, S0, gamma, gammas)
    ctx.mark_non_differentiable(S0, gamma, gammas)


def _sp_gla_backward(ctx, do, dht, *_):
    q, k, v, g, S0, gamma, gammas = ctx.saved_tensors
    need_h0 = ctx.h0_dtype is not None and ctx.needs_input_grad[4]
    dq, dk, dv, dg, dh0 = torch.ops.longseq.sp_gla_bwd(
        _empty_if_none(do, q), _empty_if_none(dht, q), q, k, v, g, S0, gamma, gammas, *ctx.static,
        ctx.h0_dtype if need_h0 else None)
    return dq, dk, dv, dg, (dh0 if need_h0 else None), None, None, None, None, None, None, None


_sp_gla_fwd.register_autograd(_sp_gla_backward, setup_context=_sp_gla_setup)


@torch.library.custom_op("longseq::sp_gla_bwd", mutates_args=())
def _sp_gla_bwd(do: torch.Tensor, dht: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                g: torch.Tensor, S0: torch.Tensor, gamma: torch.Tensor, gammas: torch.Tensor, group: str, method: str,
                scale: float, num_blocks: int, backend: str, chunk_size: int, overlap: bool,
                h0_dtype: Optional[torch.dtype]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                           torch.Tensor]:
    cfg = _cfg(q, k, v, g, group, method, scale, num_blocks, backend, chunk_size, overlap)
    grads = _backward(cfg, q, k, v, g, _none_if_empty(S0), _none_if_empty(gamma), _none_if_empty(gammas),
                      _none_if_empty(do), _none_if_empty(dht), h0_dtype)
    return tuple(_unaliased([*grads[:4], _empty_if_none(grads[4], q)], [do, dht, q, k, v, g, S0, gamma, gammas]))


@_sp_gla_bwd.register_fake
def _(do, dht, q, k, v, g, S0, gamma, gammas, group, method, scale, num_blocks, backend, chunk_size, overlap,
      h0_dtype):
    B, _, H, K = q.shape
    dh0 = q.new_empty(0) if h0_dtype is None else q.new_empty((B, H, K, v.shape[-1]), dtype=h0_dtype)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), g.new_empty(g.shape), dh0  # contiguous


def sp_gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, *, group: Any,
           method: str = "zeco", scale: Optional[float] = None, initial_state: Optional[torch.Tensor] = None,
           output_final_state: bool = False, num_blocks: Optional[int] = None, backend: str = "auto",
           chunk_size: int = 64, overlap: bool = True, check: Union[bool, str] = True,
           cu_seqlens: Optional[_docs.CuSeqlens] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Sequence-parallel GLA over ``group``: this rank's piece of the output of GLA over the whole
    sequence (the pieces of all ranks concatenated in group-rank order).

    Args:
        q, k: ``[B, T_i, H, K]``; v: ``[B, T_i, H, V]``; g: ``[B, T_i, H, K]`` (per-key log decay) or
            ``[B, T_i, H]`` (scalar per head). ``T_i`` may differ between ranks (0 included).
        group: the sequence-parallel process group (explicit; no global default), or a
            :class:`longseq.ParallelGroups` (its SP group is used), or a 1-D ``DeviceMesh``.
        method: ``"zeco"`` (All-Scan, overlapped), ``"lasp1"`` (sequential ring), ``"lasp2"``
            (all-gather).
        scale: ``K ** -0.5`` when None.
        initial_state: ``[B, H, K, V]`` initial state of the *whole* sequence; read on group rank 0
            only (other ranks may pass the same tensor or None). Its gradient comes back on rank 0
            and is zero on the others (shares summed over the group give the total).
        output_final_state: also return the state at the end of this rank's piece (on the last rank:
            the final state of the whole sequence); differentiable.
        num_blocks: All-Scan's N (default: :func:`zeco.all_scan.num_blocks_for`); zeco only.
        backend, chunk_size: of the local operator :func:`zeco.gla.gla_fwd` / ``gla_bwd``.
        overlap: zeco only. True (default): overlap the scan with the local work, forward and
            backward (local pass from a zero state / without the incoming state gradient while the
            scan travels, then an O(T·K·V) correction). False: start the pipelined scan, wait for
            it, then one local pass with the received state; cheaper when the scan's latency is
            below the cost of the correction (e.g. CPU processes over loopback at small P).
        check: cross-rank consistency check (module docstring): True / "always" (every call),
            "first" (first time per signature), or False.
        cu_seqlens: document boundaries of the *whole* window (``[D+1]`` or ``[B, D+1]``, identical on
            every rank; this rank's piece is its ``tensor_split`` piece), or a
            :class:`longseq.documents.Documents` (any split). The state does not cross a boundary
            (:mod:`zeco.resets`: the first token of a document has a zero decay, so a piece with a
            start has Γ = 0 and the scan still moves one state per rank); ``initial_state`` feeds
            the first document, the final state is the last document's.

    Returns:
        ``(o [B, T_i, H, V] in q's dtype, final_state [B, H, K, V] float32/float64 or None)``.
    """
    group = sp_group_of(group)  # a ParallelGroups or a 1-D DeviceMesh -> its process group
    P = comm.group_size(group) if dist.is_initialized() else 1

    def validate():
        _check_mode(check)
        _validate_local(q, k, v, g, initial_state, method)
        no_meta("sp_gla", q, k, v, g, initial_state)
        if check is not False:
            refuse_positive_decay("sp_gla", g)
        B, _, H, K = q.shape
        docs = _docs.resolve(cu_seqlens, q.shape[1], group, batch=B, what="sp_gla: cu_seqlens")
        return num_blocks_for((B, H, K, v.shape[-1]), _state_dtype(q, k, v, g), num_blocks, world_size=P), docs

    if not dist.is_initialized():     # no peers to wait: the argument error first, plainly
        validate()
    comm.require_member(group, "zeco.sp_gla")
    result, err = local_error(validate)
    N, docs = result if err is None else (None, None)
    # compiled graphs: checked by the eager calls (docs/compile.md)
    if P > 1 and check is not False and not torch.compiler.is_compiling():
        sig = None if err is not None else _signature(q, k, v, g, method, N, scale)
        if sig is not None and docs is not None:
            # whether documents are used; their boundaries only with check="always" (a first-time check
            # keyed by every window's boundaries would run, and be cached, on every step)
            sig["documents"] = docs.signature() if check in (True, "always") else True
        key = (_group_key(group), repr(sig))
        if not (check == "first" and err is None and key in _CHECKED):
            exchange(group, "sp_gla", sig, err, tag="zeco.check")
            if check == "first":
                _CHECKED.add(key)
    elif err is not None:
        raise err
    g = floor_decay(reset_decay(g, docs))
    K = q.shape[-1]
    scale = K ** -0.5 if scale is None else float(scale)
    o, ht, *_ = torch.ops.longseq.sp_gla_fwd(q, k, v, g, initial_state, group_name(group), method, scale, N,
                                             backend, chunk_size, bool(overlap))
    return o, (ht if output_final_state else None)
