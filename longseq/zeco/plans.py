"""Make a GLA model sequence-parallel from outside the model.

The model (e.g. :class:`models.gla.GLAForCausalLM`) holds no communication code: each GLA attention
layer calls its attribute ``gla_fn(q, k, v, g, *, scale=..., backend=..., chunk_size=...)``, by
default :func:`zeco.gla.gla`. :func:`parallelize` replaces every such ``gla_fn`` with
:func:`zeco.sp_gla` over ``group``; everything else in the model acts per token, so a rank holding a
contiguous piece of the token sequence computes exactly its piece of the model's activations.

Data and loss::

    ids_local    = shard_sequence(ids, group)                 # [B, T_i], T sharded (tensor_split)
    labels_local = shard_sequence(shift_labels(ids), group)   # next-token targets, shifted on the whole
    loss = sp_lm_loss(model(ids_local), labels_local, group)  # global mean over all ranks' tokens
    loss.backward(); longseq.sync_gradients(model.parameters(), groups)   # sums shares over SP

Packed documents: ``model(ids_local, cu_seqlens=cu)`` with the *whole* window's boundaries (identical
on every rank; every ``sp_gla`` places them on its piece) and ``labels = document_labels(shift_labels(ids),
Documents.whole(cu))`` (:mod:`longseq.documents`; docs/documents.md).

Shifting before sharding makes the target of a rank's last token the next rank's first token,
so no boundary token is lost. The loss is ``all_reduce_sum(local sum) / all_reduce_sum(local
count)`` (:func:`longseq.functional.all_reduce_sum`, tag ``"zeco.loss"``).
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import torch
import torch.nn.functional as F

from longseq import comm
from longseq.functional import all_reduce_sum
from longseq.groups import sp_group_of
from longseq.sharding import shard_range

from .sp_gla import METHODS, sp_gla

__all__ = ["parallelize", "unparallelize", "shard_sequence", "shift_labels", "sp_lm_loss"]

_ORIGINAL = "_zeco_serial_gla_fn"


def parallelize(model: torch.nn.Module, group: Any, *, method: str = "zeco", num_blocks: Optional[int] = None,
                overlap: bool = True, check: Any = True, sp_dim: Optional[str] = None) -> torch.nn.Module:
    """Swap the ``gla_fn`` of every submodule that has one for :func:`zeco.sp_gla` over ``group`` (a
    process group, a :class:`longseq.ParallelGroups`, whose SP group is used, or a ``DeviceMesh``,
    whose ``sp_dim`` is), in place; returns the model. Raises ``ValueError`` when the model has no
    such layer or the mesh no such dim."""
    group = sp_group_of(group, sp_dim)
    if method not in METHODS:
        raise ValueError(f"parallelize: method must be one of {METHODS}, got {method!r}")
    n = 0
    for mod in model.modules():
        if hasattr(mod, "gla_fn"):
            if not hasattr(mod, _ORIGINAL):
                setattr(mod, _ORIGINAL, mod.gla_fn)
            mod.gla_fn = functools.partial(sp_gla, group=group, method=method, num_blocks=num_blocks,
                                           overlap=overlap, check=check)
            n += 1
    if n == 0:
        raise ValueError("parallelize: the model has no module with a `gla_fn` attribute (a GLA layer)")
    return model


def unparallelize(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`parallelize`: restore every layer's serial ``gla_fn``."""
    for mod in model.modules():
        if hasattr(mod, _ORIGINAL):
            mod.gla_fn = getattr(mod, _ORIGINAL)
            delattr(mod, _ORIGINAL)
    return model


def shard_sequence(x: torch.Tensor, group: Any, *, dim: int = 1) -> torch.Tensor:
    """This rank's contiguous piece of ``x`` along ``dim`` (``torch.tensor_split`` sizes: the first
    ``T % P`` ranks hold one more). ``x`` must be the same on every rank; no communication, and no
    gradient bookkeeping (use :func:`longseq.functional.shard_whole` for a differentiable tensor)."""
    group = sp_group_of(group)
    P, r = comm.group_size(group), comm.group_rank(group)
    dim = dim % x.dim()
    start, stop = shard_range(x.shape[dim], P, r)
    return x.narrow(dim, start, stop - start).contiguous()


def shift_labels(input_ids: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token targets on the whole sequence: ``labels[:, t] = input_ids[:, t + 1]``, the last
    position ``ignore_index``. Shift first, then shard, so targets cross shard boundaries."""
    labels = torch.full_like(input_ids, ignore_index)
    labels[:, :-1] = input_ids[:, 1:]
    return labels


def sp_lm_loss(logits: torch.Tensor, labels: torch.Tensor, group: Any, *, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy over the targets of *all* ranks (identical on every rank): the local sum
    and the local count of non-ignored targets are summed over ``group``."""
    group = sp_group_of(group)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    local_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                ignore_index=ignore_index, reduction="sum")
    count = (labels != ignore_index).sum().to(local_sum.dtype)
    total = all_reduce_sum(local_sum, group, tag="zeco.loss")
    n = comm.all_reduce(count.detach().clone(), group, tag="zeco.loss.count")
    return total / n.clamp_min(1)
