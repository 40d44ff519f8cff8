"""The one adapter between the training loop and the models and parallel plans built elsewhere.

Everything the loop knows about ``models.*``, ``dsp``, ``zeco`` and the baselines goes through
here, so when their APIs change only this file changes. Two registries:

* families (``model.family``): how to build the model from ``model.preset`` / ``model.overrides``,
  its objective (ST-DiT: DDPM noise prediction, MSE; GLA: next-token cross-entropy), the units
  activation checkpointing wraps, and a FLOPs-per-token estimate;
* methods (``parallel.method``): which family each fits, where its plan lives, how to apply it,
  whether the data loader may hand the model a pre-sharded input, and how the loss is formed.

``get_method(name)`` raises :class:`~longseq.train.config.ConfigError` for an unknown method
(listing the known ones) and for one whose code has not landed yet (saying what is missing).

Loss convention (what makes an SP x DP step equal a one-process step on the global batch): the
loss a rank back-propagates is its SP group's loss, the mean over the group's samples, identical
on every rank of the group, built so that each rank's backward yields its *share* of the
parameter gradient (sharded pieces carry their own gradient; see :mod:`longseq.functional`).
``longseq.sync_gradients`` sums the shares over SP and averages over DP; every DP group holds the
same number of samples (and tokens), so the average of the group means is the global mean.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ConfigError

__all__ = [
    "MethodSpec", "METHODS", "FAMILIES", "Trainable", "get_method", "lookup_method", "check_available",
    "check_family", "check_model",
    "available_methods", "build", "model_config", "apply_activation_checkpointing",
]


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------
def _import(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and (name == e.name or name.startswith(e.name + ".")):
            return None           # the module itself is missing (not one of its own imports)
        raise


def _plain(obj: Any) -> Any:
    """OmegaConf containers -> plain dicts/lists."""
    try:
        from omegaconf import OmegaConf
        if OmegaConf.is_config(obj):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:
        pass
    return obj


@dataclasses.dataclass
class Trainable:
    """What the loop gets back from :func:`build`.

    ``model``: the module to optimize and checkpoint (same parameters and state dict on every rank);
    ``loss(batch)``: this rank's loss to back-propagate (see the module docstring), a 0-d float32
    tensor; ``input_shard``: the dimension the data loader hands over already sharded (``None``:
    every SP rank gets whole samples and the plan shards them); ``units``: modules wrapped by
    activation checkpointing; ``flops_per_token`` (training, forward + backward) and
    ``tokens_per_sample`` for throughput and MFU; ``handle``: what the plan returned.
    """

    model: nn.Module
    loss: Callable[[dict], torch.Tensor]
    input_shard: Optional[str]
    units: list
    flops_per_token: float
    tokens_per_sample: int
    handle: Any = None


# ----------------------------------------------------------------------------------------------
# Model families
# ----------------------------------------------------------------------------------------------
class Family:
    name = ""
    data_kinds: tuple = ("synthetic",)

    def model_config(self, mcfg) -> Any:
        raise NotImplementedError

    def build(self, mcfg) -> nn.Module:
        raise NotImplementedError

    def num_heads(self, config) -> Optional[int]:
        return getattr(config, "num_heads", None)

    def units(self, model: nn.Module) -> list:
        raise NotImplementedError

    def tokens_per_sample(self, cfg) -> int:
        raise NotImplementedError

    def flops_per_token(self, model: nn.Module, cfg) -> float:
        return 6.0 * sum(p.numel() for p in model.parameters())

    def shard_dims(self, cfg) -> dict:
        """The sizes of the dims a method may shard, for shardability checks."""
        return {}


class STDiTFamily(Family):
    name = "stdit"
    data_kinds = ("synthetic", "latents")

    def _module(self):
        mod = _import("longseq.models.stdit")
        if mod is None:
            raise ConfigError("model.family=stdit needs models/stdit.py; run from the longseq checkout "
                              "(the `models` package is not installed with longseq)")
        return mod

    def model_config(self, mcfg):
        mod = self._module()
        try:
            return mod.stdit_config(str(mcfg.preset), **(_plain(mcfg.overrides) or {}))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model={mcfg.name}: {e}") from None

    def build(self, mcfg) -> nn.Module:
        return self._module().STDiT(self.model_config(mcfg))

    def units(self, model):
        out = []
        for blk in model.blocks:
            out += [blk.spatial, blk.temporal]
        return out

    def _grid(self, cfg):
        c = self.model_config(cfg.model)
        s = cfg.model.sample
        p = c.patch_size
        return int(s.frames), -(-int(s.height) // p) * -(-int(s.width) // p), int(s.caption_tokens), c

    def tokens_per_sample(self, cfg) -> int:
        t, s, _, _ = self._grid(cfg)
        return t * s

    def flops_per_token(self, model, cfg) -> float:
        # 6N for the weights, plus per block the attention matmuls (QK^T and AV: 4·L·C FLOPs a token
        # forward, x3 with backward) over S (spatial), T (temporal) and N caption tokens (cross).
        t, s, n, c = self._grid(cfg)
        return super().flops_per_token(model, cfg) + 12.0 * c.hidden_size * (s + t + n) * c.depth

    def shard_dims(self, cfg) -> dict:
        t, s, _, _ = self._grid(cfg)
        return {"frames (T, model.sample.frames)": t, "spatial tokens per frame (S)": s}


class GLAFamily(Family):
    name = "gla"
    data_kinds = ("synthetic", "tokens")

    def _module(self):
        mod = _import("longseq.models.gla")
        if mod is None:
            raise ConfigError("model.family=gla needs models/gla.py (the GLA language model), which has not "
                              "landed yet; use an ST-DiT model (model=stdit_tiny) for now")
        return mod

    def model_config(self, mcfg):
        mod = self._module()
        fn = getattr(mod, "gla_config", None)
        if fn is None:
            raise ConfigError("models.gla has no gla_config(preset, **overrides) yet; the GLA model is not ready")
        try:
            return fn(str(mcfg.preset), **(_plain(mcfg.overrides) or {}))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model={mcfg.name}: {e}") from None

    def model_class(self):
        mod = self._module()
        for name in ("GLALM", "GLAForCausalLM", "GLAModel", "GLA"):
            if hasattr(mod, name):
                return getattr(mod, name)
        raise ConfigError("models.gla defines no model class (GLALM) yet")

    def build(self, mcfg) -> nn.Module:
        return self.model_class()(self.model_config(mcfg))

    def vocab_size(self, mcfg) -> int:
        return int(self.model_config(mcfg).vocab_size)

    def units(self, model):
        for name in ("layers", "blocks"):
            seq = getattr(model, name, None)
            if seq is None:
                inner = getattr(model, "model", None)
                seq = getattr(inner, name, None) if inner is not None else None
            if isinstance(seq, (nn.ModuleList, nn.Sequential)):
                return list(seq)
        return []

    def tokens_per_sample(self, cfg) -> int:
        return int(cfg.model.sample.seq_len)

    def flops_per_token(self, model, cfg) -> float:
        # 6N (embedding and head included), plus per layer and head the recurrence: the state update
        # k vᵀ and the read-out qᵀS, 4·K·V FLOPs a token forward, x3 with backward.
        c = self.model_config(cfg.model)
        per_head = getattr(c, "head_k_dim", 0) * getattr(c, "head_v_dim", 0)
        return super().flops_per_token(model, cfg) + 12.0 * c.num_heads * per_head * c.num_layers

    def shard_dims(self, cfg) -> dict:
        return {"sequence (model.sample.seq_len)": int(cfg.model.sample.seq_len)}


FAMILIES: dict[str, Family] = {"stdit": STDiTFamily(), "gla": GLAFamily()}


def family_of(cfg) -> Family:
    name = str(cfg.model.family)
    if name not in FAMILIES:
        raise ConfigError(f"model.family={name!r} is unknown; families: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def model_config(cfg) -> Any:
    return family_of(cfg).model_config(cfg.model)


# ----------------------------------------------------------------------------------------------
# Objectives
# ----------------------------------------------------------------------------------------------
class Diffusion:
    """DDPM forward process with linear betas: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``."""

    def __init__(self, num_timesteps: int, beta_start: float, beta_end: float):
        betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        abar = torch.cumprod(1.0 - betas, 0)
        self.sqrt_abar = abar.sqrt().float()
        self.sqrt_1m_abar = (1.0 - abar).sqrt().float()

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (x0.dim() - 1)
        a = self.sqrt_abar.to(x0.device)[t].view(shape)
        b = self.sqrt_1m_abar.to(x0.device)[t].view(shape)
        return a * x0 + b * noise


def _stdit_step(model: nn.Module, diffusion: Diffusion, batch: dict, channels: int):
    """Forward of ST-DiT on a diffusion batch; returns the prediction of the noise (channels of the
    output that predict it) in float32."""
    x_t = diffusion.noisy(batch["x0"], batch["noise"], batch["t"])
    pred = model(x_t, batch["t"].float(), batch["y"], batch.get("y_mask"))
    return pred[:, :channels].float()


def _sharded_mse(pred: torch.Tensor, target: torch.Tensor, group, whole_numel: int) -> torch.Tensor:
    """MSE over the whole tensors from this rank's pieces: the squared errors summed over the group
    (one all-reduce of one float64; backward identity, so each rank gets its piece's gradient),
    over the whole element count. What ``dsp.sharded_mse_loss`` computes, without its count
    all-reduce (the whole count is known here) and device-safe on CUDA."""
    from longseq import functional as LF
    sse = (pred - target).pow(2).sum().to(torch.float64)
    return (LF.all_reduce_sum(sse, group, tag="train.loss.sp") / whole_numel).float()


def _lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")


# ----------------------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MethodSpec:
    name: str
    family: str                           # the model family it parallelizes
    summary: str
    modules: tuple = ()                   # where its code lives (first importable wins)
    attr: str = "parallelize"             # the function to call there
    min_heads_divisible: bool = False     # the SP size must divide the attention heads (Ulysses-style)


_SP_PLANS = ("longseq.sp.plans",)          # the single-dimension baselines for ST-DiT

METHODS: dict[str, MethodSpec] = {m.name: m for m in [
    MethodSpec("none", "any", "no sequence parallelism; DP only"),
    MethodSpec("dsp", "stdit", "Dynamic Sequence Parallelism (switch T<->S with one all-to-all)", ("longseq.dsp",)),
    MethodSpec("ulysses", "stdit", "DeepSpeed-Ulysses (heads<->sequence all-to-all)", _SP_PLANS,
               min_heads_divisible=True),
    MethodSpec("ring", "stdit", "ring attention (k, v around the ring)", _SP_PLANS),
    MethodSpec("megatron_sp", "stdit", "Megatron-SP (all-gather / reduce-scatter around attention)", _SP_PLANS),
    MethodSpec("usp", "stdit", "USP (Ulysses x Ring)", _SP_PLANS),
    MethodSpec("zeco", "gla", "ZeCO (All-Scan of the GLA state)", ("longseq.zeco",)),
    MethodSpec("lasp1", "gla", "LASP-1 (state passed rank to rank)", ("longseq.zeco",)),
    MethodSpec("lasp2", "gla", "LASP-2 (all-gather of the states)", ("longseq.zeco",)),
]}


def _find_parallelize(spec: MethodSpec) -> Optional[Callable]:
    """The plan's ``parallelize``: the first module of ``spec.modules`` that has it and, when the
    module lists its methods (``METHODS``), names this one."""
    for modname in spec.modules:
        mod = _import(modname)
        if mod is None or not callable(getattr(mod, spec.attr, None)):
            continue
        listed = getattr(mod, "METHODS", None)
        if modname != "longseq.dsp" and listed is not None and spec.name not in listed:
            continue
        return getattr(mod, spec.attr)
    return None


def unavailable_reason(spec: MethodSpec) -> Optional[str]:
    """Why the method cannot run now (its code has not landed), or None."""
    if spec.name == "none":
        return None
    if spec.family == "gla":
        zeco = _import("longseq.zeco")
        missing = [n for n in ("parallelize", "sp_lm_loss") if zeco is None or not callable(getattr(zeco, n, None))]
        if missing:
            return f"zeco.{' / zeco.'.join(missing)} does not exist yet"
        listed = getattr(zeco, "METHODS", None)
        if listed is not None and spec.name not in listed:
            return f"zeco.parallelize does not offer method {spec.name!r} (it offers {', '.join(listed)})"
        return None
    if _find_parallelize(spec) is None:
        where = " or ".join(f"{m}.{spec.attr}(method={spec.name!r})" if m != "longseq.dsp" else f"{m}.{spec.attr}"
                            for m in spec.modules)
        return f"{where} does not exist yet"
    return None


def available_methods() -> list[str]:
    return [n for n, s in METHODS.items() if unavailable_reason(s) is None]


def lookup_method(name: str) -> MethodSpec:
    """The method's spec; ConfigError for an unknown method."""
    if name not in METHODS:
        raise ConfigError(f"unknown method parallel.method={name!r}: choose one of {', '.join(METHODS)} "
                          f"(e.g. parallel=dsp); available now: {', '.join(available_methods())}")
    return METHODS[name]


def check_available(spec: MethodSpec) -> None:
    """ConfigError when the method's code has not landed."""
    why = unavailable_reason(spec)
    if why:
        raise ConfigError(f"method {spec.name!r} ({spec.summary}) is not available yet: {why}. "
                          f"Available now: {', '.join(available_methods())}")


def get_method(name: str) -> MethodSpec:
    """The method's spec; ConfigError for an unknown method or one that has not landed."""
    spec = lookup_method(name)
    why = unavailable_reason(spec)
    if why:
        raise ConfigError(f"method {name!r} ({spec.summary}) is not available yet: {why}. "
                          f"Available now: {', '.join(available_methods())}")
    return spec


def check_family(spec: MethodSpec, family: str) -> None:
    if family not in FAMILIES:
        raise ConfigError(f"model.family={family!r} is unknown; families: {', '.join(FAMILIES)}")
    if spec.family not in ("any", family):
        fits = [n for n, s in METHODS.items() if s.family in ("any", family)]
        raise ConfigError(f"parallel={spec.name} parallelizes {spec.family.upper()} models, not {family.upper()} "
                          f"ones: for this model choose parallel= one of {', '.join(fits)}")


def check_model(spec: MethodSpec, cfg, layout) -> None:
    """Model-size checks that need no process group (heads for Ulysses, dims at least SP long)."""
    fam = family_of(cfg)
    mc = fam.model_config(cfg.model)
    P = layout.sp_size
    if spec.min_heads_divisible and P > 1:
        heads = fam.num_heads(mc)
        if heads is not None and heads % P != 0:
            ok = [d for d in range(1, heads + 1) if heads % d == 0 and layout.world % d == 0]
            raise ConfigError(
                f"parallel={spec.name} splits the attention heads over the SP group, so parallel.sp_size={P} must "
                f"divide num_heads={heads} (model={cfg.model.name}): use parallel.sp_size in {ok}, a model with "
                f"more heads (model.overrides.num_heads=...), or parallel=dsp / ring, which have no such limit")
    if P > 1:
        for what, n in fam.shard_dims(cfg).items():
            if n < P:
                raise ConfigError(f"the {what} has {n} elements, fewer than parallel.sp_size={P} ranks: use a "
                                  f"smaller parallel.sp_size or a larger sample")


# ----------------------------------------------------------------------------------------------
# Building: model + plan + loss
# ----------------------------------------------------------------------------------------------
def build(cfg, groups, device: torch.device) -> Trainable:
    """Build the model (identically on every rank, seeded from ``train.seed``), apply the plan of
    ``parallel.method`` over ``groups`` and return the :class:`Trainable`."""
    fam = family_of(cfg)
    spec = get_method(str(cfg.parallel.method))
    torch.manual_seed(int(cfg.train.seed))
    with torch.device(device):
        model = fam.build(cfg.model)
    options = _plain(cfg.parallel.options) or {}
    builder = _STDIT_BUILDERS if fam.name == "stdit" else _GLA_BUILDERS
    fn = builder.get(spec.name, builder["_generic"])
    t = fn(spec, model, groups, options, cfg)
    t.units = fam.units(model)
    t.flops_per_token = fam.flops_per_token(model, cfg)
    t.tokens_per_sample = fam.tokens_per_sample(cfg)
    return t


def _stdit_common(cfg, model):
    o = cfg.model.objective
    diffusion = Diffusion(int(o.num_timesteps), float(o.beta_start), float(o.beta_end))
    return diffusion, model.config.in_channels


def _stdit_none(spec, model, groups, options, cfg) -> Trainable:
    diffusion, c = _stdit_common(cfg, model)

    def loss(batch):
        return F.mse_loss(_stdit_step(model, diffusion, batch, c), batch["noise"].float())
    return Trainable(model, loss, None, [], 0.0, 0)


def _stdit_sp(spec, model, groups, options, cfg) -> Trainable:
    """DSP and the single-dimension baselines: every SP rank gets the whole sample, the plan's entry
    keeps this rank's frames; by default the output stays sharded (``gather_output=False``) and the
    loss is ``dsp.sharded_mse_loss`` of this rank's piece against its piece of the noise (the SP
    group's mean, identical on every rank; backward gives each rank its share)."""
    from longseq import dsp
    diffusion, c = _stdit_common(cfg, model)
    opts = {"gather_output": False, **options}
    if spec.name == "dsp":
        # Under bf16 autocast the residual stream stays float32 (float32 adaLN tables); switch it in
        # the autocast dtype, as the other methods' attention inputs already are, unless told otherwise.
        opts.setdefault("comm_dtype", "autocast")
        handle = dsp.parallelize(model, groups.sp_group, **opts)
    else:
        handle = _find_parallelize(spec)(model, groups.sp_group, method=spec.name, **opts)

    if opts["gather_output"]:
        def loss(batch):
            return F.mse_loss(_stdit_step(model, diffusion, batch, c), batch["noise"].float())
    else:
        def loss(batch):
            pred = _stdit_step(model, diffusion, batch, c)        # this rank's frames of the output
            target = handle.shard_target(batch["noise"].float())
            return _sharded_mse(pred, target, groups.sp_group, batch["noise"].numel())
    return Trainable(model, loss, None, [], 0.0, 0, handle)


_STDIT_BUILDERS = {"none": _stdit_none, "_generic": _stdit_sp}


def _gla_none(spec, model, groups, options, cfg) -> Trainable:
    def loss(batch):
        logits = model(batch["input_ids"])
        return _lm_loss(logits, batch["labels"]) / batch["labels"].numel()
    return Trainable(model, loss, None, [], 0.0, 0)


def _gla_sp(spec, model, groups, options, cfg) -> Trainable:
    """ZeCO / LASP-1 / LASP-2 (``zeco.parallelize`` swaps the model's GLA op): each SP rank holds a
    contiguous piece of every sequence, and the data loader reads only that piece of each window
    (inputs and their next-token labels). The loss is ``zeco.sp_lm_loss``: the token mean over the
    SP group, identical on every rank, each rank's backward giving its share."""
    from longseq import zeco
    handle = zeco.parallelize(model, groups.sp_group, method=spec.name, **options)

    def loss(batch):
        return zeco.sp_lm_loss(model(batch["input_ids"]), batch["labels"], groups.sp_group).float()
    return Trainable(model, loss, "seq", [], 0.0, 0, handle)


_GLA_BUILDERS = {"none": _gla_none, "_generic": _gla_sp}


# ----------------------------------------------------------------------------------------------
# Activation checkpointing
# ----------------------------------------------------------------------------------------------
def apply_activation_checkpointing(units: list) -> int:
    """Recompute each unit in backward: its ``forward`` (not its hooks) runs under
    ``torch.utils.checkpoint``, so hooks a plan installed on the module (DSP's switches) stay
    outside the recomputed region. State dicts are unchanged. Returns the number of units."""
    from torch.utils.checkpoint import checkpoint

    for mod in units:
        if getattr(mod, "_longseq_checkpointed", False):
            continue
        inner = mod.forward

        @functools.wraps(inner)
        def forward(*args, __inner=inner, **kwargs):
            if not torch.is_grad_enabled():
                return __inner(*args, **kwargs)
            return checkpoint(__inner, *args, use_reentrant=False, **kwargs)
        mod.forward = forward
        mod._longseq_checkpointed = True
    return len(units)


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def human_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


