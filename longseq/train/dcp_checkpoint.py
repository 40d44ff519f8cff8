"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP), for FSDP runs.

Layout under ``<out_dir>/checkpoints/`` (beside :mod:`.checkpoint`'s files, sharing ``latest``)::

    ckpt_step00000010.dcp/   .metadata, one __<rank>_0.distcp per rank (model and optimizer shards),
                             trainer.pt (step, data_position, scheduler, the RNG of every rank,
                             layout, config)
    latest                   the name of the newest complete checkpoint, one line

Atomic: every rank writes its shards into ``.ckpt_step00000010.dcp.tmp`` (DCP's FileSystemWriter
fsyncs each file; its coordinator writes ``.metadata`` last), rank 0 adds ``trainer.pt`` (fsync),
fsyncs the directory, renames it to its final name, fsyncs the parent and only then moves
``latest``. A crash leaves a ``.tmp`` directory that no lookup matches, never a torn final one.

Resharding: DCP stores every tensor's global shape and which piece each file holds; ``load`` reads
the pieces this rank's shards need, so a checkpoint saved at SP 2 x DP 2 loads at SP 4 x DP 1,
SP 1 x DP 4, another FSDP mode, another world size, or without FSDP (whole tensors on every rank).
The state dicts come from ``torch.distributed.checkpoint.state_dict.get_state_dict`` (keys are
parameter names, also for the optimizer), are filled in place by ``dcp.load`` and applied with
``set_state_dict``.

Loading runs no code from the files: ``.metadata`` is unpickled with an allow-list of DCP's own
metadata classes, byte items and ``trainer.pt`` with ``weights_only=True`` (:mod:`.safe_load`).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from longseq import comm

from . import checkpoint as ckpt
from . import safe_load
from .manifest import write_manifest

__all__ = ["save", "load", "read_trainer", "is_dcp", "SUFFIX", "TRAINER_FILE"]

SUFFIX = ".dcp"
TRAINER_FILE = "trainer.pt"


def is_dcp(path) -> bool:
    """A DCP checkpoint directory (as opposed to a one-file ``.pt`` checkpoint)."""
    return Path(path).is_dir() and (Path(path) / ".metadata").is_file()


def _barrier(tag: str) -> None:
    comm.all_reduce(torch.zeros(1, device=comm.collective_device(dist.group.WORLD)), dist.group.WORLD, tag=tag)


def save(ckpt_dir, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, trainer: dict,
         *, keep: int = 0, lineage: str = "", **meta) -> Path:
    """Write the checkpoint of ``step`` (model and optimizer sharded through DCP, ``trainer`` by
    rank 0), then ``latest``; keep the newest ``keep`` checkpoints (0: all). Every rank calls it."""
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / f"ckpt_step{step:08d}{SUFFIX}"
    tmp = ckpt_dir / f".{final.name}.tmp"
    lead = dist.get_rank() == 0
    if lead:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)           # a crashed attempt's leftovers
        tmp.mkdir()
    _barrier("train.dcp.mkdir")
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
    if lead:
        ckpt.write_atomic(tmp / TRAINER_FILE, lambda f: torch.save(trainer, f))
        shutil.rmtree(final, ignore_errors=True)         # a re-run of the same step
        os.replace(tmp, final)
        ckpt.fsync_dir(ckpt_dir)
        write_manifest(final, lineage=lineage, step=int(step), **meta)   # verified on resume (.manifest)
        ckpt.write_atomic(ckpt_dir / "latest", lambda f: f.write((final.name + "\n").encode()))
        ckpt.prune(ckpt_dir, lineage, keep, final)
    _barrier("train.dcp.done")
    return final


def load(path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Load a DCP checkpoint into ``model`` and ``optimizer`` (in place, resharded to their current
    layout); returns the trainer state (step, data_position, scheduler, rng, ...). Every rank calls it."""
    path = Path(path)
    if not is_dcp(path):
        raise ValueError(f"{path} is not a DCP checkpoint directory (no .metadata)")
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    trainer = read_trainer(path)                      # refused before any shard is read
    dcp.load(state, storage_reader=safe_load.safe_reader(path), planner=safe_load.safe_planner())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return trainer


def read_trainer(path) -> dict:
    """The trainer state of a DCP checkpoint (``trainer.pt``), after checking that its ``.metadata``
    unpickles within the allow-list; no collective (each rank reads the files)."""
    path = Path(path)
    safe_load.read_dcp_metadata(path)
    state = safe_load.load_pt(path / TRAINER_FILE, mmap=False)
    if not isinstance(state, dict) or "step" not in state:
        raise ckpt.CheckpointCorrupt(f"{path.name}: {TRAINER_FILE} is not a longseq trainer state")
    return state
