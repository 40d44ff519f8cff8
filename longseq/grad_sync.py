"""Gradient reduction for SP x DP training.

Under longseq's gradient convention each rank's parameter gradient is its share of the gradient of
the loss over its SP group's sample (shares summed over the SP group) and DP groups see different
samples (averaged). ``sync_gradients`` does both at once: a sum over the SP x DP product group
(every rank of the shard mesh) scaled by ``1/dp_size``, one bucketed all-reduce (tag ``grad_sync``)
through the ledger instead of an SP all-reduce followed by a DP one. Groups given without their
grid (:func:`longseq.groups.from_existing_groups`) have no product group: there the two all-reduces
run one after the other (tags ``grad_sync.sp``, ``grad_sync.dp``).
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from . import comm
from .groups import ParallelGroups

__all__ = ["sync_gradients", "product_group"]


def _all_reduce_bucketed(grads: list[torch.Tensor], group, scale: float, tag: str, bucket_bytes: int) -> None:
    bucket: list[torch.Tensor] = []
    size = 0

    def flush():
        nonlocal bucket, size
        if not bucket:
            return
        flat = _flatten_dense_tensors(bucket)
        comm.all_reduce(flat, group, tag=tag)
        if scale != 1.0:
            flat.mul_(scale)
        for g, new in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            g.copy_(new)
        bucket, size = [], 0

    for g in grads:
        if bucket and (g.dtype != bucket[0].dtype or size + g.numel() * g.element_size() > bucket_bytes):
            flush()
        bucket.append(g)
        size += g.numel() * g.element_size()
    flush()


def product_group(groups: ParallelGroups):
    """The process group of every rank of SP x DP (the shard mesh's), or None when it is not known."""
    mesh = groups.shard_mesh
    if mesh is None or mesh.size() != groups.sp_size * groups.dp_size:
        return None
    return mesh.get_group()


def sync_gradients(params: Iterable[torch.nn.Parameter], groups: ParallelGroups, *,
                   bucket_mb: float = 25.0) -> None:
    """Sum gradients over the SP group and average them over the DP group (in place): one all-reduce
    per bucket over the SP x DP product group (module docstring).

    Parameters without a gradient are skipped on every rank alike only if they are skipped alike:
    all ranks must have the same set of parameters with gradients.
    """
    grads = [p.grad for p in params if p.grad is not None]
    nbytes = int(bucket_mb * 2**20)
    if groups.sp_size * groups.dp_size == 1:
        return
    both = product_group(groups) if groups.sp_size > 1 and groups.dp_size > 1 else None
    if both is not None:
        _all_reduce_bucketed(grads, both, 1.0 / groups.dp_size, "grad_sync", nbytes)
        return
    if groups.sp_size > 1:
        _all_reduce_bucketed(grads, groups.sp_group, 1.0, "grad_sync.sp", nbytes)
    if groups.dp_size > 1:
        _all_reduce_bucketed(grads, groups.dp_group, 1.0 / groups.dp_size, "grad_sync.dp", nbytes)
