"""transformers' delta-rule hybrids under sequence parallelism: zeco vs allgather vs p2p vs heads.

    python -m longseq.benchmarks.hf_linear                        # P = 2 and 4, 128 tokens a rank, CPU gloo
    python -m longseq.benchmarks.hf_linear --worlds 2 --tokens 256 --repeats 10
    python -m longseq.benchmarks.hf_linear --model-only           # the cost-model table only

Part 1 (measured): the ``qwen3_next_tiny`` preset of :mod:`longseq.models.hf_lm` (Qwen3-Next-shaped:
one Gated DeltaNet layer with 2 key and 4 value heads, one gated-GQA attention layer with 12 heads
(so that P = 4 divides them for Ulysses), MoE; float32,
hidden ``--hidden``) made sequence-parallel with :func:`longseq.adapters.transformers.parallelize`
over P spawned gloo processes (one intra-op thread each), one copy of the model per method. Per
method: bytes one rank sends in a forward+backward step (ledger, the worst rank; the delta-rule
state traffic and everything, attention all-to-alls and conv halos included) and the step's time:
one of each method per round after a barrier (interleaved), the slowest rank's time, the median of
``--repeats`` rounds after one warm-up. Timings on a shared CPU machine are noisy: compare the
methods within one table only.

Part 2 (model estimate, no GPU): :mod:`longseq.benchmarks.costmodel.delta` for the delta-rule layers
of the real Qwen3-Next-80B-A3B and Kimi-Linear-48B-A3B shapes (public configs: QWEN3_NEXT, KIMI_LINEAR
below) at 8-256 GPUs, ``--tokens-per-gpu`` tokens each: MiB one rank sends a step (all delta-rule
layers, forward + backward) and the simulated step time (6·N_active weights' compute + the
recurrence + each method's communication; the softmax-attention layers' mixing is left out, the same
for every method).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import math
import os

import torch

from .costmodel import delta as cm
from .zeco_scan import _timed, launch

METHODS = ("zeco", "allgather", "p2p", "heads")

# delta-rule layers of the real models (H value heads, Hk q/k heads, gk gate elements a head and token;
# params: the active parameters, for the 6·N compute)
QWEN3_NEXT = dict(H=32, Hk=16, K=128, V=128, L=36, hidden=2048, params=3.0e9, chunk=64, gk=1)   # 48 layers, 3 GDN : 1
KIMI_LINEAR = dict(H=32, Hk=32, K=128, V=128, L=20, hidden=2304, params=3.0e9, chunk=64, gk=128)  # 27 layers, 20 KDA


def _worker(rank, world, port, job, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import warnings

    import torch.distributed as dist
    warnings.filterwarnings("ignore")

    from longseq import zeco
    from longseq.adapters.transformers import parallelize
    from longseq.ledger import LEDGER
    from longseq.models.hf_lm import build

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    try:
        W = dist.group.WORLD
        torch.manual_seed(0)
        base = build("qwen3_next_tiny", hidden_size=job["hidden"], num_attention_heads=12)  # P = 2, 4 divide 12
        ids = torch.randint(3, 64, (1, job["tokens"] * world), generator=torch.Generator().manual_seed(1))
        labels = zeco.shard_sequence(zeco.shift_labels(ids), W)
        local = zeco.shard_sequence(ids, W)
        models = {}
        for m in METHODS:
            models[m] = copy.deepcopy(base)
            parallelize(models[m], W, method=m, attention="ulysses")

        def step(m):
            def run():
                models[m].zero_grad(set_to_none=True)
                zeco.sp_lm_loss(models[m](input_ids=local).logits, labels, W).backward()
            return run
        fns = {m: step(m) for m in METHODS}
        sent = {}
        for m, fn in fns.items():
            with LEDGER.recording() as rec:
                fn()
            t = torch.tensor([rec.filter(tag_prefix="zeco.delta").bytes_sent, rec.bytes_sent], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            sent[m] = t.tolist()
        LEDGER.enabled = False       # time the transport, not the bookkeeping
        times = _timed(fns, job["repeats"], 1)
        if rank == 0:
            queue.put({"sent": sent, "time": times})
    except BaseException:
        import traceback
        queue.put({"error": f"rank {rank}: {traceback.format_exc()}"})
        raise
    finally:
        dist.destroy_process_group()


def measure(world: int, job: dict) -> dict:
    """Run part 1 at ``world`` processes; returns ``{"sent": {method: [delta bytes, all bytes]},
    "time": {method: seconds}}``."""
    res = launch(world, job, worker=_worker)
    if "error" in res:
        raise RuntimeError(res["error"])
    return res


def _kib(n: float) -> str:
    return f"{n / 1024:.1f}"


def cost_table(name: str, shape: dict, tokens: int, gpus, topology: str) -> list[str]:
    from longseq.benchmarks.simulate import load_topology
    topo = load_topology(topology)
    lines = [f"{name}: H={shape['H']} value heads (Hk={shape['Hk']}), K={shape['K']} V={shape['V']}, {shape['L']} "
             f"delta-rule layers, gate {shape['gk']} a head, {tokens} tokens per GPU, {topo.name} (model estimate)"]
    head = f"{'P':>4} " + " ".join(f"{m + ' MiB':>14}" for m in METHODS) + " " + " ".join(f"{m + ' s':>12}"
                                                                                           for m in METHODS)
    lines += [head, "-" * len(head)]
    for P in gpus:
        mib = [cm.bytes_per_rank(m, P, tokens, shape["H"], shape["K"], shape["V"], shape["Hk"], shape["gk"])
               * shape["L"] / 2**20 for m in METHODS]
        ts = [cm.step_time(m, P, tokens, topo, shape) for m in METHODS]
        cells = [f"{'n/a':>14}" if (m == "heads" and shape["H"] % P) else f"{x:14.1f}" for m, x in zip(METHODS, mib)]
        lines.append(f"{P:>4} " + " ".join(cells) + " "
                     + " ".join(f"{'n/a' if math.isnan(t) else f'{t:.3f}':>12}" for t in ts))
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--tokens", type=int, default=128, help="tokens per rank (part 1)")
    ap.add_argument("--hidden", type=int, default=32, help="hidden size of the tiny model (part 1)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--model-only", action="store_true", help="part 2 only")
    ap.add_argument("--tokens-per-gpu", type=int, default=16384)
    ap.add_argument("--gpus", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256])
    ap.add_argument("--topology", default="h100_ib")
    args = ap.parse_args(argv)
    if not args.model_only:
        print(f"Part 1: qwen3_next_tiny (hidden {args.hidden}), {args.tokens} tokens a rank, B=1, float32, CPU gloo, "
              f"median of {args.repeats} interleaved rounds (a shared machine: compare within a row only)")
        head = f"{'P':>3} " + " ".join(f"{m + ' KiB':>13}" for m in METHODS) + " " + \
            " ".join(f"{m + ' ms':>12}" for m in METHODS)
        print(f"{'':>4}delta-rule state bytes / all bytes a rank sends a step (KiB); forward+backward ms")
        print(head)
        print("-" * len(head))
        for P in args.worlds:
            r = measure(P, dict(tokens=args.tokens, hidden=args.hidden, repeats=args.repeats))
            cells = [f"{_kib(r['sent'][m][0]) + '/' + _kib(r['sent'][m][1]):>13}" for m in METHODS]
            print(f"{P:>3} " + " ".join(cells) + " " + " ".join(f"{r['time'][m] * 1e3:12.1f}" for m in METHODS),
                  flush=True)
        print()
    print("Part 2: cost model (longseq.benchmarks.costmodel.delta), MiB one rank sends a step over all delta-rule "
          "layers and the simulated step time")
    for name, shape in (("Qwen3-Next-80B-A3B", QWEN3_NEXT), ("Kimi-Linear-48B-A3B", KIMI_LINEAR)):
        print("\n".join(cost_table(name, shape, args.tokens_per_gpu, args.gpus, args.topology)))
        print()


if __name__ == "__main__":
    main()
