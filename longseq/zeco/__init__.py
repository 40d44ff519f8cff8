"""ZeCO: sequence parallelism for gated linear attention with the All-Scan collective.

* :mod:`zeco.gla` — the local (single-device) GLA operator: ``gla_fwd``, ``gla_bwd``, ``gla``.
* :mod:`zeco.all_scan` — All-Scan, the pipelined prefix scan of states over ranks
  (``all_scan``, ``all_scan_start`` → handle, ``num_blocks_for``).
* :mod:`zeco.sp_gla` — ``sp_gla(q, k, v, g, *, group, method="zeco" | "lasp1" | "lasp2", ...)``.
* :mod:`zeco.delta` — the local gated delta rule (Gated DeltaNet / KDA): ``delta_rule``.
* :mod:`zeco.sp_delta` — ``sp_delta_rule(q, k, v, g, beta, *, group, method="zeco" | "allgather" |
  "heads" | "p2p", ...)``.
* :mod:`zeco.plans` — ``parallelize(model, group, method=...)`` swaps a model's GLA op for
  ``sp_gla``; ``shard_sequence``, ``shift_labels``, ``sp_lm_loss`` for the data and the loss.

See docs/zeco.md.
"""
from .gla import GLAFunction, gla, gla_bwd, gla_fwd, recurrent_gla_reference
from .all_scan import DEFAULT_HALF_BYTES, AllScanHandle, all_scan, all_scan_start, num_blocks_for, set_default_half_bytes
from .sp_gla import METHODS, sp_gla
from .delta import delta_rule, recurrent_delta_rule_reference
from .sp_delta import DELTA_METHODS, sp_delta_rule
from . import plans_delta
from .plans import parallelize, shard_sequence, shift_labels, sp_lm_loss, unparallelize

__all__ = [
    "gla", "gla_fwd", "gla_bwd", "GLAFunction", "recurrent_gla_reference",
    "all_scan", "all_scan_start", "AllScanHandle", "num_blocks_for", "DEFAULT_HALF_BYTES", "set_default_half_bytes",
    "sp_gla", "METHODS", "delta_rule", "recurrent_delta_rule_reference", "sp_delta_rule", "DELTA_METHODS", "parallelize", "unparallelize", "shard_sequence", "shift_labels", "sp_lm_loss",
]
