"""Per-model plans for the sequence-parallel methods, and the one selection function.

``parallelize(model, group, method="dsp" | "ulysses" | "ring" | "megatron_sp" | "usp", ...)``

* ``"dsp"`` delegates to ``dsp.parallelize`` (switch T <-> S around the temporal stage).
* The single-dimension methods treat the video ``[B, T, S, C]`` as ONE sequence of T·S tokens in
  T-major order, sharded contiguously over the P ranks at frame boundaries: rank r holds frames
  ``tensor_split(T, P)[r]``, i.e. exactly the ``tensor_split`` of the T·S tokens when P divides T.
  When P does not divide T, a token-level split would cut a frame in two and make the per-frame
  (spatial) attention span two ranks; we cut at the nearest frame boundary instead (pieces differ by
  at most one frame), the layout that keeps every frame on one rank, so the spatial stage never
  communicates for any method, as for DSP. T < P raises ``ValueError`` at the first forward.
  Attentions whose span lies inside one shard (spatial self-attention, cross-attention to the
  replicated captions, MLPs, the embedding and the final layer) run locally; only attentions that
  span shards (ST-DiT's temporal attention: the sequence is T, batched over the S locations) get
  the method's distributed attention.

The boundary (entry: keep this rank's frames of the input, no communication; exit: gather the output,
or leave it sharded with ``gather_output=False``; the one-time input check) is DSP's plan engine
with a plan in which every stage runs with T sharded, so it reuses its checks and ``shard_target``.

A plan is data naming module paths; models are not imported (:data:`STDIT_SP_PLAN`).
"""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from longseq import comm
from longseq.groups import mesh_of, sp_group_of
from longseq.sharding import shard_range

__all__ = ["SPPlan", "STDIT_SP_PLAN", "PLANS", "METHODS", "SINGLE_DIM_METHODS", "SPHandle", "parallelize",
           "block_volume"]

METHODS = {
    "dsp": "Dynamic Sequence Parallelism: switch the sharded dim T <-> S with one all-to-all around each temporal stage",
    "ulysses": "DeepSpeed-Ulysses: all-to-all q, k, v (sequence -> heads) and the output back around each temporal attention",
    "ring": "ring attention: k, v passed around the ring in P-1 steps, online-softmax merge; dk, dv around the ring in backward",
    "megatron_sp": "Megatron-SP: all-gather the sequence before each temporal attention, reduce-scatter after (heads split TP-style)",
    "usp": "USP: Ulysses inside groups of ulysses_degree ranks x ring attention across ring_degree groups",
}
SINGLE_DIM_METHODS = ("ulysses", "ring", "megatron_sp", "usp")


@dataclasses.dataclass(frozen=True)
class SPPlan:
    """How a single-dimension method applies to a model.

    ``boundary``: a DSP plan (``dsp.Plan`` or registered name) in which every stage runs with the
    sequence dim ``seq_dim`` sharded: it shards the input and gathers the output.
    ``attentions``: path patterns of the self-attention modules whose span crosses shards; each has
    an ``attn_fn`` hook (Ulysses, ring, USP) and ``qkv``, ``proj``, ``num_heads`` (Megatron-SP).
    ``offset_stages``: path patterns of modules that take the keyword ``offset_kwarg``: the index of
    this rank's first element of ``seq_dim`` (position embeddings built inside a stage).
    """

    name: str
    boundary: Any
    attentions: tuple[str, ...]
    seq_dim: str = "T"
    offset_stages: tuple[str, ...] = ()
    offset_kwarg: str = "frame_offset"


def _stdit_boundary():
    """DSP's ST-DiT plan pinned to frames: T sharded everywhere; the temporal attention is the one
    the method distributes instead of switching around it."""
    from longseq.dsp import STDIT_PLAN
    return STDIT_PLAN.pinned("stdit-single-dim")


class _LazyPlan:
    """Build the boundary plan on first use (``dsp`` is imported only when a plan is applied)."""

    def __init__(self, fn: Callable):
        self.fn, self.value = fn, None

    def get(self):
        if self.value is None:
            self.value = self.fn()
        return self.value


STDIT_SP_PLAN = SPPlan(
    name="stdit",
    boundary=_LazyPlan(_stdit_boundary),
    attentions=("blocks.*.temporal.attn",),
    seq_dim="T",
    offset_stages=("blocks.*.temporal",),
    offset_kwarg="frame_offset",
)

PLANS = {"stdit": STDIT_SP_PLAN}


def _as_sp_plan(plan: Any) -> SPPlan:
    if plan is None:
        return STDIT_SP_PLAN
    if isinstance(plan, SPPlan):
        return plan
    if isinstance(plan, str):
        if plan not in PLANS:
            raise ValueError(f"unknown sequence-parallel plan {plan!r}; registered plans: {', '.join(PLANS)}")
        return PLANS[plan]
    raise TypeError(f"plan must be a longseq.sp.SPPlan or a registered name, not {type(plan).__name__}")


def _matches(pattern: str, path: str) -> bool:
    """``*`` stands for one path component (as in DSP's plans)."""
    a, b = pattern.split("."), path.split(".")
    return len(a) == len(b) and all(fnmatch.fnmatchcase(y, x) for x, y in zip(a, b))


def _matching(model: nn.Module, patterns: tuple[str, ...], what: str) -> list[tuple[str, nn.Module]]:
    mods = dict(model.named_modules())
    out = []
    for pat in patterns:
        hits = [(p, m) for p, m in mods.items() if p and _matches(pat, p)]
        if not hits:
            raise ValueError(f"sequence-parallel plan: no submodule of {type(model).__name__} matches the {what} path "
                             f"{pat!r}")
        out += hits
    return out


# ----------------------------------------------------------------------------------------------
# Volumes (the DESIGN.md table), per rank per spanning attention, in elements
# ----------------------------------------------------------------------------------------------
def block_volume(method: str, m: int, P: int, ulysses_degree: Optional[int] = None) -> tuple[float, float]:
    """(forward, backward) elements sent per rank per block (per spanning attention for the
    single-dim methods; per temporal stage's two switches for DSP), for an activation of m = M/P
    elements per rank (q, k, v and out as large as the activation) and even sizes."""
    if method == "dsp":
        return 2 * m * (P - 1) / P, 2 * m * (P - 1) / P
    if method == "ulysses":
        return 4 * m * (P - 1) / P, 4 * m * (P - 1) / P
    if method == "ring":
        return 2 * m * (P - 1), 4 * m * (P - 1)
    if method == "megatron_sp":
        return 2 * m * (P - 1), 2 * m * (P - 1)
    if method == "usp":
        u = P if ulysses_degree is None else ulysses_degree
        r = P // u
        return 4 * m * (u - 1) / u + 2 * m * (r - 1), 4 * m * (u - 1) / u + 4 * m * (r - 1)
    raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")


# ----------------------------------------------------------------------------------------------
# The handle
# ----------------------------------------------------------------------------------------------
class SPHandle:
    """What :func:`parallelize` returns for a single-dimension method: ``remove()`` undoes everything
    (also as a context manager); ``shard_target(t)``; ``whole_sizes``; ``attentions`` (path, module);
    ``usp_groups`` (USP only); ``mesh``."""

    def __init__(self, model: nn.Module, group: Any, method: str, plan: SPPlan, boundary: Any):
        self.model, self.group, self.method, self.plan, self.boundary = model, group, method, plan, boundary
        self.attentions: list[tuple[str, nn.Module]] = []
        self.usp_groups = None
        self.mesh = None            # the DeviceMesh parallelize was given, if any
        self._undo: list[Callable[[], None]] = []

    @property
    def whole_sizes(self) -> dict:
        return self.boundary.whole_sizes

    def seq_len(self) -> int:
        return int(self.boundary.whole_sizes[self.plan.seq_dim])

    def shard_target(self, target: torch.Tensor) -> torch.Tensor:
        return self.boundary.shard_target(target)

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()
        self.boundary.remove()

    def __enter__(self) -> "SPHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _set_attn_fn(handle: SPHandle, mod: nn.Module, path: str, fn: Callable) -> None:
    if not hasattr(mod, "attn_fn"):
        raise ValueError(f"{handle.method}: the attention module {path!r} ({type(mod).__name__}) has no attn_fn hook "
                         f"for a distributed attention function")
    if mod.attn_fn is not None:
        raise ValueError(f"{handle.method}: {path!r}.attn_fn is already set (is the model parallelized already?)")
    mod.attn_fn = fn

    def undo():
        mod.attn_fn = None
    handle._undo.append(undo)


def _set_forward(handle: SPHandle, mod: nn.Module, fwd: Callable) -> None:
    had = "forward" in mod.__dict__
    old = mod.__dict__.get("forward")
    mod.forward = fwd

    def undo():
        if had:
            mod.forward = old
        else:
            del mod.forward
    handle._undo.append(undo)


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}


def _dtype(d: Any) -> Optional[torch.dtype]:
    """A dtype from a dtype or its name (config files pass strings)."""
    if d is None or isinstance(d, torch.dtype):
        return d
    name = str(d).replace("torch.", "")
    if name not in _DTYPES:
        raise ValueError(f"grad_comm_dtype {d!r} is not a dtype; valid names: {', '.join(_DTYPES)}")
    return _DTYPES[name]


def parallelize(model: nn.Module, group: Any, method: str = "dsp", *, plan: Any = None, gather_output: bool = True,
                check_inputs: Any = True, ulysses_degree: Optional[int] = None, ring_degree: Optional[int] = None,
                kernel: str = "auto", grad_comm_dtype: Optional[torch.dtype] = None, dsp_plan: Any = None,
                sp_dim: Optional[str] = None):
    """Make ``model`` sequence-parallel over ``group`` (a process group, ``longseq.ParallelGroups``,
    or a ``DeviceMesh`` whose ``sp_dim`` is the SP group) with ``method``; in place, by hooks and
    attribute hooks; returns a handle whose ``remove()`` undoes it (``dsp.DSPHandle`` for "dsp",
    :class:`SPHandle` otherwise) and whose ``mesh`` is the DeviceMesh given (or None).

    Every method takes the whole input on every rank of the group and returns the whole output
    (``gather_output=True``) or this rank's frames of it (``False``; use ``handle.shard_target`` and
    ``dsp.sharded_mse_loss``). ``plan``: an :class:`SPPlan` or name (default ``"stdit"``);
    ``dsp_plan``: DSP's plan for method "dsp". Ring and USP: ``kernel`` ("auto", "math",
    "aten_cpu") and ``grad_comm_dtype``; USP: ``ulysses_degree`` / ``ring_degree`` (default: Ulysses
    as wide as the heads allow). Raises ``ValueError`` (before any communication) for an unknown
    method, heads the method cannot split (Ulysses: P must divide them; USP: the Ulysses degree;
    Megatron-SP: at least P heads), or a plan that does not fit the model.
    """
    if method not in METHODS:
        raise ValueError(f"unknown sequence-parallel method {method!r}; valid methods: {', '.join(METHODS)}")
    mesh, sp = mesh_of(group), sp_group_of(group, sp_dim)
    if method == "dsp":
        extra = {k: v for k, v in dict(plan=plan, ulysses_degree=ulysses_degree, ring_degree=ring_degree,
                                      grad_comm_dtype=grad_comm_dtype).items() if v is not None}
        if extra or kernel != "auto":
            raise ValueError(f"method 'dsp' takes no {', '.join(extra) or 'kernel'} option (dsp_plan= chooses its plan)")
        from longseq import dsp
        handle = dsp.parallelize(model, sp, dsp_plan, gather_output=gather_output, check_inputs=check_inputs)
        handle.mesh = mesh
        return handle
    if dsp_plan is not None:
        raise ValueError(f"dsp_plan is for method 'dsp', not {method!r} (use plan=)")
    if method not in ("usp",) and (ulysses_degree is not None or ring_degree is not None):
        raise ValueError(f"ulysses_degree / ring_degree are options of method 'usp', not {method!r}")
    if method not in ("ring", "usp") and (kernel != "auto" or grad_comm_dtype is not None):
        raise ValueError(f"kernel / grad_comm_dtype are options of ring attention ('ring', 'usp'), not {method!r}")

    from .ring import KERNELS
    if kernel not in KERNELS:
        raise ValueError(f"unknown ring attention kernel {kernel!r}; valid: {', '.join(KERNELS)}")
    grad_comm_dtype = _dtype(grad_comm_dtype)
    sp_plan = _as_sp_plan(plan)
    P, r = comm.group_size(sp), comm.group_rank(sp)
    attns = _matching(model, sp_plan.attentions, "attention")
    offsets = _matching(model, sp_plan.offset_stages, "offset stage") if sp_plan.offset_stages else []

    # -- checks that need no communication ----------------------------------------------------
    heads = {p: int(getattr(m, "num_heads", 0) or 0) for p, m in attns}
    from .ulysses import check_heads
    if method == "ulysses":
        for p, h in heads.items():
            check_heads(h, P, what=f"Ulysses ({p})")
    if method == "megatron_sp":
        from .megatron_sp import head_range
        for h in heads.values():
            head_range(h, P, r)
    if method == "usp":
        from .usp import default_degrees
        u, _ = default_degrees(P, min(heads.values()) if heads else None, ulysses_degree, ring_degree)
        for p, h in heads.items():
            check_heads(h, u, what=f"USP's Ulysses degree ({p})")
    if method in ("ulysses", "ring", "usp"):
        for p, m in attns:
            if not hasattr(m, "attn_fn"):
                raise ValueError(f"{method}: the attention module {p!r} ({type(m).__name__}) has no attn_fn hook")
            if m.attn_fn is not None:
                raise ValueError(f"{method}: {p!r}.attn_fn is already set (is the model parallelized already?)")

    usp_groups = None
    if method == "usp":
        from .usp import init_usp_groups
        usp_groups = init_usp_groups(sp, ulysses_degree, ring_degree, num_heads=min(heads.values()) if heads else None)

    from longseq import dsp
    boundary = dsp.parallelize(model, sp, sp_plan.boundary.get() if isinstance(sp_plan.boundary, _LazyPlan)
                               else sp_plan.boundary, gather_output=gather_output, check_inputs=check_inputs)
    handle = SPHandle(model, sp, method, sp_plan, boundary)
    handle.usp_groups, handle.mesh = usp_groups, mesh
    try:
        _install(handle, attns, offsets, sp, P, r, kernel, grad_comm_dtype)
    except Exception:
        handle.remove()
        raise
    return handle


def _install(handle: SPHandle, attns, offsets, sp, P: int, r: int, kernel: str, grad_comm_dtype) -> None:
    method, plan = handle.method, handle.plan
    for path, mod in attns:
        tag = f"{method}.{path}"
        if method == "ulysses":
            from .ulysses import ulysses_attention

            def fn(q, k, v, backend=None, causal=False, _tag=tag, **kw):
                return ulysses_attention(q, k, v, sp, seq_len=handle.seq_len(), backend=backend, causal=causal,
                                         check=False, tag=_tag, **kw)
            _set_attn_fn(handle, mod, path, fn)
        elif method == "ring":
            from .ring import ring_attention

            def fn(q, k, v, backend=None, causal=False, _tag=tag, **kw):
                return ring_attention(q, k, v, sp, seq_len=handle.seq_len(), causal=causal, kernel=kernel,
                                      grad_comm_dtype=grad_comm_dtype, check=False, tag=_tag, **kw)
            _set_attn_fn(handle, mod, path, fn)
        elif method == "usp":
            from .usp import usp_attention

            def fn(q, k, v, backend=None, causal=False, _tag=tag, **kw):
                return usp_attention(q, k, v, handle.usp_groups, seq_len=handle.seq_len(), causal=causal,
                                     kernel=kernel, grad_comm_dtype=grad_comm_dtype, tag=_tag, **kw)
            _set_attn_fn(handle, mod, path, fn)
        elif method == "megatron_sp":
            from .megatron_sp import make_forward
            _set_forward(handle, mod, make_forward(mod, sp, handle.seq_len, tag=tag))
    for path, mod in offsets:
        def pre(module, args, kwargs):
            start, _ = shard_range(handle.seq_len(), P, r)
            return args, {**kwargs, plan.offset_kwarg: start}
        h = mod.register_forward_pre_hook(pre, with_kwargs=True)
        handle._undo.append(h.remove)
