"""longseq: sequence parallelism for long sequences (DSP for multi-dimensional transformers,
ZeCO for gated linear attention), on torch.distributed.

Shared runtime: process groups (:mod:`longseq.groups`), the communication ledger
(:mod:`longseq.ledger`) through which every collective goes (:mod:`longseq.comm`), autograd-aware
collectives (:mod:`longseq.functional`), launch helpers and gradient synchronisation.
"""
from . import comm, fsdp, functional, ops, optional
from .grad_sync import sync_gradients
from .groups import ParallelGroups, from_existing_groups, from_mesh, init_parallel_groups, sp_dp_layout
from .launch import init_distributed
from .ledger import LEDGER, CommRecord, format_table, recording, summarize
from .positions import position_offset, position_range, positions
from .sharding import shard_range, split_sizes

__version__ = "0.1.0"

__all__ = [
    "comm", "fsdp", "functional", "ops", "optional", "sync_gradients", "ParallelGroups", "from_existing_groups", "from_mesh",
    "init_parallel_groups",
    "sp_dp_layout", "init_distributed", "LEDGER", "CommRecord", "format_table", "recording", "summarize",
    "shard_range", "split_sizes", "positions", "position_range", "position_offset",
]
