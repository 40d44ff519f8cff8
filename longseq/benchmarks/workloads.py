"""One training step (forward + backward + SP gradient sync) of every method, on the calling rank.

Used by ``benchmarks.scaling`` (timed runs on gloo / NCCL), by the cost model's ledger capture
(``benchmarks.costmodel.ledger``: the same step on a *fake* process group, which records every
collective in the ledger but moves no data) and by compute-only timing (the same fake group: the
rank's own work at its own shapes, no communication).

A :class:`Workload` names the family (``stdit``, ``gla`` or ``gdn``: Gated DeltaNet, and the hybrid by its preset), the method, the model (preset and
overrides of ``longseq.models.stdit`` / ``longseq.models.gla``), the whole-sample shape and the precision.
:func:`build_step` builds the model (seeded identically on every rank), applies the method's plan
over ``group`` and returns a zero-argument callable that runs one step. Models and methods come from
the registries (:mod:`longseq.models.registry`, :mod:`longseq.methods`).

Shapes: ST-DiT ``dict(B, T, H, W, N)`` (latent frames, latent height and width, caption tokens;
S = ceil(H/p)·ceil(W/p) tokens a frame); GLA ``dict(B, T)`` (tokens in the whole sequence).
Precision: ``"fp32"``; ``"bf16-autocast"`` (float32 parameters, bf16 autocast: what
``longseq.train`` does on GPUs); ``"bf16"`` (parameters and inputs in bf16).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

import longseq
from longseq import dsp, zeco
from longseq.methods import find_method, method_names
from longseq.models.gla import lm_loss
from longseq.models.registry import get_model_family

# The registered methods of the two benchmarked families (longseq.methods), "none" aside.
STDIT_METHODS = tuple(m for m in method_names("stdit") if m != "none")
GLA_METHODS = tuple(m for m in method_names("gla") if m != "none")
GDN_METHODS = tuple(m for m in method_names("gdn") if m != "none")  # Gated DeltaNet and the hybrid
FAMILY_METHODS = {"stdit": STDIT_METHODS, "gla": GLA_METHODS, "gdn": GDN_METHODS}
METHODS = {**{m: "stdit" for m in STDIT_METHODS}, **{m: "gla" for m in GLA_METHODS}}
PRECISIONS = ("fp32", "bf16-autocast", "bf16")

__all__ = ["Workload", "build_step", "unavailable_reason", "available_methods", "STDIT_METHODS", "GLA_METHODS",
           "METHODS", "GDN_METHODS", "FAMILY_METHODS", "tokens", "stdit_tokens_per_frame", "single_device_step", "PRECISIONS"]


@dataclasses.dataclass(frozen=True)
class Workload:
    family: str                     # "stdit" | "gla" | "gdn"
    method: str                     # one of METHODS, or "none" (one device, no plan)
    preset: str                     # models.stdit / models.gla preset
    shape: tuple                    # sorted (name, value) pairs; see the module docstring
    overrides: tuple = ()           # sorted (field, value) pairs of the model config
    precision: str = "fp32"
    grad_sync: bool = True          # longseq.sync_gradients over the SP group after backward
    options: tuple = ()             # sorted (key, value) pairs passed to the method's plan

    @staticmethod
    def make(family: str, method: str, preset: str, shape: dict, overrides: Optional[dict] = None,
             precision: str = "fp32", grad_sync: bool = True, options: Optional[dict] = None) -> "Workload":
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        return Workload(family, method, preset, tuple(sorted(shape.items())), tuple(sorted((overrides or {}).items())),
                        precision, grad_sync, tuple(sorted((options or {}).items())))

    @property
    def dims(self) -> dict:
        return dict(self.shape)

    @property
    def config_overrides(self) -> dict:
        return dict(self.overrides)

    def replace(self, **kw) -> "Workload":
        if "shape" in kw and isinstance(kw["shape"], dict):
            kw["shape"] = tuple(sorted(kw["shape"].items()))
        if "overrides" in kw and isinstance(kw["overrides"], dict):
            kw["overrides"] = tuple(sorted(kw["overrides"].items()))
        return dataclasses.replace(self, **kw)

    def model_config(self):
        return get_model_family(self.family).config(self.preset, **self.config_overrides)

    def label(self) -> str:
        d = self.dims
        if self.family == "stdit":
            return f"stdit-{self.preset} {self.method} B{d['B']} T{d['T']} S{stdit_tokens_per_frame(self)}"
        return f"{self.family}-{self.preset} {self.method} B{d['B']} T{d['T']}"


def stdit_tokens_per_frame(w: Workload) -> int:
    d, p = w.dims, w.model_config().patch_size
    return -(-d["H"] // p) * -(-d["W"] // p)


def tokens(w: Workload) -> int:
    """Tokens in the whole sample batch (ST-DiT: B·T·S; GLA: B·T)."""
    d = w.dims
    if w.family == "stdit":
        return d["B"] * d["T"] * stdit_tokens_per_frame(w)
    return d["B"] * d["T"]


# ----------------------------------------------------------------------------------------------
# Which methods exist
# ----------------------------------------------------------------------------------------------
def unavailable_reason(method: str, family: Optional[str] = None) -> Optional[str]:
    """Why ``method`` cannot be benchmarked (it is not registered, for ``family`` if given), or None."""
    if method == "none":
        return None
    if family is not None:
        known = FAMILY_METHODS.get(family, ())
        return None if method in known else f"unknown method {method!r} for {family} (registered: {', '.join(known)})"
    if method in METHODS:
        return None
    return f"unknown method {method!r} (registered: {', '.join(METHODS)})"


def available_methods(family: Optional[str] = None) -> list[str]:
    return [m for m, f in METHODS.items() if family is None or f == family]


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------
def _stdit_inputs(w: Workload, cfg, device, dtype, seed: int = 0):
    d = w.dims
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(d["B"], cfg.in_channels, d["T"], d["H"], d["W"], generator=g)
    t = torch.rand(d["B"], generator=g) * 1000
    y = torch.randn(d["B"], d["N"], cfg.caption_channels, generator=g)
    target = torch.randn(d["B"], cfg.out_channels, d["T"], d["H"], d["W"], generator=g)
    return [v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for v in (x, t, y, target)]


def _gla_inputs(w: Workload, cfg, device, seed: int = 0):
    d = w.dims
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (d["B"], d["T"]), generator=g)
    return ids.to(device)


# ----------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------
def _autocast(w: Workload, device):
    if w.precision == "bf16-autocast":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _param_dtype(w: Workload):
    return torch.bfloat16 if w.precision == "bf16" else torch.float32


def _build_model(w: Workload, device):
    torch.manual_seed(0)
    cfg = w.model_config()
    with torch.device(device):
        model = get_model_family(w.family).model(cfg)
    return model.to(_param_dtype(w)), cfg


def build_step(w: Workload, group: Any, device: Any = "cpu") -> Callable[[], None]:
    """Build model and plan on this rank; return ``step()`` that runs one forward + backward (+ SP
    gradient sync). ``group``: the SP process group (any backend, the fake one included)."""
    why = unavailable_reason(w.method, w.family)
    if why:
        raise RuntimeError(f"{w.method}: {why}")
    device = torch.device(device)
    model, cfg = _build_model(w, device)
    P = dist.get_world_size(group) if group is not None else 1
    groups = longseq.from_existing_groups(group, None) if group is not None else None
    params = [p for p in model.parameters()]
    opts = dict(w.options)

    def sync():
        if w.grad_sync and groups is not None and P > 1:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            longseq.sync_gradients(params, groups)

    if w.family == "stdit":
        x, t, y, target = _stdit_inputs(w, cfg, device, _param_dtype(w))
        c = cfg.in_channels
        if w.method == "none" or P == 1 and w.method != "dsp":
            def fwd():
                return F.mse_loss(model(x, t, y)[:, :c].float(), target[:, :c].float())
        else:
            # DSP and the baselines: output left sharded, loss on the shards
            handle = find_method(w.method, w.family).parallelize(model, group, gather_output=False, **opts)
            tgt = handle.shard_target(target)

            def fwd():
                out = model(x, t, y)
                return dsp.sharded_mse_loss(out[:, :c].float(), tgt[:, :c].float(), group)
    else:
        ids = _gla_inputs(w, cfg, device)
        labels = zeco.shift_labels(ids)
        if w.method == "none" or P == 1:
            def fwd():
                return lm_loss(model(ids), labels)
        else:
            find_method(w.method, w.family).parallelize(model, group, **opts)
            ids_l, labels_l = zeco.shard_sequence(ids, group), zeco.shard_sequence(labels, group)

            def fwd():
                return zeco.sp_lm_loss(model(ids_l), labels_l, group)

    def step(mark: Optional[Callable[[str], None]] = None) -> None:
        """One step; ``mark(name)`` (if given) is called after "fwd" (the loss), "bwd" and "sync"."""
        for p in params:
            p.grad = None
        with _autocast(w, device):
            loss = fwd()
        if mark:
            mark("fwd")
        loss.backward()
        if mark:
            mark("bwd")
        sync()
        if mark:
            mark("sync")

    return step


def single_device_step(w: Workload, device: Any = "cpu") -> Callable[[], None]:
    """The unparallelized model on the whole sample (P = 1)."""
    return build_step(w.replace(method="none"), None, device)
