"""The method registry: which sequence-parallel method parallelizes which model family.

Part of the methods layer (beside :mod:`longseq.dsp`, :mod:`longseq.zeco` and the baselines in
:mod:`longseq.sp`); the training entry and the benchmarks look methods up here. A
:class:`MethodSpec` is keyed by ``(name, family)``: the same name (``"zeco"``) may parallelize
several families, each with its own ``parallelize``. Adding one is a call::

    from longseq.methods import register_method
    register_method("zeco", "gdn", my_parallelize, summary="...", input_shard="seq")

``parallelize(model, group, **options)`` applies the plan in place over the SP ``group`` (a process
group or a ``longseq.ParallelGroups``) and returns a handle (or the model). ``input_shard``: ``None``
when every SP rank takes whole samples and the plan shards them (DSP and the ST-DiT baselines: a
handle with ``shard_target``); ``"seq"`` when each rank takes its contiguous piece of the sequence
(ZeCO, LASP). The method ``"none"`` (no sequence parallelism) fits every family.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

from . import dsp, sp, zeco

__all__ = ["MethodSpec", "ANY_FAMILY", "METHODS", "register_method", "find_method", "method_names", "families_of"]

ANY_FAMILY = "*"


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    name: str
    family: str                                      # the model family it parallelizes, or ANY_FAMILY
    parallelize: Optional[Callable[..., Any]]        # None for "none"
    summary: str = ""
    input_shard: Optional[str] = None                # None (whole samples) | "seq" (contiguous pieces)
    heads_divisible: bool = False                    # the SP size must divide the attention heads


METHODS: dict[tuple[str, str], MethodSpec] = {}


def register_method(name: str, family: str, parallelize: Optional[Callable[..., Any]], *, summary: str = "",
                    input_shard: Optional[str] = None, heads_divisible: bool = False,
                    replace: bool = False) -> MethodSpec:
    """Register ``name`` for model family ``family`` (see the module docstring); returns the spec."""
    if input_shard not in (None, "seq"):
        raise ValueError(f"register_method({name!r}): input_shard must be None or 'seq', got {input_shard!r}")
    if (name, family) in METHODS and not replace:
        raise ValueError(f"method {name!r} is already registered for family {family!r} (replace=True overrides it)")
    spec = MethodSpec(name, family, parallelize, summary, input_shard, heads_divisible)
    METHODS[(name, family)] = spec
    return spec


def find_method(name: str, family: str) -> Optional[MethodSpec]:
    """The spec of ``name`` for ``family`` (or one registered for every family), else None."""
    return METHODS.get((name, family)) or METHODS.get((name, ANY_FAMILY))


def method_names(family: Optional[str] = None) -> list[str]:
    """Registered method names (for ``family``, if given), in registration order."""
    out = []
    for (name, fam) in METHODS:
        if (family is None or fam in (family, ANY_FAMILY)) and name not in out:
            out.append(name)
    return out


def families_of(name: str) -> list[str]:
    """The families ``name`` is registered for."""
    return [fam for (n, fam) in METHODS if n == name]


# -- the built-in methods ---------------------------------------------------------------------------
register_method("none", ANY_FAMILY, None, summary="no sequence parallelism; DP only")
register_method("dsp", "stdit", dsp.parallelize,
                summary="Dynamic Sequence Parallelism (switch T<->S with one all-to-all)")
for _name, _summary, _heads in [
        ("ulysses", "DeepSpeed-Ulysses (heads<->sequence all-to-all)", True),
        ("ring", "ring attention (k, v around the ring)", False),
        ("megatron_sp", "Megatron-SP (all-gather / reduce-scatter around attention)", False),
        ("usp", "USP (Ulysses x Ring)", False)]:
    register_method(_name, "stdit", functools.partial(sp.parallelize, method=_name), summary=_summary,
                    heads_divisible=_heads)
for _name, _summary in [("zeco", "ZeCO (All-Scan of the GLA state)"),
                        ("lasp1", "LASP-1 (state passed rank to rank)"),
                        ("lasp2", "LASP-2 (all-gather of the states)")]:
    register_method(_name, "gla", functools.partial(zeco.parallelize, method=_name), summary=_summary,
                    input_shard="seq")
for _name, _summary, _heads in [
        ("zeco", "ZeCO (All-Scan of the delta-rule state, dense maps)", False),
        ("allgather", "all-gather of every rank's [S | M] (fla cp / attention-gym)", False),
        ("heads", "all-to-all to head shards (Megatron-core)", True),
        ("p2p", "LASP-1-style state hand-off rank to rank", False)]:
    register_method(_name, "gdn", functools.partial(zeco.plans_delta.parallelize, method=_name), summary=_summary,
                    input_shard="seq", heads_divisible=_heads)
del _name, _summary, _heads
