"""Manifests that let a checkpoint prove it is whole: the size and sha256 of every file.

A checkpoint is one file (``ckpt_step00000010.pt``) or a directory (a torch.distributed.checkpoint
folder); its manifest is the sibling ``<name>.manifest.json``, written atomically (temporary name,
fsync, rename, fsync of the directory) after the checkpoint itself is complete::

    {"format": 1, "name": "ckpt_step00000010.pt", "kind": "file" | "dir",
     "files": {"<relative path>": {"size": 123, "sha256": "..."}, ...}, "meta": {...}}

``write_manifest(path, **meta)`` records it, ``verify(path)`` checks it (raises
:class:`CheckpointCorrupt` with a one-line reason: which file, expected vs found), ``read_meta``
returns the ``meta`` a writer stored (e.g. the run lineage). Missing manifest = not verified.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import secrets
from pathlib import Path
from typing import Any, Callable, Optional

__all__ = ["write_manifest", "verify", "read_meta", "manifest_path", "CheckpointCorrupt", "write_atomic",
           "fsync_dir", "TMP_MARK", "open_exclusive", "MANIFEST_SUFFIX"]

FORMAT = 1
TMP_MARK = ".tmp."          # every temporary file of this module and of checkpoint.py has it in its name
_CHUNK = 1 << 20


class CheckpointCorrupt(RuntimeError):
    """A checkpoint that does not match its manifest (or has none)."""


MANIFEST_SUFFIX = ".manifest.json"


def manifest_path(path) -> Path:
    path = Path(path)
    return path.with_name(path.name + MANIFEST_SUFFIX)


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


def open_exclusive(path, mode: str = "wb"):
    """Create ``path`` for writing, exclusively: ``O_CREAT | O_EXCL | O_NOFOLLOW``, so a file or
    symlink planted under the name (a shared directory) makes it fail
    (``FileExistsError``) instead of writing through it. Permissions as ``open()`` gives (0666 less
    the umask)."""
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    return os.fdopen(fd, mode)


class _FullDisk(io.RawIOBase):
    """A file that accepts ``limit`` bytes, then fails like a full disk (``ENOSPC``); what torch's
    zip writer turns into ``RuntimeError: ... unexpected pos`` (fault injection, tests)."""

    def __init__(self, f, limit: int):
        super().__init__()
        self.f, self.limit, self.n = f, int(limit), 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        if self.n + len(b) > self.limit:
            raise OSError(errno.ENOSPC, "No space left on device (fault injection: a full disk)")
        self.n += len(b)
        return self.f.write(b)


def write_atomic(path, write: Callable[[Any], None], *, full_after: Optional[int] = None) -> None:
    """Write ``path`` atomically: ``write(file)`` into a temporary file in the same directory
    (a fresh random name, created exclusively, never through a symlink: :func:`open_exclusive`),
    flush, fsync, ``os.replace`` (which replaces a symlink at ``path`` itself, never its target),
    fsync the directory. On any error the temporary is removed and ``path`` (if it existed) is left
    as it was. ``full_after``: fault injection, the file takes that many bytes, then ``ENOSPC``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}.{secrets.token_hex(4)}")
    created = False
    try:
        with open_exclusive(tmp) as f:
            created = True
            write(f if full_after is None else _FullDisk(f, full_after))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        created = False
    finally:
        if created:
            tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while True:
            b = f.read(_CHUNK)
            if not b:
                return h.hexdigest()
            h.update(b)


def _files(path: Path) -> dict[str, Path]:
    if path.is_dir():
        return {str(p.relative_to(path)): p for p in sorted(path.rglob("*")) if p.is_file()}
    return {path.name: path}


def write_manifest(path, **meta) -> Path:
    """Record the size and sha256 of every file of the checkpoint ``path`` (a file or a directory,
    complete and fsynced) in its manifest; returns the manifest's path."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"write_manifest: {path} does not exist")
    files = {rel: {"size": p.stat().st_size, "sha256": _sha256(p)} for rel, p in _files(path).items()}
    doc = {"format": FORMAT, "name": path.name, "kind": "dir" if path.is_dir() else "file", "files": files,
           "meta": meta}
    mp = manifest_path(path)
    write_atomic(mp, lambda f: f.write(json.dumps(doc, indent=1, sort_keys=True).encode()))
    return mp


def _read(path: Path) -> dict:
    mp = manifest_path(path)
    try:
        doc = json.loads(mp.read_text())
    except FileNotFoundError:
        raise CheckpointCorrupt(f"{path.name}: no manifest {mp.name} (its write was interrupted, or an older "
                                "longseq wrote it)") from None
    except (OSError, ValueError) as e:
        raise CheckpointCorrupt(f"{path.name}: unreadable manifest {mp.name} ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("files"), dict):
        raise CheckpointCorrupt(f"{path.name}: manifest {mp.name} has no file list")
    return doc


def read_meta(path) -> dict:
    """The ``meta`` stored by :func:`write_manifest` ({} when there is no readable manifest)."""
    try:
        return dict(_read(Path(path)).get("meta") or {})
    except CheckpointCorrupt:
        return {}


def verify(path) -> None:
    """Raise :class:`CheckpointCorrupt` (one line: the file, expected vs found) unless every file of
    the checkpoint has its manifest's size and sha256 (and, for a directory, no file is missing)."""
    path = Path(path)
    doc = _read(path)
    if not path.exists():
        raise CheckpointCorrupt(f"{path.name}: missing (its manifest lists {len(doc['files'])} file(s))")
    found = _files(path)
    for rel, want in sorted(doc["files"].items()):
        p = found.get(rel)
        if p is None:
            raise CheckpointCorrupt(f"{path.name}: file {rel} is missing")
        size = p.stat().st_size
        if size != want["size"]:
            raise CheckpointCorrupt(f"{path.name}: file {rel} has {size} bytes, the manifest says {want['size']}")
        digest = _sha256(p)
        if digest != want["sha256"]:
            raise CheckpointCorrupt(f"{path.name}: file {rel} has sha256 {digest[:16]}..., the manifest says "
                                    f"{want['sha256'][:16]}... (changed after it was written)")
