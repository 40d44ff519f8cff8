"""Local (single-device) gated delta rule for ZeCO: Gated DeltaNet (scalar gate per head) and KDA
(per-channel gate). The maths, no communication.

* :func:`delta_rule` (:mod:`zeco.delta.ops`): the differentiable op, fla's kernels on CUDA, PyTorch on CPU.
* :mod:`zeco.delta.chunk`: the chunked WY form and the affine maps ZeCO scans (``local_maps``).
* :func:`recurrent_delta_rule_reference` (:mod:`zeco.delta.naive`): one token at a time.
"""
from .chunk import (Prep, chunk_delta_rule, chunk_outputs, chunk_prepare, corrections, local_maps, map_pass,
                    state_dtype, state_pass)
from .naive import l2norm, recurrent_delta_rule_reference
from .ops import BACKENDS, delta_rule, fla_available, resolve_backend, validate

__all__ = ["delta_rule", "BACKENDS", "resolve_backend", "validate", "fla_available", "chunk_delta_rule",
           "chunk_prepare", "chunk_outputs", "state_pass", "local_maps", "map_pass", "corrections", "Prep", "state_dtype",
           "recurrent_delta_rule_reference", "l2norm"]
