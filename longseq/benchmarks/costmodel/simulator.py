"""Step time of one training step of a method on P devices: compute + ledger-priced communication.

Inputs: the ledger rows of the method at the target shape (:mod:`.ledger`: captured from the real
code and scaled), the per-rank compute in seconds (:mod:`.compute`), a :class:`~.topology.Topology`.
What overlaps with what follows the code of each method (nothing is assumed to overlap that the
code does not overlap), with one switch for the gradient all-reduce (``grad_sync``), which longseq
runs after backward (``"serial"``) while DDP-style trainers, the papers' included, overlap it with
backward (``"overlap"``: only the part longer than the backward compute, and at least the last
bucket, is exposed), or ``"off"``.

**ST-DiT methods** are symmetric across ranks: every collective is a synchronisation point of equal
work, so the step is ``compute + Σ collectives`` (all-to-alls, all-gathers, reduce-scatters,
all-reduces as issued). Point-to-point rows (ring attention, and the ring part of USP) are the k/v
blocks that travel while the rank computes the attention of the block it holds: their time hides
under the attention kernels' time except the first block's, so the exposed part is
``max(0, t_p2p - t_attn·(P-1)/P)``.

**GLA methods** are simulated rank by rank (:func:`gla_timeline`), layer by layer, forward then
backward, because their chains are not symmetric: ZeCO's All-Scan relays N blocks down the chain
on a helper thread while each rank runs its zero-initial-state GLA kernel (overlap), LASP-1 blocks
on the whole state from its predecessor before its kernel, LASP-2 all-gathers (a synchronisation
point) before its kernel. Layers pipeline across ranks when nothing else synchronises them: rank i
can be in layer l+1 while rank i+1 still waits for layer l. The loss all-reduce synchronises all
ranks between forward and backward.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from . import collectives as C
from .compute import GlaCompute, StditCompute
from .fsdp import FsdpCosts, FsdpLane
from .ledger import Row, is_grad_sync
from .topology import Topology

__all__ = ["Estimate", "stdit_estimate", "gla_estimate", "gla_timeline", "grad_sync_exposed", "GRAD_SYNC_MODES"]

GRAD_SYNC_MODES = ("serial", "overlap", "off")


@dataclasses.dataclass
class Estimate:
    method: str
    P: int
    step_s: float
    compute_s: float           # the slowest rank's own work
    comm_s: float              # the SP collectives' priced time (before overlap), critical rank
    exposed_s: float           # step - compute: what communication adds
    grad_sync_s: float         # the gradient all-reduce's priced time (before overlap)
    sp_bytes: int              # bytes one rank sends per step in SP collectives (max over ranks)
    breakdown: dict = dataclasses.field(default_factory=dict)

    def tokens_per_s(self, tokens: int) -> float:
        return tokens / self.step_s


def _row_time(topo: Topology, r: Row, P: int) -> float:
    if r.calls == 0:
        return 0.0
    return C.price(topo, r.op, r.group_size, r.bytes_sent / r.calls, r.calls, stride=getattr(r, "stride", 1) or 1)


def grad_sync_exposed(t_gs: float, calls: int, bwd: float, mode: str) -> float:
    if mode not in GRAD_SYNC_MODES:
        raise ValueError(f"grad_sync must be one of {GRAD_SYNC_MODES}, got {mode!r}")
    if mode == "off" or t_gs <= 0:
        return 0.0
    if mode == "serial":
        return t_gs
    return max(t_gs - bwd, t_gs / max(calls, 1))


def _sp_bytes(rows: Sequence[Row]) -> int:
    return sum(r.bytes_sent for r in rows if not is_grad_sync(r.tag))


# ----------------------------------------------------------------------------------------------
# ST-DiT (symmetric)
# ----------------------------------------------------------------------------------------------
def stdit_estimate(method: str, P: int, rows: Sequence[Row], comp: StditCompute, topo: Topology,
                   grad_sync: str = "overlap") -> Estimate:
    """``rows``: one rank's rows (all ranks alike); ``comp``: its compute in seconds."""
    serial = p2p = gs = 0.0
    gs_calls = 0
    bd: dict = {}
    for r in rows:
        t = _row_time(topo, r, P)
        if is_grad_sync(r.tag):
            gs += t
            gs_calls += r.calls
            continue
        bd[f"{r.op} {r.tag}"] = bd.get(f"{r.op} {r.tag}", 0.0) + t
        if r.op in ("send", "recv"):
            p2p += t
        else:
            serial += t
    hidden_window = (comp.attn_fwd + comp.attn_bwd) * (P - 1) / P if P > 1 else 0.0
    exposed_p2p = max(0.0, p2p - hidden_window)
    exposed_gs = grad_sync_exposed(gs, gs_calls, comp.bwd, grad_sync)
    step = comp.total + serial + exposed_p2p + exposed_gs
    return Estimate(method, P, step, comp.total, serial + p2p, step - comp.total, gs, _sp_bytes(rows), bd)


# ----------------------------------------------------------------------------------------------
# GLA (rank by rank)
# ----------------------------------------------------------------------------------------------
def _per_layer(rows: Sequence[Row], suffix: str, L: int) -> tuple[Optional[str], int, float, int]:
    """(op, calls per layer, bytes sent per layer, group size) of the per-layer exchange rows whose
    tag ends in ``suffix`` (".fwd" / ".bwd"), summed over send-type ops; (None, 0, 0, 0) if none."""
    op, calls, nbytes, g = None, 0, 0, 0
    for r in rows:
        if not _is_exchange(r) or not r.tag.endswith(suffix):
            continue
        if r.op == "recv":
            op = op or "send"
            g = r.group_size
            continue
        op, g = r.op, r.group_size
        calls += r.calls
        nbytes += r.bytes_sent
    if op is None:
        return None, 0, 0.0, 0
    return op, calls // L if calls else 0, nbytes / L, g


def _is_exchange(r: Row) -> bool:
    """A per-layer state exchange (a chain's messages or LASP-2's all-gather, tags ``*.fwd`` /
    ``*.bwd``); anything else (all-to-alls, halos, the loss) is a synchronisation point of the step."""
    return (not is_grad_sync(r.tag) and r.tag.endswith((".fwd", ".bwd"))
            and r.op in ("send", "recv", "all_gather"))


def _exchange(rows_by_rank: dict, suffix: str, L: int, P: int) -> tuple[Optional[str], int, float]:
    """The per-layer exchange of one direction: op, blocks per layer, state bytes per layer (taken
    from the rank that sends: rank 0 forward, rank P-1 backward; all ranks for collectives)."""
    best = (None, 0, 0.0)
    for rk, rows in rows_by_rank.items():
        op, calls, nbytes, _ = _per_layer(rows, suffix, L)
        if op is None:
            continue
        if nbytes > best[2] or best[0] is None:
            best = (op, calls, nbytes)
    return best


def gla_timeline(method: str, P: int, L: int, comps: Sequence[GlaCompute], topo: Topology, *,
                 fwd: tuple, bwd: tuple, step_rows: Sequence[Row] = (), update_s: float = 0.0,
                 layer_barrier: bool = False, fsdp: Optional[dict] = None, overlap: bool = True) -> dict:
    """Simulate one step rank by rank. ``comps[i]``: rank i's compute (seconds); ``fwd`` / ``bwd``:
    (op, blocks per layer, state bytes per layer) of the per-layer exchange. Returns per-rank end
    times of forward and backward and the waiting each rank did.

    ``layer_barrier``: all ranks synchronise after every layer (no pipelining of layers across
    ranks): the accounting of the ZeCO paper, in which a chain's full latency is paid per layer.
    ``fsdp``: the seconds of FSDP2's collectives (:meth:`.fsdp.FsdpCosts.times`), scheduled as
    :mod:`.fsdp` describes (prefetch one layer ahead; each waits for every rank to issue it).
    ``overlap=False``: ZeCO without overlap (each rank waits for the pipelined scan, then runs its
    kernel), as ``sp_gla(overlap=False)``."""
    fit = topo.fit("p2p", P)          # a measured point-to-point line for this group size, if any
    links = [fit or topo.link(i, i + 1) for i in range(P - 1)]
    rlinks = [fit or topo.link(i + 1, i) for i in range(P - 1)][::-1]
    t = [0.0] * P
    waited = [0.0] * P

    def exchange(direction: tuple, gla: list, before: list, after: list, reverse: bool) -> None:
        op, N, sbytes = direction
        ready = [t[i] + before[i] for i in range(P)]
        if P == 1 or op is None:
            for i in range(P):
                t[i] = ready[i] + gla[i] + after[i]
            return
        if op == "all_gather":
            start = max(ready)
            end = start + C.all_gather(topo, P, sbytes)
            for i in range(P):
                waited[i] += end - ready[i]
                t[i] = end + gla[i] + after[i]
            return
        order = list(range(P)) if not reverse else list(range(P - 1, -1, -1))
        rd = [ready[i] for i in order]
        arr = C.pipelined_chain(links if not reverse else rlinks, sbytes, max(N, 1), rd, update_s)
        arrive = {order[k]: arr[k] for k in range(P)}
        sent = {order[k]: arr[k + 1] for k in range(P - 1)}          # its last block reached the next rank
        for k, i in enumerate(order):
            if method == "zeco" and overlap:
                # scan on a helper thread while the local kernel runs; wait for both
                local_end = ready[i] + gla[i]
                done = max(local_end, arrive[i], sent.get(i, -1.0))
                waited[i] += done - local_end
                t[i] = done + after[i]
            else:
                # LASP-1: receive the whole state, send it on (blocking), then the kernel
                got = max(arrive[i], ready[i])
                done = max(got, sent.get(i, -1.0))
                waited[i] += done - ready[i]
                t[i] = done + gla[i] + after[i]

    zeco = method == "zeco" and overlap
    lane = FsdpLane(fsdp) if fsdp else None

    def gate(until: float) -> None:
        """Every rank waits for an FSDP all-gather that ends at ``until``."""
        for i in range(P):
            if t[i] < until:
                waited[i] += until - t[i]
                t[i] = until

    def layers(times, other, kernel, extra, reverse):
        """L layers: half the other work, the GLA exchange (ZeCO splits its extra work around the
        kernel), the other half; all ranks meet after each layer with ``layer_barrier``. Under FSDP
        a layer starts once its parameters are gathered (prefetched as the previous layer started)
        and, in backward, its gradients are reduce-scattered once every rank has finished it."""
        nxt = lane.run(t, "ag") if lane else 0.0
        for layer in range(L):
            if lane:
                gate(nxt)
                if layer + 1 < L:
                    nxt = lane.run(t, "ag")
            for i in range(P):
                t[i] += other[i] / 2
            exchange(times, kernel, [e / 2 if zeco else e for e in extra],
                     [e / 2 if zeco else 0.0 for e in extra], reverse=reverse)
            for i in range(P):
                t[i] += other[i] / 2
            if layer_barrier:
                t[:] = [max(t)] * P
            if lane and reverse:
                lane.run(t, "rs")

    if lane:
        gate(lane.run(t, "root_ag"))
    layers(fwd, [c.other_fwd for c in comps], [c.gla_fwd for c in comps], [c.extra_fwd for c in comps], False)
    for i in range(P):
        t[i] += comps[i].head_fwd
    fwd_end = list(t)
    # the loss (and anything else issued once a step): a synchronisation of all ranks
    sync = max(t) + sum(_row_time(topo, r, P) for r in step_rows)
    for i in range(P):
        waited[i] += sync - t[i]
        t[i] = sync + comps[i].head_bwd
    layers(bwd, [c.other_bwd for c in comps], [c.gla_bwd for c in comps], [c.extra_bwd for c in comps], True)
    if lane:
        lane.run(t, "root_rs")
        gate(lane.free)            # the optimizer step needs every gradient shard
    return {"fwd_end": fwd_end, "end": list(t), "waited": waited, "fsdp_s": lane.busy if lane else 0.0}


def gla_estimate(method: str, P: int, rows_by_rank: dict, comp_of_rank, L: int, topo: Topology,
                 grad_sync: str = "overlap", layer_barrier: bool = False, fsdp: Optional[FsdpCosts] = None,
                 overlap: bool = True) -> Estimate:
    """``rows_by_rank``: rows of the role ranks (0, 1, P-1); ``comp_of_rank(i)`` -> GlaCompute (s).
    ``fsdp``: parameters sharded by FSDP2 (its collectives replace the gradient all-reduce)."""
    comps = [comp_of_rank(i) for i in range(P)]
    fwd = _exchange(rows_by_rank, ".fwd", L, P)
    bwd = _exchange(rows_by_rank, ".bwd", L, P)
    rows0 = rows_by_rank[0]
    step_rows = [r for r in rows0 if not is_grad_sync(r.tag) and not _is_exchange(r)
                 and r.op not in ("send", "recv")]
    sim = gla_timeline(method, P, L, comps, topo, fwd=fwd, bwd=bwd, step_rows=step_rows, layer_barrier=layer_barrier,
                       fsdp=fsdp.times(topo) if fsdp else None, overlap=overlap)
    end = max(sim["end"])
    gs_rows = [] if fsdp else [r for r in rows0 if is_grad_sync(r.tag)]
    gs = sum(_row_time(topo, r, P) for r in gs_rows)
    bwd_time = L * (comps[0].other_bwd + comps[0].gla_bwd + comps[0].extra_bwd) + comps[0].head_bwd
    exposed_gs = grad_sync_exposed(gs, sum(r.calls for r in gs_rows), bwd_time, grad_sync)
    step = end + exposed_gs
    compute = max(c.total for c in comps)
    comm = 0.0
    for direction in (fwd, bwd):
        op, N, sb = direction
        if op == "all_gather":
            comm += L * C.all_gather(topo, P, sb)
        elif op is not None:
            comm += L * C.chain_closed_form(P, sb, max(N, 1), topo.inter if topo.spans_nodes(P) else topo.intra)
    comm += sum(_row_time(topo, r, P) for r in step_rows)
    sp_bytes = max(_sp_bytes(rows) for rows in rows_by_rank.values())
    bd = {"waited_max_s": max(sim["waited"]), "fwd": fwd, "bwd": bwd, "fsdp_s": sim["fsdp_s"],
          "fsdp_bytes": fsdp.bytes_per_step if fsdp else 0}
    return Estimate(method, P, step, compute, comm, step - compute, gs, sp_bytes, bd)
