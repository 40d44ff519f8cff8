"""FSDP2 (``torch.distributed.fsdp.fully_shard``) over SP x DP: the plan, apart from the models.

Two modes (``apply_fsdp(model, groups, mode)``), after the SP plan was applied:

* ``"full"``: parameters, gradients and optimizer state sharded over every rank of dp x sp
  (``groups.shard_mesh``, 1-D, as torchtitan shards over ``dp_shard x cp``);
* ``"dp"``: sharded over the DP group only (``groups.dp_mesh``), every SP rank of a DP position
  holding the same shard (HSDP-like, with SP ranks as the replicas).

Gradient semantics. Each rank's backward gives its share of the gradient of its SP group's loss
(SP ranks hold different tokens of the same samples), so the shares are summed over SP and the
DP groups' gradients averaged (see :mod:`longseq.grad_sync`). FSDP's reduce-scatter sums over its
shard group and divides by a factor, by default the group's size:

* ``"full"``: the shard group is dp x sp, so the factor is set to ``dp_size``
  (``FSDPModule.set_gradient_divide_factor``): sum over SP and DP, / DP = SP sum, DP mean;
* ``"dp"``: FSDP averages over DP; :meth:`FSDPPlan.finish_gradients` then sums the local shards over
  the SP group (one bucketed all-reduce through ``longseq.comm``, tag ``fsdp.sp``).

FSDP's own all-gathers and reduce-scatters are issued by PyTorch and are not in the ledger.
Mixed precision: ``param_dtype=torch.bfloat16`` gives FSDP2's ``MixedPrecisionPolicy`` (bf16
parameters and compute after the all-gather, gradients reduced in ``reduce_dtype``, float32).
Errors (before any collective): an unknown mode; a model wrapped in DDP or already sharded; groups
without the mesh the mode needs.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Optional, Sequence

import torch
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from .grad_sync import _all_reduce_bucketed
from .groups import ParallelGroups

__all__ = ["FSDP_MODES", "FSDPPlan", "apply_fsdp", "check_fsdp", "grad_norm", "full_tensor", "local_state_bytes"]

FSDP_MODES = ("none", "full", "dp")


@dataclasses.dataclass
class FSDPPlan:
    """What :func:`apply_fsdp` did: the mode, the mesh it sharded over, the FSDP modules (units, root)."""

    mode: str
    groups: ParallelGroups
    mesh: object
    modules: list

    def finish_gradients(self, params: Iterable[nn.Parameter], *, bucket_mb: float = 25.0) -> None:
        """After backward: in ``"dp"`` mode sum the (DP-averaged) gradient shards over the SP group;
        nothing in ``"full"`` mode (FSDP's reduce-scatter already gave SP sum, DP mean)."""
        if self.mode != "dp" or self.groups.sp_size == 1:
            return
        grads = [_local(p.grad) for p in params if p.grad is not None]
        _all_reduce_bucketed(grads, self.groups.sp_group, 1.0, "fsdp.sp", int(bucket_mb * 2**20))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def check_fsdp(model: nn.Module, mode: str, groups: Optional[ParallelGroups] = None) -> None:
    """The checks of :func:`apply_fsdp` that need no collective; ValueError naming the fix."""
    if mode not in FSDP_MODES:
        raise ValueError(f"fsdp mode {mode!r} is not one of {', '.join(FSDP_MODES)}")
    if mode == "none":
        return
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError("FSDP was asked for, but the model is already wrapped in DistributedDataParallel: pass the "
                         "bare module (FSDP2 replaces DDP's gradient all-reduce), or drop fsdp")
    if isinstance(model, FSDPModule):
        raise ValueError("the model is already sharded by fully_shard; apply FSDP once")
    if groups is not None:
        mesh = groups.shard_mesh if mode == "full" else groups.dp_mesh
        if mesh is None:
            raise ValueError(f"fsdp={mode} needs the groups' {'shard_mesh (dp x sp)' if mode == 'full' else 'dp_mesh'}: "
                             "build them with longseq.init_parallel_groups or longseq.from_mesh(mesh, sp_dim=...) "
                             "(groups wrapped from bare process groups carry no mesh)")


def _no_view(t):
    return t.clone() if isinstance(t, torch.Tensor) and t._is_view() and t.requires_grad else t


def _output_not_a_view(module: nn.Module, args, out):
    """A sharded unit's output that is a view (a DSP plan's switch back returns one: a view of the
    all-to-all's receive buffer) becomes a copy. FSDP2 hangs its pre-backward hook on the output's
    autograd node, which an in-place op on a view would replace (the hook lost, the parameters never
    all-gathered for backward); PyTorch warns about every such output. One copy of the unit's output
    per forward; outputs that are not views are returned as they are."""
    if isinstance(out, torch.Tensor):
        return _no_view(out)
    if isinstance(out, (tuple, list)) and any(isinstance(t, torch.Tensor) and t._is_view() for t in out):
        return type(out)(_no_view(t) for t in out)
    return None


def apply_fsdp(model: nn.Module, groups: ParallelGroups, mode: str = "full", *, units: Sequence[nn.Module] = (),
               param_dtype: Optional[torch.dtype] = None, reduce_dtype: torch.dtype = torch.float32,
               reshard_after_forward: bool = True) -> Optional[FSDPPlan]:
    """Shard ``model`` with ``fully_shard``: each of ``units`` (bottom-up, e.g. the transformer
    blocks) then the root; in place. Returns the :class:`FSDPPlan` (None for mode "none").
    Create the optimizer afterwards (its parameters are the DTensor shards)."""
    check_fsdp(model, mode, groups)
    if mode == "none":
        return None
    mesh = groups.shard_mesh if mode == "full" else groups.dp_mesh
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype if param_dtype else None)
    modules = []
    for u in [*units, model]:
        u.register_forward_hook(_output_not_a_view)      # before fully_shard: runs before FSDP's own hook
        fully_shard(u, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
        modules.append(u)
    for m in modules:
        if mode == "full":
            m.set_gradient_divide_factor(float(groups.dp_size))
        if mesh.device_type == "cpu":
            m.set_force_sum_reduction_for_comms(True)    # gloo has no PREMUL_SUM: sum, then divide
    return FSDPPlan(mode, groups, mesh, modules)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor shard (an all-gather over its mesh; every rank must call), or ``t``."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def grad_norm(params: Sequence[nn.Parameter], clip: float = 0.0) -> torch.Tensor:
    """The global gradient norm (of the whole gradients, also when they are DTensor shards), and
    clip to ``clip`` when > 0. Every rank must call it (DTensor norms all-reduce over the mesh)."""
    grads = [p.grad for p in params if p.grad is not None]
    total = full_tensor(torch.nn.utils.get_total_norm(grads))
    if clip and clip > 0:
        torch.nn.utils.clip_grads_with_norm_(params, clip, total)
    return total


def local_state_bytes(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> dict:
    """This rank's bytes of parameters and optimizer state (local shards of DTensors): ``params``,
    ``optim`` (tensors of at least one dim: Adam's moments) and ``optim_scalars`` (0-d tensors such
    as Adam's step, replicated)."""
    out = {"params": sum(_local(p).numel() * p.element_size() for p in model.parameters()),
           "optim": 0, "optim_scalars": 0}
    if optimizer is not None:
        for st in optimizer.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor):
                    v = _local(v)
                    out["optim" if v.dim() else "optim_scalars"] += v.numel() * v.element_size()
    return out
