"""GLA language model: a causal LM whose token mixer is gated linear attention (Yang et al., "Gated
Linear Attention Transformers with Hardware-Efficient Training"; the model ZeCO trains).

Architecture (per layer, pre-norm, residual)::

    x = x + Attn(RMSNorm(x))          Attn: q = x W_q, k = x W_k, v = x W_v           [B, T, H, K|V]
                                            g = logsigmoid(x W_1 W_2 + b) / 16        low-rank gated decay
                                            o = gla_fn(q, k, v, g)                    (scale K^-1/2)
                                            o = RMSNorm_head(o) * swish(x W_r)        per-head norm, output gate
                                            out = o W_o
    x = x + SwiGLU(RMSNorm(x))        W_down (silu(x W_gate) * x W_up)

then a final RMSNorm and the LM head (tied to the embedding or not). Key dim per head
``K = hidden * expand_k / H``, value dim ``V = hidden * expand_v / H`` (fla's defaults 0.5 and 1).
There are no position embeddings: the recurrence orders the tokens, so every part of the model but
the GLA op acts per token.

The model holds no communication code. Each :class:`GLAAttention` calls ``self.gla_fn`` (default
:func:`zeco.gla.gla`) as ``gla_fn(q, k, v, g, scale=..., backend=..., chunk_size=...)`` returning
``(o, final_state)``; :func:`zeco.parallelize` swaps it for :func:`zeco.sp_gla` to make the model
sequence-parallel.

    python -m longseq.models.gla --preset 1b      # prints the parameter count (built on the meta device)
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from longseq.zeco.gla import gla as _serial_gla

__all__ = ["GLAConfig", "GLA_PRESETS", "gla_config", "GLAForCausalLM", "GLABlock", "GLAAttention", "SwiGLU",
           "RMSNorm", "count_parameters", "lm_loss"]


@dataclass
class GLAConfig:
    vocab_size: int = 32000
    hidden_size: int = 2048
    num_layers: int = 24
    num_heads: int = 4
    expand_k: float = 0.5
    expand_v: float = 1.0
    hidden_ratio: int = 4               # SwiGLU width: hidden * ratio * 2/3, rounded up to 256
    intermediate_size: Optional[int] = None
    gate_low_rank_dim: int = 16
    gate_logit_normalizer: float = 16.0
    norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    chunk_size: int = 64                # of the local GLA kernel
    backend: str = "auto"               # of the local GLA kernel

    @property
    def key_dim(self) -> int:
        return int(self.hidden_size * self.expand_k)

    @property
    def value_dim(self) -> int:
        return int(self.hidden_size * self.expand_v)

    @property
    def head_k_dim(self) -> int:
        return self.key_dim // self.num_heads

    @property
    def head_v_dim(self) -> int:
        return self.value_dim // self.num_heads

    @property
    def mlp_size(self) -> int:
        if self.intermediate_size is not None:
            return self.intermediate_size
        n = int(self.hidden_size * self.hidden_ratio * 2 / 3)
        return 256 * ((n + 255) // 256)

    def __post_init__(self) -> None:
        if self.key_dim % self.num_heads or self.value_dim % self.num_heads:
            raise ValueError(f"key dim {self.key_dim} and value dim {self.value_dim} must be divisible by "
                             f"num_heads {self.num_heads}")


GLA_PRESETS: Dict[str, GLAConfig] = {
    # fast on CPU, for tests: K = 8, V = 16 per head
    "tiny": GLAConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, gate_low_rank_dim=4,
                      intermediate_size=64, chunk_size=16),
    # ~1B: fla's GLA width (hidden 2048, 4 heads, K=256, V=512 per head), 18 layers
    "1b": GLAConfig(hidden_size=2048, num_layers=18, num_heads=4),
    # ~3B: hidden 2560, 5 heads (K=256, V=512 per head), 36 layers
    "3b": GLAConfig(hidden_size=2560, num_layers=36, num_heads=5),
}


def gla_config(name: str, **overrides) -> GLAConfig:
    """A copy of preset ``name`` (``tiny``, ``1b``, ``3b``) with fields replaced by ``overrides``."""
    if name not in GLA_PRESETS:
        raise ValueError(f"unknown GLA preset {name!r}; valid: {', '.join(GLA_PRESETS)}")
    return dataclasses.replace(GLA_PRESETS[name], **overrides)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight).to(x.dtype)


class GLAAttention(nn.Module):
    """Gated linear attention with a low-rank data-dependent decay, per-head RMSNorm and a swish
    output gate. ``gla_fn`` is the pluggable operator (serial by default)."""

    def __init__(self, cfg: GLAConfig):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads, self.head_k_dim, self.head_v_dim = cfg.num_heads, cfg.head_k_dim, cfg.head_v_dim
        self.gate_logit_normalizer = cfg.gate_logit_normalizer
        self.chunk_size, self.backend = cfg.chunk_size, cfg.backend
        self.scale = self.head_k_dim ** -0.5
        self.q_proj = nn.Linear(h, cfg.key_dim, bias=False)
        self.k_proj = nn.Linear(h, cfg.key_dim, bias=False)
        self.v_proj = nn.Linear(h, cfg.value_dim, bias=False)
        self.g_proj = nn.Linear(h, cfg.value_dim, bias=False)             # output gate
        self.gk_proj = nn.Sequential(nn.Linear(h, cfg.gate_low_rank_dim, bias=False),
                                     nn.Linear(cfg.gate_low_rank_dim, cfg.key_dim, bias=True))
        self.g_norm = RMSNorm(self.head_v_dim, eps=cfg.norm_eps)         # per head (group norm)
        self.o_proj = nn.Linear(cfg.value_dim, h, bias=False)
        self.gla_fn = _serial_gla

    def forward(self, x: torch.Tensor, cu_seqlens=None) -> torch.Tensor:
        B, T, _ = x.shape
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        q = self.q_proj(x).view(B, T, H, K)
        k = self.k_proj(x).view(B, T, H, K)
        v = self.v_proj(x).view(B, T, H, V)
        g = (F.logsigmoid(self.gk_proj(x).float()) / self.gate_logit_normalizer).view(B, T, H, K)
        kw = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
        o, _ = self.gla_fn(q, k, v, g, scale=self.scale, backend=self.backend, chunk_size=self.chunk_size, **kw)
        o = self.g_norm(o) * F.silu(self.g_proj(x).view(B, T, H, V))
        return self.o_proj(o.reshape(B, T, H * V))


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GLABlock(nn.Module):
    def __init__(self, cfg: GLAConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = GLAAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.mlp_size)

    def forward(self, x: torch.Tensor, cu_seqlens=None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cu_seqlens)
        return x + self.mlp(self.mlp_norm(x))


class GLAForCausalLM(nn.Module):
    """``model(input_ids [B, T], cu_seqlens=None) -> logits [B, T, vocab]``. Every token is processed
    independently except inside the GLA op, so the model runs unchanged on a contiguous piece of the
    sequence once its GLA op is sequence-parallel. ``cu_seqlens``: packed documents, the whole
    window's boundaries (:mod:`longseq.documents`), handed to every ``gla_fn`` (the recurrence does
    not cross them; :func:`zeco.sp_gla` places them on its rank's piece)."""

    def __init__(self, cfg: GLAConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(GLABlock(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    def forward(self, input_ids: torch.Tensor, cu_seqlens=None) -> torch.Tensor:
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, cu_seqlens)
        return self.lm_head(self.norm(x))


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy over non-ignored ``labels`` (already shifted: ``labels[t]`` is
    the target of position t)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore_index)


def count_parameters(config) -> int:
    """Number of parameters of ``GLAForCausalLM(config)`` (config or preset name), built on the
    meta device so that nothing is allocated (tied weights counted once)."""
    if isinstance(config, str):
        config = gla_config(config)
    with torch.device("meta"):
        model = GLAForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Parameter count of a GLA language-model preset.")
    parser.add_argument("--preset", default="1b", choices=[*GLA_PRESETS, "all"])
    args = parser.parse_args(argv)
    for name in (GLA_PRESETS if args.preset == "all" else [args.preset]):
        c, n = GLA_PRESETS[name], count_parameters(name)
        print(f"GLA {name}: {n:,} parameters ({n / 1e9:.3f}B) [hidden {c.hidden_size}, layers {c.num_layers}, "
              f"heads {c.num_heads}, K/V per head {c.head_k_dim}/{c.head_v_dim}, mlp {c.mlp_size}, "
              f"vocab {c.vocab_size}, tied {c.tie_word_embeddings}; state per layer and sequence "
              f"H*K*V = {c.num_heads * c.head_k_dim * c.head_v_dim:,}]")


if __name__ == "__main__":
    main()
