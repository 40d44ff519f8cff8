"""Tiny random-weight transformers causal LMs built on the gated delta rule, from configs made in code
(no download): shaped like Qwen3-Next (grouped value heads, gated attention, MoE), Qwen3.5 (dense),
Kimi-Linear (KDA + MLA without RoPE, MoE), OLMo-Hybrid (GDN with negative eigenvalues) and
Bailing-Hybrid (KDA + MLA with RoPE, MoE). Every preset: hidden 32, 2 layers (one delta-rule, one 6-head
softmax attention), vocabulary 64, conv width 4, MoE experts run eagerly (float64 works).

``hf_config(preset, **overrides)`` -> the transformers config; ``build(preset, **overrides)`` -> the
model (``<Model>ForCausalLM``); ``from_config(config)`` -> :class:`HFCausalLM`, the model wrapped so
that ``model(input_ids) -> logits`` as the training entry calls it (``model.family=hf_causal_lm``). ``PRESETS`` lists them; a preset whose class transformers lacks
raises ``ImportError`` naming the transformers version that has it (5.x).
"""
from __future__ import annotations

from typing import Any

import torch.nn as nn

__all__ = ["PRESETS", "hf_config", "build", "HFCausalLM", "from_config"]

_COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=6,
               max_position_embeddings=512, tie_word_embeddings=False, use_cache=False, pad_token_id=0,
               bos_token_id=1, eos_token_id=2, layer_types=["linear_attention", "full_attention"])
_GDN = dict(num_key_value_heads=2, head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
            linear_value_head_dim=8, linear_conv_kernel_dim=4)
_MLA = dict(num_key_value_heads=6, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=4, v_head_dim=8,
            qk_nope_head_dim=8, moe_intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
            mlp_layer_types=["dense", "sparse"])

# preset -> (config class, model class, config keywords)
PRESETS: dict[str, tuple[str, str, dict]] = {
    "qwen3_next_tiny": ("Qwen3NextConfig", "Qwen3NextForCausalLM",
                        dict(**_GDN, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                             shared_expert_intermediate_size=16)),
    "qwen3_5_tiny": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", dict(_GDN)),
    "kimi_linear_tiny": ("KimiLinearConfig", "KimiLinearForCausalLM",
                         dict(**_MLA, linear_head_dim=8, linear_num_heads=4, linear_conv_kernel_dim=4)),
    "olmo_hybrid_tiny": ("OlmoHybridConfig", "OlmoHybridForCausalLM", dict(_GDN)),
    "bailing_hybrid_tiny": ("BailingHybridConfig", "BailingHybridForCausalLM",
                            dict(**_MLA, head_dim=8, n_group=1, topk_group=1, short_conv_kernel_size=4,
                                 num_mtp_layers=0)),
}


def _class(name: str) -> Any:
    import transformers
    cls = getattr(transformers, name, None)
    if cls is None:
        raise ImportError(f"transformers {transformers.__version__} has no {name}; install transformers >= 5.25")
    return cls


def hf_config(preset: str = "qwen3_next_tiny", **overrides) -> Any:
    """The transformers config of ``preset`` (module docstring) with ``overrides``."""
    if preset not in PRESETS:
        raise ValueError(f"unknown transformers preset {preset!r}; valid: {', '.join(PRESETS)}")
    config_cls, _, kw = PRESETS[preset]
    kw = {**_COMMON, **kw, **overrides}
    kw.setdefault("experts_implementation", "eager")      # the grouped-mm experts take no float64
    cfg = _class(config_cls)(**kw)
    cfg.longseq_preset = preset
    return cfg


def build(preset: str = "qwen3_next_tiny", **overrides) -> nn.Module:
    """``<Model>ForCausalLM`` of ``preset`` with random weights."""
    cfg = hf_config(preset, **overrides)
    return _class(PRESETS[preset][1])(cfg)


class HFCausalLM(nn.Module):
    """A transformers causal LM as the training entry calls a language model: ``forward(input_ids
    [B, L]) -> logits [B, L, V]`` (no cache, no labels: the loss is taken outside, on the SP pieces).
    ``lm``: the transformers model (parallelize it, not the wrapper: see
    :func:`longseq.adapters.transformers.parallelize`); ``layers``: its decoder layers (the units of
    FSDP2 and activation checkpointing)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self.layers = lm.model.layers

    def forward(self, input_ids):
        return self.lm(input_ids=input_ids, use_cache=False).logits


def from_config(config: Any) -> HFCausalLM:
    """:class:`HFCausalLM` around ``<Model>ForCausalLM(config)`` (the class of ``config.longseq_preset``)."""
    return HFCausalLM(_class(PRESETS[config.longseq_preset][1])(config))
