"""Gradient reduction for SP x DP training.

Under longseq's gradient convention each rank's parameter gradient is its share of the gradient of
the loss over its SP group's sample (shares summed over the SP group) and DP groups see different
samples (averaged). ``sync_gradients`` does both with bucketed all-reduces through the ledger.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from . import comm
from .groups import ParallelGroups

__all__ = ["sync_gradients"]


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


def sync_gradients(params: Iterable[torch.nn.Parameter], groups: ParallelGroups, *,
                   bucket_mb: float = 25.0) -> None:
    """Sum gradients over the SP group, then average them over the DP group (in place).

    Parameters without a gradient are skipped on every rank alike only if they are skipped alike:
    all ranks must have the same set of parameters with gradients.
    """
    grads = [p.grad for p in params if p.grad is not None]
    nbytes = int(bucket_mb * 2**20)
    if groups.sp_size > 1:
        _all_reduce_bucketed(grads, groups.sp_group, 1.0, "grad_sync.sp", nbytes)
    if groups.dp_size > 1:
        _all_reduce_bucketed(grads, groups.dp_group, 1.0 / groups.dp_size, "grad_sync.dp", nbytes)
