"""Bandwidth of the fused kernels (longseq.kernels) against a device copy, the physical limit.

    python -m longseq.benchmarks.switch_kernels                        # CUDA: ST-DiT 720M shapes, bf16
    python -m longseq.benchmarks.switch_kernels --device cpu --frames 4 --spatial 64 --channels 32 --repeats 3
    python -m longseq.benchmarks.switch_kernels --out-dir build/gpu-checks   # also writes .md and .json

One process, no communication. Table 1 (**switch**): for each frame count T and group size P, the
T->S switch of one rank of ST-DiT (``[B, T/P, S, C]`` in, scatter S, gather T) and the S->T switch
back, split into its two copies: *pack* (the strided activation -> the all-to-all's send buffer)
and *unpack* (the received buffer -> the output layout). Each backend of ``longseq.kernels``
(``torch``, ``triton``, ``cuda``; a backend that cannot run here is listed with the reason) and the
code the fused kernels replaced (``old``: ``movedim().reshape()`` to pack, ``torch.cat`` + ``movedim``
+ ``.contiguous()`` to unpack) are timed against ``copy``: ``dst.copy_(src)`` of two contiguous
tensors of the same size. GB/s counts one read and one write of the tensor (2 x its bytes); "% copy"
is the row's GB/s over the copy's.

Table 2 (**scan**): All-Scan's block update ``out = decay * inp + local`` for the 1b layer's state
(``[B, H, K, V] = [1, 4, 256, 512]``, float32, per-row decay) in ``N`` blocks, with a float32 and a
bfloat16 local: the fused kernel of each backend against the code it replaced (``old``: cast the
local to float32 once, then ``torch.addcmul`` per block) and the PyTorch reference (multiply, then
add). Time per whole state (all N blocks), GB/s counting the bytes read and written.

Timing: CUDA events (``time.perf_counter`` on CPU), the median of ``--repeats`` after ``--warmup``;
the rows of one shape run round-robin. Triton's tiles are pinned (no autotuning); the CUDA extension
JIT-compiles on first use unless built (docs/dsp.md).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from longseq import kernels
from longseq.sharding import split_sizes

_REF = "torch (reference: mul, add)"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@contextlib.contextmanager
def _forced(backend: Optional[str]):
    old = os.environ.get(kernels.ENV_VAR)
    if backend is not None:
        os.environ[kernels.ENV_VAR] = backend
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(kernels.ENV_VAR, None)
        else:
            os.environ[kernels.ENV_VAR] = old


def _timer(device: torch.device):
    if device.type == "cuda":
        def run(fn):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            return a.elapsed_time(b) / 1e3
    else:
        def run(fn):
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
    return run


def _old_pack(x, sd):
    """The pack comm.all_to_all did before the kernels: scatter dim to the front, flatten."""
    return x.movedim(sd, 0).reshape(-1)


def _old_unpack(buf, shape, gd, sizes, sd):
    """The unpack it did: view the pieces [n_sd_local, ...], cat along the gather dim, move back."""
    front = list(shape)
    n = front.pop(sd)
    g = gd + 1 if gd < sd else gd
    pieces, start = [], 0
    for s in sizes:
        ps = [n] + front
        ps[g] = s
        k = 1
        for v in ps:
            k *= v
        pieces.append(buf[start:start + k].view(ps))
        start += k
    return torch.cat(pieces, dim=g).movedim(0, sd).contiguous()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.element_size() == 2 else t


def _same(pack_fn, unpack_fn, want) -> bool:
    """The backend's pack and unpack equal the PyTorch path bit for bit."""
    got = (pack_fn(), unpack_fn())
    return all(torch.equal(_bits(a), _bits(b)) for a, b in zip(got, want))


def _backends(device: torch.device) -> list:
    """[(name, reason it cannot run or None)] for the three backends."""
    return [(b, kernels.unavailable_reason(b, device)) for b in kernels.BACKENDS]


def _median_rounds(fns: dict, args, timer) -> dict:
    times = {k: [] for k in fns}
    for rnd in range(args.warmup + args.repeats):
        for k, fn in fns.items():
            t = timer(fn)
            if rnd >= args.warmup:
                times[k].append(t)
    return {k: statistics.median(v) for k, v in times.items()}


def switch_rows(T: int, P: int, args, device: torch.device) -> list:
    """Rows for the T->S and S->T switches of one rank at [B, T, S, C] over P ranks."""
    B, S, C, dt = args.batch, args.spatial, args.channels, DTYPES[args.dtype]
    timer = _timer(device)
    rows = []
    # (name, local input shape, scatter dim, gather dim): dims of [B, T, S, C]
    for name, sd, gd in [("T->S", 2, 1), ("S->T", 1, 2)]:
        whole = [B, T, S, C]
        local = list(whole)
        local[gd] = split_sizes(whole[gd], P)[0]
        x = torch.randn(*local, device=device).to(dt)
        send = split_sizes(local[sd], P)
        out_shape = list(local)
        out_shape[sd], out_shape[gd] = send[0], whole[gd]
        gsizes = split_sizes(whole[gd], P)
        nbytes = 2 * x.numel() * x.element_size()
        src, dst = torch.empty_like(x), torch.empty_like(x)
        fns: dict[str, Callable] = {"copy": lambda: dst.copy_(src)}
        # a received buffer of the output's size (an all-to-all keeps the element count)
        recv = torch.randn(int(torch.Size(out_shape).numel()), device=device).to(dt)
        fns["old pack"] = lambda: _old_pack(x, sd)
        fns["old unpack"] = lambda: _old_unpack(recv, out_shape, gd, gsizes, sd)
        skipped = {}
        for b, why in _backends(device):
            if why is not None:
                skipped[b] = why
                continue

            def pk(_b=b):
                with _forced(_b):
                    return kernels.pack(x, sd, send)

            def up(_b=b):
                with _forced(_b):
                    return kernels.unpack(recv, out_shape, gd, gsizes)

            fns[f"{b} pack"], fns[f"{b} unpack"] = pk, up
        with _forced("torch"):
            want = (kernels.pack(x, sd, send), kernels.unpack(recv, out_shape, gd, gsizes))
        exact = {b: _same(fns[f"{b} pack"], fns[f"{b} unpack"], want) for b, why in _backends(device) if why is None}
        med = _median_rounds(fns, args, timer)
        copy_gbs = nbytes / med["copy"] / 1e9
        shape = "x".join(map(str, local))
        rows.append(dict(switch=name, T=T, P=P, shape=shape, backend="copy", pack_ms=med["copy"] * 1e3,
                         unpack_ms=None, pack_gbs=copy_gbs, unpack_gbs=None, pack_pct=100.0, unpack_pct=None))
        for b in ["old"] + [b for b, _ in _backends(device)]:
            if b in skipped:
                rows.append(dict(switch=name, T=T, P=P, shape=shape, backend=b, note=skipped[b]))
                continue
            p, u = med[f"{b} pack"], med[f"{b} unpack"]
            rows.append(dict(switch=name, T=T, P=P, shape=shape, backend=b, exact=exact.get(b),
                             pack_ms=p * 1e3, unpack_ms=u * 1e3,
                             pack_gbs=nbytes / p / 1e9, unpack_gbs=nbytes / u / 1e9,
                             pack_pct=100 * (nbytes / p / 1e9) / copy_gbs,
                             unpack_pct=100 * (nbytes / u / 1e9) / copy_gbs))
    return rows


def scan_rows(args, device: torch.device) -> list:
    """Rows for All-Scan's block update of one [B, H, K, V] state in N blocks."""
    B, H, K, V = args.state
    rows_n, cols = B * H * K, V
    timer = _timer(device)
    out_rows = []
    for local_dt in (torch.float32, torch.bfloat16):
        g = torch.Generator(device="cpu").manual_seed(0)
        inp = torch.randn(rows_n, cols, generator=g).to(device)
        local = torch.randn(rows_n, cols, generator=g).to(device=device, dtype=local_dt)
        decay = torch.rand(rows_n, 1, generator=g).to(device)
        out = torch.empty(rows_n, cols, device=device)
        bounds = [(sum(split_sizes(rows_n, args.blocks)[:j]), sum(split_sizes(rows_n, args.blocks)[:j + 1]))
                  for j in range(args.blocks)]
        nbytes = (inp.numel() + out.numel()) * 4 + local.numel() * local.element_size() + decay.numel() * 4

        def old():
            loc = local.float()
            for r0, r1 in bounds:
                torch.addcmul(loc[r0:r1], decay[r0:r1], inp[r0:r1], out=out[r0:r1])

        fns: dict[str, Callable] = {"old (cast, addcmul)": old}
        skipped = {}
        for b, why in _backends(device):
            if why is not None:
                skipped[b] = why
                continue

            def fused(_b=b):
                with _forced(_b):
                    for r0, r1 in bounds:
                        kernels.scan_update(out[r0:r1], inp[r0:r1], local[r0:r1], decay[r0:r1])
                return out.clone()

            fns[_REF if b == "torch" else b + " fused"] = fused
        exact = {k: torch.equal(fn(), fns[_REF]()) for k, fn in fns.items() if k != "old (cast, addcmul)"}
        med = _median_rounds(fns, args, timer)
        base = med["old (cast, addcmul)"]
        name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[local_dt]
        for k, t in med.items():
            out_rows.append(dict(local=name, state="x".join(map(str, args.state)), N=args.blocks, row=k,
                                 exact=exact.get(k), ms=t * 1e3, gbs=nbytes / t / 1e9, vs_old=base / t))
        for b, why in skipped.items():
            out_rows.append(dict(local=name, state="x".join(map(str, args.state)), N=args.blocks, row=b, note=why))
    return out_rows


def _f(v, fmt):
    return "-" if v is None else format(v, fmt)


def _exact(v) -> str:
    return "-" if v is None else ("bitwise" if v else "DIFFERS")


def format_switch(rows: list) -> str:
    lines = ["| switch | T | P | local shape | backend | = torch | pack ms | pack GB/s | pack % copy | unpack ms | "
             "unpack GB/s | unpack % copy |", "|" + "---|" * 12]
    for r in rows:
        if "note" in r:
            lines.append(f"| {r['switch']} | {r['T']} | {r['P']} | {r['shape']} | {r['backend']} | "
                         f"not run: {r['note']} |" + " |" * 6)
            continue
        lines.append(f"| {r['switch']} | {r['T']} | {r['P']} | {r['shape']} | {r['backend']} | "
                     f"{_exact(r.get('exact'))} | {_f(r['pack_ms'], '.3f')} | {_f(r['pack_gbs'], '.1f')} | {_f(r['pack_pct'], '.0f')} | "
                     f"{_f(r['unpack_ms'], '.3f')} | {_f(r['unpack_gbs'], '.1f')} | {_f(r['unpack_pct'], '.0f')} |")
    return "\n".join(lines)


def format_scan(rows: list) -> str:
    lines = ["| local | state | N | update | = torch | ms per state | GB/s | speed-up vs old |", "|" + "---|" * 8]
    for r in rows:
        if "note" in r:
            lines.append(f"| {r['local']} | {r['state']} | {r['N']} | {r['row']} | not run: {r['note']} | | | |")
        else:
            lines.append(f"| {r['local']} | {r['state']} | {r['N']} | {r['row']} | {_exact(r.get('exact'))} | "
                         f"{r['ms']:.4f} | "
                         f"{r['gbs']:.1f} | {r['vs_old']:.2f} |")
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--frames", type=int, nargs="+", default=[16, 32, 64], help="T (whole)")
    p.add_argument("--procs", type=int, nargs="+", default=[8], help="P, the SP group size")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--spatial", type=int, default=4096, help="S (whole)")
    p.add_argument("--channels", type=int, default=1152, help="C")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--state", type=int, nargs=4, default=[1, 4, 256, 512], metavar=("B", "H", "K", "V"))
    p.add_argument("--blocks", type=int, default=4, help="N of the scan table")
    p.add_argument("--parts", nargs="+", default=["switch", "scan"], choices=["switch", "scan"])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out-dir", default=None, help="write switch_kernels.md and switch_kernels.json here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available; use --device cpu")
    env = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
               torch=torch.__version__, triton_interpret=os.environ.get("TRITON_INTERPRET", "0"))
    header = "# " + ", ".join(f"{k} {v}" for k, v in env.items())
    print(header, flush=True)
    blob: dict = dict(env=env, switch=[], scan=[])
    text = [header]
    if "switch" in args.parts:
        for P in args.procs:
            for T in args.frames:
                if T < P or args.spatial < P:
                    p.error(f"T={T} and S={args.spatial} must be >= P={P}")
                blob["switch"] += switch_rows(T, P, args, device)
        t = f"\nswitch pack / unpack, {args.dtype}, B={args.batch} S={args.spatial} C={args.channels}\n" + \
            format_switch(blob["switch"])
        print(t, flush=True)
        text.append(t)
    if "scan" in args.parts:
        blob["scan"] = scan_rows(args, device)
        t = "\nAll-Scan block update, float32 state, per-row decay\n" + format_scan(blob["scan"])
        print(t, flush=True)
        text.append(t)
    bad = [r for r in blob["switch"] + blob["scan"] if r.get("exact") is False]
    if args.out_dir:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "switch_kernels.md").write_text("\n".join(text) + "\n")
        (out / "switch_kernels.json").write_text(json.dumps(blob, indent=1))
    if bad:
        print(f"FAIL: {len(bad)} rows differ from the PyTorch path", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
