"""Megatron-SP: all-gather the sequence before the attention that needs it, reduce-scatter after.

As Megatron-LM's sequence parallelism moves activations: the attention block runs tensor-parallel
(heads split over the group, the QKV projection column-parallel and the output projection
row-parallel), with the layer's input all-gathered along the sequence first and the row-parallel
projection's partial sums reduce-scattered back to sequence shards. Here the weights stay
replicated (the same model on every rank, as for the other methods) and each rank uses its slice:
rows of the QKV weight for its heads, columns of the output weight.

Per rank, for an input piece of m elements (``M/P``): forward all-gather ``m·(P-1)`` + reduce-scatter
``m·(P-1)``; backward the adjoints (reduce-scatter + all-gather), the same volume.

Gradient convention (``longseq.functional``): each rank's weight gradient is nonzero only in its
slice, the full gradient for those heads; the output bias is added after the reduce-scatter to
this rank's tokens, so its gradient is a per-rank share. ``longseq.sync_gradients`` sums the shares.

Heads are split as ``tensor_split`` (uneven allowed, unlike Megatron-LM, which needs P | heads); a
group larger than the number of heads raises ``ValueError``.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from longseq import comm
from longseq import functional as LF
from longseq.attention import attention
from longseq.sharding import shard_range

__all__ = ["gather_sequence", "scatter_sequence", "megatron_sp_self_attention", "head_range", "parallelize"]


def gather_sequence(x: torch.Tensor, group: Any, *, dim: int, seq_len: Optional[int] = None,
                    tag: str = "megatron_sp.ag") -> torch.Tensor:
    """Sequence-sharded -> whole (all-gather, ``m·(P-1)`` sent); backward reduce-scatters."""
    return LF.all_gather(x, group, dim=dim, full_size=seq_len, tag=tag)


def scatter_sequence(x: torch.Tensor, group: Any, *, dim: int, tag: str = "megatron_sp.rs") -> torch.Tensor:
    """Partial sums over the whole sequence -> their sum, this rank's piece (reduce-scatter,
    ``m·(P-1)`` sent); backward all-gathers."""
    return LF.reduce_scatter(x, group, dim=dim, tag=tag)


def head_range(num_heads: int, P: int, rank: int) -> tuple[int, int]:
    """Heads ``[start, stop)`` of ``rank`` (``tensor_split`` of the heads); ``ValueError`` if P > heads."""
    if num_heads < P:
        raise ValueError(f"Megatron-SP splits the {num_heads} attention heads over the group, which has more ranks "
                         f"({P}): use a group of at most {num_heads} ranks")
    return shard_range(num_heads, P, rank)


def megatron_sp_self_attention(x: torch.Tensor, qkv_weight: torch.Tensor, qkv_bias: Optional[torch.Tensor],
                               proj_weight: torch.Tensor, proj_bias: Optional[torch.Tensor], num_heads: int,
                               group: Any, *, seq_dim: int = 1, seq_len: Optional[int] = None, causal: bool = False,
                               backend: Optional[str] = None, attn_fn: Optional[Callable] = None,
                               tag: str = "megatron_sp") -> torch.Tensor:
    """Self-attention ``[N, L_r, C] -> [N, L_r, C]`` (sequence dim ``seq_dim`` = 1) of a block with a
    fused QKV projection ``qkv_weight [3C, C]`` (q, k, v stacked, heads inside each) and an output
    projection ``proj_weight [C, C]``, Megatron-SP style (module docstring)."""
    if x.dim() != 3 or seq_dim % 3 != 1:
        raise ValueError(f"megatron_sp_self_attention expects [N, L, C] with the sequence at dim 1, got {list(x.shape)}")
    P, r = comm.group_size(group), comm.group_rank(group)
    n, _, c = x.shape
    d = c // num_heads
    h0, h1 = head_range(num_heads, P, r)
    hp = h1 - h0
    xg = gather_sequence(x, group, dim=1, seq_len=seq_len, tag=f"{tag}.ag")          # [N, L, C]
    L = xg.shape[1]
    w = qkv_weight.view(3, num_heads, d, c)[:, h0:h1].reshape(3 * hp * d, c)         # column-parallel slice
    b = None if qkv_bias is None else qkv_bias.view(3, num_heads, d)[:, h0:h1].reshape(3 * hp * d)
    q, k, v = F.linear(xg, w, b).view(n, L, 3, hp, d).unbind(2)
    fn = attention if attn_fn is None else attn_fn
    o = fn(q, k, v, causal=causal, backend=backend).reshape(n, L, hp * d)
    partial = F.linear(o, proj_weight[:, h0 * d:h1 * d])                             # row-parallel slice
    y = scatter_sequence(partial, group, dim=1, tag=f"{tag}.rs")                     # [N, L_r, C]
    return y if proj_bias is None else y + proj_bias


def make_forward(module: torch.nn.Module, group: Any, seq_len_fn: Callable[[], Optional[int]], *,
                 tag: str) -> Callable:
    """A replacement ``forward`` for a self-attention module with ``qkv``, ``proj`` (``nn.Linear``),
    ``num_heads`` and optionally ``backend`` (duck-typed: ``models.stdit.SelfAttention``)."""
    for name in ("qkv", "proj", "num_heads"):
        if not hasattr(module, name):
            raise ValueError(f"Megatron-SP needs a self-attention module with .qkv, .proj and .num_heads; "
                             f"{type(module).__name__} has no .{name}")
    head_range(int(module.num_heads), comm.group_size(group), comm.group_rank(group))

    def forward(x: torch.Tensor) -> torch.Tensor:
        return megatron_sp_self_attention(
            x, module.qkv.weight, module.qkv.bias, module.proj.weight, module.proj.bias, int(module.num_heads),
            group, seq_len=seq_len_fn(), backend=getattr(module, "backend", None), tag=tag)
    return forward


def parallelize(model: torch.nn.Module, group: Any, **options):
    """``longseq.sp.parallelize(model, group, method="megatron_sp", **options)``."""
    from .plans import parallelize as _parallelize
    return _parallelize(model, group, method="megatron_sp", **options)

