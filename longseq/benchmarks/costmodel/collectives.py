"""Alpha-beta costs of the collectives longseq issues, on a :class:`~.topology.Topology`.

Every function takes the group size ``P`` (ranks ``start .. start+P-1``) and the bytes one rank
*sends* in one call, as the ledger records them (``longseq.ledger`` conventions), and returns
seconds for that call. A topology ``fit`` for (op, P) replaces the algorithm by its measured line.

* all-to-all: a rank sends ``b = sent/(P-1)`` to each peer, all at once (NCCL groups the P-1
  sends): its node-local peers over the intra-node link, the others over its NIC; the two proceed
  concurrently: ``max(α_intra + n_local·b/β_intra, α_inter + n_remote·b/β_inter)``.
* ring all-gather / reduce-scatter: P-1 steps; in each, every rank passes one chunk
  (``sent/(P-1)``) to its ring neighbour; a step lasts as long as the slowest hop: the inter-node
  link when the group spans nodes. ``(P-1)·(α + chunk/β)``.
* all-reduce: the faster of ring (reduce-scatter + all-gather, ``2(P-1)·(α + (n/P)/β)``, the
  ledger's ``sent = 2n(P-1)/P``) and a double binary tree (``2·log2(P)·α + 2·n/β``), as NCCL
  picks by size.
* send / recv: ``α + n/β`` of the link between the two ranks.
* :func:`pipelined_chain`: All-Scan / LASP-1's relay, block by block (see its docstring);
  homogeneous links give ``(P-1 + N-1)·(α + s/(N·β))`` for the last rank (:func:`chain_closed_form`).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

from .topology import Link, Topology

__all__ = ["all_to_all", "all_gather", "reduce_scatter", "all_reduce", "p2p", "ring_step", "price",
           "pipelined_chain", "chain_closed_form"]


def _fit(topo: Topology, op: str, P: int, nbytes: float) -> Optional[float]:
    f = topo.fit(op, P)
    return None if f is None else f.alpha + nbytes / f.bw


def all_to_all(topo: Topology, P: int, sent: float, rank: int = 0, start: int = 0, stride: int = 1) -> float:
    if P <= 1 or sent <= 0:
        return 0.0
    t = _fit(topo, "all_to_all", P, sent)
    if t is not None:
        return t
    b = sent / (P - 1)
    local, remote = topo.peers(P, rank, start, stride)
    t_in = topo.intra.alpha + local * b / topo.intra.bw if local else 0.0
    t_out = topo.inter.alpha + remote * b / topo.inter.bw if remote else 0.0
    return max(t_in, t_out)


def ring_step(topo: Topology, P: int, chunk: float, start: int = 0, stride: int = 1) -> float:
    """One step of a ring over the group: every rank sends ``chunk`` bytes to the next."""
    link = topo.inter if topo.spans_nodes(P, start, stride) else topo.intra
    return link.alpha + chunk / link.bw


def _ring_collective(op: str, topo: Topology, P: int, sent: float, start: int, stride: int) -> float:
    """A fitted time for ``op`` when the topology has one, else P-1 ring steps of sent/(P-1) bytes."""
    if P <= 1 or sent <= 0:
        return 0.0
    t = _fit(topo, op, P, sent)
    if t is not None:
        return t
    return (P - 1) * ring_step(topo, P, sent / (P - 1), start, stride)


def all_gather(topo: Topology, P: int, sent: float, start: int = 0, stride: int = 1) -> float:
    return _ring_collective("all_gather", topo, P, sent, start, stride)


def reduce_scatter(topo: Topology, P: int, sent: float, start: int = 0, stride: int = 1) -> float:
    return _ring_collective("reduce_scatter", topo, P, sent, start, stride)


def all_reduce(topo: Topology, P: int, sent: float, start: int = 0, stride: int = 1) -> float:
    if P <= 1:
        return 0.0
    t = _fit(topo, "all_reduce", P, sent)
    if t is not None:
        return t
    ring = 2 * (P - 1) * ring_step(topo, P, sent / (2 * (P - 1)), start, stride)
    n = sent * P / (2 * (P - 1))                           # the tensor's bytes
    link = topo.inter if topo.spans_nodes(P, start, stride) else topo.intra
    tree = 2 * math.ceil(math.log2(P)) * link.alpha + 2 * n / link.bw
    return min(ring, tree)


def p2p(topo: Topology, src: int, dst: int, nbytes: float) -> float:
    if nbytes <= 0:
        return 0.0
    return topo.link(src, dst).time(nbytes)


def price(topo: Topology, op: str, P: int, sent_per_call: float, calls: int = 1, rank: int = 0,
          start: int = 0, stride: int = 1) -> float:
    """Seconds for ``calls`` calls of ``op`` in which this rank sends ``sent_per_call`` bytes each.

    Point-to-point records are priced by their sends only (a receive is the other end of a peer's
    send); a send goes to the next rank of the group (the chains and rings here), the slowest hop
    of the group. ``stride``: the group's members are ranks ``start + k·stride``."""
    stride = max(int(stride), 1)
    if calls <= 0:
        return 0.0
    if op == "all_to_all":
        return calls * all_to_all(topo, P, sent_per_call, rank, start, stride)
    if op == "all_gather":
        return calls * all_gather(topo, P, sent_per_call, start, stride)
    if op == "reduce_scatter":
        return calls * reduce_scatter(topo, P, sent_per_call, start, stride)
    if op == "all_reduce":
        return calls * all_reduce(topo, P, sent_per_call, start, stride)
    if op == "send":
        link = topo.fit("p2p", P) or (topo.inter if topo.spans_nodes(P, start, stride) else topo.intra)
        return calls * link.time(sent_per_call)
    if op == "recv":
        return 0.0
    if op == "broadcast":
        return calls * all_gather(topo, P, sent_per_call, start, stride)
    if op == "all_gather_object":
        return calls * topo.intra.alpha
    raise ValueError(f"no cost model for op {op!r}")


def pipelined_chain(links: Sequence[Link], state_bytes: float, N: int, ready: Sequence[float],
                    update: float = 0.0, rendezvous: bool = True) -> list[float]:
    """When each rank of a chain has its whole incoming state: a relay of N blocks.

    Rank 0 holds its outgoing blocks at ``ready[0]``; rank i (1..P-1) forwards block j once it has
    received it and is itself ready (``ready[i]``: it has posted the scan, after computing its local
    summary), after ``update`` seconds of work on the block. Hop i (rank i -> i+1, ``links[i]``)
    carries one block at a time; a block occupies it for ``α + (s/N)/β`` (α as a per-message
    occupancy: the conservative reading); with ``rendezvous`` a transfer also waits for the
    receiver to have posted its receive (``ready[i+1]``), as NCCL's point-to-point kernels and
    gloo's large messages do. Returns, per rank, the time its last block arrived (rank 0:
    ``ready[0]``). N = 1 is LASP-1's whole-state hop, rank by rank."""
    P = len(ready)
    b = state_bytes / max(N, 1)
    arrive = [[ready[0]] * N]
    for i in range(P - 1):
        link = links[i]
        stage = link.alpha + b / link.bw
        free = -math.inf
        nxt = []
        for j in range(N):
            avail = arrive[i][j] if i == 0 else max(arrive[i][j], ready[i]) + update
            start = max(avail, free, ready[i + 1] if rendezvous else -math.inf)
            free = start + stage
            nxt.append(free)
        arrive.append(nxt)
    return [ready[0]] + [max(a) for a in arrive[1:]]


def chain_closed_form(P: int, state_bytes: float, N: int, link: Link) -> float:
    """The pipelined chain's time to the last rank on identical links, all ranks ready at 0:
    ``(P-1 + N-1)·(α + s/(N·β))`` (DESIGN.md's ``(P-1+N)·(...)`` counts one stage more)."""
    if P <= 1:
        return 0.0
    return (P - 1 + N - 1) * (link.alpha + state_bytes / N / link.bw)
