"""longseq's DSP plans side by side with diffusers' own context parallelism on the same video DiTs.

    python -m longseq.benchmarks.diffusers_cp --worlds 2 4 --models wan ltx --frames 8 --rounds 5

For each model (tiny random-weight configs of ``longseq.adapters.diffusers_dit``) and world size P
(gloo processes on 127.0.0.1, or one GPU each with ``--device cuda`` and NCCL), on the same
weights and inputs: does a forward+backward step run, does it equal one process (output and every
parameter gradient after summing the per-rank shares over the group, max relative error), and the
forward+backward time per step (median over ``--rounds`` interleaved rounds: longseq, diffusers,
longseq, ...; the slowest rank's time). longseq: ``dsp.parallelize(model, group, PLANS[name],
attention="ulysses")`` and ``longseq.sync_gradients``. diffusers: ``model.enable_parallelism(
config=ContextParallelConfig(ulysses_degree=P))`` with the model's own ``_cp_plan``; it has no
gradient synchronisation, so its per-rank gradients are summed here the same way. ``--frames`` also
runs one step at an uneven frame count (``--uneven-frames``, default 5, with 3 text tokens; the timed
step has 4) for both. Models: 4 heads x 12, two layers.

Workaround for the peer, applied inside this benchmark only: on a machine without an accelerator
diffusers' ``enable_parallelism`` divides by ``torch.accelerator.device_count()`` (0); the count
reads as 1 while it runs (labelled in the output).
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from longseq.launch import free_port

MODELS = ("wan", "ltx", "cogvideox", "hunyuan")


def _rel(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-9))


def _grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _step(model, kw, target):
    out = model(**kw, return_dict=False)[0]       # diffusers' CP output hook takes no output dataclass
    F.mse_loss(out, target).backward()
    return out.detach()


def _diffusers_cp(model, P: int):
    """diffusers' context parallelism on ``model`` (the CPU workaround applied while it starts)."""
    from diffusers import ContextParallelConfig
    count = torch.accelerator.device_count
    if count() == 0:
        torch.accelerator.device_count = lambda: 1          # workaround for the peer on CPU (module docstring)
    try:
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=P))
    finally:
        torch.accelerator.device_count = count


def _case(name: str, frames: int, text: int, rounds: int, device: torch.device) -> dict:
    import longseq
    from longseq import dsp
    from longseq.adapters import diffusers_dit as dd
    from longseq.models.stdit import init_for_testing
    P = dist.get_world_size()
    W = dist.group.WORLD
    # 4 heads x 12 (Ulysses, in both, needs P | heads at P = 2 and 4)
    base = init_for_testing(dd.build(name, num_attention_heads=4, **({"cross_attention_dim": 48} if name == "ltx"
                                                                     else {})), std=0.1, seed=0).to(device)
    kw = {k: (v.to(device=device, dtype=torch.float32) if torch.is_tensor(v) and v.is_floating_point() else
              v.to(device) if torch.is_tensor(v) else
              tuple(t.to(device=device, dtype=torch.float32) for t in v) if isinstance(v, tuple) else v)
          for k, v in dd.sample_inputs(name, frames, 2, text_mask=False, text=text).items()}
    out_shape = base(**kw).sample.shape
    target = torch.randn(out_shape, generator=torch.Generator().manual_seed(5)).to(device)
    ref_model = copy.deepcopy(base)
    ref_out = _step(ref_model, kw, target)
    ref = _grads(ref_model)
    res = {}
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    steps = {}
    try:
        handle = dsp.parallelize(ours, W, dd.PLANS[name], attention="ulysses")
        groups = longseq.from_existing_groups(W)

        def run_ours():
            ours.zero_grad(set_to_none=True)
            out = _step(ours, kw, target)
            longseq.sync_gradients(ours.parameters(), groups)
            return out
        out = run_ours()
        g = _grads(ours)
        res["longseq"] = dict(ok=True, out=_rel(out, ref_out), grad=max(_rel(g[k], ref[k]) for k in ref))
        steps["longseq"] = run_ours
    except Exception as e:      # noqa: BLE001 - reported in the table
        res["longseq"] = dict(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
    try:
        _diffusers_cp(theirs, P)

        def run_theirs():
            theirs.zero_grad(set_to_none=True)
            out = _step(theirs, kw, target)
            for p in theirs.parameters():          # diffusers does not synchronise gradients: summed here
                if p.grad is not None:
                    dist.all_reduce(p.grad, group=W)
            return out
        out = run_theirs()
        g = _grads(theirs)
        missing = [k for k in ref if k not in g]
        res["diffusers"] = dict(ok=True, out=_rel(out, ref_out),
                                grad=max(_rel(g[k], ref[k]) for k in ref if k in g), missing=len(missing))
        steps["diffusers"] = run_theirs
    except Exception as e:      # noqa: BLE001
        res["diffusers"] = dict(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
    times = {k: [] for k in steps}
    for _ in range(rounds):
        for k, fn in steps.items():
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = torch.tensor([time.perf_counter() - t0], device=device if device.type == "cuda" else "cpu")
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            times[k].append(float(dt))
    for k, ts in times.items():
        res[k]["ms"] = statistics.median(ts) * 1e3 if ts else None
    return res


def _worker(rank, world, port, job, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    cuda = job["device"] == "cuda"
    if cuda:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    out = {}
    try:
        for name in job["models"]:
            for frames in (job["frames"], job["uneven"]):
                try:
                    even = frames == job["frames"]
                    out[(name, frames)] = _case(name, frames, 4 if even else 3, job["rounds"] if even else 0, device)
                except Exception:   # noqa: BLE001
                    out[(name, frames)] = {"error": traceback.format_exc()[-300:]}
    finally:
        if rank == 0:
            queue.put(out)
        dist.destroy_process_group()


def _launch(world: int, job: dict) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, job, queue)) for r in range(world)]
    for p in procs:
        p.start()
    res = queue.get(timeout=3000)
    for p in procs:
        p.join(timeout=60)
    return res


def _cell(r: dict, timed: bool) -> str:
    if not r.get("ok"):
        return "fails: " + r.get("error", "?")
    eq = f"out {r['out']:.0e}, grads {r['grad']:.0e}"
    eq += f", {r['missing']} params without grad" if r.get("missing") else ""
    return eq + (f", {r['ms']:.1f} ms" if timed and r.get("ms") is not None else "")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--models", nargs="+", default=list(MODELS[:2]), choices=MODELS)
    ap.add_argument("--frames", type=int, default=8, help="latent frames of the timed step (divisible by P)")
    ap.add_argument("--uneven-frames", type=int, default=5, help="latent frames of the one-step uneven check")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args(argv)
    print(f"machine: {platform.machine()} {os.cpu_count()} CPU cores, load {os.getloadavg()[0]:.1f}, torch "
          f"{torch.__version__}, device {args.device}; 1 intra-op thread per process")
    print(f"command: python -m longseq.benchmarks.diffusers_cp {' '.join(argv if argv is not None else sys.argv[1:])}")
    print("diffusers CP on CPU: torch.accelerator.device_count() read as 1 while enable_parallelism runs "
          "(workaround for the peer, this benchmark only); its gradients are summed over the group here")
    job = dict(models=args.models, frames=args.frames, uneven=args.uneven_frames, rounds=args.rounds,
               device=args.device)
    rows = []
    for P in args.worlds:
        res = _launch(P, job)
        for (name, frames), r in res.items():
            if "error" in r:
                rows.append((name, P, frames, "error: " + r["error"], ""))
                continue
            timed = frames == args.frames
            rows.append((name, P, frames, _cell(r["longseq"], timed), _cell(r["diffusers"], timed)))
    print(f"\n| model | P | frames | longseq DSP plan (Ulysses) | diffusers CP (Ulysses) |\n|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(str(x) for x in row) + " |")


if __name__ == "__main__":
    main()
