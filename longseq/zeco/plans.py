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
so no boundary token is lost. The loss is ``sum / count`` of one all-reduce of the local sum and
the local count (:func:`longseq.functional.all_reduce_sum`, tag ``"zeco.loss"``; see :func:`sp_lm_loss`).
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
                overlap: bool = True, check: Any = "first", sp_dim: Optional[str] = None) -> torch.nn.Module:
    """Swap the ``gla_fn`` of every submodule that has one for :func:`zeco.sp_gla` over ``group`` (a
    process group, a :class:`longseq.ParallelGroups`, whose SP group is used, or a ``DeviceMesh``,
    whose ``sp_dim`` is), in place; returns the model. ``check`` goes to every layer's ``sp_gla``
    (default ``"first"``: each layer checks its signature once, so a training step carries no check
    collective; ``True`` checks every call). Raises ``ValueError`` when the model has no
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


def sp_lm_loss(logits: torch.Tensor, labels: torch.Tensor, group: Any, *, ignore_index: int = -100,
               check: bool = True) -> torch.Tensor:
    """Mean cross-entropy over the targets of *all* ranks (identical on every rank).

    ``logits [B, T_i, V]``, ``labels [B, T_i]`` (this rank's piece). One all-reduce (tag
    ``zeco.loss``) of ``[local sum, local count of non-ignored targets, local count of bad
    targets]``: the sum carries the gradient, the count divides it, and the third entry makes a
    label outside ``[0, V)`` (other than ``ignore_index``) on any rank raise the same ``ValueError``
    on every rank (a bad label is left out of the local sum, so no rank raises alone). ``check=False``
    skips the label test (and the host read of the result it needs: a device sync on GPU)."""
    group = sp_group_of(group)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    flat = labels.reshape(-1)
    bad = None
    if check:
        bad = (flat != ignore_index) & ((flat < 0) | (flat >= logits.shape[-1]))
        flat = torch.where(bad, torch.full_like(flat, ignore_index), flat)
    local_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), flat, ignore_index=ignore_index,
                                reduction="sum")
    parts = [local_sum, (flat != ignore_index).sum().to(local_sum.dtype)]
    if bad is not None:
        parts.append(bad.sum().to(local_sum.dtype))
    reduced = all_reduce_sum(torch.stack(parts), group, tag="zeco.loss")
    if bad is not None and not torch.compiler.is_compiling() and bool(reduced[2] > 0):
        raise ValueError(f"sp_lm_loss: {int(reduced[2])} target label(s) over the group are outside [0, "
                         f"{logits.shape[-1]}) (the vocabulary of the logits) and not ignore_index={ignore_index}: "
                         "fix the labels or the model's vocab_size")
    return reduced[0] / reduced[1].clamp_min(1)
