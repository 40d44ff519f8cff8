"""Checkpoints: atomic writes, a ``latest`` pointer, finding the latest complete one, RNG states.

Layout under ``<out_dir>/checkpoints/``::

    ckpt_step00000010.pt     one file per checkpoint (torch.save of a dict, see below)
    ckpt_step00000010.dcp/   or, for FSDP runs, a sharded DCP directory (see :mod:`.dcp_checkpoint`)
    latest                   the file name of the newest complete checkpoint, one line

A checkpoint is written by global rank 0 only (model and optimizer are replicated across SP and DP)
to a temporary file in the same directory, flushed and fsync'ed, then renamed over its final
name with ``os.replace`` (atomic on POSIX), the directory fsync'ed; ``latest`` is written the
same way, last. A crash at any point leaves either the previous state or the new one, never a
torn file under a final name. ``find_latest`` trusts ``latest`` when the file it names exists,
and otherwise takes the highest-numbered ``ckpt_step*.pt`` (temporaries are never matched).

The dict: ``format``, ``step`` (optimizer steps done), ``data_position`` (the next sample
position of the stream), ``model``, ``optimizer``, ``scheduler`` (state dicts), ``rng`` (one
entry per global rank: torch CPU, CUDA, python, numpy), ``layout`` (world, sp_size, dp_size) and
``config`` (the resolved config, for reference).
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

__all__ = ["checkpoint_dir", "save_checkpoint", "find_latest", "load_checkpoint", "rng_state", "set_rng_state",
           "write_atomic", "list_checkpoints", "remove_checkpoint", "fsync_dir", "FORMAT"]

FORMAT = 1
_NAME = re.compile(r"^ckpt_step(\d{8})\.(pt|dcp)$")


def checkpoint_dir(out_dir) -> Path:
    return Path(out_dir) / "checkpoints"


def fsync_dir(d: Path) -> None:
    try:
        fd = os.open(str(d), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, write) -> None:
    """Write ``path`` atomically: ``write(file)`` into a temporary file in the same directory,
    flush, fsync, ``os.replace``, fsync the directory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in the directory, ``(step, path)`` by step."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    out = []
    for f in os.listdir(ckpt_dir):
        m = _NAME.match(f)
        if m:
            out.append((int(m.group(1)), ckpt_dir / f))
    return sorted(out)


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint, a file or a DCP directory."""
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def save_checkpoint(ckpt_dir, step: int, state: dict, keep: int = 0) -> Path:
    """Write ``state`` as the checkpoint of ``step``, then the ``latest`` pointer; keep the newest
    ``keep`` checkpoints (0: all). Call on one rank only."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"ckpt_step{step:08d}.pt"
    write_atomic(path, lambda f: torch.save(state, f))
    write_atomic(ckpt_dir / "latest", lambda f: f.write((path.name + "\n").encode()))
    if keep and keep > 0:
        for _, old in list_checkpoints(ckpt_dir)[:-keep]:
            if old != path:
                remove_checkpoint(old)
    return path


def find_latest(ckpt_dir) -> Optional[Path]:
    """The newest complete checkpoint: the one ``latest`` names, or the highest-numbered file."""
    ckpt_dir = Path(ckpt_dir)
    ptr = ckpt_dir / "latest"
    if ptr.is_file():
        name = ptr.read_text().strip()
        if _NAME.match(name) and (ckpt_dir / name).exists():
            return ckpt_dir / name
    found = list_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def load_checkpoint(path, map_location: Any = "cpu") -> dict:
    """Load a checkpoint (memory-mapped, so many ranks on one node share the page cache)."""
    try:
        return torch.load(str(path), map_location=map_location, mmap=True, weights_only=False)
    except RuntimeError:
        return torch.load(str(path), map_location=map_location, weights_only=False)


def rng_state() -> dict:
    """This process's random states: torch CPU (and CUDA), python, numpy."""
    st = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])
