"""Shape arithmetic shared by the Triton and CUDA kernels (pure functions, no device code).

A switch operand is brought to one canonical form: a 5-D view (leading size-1 dims added to a 4-D
tensor; the split dim moved accordingly) whose elements are reinterpreted as the widest integer
*unit* of at most 8 bytes the strides allow (a bf16 tensor with a contiguous last dim of 1152 is
copied as 288 int64 per row), plus the tensor_split pieces described by two integers: piece j
has ``q + (j < rem)`` elements along the split dim and starts at ``j * q + min(j, rem)``. In the
flat buffer piece j starts at that offset times ``numel / n[dim]``. A copy does not look at the
values, so the units make it exact for every dtype.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["canonical", "tensor_split_qr", "tile", "scan_tile", "NO_FMA"]

_UNITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
MAX_DIMS = 5

#: Triton launch option: no fused multiply-add, so a*b + c rounds twice like PyTorch's two kernels.
NO_FMA = {"enable_fp_fusion": False}


def tensor_split_qr(sizes: Sequence[int]) -> Optional[tuple[int, int]]:
    """``(q, rem)`` when ``sizes`` is the tensor_split layout of its sum over ``len(sizes)`` parts
    (the first ``rem`` pieces one larger), else None (the kernels then leave it to PyTorch)."""
    P = len(sizes)
    q, rem = divmod(sum(sizes), P)
    return (q, rem) if list(sizes) == [q + 1] * rem + [q] * (P - rem) else None


def canonical(t: torch.Tensor, dim: int) -> Optional[tuple[torch.Tensor, int]]:
    """``(t5, dim5)``: ``t`` as a 5-D view in units (see the module docstring), or None when the
    kernels cannot take it (more than 5 dims, elements wider than 8 bytes)."""
    if t.dim() > MAX_DIMS or t.element_size() not in _UNITS:
        return None
    lead = MAX_DIMS - t.dim()
    t5 = t.view(_UNITS[t.element_size()])
    for _ in range(lead):
        t5 = t5.unsqueeze(0)
    dim5 = dim + lead
    if dim5 != MAX_DIMS - 1:   # the last dim is whole in every piece: widen the unit along it
        for nbytes in (8, 4, 2):
            if nbytes <= t5.element_size():
                break
            try:
                return t5.view(_UNITS[nbytes]), dim5
            except RuntimeError:   # strides or offset not a multiple of the wider unit
                continue
    return t5, dim5


def tile(n: Sequence[int], dim: int, q: int, rem: int) -> tuple[int, int, int, int]:
    """Pinned tile of the copy kernels: ``(BR, BC, rows, cols)`` with ``rows`` / ``cols`` the largest
    piece's rows (dims 0-3) and last-dim length. BC: the widest power of two <= 256 dividing cols
    (else the next power of two, capped at 256); BR: 4096 units per tile in all."""
    big = q + (1 if rem else 0)
    sizes = [big if k == dim else n[k] for k in range(MAX_DIMS)]
    rows = sizes[0] * sizes[1] * sizes[2] * sizes[3]
    cols = sizes[4]
    bc = next((b for b in (256, 128, 64, 32) if cols % b == 0), None) or min(256, _pow2(cols))
    br = min(_pow2(rows), max(1, 4096 // bc))
    return br, bc, rows, cols


def scan_tile(rows: int, cols: int) -> tuple[int, int]:
    """Pinned tile of the scan update: BC = min(128, next power of two of cols), 2048 elements in all."""
    bc = min(128, _pow2(cols))
    return min(_pow2(rows), max(1, 2048 // bc)), bc


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
