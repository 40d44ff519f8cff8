"""Quickstart: a gated-linear-attention language model made sequence-parallel with ZeCO.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 examples/quickstart_zeco.py  # SP 2
    python examples/quickstart_zeco.py                                                   # one process

Each rank holds a contiguous piece of every sequence; every GLA layer gets the state its piece
starts from through All-Scan (one state per rank per direction), overlapped with local compute.
Prints the loss (the same on every rank, and the same as one process gives) and rank 0's ledger
of the collectives it issued.
"""

import torch

import longseq
from longseq import zeco
from longseq.models.gla import GLAForCausalLM, gla_config

rank, world = longseq.init_distributed()
groups = longseq.init_parallel_groups(sp_size=world)
sp = groups.sp_group
torch.manual_seed(0)                                          # the same weights on every rank
model = GLAForCausalLM(gla_config("tiny"))
zeco.parallelize(model, sp, method="zeco")                    # or "lasp1", "lasp2"
opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

data = torch.Generator().manual_seed(1)                       # the same sequences on every SP rank
ids = torch.randint(0, 64, (2, 101), generator=data)          # [B, T] tokens; T need not divide by P
labels = zeco.shift_labels(ids)                               # next-token targets, shifted on the whole
with longseq.recording() as ledger:
    for step in range(5):
        logits = model(zeco.shard_sequence(ids, sp))          # this rank's tokens [B, T_r, vocab]
        loss = zeco.sp_lm_loss(logits, zeco.shard_sequence(labels, sp), sp)
        loss.backward()
        longseq.sync_gradients(model.parameters(), groups)
        opt.step()
        opt.zero_grad()
        if rank == 0:
            print(f"step {step} loss {loss.item():.5f}")
if rank == 0:
    print(longseq.format_table(longseq.summarize(ledger)))
torch.distributed.destroy_process_group()
