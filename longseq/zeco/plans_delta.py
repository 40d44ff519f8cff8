"""Make a Gated DeltaNet (or hybrid) model sequence-parallel from outside the model.

The model (:class:`longseq.models.gdn.GDNForCausalLM`) has three pluggable ops (its docstring):
``delta_fn`` of every delta-rule layer becomes :func:`zeco.sp_delta_rule` (``method``), ``halo_fn``
becomes :func:`longseq.functional.gather_halo` (the short convolutions read the ``W-1`` tokens before
the piece from the previous ranks), and ``attn_fn`` of every softmax-attention layer becomes Ulysses
(:func:`longseq.sp.ulysses.ulysses_attention`) or ring attention (:func:`longseq.sp.ring.ring_attention`).
One layout for the whole model: every rank holds its contiguous piece of the sequence
(``tensor_split`` sizes, :func:`zeco.shard_sequence`), so no re-layout happens between layers. Data and
loss as for GLA (:mod:`zeco.plans`: ``shard_sequence``, ``shift_labels``, ``sp_lm_loss``).

Per layer and step the ledger shows the method's state traffic (:mod:`zeco.sp_delta`), three halo
exchanges of ``(W-1)·D`` per rank boundary each way (tag ``zeco.halo``, point to point), and for attention
layers Ulysses' four all-to-alls (``ulysses.*``) or ring's k/v passes (``ring.*``), plus one tiny
all-gather of the piece lengths (``ulysses.sizes`` / ``ring.sizes``: the public primitives take
contiguous pieces of any lengths, :mod:`longseq.sp.pieces`).
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import torch

from longseq.functional import gather_halo
from longseq.sp.ring import ring_attention
from longseq.sp.ulysses import ulysses_attention

from .sp_delta import DELTA_METHODS, sp_delta_rule

__all__ = ["parallelize", "ATTENTION_METHODS"]

ATTENTION = {"ulysses": ulysses_attention, "ring": ring_attention}   # contiguous pieces of any lengths
ATTENTION_METHODS = tuple(ATTENTION)
_SAVED = "_zeco_serial_ops"


def parallelize(model: torch.nn.Module, group: Any, *, method: str = "zeco", attention: str = "ulysses",
                num_blocks: Optional[int] = None, check: Any = True) -> torch.nn.Module:
    """Swap the model's pluggable ops (module docstring) in place over ``group`` (a process group or a
    :class:`longseq.ParallelGroups`); returns the model. ``method``: of the delta-rule layers
    (:data:`zeco.sp_delta.DELTA_METHODS`); ``attention``: ``"ulysses"`` or ``"ring"``."""
    group = group.sp_group if hasattr(group, "sp_group") else group
    if method not in DELTA_METHODS:
        raise ValueError(f"parallelize: method must be one of {DELTA_METHODS}, got {method!r}")
    if attention not in ATTENTION_METHODS:
        raise ValueError(f"parallelize: attention must be one of {ATTENTION_METHODS}, got {attention!r}")
    ops = {"delta_fn": functools.partial(sp_delta_rule, group=group, method=method, num_blocks=num_blocks,
                                         check=check),
           "halo_fn": lambda x, h: gather_halo(x, h, group, tag="zeco.halo"),
           "attn_fn": functools.partial(ATTENTION[attention], group=group)}
    n = 0
    for mod in model.modules():
        names = [a for a in ops if a in vars(mod)]
        if names:
            if not hasattr(mod, _SAVED):
                setattr(mod, _SAVED, {a: getattr(mod, a) for a in names})
            for a in names:
                setattr(mod, a, ops[a])
            n += "delta_fn" in names
    if n == 0:
        raise ValueError("parallelize: the model has no module with a `delta_fn` attribute (a delta-rule layer)")
    return model
