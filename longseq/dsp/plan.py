"""The DSP plan language and engine: declarative plans, applied to a model from outside by hooks.

A :class:`Plan` is data. It names the dims of the tensors that flow through the model with
layouts (``"B T S C"``; einops-style folds ``"(B T) S C"``, ``...`` for unnamed dims: see
:mod:`dsp.layout`), the *home* dim the activation is sharded along between stages, and for each
stage (submodules matched by path pattern, ``*`` standing for one path component) the dim that
must be sharded for it to run locally::

    Plan(name="latte", home="T",
         input=(Boundary("B C T H W", name="hidden_states"),              # sharded at the entry
                Boundary("(B T) ...", name="encoder_attention_mask")),    # several inputs, by name
         output=Boundary("B C T H W", name="sample", arg=0),              # .sample or [0]
         stages=(("transformer_blocks.*", Stage("(B T) S C", shard="T")),
                 ("temporal_transformer_blocks.*",
                  Stage("(B S) T C", shard="S", args={"timestep": "(B S) C"}))))

Sizes are bound by name, per forward: at the entry from the inputs (``kwargs={"num_frames": "T"}``
binds T from the argument and rewrites it to this rank's T), then at each stage from what it
sees. A name that is sharded somewhere or folded somewhere has one size per forward (checked
everywhere); other names (``C``, ``H``) are local to their layout.

:func:`parallelize` installs hooks, and a wrapper of ``model.forward`` that names the plan when
the model fails on its sharded inputs; nothing else (same object, parameters, state dict):

* **entry** (model pre-hook): the inputs are bound to the model's signature (positional or
  keyword); every :class:`Extension` sees them whole (``enter``); the input check (one all-gather
  of an 8-byte digest, tag ``dsp.check``: every rank got the same inputs and weights); the sizes
  are bound and every input checked against its layout (a :class:`PlanError` names the input, its
  shape and the sizes, before any all-to-all); each input keeps this rank's piece along ``home``
  (no communication); keyword sizes are rewritten.
* **stage pre-hook**: the activation (argument ``Stage.input``) arrives sharded along ``home`` and
  is checked; if the stage wants another dim sharded, one all-to-all switches it (tag
  ``dsp.<path>.in``: unfold, switch, refold); a stage with ``shard=None`` gets the whole (one
  all-gather, tag ``dsp.<path>.whole``, backward a reduce-scatter). ``Stage.args`` are brought to
  the same sharding (an argument holding a piece of ``home`` is switched like the activation; one
  that is whole along the stage's dim is cut to this rank's piece, no communication);
  ``Stage.kwargs`` are rewritten to the sizes the stage sees; then ``Stage.pre`` and extensions.
* **stage hook**: ``Stage.post`` and extensions, then the output (or its field ``Stage.out``) is
  checked and switched back (tag ``dsp.<path>.out``) or, for a whole stage, cut to this rank's piece.
* **exit** (model hook): every output field is all-gathered along ``home`` (tag ``dsp.exit``), or
  with ``gather_output=False`` left as this rank's piece. Dataclasses, tuples and dicts are rebuilt.

Backward of each switch is the switch the other way (tags ``.bwd``). Between stages the activation
is always sharded along ``home``, so what the model does between stages must act per element of
``home`` (see docs/writing_a_plan.md for what does not, and :class:`Extension` for the fix).
Stage hooks act only inside a forward of the whole model. With ``check_stages=True`` (or
``LONGSEQ_CHECK=1``) the first forward also runs the plan on one rank (the whole inputs, no
sharding) and compares every stage's output with it, raising at the first stage that differs.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import functools
import hashlib
import inspect
import os
import weakref
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from longseq import comm
from longseq import functional as LF
from longseq.groups import mesh_of
from longseq.optional import SetupError
from longseq.positions import position_range
from longseq.sharding import check_shardable, shard_range, split_sizes

from . import layout as L
from .full_attention import METHODS, Joint, SDPARedirect, sequence_attention
from .primitives import gather, shard, sp_group_of, switch
from .stages import group_norm, halo_extend

__all__ = ["Stage", "Boundary", "Plan", "Extension", "Call", "PlanError", "as_plan", "parallelize", "DSPHandle",
           "shard_target", "offset_positions", "check_plan", "Joint"]


class PlanError(ValueError, RuntimeError):
    """A plan that does not fit the model or its inputs (names the plan entry, the tensor and the shapes)."""


# ----------------------------------------------------------------------------------------------
# Plans (data)
# ----------------------------------------------------------------------------------------------
def _names(layout: str) -> list[str]:
    return L.parse(layout).names


def _pairs(m: Any) -> tuple:
    return tuple((m or {}).items()) if isinstance(m, Mapping) or m is None else tuple(m)


@dataclasses.dataclass(frozen=True)
class Stage:
    """A submodule whose activation (argument ``input``: a name or a position, default the first)
    has dims ``layout`` and that runs locally when ``shard`` is the sharded dim (``None``: it needs
    the whole tensor, e.g. a norm over every frame); its output (or the field ``out`` of it: a name
    or an index; default the output, or element 0 of a tuple) has dims ``out_layout`` (default
    ``layout``). ``args``: other arguments ``{name: layout}`` brought to the stage's sharding;
    ``kwargs``: arguments ``{name: dim}`` set to the size of ``dim`` as the stage sees it (whole, or
    this rank's piece); ``pre(handle, path, call)`` / ``post(handle, path, out) -> out | None``:
    model-specific code (:class:`Extension`), run after the switch in / before the switch out.

    Stage kinds beyond the switch (docs/writing_a_plan.md, section 8):
    ``attention=True`` (or a :class:`Joint`): the module's attention spans the sharded dim (full-3D
    attention over the tokens of ``shard``'s folded group): its SDPA calls run sequence-parallel
    (the ``attention=`` method of :func:`parallelize`; :mod:`dsp.full_attention`).
    ``table=True`` with ``shard=None``: a module that computes a position table (RoPE) from its
    input's *shape* only: it sees a zero-stride stand-in of the whole input (no gather) and its
    output fields (``out``: a tuple for several) are cut to this rank's rows of ``home``.
    ``halo=k`` or ``(before, after)``: the module mixes along ``shard`` (a convolution across
    frames): its input gets the neighbours' edge rows point to point and its output is cropped.
    ``stats=True``: an ``nn.GroupNorm`` whose statistics span ``shard``: its sums are all-reduced
    (:mod:`dsp.stages`) instead of gathering the tensor."""

    layout: str
    shard: Optional[str]
    out_layout: Optional[str] = None
    input: Any = 0
    args: Any = ()
    kwargs: Any = ()
    out: Any = None
    pre: Optional[Callable] = None
    post: Optional[Callable] = None
    attention: Any = None
    table: bool = False
    halo: Any = 0
    stats: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "args", _pairs(self.args))
        object.__setattr__(self, "kwargs", _pairs(self.kwargs))
        h = self.halo
        object.__setattr__(self, "halo", (int(h), int(h)) if isinstance(h, int) else tuple(int(n) for n in h))
        if isinstance(self.out, list):
            object.__setattr__(self, "out", tuple(self.out))

    @property
    def fields(self) -> tuple:
        """The output fields the stage's layout describes (``out``: one, or a tuple of several)."""
        return self.out if isinstance(self.out, tuple) else (self.out,)

    @property
    def output_layout(self) -> str:
        return self.out_layout or self.layout


@dataclasses.dataclass(frozen=True)
class Boundary:
    """A model input (argument ``name``, or position ``arg``; default position 0) or output field
    (``name`` of a dataclass / dict, or index ``arg`` of a tuple; a bare tensor is itself), with dims
    ``layout``. ``optional``: an input that may be absent or None (default: every input but the first)."""

    layout: str
    arg: Optional[int] = None
    name: Optional[str] = None
    optional: Optional[bool] = None

    @property
    def label(self) -> str:
        return self.name if self.name is not None else f"argument {self.arg or 0}"


def _boundaries(b: Any) -> tuple[Boundary, ...]:
    items = b if isinstance(b, (tuple, list)) else (b,)
    out = []
    for x in items:
        out.append(x if isinstance(x, Boundary) else Boundary(x) if isinstance(x, str) else Boundary(**x))
    return tuple(out)


class Extension:
    """The public extension point: model-specific code a plan's data cannot say. Subclass it,
    override what you need, and pass instances as ``Plan(extensions=...)``; every method gets the
    :class:`DSPHandle` (sizes, ``rank``, ``positions(dim)``, the whole ``inputs``, ``group``).

    ``install(handle)`` / ``remove(handle)``: at :func:`parallelize` / ``handle.remove()`` (swap a
    buffer, say). ``enter(handle, call)``: the model's whole inputs (a :class:`Call`), before the
    input check and any collective (validate: raise here). ``before(handle, path, call)``: a stage's
    arguments, in the stage's sharding (edit ``call`` in place). ``after(handle, path, out)``: a
    stage's activation output, before it is switched back; return the replacement or None.
    """

    def install(self, handle: "DSPHandle") -> None:
        pass

    def remove(self, handle: "DSPHandle") -> None:
        pass

    def enter(self, handle: "DSPHandle", call: "Call") -> None:
        pass

    def before(self, handle: "DSPHandle", path: str, call: "Call") -> None:
        pass

    def after(self, handle: "DSPHandle", path: str, out: torch.Tensor) -> Optional[torch.Tensor]:
        return None


@dataclasses.dataclass(frozen=True)
class Plan:
    """A DSP plan: see the module docstring. ``input`` / ``output``: a :class:`Boundary` (or layout
    string) or a tuple of them (the first input is the main one and must be given); ``stages``:
    ordered ``(path pattern, Stage)`` pairs; ``kwargs``: the model's size arguments ``{name: dim}``
    (bind the dim at the entry, rewritten to this rank's size); ``extensions``: :class:`Extension`
    instances; ``varying``: names whose size may change from stage to stage (a UNet's spatial
    tokens after down / up sampling), bound afresh at each stage's input."""

    name: str
    home: str
    input: Any
    output: Any
    stages: tuple = ()
    kwargs: Any = ()
    extensions: tuple = ()
    varying: tuple = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "varying", tuple(self.varying))
        object.__setattr__(self, "input", _boundaries(self.input) if not isinstance(self.input, Boundary) else self.input)
        object.__setattr__(self, "output", _boundaries(self.output) if not isinstance(self.output, Boundary) else self.output)
        object.__setattr__(self, "kwargs", _pairs(self.kwargs))
        object.__setattr__(self, "stages", tuple(self.stages))
        object.__setattr__(self, "extensions", tuple(self.extensions))

        def need(layout: str, dim: Optional[str], where: str) -> None:
            try:
                names = _names(layout)
            except L.LayoutError as e:
                raise PlanError(f"DSP plan {self.name!r}: {where}: {e}") from None
            if dim is not None and dim not in names:
                raise PlanError(f"DSP plan {self.name!r}: {where} layout {layout!r} has no dimension {dim!r}")
        for b in self.inputs:
            need(b.layout, self.home, f"input {b.label!r}")
        for b in self.outputs:
            need(b.layout, self.home, f"output {b.label!r}")
        for pat, st in self.stages:
            need(st.layout, st.shard, f"stage {pat!r}")
            need(st.layout, self.home, f"stage {pat!r}")
            need(st.output_layout, st.shard, f"stage {pat!r} output")
            need(st.output_layout, self.home, f"stage {pat!r} output")
            for name, lay in st.args:
                need(lay, None, f"stage {pat!r} argument {name!r}")
            if (st.table and st.shard is not None) or ((st.attention or st.stats or any(st.halo)) and st.shard is None):
                raise PlanError(f"DSP plan {self.name!r}: stage {pat!r}: a table stage has shard=None; an attention, "
                                "halo or statistics stage names the sharded dim it spans")
            if (any(st.halo) or st.stats) and (st.shard, ) not in L.parse(st.layout).groups:
                raise PlanError(f"DSP plan {self.name!r}: stage {pat!r}: a halo or statistics stage needs {st.shard} "
                                f"as a dim of its own in {st.layout!r} (not folded)")
        known = set(self.names)
        for where, pairs in [("", self.kwargs)] + [(f"stage {pat!r} ", st.kwargs) for pat, st in self.stages]:
            for name, dim in pairs:
                if dim not in known:
                    raise PlanError(f"DSP plan {self.name!r}: {where}kwargs[{name!r}] names {dim!r}, which no "
                                    "layout has")

    @property
    def inputs(self) -> tuple[Boundary, ...]:
        return self.input if isinstance(self.input, tuple) else (self.input,)

    @property
    def outputs(self) -> tuple[Boundary, ...]:
        return self.output if isinstance(self.output, tuple) else (self.output,)

    def layouts(self) -> list[str]:
        out = [b.layout for b in self.inputs + self.outputs]
        for _, st in self.stages:
            out += [st.layout, st.output_layout] + [lay for _, lay in st.args]
        return out

    @property
    def names(self) -> list[str]:
        return list(dict.fromkeys(n for lay in self.layouts() for n in _names(lay)))

    @property
    def bound_names(self) -> set[str]:
        """Names with one size per forward: sharded anywhere, folded anywhere, or a size argument."""
        out = set(self.sharded_dims) | {d for _, d in self.kwargs}
        for lay in self.layouts():
            out |= set(L.parse(lay).folded)
        for _, st in self.stages:
            out |= {d for _, d in st.kwargs}
        return out

    def pinned(self, name: str | None = None) -> "Plan":
        """This plan with every stage sharded along ``home``: no switch anywhere, only the input's
        shard and the output's gather (the boundary that single-dimension methods such as Ulysses
        or Ring use, distributing an attention inside a stage instead of switching around it)."""
        stages = tuple((pat, dataclasses.replace(st, shard=self.home)) for pat, st in self.stages)
        return dataclasses.replace(self, name=name or f"{self.name}-pinned", stages=stages)

    @property
    def sharded_dims(self) -> list[str]:
        """The dimensions that are ever sharded: ``home`` and every stage's."""
        out = [self.home]
        for _, st in self.stages:
            if st.shard is not None and st.shard not in out:
                out.append(st.shard)
        return out


def as_plan(plan: Any) -> Plan:
    """A :class:`Plan` from a Plan, a registered name (``dsp.plans.PLANS``) or a dict of the same
    fields (``input``/``output`` dicts or layout strings, ``stages`` a mapping or pairs of dicts)."""
    if plan is None:
        plan = "stdit"
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, str):
        from .plans import PLANS
        if plan not in PLANS:
            raise ValueError(f"unknown DSP plan {plan!r}; registered plans: {', '.join(PLANS)}")
        return PLANS[plan]
    if isinstance(plan, Mapping):
        stages = plan["stages"]
        pairs = stages.items() if isinstance(stages, Mapping) else stages
        return Plan(name=plan.get("name", "custom"), home=plan["home"], input=plan["input"], output=plan["output"],
                    stages=tuple((p, s if isinstance(s, Stage) else Stage(**s)) for p, s in pairs),
                    kwargs=plan.get("kwargs", ()))
    raise TypeError(f"a DSP plan must be a dsp.Plan, a plan name or a dict, not {type(plan).__name__}")


def _matches(pattern: str, path: str) -> bool:
    """``*`` matches one path component, ``**`` any number (also none)."""
    a, b = pattern.split("."), path.split(".")

    def m(i: int, j: int) -> bool:
        if i == len(a):
            return j == len(b)
        if a[i] == "**":
            return any(m(i + 1, k) for k in range(j, len(b) + 1))
        return j < len(b) and fnmatch.fnmatchcase(b[j], a[i]) and m(i + 1, j + 1)
    return m(0, 0)


def offset_positions(dim: str, arg: Any = 0) -> Callable:
    """A ``Stage.pre`` for a module that gets frame / token indices counted from 0 on this rank's
    piece of ``dim`` (``arange(num_frames)`` on the local count): adds this rank's global offset
    along ``dim`` to the integer tensor argument ``arg``."""
    def pre(handle: "DSPHandle", path: str, call: "Call") -> None:
        call[arg] = call[arg] + handle.offset(dim)
    return pre


# ----------------------------------------------------------------------------------------------
# Calls: a module's arguments by name, positional or keyword
# ----------------------------------------------------------------------------------------------
class Call:
    """The arguments of one call of a module, read and written by parameter name (or position):
    ``call["timestep"]``, ``call[0]``, ``call["timestep"] = t``, ``"mask" in call``. Defaults count
    as passed for reading."""

    def __init__(self, fn: Callable, args: tuple, kwargs: dict):
        try:
            self._sig = inspect.signature(fn)
            self._bound = self._sig.bind(*args, **kwargs)
        except (TypeError, ValueError):
            self._sig = self._bound = None
        self._args, self._kwargs = list(args), dict(kwargs)

    def _key(self, key: Any) -> Any:
        if self._bound is None or not isinstance(key, int):
            return key
        params = [p for p in self._sig.parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        return params[key].name if key < len(params) else key

    def _has_param(self, name: str) -> bool:
        return self._bound is not None and name in self._sig.parameters

    def get(self, key: Any, default: Any = None) -> Any:
        k = self._key(key)
        if isinstance(k, int):
            return self._args[k] if k < len(self._args) else default
        if self._bound is None:
            return self._kwargs.get(k, default)
        if k in self._bound.arguments:
            return self._bound.arguments[k]
        p = self._sig.parameters.get(k)
        return default if p is None or p.default is inspect.Parameter.empty else p.default

    def __getitem__(self, key: Any) -> Any:
        return self.get(key)

    def __contains__(self, key: Any) -> bool:
        k = self._key(key)
        if isinstance(k, int):
            return k < len(self._args)
        return k in self._bound.arguments if self._bound is not None else k in self._kwargs

    def __setitem__(self, key: Any, value: Any) -> None:
        k = self._key(key)
        if isinstance(k, int):
            self._args[k] = value
        elif self._bound is None:
            self._kwargs[k] = value
        elif self._has_param(k):
            self._bound.arguments[k] = value
        else:
            raise KeyError(f"{k!r} is not a parameter of this module's forward")

    def accepts(self, key: Any) -> bool:
        k = self._key(key)
        return isinstance(k, int) or self._bound is None or self._has_param(k)

    @property
    def args(self) -> tuple:
        return tuple(self._args) if self._bound is None else self._bound.args

    @property
    def kwargs(self) -> dict:
        return dict(self._kwargs) if self._bound is None else self._bound.kwargs


def _field(out: Any, b: Any) -> Any:
    """The field of a structured output (``b``: a Boundary, a name, an index or None)."""
    name, idx = (b.name, b.arg) if isinstance(b, Boundary) else ((b, None) if isinstance(b, str) else (None, b))
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and not hasattr(out, "_fields"):
        return out[idx or 0]
    if name is None:
        raise TypeError(f"a structured output ({type(out).__name__}) needs a field name in the plan")
    return out[name] if isinstance(out, Mapping) else getattr(out, name)


def _replace(out: Any, b: Any, value: Any) -> Any:
    name, idx = (b.name, b.arg) if isinstance(b, Boundary) else ((b, None) if isinstance(b, str) else (None, b))
    if isinstance(out, torch.Tensor):
        return value
    if isinstance(out, (tuple, list)) and not hasattr(out, "_fields"):
        i = idx or 0
        return type(out)((*out[:i], value, *out[i + 1:]))
    if dataclasses.is_dataclass(out):
        return dataclasses.replace(out, **{name: value})
    if hasattr(out, "_replace"):
        return out._replace(**{name: value})
    if isinstance(out, Mapping):
        return type(out)({**out, name: value})
    setattr(out, name, value)
    return out


# ----------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------
_PARALLELIZED: "weakref.WeakKeyDictionary[nn.Module, DSPHandle]" = weakref.WeakKeyDictionary()

_CHECK_MODES = {True: "always", False: "off", "new": "new", "always": "always", "off": "off", None: "off"}


def _describe(v: Any) -> Any:
    """What must agree across ranks: a tensor's shape and dtype; of anything else only its type
    (a Python scalar that changes every step must not make every step's signature new)."""
    if isinstance(v, torch.Tensor):
        return ("tensor", tuple(v.shape), str(v.dtype).replace("torch.", ""))
    return None if v is None else type(v).__name__


def _same(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(x == y or (x != x and y != y) for x, y in zip(a, b))  # NaN == NaN here


def _fingerprint(v: torch.Tensor) -> tuple[float, ...]:
    with torch.no_grad():
        if v.is_floating_point():
            return (float(v.sum(dtype=torch.float64)), float(torch.linalg.vector_norm(v, dtype=torch.float64)))
        if v.is_complex():
            return (float(v.abs().sum(dtype=torch.float64)),)
        return (float(v.to(torch.int64).sum()),)


def _env_check() -> bool:
    return os.environ.get("LONGSEQ_CHECK", "").strip().lower() in ("1", "true", "yes", "on")


class DSPHandle:
    """What :func:`parallelize` returns: the hooks it installed on ``model`` and their state.

    ``remove()`` takes every hook off (the model is as before); ``shard_target(t)`` shards a
    target like the model's output; ``sizes`` (alias ``whole_sizes``) holds the whole sizes bound
    in the last forward. For extensions and positions: ``whole(dim)``, ``local(dim)`` (this rank's
    count), ``offset(dim)``, ``positions(dim)`` (this rank's global indices), ``inputs`` (the
    model's whole inputs of the running forward, a :class:`Call`), ``rank``, ``size``, ``group``.
    ``check_report``: ``(path, max error, max |ref|)`` per stage compared by ``check_stages``.
    Usable as a context manager (removes the hooks on exit).
    """

    def __init__(self, model: nn.Module, group: Any, plan: Plan, *, gather_output: bool, check_inputs: Any,
                 comm_dtype: Any = None, check_stages: Optional[bool] = None, check_rtol: float = 1e-4,
                 attention: str = "ulysses", ulysses_degree: Optional[int] = None):
        if attention not in METHODS:
            raise ValueError(f"attention must be one of {', '.join(METHODS)}, not {attention!r}")
        self.attention, self._usp = attention, None
        self._collect = False           # check_plan: compare every stage, report all, feed the reference on
        self._forwards = 0
        self._stage_call: Optional[tuple[str, Call, Stage]] = None
        if check_inputs not in _CHECK_MODES:
            raise ValueError(f"check_inputs must be True, False, 'new', 'always' or 'off', not {check_inputs!r}")
        self.model, self.group, self.plan = model, sp_group_of(group), plan
        self.gather_output = bool(gather_output)
        if not (comm_dtype is None or comm_dtype == "autocast" or isinstance(comm_dtype, torch.dtype)):
            raise ValueError(f"comm_dtype must be None, 'autocast' or a torch.dtype, not {comm_dtype!r}")
        self.comm_dtype = comm_dtype
        self.check_mode = _CHECK_MODES[check_inputs]
        self.sizes: dict[str, int] = {}
        self.inputs: Optional[Call] = None
        self.stages: list[tuple[str, nn.Module, Stage]] = []
        self.check_report: list[tuple[str, float, float]] = []
        self.check_failures: list[str] = []
        self._debug = _env_check() if check_stages is None else bool(check_stages)
        self._debug_rtol = float(check_rtol)
        self._records: Optional[dict] = None
        self._seen_calls: dict[str, int] = {}
        self._active = False
        self._solo = False
        self._step = "the entry"
        self._seen: set = set()
        self._params_checked = False
        self.mesh = None            # the DeviceMesh parallelize was given, if any
        self._hooks: list = []
        self._sharded_inputs: list = []
        self._bound = plan.bound_names
        self._resolve()
        if attention == "usp" and any(st.attention for _, _, st in self.stages) and self.size > 1:
            from longseq.sp.usp import init_usp_groups
            self._usp = init_usp_groups(self.group, ulysses_degree)
        self._install()

    # -- set-up ---------------------------------------------------------------------------
    def _resolve(self) -> None:
        modules = dict(self.model.named_modules())
        owner: dict[str, str] = {}
        for pattern, st in self.plan.stages:
            hits = [p for p in modules if p and _matches(pattern, p)]
            if not hits:
                depth = pattern.count(".")
                same_depth = [p for p in modules if p and p.count(".") == depth]
                close = difflib.get_close_matches(pattern, same_depth, n=3, cutoff=0.5)
                raise ValueError(
                    f"DSP plan {self.plan.name!r}: no submodule of {type(self.model).__name__} matches the path "
                    f"{pattern!r}" + (f"; did you mean {', '.join(close)}?" if close else "")
                    + f" (submodules at that depth: {', '.join(same_depth[:12]) or 'none'}"
                    + (", ..." if len(same_depth) > 12 else "") + ")")
            for p in hits:
                if p in owner:
                    raise ValueError(f"DSP plan {self.plan.name!r}: {p!r} matches both {owner[p]!r} and {pattern!r}")
                owner[p] = pattern
                self.stages.append((p, modules[p], st))
        paths = sorted(owner)
        for a in paths:
            for b in paths:
                if b.startswith(a + "."):
                    raise ValueError(f"DSP plan {self.plan.name!r}: stages may not be nested ({a!r} contains {b!r})")

    def _install(self) -> None:
        m = self.model
        done = []
        try:
            for ext in self.plan.extensions:
                ext.install(self)
                done.append(ext)
        except BaseException:
            for ext in reversed(done):
                ext.remove(self)
            raise
        self._hooks.append(m.register_forward_pre_hook(self._enter, with_kwargs=True))
        self._hooks.append(m.register_forward_hook(self._exit))
        self._swapped = []
        for path, mod, st in self.stages:
            self._hooks.append(mod.register_forward_pre_hook(self._stage_pre(path, mod, st), with_kwargs=True))
            self._hooks.append(mod.register_forward_hook(self._stage_post(path, st)))
            if st.attention or st.stats:
                self._swapped.append((mod, "forward" in vars(mod), vars(mod).get("forward")))
                mod.forward = self._stage_forward(path, mod, st, mod.forward)
        self._had_forward = "forward" in vars(m)
        self._old_forward = vars(m).get("forward")
        m.forward = self._wrap_forward(m.forward)

    def _wrap_forward(self, forward: Callable) -> Callable:
        @functools.wraps(forward)
        def wrapped(*args, **kwargs):
            self._forwards += 1
            try:
                return forward(*args, **kwargs)
            except (PlanError, SetupError) as e:  # the plan's own error, or the environment's (not the plan's)
                if isinstance(e, PlanError) and self._active and self.size > 1:
                    self._publish_failure(str(e))
                self._active = False
                raise
            except comm.CollectiveError as e:
                active, self._active = self._active, False
                peer = self._peer_failure() if active else None
                if peer is None:
                    raise
                raise PlanError(f"DSP plan {self.plan.name!r}: a peer failed ({peer}); this rank stopped waiting "
                                f"in {self._step} after the collective timeout") from e
            except Exception as e:
                active, self._active = self._active, False
                if not active or self.size == 1:
                    raise
                shapes = ", ".join(f"{b.label} {b.layout!r} {_shape(w)} -> local {_shape(loc)}"
                                   for b, w, loc in self._sharded_inputs)
                where = self._step
                if self._stage_call is not None and self._step.startswith("stage"):
                    where += f" (its arguments: {self._describe_call()})"
                msg = (f"DSP plan {self.plan.name!r}: {type(self.model).__name__}.forward failed on this rank's "
                       f"piece ({self.plan.home}={self.local(self.plan.home)} of {self.whole(self.plan.home)}) in "
                       f"{where}; sharded inputs: {shapes}; sizes {self.sizes}. The plan does not fit the model "
                       f"there (a layout, a size argument in kwargs= or Stage(kwargs=...), or a tensor the model "
                       f"lays out along {self.plan.home} that the plan does not shard). The model's error: "
                       f"{type(e).__name__}: {e}")
                self._publish_failure(f"rank {self.rank}: {msg}")
                raise PlanError(msg) from e
        return wrapped

    # -- a failure on one rank, told to its peers (waiting in a collective) ----------------------
    def _failure_key(self) -> str:
        return f"longseq.dsp.failed/{self.plan.name}/{comm.group_ranks(self.group)}/{self._forwards}"

    def _publish_failure(self, msg: str) -> None:
        store = _store()
        if store is not None:
            try:
                store.set(self._failure_key(), msg[:4000])
            except Exception:       # noqa: BLE001 - telling the peers is best effort
                pass

    def _peer_failure(self) -> Optional[str]:
        store = _store()
        try:
            if store is not None and store.check([self._failure_key()]):
                return store.get(self._failure_key()).decode(errors="replace")
        except Exception:           # noqa: BLE001
            return None
        return None

    def _describe_call(self) -> str:
        """The running stage's arguments: tensors by shape, and the int arguments the plan does
        not set (a size the stage may need whole: ``Stage(kwargs={name: dim})``)."""
        path, call, st = self._stage_call
        set_by_plan = {n for n, _ in st.kwargs}
        named = (call._bound.arguments.items() if call._bound is not None else
                 [*((f"argument {i}", v) for i, v in enumerate(call.args)), *call.kwargs.items()])
        parts = []
        for name, v in named:
            if isinstance(v, torch.Tensor):
                parts.append(f"{name} {list(v.shape)}")
            elif isinstance(v, int) and not isinstance(v, bool):
                parts.append(f"{name}={v}" + ("" if name in set_by_plan else " (not set by the plan: a size the "
                                               f"stage needs whole? Stage(kwargs={{{name!r}: dim}}))"))
        return ", ".join(parts) or "none"

    def remove(self) -> None:
        """Take the hooks off; the model computes as it did before :func:`parallelize`."""
        for h in self._hooks:
            h.remove()
        if self._hooks:
            for mod, had, old in self._swapped:
                if had:
                    mod.forward = old
                else:
                    vars(mod).pop("forward", None)
            if self._had_forward:
                self.model.forward = self._old_forward
            else:
                vars(self.model).pop("forward", None)
            for ext in reversed(self.plan.extensions):
                ext.remove(self)
        self._hooks.clear()
        if _PARALLELIZED.get(self.model) is self:
            del _PARALLELIZED[self.model]

    def __enter__(self) -> "DSPHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # -- sizes and positions (public: extensions use them) ----------------------------------
    @property
    def size(self) -> int:
        return 1 if self._solo else comm.group_size(self.group)

    @property
    def rank(self) -> int:
        return 0 if self._solo else comm.group_rank(self.group)

    @property
    def whole_sizes(self) -> dict[str, int]:
        return self.sizes

    def whole(self, dim: str) -> int:
        """The whole size of ``dim`` in the running (or last) forward."""
        if dim not in self.sizes:
            raise PlanError(f"DSP plan {self.plan.name!r}: the size of {dim!r} is not bound yet "
                            f"(bound: {self.sizes}); it is bound where a layout first shows it")
        return self.sizes[dim]

    def local(self, dim: str) -> int:
        """How many elements of ``dim`` this rank holds when ``dim`` is sharded."""
        return split_sizes(self.whole(dim), self.size)[self.rank]

    def offset(self, dim: str) -> int:
        """The global index of this rank's first element of ``dim`` when it is sharded."""
        return shard_range(self.whole(dim), self.size, self.rank)[0]

    def positions(self, dim: str, device: Any = None) -> torch.Tensor:
        """This rank's global indices along ``dim`` when it is sharded (``longseq.positions``)."""
        r = position_range(self.whole(dim), self.size, self.rank)
        return torch.arange(r.start, r.stop, device=device)

    def _shown(self, sharded: Optional[str]) -> dict[str, int]:
        return L.local_sizes(self.sizes, sharded, lambda n: split_sizes(n, self.size)[self.rank])

    def _fit(self, x: Any, layout: str, sharded: Optional[str], what: str, *, partial: bool = False) -> list[str]:
        """Check ``x`` against ``layout`` (``sharded`` held as this rank's piece), binding sizes;
        returns the names left unknown (only with ``partial``: else they raise)."""
        if not isinstance(x, torch.Tensor):
            raise PlanError(f"DSP plan {self.plan.name!r}: {what} must be a tensor, not {type(x).__name__}")
        try:
            missing = L.bind(L.parse(layout), x, self.sizes, self._bound, sharded,
                          lambda n: split_sizes(n, self.size)[self.rank], f"DSP plan {self.plan.name!r}: {what}")
        except L.LayoutError as e:
            where = f" with {sharded} sharded (this rank, {self.rank} of {self.size}, holds its piece)" if sharded else ""
            raise PlanError(f"{e}{where}. The plan does not fit this model (sizes bound so far: {self.sizes})") from None
        if missing and not partial:
            raise PlanError(f"DSP plan {self.plan.name!r}: {what} (layout {layout!r}, shape {list(x.shape)}): the sizes "
                            f"of {', '.join(missing)} are not determined; bind all but one name of each group earlier")
        return missing

    def _holds_piece(self, x: torch.Tensor, layout: str, dim: str) -> bool:
        """Whether ``x`` (layout ``layout``) holds this rank's piece of ``dim`` rather than all of it."""
        try:
            L.bind(L.parse(layout), x, dict(self.sizes), self._bound, dim,
                   lambda n: split_sizes(n, self.size)[self.rank], "")
            return self.size > 1
        except L.LayoutError:
            return False

    def _check_shardable(self, layout: str, dim: str, where: str) -> None:
        lay = L.parse(layout)
        d = next(i for i, g in enumerate(lay.groups) if dim in g)
        try:    # sizes, not this rank's shape: the same PlanError on every rank (passed on as it is)
            check_shardable(self.whole(dim), self.size,
                            f"{dim} (dim {d} of {where}, dims {layout!r}, sizes {self.sizes})")
        except ValueError as e:
            raise PlanError(f"DSP plan {self.plan.name!r}: {e}") from None

    # -- moving data between shardings ----------------------------------------------------
    def _switch_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """The dtype switches send in: ``comm_dtype``, or under "autocast" the active autocast dtype."""
        if self.comm_dtype != "autocast":
            return self.comm_dtype
        dev = x.device.type
        return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None

    def _move(self, x: torch.Tensor, layout: str, src: Optional[str], dst: Optional[str], tag: str) -> torch.Tensor:
        """``x`` (layout ``layout``, ``src`` sharded or None: whole) with ``dst`` sharded instead."""
        if src == dst or self.size == 1:
            return x
        lay = L.parse(layout)
        xu, names = L.unfold(lay, x, self._shown(src))
        if src is None:                                   # whole -> this rank's piece (no communication)
            a, b = shard_range(self.sizes[dst], self.size, self.rank)
            y = xu.narrow(names.index(dst), a, b - a)
        elif dst is None:                                 # piece -> whole, backward reduce-scatter
            y = LF.all_gather(xu, self.group, dim=names.index(src), full_size=self.sizes[src], tag=tag)
        else:
            y = switch(xu, self.group, names.index(dst), names.index(src), self.sizes[src], tag=tag, check=False,
                       comm_dtype=self._switch_dtype(x))
        return L.fold(lay, y, self._shown(dst))

    # -- input check ----------------------------------------------------------------------
    def _check_inputs(self, args: tuple, kwargs: dict) -> None:
        """Every rank of the SP group got the same input shapes and values (and, the first time,
        the same weights). One all-gather of an 8-byte digest per checked forward (tag
        ``dsp.check``): every rank sees every digest, so all take the same branch; only when they
        differ does an ``all_gather_object`` of the details (``dsp.check.detail``) build the error."""
        if self.check_mode == "off" or self.size == 1:
            return
        items = [(f"argument {i}", a) for i, a in enumerate(args)] + [(f"{k}=", v) for k, v in sorted(kwargs.items())]
        sig = tuple((k, _describe(v)) for k, v in items)
        if self.check_mode == "new" and sig in self._seen:
            return
        mine = {"sig": sig, "values": {k: _fingerprint(v) for k, v in items if isinstance(v, torch.Tensor)}}
        # Under FSDP2 the parameters are DTensor shards, different on every rank by construction.
        check_params = not self._params_checked and not any(isinstance(p, DTensor) for p in self.model.parameters())
        if check_params:
            with torch.no_grad():
                mine["params"] = float(sum((p.sum(dtype=torch.float64).cpu() for p in self.model.parameters()
                                            if p.device.type != "meta"), torch.zeros((), dtype=torch.float64)))
        if not self._digests_agree(mine):
            self._raise_mismatch(mine, comm.all_gather_object(mine, self.group, tag="dsp.check.detail"))
        if check_params:
            self._params_checked = True
        self._seen.add(sig)

    def _digests_agree(self, mine: dict) -> bool:
        digest = hashlib.blake2b(repr(mine).encode(), digest_size=8).digest()
        everyone = comm.all_gather_int(int.from_bytes(digest, "little", signed=True), self.group, tag="dsp.check")
        return len(set(everyone)) == 1

    def _raise_mismatch(self, mine: dict, everyone: list) -> None:
        """Raise the error that says what differs (the same on every rank). Returns when nothing
        differs but the digests' text (e.g. -0.0 against 0.0)."""
        sig = mine["sig"]
        if any(o["sig"] != sig for o in everyone):
            lines = "\n".join(f"  rank {r}: " + ", ".join(f"{k} {_pretty(d)}" for k, d in o["sig"])
                              for r, o in enumerate(everyone))
            raise ValueError(
                "DSP: the ranks of a sequence-parallel group got inputs of different shapes (every rank of the "
                f"group must get the whole of the same sample):\n{lines}")
        for k in mine["values"]:
            vals = [o["values"][k] for o in everyone]
            if not all(_same(v, vals[0]) for v in vals):
                raise ValueError(
                    f"DSP: the ranks of a sequence-parallel group got different values in {k} (fingerprints "
                    f"{vals}); every rank of an SP group must load the same sample (ranks of different DP groups "
                    "load different ones)")
        if "params" in mine:
            vals = [o["params"] for o in everyone]
            if not all(_same((v,), (vals[0],)) for v in vals):
                raise ValueError(
                    f"DSP: the model's parameters differ across the ranks of the sequence-parallel group (sums "
                    f"{vals}); build it with the same seed on every rank or broadcast the weights first")

    # -- hooks ----------------------------------------------------------------------------
    def _bind_inputs(self, call: Call) -> list[tuple[Boundary, torch.Tensor]]:
        """The inputs this call passes, checked against their layouts; binds the sizes."""
        plan = self.plan
        self.sizes = {}
        for arg, dim in plan.kwargs:
            v = call.get(arg)
            if v is not None:
                self.sizes[dim] = int(v)
        present = []
        for i, b in enumerate(plan.inputs):
            key = b.name if b.name is not None and call.accepts(b.name) else (b.arg or 0)
            x = call.get(key)
            if x is None and (b.optional if b.optional is not None else i > 0):
                continue
            many = isinstance(x, (tuple, list)) and x and all(isinstance(t, torch.Tensor) for t in x)
            if not (isinstance(x, torch.Tensor) or many):
                raise PlanError(f"DSP plan {plan.name!r}: the model's input {b.label!r} (layout {b.layout!r}) must be "
                                f"a tensor (or a tuple of tensors laid out alike), not {type(x).__name__}"
                                + ("" if x is not None else "; this call does not pass it"))
            present.append((b, key, x))

        def fit(b, x):
            ts = x if isinstance(x, (tuple, list)) else (x,)
            return [m for t in ts for m in self._fit(t, b.layout, None, f"the model's input {b.label!r}", partial=True)]
        pending = present
        for _ in range(len(present) + 1):
            left = [(b, k, x) for b, k, x in pending if fit(b, x)]
            if len(left) == len(pending):
                break
            pending = left
        for b, k, x in pending:
            missing = fit(b, x)
            raise PlanError(f"DSP plan {plan.name!r}: the sizes of {', '.join(missing)} in the model's input "
                            f"{b.label!r} (layout {b.layout!r}, shape {list(x.shape)}) are not determined: bind all "
                            f"but one name of each group from another input or a size argument (Plan(kwargs=...))")
        return present

    def _enter(self, module, args, kwargs):
        call = Call(self._old_forward or type(module).forward.__get__(module), args, kwargs)
        if self._solo:                       # the one-rank recomputation of check_stages
            self._bind_inputs(call)
            self._active = True
            return None
        self._active = False
        self._step = "the entry"
        main = self.plan.inputs[0]
        x = call.get(main.name if main.name is not None and call.accepts(main.name) else (main.arg or 0))
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"DSP plan {self.plan.name!r}: the model's input is its argument {main.arg or 0}"
                            + (f" or keyword {main.name!r}" if main.name else "") + ", which this call does not "
                            "pass as a tensor")
        for ext in self.plan.extensions:
            ext.enter(self, call)
        self._check_inputs(args, kwargs)
        present = self._bind_inputs(call)
        home = self.plan.home
        self._check_shardable(main.layout, home, "the model's input")
        self.inputs = Call(self._old_forward or type(module).forward.__get__(module), call.args, call.kwargs)
        if self._debug and self.size > 1:
            self._recompute(call)
        self._sharded_inputs = []
        for b, key, x in present:
            xs = self._shard_input(x, b.layout)
            self._sharded_inputs.append((b, x, xs))
            call[key] = xs
        for arg, dim in self.plan.kwargs:
            if call.get(arg) is not None:
                call[arg] = self.local(dim) if dim == home else self.whole(dim)
        self._active = True
        return call.args, call.kwargs

    def _shard_input(self, x: Any, layout: str) -> Any:
        if isinstance(x, (tuple, list)):
            return type(x)(self._shard_input(t, layout) for t in x)
        lay = L.parse(layout)
        xu, names = L.unfold(lay, x, self.sizes)
        xs = shard(xu, names.index(self.plan.home), self.group, tag="dsp.entry", check=False)
        return L.fold(lay, xs, self._shown(self.plan.home))

    def _exit(self, module, args, out):
        if self._solo:
            for i, b in enumerate(self.plan.outputs):
                self._record(f"(output {i})", _field(out, b))
            return None
        self._active = False
        home = self.plan.home
        for b in self.plan.outputs:
            y = _field(out, b)
            if y is None:
                continue
            self._fit(y, b.layout, home, f"the model's output {b.label!r}")
            if self._records is not None:
                y = self._compare(f"(output {self.plan.outputs.index(b)})", y, b.layout, home)
                out = _replace(out, b, y)
            if self.gather_output and self.size > 1:
                lay = L.parse(b.layout)
                yu, names = L.unfold(lay, y, self._shown(home))
                yw = gather(yu, names.index(home), self.group, self.sizes[home], tag="dsp.exit", check=False)
                out = _replace(out, b, L.fold(lay, yw, self.sizes))
        if self._records is not None:           # compared once: the first forward only
            self._records, self._debug = None, False
        return out

    def _stage_pre(self, path: str, module: nn.Module, st: Stage):
        home = self.plan.home

        def hook(mod, args, kwargs):
            if not self._active:
                raise RuntimeError(
                    f"DSP: stage {path!r} was called outside a forward of the parallelized model; its hooks need "
                    "the whole sizes recorded at the model's input (call the model, or handle.remove() first)")
            call = Call(mod.forward, args, kwargs)
            self._stage_call = (path, call, st)
            for name in self.plan.varying:           # sizes that change between stages: bound afresh here
                self.sizes.pop(name, None)
            src = None if self._solo else home
            x = call.get(st.input)
            self._fit(x, st.layout, src, f"stage {path!r}: its input {st.input!r}")
            dst = None if self._solo else st.shard
            self._step = f"stage {path!r} (in)"
            if dst not in (home, None):
                self._check_shardable(st.layout, dst, f"the input of {path!r}")
            if st.table:
                call[st.input] = self._stand_in(x, st.layout, src)
            else:
                call[st.input] = self._move(x, st.layout, src, dst, f"dsp.{path}.in" if dst else f"dsp.{path}.whole")
            if any(st.halo) and not self._solo and self.size > 1:
                call[st.input] = self._with_halo(call[st.input], st, path)
            for name, lay in st.args:
                v = call.get(name)
                if not isinstance(v, torch.Tensor):
                    continue
                names = _names(lay)
                held = home if not self._solo and home in names and self._holds_piece(v, lay, home) else None
                self._fit(v, lay, held, f"stage {path!r}: its argument {name!r}")
                if dst is None or dst in names or held is None:
                    want = dst if dst in names else None
                elif held != dst:
                    raise PlanError(f"DSP plan {self.plan.name!r}: stage {path!r}: argument {name!r} holds a piece "
                                    f"of {held}, but its layout {lay!r} has no {dst} to shard instead")
                else:
                    want = held
                if not self._solo:
                    call[name] = self._move(v, lay, held, want, f"dsp.{path}.{name}")
            for name, dim in st.kwargs:
                call[name] = self.local(dim) if dim == dst else self.whole(dim)
            if st.pre is not None:
                st.pre(self, path, call)
            for ext in self.plan.extensions:
                ext.before(self, path, call)
            self._step = f"stage {path!r}"
            return call.args, call.kwargs

        return hook

    def _stage_post(self, path: str, st: Stage):
        home = self.plan.home

        def hook(mod, args, out):
            if not self._active:
                return None
            dst = None if self._solo else st.shard
            for field in st.fields:
                y = _field(out, field)
                if not isinstance(y, torch.Tensor):
                    raise TypeError(f"DSP: stage {path!r} must return its activation (or a tuple starting with it, or "
                                    f"name its field in Stage(out=...)), not {type(y).__name__}")
                if any(st.halo) and not self._solo and self.size > 1:
                    y = self._crop_halo(y, st, path)
                name = path if len(st.fields) == 1 else f"{path}[{field}]"
                self._fit(y, st.output_layout, dst, f"stage {name!r}: its output")
                for fn in ([st.post] if st.post is not None else []) + [e.after for e in self.plan.extensions]:
                    z = fn(self, path, y)
                    y = y if z is None else z
                if self._solo:
                    self._record(name, y)
                    out = _replace(out, field, y)
                    continue
                if self._records is not None:
                    y = self._compare(name, y, st.output_layout, dst)
                self._step = f"stage {path!r} (out)"
                y = self._move(y, st.output_layout, dst, home, f"dsp.{path}.out")
                out = _replace(out, field, y)
            return out

        return hook

    # -- stage kinds: full-3D attention, statistics, tables, halos ---------------------------
    def _stage_forward(self, path: str, mod: nn.Module, st: Stage, forward: Callable) -> Callable:
        """The stage module's forward for an attention or statistics stage (module docstring of
        :mod:`dsp.full_attention`, :mod:`dsp.stages`)."""
        @functools.wraps(forward)
        def run(*args, **kwargs):
            if not self._active or self._solo or self.size == 1:
                return forward(*args, **kwargs)
            if st.stats:
                return self._group_norm(path, mod, st, Call(forward, args, kwargs).get(st.input))
            return self._attend(path, st, forward, args, kwargs)
        return run

    def _group_norm(self, path: str, mod: nn.Module, st: Stage, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(mod, nn.GroupNorm):
            raise PlanError(f"DSP plan {self.plan.name!r}: stage {path!r}: stats=True takes an nn.GroupNorm, not "
                            f"{type(mod).__name__}")
        d = L.parse(st.layout).groups.index((st.shard,))
        count = x[0].numel() // mod.num_groups // x.shape[d] * self.whole(st.shard)
        return group_norm(x, mod, self.group, count, tag=f"dsp.{path}.stats")

    def token_sizes(self, layout: str, dim: str) -> list[int]:
        """Every rank's token count of the folded group of ``layout`` that holds ``dim``, with
        ``dim`` sharded (``T_r·H·W`` for ``"B (T H W) C"``): the pieces of a full-3D attention."""
        group = next(g for g in L.parse(layout).groups if dim in g)
        out = []
        for j in range(self.size):
            n = 1
            for name in group:
                n *= split_sizes(self.whole(name), self.size)[j] if name == dim else self.whole(name)
            out.append(n)
        return out

    def _attend(self, path: str, st: Stage, forward: Callable, args: tuple, kwargs: dict) -> Any:
        joint = st.attention if isinstance(st.attention, Joint) else None
        text_states = Call(forward, args, kwargs).get(joint.arg) if joint else None
        text = text_states.shape[1] if isinstance(text_states, torch.Tensor) else 0
        sizes = self.token_sizes(st.layout, st.shard)

        def fn(q, k, v, mask, scale):
            if q.shape[1] != sizes[self.rank] + text or k.shape[1] != q.shape[1]:
                raise PlanError(f"DSP plan {self.plan.name!r}: stage {path!r}: its attention got q of {q.shape[1]} "
                                f"and k of {k.shape[1]} tokens, but this rank holds {sizes[self.rank]} tokens of "
                                f"{st.layout!r}" + (f" and {text} joint tokens" if text else "") + "; a cross-"
                                "attention is not a stage (it stays local), a joint one needs attention=Joint(...)")
            return sequence_attention(q, k, v, self.group, method=self.attention, sizes=sizes, usp=self._usp,
                                      text=text, at=joint.at if joint else "start", mask=mask, scale=scale,
                                      tag=f"dsp.{path}.attn")

        mode = SDPARedirect(fn, f"DSP stage {path!r}")
        with mode:
            out = forward(*args, **kwargs)
        if mode.calls == 0:
            raise PlanError(f"DSP plan {self.plan.name!r}: stage {path!r} is an attention stage but called no "
                            "torch scaled_dot_product_attention: a diffusers model must use its 'native' attention "
                            "backend (model.set_attention_backend('native'), the default)")
        return out

    def _stand_in(self, x: torch.Tensor, layout: str, src: Optional[str]) -> torch.Tensor:
        """A zero-stride tensor of the whole input's shape (a table stage reads only the shape)."""
        lay = L.parse(layout)
        xu, names = L.unfold(lay, x, self._shown(src))
        shape = [self.sizes[n] if n in self.sizes else xu.shape[i] for i, n in enumerate(names)]
        whole = x.new_zeros(()).expand(shape)
        return L.fold(lay, whole, self.sizes) if lay.folded else whole

    def _halo_dims(self, st: Stage) -> tuple[int, int, int]:
        """(dim, before, after) of a halo stage on this rank (no rows beyond the sequence's ends)."""
        d = L.parse(st.layout).groups.index((st.shard,))
        before, after = st.halo
        if min(split_sizes(self.whole(st.shard), self.size)) < max(before, after):
            raise PlanError(f"DSP plan {self.plan.name!r}: a halo of {st.halo} rows along {st.shard} needs every "
                            f"rank to hold at least {max(before, after)} of the {self.whole(st.shard)} rows: use "
                            f"fewer ranks")
        return d, (before if self.rank > 0 else 0), (after if self.rank < self.size - 1 else 0)

    def _with_halo(self, x: torch.Tensor, st: Stage, path: str) -> torch.Tensor:
        d, _, _ = self._halo_dims(st)
        return halo_extend(x, d, st.halo[0], st.halo[1], self.group, tag=f"dsp.{path}.halo")

    def _crop_halo(self, y: torch.Tensor, st: Stage, path: str) -> torch.Tensor:
        d, nb, na = self._halo_dims(st)
        n = self.local(st.shard)
        if y.dim() <= d or y.shape[d] != nb + n + na:
            raise PlanError(f"DSP plan {self.plan.name!r}: halo stage {path!r} must keep the size of {st.shard} "
                            f"(got {list(y.shape)} from an input of {nb}+{n}+{na} rows along dim {d})")
        return y.narrow(d, nb, n)

    # -- check_stages / LONGSEQ_CHECK: the first forward against a one-rank recomputation --
    def _recompute(self, call: Call) -> None:
        """Run the plan on one rank on the whole inputs (no sharding, no collectives) and record
        every stage's output; the sharded forward then compares with it (:meth:`_compare`)."""
        self._records, self._seen_calls, self.check_report = {}, {}, []
        self.check_failures, self._last_ok = [], "the entry"
        saved = dict(self.sizes)
        self._solo = True
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                self.model(*call.args, **call.kwargs)
        finally:
            self._solo, self.sizes = False, saved

    def _record(self, path: str, y: Optional[torch.Tensor]) -> None:
        self._records.setdefault(path, []).append(None if y is None else y.detach().clone())

    def _compare(self, path: str, y: torch.Tensor, layout: str, sharded: Optional[str]) -> torch.Tensor:
        """Compare ``y`` (this rank's piece) with the one-rank recomputation; returns ``y``, or under
        :func:`check_plan` the reference's piece (so each stage is judged on right inputs)."""
        n = self._seen_calls.get(path, 0)
        self._seen_calls[path] = n + 1
        piece = y
        refs = self._records.get(path, [])
        ref = refs[n] if n < len(refs) else None
        with torch.no_grad():
            if sharded is not None:
                lay = L.parse(layout)
                yu, names = L.unfold(lay, y, self._shown(sharded))
                yw = comm.all_gather(yu.contiguous(), self.group, dim=names.index(sharded),
                                     sizes=split_sizes(self.sizes[sharded], self.size), tag="dsp.debug")
                y = L.fold(lay, yw, self.sizes)
            if ref is None or ref.shape != y.shape:
                err, scale = float("inf"), 0.0
            else:
                err = float((y.double() - ref.double()).abs().max()) if y.numel() else 0.0
                scale = float(ref.double().abs().max()) if ref.numel() else 0.0
        bad = not err <= self._debug_rtol * scale + 1e-6
        everyone = comm.all_gather_int(int(bad), self.group, tag="dsp.debug.flag")
        out = path.startswith("(output")
        name = f"the model's output {self.plan.outputs[int(path[8:-1])].label!r}" if out else path
        if self._collect:
            self.check_report.append((name, err, scale))
            if any(everyone):
                before = self._last_ok
                self.check_failures.append(
                    f"{name if out else f'stage {path!r}'} (call {n}): max|a-b| = {err:.3e}, max|ref| = {scale:.3e}"
                    + (f" (shapes {list(y.shape)} vs {list(ref.shape)})" if ref is not None and ref.shape != y.shape
                       else "") + f"; the cause is in it or in what runs between {before} and it")
            self._last_ok = f"stage {path!r}"          # fed the reference on: a right start for the next
            if ref is None or ref.shape != y.shape:
                return piece
            return self._move(ref.to(y.dtype), layout, None, sharded, "") if sharded is not None else ref.to(y.dtype)
        if any(everyone):
            self._active, self._records, self._debug = False, None, False
            agree = ", ".join(p for p, _, _ in self.check_report) or "none"
            raise PlanError(
                f"LONGSEQ_CHECK: DSP plan {self.plan.name!r}: {name if out else f'stage {path!r}'} (call {n}) differs from the one-rank "
                f"recomputation: max|a-b| = {err:.3e}, max|ref| = {scale:.3e}"
                + ("" if ref is None or ref.shape == y.shape else f" (shapes {list(y.shape)} vs {list(ref.shape)})")
                + f". The stages before it agree ({agree}). Look at what reaches this stage: a position or index "
                "built from a local size, an argument laid out along a sharded dim that the stage does not list "
                "in Stage(args=...), a size argument missing from kwargs=, or a reduction over a sharded dim.")
        self.check_report.append((name, err, scale))
        return piece

    # -- targets --------------------------------------------------------------------------
    def shard_target(self, target: torch.Tensor) -> torch.Tensor:
        """This rank's piece of a tensor shaped like the model's whole (first) output (e.g. the
        diffusion target), to compare with the output of ``gather_output=False``. No communication."""
        b = self.plan.outputs[0]
        self._fit(target, b.layout, None, "the target")
        lay = L.parse(b.layout)
        xu, names = L.unfold(lay, target, self.sizes)
        ts = shard(xu, names.index(self.plan.home), self.group, tag="dsp.target", check=False)
        return L.fold(lay, ts, self._shown(self.plan.home))


def _shape(x: Any) -> Any:
    return [list(t.shape) for t in x] if isinstance(x, (tuple, list)) else list(x.shape)


def _store() -> Any:
    """The default process group's key-value store (for telling peers of a failure), or None."""
    try:
        import torch.distributed as dist
        return dist.distributed_c10d._get_default_store()
    except Exception:       # noqa: BLE001 - no store: peers fall back to the collective's own error
        return None


def _pretty(d: Any) -> str:
    if isinstance(d, tuple) and d and d[0] == "tensor":
        return f"{list(d[1])} {d[2]}"
    return repr(d)


def shard_target(target: torch.Tensor, group: Any, plan: Any = None) -> torch.Tensor:
    """This rank's piece, along the plan's home dimension, of a tensor laid out like the model's
    output (the same on every rank). No communication (tag ``dsp.target``). For a folded output
    layout use the handle's ``shard_target`` (it knows the sizes)."""
    p = as_plan(plan)
    lay = L.parse(p.outputs[0].layout)
    if lay.folded:
        raise ValueError(f"dsp.shard_target: the output layout {lay.text!r} is folded; use handle.shard_target")
    return shard(target, lay.names.index(p.home), group, tag="dsp.target", check=False)


def parallelize(model: nn.Module, group: Any, plan: Any = None, *, gather_output: bool = True,
                check_inputs: Any = True, comm_dtype: Any = None, check_stages: Optional[bool] = None,
                sp_dim: Any = None, attention: str = "ulysses", ulysses_degree: Optional[int] = None) -> DSPHandle:
    """Make ``model`` run DSP sequence-parallel over ``group`` (a process group, a
    ``longseq.ParallelGroups`` whose SP group is used, or a ``DeviceMesh`` whose ``sp_dim`` is),
    in place, by hooks; returns a :class:`DSPHandle` whose ``remove()`` undoes it and whose
    ``mesh`` is the DeviceMesh it was given (None for a process group).

    ``plan``: a :class:`Plan`, a registered name or a dict (default ``dsp.plans.STDIT_PLAN``).
    ``gather_output``: the model returns the whole output on every rank (default), or, if False,
    this rank's piece along the home dimension (use :func:`dsp.sharded_mse_loss`).
    ``check_inputs``: True / ``"always"`` (default) checks on every forward that every rank got the
    same input shapes and values (one all-gather of an 8-byte digest; details only on a mismatch),
    and on the first that the weights agree; ``"new"`` checks only the first forward of each new
    input signature (no per-step collective, but a rank whose signature is new while another's is
    not waits in the check); False never.
    ``comm_dtype``: the dtype the switches send in (None: the activation's own; ``"autocast"``: the
    autocast dtype while autocast is on, as a bf16 model would send; or a ``torch.dtype``).
    ``check_stages`` (default: the environment variable ``LONGSEQ_CHECK=1``): on the first forward,
    also run the plan on one rank on the whole inputs and compare every stage's output with it
    (one all-gather per stage, tag ``dsp.debug``); raises :class:`PlanError` naming the first stage
    that differs (``handle.check_report`` lists the ones that agreed). A debugging aid: it costs a
    second forward and assumes the model is deterministic (no dropout).
    ``attention``: how the plan's attention stages (``Stage(attention=...)``, full-3D attention)
    run across the group: ``"ulysses"`` (default; the heads must be divisible by P), ``"ring"`` or
    ``"usp"`` (Ulysses groups of ``ulysses_degree`` ranks, ring across them; made here, a
    collective over the world).

    Every rank of the group must call it, with the same model (same parameters) and plan. Raises
    ``ValueError`` if a plan path matches no submodule, and if the model is already parallelized.
    """
    if model in _PARALLELIZED:
        raise ValueError("this model is already parallelized by DSP; call .remove() on its handle first")
    mesh, group = mesh_of(group), sp_group_of(group, sp_dim)
    handle = DSPHandle(model, group, as_plan(plan), gather_output=gather_output, check_inputs=check_inputs,
                       comm_dtype=comm_dtype, check_stages=check_stages, attention=attention,
                       ulysses_degree=ulysses_degree)
    handle.mesh = mesh
    _PARALLELIZED[model] = handle
    return handle


def check_plan(model: nn.Module, group: Any, plan: Any, *args: Any, rtol: float = 1e-4,
               attention: str = "ulysses", ulysses_degree: Optional[int] = None, **kwargs: Any) -> list:
    """Check ``plan`` on ``model`` once, on a small sample, before training: one forward of
    ``model(*args, **kwargs)`` (no gradients) sharded over ``group`` is compared, stage by stage and
    at the output, with the same plan run on one rank on the whole inputs (what ``LONGSEQ_CHECK``
    does). Each stage is compared with the reference fed to it (its input is the reference's, not
    a wrong earlier stage's), so **every** stage that differs is reported, not only the first.
    The model is left as it was (the hooks are removed). Every rank of the group calls it with the
    same sample. Returns ``[(stage, max error, max |ref|)]``; raises :class:`PlanError` listing
    every stage that differs (the cause is in the stage or in what runs between it and the stage
    before: a module that mixes along the sharded dim and is not a stage, a position built from a
    local size, a size argument missing from ``kwargs=``)."""
    if model in _PARALLELIZED:
        raise ValueError("check_plan: the model is parallelized already; call .remove() on its handle first")
    handle = DSPHandle(model, sp_group_of(group), as_plan(plan), gather_output=True, check_inputs=True,
                       check_stages=True, check_rtol=rtol, attention=attention, ulysses_degree=ulysses_degree)
    handle._collect = True
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        handle.remove()
    if handle.check_failures:
        raise PlanError(f"check_plan: DSP plan {handle.plan.name!r} does not compute what the model computes on "
                        f"one process; {len(handle.check_failures)} place(s) differ:\n  "
                        + "\n  ".join(handle.check_failures))
    return handle.check_report
