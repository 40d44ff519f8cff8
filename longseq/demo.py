"""A 4-process tour of the runtime: SP x DP groups, a sharding switch forward and backward, a
gradient sync, and the ledger's table. Run: ``torchrun --nproc_per_node 4 -m longseq.demo``."""
from __future__ import annotations

import torch
import torch.distributed as dist

import longseq
from longseq import functional as LF
from longseq.sharding import split_sizes


def main() -> None:
    longseq.init_distributed()
    world, rank = dist.get_world_size(), dist.get_rank()
    groups = longseq.init_parallel_groups(sp_size=2 if world % 2 == 0 else 1)
    B, T, S, C = 2, 8, 16, 32
    torch.manual_seed(0)
    video = torch.randn(B, T, S, C)                           # the same sample on every SP rank
    weight = torch.nn.Parameter(torch.randn(C, C) / C**0.5)
    with longseq.recording() as rec:
        x = LF.shard_whole(video, groups.sp_group, dim=1, tag="demo.entry") @ weight  # T sharded
        x = LF.all_to_all(x, groups.sp_group, scatter_dim=2, gather_dim=1, gather_size=T, tag="demo.switch")
        x = x @ weight                                                                # S sharded
        x = LF.all_to_all(x, groups.sp_group, scatter_dim=1, gather_dim=2, gather_size=S, tag="demo.switch")
        loss = LF.all_reduce_sum(x.pow(2).sum(), groups.sp_group, tag="demo.loss") / video.numel()
        loss.backward()
        longseq.sync_gradients([weight], groups)
    per_rank = longseq.comm.all_gather_object(longseq.summarize(rec), dist.group.WORLD, tag="demo.ledger")
    if rank == 0:
        total: dict = {}
        for s in per_rank:
            for key, v in s.items():
                acc = total.setdefault(key, dict.fromkeys(v, 0))
                for k in v:
                    acc[k] += v[k]
        print(f"world {world} = SP {groups.sp_size} x DP {groups.dp_size}; activation [B,T,S,C] = {[B, T, S, C]}")
        print(longseq.format_table(total, title="ledger, summed over all ranks"))
        P = groups.sp_size
        m = B * T * S * C // P
        expect = 4 * world * 4 * m * (P - 1) // P                # 2 switches fwd + 2 bwd, 4 bytes each
        got = sum(v["bytes_sent"] for (op, tag), v in total.items() if tag.startswith("demo.switch"))
        print(f"switch bytes: {got} (DESIGN formula 2 fwd + 2 bwd x (P-1)/P x local activation: {expect})")
        print(f"loss {loss.item():.4f}")
    longseq.launch.destroy()


if __name__ == "__main__":
    main()
