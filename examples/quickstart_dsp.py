"""Quickstart: wrap a video transformer with DSP and train a few steps.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 examples/quickstart_dsp.py   # SP 2
    python examples/quickstart_dsp.py                                                    # one process

Every rank of an SP group gets the same whole sample; ``dsp.parallelize`` shards it along frames at
the model's entry, switches to spatial tokens around each temporal stage (one all-to-all each way),
and returns this rank's frames of the output. Prints the loss (the same on every rank, and the same
as one process gives) and rank 0's ledger of the collectives it issued.
"""

import torch

from longseq import dsp
import longseq
from longseq.models.stdit import STDiT, stdit_config

rank, world = longseq.init_distributed()
groups = longseq.init_parallel_groups(sp_size=world)          # one SP group of every rank
torch.manual_seed(0)                                          # the same weights on every rank
model = STDiT(stdit_config("tiny"))
handle = dsp.parallelize(model, groups, gather_output=False)  # the model's code is unchanged
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

data = torch.Generator().manual_seed(1)                       # the same sample on every SP rank
x = torch.randn(2, 4, 8, 16, 16, generator=data)              # [B, C, T, H, W] latents, T sharded inside
t = torch.rand(2, generator=data) * 1000                      # diffusion timesteps
y = torch.randn(2, 6, 16, generator=data)                     # caption embeddings [B, N, C_caption]
noise = torch.randn(2, 4, 8, 16, 16, generator=data)          # the target: one batch, fitted 5 steps
with longseq.recording() as ledger:
    for step in range(5):
        pred = model(x, t, y)                                 # this rank's frames [B, C, T_r, H, W]
        loss = dsp.sharded_mse_loss(pred, handle.shard_target(noise), groups.sp_group)
        loss.backward()                                       # each rank's gradients are its share
        longseq.sync_gradients(model.parameters(), groups)    # sum over SP, average over DP
        opt.step()
        opt.zero_grad()
        if rank == 0:
            print(f"step {step} loss {loss.item():.5f}")
if rank == 0:
    print(longseq.format_table(longseq.summarize(ledger)))
handle.remove()
torch.distributed.destroy_process_group()
