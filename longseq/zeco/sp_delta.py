"""Sequence-parallel gated delta rule (Gated DeltaNet, KDA): ZeCO's All-Scan, the all-gather of
``[S | M]``, head sharding, and LASP-1's point-to-point chain, in one harness.

Each rank of ``group`` holds a contiguous piece of the sequence, in group-rank order, every piece
non-empty. :func:`sp_delta_rule` returns this rank's piece of the output of the gated delta rule over
the whole sequence; autograd gives every rank the gradients of its pieces of q, k, v, g, beta.

The maths (docs/zeco.md, "Beyond diagonal decay: the gated delta rule (Gated DeltaNet, KDA)"): a
piece is an affine map of its initial state ``S_in`` (``[K, V]`` per head), :mod:`zeco.delta.chunk`::

    o        = o_local + F · S_in          F  [T_i, K]: each token's read-out of the incoming state
    S_end    = S_local + A · S_in          A  [K, K]:   Π_t (I - beta_t k_t k_tᵀ) D_t over the piece

so ``S_in`` of rank i is a prefix scan over ranks of the maps ``(A_j, S_local_j)``, and the gradient
reaching a piece's final state is the reverse scan with ``(A_jᵀ, G_j)``, ``G_j = Fᵀ dO + Aᵀ dS_end``.

* ``"zeco"``: rank i > 0 builds ``(A_i, S_local_i)`` with one chunk pass on ``[H | A]`` (the chunk
  transitions' products, computed once), starts :func:`zeco.all_scan.all_scan_start` with the dense
  map (column blocks along V), computes ``o_local`` and ``F`` while the scan travels, then adds
  ``F · S_in`` (``2·T·K·V`` FLOPs per head) and takes ``S_end`` from the scan. Rank 0 runs the local
  op from the given initial state and sends its final state. Backward: rank i forms ``G_i`` from the
  saved ``F, A`` and starts the reverse scan with ``A_iᵀ``; while it travels the rank recomputes its
  local forward from ``S_in``; then one backward of the local op with ``dS_end = dht + X``.
* ``"allgather"`` (fla's ``fla/ops/cp`` and attention-gym's way): every rank computes
  ``(S_local_i, A_i)``, one all-gather of ``[S | M]`` (``K·V + K·K`` per head and rank), each rank folds
  the ranks before it and reruns its local op from the folded state. Backward: the local ``G_i``
  (``dS_in`` of the local op), one all-gather of ``G`` (``K·V``), a suffix fold, the local backward.
* ``"heads"`` (Megatron-core's way): all-to-all from sequence to head shards, the whole sequence on
  ``H/P`` heads, all-to-all back. Needs P | H; pieces of any lengths (the all-to-alls
  take every rank's length); no per-piece final state.
* ``"p2p"`` (LASP-1): rank i blocks on ``recv`` of ``S_in`` from rank i-1, runs its local op from it and
  sends its final state on; backward the same chain from rank P-1 down with ``dS_in``.

Ledger per call (P ranks, S = B·H·K·V, M = B·H·K·K elements, float32 states, float64 for float64):

=========  =========================================================  ===============================
method     forward, per rank                                          backward, per rank
=========  =========================================================  ===============================
zeco       sends S in N msgs (rank P-1: 0), receives S (rank 0: 0);   same, reverse: rank 0 sends 0,
           tag ``zeco.delta.scan.fwd``                                P-1 receives 0; ``...scan.bwd``
allgather  one all_gather of S+M: sends and receives (P-1)·(S+M);     one all_gather of S: (P-1)·S;
           tag ``zeco.delta.ag.fwd``                                  ``zeco.delta.ag.bwd``
p2p        S in 1 message (rank P-1 sends 0, rank 0 receives 0);      likewise reversed;
           ``zeco.delta.p2p.fwd``                                     ``zeco.delta.p2p.bwd``
heads      ONE all_to_all of q, k, v, g, beta packed (per dtype) and   the transposed all_to_alls
           one of o back (``zeco.delta.heads``, ``.heads.out``);      (``zeco.delta.heads*.bwd``)
           each moves (P-1)/P of what it carries
=========  =========================================================  ===============================

Grouped value heads (Qwen3-Next's and fla's ``num_v_heads > num_heads``): q, k ``[B, T, Hk, K]``, v,
g, beta with ``Hv = G·Hk`` heads, value head j reading key head ``j // G``. Each value head has its
own state ``[K, V]`` (its own beta and gate), so the methods move exactly the states above with
``H = Hv``: one ``K x V`` state per value head, the same bytes as a model whose q, k were repeated,
and nothing of q, k is communicated by the scan methods (q, k are repeated locally for the local
op only). ``heads`` all-to-alls q, k with their ``Hk`` heads when P divides them (else with the
fewest repeats that it does, :func:`longseq.sp.ulysses.kv_head_repeat`) and repeats after.

plus, unless ``check=False``, one 24-byte header all-gather (tag ``zeco.check``, control bytes;
:func:`longseq.agree.exchange`) per call, which also carries every rank's piece length: every
rank's argument errors (shapes, dtypes, a positive log decay, ``initial_state``, ``num_blocks``) and
a mismatch of B, H, Hk, K, V, gate kind, dtypes, device, method, N or scale, an empty piece (T < P)
or a bad ``heads`` split raise the same exception on every rank before any collective of the method
runs. ``check="first"``: only the first time this process sees a (group, signature) (what the plans
use: a later disagreement can then hang); ``check=False`` skips it and the value check on g (then
bad input may hang; every rank must pass the same ``check``).
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.distributed as dist

from longseq import comm
from longseq import documents as _docs
from longseq import functional as LF
from longseq.agree import exchange, local_error
from longseq.sharding import shard_range
from longseq.sp.ulysses import kv_head_repeat
from longseq.zeco.all_scan import all_scan_start, num_blocks_for
from longseq.zeco.sp_gla import no_meta, refuse_positive_decay
from longseq.zeco.delta import chunk_prepare, corrections, delta_rule, l2norm, map_pass, state_dtype, validate
from longseq.zeco.resets import reset_decay

__all__ = ["sp_delta_rule", "DELTA_METHODS", "SPDeltaFunction"]

DELTA_METHODS = ("zeco", "allgather", "heads", "p2p")

_CHECKED: set = set()     # (group ranks, signature) seen with check="first"


class _Cfg:
    __slots__ = ("group", "method", "scale", "N", "backend", "chunk_size", "P", "rank", "dt", "shape")

    def __init__(self, **kw):
        for k_, v_ in kw.items():
            setattr(self, k_, v_)


def _local(cfg, xs, S0):
    """The local op from ``S0``: ``(o, S_end)`` (differentiable)."""
    q, k, v, g, beta = xs
    return delta_rule(q, k, v, g, beta, scale=cfg.scale, initial_state=S0, output_final_state=True,
                      backend=cfg.backend, chunk_size=cfg.chunk_size)


def _maps(cfg, xs):
    """``(prep, starts, A, S_local)`` of this piece (no grad)."""
    prep = chunk_prepare(*xs, scale=cfg.scale, chunk_size=cfg.chunk_size)
    starts, A, S_local = map_pass(prep)
    return prep, starts, A, S_local


def _eye_like(cfg, device):
    B, H, K, _ = cfg.shape
    return torch.eye(K, dtype=cfg.dt, device=device).expand(B, H, K, K)


def _graph(cfg, xs, S0):
    """Recompute the local op from ``S0`` with autograd on: ``(leaves + [s0], (o, S_end))``."""
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_() for x in xs]
        s0 = (torch.zeros(cfg.shape, dtype=cfg.dt, device=xs[0].device) if S0 is None else S0.detach())
        s0 = s0.requires_grad_()
        return leaves + [s0], _local(cfg, leaves, s0)


def _grads(graph, do, dS_end, wrt_state_only: bool = False, keep: bool = False):
    """Gradients of ``<o, do> + <S_end, dS_end>`` w.r.t. ``(q, k, v, g, beta, S0)`` (or only ``S0``)."""
    inputs, (o, ht) = graph
    outs, gs = [o], [do]
    if dS_end is not None:
        outs.append(ht)
        gs.append(dS_end.to(ht.dtype))
    return torch.autograd.grad(outs, inputs[-1:] if wrt_state_only else inputs, gs, allow_unused=True,
                               retain_graph=keep)


def _add(a, b):
    return b if a is None else (a if b is None else a + b)


# ---- forward per method: (o, S_end, saved tensors) ---------------------------------------------
def _fwd_zeco(cfg, xs, h0):
    q = xs[0]
    if cfg.rank == 0:
        o, ht = _local(cfg, xs, h0)
        handle = all_scan_start(_eye_like(cfg, q.device), ht.to(cfg.dt), cfg.group, num_blocks=cfg.N,
                                tag="zeco.delta.scan.fwd")
        handle.wait()
        return o, ht.to(cfg.dt), (h0, None, None)
    prep, starts, A, S_local = _maps(cfg, xs)
    handle = all_scan_start(A, S_local, cfg.group, num_blocks=cfg.N, output_final_state=True,
                            tag="zeco.delta.scan.fwd")
    o_local, Fc = corrections(prep, starts)    # while the scan travels
    S_in, ht = handle.wait()
    o = (o_local + torch.einsum("bthk,bhkv->bthv", Fc, S_in)).to(xs[2].dtype)
    return o, ht, (S_in, Fc, A)


def _fold(states, maps, *, order, transpose=False):
    """``S = states_j + maps_j · S`` over ``order`` (maps transposed with ``transpose``)."""
    S = None
    for j in order:
        S = states[j] if S is None else states[j] + (maps[j].transpose(-1, -2) if transpose else maps[j]) @ S
    return S


def _fwd_allgather(cfg, xs, h0):
    B, H, K, V = cfg.shape
    _, _, A, S_local = _maps(cfg, xs)
    if cfg.rank == 0 and h0 is not None:
        S_local = S_local + A @ h0.to(cfg.dt)
    packed = torch.cat([S_local, A], -1).contiguous()             # [B, H, K, V + K]  = [S | M]
    allp = comm.all_gather(packed.unsqueeze(0), cfg.group, dim=0, tag="zeco.delta.ag.fwd")
    states, maps = allp[..., :V], allp[..., V:]
    S_in = h0.to(cfg.dt) if cfg.rank == 0 and h0 is not None else _fold(states, maps, order=range(cfg.rank))
    o, ht = _local(cfg, xs, S_in)
    return o, ht.to(cfg.dt), (S_in, maps, None)


def _fwd_p2p(cfg, xs, h0):
    S_in = h0
    if cfg.rank > 0:
        S_in = comm.recv(cfg.shape, cfg.dt, cfg.rank - 1, cfg.group, device=xs[0].device, tag="zeco.delta.p2p.fwd")
    o, ht = _local(cfg, xs, S_in)
    ht = ht.to(cfg.dt)
    if cfg.rank < cfg.P - 1:
        comm.send(ht.contiguous(), cfg.rank + 1, cfg.group, tag="zeco.delta.p2p.fwd")
    return o, ht, (S_in, None, None)


# ---- backward per method: (dq, dk, dv, dg, dbeta, dS_in) ---------------------------------------
def _bwd_zeco(cfg, xs, saved, do, dht):
    S_in, Fc, A = saved
    if cfg.rank == 0:
        handle = all_scan_start(_eye_like(cfg, do.device), torch.empty(cfg.shape, dtype=cfg.dt, device=do.device),
                                cfg.group, reverse=True, num_blocks=cfg.N, tag="zeco.delta.scan.bwd")
    else:
        G = torch.einsum("bthk,bthv->bhkv", Fc, do.to(cfg.dt))
        if dht is not None:
            G = G + A.transpose(-1, -2) @ dht
        handle = all_scan_start(A.transpose(-1, -2), G, cfg.group, reverse=True, num_blocks=cfg.N,
                                tag="zeco.delta.scan.bwd")
    graph = _graph(cfg, xs, S_in)     # the recompute runs while the scan travels
    X, _ = handle.wait()
    return _grads(graph, do, _add(dht, X))


def _bwd_allgather(cfg, xs, saved, do, dht):
    S_in, maps, _ = saved
    graph = _graph(cfg, xs, S_in)
    (G,) = _grads(graph, do, dht, wrt_state_only=True, keep=True)
    allG = comm.all_gather(G.to(cfg.dt).contiguous().unsqueeze(0), cfg.group, dim=0, tag="zeco.delta.ag.bwd")
    X = _fold(allG, maps, transpose=True, order=range(cfg.P - 1, cfg.rank, -1))
    return _grads(graph, do, _add(dht, X))


def _bwd_p2p(cfg, xs, saved, do, dht):
    (S_in, _, _) = saved
    X = None
    if cfg.rank < cfg.P - 1:
        X = comm.recv(cfg.shape, cfg.dt, cfg.rank + 1, cfg.group, device=do.device, tag="zeco.delta.p2p.bwd")
    grads = _grads(_graph(cfg, xs, S_in), do, _add(dht, X))
    if cfg.rank > 0:
        comm.send(grads[-1].to(cfg.dt).contiguous(), cfg.rank - 1, cfg.group, tag="zeco.delta.p2p.bwd")
    return grads


_FWD = {"zeco": _fwd_zeco, "allgather": _fwd_allgather, "p2p": _fwd_p2p}
_BWD = {"zeco": _bwd_zeco, "allgather": _bwd_allgather, "p2p": _bwd_p2p}


class SPDeltaFunction(torch.autograd.Function):
    """``apply(q, k, v, g, beta, initial_state, cfg) -> (o, S_end of this rank's piece)`` for the
    scan-like methods (zeco, allgather, p2p); autocast is off inside (states float32)."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, h0, cfg):
        ctx.set_materialize_grads(False)
        xs = (q, k, v, g, beta)
        h0r = h0.to(cfg.dt) if (h0 is not None and cfg.rank == 0) else None
        with torch.autocast(q.device.type, enabled=False), torch.no_grad():
            if cfg.P == 1:
                o, ht = _local(cfg, xs, h0r)
                saved = (h0r, None, None)
            else:
                o, ht, saved = _FWD[cfg.method](cfg, xs, h0r)
        ctx.cfg, ctx.h0_dtype = cfg, (None if h0 is None else h0.dtype)
        ctx.save_for_backward(*xs, *saved)
        return o, ht.to(cfg.dt)

    @staticmethod
    def backward(ctx, do, dht):
        cfg = ctx.cfg
        t = ctx.saved_tensors
        xs, saved = t[:5], t[5:]
        if do is None:
            do = torch.zeros_like(xs[2])
        dht = None if dht is None else dht.to(cfg.dt)
        with torch.autocast(do.device.type, enabled=False):
            if cfg.P == 1:
                grads = _grads(_graph(cfg, xs, saved[0]), do, dht)
            else:
                grads = _BWD[cfg.method](cfg, xs, saved, do, dht)
        dx = [None if gr is None else gr.to(x.dtype) for gr, x in zip(grads[:5], xs)]
        dh0 = None
        if ctx.needs_input_grad[5]:
            dh0 = grads[5].to(ctx.h0_dtype) if cfg.rank == 0 else torch.zeros(cfg.shape, dtype=ctx.h0_dtype,
                                                                              device=do.device)
        return (*dx, dh0, None)


def _heads(cfg, xs, h0, sizes):
    """Head sharding: all-to-all to ``H/P`` heads over the whole sequence, the op, all-to-all back
    (grouped q, k: with their own heads, repeated after; module docstring)."""
    B, H, K, V = cfg.shape
    q, k, v, g, beta = xs
    if q.shape[2] != H:
        rep = kv_head_repeat(H, q.shape[2], cfg.P, what="sp_delta_rule(method='heads')")
        if rep > 1:
            q, k = q.repeat_interleave(rep, dim=2), k.repeat_interleave(rep, dim=2)
    q, k, v, g, beta = LF.all_to_all_packed((q, k, v, g, beta), cfg.group, gather_sizes=sizes,
                                            tag="zeco.delta.heads")
    if q.shape[2] != v.shape[2]:
        q, k = (x.repeat_interleave(v.shape[2] // x.shape[2], dim=2) for x in (q, k))
    h0_mine = None
    if h0 is not None:
        lo, hi = shard_range(H, cfg.P, cfg.rank)
        h0_mine = h0[:, lo:hi]
    o, _ = delta_rule(q, k, v, g, beta, scale=cfg.scale, initial_state=h0_mine, backend=cfg.backend,
                      chunk_size=cfg.chunk_size)
    return LF.all_to_all(o, cfg.group, scatter_dim=1, gather_dim=2, gather_size=H, scatter_sizes=sizes,
                         tag="zeco.delta.heads.out")


def _signature(q, k, v, g, beta, method, N, scale, l2norm_qk) -> dict:
    B, _, H, K = q.shape
    name = lambda t: str(t.dtype).replace("torch.", "")  # noqa: E731
    return dict(method=method, B=B, H=H, K=K, V=v.shape[-1], gate="kda" if g.dim() == 4 else "gdn",
                dtypes=tuple(name(t) for t in (q, k, v, g, beta)),
                state_dtype=str(state_dtype(q, k, v, g, beta)).replace("torch.", ""), device=q.device.type,
                num_blocks=N if method == "zeco" else None, scale=scale, use_qk_l2norm=bool(l2norm_qk))


def _check_sizes(sizes: list, P: int, method: str, H: int) -> None:
    """The same ValueError on every rank (``sizes`` is every rank's piece length, the same list on
    every rank) for an empty piece (T < P) or a heads split that cannot work."""
    if min(sizes) == 0:
        raise ValueError(f"sp_delta_rule: every rank needs at least one token, got pieces {sizes} (T = {sum(sizes)} "
                         f"over P = {P}): use a sequence of at least P tokens or a smaller group")
    if method == "heads":
        if H % P:
            ok = [d for d in range(1, H + 1) if H % d == 0]
            raise ValueError(f"sp_delta_rule(method='heads') splits the {H} heads over the group, so its size {P} "
                             f"must divide them: use a group size in {ok}, or method='zeco', which has no such limit")


def sp_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, *,
                  group: Any, method: str = "zeco", scale: Optional[float] = None,
                  initial_state: Optional[torch.Tensor] = None, output_final_state: bool = False,
                  use_qk_l2norm: bool = False, num_blocks: Optional[int] = None, backend: str = "auto",
                  chunk_size: int = 64, check: Union[bool, str] = True,
                  cu_seqlens: Optional[_docs.CuSeqlens] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Sequence-parallel gated delta rule over ``group``: this rank's piece of the output over the
    whole sequence (all ranks' pieces concatenated in group-rank order).

    Args:
        q, k: ``[B, T_i, Hk, K]``; v: ``[B, T_i, H, V]``; beta: ``[B, T_i, H]``; g: ``[B, T_i, H]``
            (Gated DeltaNet) or ``[B, T_i, H, K]`` (KDA), log space; ``Hk = H`` or grouped value heads
            ``H = G·Hk`` (module docstring). ``T_i >= 1`` may differ between ranks.
        group: the sequence-parallel process group, or a :class:`longseq.ParallelGroups`.
        method: ``"zeco"`` | ``"allgather"`` | ``"heads"`` | ``"p2p"`` (module docstring).
        scale: ``K ** -0.5`` when None. use_qk_l2norm: L2-normalise q and k first (as GDN does).
        initial_state: ``[B, H, K, V]`` state before the whole sequence; read on group rank 0 (heads:
            each rank reads its heads). Its gradient comes back there (heads: each rank its heads'
            slice); shares summed over the group give the total.
        output_final_state: also return the state at the end of this rank's piece (on the last rank,
            the whole sequence's final state); differentiable. Not with ``heads``.
        num_blocks: All-Scan's N (zeco); default :func:`zeco.all_scan.num_blocks_for`.
        backend, chunk_size: of the local op :func:`zeco.delta.delta_rule`.
        check: True / "always" (one 24-byte header exchange per call, see the module docstring),
            "first" (once per signature) or False.
        cu_seqlens: document boundaries of the *whole* window (``[D+1]`` or ``[B, D+1]``, identical on
            every rank, ``tensor_split`` pieces), or a :class:`longseq.documents.Documents` (any split):
            the state does not cross a boundary, for every method (:mod:`zeco.resets`: each
            document's first token gets a zero decay, so a piece's map ``A`` is 0 when a document
            starts in it and the scans still move one state per rank).

    Returns:
        ``(o [B, T_i, H, V] in v's dtype, final_state [B, H, K, V] float32/64 or None)``.
    """
    Hk = q.shape[2] if q.dim() == 4 else None
    grouped = q.dim() == 4 and v.dim() == 4 and Hk != v.shape[2]
    qk_heads = (q, k)                           # kept for 'heads' (moved with their own heads)
    if hasattr(group, "sp_group"):  # a longseq.ParallelGroups
        group = group.sp_group
    P = comm.group_size(group) if dist.is_initialized() else 1

    def _validate():
        if check not in (True, False, "always", "first"):
            raise ValueError(f"sp_delta_rule: check must be True, 'always', 'first' or False, got {check!r}")
        if method not in DELTA_METHODS:
            raise ValueError(f"sp_delta_rule: method must be one of {DELTA_METHODS}, got {method!r}")
        qq, kk = q, k
        if grouped:
            if k.shape != q.shape or Hk == 0 or v.shape[2] % Hk:
                raise ValueError(f"sp_delta_rule: grouped value heads need q, k [B, T, Hk, K] alike and v "
                                 f"[B, T, G·Hk, V]; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
            qq, kk = (x.repeat_interleave(v.shape[2] // Hk, dim=2) for x in (q, k))   # local only, never sent
        validate(qq, kk, v, g, beta, initial_state, what="sp_delta_rule")
        no_meta("sp_delta_rule", q, k, v, g, beta, initial_state)
        if method == "heads" and output_final_state:
            raise ValueError("sp_delta_rule(method='heads'): a head shard has no per-piece final state; "
                             "use method='zeco' (or 'allgather' / 'p2p') for output_final_state=True")
        if check is not False:
            refuse_positive_decay("sp_delta_rule", g)
        B, T, H, K = qq.shape
        docs = _docs.resolve(cu_seqlens, T, group, batch=B, what="sp_delta_rule: cu_seqlens")
        N = num_blocks_for((B, H, K, v.shape[-1]), state_dtype(qq, kk, v, g, beta), num_blocks, world_size=P)
        return N, docs, qq, kk

    if not dist.is_initialized():     # no peers to wait: the argument error first, plainly
        _validate()
    comm.require_member(group, "zeco.sp_delta_rule")
    r = comm.group_rank(group)
    result, err = local_error(_validate)
    N, docs, q, k = result if err is None else (None, None, q, k)
    sizes = None
    sig = None if err is not None else dict(_signature(q, k, v, g, beta, method, N, scale, use_qk_l2norm), Hk=Hk)
    if sig is not None and docs is not None:   # the boundaries themselves only on checks of every call
        sig["documents"] = docs.signature() if check in (True, "always") else True
    key = (tuple(comm.group_ranks(group)), repr(sig))
    if P > 1 and check is not False and not (check == "first" and err is None and key in _CHECKED):
        sizes = exchange(group, "sp_delta_rule", sig, err, tag="zeco.check", value=q.shape[1] if err is None else 0)
        _check_sizes(sizes, P, method, q.shape[2])
        if check == "first":
            _CHECKED.add(key)
    elif err is not None:
        raise err
    elif q.shape[1] == 0:
        raise ValueError("sp_delta_rule: every rank needs at least one token (T < P?)")
    B, T_local, H, K = q.shape
    V = v.shape[-1]
    g = reset_decay(g, docs)
    dt = state_dtype(q, k, v, g, beta)
    if method == "heads" and grouped and P > 1:
        q, k = qk_heads
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    cfg = _Cfg(group=group, method=method, scale=(K ** -0.5 if scale is None else float(scale)), N=N,
               backend=backend, chunk_size=chunk_size, P=P, rank=r, dt=dt, shape=(B, H, K, V))
    if method == "heads" and P > 1:
        if sizes is None:
            sizes = comm.all_gather_int(T_local, group, tag="zeco.delta.heads.sizes")
        return _heads(cfg, (q, k, v, g, beta), initial_state, sizes), None
    o, ht = SPDeltaFunction.apply(q, k, v, g, beta, initial_state, cfg)
    return o, (ht if output_final_state else None)
