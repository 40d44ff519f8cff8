"""Per-rank sequence lengths of the SP attention primitives (contiguous pieces of any sizes).

Every contiguous-layout primitive (:func:`longseq.sp.ulysses_attention`, :func:`longseq.sp.ring_attention`,
:func:`longseq.sp.usp_attention`) works on rank r's piece ``[B, L_r, H, D]`` of one sequence, the
pieces in rank order; the lengths ``L_0 .. L_{P-1}`` may be anything (a rank may hold more than its
``tensor_split`` share: pieces cut at document or frame boundaries). The caller says them one of three ways:

* ``seq_sizes=[L_0, ..., L_{P-1}]``: every rank's length (no communication; must be the same list on
  every rank and ``seq_sizes[r]`` this rank's length);
* ``seq_len=L``: the ``torch.tensor_split`` pieces of ``L`` (the first ``L % P`` ranks one longer);
* neither: each rank's own length is learned with one all-gather of one int64 per rank (ledger tag
  ``<tag>.sizes``). Under ``torch.compile`` (no Python-int collective in a graph) the pieces are
  assumed equal instead: pass ``seq_sizes`` there for uneven pieces.

:func:`piece_sizes` implements this; it is the single place the primitives learn the pieces, so a
later extension (e.g. document boundaries inside the pieces) has one list of sizes to build on.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from longseq import comm
from longseq.sharding import split_sizes

__all__ = ["piece_sizes", "given_sizes"]


def given_sizes(local: int, P: int, r: int, *, seq_len: Optional[int] = None,
                seq_sizes: Optional[Sequence[int]] = None, what: str = "attention") -> Optional[list[int]]:
    """The pieces' lengths the caller gave (``seq_sizes``, or ``seq_len``'s ``tensor_split`` sizes),
    checked against this rank's ``local`` length (``ValueError`` naming the fix); ``None`` when
    neither was given. Pure: no communication."""
    if seq_sizes is not None:
        sizes = [int(n) for n in seq_sizes]
        if len(sizes) != P:
            raise ValueError(f"{what}: seq_sizes {sizes} must have one entry per rank ({P})")
        if seq_len is not None and int(seq_len) != sum(sizes):
            raise ValueError(f"{what}: seq_len={seq_len} but seq_sizes {sizes} sum to {sum(sizes)}; pass one")
        where = f"seq_sizes {sizes}"
    elif seq_len is not None:
        sizes = split_sizes(int(seq_len), P)
        where = f"seq_len={seq_len} (tensor_split sizes {sizes})"
    else:
        return None
    if min(sizes) < 0 or sizes[r] != local:
        raise ValueError(f"{what}: this rank ({r} of {P}) holds {local} tokens, but {where} gives it "
                         f"{sizes[r]}: pass every rank's own length as seq_sizes, or neither seq_len nor "
                         f"seq_sizes to learn them")
    return sizes


def piece_sizes(local: int, group: Any, *, seq_len: Optional[int] = None, seq_sizes: Optional[Sequence[int]] = None,
                tag: str, what: str = "attention") -> list[int]:
    """Every rank's piece length, in rank order (module docstring): the given sizes (checked by
    :func:`given_sizes`), else one all-gather of ``local`` (tag ``<tag>.sizes``; every rank of
    ``group`` must call it), else under ``torch.compile`` ``[local] * P``."""
    P, r = comm.group_size(group), comm.group_rank(group)
    sizes = given_sizes(local, P, r, seq_len=seq_len, seq_sizes=seq_sizes, what=what)
    if sizes is not None:
        return sizes
    if P == 1 or torch.compiler.is_compiling():
        return [int(local)] * P
    return comm.all_gather_int(int(local), group, tag=f"{tag}.sizes")
