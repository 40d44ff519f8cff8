"""Triton kernels: the switch's pack / unpack in one launch each, and All-Scan's fused block update.

Imported only when the Triton backend runs (``longseq.kernels``). ``TRITON_INTERPRET=1`` must be set
before this module is first imported for the kernels to run on CPU tensors (Triton's interpreter).
Configs are pinned (no autotuning): a tile of ``BR`` rows by ``BC`` units of the last dim, chosen
from the shape alone, so a first call compiles once and never benchmarks configurations.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import layout

__all__ = ["copy_pieces", "scan_update"]


@triton.jit
def _copy_pieces_kernel(strided, flat, n0, n1, n2, n3, n4, s0, s1, s2, s3, s4, q, rem, other,
                        DIM: tl.constexpr, PACK: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """Piece j = program_id(2) of a tensor_split along DIM of the 5-D ``strided`` view (sizes
    n0..n4, strides s0..s4, in units): rows (dims 0-3) x cols (dim 4). PACK: strided -> flat
    (piece j at flat offset off_j * other); else flat -> strided."""
    j = tl.program_id(2).to(tl.int64)
    size = q + (j < rem).to(tl.int64)
    off = j * q + tl.minimum(j, rem)
    if DIM == 0:
        n0 = size
    if DIM == 1:
        n1 = size
    if DIM == 2:
        n2 = size
    if DIM == 3:
        n3 = size
    if DIM == 4:
        n4 = size
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BC + tl.arange(0, BC).to(tl.int64)
    i3 = rows % n3
    t = rows // n3
    i2 = t % n2
    t = t // n2
    i1 = t % n1
    i0 = t // n1
    if DIM == 0:
        i0 += off
    if DIM == 1:
        i1 += off
    if DIM == 2:
        i2 += off
    if DIM == 3:
        i3 += off
    c = cols
    if DIM == 4:
        c = cols + off
    row_off = i0 * s0 + i1 * s1 + i2 * s2 + i3 * s3
    s_off = row_off[:, None] + (c * s4)[None, :]
    f_off = off * other + rows[:, None] * n4 + cols[None, :]
    mask = (rows < n0 * n1 * n2 * n3)[:, None] & (cols < n4)[None, :]
    if PACK:
        tl.store(flat + f_off, tl.load(strided + s_off, mask=mask), mask=mask)
    else:
        tl.store(strided + s_off, tl.load(flat + f_off, mask=mask), mask=mask)


def copy_pieces(strided, flat, dim: int, q: int, rem: int, parts: int, pack: bool) -> None:
    """Launch the pack (``strided`` -> ``flat``) or unpack (``flat`` -> ``strided``) kernel over the
    ``parts`` pieces of ``strided`` (5-D, unit dtype) along ``dim``; see :mod:`longseq.kernels.layout`."""
    n, s = strided.shape, strided.stride()
    br, bc, rows, cols = layout.tile(n, dim, q, rem)
    other = strided.numel() // n[dim]
    grid = (triton.cdiv(rows, br), triton.cdiv(cols, bc), parts)
    _copy_pieces_kernel[grid](strided, flat, *n, *s, q, rem, other, DIM=dim, PACK=pack, BR=br, BC=bc,
                              num_warps=4)


@triton.jit
def _scan_update_kernel(out, inp, local, decay, rows, cols, HAS_INP: tl.constexpr, HAS_DECAY: tl.constexpr,
                        BR: tl.constexpr, BC: tl.constexpr):
    """out[r, c] = decay[r] * inp[r, c] + local[r, c] (product rounded, then the sum), in out's dtype."""
    r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR).to(tl.int64)
    c = tl.program_id(1).to(tl.int64) * BC + tl.arange(0, BC).to(tl.int64)
    mask = (r < rows)[:, None] & (c < cols)[None, :]
    offs = r[:, None] * cols + c[None, :]
    dt = out.dtype.element_ty
    acc = tl.load(local + offs, mask=mask).to(dt)
    if HAS_INP:
        x = tl.load(inp + offs, mask=mask).to(dt)
        if HAS_DECAY:
            x = tl.load(decay + r, mask=r < rows).to(dt)[:, None] * x
        acc = x + acc
    tl.store(out + offs, acc, mask=mask)


def scan_update(out, inp, local, decay) -> None:
    """Fused All-Scan block update (see :func:`longseq.kernels.reference.scan_update`), launched on
    the current stream (All-Scan's side stream on CUDA); fp contraction is off, so the rounding is
    that of the separate multiply and add of the PyTorch path."""
    rows, cols = out.shape
    br, bc = layout.scan_tile(rows, cols)
    grid = (triton.cdiv(rows, br), triton.cdiv(cols, bc))
    _scan_update_kernel[grid](out, inp if inp is not None else out, local, decay if decay is not None else out,
                              rows, cols, HAS_INP=inp is not None, HAS_DECAY=decay is not None, BR=br, BC=bc,
                              num_warps=4, **layout.NO_FMA)
