"""What the cross-rank check costs a direct call: checked vs unchecked, side by side.

    python -m longseq.benchmarks.checks                               # P = 2, 4; 4 KiB, 512 KiB, 4 MiB
    python -m longseq.benchmarks.checks --world 2 --sizes 4096 --rounds 5

For each group size P (gloo processes on 127.0.0.1, one thread each) and each size (bytes of the
main input per rank, float32), each entry -- ``dsp.switch``, ``ulysses_attention``,
``ring_attention``, ``zeco.sp_gla``, ``zeco.sp_delta_rule`` -- is called forward with its check
(``check=True``: one 24-byte header all-gather, :mod:`longseq.agree`) and without
(``check=False``), in interleaved rounds (the order alternates each round): a round times
``--reps`` calls of one variant after a barrier, the slowest rank's time counts. Printed per row:
the median time per call of each variant, the median of the per-round ratios checked/unchecked and
their spread (max - min over rounds). Warm-up rounds are excluded. Shapes per size ``n`` (floats):
switch ``[8, 16P, n/128P]`` (scatter dim 1, gather dim 0); ulysses / ring q, k, v ``[1, 16, 8,
n/128]``; sp_gla q, k ``[1, 16, 4, n/64]``, v ``[1, 16, 4, 8]``; sp_delta_rule q, k ``[1, n/32, 2,
16]``, v ``[1, n/32, 2, 16]`` (sizes below 16 KiB use 16 tokens).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

ENTRIES = ("dsp.switch", "ulysses", "ring", "sp_gla", "sp_delta_rule")


def _make(entry: str, n: int, P: int, r: int):
    """A callable ``f(check)`` running one forward call of ``entry`` on this rank's inputs."""
    import torch.distributed as dist

    from longseq import dsp, zeco
    from longseq.sp import ring_attention, ulysses_attention
    W = dist.group.WORLD
    g = torch.Generator().manual_seed(r)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    if entry == "dsp.switch":
        x = rnd(8, 16 * P, max(1, n // (128 * P)))
        return lambda c: dsp.switch(x, W, 1, 0, gather_size=8 * P, check=c)
    if entry in ("ulysses", "ring"):
        q, k, v = (rnd(1, 16, 8, max(1, n // 128)) for _ in range(3))
        fn = ulysses_attention if entry == "ulysses" else ring_attention
        return lambda c: fn(q, k, v, W, check=c)
    if entry == "sp_gla":
        q, k = (rnd(1, 16, 4, max(1, n // 64)) for _ in range(2))
        v = rnd(1, 16, 4, 8)
        gate = -torch.rand(1, 16, 4, q.shape[-1], generator=g)
        return lambda c: zeco.sp_gla(q, k, v, gate, group=W, check=c)
    T = max(16, n // 32)
    q, k = (rnd(1, T, 2, 16) for _ in range(2))
    v = rnd(1, T, 2, 16)
    gate, beta = -torch.rand(1, T, 2, generator=g), torch.rand(1, T, 2, generator=g)
    return lambda c: zeco.sp_delta_rule(q, k, v, gate, beta, group=W, check=c)


def _worker(rank: int, world: int, port: int, args, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from longseq import comm
    dist.init_process_group("gloo", rank=rank, world_size=world)
    W = dist.group.WORLD
    rows = []
    for size in args.sizes:
        for entry in args.entries:
            f = _make(entry, size // 4, world, rank)
            times = {True: [], False: []}
            for rnd in range(args.warmup + args.rounds):
                order = (True, False) if rnd % 2 == 0 else (False, True)
                for c in order:
                    comm.all_reduce(torch.zeros(1), W, tag="bench.barrier")
                    t0 = time.perf_counter()
                    for _ in range(args.reps):
                        f(c)
                    dt = torch.tensor([(time.perf_counter() - t0) / args.reps])
                    dt = comm.all_reduce(dt, W, op=dist.ReduceOp.MAX, tag="bench.max")
                    if rnd >= args.warmup:
                        times[c].append(float(dt))
            ratios = [a / b for a, b in zip(times[True], times[False])]
            rows.append((entry, size, statistics.median(times[True]), statistics.median(times[False]),
                         statistics.median(ratios), max(ratios) - min(ratios)))
    if rank == 0:
        out.put(rows)
    dist.destroy_process_group()


def _human(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB" if n >= 1024 else f"{n} B"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", type=int, nargs="+", default=[2, 4])
    p.add_argument("--sizes", type=int, nargs="+", default=[4 << 10, 512 << 10, 4 << 20], help="bytes per rank")
    p.add_argument("--entries", nargs="+", default=list(ENTRIES), choices=ENTRIES)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    import torch.multiprocessing as mp

    from longseq.launch import free_port
    print(f"checked (check=True) vs unchecked (check=False) direct forward calls; {args.rounds} interleaved "
          f"rounds of {args.reps} calls after {args.warmup} warm-up; median per call, slowest rank")
    print(f"{'P':>2} {'entry':<14} {'size/rank':>9} {'checked':>11} {'unchecked':>11} {'ratio':>6} {'spread':>7}")
    for world in args.world:
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        port = free_port()
        procs = [ctx.Process(target=_worker, args=(r, world, port, args, q)) for r in range(world)]
        for pr in procs:
            pr.start()
        rows = q.get()
        for pr in procs:
            pr.join()
        for entry, size, tc, tu, ratio, spread in rows:
            print(f"{world:>2} {entry:<14} {_human(size):>9} {tc * 1e6:>9.0f}us {tu * 1e6:>9.0f}us {ratio:>6.3f} "
                  f"{spread:>7.3f}", flush=True)


if __name__ == "__main__":
    main()
