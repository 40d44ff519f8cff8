"""Real runs of every method: step time, tokens/s and ledger bytes vs SP size and length, on a noisy machine.

CPU (default; gloo processes on 127.0.0.1, one intra-op thread each)::

    python -m longseq.benchmarks.scaling                     # P in {1, 2, 4}; stdit, gla, gdn, hybrid
    python -m longseq.benchmarks.scaling --procs 2 --rounds 3 --families gla gdn
    python -m longseq.benchmarks.scaling --update-docs       # also paste the table into docs/scaling.md

GPUs (NCCL; one process per GPU)::

    torchrun --nproc_per_node 8 -m benchmarks.scaling --device cuda --procs 1 2 4 8 \\
        --out benchmarks/results/scaling_h100.json
    python -m longseq.benchmarks.scaling --device cuda --compute-json benchmarks/results/compute_h100.json

Families and methods: ST-DiT (``stdit``: dsp and the longseq.sp baselines ulysses, ring, megatron_sp,
usp), GLA (``gla``: zeco, lasp1, lasp2), Gated DeltaNet (``gdn``: zeco, allgather, heads, p2p) and the
hybrid (``hybrid``: the gdn family's ``hybrid_tiny`` preset, 3 delta-rule layers : 1 softmax
attention, Ulysses on the attention layer), every registered method of each.

**Interleaved rounds (CPU).** On a shared machine a method timed after another inherits its load
and the first job carries the warm-up, so sequential runs cannot separate methods. For each P one
pool of P processes builds every (family, length, method) step, runs ``--warmup`` steps of each
(excluded), records one step's ledger, then ``--rounds`` rounds; each round runs every step once in
a fresh random order (the same on every rank), each after a barrier; a step's time is its slowest
rank's. Reported per run: the median over rounds and the spread (min-max); per round, the ratio of
the method's step to its family's reference method (dsp for ST-DiT, zeco otherwise) in the same
round, then the median and min-max of those ratios: the load a round sees hits both alike. P = 1 is
the model alone on one process ("none"). Peak memory is not measured here (every step's model is
alive at once); see the memory benchmark.

Compute alone: for ST-DiT and GLA runs, each distinct rank (first, middle, last) is also timed in
this process on a fake process group (``benchmarks.costmodel.fakepg``): the same code at the same
shapes with no communication, one thread. The simulator's validation prices the recorded ledger on
the gloo calibration and adds this compute (see docs/scaling.md). ``--no-compute-alone`` skips it.

``--compute-json F`` (GPU, one process, no torchrun): for each target of configs/simulate (the
papers' models and shapes at every P there), times one rank's forward and backward at its real
shapes on the fake process group, at depth 1 and 2 (extended linearly to the model's depth, so
that the 3B model at 128 GPUs' shapes fits one GPU), and for GLA also the GLA operator alone
(serial kernel and sp_gla); writes the per-rank compute the simulator reads with
``compute_json=F``. ``--families`` picks the targets; entries accumulate in F across runs.

Writes ``--out`` (JSON, default benchmarks/results/scaling_<device>.json), a CSV and a markdown table
(``.md``, which ``--update-docs`` pastes into docs/scaling.md) next to it, a table on stdout and
figures under ``--figures`` (docs/figures/scaling_<device>_*.png).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import statistics
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Optional

from longseq.benchmarks.paths import output
from longseq.benchmarks.workloads import FAMILY_METHODS, Workload, build_step, tokens, unavailable_reason

FAMILIES = ("stdit", "gla", "gdn", "hybrid")
REFERENCE = {"stdit": "dsp", "gla": "zeco", "gdn": "zeco", "hybrid": "zeco"}   # the ratios' denominator
DOC_BLOCK = "scaling_cpu"


# ----------------------------------------------------------------------------------------------
# Workload lists
# ----------------------------------------------------------------------------------------------
def cpu_workloads(args) -> list[Workload]:
    out = []
    if "stdit" in args.families:
        ov = dict(hidden_size=args.stdit_hidden, num_heads=4, depth=2)
        for T in args.stdit_frames:
            shape = dict(B=1, T=T, H=args.latent[0], W=args.latent[1], N=4)
            out.append(Workload.make("stdit", "none", args.stdit_preset, shape, ov, precision=args.precision))
    if "gla" in args.families:
        ov = dict(hidden_size=args.gla_hidden, num_heads=2, num_layers=2, vocab_size=256, intermediate_size=128)
        for T in args.gla_tokens:
            out.append(Workload.make("gla", "none", args.gla_preset, dict(B=1, T=T), ov, precision=args.precision))
    for fam, preset in (("gdn", "tiny"), ("hybrid", "hybrid_tiny")):
        if fam in args.families:
            for T in args.gdn_tokens:
                out.append(Workload.make("gdn", "none", preset, dict(B=1, T=T), precision=args.precision))
    return out


def family_of(w: Workload) -> str:
    """The benchmark's family name: the hybrid is the gdn model family's hybrid preset."""
    return "hybrid" if w.family == "gdn" and w.preset.startswith("hybrid") else w.family


def gpu_workloads(args) -> list[Workload]:
    out = []
    if "stdit" in args.families:
        for T in args.stdit_frames:
            shape = dict(B=1, T=T, H=args.latent[0], W=args.latent[1], N=120)
            out.append(Workload.make("stdit", "none", args.stdit_preset, shape, precision=args.precision))
    if "gla" in args.families:
        for T in args.gla_tokens:
            out.append(Workload.make("gla", "none", args.gla_preset, dict(B=1, T=T), precision=args.precision))
    return out


def methods_for(family: str, only: Optional[list]) -> list[str]:
    ms = FAMILY_METHODS["gdn" if family == "hybrid" else family]
    return [m for m in ms if not only or m in only]


# ----------------------------------------------------------------------------------------------
# On every rank
# ----------------------------------------------------------------------------------------------
class _RSSPeak:
    """Peak resident-set growth of this process while active (sampled every millisecond)."""

    def __init__(self):
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return 0

    def _run(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self._rss())

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())

    @property
    def growth(self) -> int:
        return self.peak - self.base


def _sync(device):
    import torch
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def bench_rank(w: Workload, repeats: int, warmup: int, device: str, group=None) -> dict:
    """Run on every rank of the group: warm-up, timed steps, one recorded step; this rank's results."""
    import torch
    import torch.distributed as dist
    from longseq.benchmarks.costmodel.ledger import aggregate
    from longseq.ledger import LEDGER

    if device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    group = group if group is not None else dist.group.WORLD
    P = dist.get_world_size(group)
    step = build_step(w, group if (P > 1 or w.method != "none") else None, device)

    def barrier():
        if P > 1:
            dist.barrier(group=group)

    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with _RSSPeak() as rss:
        for _ in range(repeats):
            barrier()
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - t0)
    mem = (torch.cuda.max_memory_allocated() - base) if torch.device(device).type == "cuda" else rss.growth
    barrier()
    with LEDGER.recording() as rec:
        step()
    _sync(device)
    rows = [r.to_json() for r in aggregate(rec)]
    return dict(times=times, mem=mem, rows=rows)


def bench_rounds(jobs: list[Workload], rounds: int, warmup: int, device: str = "cpu") -> dict:
    """Run on every rank of the world (CPU driver): build every job's step, warm each up, record one
    step's ledger each, then ``rounds`` interleaved rounds (module docstring); this rank's results."""
    import torch.distributed as dist
    from longseq.benchmarks.costmodel.ledger import aggregate
    from longseq.ledger import LEDGER

    P = dist.get_world_size()
    steps = []
    for w in jobs:
        steps.append(build_step(w, dist.group.WORLD if (P > 1 or w.method != "none") else None, device))
        for _ in range(warmup):
            steps[-1]()
    rows = []
    for step in steps:
        dist.barrier()
        with LEDGER.recording() as rec:
            step()
        rows.append([r.to_json() for r in aggregate(rec)])
    times: list = [[] for _ in jobs]
    for rd in range(rounds):
        order = list(range(len(jobs)))
        random.Random(rd).shuffle(order)          # the same order on every rank
        for j in order:
            dist.barrier()
            t0 = time.perf_counter()
            steps[j]()
            times[j].append(time.perf_counter() - t0)
    return dict(times=times, rows=rows)


# ----------------------------------------------------------------------------------------------
# Compute alone (fake process group, this process)
# ----------------------------------------------------------------------------------------------
def compute_alone(w: Workload, P: int, rank: int, repeats: int, warmup: int, device: str = "cpu",
                  phases: bool = False):
    """Median seconds of one step of rank ``rank`` of ``P`` with no communication (fake group);
    with ``phases``, (fwd, bwd) medians instead."""
    import torch
    from longseq.benchmarks.costmodel.fakepg import fake_world

    with fake_world(rank, P) as group:
        step = build_step(w, group if (P > 1 or w.method != "none") else None, device)
        for _ in range(warmup):
            step()
        _sync(device)
        tot, fw, bw = [], [], []
        for _ in range(repeats):
            marks = {}

            def mark(name):
                _sync(device)
                marks[name] = time.perf_counter()
            _sync(device)
            t0 = time.perf_counter()
            step(mark)
            tot.append(marks["bwd"] - t0)
            fw.append(marks["fwd"] - t0)
            bw.append(marks["bwd"] - marks["fwd"])
        del step
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    if phases:
        return statistics.median(fw), statistics.median(bw)
    return statistics.median(tot)


# ----------------------------------------------------------------------------------------------
# CPU driver
# ----------------------------------------------------------------------------------------------
def summarize(w: Workload, P: int, per_rank: list[dict]) -> dict:
    reps = len(per_rank[0]["times"])
    step_times = [max(r["times"][i] for r in per_rank) for i in range(reps)]
    med = statistics.median(step_times)
    sp = [sum(x["elements_sent"] * x["element_size"] for x in r["rows"] if not x["tag"].startswith("grad_sync"))
          for r in per_rank]
    allb = [sum(x["elements_sent"] * x["element_size"] for x in r["rows"]) for r in per_rank]
    mem = [r.get("mem") for r in per_rank]
    return dict(family=family_of(w), method=w.method, P=P, shape=w.dims, label=w.label(), tokens=tokens(w),
                workload=[w.family, w.method, w.preset, list(map(list, w.shape)), list(map(list, w.overrides)),
                          w.precision, w.grad_sync, list(map(list, w.options))],
                step_s=med, step_times=step_times, spread_s=[min(step_times), max(step_times)],
                tokens_per_s=tokens(w) / med, sp_bytes_per_rank=max(sp), bytes_per_rank=max(allb),
                peak_mem_mib=max(mem) / 2**20 if None not in mem else None,
                rows={str(i): r["rows"] for i, r in enumerate(per_rank)})


def add_ratios(results: list[dict]) -> None:
    """Per-round ratio of each run's step to its family's reference method at the same P and shape
    (``ratio``: median, ``ratio_spread``: min-max over rounds)."""
    ref = {}
    for r in results:
        if "error" not in r and r["method"] == REFERENCE.get(r["family"]):
            ref[(r["family"], r["P"], r["tokens"])] = r["step_times"]
    for r in results:
        base = ref.get((r.get("family"), r.get("P"), r.get("tokens")))
        if "error" in r or base is None or r["P"] == 1:
            continue
        ratios = [a / b for a, b in zip(r["step_times"], base)]
        r["ratio"], r["ratio_spread"] = statistics.median(ratios), [min(ratios), max(ratios)]


def _per_rank(raw: list[dict], j: int) -> list[dict]:
    return [dict(times=r["times"][j], rows=r["rows"][j]) for r in raw]


def run_cpu(args) -> list[dict]:
    from longseq.pool import DistributedPool
    from longseq.benchmarks.costmodel.ledger import roles

    base = cpu_workloads(args)
    results = []
    for P in args.procs:
        jobs = []
        for w in base:
            if P == 1:
                jobs.append(w)
                continue
            for m in methods_for(family_of(w), args.methods):
                cfg = w.model_config()
                heads = getattr(cfg, "num_heads", 1)
                if m in ("ulysses", "heads") and heads % P:
                    print(f"  skip {family_of(w)} {m} at P={P}: {heads} heads do not divide by {P}")
                    continue
                jobs.append(w.replace(method=m))
        if not jobs:
            continue
        t0 = time.time()
        try:
            with DistributedPool(P, timeout=3600, start_timeout=1200) as pool:
                raw = pool.run(bench_rounds, jobs, args.rounds, args.warmup, "cpu", timeout=3600)
        except Exception as e:  # noqa: BLE001 - report which P failed, go on with the others
            print(f"  P={P}: FAILED: {str(e).splitlines()[-1][:300]}")
            results += [dict(family=family_of(w), method=w.method, P=P, shape=w.dims, label=w.label(),
                             error=str(e)[-2000:]) for w in jobs]
            continue
        for j, w in enumerate(jobs):
            results.append(summarize(w, P, _per_rank(raw, j)))
        print(f"  P={P}: {len(jobs)} runs x {args.rounds} interleaved rounds in {time.time() - t0:.0f} s", flush=True)
        partial = Path(args.out).with_suffix(".partial.json")       # what is done so far survives a kill
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(dict(runs=results), indent=1))
    add_ratios(results)
    if not args.compute_alone:
        return results
    # compute alone, rank by rank, in this process (simulator validation: ST-DiT and GLA)
    import torch
    torch.set_num_threads(1)
    for res in results:
        if "error" in res or res["family"] not in ("stdit", "gla"):
            continue
        w = workload_from_json(res["workload"])
        P = res["P"]
        res["compute_alone_s"] = {str(r): compute_alone(w, P, r, args.repeats, args.warmup)
                                  for r in (roles(w.family, P) if P > 1 else [0])}
    return results


def workload_from_json(v) -> Workload:
    fam, method, preset, shape, ov, prec, gs, opts = v
    return Workload(fam, method, preset, tuple(map(tuple, shape)), tuple(map(tuple, ov)), prec, gs,
                    tuple(map(tuple, opts)))


# ----------------------------------------------------------------------------------------------
# GPU drivers
# ----------------------------------------------------------------------------------------------
def run_torchrun(args) -> list[dict]:
    """Inside torchrun: for each P that fits the world, the first P ranks run every job."""
    import torch.distributed as dist
    import longseq

    longseq.init_distributed("nccl" if args.device == "cuda" else "gloo")
    world, me = dist.get_world_size(), dist.get_rank()
    results = []
    for P in args.procs:
        if P > world:
            if me == 0:
                print(f"  skip P={P}: only {world} processes")
            continue
        ranks = list(range(P))
        group = dist.new_group(ranks) if P < world else dist.group.WORLD
        jobs = []
        for w in gpu_workloads(args) if args.device == "cuda" else cpu_workloads(args):
            if P == 1:
                jobs.append(w)
                continue
            jobs += [w.replace(method=m) for m in methods_for(w.family, args.methods) if not unavailable_reason(m)]
        for w in jobs:
            out = None
            if me < P:
                try:
                    out = bench_rank(w, args.repeats, args.warmup, args.device, group if P > 1 else None)
                except Exception as e:  # noqa: BLE001
                    out = dict(error=f"{type(e).__name__}: {e}")
            everyone = longseq.comm.all_gather_object(out, dist.group.WORLD, tag="bench.results")
            if me == 0:
                per_rank = everyone[:P]
                errs = [o["error"] for o in per_rank if o and "error" in o]
                if errs:
                    print(f"  P={P} {w.label()}: FAILED: {errs[0][:200]}")
                    results.append(dict(family=w.family, method=w.method, P=P, label=w.label(), error=errs[0]))
                else:
                    res = summarize(w, P, per_rank)
                    results.append(res)
                    print(f"  P={P} {w.label():<40} step {res['step_s'] * 1e3:8.1f} ms", flush=True)
    return results if me == 0 else []


def compute_json(args) -> None:
    """Per-rank compute of every simulator target, on this one device (fake process group)."""
    import torch
    from longseq.benchmarks.costmodel.compute import compute_key, flops_of
    from longseq.benchmarks.costmodel.ledger import roles
    from longseq.benchmarks import simulate as S

    cfg = S.load_config(args.sim_overrides or [])
    dev = args.device
    entries = []
    t0 = time.time()
    reps, warm = max(3, args.repeats), max(1, args.warmup)

    def depth_lin(w, field, measure):
        a = measure(w.replace(overrides={**w.config_overrides, field: 1}))
        b = measure(w.replace(overrides={**w.config_overrides, field: 2}))
        n = getattr(w.model_config(), field)
        return [x + (n - 1) * (y - x) for x, y in zip(a, b)], [y - x for x, y in zip(a, b)], a

    for preset in (cfg.stdit.presets if "stdit" in args.families else []):
        for P in cfg.stdit.gpus:
            P = int(P)
            for m in cfg.stdit.methods:
                w = S.stdit_target(cfg, str(preset), P, str(m))
                if unavailable_reason(str(m)):
                    continue
                try:
                    (fw, bw), _, _ = depth_lin(w, "depth", lambda v: compute_alone(v, P, 0, reps, warm, dev, phases=True))
                except Exception as e:  # noqa: BLE001 - e.g. Ulysses at P not dividing the heads
                    print(f"  skip {w.label()} P={P}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                    continue
                fl = flops_of(w)
                share = (fl.attn_fwd + fl.attn_bwd) / fl.total
                entries.append(dict(key=compute_key(w, P, 0), label=w.label(), P=P, rank=0, fwd_s=fw, bwd_s=bw,
                                    attn_fwd_s=fw * share / 3, attn_bwd_s=bw * share * 2 / 3))
                print(f"  {w.label()} P={P}: fwd {fw * 1e3:.1f} ms bwd {bw * 1e3:.1f} ms  ({time.time() - t0:.0f} s)",
                      flush=True)
    tpg = [int(cfg.gla.tokens_per_gpu), int(cfg.gla.headline.tokens_per_gpu)] if "gla" in args.families else []
    for n in sorted(set(tpg)):
        gpus = sorted({1, *map(int, cfg.gla.gpus), int(cfg.gla.headline.gpus)})
        for P in gpus:
            for m in (cfg.gla.methods if P > 1 else ["zeco"]):
                w = S.gla_target(cfg, P, str(m), n)
                for r in roles("gla", P):
                    (fw, bw), (lf, lb), (f1, b1) = depth_lin(
                        w, "num_layers", lambda v: compute_alone(v, P, r, reps, warm, dev, phases=True))
                    op = _gla_op_times(w, P, r, reps, warm, dev)
                    L = w.model_config().num_layers
                    entries.append(dict(
                        key=compute_key(w, P, r), label=w.label(), P=P, rank=r, layers=L,
                        other_fwd_s=lf - op["sp_f"], other_bwd_s=lb - op["sp_b"], gla_fwd_s=op["ser_f"],
                        gla_bwd_s=op["ser_b"], extra_fwd_s=op["sp_f"] - op["ser_f"], extra_bwd_s=op["sp_b"] - op["ser_b"],
                        head_fwd_s=max(f1 - lf, 0.0), head_bwd_s=max(b1 - lb, 0.0)))
                    print(f"  {w.label()} P={P} rank {r}: fwd {fw * 1e3:.1f} ms bwd {bw * 1e3:.1f} ms "
                          f"({time.time() - t0:.0f} s)", flush=True)
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    path = Path(args.compute_json)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():        # runs of other families (or targets) accumulate in one file
        old = json.loads(path.read_text())
        mine = {e["key"] for e in entries}
        entries = [e for e in old.get("entries", []) if e["key"] not in mine] + entries
    path.write_text(json.dumps(dict(device=name, entries=entries), indent=1))
    print(f"wrote {args.compute_json}: {len(entries)} entries in {time.time() - t0:.0f} s")


def _gla_op_times(w: Workload, P: int, rank: int, reps: int, warm: int, dev: str) -> dict:
    """Forward / backward seconds of the serial GLA kernel and of sp_gla (fake group) at the rank's shape."""
    import torch
    from longseq.benchmarks.costmodel.fakepg import fake_world
    from longseq.zeco import gla, sp_gla

    cfg = w.model_config()
    B, T = w.dims["B"], w.dims["T"] // P
    H, K, V = cfg.num_heads, cfg.head_k_dim, cfg.head_v_dim
    dt = torch.bfloat16 if w.precision != "fp32" else torch.float32
    mk = lambda *s: torch.randn(*s, device=dev, dtype=dt, requires_grad=True)  # noqa: E731
    q, k, v = mk(B, T, H, K), mk(B, T, H, K), mk(B, T, H, V)
    g = (torch.nn.functional.logsigmoid(torch.randn(B, T, H, K, device=dev)) / 16).requires_grad_()

    def timed(fn):
        f, b = [], []
        for i in range(warm + reps):
            _sync(dev)
            t0 = time.perf_counter()
            o = fn()[0]
            _sync(dev)
            t1 = time.perf_counter()
            o.float().sum().backward()
            _sync(dev)
            t2 = time.perf_counter()
            if i >= warm:
                f.append(t1 - t0)
                b.append(t2 - t1)
        return statistics.median(f), statistics.median(b)

    ser_f, ser_b = timed(lambda: gla(q, k, v, g))
    if P == 1:
        return dict(ser_f=ser_f, ser_b=ser_b, sp_f=ser_f, sp_b=ser_b)
    with fake_world(rank, P) as grp:
        sp_f, sp_b = timed(lambda: sp_gla(q, k, v, g, group=grp, method=w.method, check=False))
    return dict(ser_f=ser_f, ser_b=ser_b, sp_f=sp_f, sp_b=sp_b)


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
def _order(r: dict) -> tuple:
    fam = r["family"]
    return (FAMILIES.index(fam) if fam in FAMILIES else 9, r.get("tokens", 0), r["P"],
            r["method"] != REFERENCE.get(fam), r["method"])


def markdown_table(results: list[dict], meta: dict, command: str) -> str:
    """The runs as a markdown table (what ``--update-docs`` pastes into docs/scaling.md)."""
    lines = [f"Measured with `{command}` ({meta['note']}; {meta['cpu_count']} cores, torch {meta['torch']}): "
             f"{meta['rounds']} interleaved rounds after {meta['warmup']} warm-up steps (excluded); step = forward + "
             "backward + SP gradient sync, slowest rank, median (min-max); ratio = the method's step / the reference "
             "method's (dsp for ST-DiT, zeco otherwise) in the same round, median (min-max) over rounds.", "",
             "| family | tokens | P | method | step ms | ratio to reference | tokens/s | SP MiB/rank |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=_order):
        if "error" in r:
            lines.append(f"| {r['family']} | | {r['P']} | {r['method']} | FAILED | | | |")
            continue
        lo, hi = r["spread_s"]
        ratio = (f"{r['ratio']:.3f} ({r['ratio_spread'][0]:.2f}-{r['ratio_spread'][1]:.2f})"
                 if "ratio" in r else "")
        lines.append(f"| {r['family']} | {r['tokens']} | {r['P']} | {r['method']} | {r['step_s'] * 1e3:.1f} "
                     f"({lo * 1e3:.0f}-{hi * 1e3:.0f}) | {ratio} | {r['tokens_per_s']:.0f} | "
                     f"{r['sp_bytes_per_rank'] / 2**20:.2f} |")
    return "\n".join(lines) + "\n"


def write_csv(results: list[dict], path: Path) -> None:
    cols = ["family", "method", "P", "label", "tokens", "step_s", "ratio", "tokens_per_s", "sp_bytes_per_rank",
            "bytes_per_rank", "peak_mem_mib"]
    with open(path, "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(cols + ["step_min_s", "step_max_s", "compute_alone_max_s", "error"])
        for r in results:
            alone = r.get("compute_alone_s", {})
            lo, hi = r.get("spread_s", ["", ""])
            wr.writerow([r.get(c, "") for c in cols] + [lo, hi, max(alone.values()) if alone else "",
                                                        r.get("error", "")[:80]])


def plot(results: list[dict], outdir: Path, tag: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outdir.mkdir(parents=True, exist_ok=True)
    written = []
    for fam in FAMILIES:
        rs = [r for r in results if r["family"] == fam and "error" not in r]
        if not rs:
            continue
        lengths = sorted({r["tokens"] for r in rs})
        fig, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths), 3.6), squeeze=False)
        for ax, n in zip(axes[0], lengths):
            sub = [r for r in rs if r["tokens"] == n]
            base = [r for r in sub if r["P"] == 1]
            for m in sorted({r["method"] for r in sub if r["P"] > 1}):
                pts = sorted((r["P"], r["step_s"] * 1e3) for r in sub if r["method"] == m)
                if base:
                    pts = [(1, base[0]["step_s"] * 1e3)] + pts
                ax.plot(*zip(*pts), marker="o", label=m)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("SP size P (processes)")
            ax.set_ylabel("step time (ms)")
            ax.set_title(f"{fam}, {n} tokens ({tag})", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        p = outdir / f"scaling_{tag}_{fam}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(str(p))
    return written


def main(argv=None) -> int:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--procs", type=int, nargs="+", default=None, help="SP sizes (default 1 2 4)")
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--methods", nargs="+", default=None, help="only these methods (default: all that exist)")
    ap.add_argument("--rounds", type=int, default=5, help="CPU: interleaved rounds (module docstring)")
    ap.add_argument("--repeats", type=int, default=5, help="GPU runs and compute alone: timed steps")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-compute-alone", dest="compute_alone", action="store_false",
                    help="CPU: skip timing each rank alone on a fake group (the simulator validation's input)")
    ap.add_argument("--gdn-tokens", type=int, nargs="+", default=None, help="gdn and hybrid lengths")
    ap.add_argument("--note", default="CPU, gloo over loopback, a machine shared with other jobs (loaded)")
    ap.add_argument("--update-docs", action="store_true", help="paste the markdown table into docs/scaling.md")
    ap.add_argument("--precision", default=None, choices=["fp32", "bf16-autocast", "bf16"],
                    help="default: fp32 on CPU, bf16 on CUDA")
    ap.add_argument("--stdit-preset", default=None)
    ap.add_argument("--stdit-hidden", type=int, default=64, help="CPU runs: hidden size of the tiny ST-DiT")
    ap.add_argument("--stdit-frames", type=int, nargs="+", default=None)
    ap.add_argument("--latent", type=int, nargs=2, default=None, metavar=("H", "W"))
    ap.add_argument("--gla-preset", default=None)
    ap.add_argument("--gla-hidden", type=int, default=64, help="CPU runs: hidden size of the tiny GLA")
    ap.add_argument("--gla-tokens", type=int, nargs="+", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--figures", default=str(output("docs/figures")))
    ap.add_argument("--compute-json", default=None, help="write per-rank compute of the simulator's targets")
    ap.add_argument("--sim-overrides", nargs="*", default=None, help="Hydra overrides of configs/simulate")
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    args.procs = args.procs or [1, 2, 4]
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    args.stdit_preset = args.stdit_preset or ("720m" if cuda else "tiny")
    args.stdit_frames = args.stdit_frames or ([8, 16] if cuda else [8, 16])
    args.latent = args.latent or ([64, 64] if cuda else [32, 32])
    args.gla_preset = args.gla_preset or ("1b" if cuda else "tiny")
    args.gla_tokens = args.gla_tokens or ([8192, 32768] if cuda else [4096, 16384])
    args.gdn_tokens = args.gdn_tokens or [4096]
    tag = "h100" if cuda else "cpu"
    args.out = args.out or str(output(f"benchmarks/results/scaling_{tag}.json"))

    if args.compute_json:
        compute_json(args)
        return 0
    t0 = time.time()
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1 or cuda:
        results = run_torchrun(args)
        import torch.distributed as dist
        if dist.is_initialized() and dist.get_rank() != 0:
            return 0
    else:
        results = run_cpu(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import platform
    import torch
    meta = dict(device=torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
                cpu_count=os.cpu_count(), torch=torch.__version__, rounds=args.rounds, repeats=args.repeats,
                warmup=args.warmup, note=args.note, seconds=time.time() - t0)
    out.write_text(json.dumps(dict(meta=meta, runs=results), indent=1))
    write_csv(results, out.with_suffix(".csv"))
    command = "python -m longseq.benchmarks.scaling " + " ".join(a for a in (argv if argv is not None else sys.argv[1:])
                                                                 if a != "--update-docs")
    md = markdown_table(results, meta, command.strip())
    out.with_suffix(".md").write_text(md)
    print()
    print(md)
    figs = plot(results, Path(args.figures), tag)
    if args.update_docs:
        from longseq.benchmarks.docblocks import replace_block
        replace_block(output("docs/scaling.md"), DOC_BLOCK, md)
    print(f"\nwrote {out}, {out.with_suffix('.csv')}, {out.with_suffix('.md')} and {', '.join(figs)} "
          f"in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
