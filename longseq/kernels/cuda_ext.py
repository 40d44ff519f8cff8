"""The CUDA backend: the operators of ``csrc/longseq_kernels.cu`` (``torch.ops.longseq_kernels``).

Loaded once per process, first match wins:

1. the library ``setup.py`` built as ``longseq._kernels_cuda`` (only where nvcc and a CUDA torch are
   present at install time: ``pip install --no-build-isolation -e .``);
2. a JIT build with ``torch.utils.cpp_extension.load`` from the checkout's ``csrc/`` (a minute or so
   on first use; cached by torch under ``TORCH_EXTENSIONS_DIR``).

Where neither works, :func:`unavailable_reason` says why and ``longseq.kernels`` falls back (auto) or
raises (``LONGSEQ_KERNELS=cuda``).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Optional

import torch

__all__ = ["CSRC", "SOURCES", "module", "unavailable_reason"]

CSRC = Path(__file__).resolve().parents[2] / "csrc"
SOURCES = [CSRC / "longseq_kernels.cu"]
_STATE: dict = {}


class _Ops:
    """The backend interface of ``longseq.kernels`` over the registered operators."""

    def __init__(self) -> None:
        self._ops = torch.ops.longseq_kernels

    def copy_pieces(self, strided, flat, dim, q, rem, parts, pack):
        (self._ops.pack_pieces if pack else self._ops.unpack_pieces)(strided, flat, dim, q, rem, parts)

    def scan_update(self, out, inp, local, decay):
        self._ops.scan_update(out, inp, local, decay)


def _load() -> None:
    spec = importlib.util.find_spec("longseq._kernels_cuda")
    if spec is not None and spec.origin:
        torch.ops.load_library(spec.origin)
        return
    if not all(p.exists() for p in SOURCES):
        raise RuntimeError(f"the CUDA sources are not at {CSRC} (a non-editable install without the built "
                           "extension): reinstall with `pip install --no-build-isolation -e .` where nvcc is")
    from torch.utils import cpp_extension

    print("longseq.kernels: JIT-compiling the CUDA extension (csrc/, once per machine)", file=sys.stderr)
    cpp_extension.load(name="longseq_kernels_cuda", sources=[str(p) for p in SOURCES],
                       extra_include_paths=[str(CSRC)], extra_cuda_cflags=["-O3", "-std=c++20"],
                       extra_cflags=["-O3", "-std=c++20"], is_python_module=False, verbose=False)


def module() -> _Ops:
    """The loaded backend (raises ``RuntimeError`` with the reason if it cannot load)."""
    why = unavailable_reason(torch.device("cuda"))
    if why is not None:
        raise RuntimeError(why)
    return _STATE["ops"]


def unavailable_reason(device: torch.device) -> Optional[str]:
    """None if the extension runs on ``device``, else why not (and the fix)."""
    if device.type != "cuda":
        return f"the CUDA extension runs on CUDA tensors only (got {device.type})"
    if torch.version.cuda is None or not torch.cuda.is_available():
        return "this torch build has no CUDA (or no GPU is visible)"
    if "ops" not in _STATE and "error" not in _STATE:
        try:
            _load()
            _STATE["ops"] = _Ops()
        except Exception as e:  # noqa: BLE001 - reported, and remembered so it is tried once
            _STATE["error"] = (f"the CUDA extension is not built and did not JIT-compile ({type(e).__name__}: "
                               f"{str(e).strip().splitlines()[-1] if str(e).strip() else e}); install nvcc and ninja, "
                               "or build it with `pip install --no-build-isolation -e .`")
    return _STATE.get("error")
