"""What ZeCO adds to one rank's local GLA work, against fla's own ``chunk_gla`` without SP.

    python -m longseq.benchmarks.gla_local_overhead                       # CUDA + fla: the 1b layer, bf16 and fp32
    python -m longseq.benchmarks.gla_local_overhead --tokens 8192 32768 --dtypes bf16 --json out.json
    python -m longseq.benchmarks.gla_local_overhead --device cpu --tokens 256 --heads 2 --head-k 16 --head-v 32

One process, one device, no communication. Each row is one forward + backward (autograd, random
``do``) of the GLA operator over this rank's ``T`` tokens at the layer shape ``[B, T, H, K]`` /
``[B, T, H, V]`` (default: the 1b preset, H=4, K=256, V=512, B=1):

* ``fla chunk_gla``: fla's own autograd function, no sequence parallelism (the reference; on CPU,
  where fla's Triton kernels do not run, ``zeco.gla(backend="torch")`` takes its place);
* ``zeco.gla``: the project's local operator (``backend="auto"``: fla's chunk kernels on CUDA),
  which is what rank 0 and rank P-1 run inside ``sp_gla``;
* ``sp_gla <method> rank r/P``: the real :func:`zeco.sp_gla` as rank ``r`` of ``P`` on a fake
  process group (PyTorch's ``fake`` backend: collectives return at once, nothing moves), so the row
  is exactly that rank's local compute: for ZeCO's middle ranks the local summary, the local op from
  a zero state and the O(T·K·V) correction passes forward and backward (the work All-Scan hides
  its messages under); with ``overlap=False`` the plain local op from the received state.

Timings: CUDA events (``time.perf_counter`` on CPU), forward and backward timed apart, the median
of ``--repeats`` after ``--warmup``; the rows of one shape are run round-robin, so a change in the
device's clock affects them alike. ``ratio`` is the row's forward+backward over the reference's.
Peak memory (CUDA) is the allocator's peak during one forward+backward above what the inputs hold.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from typing import Optional

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _inputs(B, T, H, K, V, dtype, device, scalar: bool, seed: int = 0):
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    q, k, v = r(B, T, H, K), r(B, T, H, K), r(B, T, H, V)
    # decays like a trained GLA layer: logsigmoid of a projection, divided by 16 (fla's gate norm)
    g = torch.nn.functional.logsigmoid(torch.randn(*((B, T, H) if scalar else (B, T, H, K)), generator=gen)) / 16
    g = g.to(device=device, dtype=dtype)
    do = r(B, T, H, V)
    return [q, k, v, g], do


def _make_rows(args, scalar: bool, have_fla: bool) -> list:
    """[(name, fn(q, k, v, g[, _grp]) -> o, rank on the fake group or None)] in the order printed; the first
    is the reference."""
    from longseq.zeco import gla, sp_gla

    rows = []
    if have_fla:
        from fla.ops.gla import chunk_gla
        from fla.ops.simple_gla import chunk_simple_gla

        ref = chunk_simple_gla if scalar else chunk_gla
        rows.append((f"fla {'chunk_simple_gla' if scalar else 'chunk_gla'} (no SP)",
                     lambda q, k, v, g: ref(q, k, v, g)[0], None))
    else:
        rows.append(("zeco.gla torch backend (reference)",
                     lambda q, k, v, g: gla(q, k, v, g, backend="torch")[0], None))
    rows.append(("zeco.gla (rank 0 / P-1 of sp_gla)", lambda q, k, v, g: gla(q, k, v, g)[0], None))
    P = args.world
    for method, rank, overlap in [("zeco", 1, True), ("zeco", 1, False), ("zeco", 0, True),
                                  ("zeco", P - 1, True), ("lasp2", 1, True)]:
        name = f"sp_gla {method} rank {rank}/{P}" + ("" if method != "zeco" or overlap else " overlap=False")

        def fn(q, k, v, g, _m=method, _o=overlap, _grp=None):
            return sp_gla(q, k, v, g, group=_grp, method=_m, overlap=_o, check=False)[0]

        rows.append((name, fn, rank))
    return rows


def _timer(device):
    if device.type == "cuda":
        def start():
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e

        def stop(e):
            e2 = torch.cuda.Event(enable_timing=True)
            e2.record()
            e2.synchronize()
            return e.elapsed_time(e2) / 1e3
    else:
        def start():
            return time.perf_counter()

        def stop(t0):
            return time.perf_counter() - t0
    return start, stop


def _step(fn, xs, do, start, stop):
    xs = [x.detach().requires_grad_(True) for x in xs]
    t0 = start()
    o = fn(*xs)
    tf = stop(t0)
    t1 = start()
    o.backward(do)
    tb = stop(t1)
    return tf, tb


@contextlib.contextmanager
def _role(rank: Optional[int], P: int):
    """Inside: this process is ``rank`` of ``P`` on a fake group (None: no group needed)."""
    if rank is None:
        yield None
        return
    from longseq.benchmarks.costmodel.fakepg import fake_world

    with fake_world(rank, P) as grp:
        yield grp


def measure(B, T, H, K, V, dtype, device, scalar: bool, args, have_fla: bool) -> list:
    """Rows ``{name, fwd_ms, bwd_ms, total_ms, ratio, peak_mib}`` for one shape."""
    xs, do = _inputs(B, T, H, K, V, dtype, device, scalar)
    start, stop = _timer(device)
    rows = _make_rows(args, scalar, have_fla)
    times = {name: ([], []) for name, _, _ in rows}
    peaks = {}
    for rnd in range(args.warmup + args.repeats):
        for name, fn, rank in rows:
            with _role(rank, args.world) as grp:
                f = (lambda *a, _fn=fn, _g=grp: _fn(*a, _grp=_g)) if rank is not None else fn
                if device.type == "cuda" and name not in peaks:
                    torch.cuda.synchronize()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                tf, tb = _step(f, xs, do, start, stop)
                if device.type == "cuda" and name not in peaks:
                    peaks[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
            if rnd >= args.warmup:
                times[name][0].append(tf)
                times[name][1].append(tb)
    out = []
    ref_total = None
    for name, _, _ in rows:
        fwd = statistics.median(times[name][0]) * 1e3
        bwd = statistics.median(times[name][1]) * 1e3
        total = fwd + bwd
        ref_total = ref_total or total
        out.append(dict(name=name, fwd_ms=fwd, bwd_ms=bwd, total_ms=total, ratio=total / ref_total,
                        peak_mib=peaks.get(name)))
    return out


def format_table(title: str, rows: list) -> str:
    lines = [title, f"| {'operator':<44} | {'fwd ms':>8} | {'bwd ms':>8} | {'fwd+bwd':>8} | {'ratio':>6} | "
                    f"{'peak MiB':>8} |", f"|{'-' * 46}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 8}|{'-' * 10}|"]
    for r in rows:
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        lines.append(f"| {r['name']:<44} | {r['fwd_ms']:>8.3f} | {r['bwd_ms']:>8.3f} | {r['total_ms']:>8.3f} | "
                     f"{r['ratio']:>6.2f} | {peak:>8} |")
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768], help="T per rank")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-k", type=int, default=256)
    p.add_argument("--head-v", type=int, default=512)
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    p.add_argument("--decay", nargs="+", default=["per-key", "scalar"], choices=["per-key", "scalar"])
    p.add_argument("--world", type=int, default=4, help="P of the fake group for the sp_gla rows (>= 3)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", default=None, help="also write every row here")
    args = p.parse_args(argv)
    if args.world < 3:
        p.error("--world must be at least 3 (first, middle and last ranks)")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available; use --device cpu")
    from longseq.zeco.gla import fla_available

    have_fla = device.type == "cuda" and fla_available()
    if device.type == "cuda" and not have_fla:
        print("note: fla is not importable (pip install flash-linear-attention); the reference row is "
              "zeco.gla's PyTorch backend and zeco.gla runs it too", file=sys.stderr)
    env = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
               torch=torch.__version__)
    if have_fla:
        import fla
        import triton
        env.update(fla=getattr(fla, "__version__", "?"), triton=triton.__version__)
    print("# " + ", ".join(f"{k} {v}" for k, v in env.items()))
    results = []
    for decay in args.decay:
        for dt in args.dtypes:
            for T in args.tokens:
                rows = measure(args.batch, T, args.heads, args.head_k, args.head_v, DTYPES[dt], device,
                               decay == "scalar", args, have_fla)
                title = (f"\n{decay} decay, {dt}, B={args.batch} T={T} H={args.heads} K={args.head_k} "
                         f"V={args.head_v} (fake group P={args.world} for the sp_gla rows)")
                print(format_table(title, rows), flush=True)
                results.append(dict(decay=decay, dtype=dt, B=args.batch, T=T, H=args.heads, K=args.head_k,
                                    V=args.head_v, P=args.world, rows=rows))
                if args.json:  # rewritten after every shape: a run cut short keeps what it measured
                    with open(args.json, "w") as f:
                        json.dump(dict(env=env, results=results), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
