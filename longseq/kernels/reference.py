"""The PyTorch path of the switch's pack / unpack and of All-Scan's block update: the reference the
Triton and CUDA kernels are compared with bit for bit, and the fallback where neither runs.

Wire layout of the switch (``longseq.comm.all_to_all``): the send buffer is the concatenation, in
rank order, of the pieces ``x.narrow(dim, off_j, sizes[j])``, each flattened in ``x``'s own dim
order (C order of the piece), so nothing is moved to the front; the received buffer is the same
concatenation of the pieces of the output along the gathered dim.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

__all__ = ["pack", "unpack", "scan_update"]


def _piece_shape(shape: Sequence[int], dim: int, size: int) -> list[int]:
    s = list(shape)
    s[dim] = size
    return s


def pack(x: torch.Tensor, dim: int, sizes: Sequence[int]) -> torch.Tensor:
    """``x`` (any strides) -> 1-D buffer of ``x.numel()`` elements: piece j (``sizes[j]`` along
    ``dim``, consecutive) in C order, the pieces in order. One copy per piece, no concatenation."""
    out = torch.empty(x.numel(), dtype=x.dtype, device=x.device)
    start = off = 0
    for s in sizes:
        shape = _piece_shape(x.shape, dim, s)
        n = math.prod(shape)
        out[start:start + n].view(shape).copy_(x.narrow(dim, off, s))
        start, off = start + n, off + s
    return out


def unpack(buf: torch.Tensor, shape: Sequence[int], dim: int, sizes: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`pack`: a contiguous tensor of ``shape`` whose piece i along ``dim``
    (``sizes[i]``, consecutive) is chunk i of the 1-D ``buf`` viewed in that piece's shape."""
    out = torch.empty(tuple(shape), dtype=buf.dtype, device=buf.device)
    start = off = 0
    for s in sizes:
        piece = _piece_shape(shape, dim, s)
        n = math.prod(piece)
        out.narrow(dim, off, s).copy_(buf[start:start + n].view(piece))
        start, off = start + n, off + s
    return out


def scan_update(out: torch.Tensor, inp: Optional[torch.Tensor], local: torch.Tensor,
                decay: Optional[torch.Tensor]) -> torch.Tensor:
    """One block of All-Scan's ``out = diag(decay) · inp + local``, written into ``out``.

    ``out``: ``[rows, C]`` contiguous (the next send buffer; its dtype is the scan's); ``inp``:
    ``[rows, C]`` received block or ``None`` (zero input); ``local``: ``[rows, C]``, any floating
    dtype (cast to ``out.dtype``); ``decay``: ``[rows, 1]`` column or ``None`` (no decay). Rounding:
    the product is rounded, then the sum (two operations, no fused multiply-add), as the kernels do.
    """
    if inp is None:
        return out.copy_(local)
    if decay is None:
        torch.add(inp.to(out.dtype), local.to(out.dtype), out=out)
        return out
    torch.mul(decay.to(out.dtype), inp.to(out.dtype), out=out)
    return out.add_(local.to(out.dtype))
