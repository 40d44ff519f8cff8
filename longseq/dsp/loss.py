"""Losses computed on shards: the global loss, identical on every rank, from per-rank pieces."""
from __future__ import annotations

from typing import Any

import torch

from longseq import functional as LF

from .primitives import sp_group_of

__all__ = ["sharded_mse_loss"]


def sharded_mse_loss(pred: torch.Tensor, target: torch.Tensor, group: Any, *, tag: str = "dsp.loss") -> torch.Tensor:
    """Mean squared error over the whole tensors, from this rank's pieces ``pred`` and ``target``
    (any sharding, even or not): ``sum over ranks of sum((pred - target)²) / total elements``.

    One all-reduce of two float64 numbers (tag ``dsp.loss``); the result, in ``pred``'s dtype, is the
    same on every rank, and its backward gives each rank the gradient of its own piece, so it stands
    in for ``F.mse_loss(gathered_pred, whole_target)`` without gathering the prediction.
    """
    if pred.shape != target.shape:
        raise ValueError(f"sharded_mse_loss: pred {list(pred.shape)} and target {list(target.shape)} differ")
    sse = (pred - target).pow(2).sum()
    stats = torch.stack([sse.to(torch.float64), torch.tensor(float(pred.numel()), dtype=torch.float64, device=pred.device)])
    total = LF.all_reduce_sum(stats, sp_group_of(group), tag=tag)
    return (total[0] / total[1]).to(pred.dtype)
