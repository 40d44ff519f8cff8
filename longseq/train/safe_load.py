"""Reading checkpoints without running code from them: tensors and plain data only.

A ``torch.save`` file is a pickle, and a pickle can name any callable to run while it loads; so can
the ``.metadata`` file of a ``torch.distributed.checkpoint`` (DCP) directory, which torch's
``FileSystemReader`` reads with a plain ``pickle.load``, and the non-tensor items of its shards,
which the default load planner reads with ``torch.load(weights_only=False)``. A checkpoint is data
that anyone able to write the run directory can replace (the sha256 manifest proves a file whole,
not who wrote it), so every load here goes through an allow-list:

* :func:`load_pt` -- ``torch.load(weights_only=True)`` plus numpy's array reconstruction (the numpy
  RNG state of checkpoints written before the state became a tensor).
* :func:`safe_reader` / :func:`safe_planner` -- a DCP ``FileSystemReader`` whose ``read_metadata``
  unpickles with :class:`MetadataUnpickler` (only DCP's metadata classes, ``torch.Size``, dtypes,
  ``pathlib`` paths) and a load planner whose byte items load with ``weights_only=True``.

Anything else in such a file raises :class:`UnsafeCheckpoint` (a ``CheckpointCorrupt``: one line,
naming the file and the global it asked for) before any of its code runs.
"""
from __future__ import annotations

import io
import pathlib
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .manifest import CheckpointCorrupt

__all__ = ["UnsafeCheckpoint", "load_pt", "MetadataUnpickler", "read_dcp_metadata", "safe_reader", "safe_planner"]


class UnsafeCheckpoint(CheckpointCorrupt):
    """A checkpoint file that asks to run code (or build objects outside the allow-list) on load."""


def _numpy_globals() -> list:
    """What ``np.ndarray`` pickles name (numpy 1.x and 2.x spell the module differently)."""
    out = [np.ndarray, np.dtype]
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            out.append(getattr(__import__(mod, fromlist=["_reconstruct"]), "_reconstruct"))
        except (ImportError, AttributeError):
            pass
    out += [type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64, np.uint8)]
    return out


def _refusal(path, e: Exception) -> UnsafeCheckpoint:
    first = (str(e).strip().splitlines() or [type(e).__name__])
    what = next((ln.strip() for ln in first if "GLOBAL" in ln or "Unsupported" in ln), first[0].strip())
    return UnsafeCheckpoint(
        f"{Path(path).name}: refused to load: it holds more than tensors and plain data ({what[:200]}); a "
        "checkpoint can run code when unpickled, so longseq loads only tensors, numbers, strings, lists and "
        "dicts: use a checkpoint this run's longseq wrote, or start afresh (train.resume=none)")


def load_pt(path, map_location: Any = "cpu", *, mmap: bool = True) -> Any:
    """``torch.load(path, weights_only=True)`` (memory-mapped when the file allows), numpy arrays
    allowed; a file that names anything else raises :class:`UnsafeCheckpoint`."""
    with torch.serialization.safe_globals(_numpy_globals()):
        try:
            try:
                return torch.load(str(path), map_location=map_location, mmap=mmap, weights_only=True)
            except pickle.UnpicklingError:
                raise
            except RuntimeError as e:
                if not mmap or "mmap" not in str(e).lower() and "zip" not in str(e).lower():
                    raise
                return torch.load(str(path), map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            raise _refusal(path, e) from None


# -- DCP -----------------------------------------------------------------------------------------------
_DCP_META = ("BytesStorageMetadata", "ChunkStorageMetadata", "Metadata", "MetadataIndex", "StorageMeta",
             "TensorProperties", "TensorStorageMetadata", "_MEM_FORMAT_ENCODING")


def _allowed(module: str, name: str):
    """The object a metadata pickle may name, or None."""
    if module == "torch.distributed.checkpoint.metadata" and name in _DCP_META:
        import torch.distributed.checkpoint.metadata as m
        return getattr(m, name)
    if module == "torch.distributed.checkpoint.filesystem" and name == "_StorageInfo":
        from torch.distributed.checkpoint.filesystem import _StorageInfo
        return _StorageInfo
    if module == "torch" and name == "Size":
        return torch.Size
    if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format, torch.layout)):
        return getattr(torch, name)
    if module == "torch.serialization" and name == "_get_layout":
        return torch.serialization._get_layout
    if module == "pathlib" and name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"):
        return getattr(pathlib, name)
    if module == "collections" and name == "OrderedDict":
        import collections
        return collections.OrderedDict
    return None


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP ``.metadata`` file; any global outside the allow-list raises
    ``pickle.UnpicklingError`` before it is called."""

    def find_class(self, module: str, name: str):
        obj = _allowed(module, name)
        if obj is None:
            raise pickle.UnpicklingError(f"GLOBAL {module}.{name} is not allowed in a DCP .metadata file")
        return obj


def read_dcp_metadata(path) -> Any:
    """The ``Metadata`` of the DCP directory ``path`` (or of the file itself), read with the allow-list."""
    p = Path(path)
    f = p / ".metadata" if p.is_dir() else p
    try:
        with open(f, "rb") as fh:
            return MetadataUnpickler(fh).load()
    except pickle.UnpicklingError as e:
        raise _refusal(f.parent if f.name == ".metadata" else f, e) from None
    except (EOFError, ValueError, TypeError, AttributeError) as e:
        raise CheckpointCorrupt(f"{f}: unreadable DCP metadata ({type(e).__name__}: {e})") from None


def safe_reader(path):
    """A ``FileSystemReader`` for ``path`` whose metadata goes through :class:`MetadataUnpickler`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class _SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            rank = kwargs.get("rank")
            md = read_dcp_metadata(self._get_metadata_path(rank) if rank is not None else Path(str(self.path)))
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    return _SafeReader(str(path))


def safe_planner():
    """DCP's default load planner, its byte (non-tensor) items loaded with ``weights_only=True``."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.planner import ReadItem

    class _SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
            try:
                obj = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as e:
                raise _refusal(f"item {read_item.dest_index.fqn}", e) from None
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element      # torch's own helper
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return _SafePlanner()
