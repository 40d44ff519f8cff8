"""USP (unified sequence parallelism, Ulysses x Ring): the SP group of P = u·r ranks is a 2-D grid;
Ulysses all-to-alls inside groups of u consecutive ranks, ring attention across the r groups.

Ranks: SP rank ``s = g·u + i`` is member i of Ulysses group g (ranks ``g·u .. g·u+u-1``, e.g. the
GPUs of one node) and rank g of ring group i (ranks ``i, i+u, i+2u, ...``). :func:`init_usp_groups`
builds the sub-groups with ``torch.distributed.new_group``; every rank of the world must call it
(each rank creates every group of every SP group, in the same order).

``usp_attention(q, k, v, groups, ...)``: this rank's piece ``[B, L_s, H, D]`` of the sequence. The
pieces of a Ulysses group are contiguous, so its all-to-all (sequence -> heads) gives each member the
group's contiguous chunk with ``H/u`` heads; ring attention over the r chunks; all-to-all back.
Per rank, for q, k, v of m elements: forward ``4·m·(u-1)/u`` (all-to-alls) ``+ 2·m·(r-1)`` (k, v
around the ring); backward ``4·m·(u-1)/u + 4·m·(r-1)`` (ring backward: k, v again and dk, dv).

Contiguous pieces may have any lengths (:mod:`longseq.sp.pieces`: ``seq_sizes``, ``seq_len`` or
neither, when one int all-gather over the SP group learns them), causal or not: Ulysses group g's
chunk is its members' pieces in order, and the ring runs over the r chunks' lengths. Grouped k, v
whose heads u does not divide are repeated as in :func:`longseq.sp.ulysses.kv_head_repeat`.

Causal attention: ``layout="zigzag"`` balances the ring: the sequence is cut into 2r chunks, Ulysses
group g holds chunks g and 2r-1-g, and member i holds the i-th of u equal slices of their
concatenation (:func:`usp_zigzag_shard` / :func:`usp_zigzag_unshard`); after the all-to-all each ring
rank holds exactly ring attention's zigzag piece. Needs the length divisible by 2r and by P.
The query heads must be divisible by u (``ValueError``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from longseq import comm
from longseq import functional as LF
from longseq.groups import sp_group_of
from .pieces import given_sizes, piece_sizes
from .ring import ring_attention
from .ulysses import kv_head_repeat

__all__ = ["USPGroups", "init_usp_groups", "default_degrees", "usp_attention", "usp_zigzag_shard",
           "usp_zigzag_unshard", "parallelize"]


@dataclasses.dataclass(frozen=True)
class USPGroups:
    """This rank's place in the USP grid of its SP group."""

    sp_group: Any
    ulysses_group: Any
    ring_group: Any
    ulysses_degree: int
    ring_degree: int
    sp_rank: int

    @property
    def sp_size(self) -> int:
        return self.ulysses_degree * self.ring_degree

    @property
    def ulysses_rank(self) -> int:
        return self.sp_rank % self.ulysses_degree

    @property
    def ring_rank(self) -> int:
        return self.sp_rank // self.ulysses_degree


def default_degrees(P: int, num_heads: Optional[int] = None, ulysses_degree: Optional[int] = None,
                    ring_degree: Optional[int] = None) -> tuple[int, int]:
    """(u, r) with u·r = P. Given one, the other follows; given neither, u is the largest divisor of P
    that divides ``num_heads`` (Ulysses as wide as the heads allow, ring for the rest)."""
    if ulysses_degree is None and ring_degree is None:
        h = num_heads if num_heads is not None else P
        ulysses_degree = max(d for d in range(1, P + 1) if P % d == 0 and h % d == 0)
    if ulysses_degree is None:
        if ring_degree < 1 or P % ring_degree:
            raise ValueError(f"USP ring_degree={ring_degree} must divide the SP group size {P}")
        ulysses_degree = P // ring_degree
    if ring_degree is None:
        if ulysses_degree < 1 or P % ulysses_degree:
            raise ValueError(f"USP ulysses_degree={ulysses_degree} must divide the SP group size {P}")
        ring_degree = P // ulysses_degree
    if ulysses_degree * ring_degree != P:
        raise ValueError(f"USP needs ulysses_degree x ring_degree = SP group size, got {ulysses_degree} x "
                         f"{ring_degree} != {P}")
    return int(ulysses_degree), int(ring_degree)


# (SP groups, degrees) -> (the default process group they were made in, {(kind, ranks): group})
_GROUP_CACHE: dict = {}


def _default_group() -> Any:
    """The default process group object; a new one after destroy_process_group + init."""
    return dist.distributed_c10d._get_default_group()


def _sp_global_ranks(group: Any) -> tuple[int, ...]:
    if group is None or group is dist.group.WORLD:
        return tuple(range(dist.get_world_size()))
    return tuple(dist.get_global_rank(group, i) for i in range(dist.get_world_size(group)))


def init_usp_groups(group: Any, ulysses_degree: Optional[int] = None, ring_degree: Optional[int] = None, *,
                    num_heads: Optional[int] = None) -> USPGroups:
    """The USP grid over ``group`` (a process group or ``ParallelGroups``: its SP group). Collective
    over the whole world: one small ``all_gather_object`` (tag ``usp.groups``) learns every SP group,
    then every rank creates every Ulysses and ring group of every SP group in the same order.
    Groups are cached (keyed by the SP groups and degrees), so calling it again creates nothing;
    after ``destroy_process_group`` and a new ``init_process_group`` they are made anew."""
    sp = sp_group_of(group)
    P, me = comm.group_size(sp), comm.group_rank(sp)
    u, r = default_degrees(P, num_heads, ulysses_degree, ring_degree)
    mine = _sp_global_ranks(sp)
    everyone = comm.all_gather_object((mine, u, r), dist.group.WORLD, tag="usp.groups")
    if len({(len(x[0]), x[1], x[2]) for x in everyone}) != 1:
        raise ValueError(f"init_usp_groups: ranks disagree on the SP group size or the degrees: "
                         f"{sorted({(len(x[0]), x[1], x[2]) for x in everyone})}")
    all_sp = sorted({x[0] for x in everyone})
    key = (tuple(all_sp), u, r)
    world = _default_group()
    if key not in _GROUP_CACHE or _GROUP_CACHE[key][0] is not world:   # none yet, or made in a destroyed world
        made = {}
        for ranks in all_sp:                     # the same order on every rank of the world
            for g in range(r):
                sub = ranks[g * u:(g + 1) * u]
                made[("u", sub)] = dist.new_group(list(sub))
            for i in range(u):
                sub = ranks[i::u]
                made[("r", sub)] = dist.new_group(list(sub))
        _GROUP_CACHE[key] = (world, made)
    made = _GROUP_CACHE[key][1]
    g, i = me // u, me % u
    return USPGroups(sp_group=sp, ulysses_group=made[("u", mine[g * u:(g + 1) * u])],
                     ring_group=made[("r", mine[i::u])], ulysses_degree=u, ring_degree=r, sp_rank=me)


# ----------------------------------------------------------------------------------------------
# Zigzag layout for USP (pure)
# ----------------------------------------------------------------------------------------------
def _check_usp_zigzag(n: int, u: int, r: int) -> None:
    if n % (2 * r) or n % (u * r):
        raise ValueError(f"the USP zigzag layout needs the sequence length ({n}) divisible by 2·ring_degree "
                         f"({2 * r}) and by the SP size ({u * r}); pad the sequence or use layout='contiguous'")


def usp_zigzag_shard(x: torch.Tensor, dim: int, ulysses_degree: int, ring_degree: int, sp_rank: int) -> torch.Tensor:
    """SP rank ``sp_rank``'s piece of the whole ``x`` in USP's zigzag layout (module docstring)."""
    u, r = ulysses_degree, ring_degree
    dim = dim % x.dim()
    _check_usp_zigzag(x.shape[dim], u, r)
    g, i = sp_rank // u, sp_rank % u
    chunks = x.chunk(2 * r, dim)
    return torch.cat([chunks[g], chunks[2 * r - 1 - g]], dim).chunk(u, dim)[i]


def usp_zigzag_unshard(pieces: Sequence[torch.Tensor], dim: int, ulysses_degree: int, ring_degree: int) -> torch.Tensor:
    """The whole sequence from every SP rank's USP zigzag piece (a list in SP rank order)."""
    u, r = ulysses_degree, ring_degree
    dim = dim % pieces[0].dim()
    per_group = [torch.cat(list(pieces[g * u:(g + 1) * u]), dim) for g in range(r)]
    halves = [t.chunk(2, dim) for t in per_group]
    return torch.cat([h[0] for h in halves] + [h[1] for h in reversed(halves)], dim)


# ----------------------------------------------------------------------------------------------
# The attention
# ----------------------------------------------------------------------------------------------
def usp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: USPGroups, *, causal: bool = False,
                  softmax_scale: Optional[float] = None, layout: str = "contiguous", seq_len: Optional[int] = None,
                  kernel: str = "auto", grad_comm_dtype: Optional[torch.dtype] = None, dropout_p: float = 0.0,
                  backend: Optional[str] = None, tag: str = "usp",
                  seq_sizes: Optional[Sequence[int]] = None) -> torch.Tensor:
    """USP attention (module docstring). q ``[B, L_s, H, D]``, k, v ``[B, L_s, Hkv, D]``: this SP rank's
    piece (contiguous: any lengths, given by ``seq_sizes`` (every SP rank's), ``seq_len``
    (``tensor_split`` pieces) or neither (learned, tag ``<tag>.sizes``); zigzag: :func:`usp_zigzag_shard`).
    Tags ``<tag>.ulysses.*`` and ``<tag>.ring.*``."""
    if not isinstance(groups, USPGroups):
        raise TypeError("usp_attention needs the USPGroups of longseq.sp.init_usp_groups(group, ...)")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, L, H, D]; got {list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    if dropout_p:
        raise NotImplementedError("usp_attention does not implement dropout")
    u, r, s = groups.ulysses_degree, groups.ring_degree, groups.sp_rank
    P = u * r
    rep = kv_head_repeat(q.shape[2], k.shape[2], u, what="USP's Ulysses degree")
    lq = q.shape[1]
    if k.shape[1] != lq or v.shape[1] != lq:
        raise ValueError(f"usp_attention: q, k, v pieces must have the same length, got {lq}, {k.shape[1]}, "
                         f"{v.shape[1]}")
    if layout == "zigzag" and causal:
        L = P * lq if seq_len is None else int(seq_len)
        _check_usp_zigzag(L, u, r)
        if L != P * lq or (seq_sizes is not None and set(seq_sizes) != {lq}):
            raise ValueError(f"the USP zigzag layout has equal pieces: {P} x {lq} != seq_len {L}")
        piece = [lq] * P
    elif layout in ("contiguous", "zigzag"):
        given_sizes(lq, P, s, seq_len=seq_len, seq_sizes=seq_sizes, what="usp_attention")
        piece = piece_sizes(lq, groups.sp_group, seq_len=seq_len, seq_sizes=seq_sizes, tag=tag, what="usp_attention")
    else:
        raise ValueError(f"unknown USP layout {layout!r}; valid: contiguous, zigzag")
    members = [piece[g * u:(g + 1) * u] for g in range(r)]        # each Ulysses group's members' pieces
    chunk = [sum(m) for m in members]                              # each Ulysses group's chunk
    g = s // u
    if u > 1:
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        a2a = dict(scatter_dim=2, gather_dim=1, gather_sizes=members[g])
        qh = LF.all_to_all(q, groups.ulysses_group, **a2a, tag=f"{tag}.ulysses.q")
        kh = LF.all_to_all(k, groups.ulysses_group, **a2a, tag=f"{tag}.ulysses.k")
        vh = LF.all_to_all(v, groups.ulysses_group, **a2a, tag=f"{tag}.ulysses.v")
    else:
        qh, kh, vh = q, k, v
    out = ring_attention(qh, kh, vh, groups.ring_group, causal=causal, softmax_scale=softmax_scale,
                         layout=layout if causal else "contiguous", seq_sizes=chunk, kernel=kernel,
                         grad_comm_dtype=grad_comm_dtype, check=False, tag=f"{tag}.ring")
    if u > 1:
        out = LF.all_to_all(out, groups.ulysses_group, scatter_dim=1, gather_dim=2, gather_size=q.shape[2],
                            scatter_sizes=members[g], tag=f"{tag}.ulysses.out")
    return out


def parallelize(model: torch.nn.Module, group: Any, **options):
    """``longseq.sp.parallelize(model, group, method="usp", **options)``."""
    from .plans import parallelize as _parallelize
    return _parallelize(model, group, method="usp", **options)

