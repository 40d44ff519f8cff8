"""torch.compile vs eager under DSP and ZeCO, and longseq's ring / Ulysses vs PyTorch's context_parallel.

    python -m longseq.benchmarks.compile_peer                          # both parts (compile: P = 2; peer: P = 2, 4)
    python -m longseq.benchmarks.compile_peer --part peer --procs 2 4 --rounds 5
    python -m longseq.benchmarks.compile_peer --update-docs            # also paste the tables into docs/compile.md

**compile** (2 gloo processes): one training step (forward, loss, backward) of an ST-DiT (tiny, 2
blocks, 8 frames of 8x8 tokens) under DSP with every block compiled (``blk.compile(fullgraph=True)``),
and of a one-layer GLA LM (tiny, 2048 tokens) under ZeCO with its layer compiled, against the same
models eager. The first compiled step is timed apart (it compiles forward and backward: the compile
time stated is that step minus a compiled step); then, after one warm-up step of each, interleaved
rounds (eager and compiled in a fresh order each round, after a barrier; slowest rank): median,
min-max, and the median of per-round ratios compiled / eager.

**peer**: attention over the whole sequence on identical ``q, k, v`` (``[B, T, H, D]``, every rank
makes the same whole tensors from one seed and takes its contiguous piece) at each P: longseq's
``ring_attention`` and ``ulysses_attention``, and PyTorch's ``context_parallel`` (the ring attention of
``torch.distributed.tensor.experimental``, buffers sharded along the sequence, then
``F.scaled_dot_product_attention`` inside the context) under the SDPA backends of ``--cp-backends``
(default math: under the flash backend it did not return on CPU, see docs/compile.md) and each of
causal / non-causal. For each: whether it runs, its error
against one process's attention on the whole sequence (after ``context_parallel_unshard`` for
PyTorch's, whose causal sharding is load-balanced; ``layout err``: the error if the output is read
as the contiguous piece), and forward + backward time in interleaved rounds (the ratio is to
longseq's ring in the same round; PyTorch's time includes its sharding of the buffers, a local copy).

Writes ``--out`` (default benchmarks/results/compile_peer_cpu.json) and a markdown table next to it
(``.md``); ``--update-docs`` pastes it into docs/compile.md's block named after the file
(``--part compile --out benchmarks/results/compile_cpu.json`` and ``--part peer --out
benchmarks/results/peer_cpu.json`` are the two blocks there).
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

from longseq.benchmarks.paths import output



# ----------------------------------------------------------------------------------------------
# compile: eager vs torch.compile (every rank)
# ----------------------------------------------------------------------------------------------
def _param_step(model, fwd_loss):
    def step():
        for p in model.parameters():
            p.grad = None
        fwd_loss().backward()
    return step


def compile_worker(rounds: int) -> dict:
    import torch
    import torch.distributed as dist
    from longseq import dsp, zeco
    from longseq.models import STDiT, init_for_testing, stdit_config
    from longseq.models.gla import GLAForCausalLM, gla_config

    torch._dynamo.reset()
    W = dist.group.WORLD
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 16, 16, generator=g)                  # T = 8 frames, 8x8 tokens a frame (patch 2)
    ts, y = torch.rand(1, generator=g) * 1000, torch.randn(1, 3, 16, generator=g)
    target = torch.randn(1, 4, 8, 16, 16, generator=g)
    ids = torch.randint(0, 64, (1, 2048), generator=g)
    ids_l = zeco.shard_sequence(ids, W)
    labels = zeco.shard_sequence(zeco.shift_labels(ids), W)
    steps, first = {}, {}
    for compiled in (False, True):
        m = init_for_testing(STDiT(stdit_config("tiny", patch_size=2, depth=2)), std=0.1, seed=0)
        dsp.parallelize(m, W)
        if compiled:
            for blk in m.blocks:
                blk.compile(fullgraph=True)
        steps[("dsp", compiled)] = _param_step(
            m, lambda m=m: torch.nn.functional.mse_loss(m(x, ts, y, None), target))
        torch.manual_seed(0)
        lm = GLAForCausalLM(gla_config("tiny", num_layers=1, backend="torch"))
        zeco.parallelize(lm, W, method="zeco", check=False)
        if compiled:
            lm.layers[0].compile(fullgraph=True)
        steps[("zeco", compiled)] = _param_step(lm, lambda lm=lm: zeco.sp_lm_loss(lm(ids_l), labels, W))
    for key, step in steps.items():
        dist.barrier()
        t0 = time.perf_counter()
        step()
        first[key] = time.perf_counter() - t0
        step()                                                     # one more warm-up
    times = {key: [] for key in steps}
    for rd in range(rounds):
        order = list(steps)
        random.Random(rd).shuffle(order)
        for key in order:
            dist.barrier()
            t0 = time.perf_counter()
            steps[key]()
            times[key].append(time.perf_counter() - t0)
    return dict(first={f"{k[0]}|{k[1]}": v for k, v in first.items()},
                times={f"{k[0]}|{k[1]}": v for k, v in times.items()})


# ----------------------------------------------------------------------------------------------
# peer: longseq ring / Ulysses vs torch context_parallel (every rank)
# ----------------------------------------------------------------------------------------------
def _cp_call(mesh, q, k, v, causal: bool, backend):
    """PyTorch's context_parallel attention on whole ``[B, H, T, D]`` q, k, v; returns (this rank's
    output piece as produced, the output unsharded to the whole sequence, the inputs used)."""
    import torch
    import torch.nn.functional as F
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import context_parallel_unshard
    from torch.nn.attention import sdpa_kernel

    bufs = [t.detach().clone() for t in (q, k, v)]
    # the context shards the buffers in place and restores them on exit, so they cannot require grad
    # (a leaf that requires grad cannot be resized): the attention runs on grad-requiring copies
    with context_parallel(mesh, buffers=bufs, buffer_seq_dims=[2, 2, 2]):
        xs = [t.detach().clone().requires_grad_() for t in bufs]
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(*xs, is_causal=causal)
            out.sum().backward()
        out = out.detach().clone()
    whole = context_parallel_unshard(mesh, [out], [2])[0]
    return out, whole


def peer_worker(B: int, T: int, H: int, D: int, rounds: int, cp_backends: tuple = ("math",)) -> dict:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.attention import SDPBackend

    from longseq.sharding import shard_range
    from longseq.sp.ring import ring_attention
    from longseq.sp.ulysses import ulysses_attention

    W = dist.group.WORLD
    P, me = dist.get_world_size(), dist.get_rank()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, generator=g) for _ in range(3))
    lo, hi = shard_range(T, P, me)
    mesh = init_device_mesh("cpu", (P,))
    res = {}

    def ref(causal):
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
        return o.transpose(1, 2)                                   # [B, T, H, D]

    def longseq_fn(fn, causal):
        def run():
            ql, kl, vl = (t[:, lo:hi].clone().requires_grad_() for t in (q, k, v))
            o = fn(ql, kl, vl, W, causal=causal)
            o.sum().backward()
            return o.detach()
        return run

    cands = {}
    for causal in (False, True):
        r = ref(causal)
        for name, fn in (("longseq ring", ring_attention), ("longseq ulysses", ulysses_attention)):
            cands[(name, causal)] = longseq_fn(fn, causal)
        for bname, be in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("math", SDPBackend.MATH)):
            if bname not in cp_backends:
                continue
            cands[(f"torch cp {bname}", causal)] = (
                lambda be=be, causal=causal: _cp_call(mesh, q.transpose(1, 2), k.transpose(1, 2),
                                                      v.transpose(1, 2), causal, be))
    runnable = {}
    for (name, causal), fn in cands.items():
        r = ref(causal)
        entry = dict(name=name, causal=causal)
        try:
            dist.barrier()
            out = fn()
            if name.startswith("torch"):
                piece, whole = out
                entry["err"] = float((whole.transpose(1, 2) - r).abs().max())
                entry["layout_err"] = float((piece.transpose(1, 2) - r[:, lo:hi]).abs().max()) \
                    if piece.shape[2] == hi - lo else float("nan")
            else:
                entry["err"] = float((out - r[:, lo:hi]).abs().max())
            entry["ok"] = True
            runnable[(name, causal)] = fn
        except Exception as e:  # noqa: BLE001 - record why a variant does not run
            entry["ok"] = False
            entry["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}" if str(e).strip() else \
                traceback.format_exc().splitlines()[-1][:200]
        # every rank must agree on what runs (a variant failing on one rank only would hang the next)
        ok = torch.tensor([1 if entry["ok"] else 0])
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if not int(ok) and (name, causal) in runnable:
            del runnable[(name, causal)]
            entry["ok"] = False
        res[f"{name}|{causal}"] = entry
    times = {f"{n}|{c}": [] for n, c in runnable}
    for rd in range(rounds):
        order = list(runnable)
        random.Random(rd).shuffle(order)
        for key in order:
            dist.barrier()
            t0 = time.perf_counter()
            runnable[key]()
            times[f"{key[0]}|{key[1]}"].append(time.perf_counter() - t0)
    return dict(entries=res, times=times)


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------
def _steps(per_rank: list, key: str) -> list:
    n = len(per_rank[0]["times"][key])
    return [max(r["times"][key][i] for r in per_rank) for i in range(n)]


def _fmt(ts: list) -> str:
    return f"{statistics.median(ts) * 1e3:.1f} ({min(ts) * 1e3:.0f}-{max(ts) * 1e3:.0f})"


def compile_table(per_rank: list) -> list[str]:
    lines = ["| model (P = 2) | eager step ms | compiled step ms | compiled / eager (per round) | "
             "first compiled step s | compile s (first - step), slowest rank |", "|---|---|---|---|---|---|"]
    for what, label in (("dsp", "ST-DiT, 2 blocks under DSP"), ("zeco", "GLA, 1 layer under ZeCO")):
        e, c = _steps(per_rank, f"{what}|False"), _steps(per_rank, f"{what}|True")
        ratios = [a / b for a, b in zip(c, e)]
        first = max(r["first"][f"{what}|True"] for r in per_rank)
        comp = max(r["first"][f"{what}|True"] - statistics.median(r["times"][f"{what}|True"]) for r in per_rank)
        lines.append(f"| {label} | {_fmt(e)} | {_fmt(c)} | {statistics.median(ratios):.3f} "
                     f"({min(ratios):.2f}-{max(ratios):.2f}) | {first:.1f} | {comp:.1f} |")
    return lines


def peer_table(P: int, per_rank: list) -> list[str]:
    lines = [f"| P | attention | causal | runs | max err vs one process | layout err | fwd+bwd ms | / longseq ring |",
             "|---|---|---|---|---|---|---|---|"]
    ents = per_rank[0]["entries"]
    for key, e in ents.items():
        name, causal = e["name"], e["causal"]
        if not e["ok"]:
            why = max((r["entries"][key].get("error", "") for r in per_rank), key=len) or "failed on another rank"
            lines.append(f"| {P} | {name} | {causal} | no: {why.replace('|', '/')} | | | | |")
            continue
        err = max(r["entries"][key]["err"] for r in per_rank)
        lay = max(r["entries"][key].get("layout_err", 0.0) for r in per_rank) if name.startswith("torch") else None
        ts = _steps(per_rank, key)
        ring = _steps(per_rank, f"longseq ring|{causal}")
        ratio = statistics.median([a / b for a, b in zip(ts, ring)])
        lines.append(f"| {P} | {name} | {causal} | yes | {err:.1e} | {'' if lay is None else f'{lay:.1e}'} | "
                     f"{_fmt(ts)} | {ratio:.2f} |")
    return lines


def main(argv=None) -> int:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--part", nargs="+", default=["compile", "peer"], choices=["compile", "peer"])
    ap.add_argument("--procs", type=int, nargs="+", default=[2, 4], help="peer: SP sizes")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cp-backends", nargs="+", default=["math"], choices=["flash", "efficient", "math"],
                    help="SDPA backends to try under context_parallel (flash hung on CPU here: docs/compile.md)")
    ap.add_argument("--shape", type=int, nargs=4, default=[1, 2048, 4, 32], metavar=("B", "T", "H", "D"))
    ap.add_argument("--note", default="CPU, gloo over loopback, a machine shared with other jobs (loaded)")
    ap.add_argument("--out", default=str(output("benchmarks/results/compile_peer_cpu.json")))
    ap.add_argument("--update-docs", action="store_true")
    args = ap.parse_args(argv)
    from longseq.pool import DistributedPool
    import torch

    command = "python -m longseq.benchmarks.compile_peer " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:]) if a != "--update-docs")
    blob, md = dict(meta=vars(args)), [f"Measured with `{command.strip()}` ({args.note}; torch {torch.__version__}), "
                                       f"{args.rounds} interleaved rounds, median (min-max), slowest rank.", ""]
    if "compile" in args.part:
        t0 = time.time()
        with DistributedPool(2, timeout=3600, start_timeout=1200) as pool:
            per_rank = pool.run(compile_worker, args.rounds, timeout=3600)
        blob["compile"] = per_rank
        md += compile_table(per_rank) + [""]
        print(f"compile: {time.time() - t0:.0f} s", flush=True)
    if "peer" in args.part:
        B, T, H, D = args.shape
        md += [f"Attention on identical q, k, v `[B, T, H, D] = [{B}, {T}, {H}, {D}]` float32, forward + backward:", ""]
        blob["peer"] = {}
        for i, P in enumerate(args.procs):
            t0 = time.time()
            with DistributedPool(P, timeout=3600, start_timeout=1200) as pool:
                per_rank = pool.run(peer_worker, B, T, H, D, args.rounds, tuple(args.cp_backends), timeout=1500)
            blob["peer"][str(P)] = per_rank
            md += peer_table(P, per_rank)[(0 if i == 0 else 2):]
            print(f"peer P={P}: {time.time() - t0:.0f} s", flush=True)
    text = "\n".join(md) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(blob, indent=1, default=str))
    out.with_suffix(".md").write_text(text)
    print(text)
    if args.update_docs:
        from longseq.benchmarks.docblocks import replace_block
        replace_block(output("docs/compile.md"), out.stem, text)     # the block named after the results file
    return 0


if __name__ == "__main__":
    sys.exit(main())
