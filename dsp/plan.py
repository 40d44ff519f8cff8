"""The DSP plan engine: declarative plans, applied to a model from outside with module hooks.

A :class:`Plan` is data. It names the dimensions of the tensors that flow through the model
(layouts such as ``"B T S C"``), the *home* dimension the activation is sharded along between
stages, and for each stage (submodules matched by path pattern, ``*`` standing for one path
component) the dimension that must be sharded for it to run locally::

    Plan(name="stdit", home="T",
         input=Boundary("B C T H W"), output=Boundary("B C T H W"),
         stages=(("embed", Stage("B C T H W", shard="T", out_layout="B T S C")),
                 ("blocks.*.spatial", Stage("B T S C", shard="T")),
                 ("blocks.*.temporal", Stage("B T S C", shard="S")),
                 ("final", Stage("B T S C", shard="T", out_layout="B C T H W"))))

:func:`parallelize` installs hooks, and nothing else, on the model (it stays the same object, with
the same parameters and state dict):

* model pre-hook (the entry): on the first forward of each new input signature, checks with one
  small ``all_gather_object`` (tag ``dsp.check``) that every rank of the group got inputs of the
  same shapes and values (and, the first time, the same parameters); raises ``ValueError`` on every
  rank otherwise. Then keeps this rank's piece of the input along ``home`` (no communication) and
  records the whole size of ``home``.
* stage pre-hook: the first positional argument arrives sharded along ``home``; if the stage needs
  another dimension sharded, one all-to-all switches to it (tag ``dsp.<path>.in``). The whole sizes
  of the other dimensions are recorded here, where they are seen whole.
* stage hook: the output is sharded along the stage's dimension; if that is not ``home``, one
  all-to-all switches back (tag ``dsp.<path>.out``). Backward of each switch is the switch the other
  way (tags ``.bwd``).
* model hook (the exit): all-gathers the output along ``home`` (tag ``dsp.exit``), or with
  ``gather_output=False`` returns this rank's piece (see :func:`dsp.sharded_mse_loss`).

Between stages the activation is always sharded along ``home``, so anything the model does
between stages (residuals, norms, per-token layers) sees one layout. Replicated inputs (timestep,
captions) are not touched. A stage must keep the size of the dimension it runs sharded along
(checked); stages may not be nested. Stage hooks act only inside a forward of the whole model
(calling a stage alone raises). Activation checkpointing works when it wraps a stage's ``forward``
(the hooks stay outside the recomputed region), not the module call.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import hashlib
import weakref
from typing import Any, Mapping

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from longseq import comm
from longseq.groups import mesh_of
from longseq.sharding import check_shardable, split_sizes

from .primitives import gather, shard, sp_group_of, switch

__all__ = ["Stage", "Boundary", "Plan", "as_plan", "parallelize", "DSPHandle", "shard_target"]


# ----------------------------------------------------------------------------------------------
# Plans (data)
# ----------------------------------------------------------------------------------------------
def _names(layout: str) -> list[str]:
    return layout.split()


@dataclasses.dataclass(frozen=True)
class Stage:
    """A submodule whose first positional argument has dims ``layout`` and that runs locally when
    ``shard`` is the sharded dimension; its output has dims ``out_layout`` (default ``layout``),
    sharded along ``shard``."""

    layout: str
    shard: str
    out_layout: str | None = None

    @property
    def output_layout(self) -> str:
        return self.out_layout or self.layout


@dataclasses.dataclass(frozen=True)
class Boundary:
    """The model's input (argument ``arg``, or keyword ``name``) or output, with dims ``layout``."""

    layout: str
    arg: int = 0
    name: str | None = None


@dataclasses.dataclass(frozen=True)
class Plan:
    """A DSP plan: see the module docstring. ``stages`` is ordered ``(path pattern, Stage)`` pairs."""

    name: str
    home: str
    input: Boundary
    output: Boundary
    stages: tuple[tuple[str, Stage], ...]

    def __post_init__(self) -> None:
        def need(layout: str, dim: str, where: str) -> None:
            if dim not in _names(layout):
                raise ValueError(f"DSP plan {self.name!r}: {where} layout {layout!r} has no dimension {dim!r}")
        need(self.input.layout, self.home, "input")
        need(self.output.layout, self.home, "output")
        for pat, st in self.stages:
            need(st.layout, st.shard, f"stage {pat!r}")
            need(st.layout, self.home, f"stage {pat!r}")
            need(st.output_layout, st.shard, f"stage {pat!r} output")
            need(st.output_layout, self.home, f"stage {pat!r} output")

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
            if st.shard not in out:
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
        def bound(b):
            return b if isinstance(b, Boundary) else Boundary(b) if isinstance(b, str) else Boundary(**b)
        stages = plan["stages"]
        pairs = stages.items() if isinstance(stages, Mapping) else stages
        return Plan(name=plan.get("name", "custom"), home=plan["home"], input=bound(plan["input"]),
                    output=bound(plan["output"]),
                    stages=tuple((p, s if isinstance(s, Stage) else Stage(**s)) for p, s in pairs))
    raise TypeError(f"a DSP plan must be a dsp.Plan, a plan name or a dict, not {type(plan).__name__}")


def _matches(pattern: str, path: str) -> bool:
    a, b = pattern.split("."), path.split(".")
    return len(a) == len(b) and all(fnmatch.fnmatchcase(y, x) for x, y in zip(a, b))


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


class DSPHandle:
    """What :func:`parallelize` returns: the hooks it installed on ``model`` and their state.

    ``remove()`` takes every hook off (the model is as before); ``shard_target(t)`` shards a
    target like the model's output; ``whole_sizes`` holds the whole sizes seen in the last forward.
    Usable as a context manager (removes the hooks on exit).
    """

    def __init__(self, model: nn.Module, group: Any, plan: Plan, *, gather_output: bool, check_inputs: Any,
                 comm_dtype: Any = None):
        if check_inputs not in _CHECK_MODES:
            raise ValueError(f"check_inputs must be True, False, 'new', 'always' or 'off', not {check_inputs!r}")
        self.model, self.group, self.plan = model, sp_group_of(group), plan
        self.gather_output = bool(gather_output)
        if not (comm_dtype is None or comm_dtype == "autocast" or isinstance(comm_dtype, torch.dtype)):
            raise ValueError(f"comm_dtype must be None, 'autocast' or a torch.dtype, not {comm_dtype!r}")
        self.comm_dtype = comm_dtype
        self.check_mode = _CHECK_MODES[check_inputs]
        self.whole_sizes: dict[str, int] = {}
        self.stages: list[tuple[str, nn.Module, Stage]] = []
        self._active = False
        self._seen: set = set()
        self._params_checked = False
        self.mesh = None            # the DeviceMesh parallelize was given, if any
        self._hooks: list = []
        self._resolve()
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
        self._hooks.append(m.register_forward_pre_hook(self._enter, with_kwargs=True))
        self._hooks.append(m.register_forward_hook(self._exit))
        for path, mod, st in self.stages:
            self._hooks.append(mod.register_forward_pre_hook(self._stage_pre(path, st)))
            self._hooks.append(mod.register_forward_hook(self._stage_post(path, st)))

    def remove(self) -> None:
        """Take the hooks off; the model computes as it did before :func:`parallelize`."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if _PARALLELIZED.get(self.model) is self:
            del _PARALLELIZED[self.model]

    def __enter__(self) -> "DSPHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # -- helpers --------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return comm.group_size(self.group)

    @property
    def rank(self) -> int:
        return comm.group_rank(self.group)

    def _expect_local(self, x: torch.Tensor, layout: str, dim: str, where: str) -> None:
        d = _names(layout).index(dim)
        n = self.whole_sizes[dim]
        want = split_sizes(n, self.size)[self.rank]
        if x.dim() != len(_names(layout)) or x.shape[d] != want:
            raise RuntimeError(
                f"DSP plan {self.plan.name!r}: {where} has shape {list(x.shape)}, but the plan says its dims are "
                f"{layout!r} with {dim} sharded: this rank ({self.rank} of {self.size}) should hold {want} of "
                f"{dim}={n}. The plan does not fit this model (a stage must keep the size of the dim it is "
                f"sharded along)")

    def _record_whole(self, x: torch.Tensor, layout: str, sharded: str) -> None:
        names = _names(layout)
        for dim in self.plan.sharded_dims:
            if dim != sharded and dim in names:
                self.whole_sizes[dim] = int(x.shape[names.index(dim)])

    def _check_shardable(self, x: torch.Tensor, layout: str, dim: str, where: str) -> None:
        check_shardable(int(x.shape[_names(layout).index(dim)]), self.size,
                        f"{dim} (dim {_names(layout).index(dim)} of {where}, dims {layout!r}, shape {list(x.shape)})")

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
    def _enter(self, module, args, kwargs):
        b = self.plan.input
        if len(args) > b.arg:
            x = args[b.arg]
        elif b.name is not None and b.name in kwargs:
            x = kwargs[b.name]
        else:
            raise TypeError(f"DSP plan {self.plan.name!r}: the model's input is its argument {b.arg}"
                            + (f" or keyword {b.name!r}" if b.name else "") + ", which this call does not pass")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"DSP plan {self.plan.name!r}: the model's input must be a tensor, not {type(x).__name__}")
        self._active = False
        self._check_inputs(args, kwargs)
        home = self.plan.home
        self._check_shardable(x, b.layout, home, "the model's input")
        self.whole_sizes = {home: int(x.shape[_names(b.layout).index(home)])}
        self._record_whole(x, b.layout, home)
        xs = shard(x, _names(b.layout).index(home), self.group, tag="dsp.entry", check=False)
        self._active = True
        if len(args) > b.arg:
            return (*args[: b.arg], xs, *args[b.arg + 1:]), kwargs
        return args, {**kwargs, b.name: xs}

    def _exit(self, module, args, out):
        self._active = False
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"DSP plan {self.plan.name!r}: the model's output must be a tensor, not {type(out).__name__}")
        b, home = self.plan.output, self.plan.home
        self._expect_local(out, b.layout, home, "the model's output")
        if not self.gather_output:
            return out
        return gather(out, _names(b.layout).index(home), self.group, self.whole_sizes[home], tag="dsp.exit", check=False)

    def _switch_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """The dtype switches send in: ``comm_dtype``, or under "autocast" the active autocast dtype."""
        if self.comm_dtype != "autocast":
            return self.comm_dtype
        dev = x.device.type
        return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None

    def _stage_pre(self, path: str, st: Stage):
        home = self.plan.home

        def hook(module, args):
            if not self._active:
                raise RuntimeError(
                    f"DSP: stage {path!r} was called outside a forward of the parallelized model; its hooks need "
                    "the whole sizes recorded at the model's input (call the model, or handle.remove() first)")
            if not args or not isinstance(args[0], torch.Tensor):
                raise TypeError(f"DSP: stage {path!r} must get its activation as the first positional argument")
            x = args[0]
            self._expect_local(x, st.layout, home, f"the input of {path!r}")
            self._record_whole(x, st.layout, home)
            if st.shard == home:
                return None
            self._check_shardable(x, st.layout, st.shard, f"the input of {path!r}")
            names = _names(st.layout)
            x = switch(x, self.group, names.index(st.shard), names.index(home), self.whole_sizes[home],
                       tag=f"dsp.{path}.in", comm_dtype=self._switch_dtype(x), check=False)
            return (x, *args[1:])

        return hook

    def _stage_post(self, path: str, st: Stage):
        home = self.plan.home

        def hook(module, args, out):
            if not self._active:
                return None
            y = out[0] if isinstance(out, (tuple, list)) else out
            if not isinstance(y, torch.Tensor):
                raise TypeError(f"DSP: stage {path!r} must return its activation (or a tuple starting with it)")
            lay = st.output_layout
            self._expect_local(y, lay, st.shard, f"the output of {path!r}")
            self._record_whole(y, lay, st.shard)
            if st.shard == home:
                return None
            names = _names(lay)
            y = switch(y, self.group, names.index(home), names.index(st.shard), self.whole_sizes[st.shard],
                       tag=f"dsp.{path}.out", comm_dtype=self._switch_dtype(y), check=False)
            if isinstance(out, (tuple, list)):
                return type(out)((y, *out[1:]))
            return y

        return hook

    # -- targets --------------------------------------------------------------------------
    def shard_target(self, target: torch.Tensor) -> torch.Tensor:
        """This rank's piece of a tensor shaped like the model's whole output (e.g. the diffusion
        target), to compare with the output of ``gather_output=False``."""
        return shard_target(target, self.group, self.plan)


def _pretty(d: Any) -> str:
    if isinstance(d, tuple) and d and d[0] == "tensor":
        return f"{list(d[1])} {d[2]}"
    return repr(d)


def shard_target(target: torch.Tensor, group: Any, plan: Any = None) -> torch.Tensor:
    """This rank's piece, along the plan's home dimension, of a tensor laid out like the model's
    output (the same on every rank). No communication (tag ``dsp.target``)."""
    p = as_plan(plan)
    return shard(target, _names(p.output.layout).index(p.home), group, tag="dsp.target", check=False)


def parallelize(model: nn.Module, group: Any, plan: Any = None, *, gather_output: bool = True,
                check_inputs: Any = True, comm_dtype: Any = None, sp_dim: Any = None) -> DSPHandle:
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

    Every rank of the group must call it, with the same model (same parameters) and plan. Raises
    ``ValueError`` if a plan path matches no submodule, and if the model is already parallelized.
    """
    if model in _PARALLELIZED:
        raise ValueError("this model is already parallelized by DSP; call .remove() on its handle first")
    mesh, group = mesh_of(group), sp_group_of(group, sp_dim)
    handle = DSPHandle(model, group, as_plan(plan), gather_output=gather_output, check_inputs=check_inputs,
                       comm_dtype=comm_dtype)
    handle.mesh = mesh
    _PARALLELIZED[model] = handle
    return handle
