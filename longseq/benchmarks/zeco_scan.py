"""All-Scan vs LASP-1's chain vs LASP-2's all-gather, and ZeCO's end-to-end overhead, on gloo.

    python -m longseq.benchmarks.zeco_scan                 # the default table (under ~2 minutes on 2 cores)
    python -m longseq.benchmarks.zeco_scan --sweep         # also All-Scan time against the number of blocks N
    python -m longseq.benchmarks.zeco_scan --worlds 2 4 --repeats 30 --tokens 512

Spawns P gloo processes on 127.0.0.1 (torch.multiprocessing, spawn) per world size, one intra-op
thread each. Part 1 times the three ways to get S0 for a per-layer state [B, H, K, V] of the GLA
presets (the exact code paths sp_gla uses: zeco.all_scan, zeco.sp_gla.lasp1_scan, lasp2_scan): each
repeat starts after a barrier and counts the slowest rank; the median of the repeats after warm-up
is reported. Part 2 times a forward+backward step of the GLA operator at the 1b preset's layer shape
(H=4, K=256, V=512, B=1) with a fixed number of tokens per rank, for each method, against (a) one
process alone on the machine with the same tokens (rank 0 while the others wait), and (b) the same
P processes running the local operator with no communication at all (what the machine can do with
P concurrent processes; on a 2-core machine P=4 is oversubscribed, which (a) would charge to the
method). All timings of one table are taken round-robin (one of each per round), so a change in
the machine's load affects them alike.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import torch
import torch.multiprocessing as mp

from longseq.launch import free_port

# per-layer states [B, H, K, V] of the presets (models/gla.py): 1b is H=4, K=256, V=512
STATES = {
    "1b (B=1)": (1, 4, 256, 512),
    "3b (B=4)": (4, 5, 256, 512),
}
LAYER = dict(H=4, K=256, V=512)  # the 1b preset's attention


def _timed(fns: dict, repeats: int, warmup: int) -> dict:
    """Median over repeats of the slowest rank's time of each ``fns[name]()``. The functions are
    run round-robin (one of each per round, each after a barrier), so a change in the machine's
    load during the run affects all of them alike."""
    import torch.distributed as dist

    for _ in range(warmup):
        for fn in fns.values():
            fn()
    ts = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            ts[name].append(time.perf_counter() - t0)
    out = {}
    for name, v in ts.items():
        t = torch.tensor(v, dtype=torch.float64)
        if dist.get_world_size() > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        out[name] = statistics.median(t.tolist())
    return out


def _comm_part(states, repeats, warmup, sweep):
    import torch.distributed as dist

    from longseq.zeco.all_scan import all_scan, num_blocks_for
    from longseq.zeco.sp_gla import lasp1_scan, lasp2_scan

    W = dist.group.WORLD
    out = {}
    for name, shape in states.items():
        gen = torch.Generator().manual_seed(dist.get_rank())
        local = torch.randn(*shape, generator=gen)
        gamma = torch.rand(*shape[:-1], generator=gen)
        N = num_blocks_for(shape, torch.float32, world_size=dist.get_world_size())
        fns = {
            "allscan": lambda: all_scan(gamma, local, W),
            "lasp1": lambda: lasp1_scan(gamma, local, W, shape=shape, dtype=torch.float32),
            "lasp2": lambda: lasp2_scan(gamma, local, W),
        }
        row = {"N": N, **_timed(fns, repeats, warmup)}
        if sweep:
            row["sweep"] = _timed({n: (lambda n=n: all_scan(gamma, local, W, num_blocks=n))
                                   for n in (1, 2, 3, 4, 6, 8, 16, 32)}, repeats, warmup)
        out[name] = row
    return out


def _step_part(tokens, repeats, warmup, methods):
    import torch.distributed as dist
    import torch.nn.functional as F

    from longseq.zeco.gla import gla
    from longseq.zeco.sp_gla import sp_gla

    W = dist.group.WORLD
    H, K, V = LAYER["H"], LAYER["K"], LAYER["V"]
    gen = torch.Generator().manual_seed(dist.get_rank())
    q = torch.randn(1, tokens, H, K, generator=gen)
    k = torch.randn(1, tokens, H, K, generator=gen) * K ** -0.5
    v = torch.randn(1, tokens, H, V, generator=gen)
    g = F.logsigmoid(torch.randn(1, tokens, H, K, generator=gen) + 3.0) / 16 * 4
    do = torch.randn(1, tokens, H, V, generator=gen)
    leaves = [x.requires_grad_() for x in (q, k, v, g)]

    def step(method):
        def run():
            for x in leaves:
                x.grad = None
            if method == "alone":  # rank 0 by itself while the others wait at the next barrier
                if dist.get_rank() == 0:
                    o, _ = gla(*leaves)
                    (o * do).sum().backward()
                return
            if method == "local":
                o, _ = gla(*leaves)
            elif method == "zeco-wait":
                o, _ = sp_gla(*leaves, group=W, method="zeco", overlap=False, check=False)
            else:
                o, _ = sp_gla(*leaves, group=W, method=method, check=False)
            (o * do).sum().backward()
        return run

    res = _timed({m: step(m) for m in methods}, repeats, warmup)
    # the ledger of one step per method (forward + backward), every rank
    from longseq.ledger import LEDGER
    LEDGER.enabled = True
    vol = {}
    for m in methods:
        if m in ("alone", "local"):
            continue
        with LEDGER.recording() as rec:
            step(m)()
        mine = [(r.op, r.tag, r.elements_sent, r.elements_recv, r.bytes_sent, r.bytes_recv) for r in rec]
        vol[m] = [None] * dist.get_world_size()
        objs = [None] * dist.get_world_size()
        dist.all_gather_object(objs, mine)
        vol[m] = objs
    LEDGER.enabled = False
    res["ledger"] = vol
    return res


DELTA_LAYER = dict(H=4, K=64, V=64)  # a small Gated DeltaNet layer (CPU-sized; the GDN 1B shape is H=16, K=V=128)


def _delta_part(tokens, repeats, warmup):
    """Forward+backward of sp_delta_rule (GDN gate) per method; the local op alone for reference."""
    import torch.distributed as dist
    import torch.nn.functional as F

    from longseq.zeco import delta_rule, sp_delta_rule

    W = dist.group.WORLD
    H, K, V = DELTA_LAYER["H"], DELTA_LAYER["K"], DELTA_LAYER["V"]
    gen = torch.Generator().manual_seed(dist.get_rank())
    q, k = torch.randn(1, tokens, H, K, generator=gen), torch.randn(1, tokens, H, K, generator=gen)
    v = torch.randn(1, tokens, H, V, generator=gen)
    g = F.logsigmoid(torch.randn(1, tokens, H, generator=gen) + 3.0)
    beta = torch.rand(1, tokens, H, generator=gen)
    do = torch.randn(1, tokens, H, V, generator=gen)
    leaves = [x.requires_grad_() for x in (q, k, v, g, beta)]

    def step(method):
        def run():
            for x in leaves:
                x.grad = None
            if method == "local":
                o, _ = delta_rule(*leaves, use_qk_l2norm=True)
            else:
                o, _ = sp_delta_rule(*leaves, group=W, method=method, use_qk_l2norm=True, check=False)
            (o * do).sum().backward()
        return run
    methods = ["local", "zeco", "allgather", "p2p"] + (["heads"] if H % dist.get_world_size() == 0 else [])
    return _timed({m: step(m) for m in methods}, repeats, warmup)


def _worker(rank, world, port, job, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import torch.distributed as dist

    from longseq.ledger import LEDGER

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    LEDGER.enabled = False  # time the transport, not the bookkeeping
    try:
        res = {}
        if job.get("comm"):
            res["comm"] = _comm_part(STATES, job["repeats"], job["warmup"], job.get("sweep", False))
        if job.get("step"):
            res["step"] = _step_part(job["tokens"], job["step_repeats"], job.get("step_warmup", 1), job["methods"])
        if job.get("delta"):
            res["delta"] = _delta_part(job["tokens"], job["step_repeats"], job.get("step_warmup", 1))
        if rank == 0:
            queue.put(res)
    finally:
        dist.destroy_process_group()


def launch(world: int, job: dict, worker=None) -> dict:
    """Spawn ``world`` processes of ``worker(rank, world, port, job, queue)`` (default: this module's);
    returns what the first one puts in the queue."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker or _worker, args=(r, world, port, job, queue)) for r in range(world)]
    for p in procs:
        p.start()
    res = queue.get(timeout=600)
    for p in procs:
        p.join(timeout=60)
    return res


def _ms(t: float) -> str:
    return f"{t * 1e3:8.2f}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=512, help="tokens per rank in the end-to-end step")
    ap.add_argument("--step-repeats", type=int, default=3)
    ap.add_argument("--step-warmup", type=int, default=1)
    ap.add_argument("--sweep", action="store_true", help="All-Scan time for N = 1..64 blocks")
    ap.add_argument("--no-step", action="store_true", help="skip the end-to-end step")
    ap.add_argument("--delta", action="store_true", help="only the gated delta rule (sp_delta_rule) methods")
    args = ap.parse_args(argv)

    t_start = time.time()
    load0 = os.getloadavg()
    print(f"machine: {platform.machine()} {os.cpu_count()} CPU cores, torch {torch.__version__}, gloo over "
          f"127.0.0.1, 1 intra-op thread per process; python {platform.python_version()}")
    print(f"command: python -m longseq.benchmarks.zeco_scan {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    if args.delta:
        _delta_table(args)
        return
    results = {}
    for P in args.worlds:
        job = dict(comm=True, repeats=args.repeats, warmup=args.warmup, sweep=args.sweep,
                   step=not args.no_step, tokens=args.tokens, step_repeats=args.step_repeats,
                   step_warmup=args.step_warmup,
                   methods=["alone", "local", "zeco", "zeco-wait", "lasp1", "lasp2"])
        print(f"P={P}: starting {P} gloo processes on 127.0.0.1 ({os.cpu_count()} CPU cores here; --worlds sets the "
              "sizes) ...", file=sys.stderr, flush=True)
        results[P] = launch(P, job)

    print("\nPart 1: getting S0 (one layer's state), median ms of the slowest rank, "
          f"{args.repeats} repeats after {args.warmup} warm-up")
    head = f"{'state [B,H,K,V]':<26} {'MiB':>6} {'P':>2} {'N':>3} {'All-Scan':>9} {'LASP-1':>9} {'LASP-2':>9} {'AS/L2':>6}"
    print(head)
    print("-" * len(head))
    for name, shape in STATES.items():
        mib = torch.Size(shape).numel() * 4 / 2**20
        for P in args.worlds:
            r = results[P]["comm"][name]
            print(f"{name + ' ' + str(list(shape)):<26} {mib:6.2f} {P:>2} {r['N']:>3} {_ms(r['allscan']):>9} "
                  f"{_ms(r['lasp1']):>9} {_ms(r['lasp2']):>9} {r['allscan'] / r['lasp2']:6.2f}")
    if args.sweep:
        print("\nAll-Scan ms against N (blocks):")
        for name in STATES:
            for P in args.worlds:
                sw = results[P]["comm"][name]["sweep"]
                print(f"  {name:<10} P={P}: " + "  ".join(f"N={n}:{t * 1e3:.2f}" for n, t in sw.items()))
    if not args.no_step:
        print(f"\nPart 2: forward+backward of the GLA operator, 1b layer shape H={LAYER['H']} K={LAYER['K']} "
              f"V={LAYER['V']}, B=1, {args.tokens} tokens per rank; median s of the slowest rank, "
              f"{args.step_repeats} repeats after 1 warm-up")
        head = (f"{'P':>2} {'alone':>6} {'no-comm xP':>10} {'ZeCO':>7} {'ZeCO-wait':>9} {'LASP-1':>7} {'LASP-2':>7} "
                f"{'ZeCO/alone':>10} {'ZeCO/no-comm':>12} {'best ZeCO/no-comm':>17}")
        print(head)
        print("-" * len(head))
        for P in args.worlds:
            s = results[P]["step"]
            s1 = s["alone"]
            best = min(s["zeco"], s["zeco-wait"])
            print(f"{P:>2} {s1:6.3f} {s['local']:10.3f} {s['zeco']:7.3f} {s['zeco-wait']:9.3f} {s['lasp1']:7.3f} "
                  f"{s['lasp2']:7.3f} {s['zeco'] / s1:10.3f} {s['zeco'] / s['local']:12.3f} {best / s['local']:17.3f}")
        print("\nLedger of one step (forward + backward), per rank: messages, MiB sent / received")
        for P in args.worlds:
            for m, per_rank in results[P]["step"]["ledger"].items():
                cells = []
                for recs in per_rank:
                    n = len(recs)
                    sent = sum(r[4] for r in recs) / 2**20
                    got = sum(r[5] for r in recs) / 2**20
                    cells.append(f"{n:>2} msg {sent:5.2f}/{got:5.2f}")
                print(f"  P={P} {m:<10} " + " | ".join(cells))
        print("alone = rank 0 by itself (the others idle); no-comm xP = every rank runs the local operator on "
              "its tokens, no communication;\nZeCO = overlapped (default); ZeCO-wait = sp_gla(..., overlap=False): "
              "pipelined scan, then one local pass from the received state")
    print(f"\n(total {time.time() - t_start:.0f} s; load average at start {load0[0]:.1f}, at end "
          f"{os.getloadavg()[0]:.1f}: other work on the machine inflates and scatters these timings)")


def _delta_table(args) -> None:
    L = DELTA_LAYER
    print(f"\nGated delta rule (sp_delta_rule, GDN gate): forward+backward, H={L['H']} K={L['K']} V={L['V']}, B=1, "
          f"{args.tokens} tokens per rank; median s of the slowest rank, {args.step_repeats} repeats after "
          f"{args.step_warmup} warm-up")
    head = f"{'P':>2} {'local':>7} {'zeco':>7} {'allgather':>9} {'p2p':>7} {'heads':>7} {'zeco/local':>10}"
    print(head)
    print("-" * len(head))
    for P in args.worlds:
        d = launch(P, dict(delta=True, tokens=args.tokens, step_repeats=args.step_repeats,
                           step_warmup=args.step_warmup))["delta"]
        hs = f"{d['heads']:7.3f}" if "heads" in d else f"{'n/a':>7}"
        print(f"{P:>2} {d['local']:7.3f} {d['zeco']:7.3f} {d['allgather']:9.3f} {d['p2p']:7.3f} {hs} "
              f"{d['zeco'] / d['local']:10.3f}")
    print(f"(load average {os.getloadavg()[0]:.1f}: other work on the machine inflates and scatters these timings)")


if __name__ == "__main__":
    main()
