"""Sequence-parallel attention methods and their per-model plans: the single-dimension baselines
that DSP is measured against, applied fairly to the same models.

Attention-level primitives (flash-attn layout ``[B, L, H, D]``, this rank's piece of the sequence,
every collective through ``longseq.comm`` and so the ledger, autograd-correct):

* :func:`ulysses_attention` (DeepSpeed-Ulysses): all-to-all q, k, v sequence -> heads, attend,
  all-to-all back; P must divide the heads.
* :func:`ring_attention`: k, v around the ring in P-1 overlapped steps, log-sum-exp merge in float32,
  hand-written backward passing dk, dv around the ring; non-causal and causal, with the zigzag
  layout (:func:`zigzag_shard` / :func:`zigzag_unshard`) for causal load balance.
* :func:`megatron_sp_self_attention` (Megatron-SP): all-gather the sequence, heads split TP-style
  over replicated weights, reduce-scatter after.
* :func:`usp_attention` (USP, Ulysses x Ring) over :func:`init_usp_groups`.

Plans: ``parallelize(model, group, method=...)`` with method ``"dsp"`` (delegates to
``dsp.parallelize``), ``"ulysses"``, ``"ring"``, ``"megatron_sp"`` or ``"usp"``; see
:mod:`longseq.sp.plans` and docs/baselines.md.
"""
from .megatron_sp import gather_sequence, megatron_sp_self_attention, scatter_sequence
from .plans import METHODS, PLANS, SINGLE_DIM_METHODS, STDIT_SP_PLAN, SPHandle, SPPlan, block_volume, parallelize
from .ring import ring_attention, zigzag_indices, zigzag_shard, zigzag_unshard
from .ulysses import ulysses_attention
from .usp import USPGroups, init_usp_groups, usp_attention, usp_zigzag_shard, usp_zigzag_unshard

__all__ = [
    "parallelize", "METHODS", "SINGLE_DIM_METHODS", "PLANS", "STDIT_SP_PLAN", "SPPlan", "SPHandle", "block_volume",
    "ulysses_attention", "ring_attention", "zigzag_shard", "zigzag_unshard", "zigzag_indices",
    "megatron_sp_self_attention", "gather_sequence", "scatter_sequence",
    "usp_attention", "USPGroups", "init_usp_groups", "usp_zigzag_shard", "usp_zigzag_unshard",
]
