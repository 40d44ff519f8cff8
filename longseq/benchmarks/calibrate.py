"""Measure gloo's latency and bandwidth on this machine and fit alpha-beta lines for the simulator.

    python -m longseq.benchmarks.calibrate            # about half a minute on 2 cores

Runs P gloo processes on 127.0.0.1 (one intra-op thread each, as the benchmarks do) and times,
after warm-up, the median of repeated calls at several message sizes:

* ping-pong ``send`` / ``recv`` between 2 ranks: one-way time = round trip / 2 (the link);
* a ring exchange (every rank sends to the next and receives from the previous, batched), and
  ``all_to_all_single``, ``all_gather_into_tensor``, ``reduce_scatter_tensor``, ``all_reduce`` at P = 2 and 4 (each repeat
  starts after a barrier and counts the slowest rank);
* compute contention: a fixed CPU workload on one process alone vs on all P at once.

Each series is fitted by least squares to ``t = alpha + bytes_sent_by_a_rank / beta`` (bytes sent as
the ledger counts them). Writes ``benchmarks/results/gloo_calibration.json`` (raw points and fits)
and ``configs/simulate/topology/gloo_cpu.yaml`` (the topology the validation prices with: one
"node" holding every process, the p2p fit as its link, the collectives' fits, and
``contention_cores`` = this machine's cores).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from longseq.benchmarks.paths import output

SIZES = (1 << 10, 1 << 14, 1 << 17, 1 << 20, 1 << 22)       # bytes of the per-rank buffer


def _pingpong(sizes, repeats):
    import torch
    import torch.distributed as dist
    me = dist.get_rank()
    out = {}
    for nbytes in sizes:
        x = torch.ones(nbytes // 4)
        buf = torch.empty(nbytes // 4)
        times = []
        for i in range(repeats + 3):
            dist.barrier()
            t0 = time.perf_counter()
            if me == 0:
                dist.send(x, 1)
                dist.recv(buf, 1)
            elif me == 1:
                dist.recv(buf, 0)
                dist.send(x, 0)
            t = time.perf_counter() - t0
            if i >= 3:
                times.append(t / 2)
        out[nbytes] = statistics.median(times)
    return out


def _ring_exchange(sizes, repeats):
    """Every rank sends to the next and receives from the previous at once (ring attention's step;
    with P = 2 the two directions of one pair). Per call: the slowest rank."""
    import torch
    import torch.distributed as dist
    P, me = dist.get_world_size(), dist.get_rank()
    out = {}
    for nbytes in sizes:
        x = torch.ones(nbytes // 4)
        times = []
        for i in range(repeats + 3):
            buf = torch.empty(nbytes // 4)
            dist.barrier()
            t0 = time.perf_counter()
            ops = [dist.P2POp(dist.isend, x, (me + 1) % P), dist.P2POp(dist.irecv, buf, (me - 1) % P)]
            for w in dist.batch_isend_irecv(ops):
                w.wait()
            t = time.perf_counter() - t0
            if i >= 3:
                times.append(t)
        out[nbytes] = times
    return out


def _busy(repeats):
    """A fixed CPU workload (matrix products and element-wise ops, like a small model's step), timed
    on this rank alone (the others wait at a barrier), then on every rank at once."""
    import torch
    import torch.distributed as dist
    me = dist.get_rank()
    a = torch.randn(192, 192)

    def work():
        x = a
        for _ in range(60):
            x = torch.tanh(x @ a) * 0.5
        return x

    for _ in range(3):
        work()
    alone, together = [], []
    for i in range(repeats):
        dist.barrier()
        if me == 0:
            t0 = time.perf_counter()
            work()
            alone.append(time.perf_counter() - t0)
        dist.barrier()
        t0 = time.perf_counter()
        work()
        together.append(time.perf_counter() - t0)
    return dict(alone=alone, together=together)


def _collective(op, sizes, repeats):
    import torch
    import torch.distributed as dist
    P = dist.get_world_size()
    out = {}
    for nbytes in sizes:
        n = max(P, nbytes // 4 // P * P)
        x = torch.ones(n)
        times = []
        for i in range(repeats + 3):
            if op == "all_to_all":
                o = torch.empty(n)
            elif op == "all_gather":
                o = torch.empty(n * P)
            elif op == "reduce_scatter":
                o = torch.empty(n // P)
            dist.barrier()
            t0 = time.perf_counter()
            if op == "all_to_all":
                dist.all_to_all_single(o, x)
            elif op == "all_gather":
                (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(o, x)
            elif op == "reduce_scatter":
                (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(o, x)
            else:
                dist.all_reduce(x)
            t = time.perf_counter() - t0
            if i >= 3:
                times.append(t)
        # bytes sent by a rank, the ledger's convention
        if op == "all_to_all":
            sent = n * 4 * (P - 1) // P
        elif op == "all_gather":
            sent = n * 4 * (P - 1)
        elif op == "reduce_scatter":
            sent = n * 4 * (P - 1) // P
        else:
            sent = 2 * n * 4 * (P - 1) // P
        out[sent] = times
    return out


def _fit(points: dict) -> tuple[float, float]:
    """Least squares t = a + b·x over {x: t}; returns (alpha s, bandwidth B/s)."""
    xs, ys = list(points), list(points.values())
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    a = my - b * mx
    b = max(b, 1e-15)
    return max(a, 0.0), 1.0 / b


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--procs", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--json", default=str(output("benchmarks/results/gloo_calibration.json")))
    ap.add_argument("--yaml", default=str(output("configs/simulate/topology/gloo_cpu.yaml")))
    args = ap.parse_args(argv)
    from longseq.pool import DistributedPool

    t0 = time.time()
    raw: dict = {"cpu_count": os.cpu_count(), "series": {}}
    fits = []
    for P in args.procs:
        with DistributedPool(P, timeout=300) as pool:
            if P == 2:
                pp = pool.run(_pingpong, SIZES, args.repeats)[0]
                raw["series"]["pingpong"] = {str(k): v for k, v in pp.items()}
                a, bw = _fit(pp)
                raw["pingpong_fit"] = dict(alpha_us=a * 1e6, bw_GBps=bw / 1e9)
            per_rank = pool.run(_ring_exchange, SIZES, args.repeats)
            pts = {s: statistics.median(max(r[s][i] for r in per_rank) for i in range(args.repeats))
                   for s in per_rank[0]}
            raw["series"][f"p2p@{P}"] = {str(k): v for k, v in pts.items()}
            a, bw = _fit(pts)
            fits.append(dict(op="p2p", P=P, alpha_us=a * 1e6, bw_GBps=bw / 1e9))
            busy = pool.run(_busy, max(5, args.repeats // 2))
            dil = statistics.median(max(b["together"][i] for b in busy) for i in range(len(busy[0]["together"]))) \
                / statistics.median(busy[0]["alone"])
            raw.setdefault("dilation", {})[str(P)] = dil
            for op in ("all_to_all", "all_gather", "reduce_scatter", "all_reduce"):
                per_rank = pool.run(_collective, op, SIZES, args.repeats)
                pts = {s: statistics.median(max(r[s][i] for r in per_rank) for i in range(args.repeats))
                       for s in per_rank[0]}
                raw["series"][f"{op}@{P}"] = {str(k): v for k, v in pts.items()}
                a, bw = _fit(pts)
                fits.append(dict(op=op, P=P, alpha_us=a * 1e6, bw_GBps=bw / 1e9))
    raw["fits"] = fits
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(raw, indent=1))
    p2p = dict(raw["pingpong_fit"])
    dil = {1: 1.0, **{int(k): v for k, v in raw.get("dilation", {}).items()}}
    lines = [
        "# gloo over TCP loopback on this machine, measured by python -m longseq.benchmarks.calibrate",
        f"# ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores; raw points in benchmarks/results/gloo_calibration.json).",
        "# One 'node' holds every process; the ping-pong fit is its link; each collective has its own fit",
        "# (p2p@P: every rank sending to the next and receiving from the previous at once).",
        "# dilation: a fixed CPU workload timed on P processes at once / on one process alone: how much",
        "# slower a rank computes when all P compute (2 cores: P = 4 processes share them).",
        "name: gloo_cpu_loopback",
        "gpus_per_node: 1024",
        f"intra: {{alpha_us: {p2p['alpha_us']:.2f}, bw_GBps: {p2p['bw_GBps']:.4f}}}",
        f"inter: {{alpha_us: {p2p['alpha_us']:.2f}, bw_GBps: {p2p['bw_GBps']:.4f}}}",
        "peak_tflops: 0.0            # compute is measured per rank (benchmarks.scaling), not from FLOPs",
        "mfu: 1.0",
        f"contention_cores: {os.cpu_count()}",
        "dilation: {" + ", ".join(f"{k}: {v:.3f}" for k, v in sorted(dil.items())) + "}",
        "fits:",
    ]
    for f in fits:
        lines.append(f"  - {{op: {f['op']}, P: {f['P']}, alpha_us: {f['alpha_us']:.2f}, bw_GBps: {f['bw_GBps']:.4f}}}")
    Path(args.yaml).write_text("\n".join(lines) + "\n")
    print(f"{'series':<16} {'alpha (us)':>11} {'beta (GB/s)':>12}")
    print(f"{'ping-pong':<16} {p2p['alpha_us']:11.1f} {p2p['bw_GBps']:12.3f}")
    for f in fits:
        print(f"{f['op'] + '@' + str(f['P']):<16} {f['alpha_us']:11.1f} {f['bw_GBps']:12.3f}")
    print("compute dilation with P processes at once: " + ", ".join(f"P={k}: x{v:.2f}" for k, v in sorted(dil.items())))
    print(f"wrote {args.json} and {args.yaml} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
