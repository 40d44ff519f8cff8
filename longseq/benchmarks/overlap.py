"""Latency hiding, measured: how each GLA and delta-rule method's step time grows as the links slow down.

    python -m longseq.benchmarks.overlap                                  # P = 2, 4; alpha 0, 2, 5 ms
    python -m longseq.benchmarks.overlap --procs 2 --alphas-ms 0 4 --rounds 3 --families gla
    python -m longseq.benchmarks.overlap --update-docs                    # also rewrite the docs' tables

On CPU processes over gloo the loopback links are so fast that the state exchange of ZeCO, LASP-1 and
LASP-2 costs next to nothing and no method can show that it hides communication. This benchmark
injects a per-message latency ``alpha`` and a bandwidth ``beta`` on every collective with the debug
option of :mod:`longseq.comm` (:func:`longseq.comm.set_link_model`: nothing extra moves, the ledger is
unchanged, an asynchronous transfer completes on a helper thread so that compute hides it) and times
one training step (forward + backward; SP gradient sync off, it is the same for every method) of

* GLA (``gla`` tiny, 2 layers): ``zeco`` (All-Scan overlapped with the local kernel), ``zeco`` with
  ``overlap=False`` (the same pipelined scan, waited for before the kernel), ``lasp1`` (the state
  handed rank to rank, blocking), ``lasp2`` (one all-gather of the states);
* the gated delta rule (``gdn`` tiny, 2 layers): ``zeco``, ``allgather``, ``p2p`` (LASP-1's chain),
  ``heads`` (all-to-all to head shards)

at every ``alpha``, in interleaved rounds: each round runs every (alpha, method) pair once in a fresh
random order (the same on every rank), after a barrier; a step's time is its slowest rank's. The
table gives the median over rounds and the spread (min-max), and the growth over ``alpha = 0``
(median of per-round differences) in ms and in hops (growth / alpha). Expected: LASP-1 grows by
``2·layers·(P-1)`` hops (forward and backward chains on the critical path); LASP-2 by its
all-gathers, ``2·layers·(P-1)`` latencies; ZeCO by what the local kernel cannot cover; every method by
the same synchronising collectives (the loss all-reduce; the delta rule's halo all-gathers).

**The simulator's overlap model** (``benchmarks.costmodel.simulator.gla_timeline``, the timeline the
simulator uses at scale) is checked against these runs: each rank's compute is split into the
method's local operator and the rest (the serial operator and the model measured alone at the rank's
shape, one thread, in this process), scaled by one factor per method and P so that the prediction at
``alpha = 0`` equals the measured step; the prediction at every other ``alpha`` uses the run's own
ledger priced on a topology whose links are the injected ``(alpha, beta)``. ``error`` is predicted /
measured step - 1; ``growth err`` compares the predicted and measured growth.

Writes ``--out`` (JSON; default benchmarks/results/overlap_cpu.json) and a markdown table next to
it (``.md``); ``--update-docs`` pastes that table into docs/zeco.md and docs/scaling.md.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

from longseq.benchmarks.paths import output

# (family, label, method, plan options); check=False: no per-call object all-gather in the timings
VARIANTS = [
    ("gla", "zeco", "zeco", dict(check=False)),
    ("gla", "zeco no-overlap", "zeco", dict(check=False, overlap=False)),
    ("gla", "lasp1", "lasp1", dict(check=False)),
    ("gla", "lasp2", "lasp2", dict(check=False)),
    ("gdn", "zeco", "zeco", dict(check=False)),
    ("gdn", "allgather", "allgather", dict(check=False)),
    ("gdn", "p2p", "p2p", dict(check=False)),
    ("gdn", "heads", "heads", dict(check=False)),
]
DOC_BLOCK = "overlap_cpu"


def workload(family: str, method: str, tokens: int, options: dict):
    from longseq.benchmarks.workloads import Workload
    if family == "gla":
        ov = dict(hidden_size=64, num_heads=2, num_layers=2, vocab_size=256, intermediate_size=128)
        return Workload.make("gla", method, "tiny", dict(B=1, T=tokens), ov, grad_sync=False, options=options)
    return Workload.make("gdn", method, "tiny", dict(B=1, T=tokens), {}, grad_sync=False, options=options)


# ----------------------------------------------------------------------------------------------
# On every rank
# ----------------------------------------------------------------------------------------------
def rank_run(jobs: list, alphas: list, beta: float, rounds: int, warmup: int) -> dict:
    """Build every job's step, warm up, record one step's ledger, then the interleaved rounds."""
    import torch.distributed as dist
    from longseq import comm
    from longseq.benchmarks.costmodel.ledger import aggregate
    from longseq.benchmarks.workloads import build_step
    from longseq.ledger import LEDGER

    group = dist.group.WORLD
    steps = {}
    for key, w in jobs:
        steps[key] = build_step(w, group, "cpu")
        for _ in range(warmup):
            steps[key]()
    rows = {}
    for key, _ in jobs:
        dist.barrier()
        with LEDGER.recording() as rec:
            steps[key]()
        rows[key] = [r.to_json() for r in aggregate(rec)]
    pairs = [(a, key) for a in alphas for key, _ in jobs]
    times: dict = {f"{a}|{key}": [] for a, key in pairs}
    for rd in range(rounds):
        order = list(pairs)
        random.Random(1000 + rd).shuffle(order)
        for a, key in order:
            comm.set_link_model(a if a > 0 else None, beta)
            try:
                dist.barrier()
                t0 = time.perf_counter()
                steps[key]()
                times[f"{a}|{key}"].append(time.perf_counter() - t0)
            finally:
                comm.set_link_model(None)
    return dict(times=times, rows=rows)


# ----------------------------------------------------------------------------------------------
# Compute alone (this process, one thread): the split the simulator needs
# ----------------------------------------------------------------------------------------------
def _timed(fn, reps: int = 5, warm: int = 2) -> tuple[float, float]:
    f, b = [], []
    for i in range(warm + reps):
        t0 = time.perf_counter()
        out = fn()
        t1 = time.perf_counter()
        out.backward()
        t2 = time.perf_counter()
        if i >= warm:
            f.append(t1 - t0)
            b.append(t2 - t1)
    return statistics.median(f), statistics.median(b)


def compute_split(family: str, tokens: int, P: int) -> dict:
    """Seconds of one rank's work at its shape (``tokens / P``), alone: the model step (forward,
    backward) and its serial local operator (forward, backward, per layer)."""
    import torch
    import torch.nn.functional as F
    from longseq.benchmarks.workloads import build_step

    w = workload(family, "none", tokens // P, {})
    step = build_step(w, None, "cpu")
    fw, bw = [], []
    for i in range(6):
        marks = {}
        t0 = time.perf_counter()
        step(lambda name: marks.__setitem__(name, time.perf_counter()))
        if i >= 2:
            fw.append(marks["fwd"] - t0)
            bw.append(marks["bwd"] - marks["fwd"])
    cfg = w.model_config()
    B, T, H, K, V = 1, tokens // P, cfg.num_heads, cfg.head_k_dim, cfg.head_v_dim
    torch.manual_seed(0)
    mk = lambda *s: torch.randn(*s, requires_grad=True)  # noqa: E731
    q, k, v = mk(B, T, H, K), mk(B, T, H, K), mk(B, T, H, V)
    if family == "gla":
        from longseq.zeco import gla
        g = (F.logsigmoid(torch.randn(B, T, H, K)) / 16).requires_grad_()
        op_f, op_b = _timed(lambda: gla(q, k, v, g)[0].sum())
    else:
        from longseq.zeco.delta import delta_rule
        g = (F.logsigmoid(torch.randn(B, T, H)) / 16).requires_grad_()
        beta = torch.rand(B, T, H).requires_grad_()
        op_f, op_b = _timed(lambda: delta_rule(q, k, v, g, beta, use_qk_l2norm=True,
                                               chunk_size=cfg.chunk_size)[0].sum())
    return dict(fwd=statistics.median(fw), bwd=statistics.median(bw), op_fwd=op_f, op_bwd=op_b,
                layers=cfg.num_layers)


def predict(method: str, overlap: bool, P: int, rows_by_rank: dict, split: dict, alphas: list, beta: float,
            measured0: float) -> dict:
    """The simulator's step time at each alpha (module docstring), calibrated at alpha = 0."""
    from longseq.benchmarks.costmodel.compute import GlaCompute
    from longseq.benchmarks.costmodel.ledger import Row, roles
    from longseq.benchmarks.costmodel.simulator import gla_estimate
    from longseq.benchmarks.costmodel.topology import Link, Topology

    L = split["layers"]
    of, ob = split["op_fwd"], split["op_bwd"]
    base = GlaCompute(L, max(split["fwd"] / L - of, 0.0), max(split["bwd"] / L - ob, 0.0), of, ob, 0.0, 0.0, 0.0, 0.0)
    rows = {r: [Row.from_json(d) for d in rows_by_rank[r]] for r in roles("gla", P)}

    def sim(alpha: float, k: float) -> float:
        link = Link(alpha, beta if alpha > 0 else math.inf)
        topo = Topology(f"injected alpha={alpha}", P, link, link)
        comp = base.scaled(k)
        return gla_estimate(method, P, rows, lambda i: comp, L, topo, grad_sync="off", overlap=overlap).step_s

    k = measured0 / sim(0.0, 1.0)
    return {a: sim(a, k) for a in alphas}


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------
def run(args) -> dict:
    from longseq.pool import DistributedPool

    variants = [v for v in VARIANTS if v[0] in args.families]
    results = []
    for P in args.procs:
        jobs = [(f"{fam}|{label}", workload(fam, method, args.tokens, opts)) for fam, label, method, opts in variants]
        t0 = time.time()
        with DistributedPool(P, timeout=1800, start_timeout=1200) as pool:
            per_rank = pool.run(rank_run, jobs, args.alphas, args.beta, args.rounds, args.warmup, timeout=3000)
        print(f"P={P}: {len(jobs)} methods x {len(args.alphas)} latencies x {args.rounds} rounds in "
              f"{time.time() - t0:.0f} s", flush=True)
        splits = {fam: compute_split(fam, args.tokens, P) for fam in {v[0] for v in variants}}
        for fam, label, method, opts in variants:
            key = f"{fam}|{label}"
            steps = {a: [max(r["times"][f"{a}|{key}"][i] for r in per_rank) for i in range(args.rounds)]
                     for a in args.alphas}
            med = {a: statistics.median(s) for a, s in steps.items()}
            growth = {a: statistics.median([x - y for x, y in zip(steps[a], steps[args.alphas[0]])])
                      for a in args.alphas}
            pred = predict(method, opts.get("overlap", True), P, {i: r["rows"][key] for i, r in enumerate(per_rank)},
                           splits[fam], args.alphas, args.beta, med[args.alphas[0]])
            results.append(dict(family=fam, method=label, P=P, steps=steps, median=med, growth=growth,
                                spread={a: (min(s), max(s)) for a, s in steps.items()}, predicted=pred,
                                split=splits[fam]))
        partial = Path(args.out).with_suffix(".partial.json")       # what is done so far survives a kill
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(dict(runs=results), indent=1, default=str))
    return dict(meta=dict(machine=platform.machine(), procs=args.procs, alphas=args.alphas, beta=args.beta,
                          rounds=args.rounds, warmup=args.warmup, tokens=args.tokens, note=args.note),
                runs=results)


def markdown(blob: dict, command: str) -> str:
    m = blob["meta"]
    al = m["alphas"]
    a0 = al[0]
    lines = [f"Measured with `{command}` ({m['note']}): {m['tokens']} tokens, 2 layers, "
             f"beta = {m['beta'] / 1e9:g} GB/s, {m['rounds']} interleaved rounds (median, min-max), "
             "step = forward + backward, slowest rank. Growth: median of per-round differences from "
             f"alpha = {a0 * 1e3:g} ms, in ms and in hops (/ alpha). Predicted: the simulator's timeline "
             "(calibrated at alpha = 0 only).", ""]
    head = "| family | P | method | " + " | ".join(f"step ms, alpha {a * 1e3:g} ms" for a in al) + \
        " | " + " | ".join(f"growth at {a * 1e3:g} ms (hops)" for a in al[1:]) + \
        " | " + " | ".join(f"predicted at {a * 1e3:g} ms (error)" for a in al[1:]) + \
        " | growth err at " + f"{al[-1] * 1e3:g} ms |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    errs = []
    for r in blob["runs"]:
        cells = [r["family"], str(r["P"]), r["method"]]
        for a in al:
            lo, hi = r["spread"][a]
            cells.append(f"{r['median'][a] * 1e3:.1f} ({lo * 1e3:.0f}-{hi * 1e3:.0f})")
        for a in al[1:]:
            cells.append(f"{r['growth'][a] * 1e3:+.1f} ({r['growth'][a] / a:.1f})")
        for a in al[1:]:
            e = r["predicted"][a] / r["median"][a] - 1
            errs.append(abs(e))
            cells.append(f"{r['predicted'][a] * 1e3:.1f} ({100 * e:+.0f}%)")
        ga, gp = r["growth"][al[-1]], r["predicted"][al[-1]] - r["predicted"][a0]
        cells.append(f"{100 * (gp / ga - 1):+.0f}%" if ga > 0 else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    if errs:
        lines += ["", f"Simulator vs measured step time at alpha > 0: median error {100 * statistics.median(errs):.1f}%, "
                  f"max {100 * max(errs):.1f}% over {len(errs)} runs (target: within 15%)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--procs", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--alphas-ms", type=float, nargs="+", default=[0.0, 2.0, 5.0])
    ap.add_argument("--beta", type=float, default=1e9, help="bytes per second of the modelled links")
    ap.add_argument("--families", nargs="+", default=["gla", "gdn"], choices=["gla", "gdn"])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--note", default="CPU, gloo over loopback, 2 cores shared with other jobs (a loaded machine)")
    ap.add_argument("--out", default=str(output("benchmarks/results/overlap_cpu.json")))
    ap.add_argument("--update-docs", action="store_true", help="paste the table into docs/zeco.md and docs/scaling.md")
    args = ap.parse_args(argv)
    args.alphas = sorted(a * 1e-3 for a in args.alphas_ms)
    command = "python -m longseq.benchmarks.overlap " + " ".join(argv if argv is not None else sys.argv[1:])
    command = command.replace(" --update-docs", "").strip()
    blob = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(blob, indent=1))
    md = markdown(blob, command)
    out.with_suffix(".md").write_text(md)
    print(md)
    if args.update_docs:
        from longseq.benchmarks.docblocks import replace_block
        for doc in ("docs/zeco.md", "docs/scaling.md"):
            replace_block(output(doc), DOC_BLOCK, md)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
