"""FSDP2's collectives in the cost model: per-layer parameter all-gathers and gradient reduce-scatters.

``fully_shard`` over the flattened dp x sp mesh (W ranks, SP ranks included) keeps 1/W of every
parameter on each rank. Per step, with one FSDP unit per transformer layer plus the root (the
parameters outside the layers: embedding, final norm, head):

* forward: one all-gather of each layer's parameters, in the parameter dtype (bf16 under
  ``MixedPrecisionPolicy(param_dtype=bf16)``), and one of the root's;
* backward: the layer's parameters again (resharded after forward, FSDP2's default; the root is
  not), then one reduce-scatter of its gradients in the reduce dtype (fp32), and one for the root.

Per call a rank sends, in the ledger's conventions (``longseq.ledger``), ``(W-1)/W`` of the unit's
bytes: the all-gather's local shard ``n/W`` to W-1 peers, the reduce-scatter's ``n`` minus the own
chunk. They replace the gradient all-reduce of the replicated run.

Overlap as FSDP2 prefetches (one unit ahead): the all-gather of layer l+1 is issued when layer l
starts (forward) and that of layer l-1 when layer l's backward starts; a reduce-scatter when
layer l's backward has finished. FSDP's collectives run in issue order on one lane (its streams
share the network; priced alone, not slowed by the SP traffic) and each spans all W ranks, so it
starts only once every rank has issued it: a rank cannot start layer l+1 before every rank has
started layer l. That bounds how far layers pipeline across the ranks of an SP chain to one layer.
"""
from __future__ import annotations

import dataclasses

from . import collectives as C
from .topology import Topology

__all__ = ["FsdpCosts", "fsdp_costs", "FsdpLane"]


@dataclasses.dataclass(frozen=True)
class FsdpCosts:
    """One rank's FSDP traffic: ``layer_params`` / ``root_params`` elements, ``world`` = dp x sp."""

    layers: int
    layer_params: int
    root_params: int
    world: int
    param_bytes: int = 2      # all-gather dtype (MixedPrecisionPolicy.param_dtype)
    reduce_bytes: int = 4     # reduce-scatter dtype (MixedPrecisionPolicy.reduce_dtype)

    def _share(self, params: int, nbytes: int) -> float:
        return params * nbytes * (self.world - 1) / self.world

    def all_gather_sent(self, root: bool = False) -> float:
        """Bytes a rank sends in one all-gather of a layer's (or the root's) parameters."""
        return self._share(self.root_params if root else self.layer_params, self.param_bytes)

    def reduce_scatter_sent(self, root: bool = False) -> float:
        """Bytes a rank sends in one reduce-scatter of a layer's (or the root's) gradients."""
        return self._share(self.root_params if root else self.layer_params, self.reduce_bytes)

    @property
    def calls(self) -> dict:
        """Collectives per step: 2 all-gathers a layer (forward, backward) + the root's; one
        reduce-scatter a layer + the root's."""
        return {"all_gather": 2 * self.layers + 1, "reduce_scatter": self.layers + 1}

    @property
    def bytes_per_step(self) -> float:
        """Bytes one rank sends per step in FSDP collectives."""
        return (2 * self.layers * self.all_gather_sent() + self.all_gather_sent(True)
                + self.layers * self.reduce_scatter_sent() + self.reduce_scatter_sent(True))

    def times(self, topo: Topology) -> dict:
        """Seconds of each collective on ``topo`` (ring all-gather / reduce-scatter over W ranks)."""
        W = self.world
        return dict(ag=C.all_gather(topo, W, self.all_gather_sent()),
                    rs=C.reduce_scatter(topo, W, self.reduce_scatter_sent()),
                    root_ag=C.all_gather(topo, W, self.all_gather_sent(True)),
                    root_rs=C.reduce_scatter(topo, W, self.reduce_scatter_sent(True)))


def fsdp_costs(model_config, layer_cls, model_cls, world: int, param_bytes: int, reduce_bytes: int = 4) -> FsdpCosts:
    """:class:`FsdpCosts` of a model (built on the meta device): one unit per ``layer_cls`` layer."""
    import torch
    with torch.device("meta"):
        layer = sum(p.numel() for p in layer_cls(model_config).parameters())
        total = sum(p.numel() for p in model_cls(model_config).parameters())
    L = model_config.num_layers
    return FsdpCosts(L, layer, total - L * layer, world, param_bytes, reduce_bytes)


class FsdpLane:
    """FSDP's collectives in issue order on one lane: each starts when every rank has issued it
    (``max`` of the issue times) and the lane is free; returns its end. ``busy`` sums their time."""

    def __init__(self, times: dict):
        self.t = times
        self.free = 0.0
        self.busy = 0.0

    def run(self, issued: list, what: str) -> float:
        start = max(max(issued), self.free)
        self.free = start + self.t[what]
        self.busy += self.t[what]
        return self.free
