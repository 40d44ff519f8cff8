"""The model registry: which model families longseq can build, by name (``model.family`` in the
training config, ``Workload.family`` in the benchmarks).

A :class:`ModelFamily` says how to make a config from a preset (``config(preset, **overrides)``),
the model class (``model(config)``), the task it is trained on (``"diffusion"``: a video diffusion
transformer on latents ``[B, C, T, H, W]`` predicting the noise; ``"causal_lm"``: a language model
on token ids ``[B, L]`` returning logits ``[B, L, V]``), the blocks activation checkpointing wraps,
and the token-mixing FLOPs a token beyond the 6·N of the weights. Adding a family is one call::

    from longseq.models import register_model
    register_model("gdn", config=gdn_config, model=GDNForCausalLM, task="causal_lm")

Nothing here imports a parallel method: plans are applied to the models from outside.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import torch.nn as nn

from longseq.methods import register_method

from . import gdn, gla, hf_lm, stdit

__all__ = ["ModelFamily", "TASKS", "MODEL_FAMILIES", "register_model", "get_model_family"]

TASKS = ("diffusion", "causal_lm")


def _layers(model: nn.Module) -> list:
    """The repeated blocks of a model (``model.layers`` or ``model.blocks``)."""
    for name in ("layers", "blocks"):
        seq = getattr(model, name, None)
        if isinstance(seq, (nn.ModuleList, nn.Sequential)):
            return list(seq)
    return []


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """One model family (see the module docstring).

    ``mixing_flops(config, dims)``: training FLOPs a token (forward + backward) of the token mixing
    that 6·N misses; ``dims`` holds the sample's sizes: diffusion ``frames``, ``spatial`` (tokens a
    frame), ``caption``; causal_lm ``seq_len``.
    """

    name: str
    config: Callable[..., Any]
    model: Callable[[Any], nn.Module]
    task: str
    units: Callable[[nn.Module], list] = _layers
    mixing_flops: Callable[[Any, dict], float] = lambda config, dims: 0.0
    summary: str = ""

    def build(self, preset: str, **overrides) -> nn.Module:
        return self.model(self.config(preset, **overrides))


MODEL_FAMILIES: dict[str, ModelFamily] = {}


def register_model(name: str, *, config: Callable[..., Any], model: Callable[[Any], nn.Module], task: str,
                   units: Optional[Callable[[nn.Module], list]] = None,
                   mixing_flops: Optional[Callable[[Any, dict], float]] = None, summary: str = "",
                   replace: bool = False) -> ModelFamily:
    """Register a model family under ``name``; returns it. ``replace=True`` overrides an existing one."""
    if task not in TASKS:
        raise ValueError(f"register_model({name!r}): task must be one of {TASKS}, got {task!r}")
    if name in MODEL_FAMILIES and not replace:
        raise ValueError(f"model family {name!r} is already registered (pass replace=True to override it)")
    fam = ModelFamily(name, config, model, task, units or _layers,
                      mixing_flops or (lambda c, dims: 0.0), summary)
    MODEL_FAMILIES[name] = fam
    return fam


def get_model_family(name: str) -> ModelFamily:
    """The registered family; ``KeyError`` naming the known ones otherwise."""
    try:
        return MODEL_FAMILIES[name]
    except KeyError:
        raise KeyError(f"model family {name!r} is unknown; registered: {', '.join(MODEL_FAMILIES)}") from None


# -- the built-in families ---------------------------------------------------------------------------
def _stdit_units(model: nn.Module) -> list:
    return [stage for blk in model.blocks for stage in (blk.spatial, blk.temporal)]


def _stdit_mixing_flops(c: stdit.STDiTConfig, dims: dict) -> float:
    # per block the attention matmuls (QK^T and AV: 4·L·C FLOPs a token forward, x3 with backward)
    # over S (spatial), T (temporal) and N caption tokens (cross)
    return 12.0 * c.hidden_size * (dims["spatial"] + dims["frames"] + dims["caption"]) * c.depth


def _gla_mixing_flops(c: gla.GLAConfig, dims: dict) -> float:
    # per layer and head the recurrence: the state update k vᵀ and the read-out qᵀS, 4·K·V FLOPs a
    # token forward, x3 with backward
    return 12.0 * c.num_heads * c.head_k_dim * c.head_v_dim * c.num_layers


register_model("stdit", config=stdit.stdit_config, model=stdit.STDiT, task="diffusion", units=_stdit_units,
               mixing_flops=_stdit_mixing_flops, summary="ST-DiT video diffusion transformer (spatial + temporal)")
register_model("gla", config=gla.gla_config, model=gla.GLAForCausalLM, task="causal_lm",
               mixing_flops=_gla_mixing_flops, summary="GLA language model (gated linear attention)")


def _gdn_mixing_flops(c: gdn.GDNConfig, dims: dict) -> float:
    # delta-rule layers, per head: kᵀS, the rank-1 update k uᵀ and the read-out qᵀS, 6·K·V FLOPs a token
    # forward, x3 with backward; attention layers: causal QKᵀ and AV, 2·L·C a token forward, x3
    n_attn = sum(c.is_attention(i) for i in range(c.num_layers))
    return (18.0 * c.num_heads * c.head_k_dim * c.head_v_dim * (c.num_layers - n_attn)
            + 6.0 * c.hidden_size * dims["seq_len"] * n_attn)


register_model("gdn", config=gdn.gdn_config, model=gdn.GDNForCausalLM, task="causal_lm",
               mixing_flops=_gdn_mixing_flops,
               summary="Gated DeltaNet language model, or a hybrid (3 GDN : 1 softmax attention)")


def _hf_parallelize(model: "hf_lm.HFCausalLM", group, *, method: str, **options):
    """``parallel=zeco|allgather|p2p|heads`` for ``hf_causal_lm``: the transformers adapter on ``model.lm``
    (imported here, on use: transformers is optional)."""
    from longseq.adapters.transformers import parallelize
    return parallelize(model.lm, group, method=method, **options)


register_model("hf_causal_lm", config=hf_lm.hf_config, model=hf_lm.from_config, task="causal_lm",
               units=lambda m: list(m.layers),
               summary="transformers Gated DeltaNet / KDA hybrids (Qwen3-Next, Qwen3.5, Kimi-Linear, OLMo-Hybrid, "
                       "Bailing-Hybrid) from a config, models.hf_lm presets")
for _name in ("zeco", "allgather", "heads", "p2p"):
    register_method(_name, "hf_causal_lm", functools.partial(_hf_parallelize, method=_name),
                    summary=f"{_name} for the delta-rule layers (longseq.adapters.transformers), Ulysses attention",
                    input_shard="seq")
del _name
