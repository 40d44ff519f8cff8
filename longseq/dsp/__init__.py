"""DSP: Dynamic Sequence Parallelism for multi-dimensional transformers.

Primitives (autograd-correct, every collective through the ledger, uneven sizes as tensor_split):
``switch`` (one all-to-all that moves the sharded dimension), ``shard`` and ``gather``.
Plans: ``parallelize(model, group, plan=None)`` applies a declarative :class:`Plan` (default
``plans.STDIT_PLAN``; layouts with folded dims, several inputs, size arguments, structured outputs,
:class:`Extension` for the rest: :mod:`dsp.plan`) with hooks and returns a handle whose ``remove()`` undoes it;
``sharded_mse_loss`` and ``shard_target`` compute a loss without gathering the output;
``check_plan`` compares a plan with one process on a sample, stage by stage. Stage kinds for
full-3D attention (:mod:`dsp.full_attention`), halos and statistics (:mod:`dsp.stages`).
See docs/dsp.md.
"""
from . import plans
from .loss import sharded_mse_loss
from .full_attention import Joint, sequence_attention
from .plan import (Boundary, Call, DSPHandle, Extension, Plan, PlanError, Stage, as_plan, check_plan, offset_positions,
                   parallelize, shard_target)
from .plans import STDIT_PLAN
from .primitives import check_agree, gather, shard, switch, unchecked

__all__ = [
    "switch", "shard", "gather", "unchecked", "check_agree", "parallelize", "DSPHandle", "Plan", "Stage", "Boundary",
    "as_plan",
    "STDIT_PLAN", "plans", "sharded_mse_loss", "shard_target", "Extension", "Call", "PlanError", "offset_positions",
    "check_plan", "Joint", "sequence_attention",
]
