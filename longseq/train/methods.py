"""The one adapter between the training loop and the registered models and methods.

Models are looked up in the model registry (:mod:`longseq.models.registry`, ``model.family``),
methods in the method registry (:mod:`longseq.methods`, ``parallel.method`` for that family). This
module adds what training needs on top, by the family's task:

* ``diffusion`` (ST-DiT): DDPM noise prediction, MSE; the sample is ``model.sample.frames`` x
  ``height`` x ``width`` latents with ``caption_tokens`` caption tokens;
* ``causal_lm`` (GLA): next-token cross-entropy over ``model.sample.seq_len`` tokens;

and how the loss is formed under a method (whole samples and ``handle.shard_target``, or the
loader's sequence pieces and ``zeco.sp_lm_loss``).

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
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from longseq import functional as LF
from longseq import methods as registry
from longseq import zeco
from longseq.methods import MethodSpec
from longseq.models.registry import MODEL_FAMILIES, ModelFamily

from .config import ConfigError

__all__ = [
    "MethodSpec", "Trainable", "Family", "family_of", "get_method", "check_model", "build", "model_config",
    "apply_activation_checkpointing", "param_count", "human_count",
]

DATA_KINDS = {"diffusion": ("synthetic", "latents"), "causal_lm": ("synthetic", "tokens")}


def _plain(obj: Any) -> Any:
    """OmegaConf containers -> plain dicts/lists."""
    from omegaconf import OmegaConf
    return OmegaConf.to_container(obj, resolve=True) if OmegaConf.is_config(obj) else obj


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
# Model families: the registry's entry plus the training config's sample sizes
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Family:
    """A registered model family as the training config sees it (``cfg.model``)."""

    spec: ModelFamily

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def task(self) -> str:
        return self.spec.task

    @property
    def data_kinds(self) -> tuple:
        return DATA_KINDS[self.task]

    def model_config(self, mcfg) -> Any:
        try:
            return self.spec.config(str(mcfg.preset), **(_plain(mcfg.overrides) or {}))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model={mcfg.name}: {e}") from None

    def build(self, mcfg) -> nn.Module:
        return self.spec.model(self.model_config(mcfg))

    def units(self, model: nn.Module) -> list:
        return self.spec.units(model)

    def dims(self, cfg) -> dict:
        """The sample's sizes (see :class:`longseq.models.registry.ModelFamily`)."""
        s = cfg.model.sample
        if self.task == "causal_lm":
            return {"seq_len": int(s.seq_len)}
        p = self.model_config(cfg.model).patch_size
        return {"frames": int(s.frames), "spatial": -(-int(s.height) // p) * -(-int(s.width) // p),
                "caption": int(s.caption_tokens)}

    def tokens_per_sample(self, cfg) -> int:
        d = self.dims(cfg)
        return d["seq_len"] if self.task == "causal_lm" else d["frames"] * d["spatial"]

    def flops_per_token(self, model: nn.Module, cfg) -> float:
        """6N for the weights plus the family's token mixing."""
        return 6.0 * param_count(model) + self.spec.mixing_flops(self.model_config(cfg.model), self.dims(cfg))

    def dry_run(self, model: nn.Module, cfg) -> None:
        """One forward of a batch of one sample of the configured size (call it on the meta device:
        shapes only), as the loop calls the model; raises what the model raises for sizes that do
        not fit together."""
        s = cfg.model.sample
        if self.task == "causal_lm":
            model(torch.zeros(1, int(s.seq_len), dtype=torch.long))
            return
        c = model.config
        x = torch.zeros(1, c.in_channels, int(s.frames), int(s.height), int(s.width))
        model(x, torch.zeros(1), torch.zeros(1, int(s.caption_tokens), c.caption_channels), None)

    def shard_dims(self, cfg) -> dict:
        """The sizes of the dims a method may shard, for shardability checks."""
        d = self.dims(cfg)
        if self.task == "causal_lm":
            return {"sequence (model.sample.seq_len)": d["seq_len"]}
        return {"frames (T, model.sample.frames)": d["frames"], "spatial tokens per frame (S)": d["spatial"]}


def family_of(cfg) -> Family:
    name = str(cfg.model.family)
    if name not in MODEL_FAMILIES:
        raise ConfigError(f"model.family={name!r} is unknown; families: {', '.join(MODEL_FAMILIES)} "
                          "(longseq.models.register_model adds one)")
    return Family(MODEL_FAMILIES[name])


def model_config(cfg) -> Any:
    return family_of(cfg).model_config(cfg.model)


def get_method(cfg) -> MethodSpec:
    """The registered ``parallel.method`` for ``model.family``; ConfigError for an unknown method or
    one that does not parallelize this family (naming the ones that do)."""
    name, fam = str(cfg.parallel.method), family_of(cfg)
    spec = registry.find_method(name, fam.name)
    if spec is not None:
        return spec
    fits = registry.method_names(fam.name)
    others = registry.families_of(name)
    if not others:
        raise ConfigError(f"unknown method parallel.method={name!r}: choose one of {', '.join(registry.method_names())} "
                          f"(e.g. parallel=dsp); for model.family={fam.name}: {', '.join(fits)}")
    raise ConfigError(f"parallel={name} parallelizes {'/'.join(o.upper() for o in others)} models, not "
                      f"{fam.name.upper()} ones: for this model choose parallel= one of {', '.join(fits)}")


def check_model(spec: MethodSpec, cfg, layout) -> None:
    """Model-size checks that need no process group (heads for Ulysses, dims at least SP long)."""
    fam = family_of(cfg)
    mc = fam.model_config(cfg.model)
    P = layout.sp_size
    if spec.heads_divisible and P > 1:
        heads = getattr(mc, "num_heads", None)
        if heads is not None and heads % P != 0:
            ok = [d for d in range(1, heads + 1) if heads % d == 0 and layout.world % d == 0]
            raise ConfigError(
                f"parallel={spec.name} splits the attention heads over the SP group, so parallel.sp_size={P} must "
                f"divide num_heads={heads} (model={cfg.model.name}): use parallel.sp_size in {ok}, a model with "
                f"more heads (model.overrides.num_heads=...), or parallel=dsp / ring, which have no such limit")
    if P > 1:
        for what, n in fam.shard_dims(cfg).items():
            if n < P:
                raise ConfigError(f"the {what} has {n} element{'' if n == 1 else 's'}, fewer than parallel.sp_size={P} ranks: use a "
                                  f"smaller parallel.sp_size or a larger sample")


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
        return (a * x0).addcmul_(b, noise)     # one sample-sized allocation (DSP ranks hold whole samples)


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
    sse = (pred - target).pow(2).sum().to(torch.float64)
    return (LF.all_reduce_sum(sse, group, tag="train.loss.sp") / whole_numel).float()


def _lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")


# ----------------------------------------------------------------------------------------------
# Building: model + plan + loss
# ----------------------------------------------------------------------------------------------
def build(cfg, groups, device: torch.device) -> Trainable:
    """Build the model (identically on every rank, seeded from ``train.seed``), apply the plan of
    ``parallel.method`` over ``groups`` and return the :class:`Trainable`."""
    fam = family_of(cfg)
    spec = get_method(cfg)
    torch.manual_seed(int(cfg.train.seed))
    with torch.device(device):
        model = fam.build(cfg.model)
    options = _plain(cfg.parallel.options) or {}
    builder = _diffusion if fam.task == "diffusion" else _causal_lm
    t = builder(spec, model, groups, options, cfg)
    t.units = fam.units(model)
    t.flops_per_token = fam.flops_per_token(model, cfg)
    t.tokens_per_sample = fam.tokens_per_sample(cfg)
    return t


def _diffusion(spec, model, groups, options, cfg) -> Trainable:
    """ST-DiT. Under a method every SP rank gets the whole sample, the plan's entry keeps this
    rank's piece; by default the output stays sharded (``gather_output=False``) and the loss is the
    MSE of this rank's piece against ``handle.shard_target`` of the noise (the SP group's mean,
    identical on every rank; backward gives each rank its share)."""
    o = cfg.model.objective
    diffusion = Diffusion(int(o.num_timesteps), float(o.beta_start), float(o.beta_end))
    c = model.config.in_channels

    def whole_loss(batch):
        return F.mse_loss(_stdit_step(model, diffusion, batch, c), batch["noise"].float())

    if spec.parallelize is None:
        return Trainable(model, whole_loss, None, [], 0.0, 0)
    opts = {"gather_output": False, **options}
    if spec.name == "dsp":
        # Under bf16 autocast the residual stream stays float32 (float32 adaLN tables); switch it in
        # the autocast dtype, as the other methods' attention inputs already are, unless told otherwise.
        opts.setdefault("comm_dtype", "autocast")
    handle = spec.parallelize(model, groups.sp_group, **opts)
    if opts["gather_output"]:
        return Trainable(model, whole_loss, None, [], 0.0, 0, handle)

    def loss(batch):
        pred = _stdit_step(model, diffusion, batch, c)        # this rank's piece of the output
        target = handle.shard_target(batch["noise"].float())
        return _sharded_mse(pred, target, groups.sp_group, batch["noise"].numel())
    return Trainable(model, loss, None, [], 0.0, 0, handle)


def _documents(batch: dict) -> dict:
    """The model's ``cu_seqlens`` keyword for a packed batch (``data.pack=true``), else nothing."""
    return {"cu_seqlens": batch["cu_seqlens"]} if "cu_seqlens" in batch else {}


def _causal_lm(spec, model, groups, options, cfg) -> Trainable:
    """GLA. Under a method with ``input_shard="seq"`` (ZeCO / LASP-1 / LASP-2, which swap the
    model's GLA op) each SP rank holds a contiguous piece of every sequence, and the data loader
    reads only that piece of each window (inputs and their next-token labels); the loss is
    ``zeco.sp_lm_loss``: the token mean over the SP group, identical on every rank, each rank's
    backward giving its share."""
    if spec.parallelize is None:
        def loss(batch):
            logits = model(batch["input_ids"], **_documents(batch))
            n = (batch["labels"] != -100).sum().clamp_min(1) if "cu_seqlens" in batch else batch["labels"].numel()
            return _lm_loss(logits, batch["labels"]) / n
        return Trainable(model, loss, None, [], 0.0, 0)
    if spec.input_shard != "seq":
        raise ConfigError(f"parallel={spec.name}: the training entry feeds language models by sequence pieces "
                          "(register the method with input_shard='seq')")
    handle = spec.parallelize(model, groups.sp_group, **options)

    def sp_loss(batch):
        return zeco.sp_lm_loss(model(batch["input_ids"], **_documents(batch)), batch["labels"], groups.sp_group).float()
    return Trainable(model, sp_loss, "seq", [], 0.0, 0, handle)


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


