"""Local (single-device) gated linear attention for ZeCO: the maths, no communication.

Public API (see :mod:`zeco.gla.ops`)::

    gla_fwd(q, k, v, g, *, scale=None, initial_state=None, backend="auto", chunk_size=64)
        -> (o, final_state)
    gla_bwd(q, k, v, g, *, scale=None, initial_state=None, do, dht=None, backend="auto",
            chunk_size=64) -> (dq, dk, dv, dg, dh0)
    gla(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False,
        backend="auto", chunk_size=64) -> (o, final_state | None)     # differentiable

Reference: :func:`zeco.gla.naive.recurrent_gla_reference`; pure-PyTorch kernels:
:mod:`zeco.gla.chunk`; fla's Triton kernels: :mod:`zeco.gla.fla_backend`.
"""
from .chunk import ChunkGLAFunction, chunk_gla, chunk_gla_bwd, chunk_gla_fwd
from .fla_backend import fla_available
from .naive import recurrent_gla_reference
from .ops import BACKENDS, GLAFunction, gla, gla_bwd, gla_fwd, resolve_backend

__all__ = [
    "gla",
    "gla_fwd",
    "gla_bwd",
    "GLAFunction",
    "BACKENDS",
    "resolve_backend",
    "recurrent_gla_reference",
    "chunk_gla_fwd",
    "chunk_gla_bwd",
    "chunk_gla",
    "ChunkGLAFunction",
    "fla_available",
]
