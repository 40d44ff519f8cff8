"""Checkpoints: atomic writes, manifests that prove them whole, a ``latest`` pointer, run lineages,
finding the newest good one, RNG states.

Layout under ``<out_dir>/checkpoints/``::

    ckpt_step00000010.pt                 one file per checkpoint (torch.save of a dict, see below)
    ckpt_step00000010.pt.manifest.json   its size + sha256 and the run lineage (longseq.train.manifest)
    ckpt_step00000010.dcp/               or, for FSDP runs, a sharded DCP directory (see :mod:`.dcp_checkpoint`)
    latest                               the file name of the newest complete checkpoint, one line
    run.json                             this run's lineage: {"lineage", "run_id", "seed"}

A checkpoint is written by global rank 0 only (model and optimizer are replicated across SP and DP)
to a temporary file in the same directory, flushed and fsync'ed, renamed over its final name with
``os.replace`` (atomic on POSIX), the directory fsync'ed; then its manifest the same way, and
``latest`` last. A crash at any point leaves the previous state or the new one, never a torn file
under a final name; a failed write (full disk) removes its temporary and leaves the rest intact.
Temporaries of killed writes are removed at start (:func:`clean_temporaries`).
:func:`find_good` walks the candidates newest first and returns the first that verifies against its
manifest, with a one-line reason for each that did not.

Lineage: a fresh start (``resume=none``) or a start from a given checkpoint (``resume=PATH``)
begins a new lineage; ``auto`` continues the directory's; a torchrun restart of the same job
(same ``TORCHELASTIC_RUN_ID``) continues its own lineage, whatever ``resume`` says. Clean-up
(``keep``) only deletes checkpoints of the current lineage, and never the one the run started from.

The dict: ``format``, ``step`` (optimizer steps done), ``data_position`` (the next sample
position of the stream), ``model``, ``optimizer``, ``scheduler`` (state dicts), ``rng`` (one
entry per global rank: torch CPU, CUDA, python, numpy), ``layout`` (world, sp_size, dp_size) and
``config`` (the resolved config, for reference).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import stat
import uuid
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .manifest import (MANIFEST_SUFFIX, TMP_MARK, CheckpointCorrupt, fsync_dir, manifest_path, read_meta, verify,
                       write_atomic,
                       write_manifest)
from .safe_load import load_pt

__all__ = ["checkpoint_dir", "save_checkpoint", "find_latest", "find_good", "load_checkpoint", "rng_state",
           "set_rng_state", "write_atomic", "list_checkpoints", "clean_temporaries", "start_lineage",
           "CheckpointCorrupt", "remove_checkpoint", "fsync_dir", "FORMAT", "prune", "shared_write_problem"]

FORMAT = 1
_NAME = re.compile(r"^ckpt_step(\d{8})\.(pt|dcp)$")


def checkpoint_dir(out_dir) -> Path:
    return Path(out_dir) / "checkpoints"


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
    """Delete a checkpoint, a file or a DCP directory, and its manifest."""
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    manifest_path(path).unlink(missing_ok=True)


def clean_temporaries(ckpt_dir) -> list[str]:
    """Remove the temporaries of killed writes (files with ``.tmp.`` in the name, DCP's ``.*.tmp``
    directories) and the manifests of checkpoints that are gone (a kill between deleting a
    checkpoint and its manifest); returns their names. Call on one rank, before anyone writes."""
    ckpt_dir = Path(ckpt_dir)
    gone = []
    if ckpt_dir.is_dir():
        for f in os.listdir(ckpt_dir):
            if TMP_MARK in f or (f.startswith(".") and f.endswith(".tmp")):
                remove_checkpoint(ckpt_dir / f)
                gone.append(f)
            elif f.endswith(MANIFEST_SUFFIX) and _NAME.match(f[:-len(MANIFEST_SUFFIX)]) \
                    and not (ckpt_dir / f[:-len(MANIFEST_SUFFIX)]).exists():
                (ckpt_dir / f).unlink(missing_ok=True)         # its checkpoint was deleted, then a kill
                gone.append(f)
    return sorted(gone)


def start_lineage(ckpt_dir, resume: str, *, run_id: str = "", restart: int = 0) -> tuple[str, str]:
    """Decide this start's lineage and what to resume from; returns ``(lineage, resume)`` where
    ``resume`` is "none", "auto", "strict" or a path. A torchrun restart (``restart > 0``) of the job
    recorded in ``run.json`` (same ``run_id``) continues its lineage: "auto" (or "strict"), with the
    first start's ``resume=PATH`` as the fall-back when the lineage has no checkpoint yet. "auto" in
    a directory with checkpoints but no ``run.json`` (copied there) continues the lineage of the
    one ``latest`` names."""
    ckpt_dir = Path(ckpt_dir)
    rec_path = ckpt_dir / "run.json"
    try:
        rec = json.loads(rec_path.read_text())
    except (OSError, ValueError):
        rec = {}
    if restart > 0 and run_id and rec.get("run_id") == run_id and rec.get("lineage"):
        return rec["lineage"], ("strict" if resume == "strict" else "auto")
    if resume in ("auto", "strict") and rec.get("lineage"):
        lineage = rec["lineage"]
    elif resume in ("auto", "strict") and not rec_path.exists() and _newest_lineage(ckpt_dir):
        lineage = _newest_lineage(ckpt_dir)     # checkpoints copied into a fresh directory: continue theirs
    else:
        lineage = uuid.uuid4().hex[:12]
    seed = resume if resume not in ("none", "auto", "strict") else rec.get("seed") if resume != "none" else None
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    doc = {"lineage": lineage, "run_id": run_id, "seed": seed}
    write_atomic(rec_path, lambda f: f.write(json.dumps(doc).encode()))
    return lineage, resume


def _newest_lineage(ckpt_dir: Path) -> str:
    """The lineage of the checkpoint ``latest`` names (else of the newest one), "" if none: what a
    directory holding checkpoints but no ``run.json`` (copied there) continues."""
    cands = _candidates(ckpt_dir)
    return str(read_meta(cands[0]).get("lineage") or "") if cands else ""


def _seed(ckpt_dir: Path) -> Optional[Path]:
    try:
        seed = json.loads((ckpt_dir / "run.json").read_text()).get("seed")
    except (OSError, ValueError):
        return None
    return Path(seed).resolve() if seed else None


def save_checkpoint(ckpt_dir, step: int, state: dict, keep: int = 0, *, lineage: str = "",
                    full_after: Optional[int] = None, **meta) -> Path:
    """Write ``state`` as the checkpoint of ``step``, its manifest (``lineage``, ``step`` and
    ``meta``), then the ``latest`` pointer; keep the newest ``keep`` checkpoints of this ``lineage``
    (0: all; never the run's seed). Call on one rank only. Any exception (a full disk: ``OSError``,
    or torch's zip writer's ``RuntimeError``) leaves every earlier file intact. ``full_after``: fault
    injection, the disk is full after that many bytes of the checkpoint file."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"ckpt_step{step:08d}.pt"
    write_atomic(path, lambda f: torch.save(state, f), full_after=full_after)
    write_manifest(path, lineage=lineage, step=int(step), **meta)
    write_atomic(ckpt_dir / "latest", lambda f: f.write((path.name + "\n").encode()))
    prune(ckpt_dir, lineage, keep, path)
    return path


def prune(ckpt_dir, lineage: str, keep: int, newest: Path) -> None:
    """Retention: delete this lineage's checkpoints but the newest ``keep`` (0: keep all), never
    ``newest`` (the one just written) nor the run's seed. Every checkpoint written is finite
    (the loop checks the weights before it writes), so the newest finite one is always kept."""
    if not keep or keep <= 0:
        return
    ckpt_dir = Path(ckpt_dir)
    seed = _seed(ckpt_dir)
    mine = [p for _, p in list_checkpoints(ckpt_dir) if read_meta(p).get("lineage") == lineage]
    for old in mine[:-keep]:
        if old != newest and old.resolve() != seed:
            remove_checkpoint(old)
    fsync_dir(ckpt_dir)


def _candidates(ckpt_dir: Path, lineage: str = "") -> list[Path]:
    """Newest first. With a ``lineage``: that lineage's checkpoints by step (whatever ``latest``
    says: it may name an abandoned lineage's newer one, or lag behind a checkpoint completed just
    before a kill), then the run's seed (``resume=PATH`` of its first start). Without one: the one
    ``latest`` names, then every checkpoint by step."""
    out: list[Path] = []
    if not lineage:
        ptr = ckpt_dir / "latest"
        try:
            name = ptr.read_bytes().decode("utf-8", "replace").strip() if ptr.is_file() else ""
        except OSError:
            name = ""
        if _NAME.match(name) and (ckpt_dir / name).exists():
            out.append(ckpt_dir / name)
    for _, p in reversed(list_checkpoints(ckpt_dir)):
        if p not in out and (not lineage or read_meta(p).get("lineage") == lineage):
            out.append(p)
    seed = _seed(ckpt_dir)
    if lineage and seed is not None and seed.exists() and seed not in [p.resolve() for p in out]:
        out.append(seed)
    return out


def find_good(ckpt_dir, lineage: str = "", *, strict: bool = False) -> tuple[Optional[Path], list[str]]:
    """The newest checkpoint that verifies against its manifest, and one line per newer one that
    did not. ``strict``: raise :class:`CheckpointCorrupt` instead of passing over a bad one."""
    problems = []
    for p in _candidates(Path(ckpt_dir), lineage):
        try:
            verify(p)
            return p, problems
        except CheckpointCorrupt as e:
            if strict:
                raise CheckpointCorrupt(f"train.resume=strict: {e}") from None
            problems.append(str(e))
    return None, problems


def find_latest(ckpt_dir) -> Optional[Path]:
    """The newest checkpoint that verifies (see :func:`find_good`), or None."""
    return find_good(ckpt_dir)[0]


def load_checkpoint(path, map_location: Any = "cpu") -> dict:
    """Load a checkpoint (memory-mapped, so many ranks on one node share the page cache): tensors
    and plain data only (:func:`longseq.train.safe_load.load_pt`; anything that would run code
    raises :class:`~longseq.train.safe_load.UnsafeCheckpoint`)."""
    state = load_pt(path, map_location)
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointCorrupt(f"{Path(path).name}: not a longseq checkpoint (no step)")
    return state


def rng_state() -> dict:
    """This process's random states: torch CPU (and CUDA), python, numpy."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "python": random.getstate(),     # plain data: loads with weights_only
          "numpy": [str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    npst = st["numpy"]
    if isinstance(npst, (list, tuple)) and isinstance(npst[1], torch.Tensor):
        npst = (npst[0], npst[1].numpy().astype(np.uint32), *npst[2:])
    np.random.set_state(tuple(npst))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def shared_write_problem(path, what: str) -> Optional[str]:
    """Why ``path`` (a run directory, a checkpoint file or folder) is not this user's alone, or None:
    owned by another user, or writable by every user (mode o+w; a sticky directory such as /tmp
    as an *ancestor* is fine: only ``path`` itself is checked). Anyone who can write it can swap the
    checkpoints the run resumes from; ``train.allow_shared_out_dir=true`` accepts it."""
    try:
        st = os.stat(str(path))
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"{what} {path} cannot be examined ({e.strerror})"
    me = os.geteuid() if hasattr(os, "geteuid") else st.st_uid
    if st.st_uid != me:
        return f"{what} {path} belongs to another user (uid {st.st_uid})"
    if st.st_mode & stat.S_IWOTH:
        return f"{what} {path} is writable by every user (mode {stat.S_IMODE(st.st_mode):o})"
    return None
