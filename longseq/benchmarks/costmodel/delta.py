"""Bytes per rank and simulated step time of the sequence-parallel gated delta rule (zeco.sp_delta)
at scale: zeco (All-Scan) vs allgather ([S | M]) vs heads (all-to-all) vs p2p (LASP-1 chain).

    python -m longseq.benchmarks.costmodel.delta                       # GDN 1B shape, h100_ib, 8..256 GPUs
    python -m longseq.benchmarks.costmodel.delta --tokens 32768 --topology h100_ib

The model (weak scaling: a fixed number of tokens per GPU, one sequence over all P GPUs, B=1):

* compute per rank: ``(6·N_params + 18·H·K·V·L) · T_i / (peak · mfu)`` (weights and the recurrence,
  forward + backward), plus each method's extra local work: zeco the maps' pass and the correction,
  ``(2·K³/C + 2·K² + 2·K·V)·H·T_i`` a layer forward and again backward (the recompute); allgather the
  maps' pass and a rerun of the op forward; p2p and heads none.
* communication a layer, forward and backward, from the ledger formulas of zeco/sp_delta.py:
  zeco one pipelined chain of ``S = H·K·V·4`` bytes in N blocks (:func:`collectives.pipelined_chain`),
  overlapped with the local output pass (half the op's forward; conservative); allgather one ring
  all-gather of ``H·(K·V + K·K)·4`` (backward ``H·K·V·4``), not overlapped (the fold needs it);
  heads two all-to-alls of ``T_i·H·(2K + V + 2)`` and ``T_i·H·V`` bf16 elements, not overlapped
  (n/a when P does not divide H); p2p the chain with N = 1 and the local op serialised behind it:
  rank P-1 waits for the ``P-1`` ranks before it, ``(P-1)·(op + hop)``.

These are model estimates, not measurements: no GPU was used (see docs/zeco.md).
"""
from __future__ import annotations

import argparse
import math

import torch

from longseq.zeco.all_scan import num_blocks_for

from . import collectives as C
from .topology import Topology

GDN_1B = dict(H=16, K=128, V=128, L=21, hidden=2048, params=1.30e9, chunk=64)
METHODS = ("zeco", "allgather", "heads", "p2p")


def bytes_per_rank(method: str, P: int, T_i: int, H: int, K: int, V: int, Hk: int | None = None,
                   gk: int = 1) -> float:
    """Bytes one (middle) rank sends a layer, forward + backward (the ledger formulas). ``H``: value
    heads (one K x V state each); ``Hk``: q/k heads (grouped value heads, default H); ``gk``: gate
    elements a head and token (1 Gated DeltaNet, K for KDA)."""
    Hk = H if Hk is None else Hk
    S, M = H * K * V * 4, H * K * K * 4
    if method == "zeco" or method == "p2p":
        return 2.0 * S
    if method == "allgather":
        return (P - 1) * (S + M) + (P - 1) * S
    frac = (P - 1) / P
    return 2.0 * frac * T_i * (2 * Hk * K + H * (V + gk + 1) + H * V) * 2   # there and back, fwd and bwd


def step_time(method: str, P: int, T_i: int, topo: Topology, shape: dict = GDN_1B) -> float:
    """Simulated seconds a training step (module docstring); ``math.nan`` when the method cannot run."""
    H, K, V, L, Cc = shape["H"], shape["K"], shape["V"], shape["L"], shape["chunk"]
    Hk, gk = shape.get("Hk", H), shape.get("gk", 1)
    if method == "heads" and H % P:
        return math.nan
    rate = topo.peak_flops * topo.mfu
    base = (6.0 * shape["params"] + 18.0 * H * K * V * L) * T_i / rate
    op_fwd = 6.0 * H * K * V * T_i / rate                             # one layer's recurrence forward
    maps = (2.0 * K ** 3 / Cc + 2.0 * K * K + 2.0 * K * V) * H * T_i / rate
    S = H * K * V * 4
    links = [topo.link(i, i + 1) for i in range(P - 1)]
    chain = C.pipelined_chain(links, S, num_blocks_for((1, H, K, V), torch.float32, world_size=P),
                              [0.0] * P)[-1] if P > 1 else 0.0
    if method == "zeco":
        per_layer = 2 * (maps + max(0.0, chain - op_fwd / 2))
    elif method == "allgather":
        per_layer = (maps + op_fwd + C.all_gather(topo, P, H * (K * V + K * K) * 4)
                     + C.all_gather(topo, P, S))
    elif method == "heads":
        a2a = C.all_to_all(topo, P, (P - 1) / P * T_i * (2 * Hk * K + H * (V + gk + 1)) * 2) + \
            C.all_to_all(topo, P, (P - 1) / P * T_i * H * V * 2)
        per_layer = 2 * a2a
    else:
        hop = C.chain_closed_form(2, S, 1, topo.inter if P > topo.gpus_per_node else topo.intra)
        per_layer = 2 * (P - 1) * (op_fwd + hop)
    return base + L * per_layer


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--topology", default="h100_ib")
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per GPU")
    ap.add_argument("--gpus", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256])
    args = ap.parse_args(argv)
    from longseq.benchmarks.simulate import load_topology
    topo = load_topology(args.topology)
    s = GDN_1B
    print(f"GDN 1B shape: H={s['H']} K={s['K']} V={s['V']} L={s['L']} layers, {args.tokens} tokens per GPU, "
          f"topology {topo.name} (model estimate, no GPU run)")
    head = f"{'P':>4} " + " ".join(f"{m + ' MiB':>14}" for m in METHODS) + " " + " ".join(f"{m + ' s':>12}" for m in METHODS)
    print(head)
    print("-" * len(head))
    for P in args.gpus:
        mib = [bytes_per_rank(m, P, args.tokens, s["H"], s["K"], s["V"]) * s["L"] / 2**20 for m in METHODS]
        ts = [step_time(m, P, args.tokens, topo) for m in METHODS]
        cells = [f"{x:14.1f}" for x in mib]
        if s["H"] % P:
            cells[2] = f"{'n/a':>14}"
        print(f"{P:>4} " + " ".join(cells) + " " + " ".join(f"{'n/a' if math.isnan(t) else f'{t:.3f}':>12}" for t in ts))


if __name__ == "__main__":
    main()
