"""DSP on 4 CPU processes: the tiny ST-DiT trained sequence-parallel (SP 2 x DP 2 by default) for
a few AdamW steps, then the ledger summed over ranks and its switch volume against the DSP formula.

Run from the checkout (``models/`` is not installed): ``make demo``, i.e.
``torchrun --nproc_per_node 4 -m longseq.demo [--sp 2] [--steps 3] [--frames 8] [--size 8 8]``.
"""
from __future__ import annotations

import argparse
import math
import re

import torch
import torch.distributed as dist

import longseq
from longseq.sharding import split_sizes


def _sample(shape, step, dp_rank, c_text, n_text=4):
    """One noisy-latent training sample, the same on every rank of an SP group (seeded by the
    step and the DP rank): ``x_t = sqrt(a)·x0 + sqrt(1-a)·noise``, the target is the noise."""
    g = torch.Generator().manual_seed(1000 * step + dp_rank)
    x0, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    t = torch.rand(shape[0], generator=g) * 1000
    a = torch.cos(t / 1000 * math.pi / 2).pow(2).view(-1, 1, 1, 1, 1)
    y = torch.randn(shape[0], n_text, c_text, generator=g)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise, t, y, noise


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sp", type=int, default=2, help="sequence-parallel size (divides the world)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, nargs=2, default=(8, 8), metavar=("H", "W"))
    args = ap.parse_args(argv)

    from longseq import dsp
    try:
        from longseq.models import STDiT, stdit_config
    except ImportError as e:  # pragma: no cover - models/ lives in the checkout
        raise SystemExit(f"longseq.demo runs from the repository root (it needs models/): {e}")

    longseq.init_distributed()
    world, rank = dist.get_world_size(), dist.get_rank()
    sp = args.sp if world % args.sp == 0 else world
    groups = longseq.init_parallel_groups(sp_size=sp)
    cfg = stdit_config("tiny")
    torch.manual_seed(0)                                    # the same weights on every rank
    model = STDiT(cfg)
    handle = dsp.parallelize(model, groups, gather_output=False)   # loss on shards, no gather
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    H, W = args.size
    shape = (args.batch, cfg.in_channels, args.frames, H, W)

    losses = []
    with longseq.recording() as rec:
        for step in range(args.steps):
            x, t, y, noise = _sample(shape, step, groups.dp_rank, cfg.caption_channels)
            pred = model(x, t, y)                           # this rank's frames of the prediction
            loss = dsp.sharded_mse_loss(pred, handle.shard_target(noise), groups.sp_group)
            loss.backward()
            longseq.sync_gradients(model.parameters(), groups)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
    handle.remove()

    # Bookkeeping: every rank's ledger and losses to rank 0 (not part of the recorded training).
    per_rank = longseq.comm.all_gather_object((longseq.summarize(rec), losses), dist.group.WORLD, tag="demo.ledger")
    if rank == 0:
        total: dict = {}
        for summary, _ in per_rank:
            for (op, tag), v in summary.items():
                key = (op, re.sub(r"blocks\.\d+\.", "blocks.*.", tag))   # one row for all blocks
                acc = total.setdefault(key, dict.fromkeys(v, 0))
                for k in v:
                    acc[k] += v[k]
        h, w = model.embed.grid_size(H, W)
        B, T, S, C, P = args.batch, args.frames, h * w, cfg.hidden_size, sp
        print(f"world {world} = SP {P} x DP {groups.dp_size}; ST-DiT tiny (depth {cfg.depth}, hidden {C}); "
              f"video {list(shape)} -> activation [B, T, S, C] = {[B, T, S, C]}")
        for step in range(args.steps):
            print(f"step {step}: loss " + "  ".join(
                f"DP{d} {per_rank[d * P][1][step]:.4f}" for d in range(groups.dp_size)))
        print(longseq.format_table(total, title=f"ledger, {args.steps} steps, summed over all {world} ranks"))
        # DSP formula: each switch sends (local activation) - (the piece kept); per block 2 forward, 2 backward.
        ts, ss = split_sizes(T, P), split_sizes(S, P)
        per_block = sum(2 * B * C * (ts[r] * (S - ss[r]) + (T - ts[r]) * ss[r]) for r in range(P))  # fwd + bwd
        expect = 4 * per_block * cfg.depth * args.steps * groups.dp_size       # float32
        got = sum(v["bytes_sent"] for (op, tag), v in total.items() if op == "all_to_all")
        calls = sum(v["calls"] for (op, tag), v in total.items() if op == "all_to_all")
        print(f"DSP switches: {calls} all-to-alls = {cfg.depth} blocks x 4 (2 fwd + 2 bwd) x {args.steps} steps "
              f"x {world} ranks: {'OK' if calls == 4 * cfg.depth * args.steps * world else 'MISMATCH'}")
        line, ok = f"switch bytes sent {got} vs formula {expect} (exact tensor_split sizes)", got == expect
        if T % P == 0 and S % P == 0:   # even sizes: (P-1)·M/P² elements per rank per switch
            M = B * T * S * C
            even = 4 * (P - 1) * M // P**2 * 4 * cfg.depth * args.steps * world
            line, ok = line + f", DESIGN 4 switches x (P-1)·M/P² x 4 B per rank per block-step: {even}", ok and got == even
        print(line + (": OK" if ok else ": MISMATCH"))
    longseq.launch.destroy()


if __name__ == "__main__":
    main()
