"""Fused kernels of the runtime: the DSP switch's pack / unpack and All-Scan's block update.

One dispatch point for three backends of the same maths:

* ``cuda``: the C++/CUDA extension of ``csrc/`` (built by ``setup.py`` where nvcc and a CUDA torch
  are present, else JIT-compiled with ``torch.utils.cpp_extension.load`` on first use); CUDA tensors;
* ``triton``: :mod:`longseq.kernels.triton_kernels`; CUDA tensors, or CPU tensors under
  ``TRITON_INTERPRET=1`` (Triton's interpreter, how the tests run them without a GPU);
* ``torch``: :mod:`longseq.kernels.reference`, the reference the others equal bit for bit.

``LONGSEQ_KERNELS=torch|triton|cuda`` forces one (read at every call); unset or ``auto``: CUDA
tensors take ``cuda`` if the extension loads, else ``triton`` if it imports, else ``torch``; CPU
tensors take ``torch``. A forced backend that cannot run raises a ``RuntimeError`` naming the fix.
Inputs the kernels do not cover (more than 5 dims, elements wider than 8 bytes, split sizes that
are not a tensor_split layout, non-contiguous scan blocks) take the PyTorch path on every backend.

``pack(x, dim, sizes)`` -> 1-D send buffer: piece j = ``x.narrow(dim, off_j, sizes[j])`` in C order,
    pieces in order, read straight from ``x``'s strides (one launch, no ``.contiguous()``).
``unpack(buf, shape, dim, sizes)`` -> contiguous tensor of ``shape`` assembled from the pieces along
    ``dim`` (one launch, no ``cat``).
``scan_update(out, inp, local, decay)``: ``out = decay * inp + local`` for one All-Scan block,
    ``[rows, C]``, ``decay`` a ``[rows, 1]`` column (GLA's diagonal) or None, ``local`` cast to
    ``out``'s dtype, ``out`` being the next send buffer. Extension point for a dense ``K x K``
    transition (the delta rule): a transition that is not a ``[rows, 1]`` column is applied by its
    own code, not here; add a branch to :func:`scan_update` and a kernel beside these when it lands.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import torch

from ..optional import SetupError
from . import layout, reference

__all__ = ["ENV_VAR", "BACKENDS", "backend_for", "pack", "unpack", "scan_update", "unavailable_reason"]

ENV_VAR = "LONGSEQ_KERNELS"
BACKENDS = ("torch", "triton", "cuda")


def _requested() -> str:
    name = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"{ENV_VAR}={name!r}: choose one of torch, triton, cuda (or unset it for auto)")
    return name


def unavailable_reason(backend: str, device: torch.device) -> Optional[str]:
    """None if ``backend`` can run on ``device``, else why not and the fix."""
    if backend == "torch":
        return None
    if backend == "triton":
        from . import _triton_loader
        return _triton_loader.unavailable_reason(device)
    if backend == "cuda":
        from . import cuda_ext
        return cuda_ext.unavailable_reason(device)
    raise ValueError(f"unknown kernel backend {backend!r} (torch, triton, cuda)")


def backend_for(device: torch.device) -> str:
    """The backend a call on ``device`` uses (see the module docstring)."""
    device = torch.device(device)
    name = _requested()
    if name != "auto":
        why = unavailable_reason(name, device)
        if why is not None:    # the environment, not the caller (a DSP plan passes it on as it is)
            raise SetupError(f"{ENV_VAR}={name} cannot run on {device}: {why}; or set {ENV_VAR}=torch")
        return name
    if device.type == "cuda":
        for cand in ("cuda", "triton"):
            if unavailable_reason(cand, device) is None:
                return cand
    return "torch"


def _impl(name: str):
    if name == "triton":
        from . import triton_kernels
        return triton_kernels
    from . import cuda_ext
    return cuda_ext.module()


def _fast_pieces(t: torch.Tensor, dim: int, sizes: Sequence[int]):
    """``(backend module, t5, dim5, q, rem)`` when a kernel takes this copy, else None."""
    name = backend_for(t.device)
    qr = layout.tensor_split_qr(sizes)
    canon = layout.canonical(t, dim) if name != "torch" and qr is not None and t.numel() else None
    if canon is None:
        return None
    return (_impl(name), *canon, *qr)


def pack(x: torch.Tensor, dim: int, sizes: Sequence[int]) -> torch.Tensor:
    """The switch's send buffer (1-D, ``x.numel()``, ``x.dtype``); see the module docstring."""
    dim = dim % x.dim()
    fast = _fast_pieces(x, dim, sizes)
    if fast is None:
        return reference.pack(x, dim, sizes)
    mod, x5, d5, q, rem = fast
    out = torch.empty(x.numel(), dtype=x.dtype, device=x.device)
    mod.copy_pieces(x5, out.view(x5.dtype), d5, q, rem, len(sizes), True)
    return out


def unpack(buf: torch.Tensor, shape: Sequence[int], dim: int, sizes: Sequence[int]) -> torch.Tensor:
    """The switch's output (contiguous, ``shape``) from the received 1-D ``buf``."""
    shape = tuple(int(s) for s in shape)
    dim = dim % len(shape)
    if buf.dim() != 1 or buf.numel() != math.prod(shape) or sum(sizes) != shape[dim]:
        raise ValueError(f"unpack: a buffer of {buf.numel()} elements and sizes {list(sizes)} do not make "
                         f"shape {list(shape)} split along dim {dim}")
    out = torch.empty(shape, dtype=buf.dtype, device=buf.device)
    fast = _fast_pieces(out, dim, sizes)
    if fast is None:
        return reference.unpack(buf, shape, dim, sizes)
    mod, out5, d5, q, rem = fast
    mod.copy_pieces(out5, buf.contiguous().view(out5.dtype), d5, q, rem, len(sizes), False)
    return out


_SCAN_DTYPES = (torch.float32, torch.float64)


def scan_update(out: torch.Tensor, inp: Optional[torch.Tensor], local: torch.Tensor,
                decay: Optional[torch.Tensor]) -> torch.Tensor:
    """One All-Scan block ``out = decay * inp + local`` on the current stream; returns ``out``."""
    name = backend_for(out.device)
    rows = out.shape[0] if out.dim() == 2 else -1
    ok = (name != "torch" and out.dtype in _SCAN_DTYPES and out.dim() == 2 and out.is_contiguous()
          and local.shape == out.shape and local.is_contiguous() and local.is_floating_point()
          and (inp is None or (inp.shape == out.shape and inp.is_contiguous() and inp.is_floating_point()))
          and (decay is None or (tuple(decay.shape) == (rows, 1) and decay.is_contiguous())))
    if not ok or out.numel() == 0:
        return reference.scan_update(out, inp, local, decay)
    if inp is None:   # a cast copy: nothing to fuse
        return out.copy_(local)
    _impl(name).scan_update(out, inp, local, decay)
    return out
