"""Gated DeltaNet language models: a pure Gated DeltaNet LM and a hybrid (three Gated DeltaNet layers
to one softmax-attention layer, as Qwen3-Next interleaves them).

Per layer (pre-norm, residual): ``x = x + Mixer(RMSNorm(x)); x = x + SwiGLU(RMSNorm(x))`` where Mixer
is, for layer ``i``, softmax attention when ``attn_every and (i + 1) % attn_every == 0``, else::

    q, k, v = silu(conv4(x W_q)), silu(conv4(x W_k)), silu(conv4(x W_v))   [B, T, H, K|V] (causal, depthwise)
    beta    = sigmoid(x W_b)                                                 [B, T, H]
    g       = -exp(A_log) * softplus(x W_a + dt_bias)                        [B, T, H]  (log decay, <= 0)
    o       = delta_fn(q, k, v, g, beta, use_qk_l2norm=True)                 gated delta rule
    out     = (RMSNorm_head(o) * silu(x W_g)) W_o

Softmax attention: causal multi-head attention, no position embedding (the delta-rule layers order
the tokens), ``attn_fn(q, k, v, causal=True)`` on ``[B, T, H, D]``.

The model holds no communication code; three pluggable attributes make it sequence-parallel from
outside (:func:`zeco.plans_delta.parallelize`): ``GatedDeltaNet.delta_fn`` (default
:func:`zeco.delta.delta_rule`), ``GatedDeltaNet.halo_fn(x, h)`` (the ``h`` tokens before this piece,
for the short convolutions; default zeros: the sequence starts here) and ``SoftmaxAttention.attn_fn``
(default :func:`longseq.attention.attention`).

    python -m longseq.models.gdn --preset 1b      # parameter counts, built on the meta device
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from longseq.attention import attention as _serial_attention
from longseq.documents import resolve as resolve_documents
from longseq.zeco.delta import delta_rule as _serial_delta_rule

from .gla import RMSNorm, SwiGLU

__all__ = ["GDNConfig", "GDN_PRESETS", "gdn_config", "GDNForCausalLM", "GatedDeltaNet", "SoftmaxAttention",
           "GDNBlock", "count_parameters", "causal_conv"]


@dataclass
class GDNConfig:
    vocab_size: int = 32000
    hidden_size: int = 2048
    num_layers: int = 24
    num_heads: int = 16                 # delta-rule heads
    head_k_dim: int = 128
    head_v_dim: int = 128
    conv_size: int = 4
    attn_every: int = 0                 # 0: every layer Gated DeltaNet; 4: layers 3, 7, ... softmax attention
    attn_heads: int = 16
    intermediate_size: Optional[int] = None
    norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    chunk_size: int = 64                # of the local delta-rule kernel
    backend: str = "auto"

    @property
    def mlp_size(self) -> int:
        if self.intermediate_size is not None:
            return self.intermediate_size
        n = int(self.hidden_size * 4 * 2 / 3)
        return 256 * ((n + 255) // 256)

    def is_attention(self, i: int) -> bool:
        return bool(self.attn_every) and (i + 1) % self.attn_every == 0

    def __post_init__(self) -> None:
        if self.attn_every and self.hidden_size % self.attn_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by attn_heads {self.attn_heads}")


GDN_PRESETS: Dict[str, GDNConfig] = {
    # fast on CPU, for tests: 4 heads, K = V = 8 per head, 2 layers
    "tiny": GDNConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, head_k_dim=8, head_v_dim=8,
                      intermediate_size=64, chunk_size=8),
    # ~1B: hidden 2048, 16 heads with K = V = 128 (the GDN 1B shape of docs/zeco.md), 21 layers
    "1b": GDNConfig(hidden_size=2048, num_layers=21, num_heads=16, head_k_dim=128, head_v_dim=128),
    # hybrids, 3 GDN : 1 attention
    "hybrid_tiny": GDNConfig(vocab_size=64, hidden_size=32, num_layers=4, num_heads=4, head_k_dim=8, head_v_dim=8,
                             attn_every=4, attn_heads=4, intermediate_size=64, chunk_size=8),
    "hybrid_1b": GDNConfig(hidden_size=2048, num_layers=20, num_heads=16, head_k_dim=128, head_v_dim=128,
                           attn_every=4, attn_heads=16),
}


def gdn_config(name: str, **overrides) -> GDNConfig:
    """A copy of preset ``name`` (``tiny``, ``1b``, ``hybrid_tiny``, ``hybrid_1b``) with fields replaced."""
    if name not in GDN_PRESETS:
        raise ValueError(f"unknown Gated DeltaNet preset {name!r}; valid: {', '.join(GDN_PRESETS)}")
    return dataclasses.replace(GDN_PRESETS[name], **overrides)


def causal_conv(x: torch.Tensor, weight: torch.Tensor, halo: Optional[torch.Tensor],
                positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal depthwise conv1d then SiLU: ``x [B, T, D]``, ``weight [D, 1, W]``, ``halo [B, W-1, D]`` the
    inputs just before x (None: zeros, the sequence starts here). ``positions`` (``[B | 1, T]``, each
    token's index inside its packed document, :meth:`longseq.documents.Documents.positions`): a token
    reads only the inputs of its own document (a tap ``j`` tokens back counts when ``j <= position``),
    whether they lie in this piece or in the halo."""
    B, T, D = x.shape
    W = weight.shape[-1]
    if halo is None:
        halo = x.new_zeros(B, W - 1, D)
    xp = torch.cat([halo.to(x.dtype), x], dim=1).transpose(1, 2)
    if positions is None:
        return F.silu(F.conv1d(xp, weight.to(x.dtype), groups=D)).transpose(1, 2)
    win = xp.unfold(2, W, 1)                                             # [B, D, T, W]: tap i reads t - (W-1-i)
    back = torch.arange(W - 1, -1, -1, device=x.device)                  # tokens back of each tap
    keep = (back.view(1, 1, W) <= positions.to(x.device).unsqueeze(-1)).to(x.dtype)   # [B | 1, T, W]
    out = (win * keep.unsqueeze(1) * weight.to(x.dtype).view(1, D, 1, W)).sum(-1)
    return F.silu(out).transpose(1, 2)


def _no_halo(x: torch.Tensor, h: int) -> None:
    return None


class GatedDeltaNet(nn.Module):
    """The Gated DeltaNet token mixer (module docstring); ``delta_fn`` and ``halo_fn`` are pluggable."""

    def __init__(self, cfg: GDNConfig):
        super().__init__()
        h, H, K, V = cfg.hidden_size, cfg.num_heads, cfg.head_k_dim, cfg.head_v_dim
        self.num_heads, self.head_k_dim, self.head_v_dim = H, K, V
        self.chunk_size, self.backend = cfg.chunk_size, cfg.backend
        self.q_proj, self.k_proj = nn.Linear(h, H * K, bias=False), nn.Linear(h, H * K, bias=False)
        self.v_proj = nn.Linear(h, H * V, bias=False)
        self.q_conv, self.k_conv, self.v_conv = (nn.Parameter(torch.empty(d, 1, cfg.conv_size))
                                                 for d in (H * K, H * K, H * V))
        self.b_proj, self.a_proj = nn.Linear(h, H, bias=False), nn.Linear(h, H, bias=False)
        self.A_log = nn.Parameter(torch.empty(H))
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.g_proj = nn.Linear(h, H * V, bias=False)
        self.o_norm = RMSNorm(V, eps=cfg.norm_eps)
        self.o_proj = nn.Linear(H * V, h, bias=False)
        self.delta_fn = _serial_delta_rule
        self.halo_fn = _no_halo

    def reset_gates(self) -> None:
        with torch.no_grad():
            self.A_log.copy_(torch.empty_like(self.A_log).uniform_(0, 16).clamp_min(1).log())
            dt = torch.exp(torch.empty_like(self.dt_bias).uniform_(math.log(1e-3), math.log(0.1)))
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))          # softplus⁻¹(dt)
            for w in (self.q_conv, self.k_conv, self.v_conv):
                nn.init.uniform_(w, -0.5, 0.5)

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, pos: Optional[torch.Tensor]) -> torch.Tensor:
        return causal_conv(x, weight, self.halo_fn(x, weight.shape[-1] - 1), pos)

    def forward(self, x: torch.Tensor, docs=None) -> torch.Tensor:
        B, T, _ = x.shape
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        pos = None if docs is None else docs.positions(x.device)
        q = self._conv(self.q_proj(x), self.q_conv, pos).view(B, T, H, K)
        k = self._conv(self.k_proj(x), self.k_conv, pos).view(B, T, H, K)
        v = self._conv(self.v_proj(x), self.v_conv, pos).view(B, T, H, V)
        f = torch.promote_types(x.dtype, torch.float32)            # gates in float32 (float64 stays)
        beta = torch.sigmoid(self.b_proj(x).to(f))
        g = -self.A_log.to(f).exp() * F.softplus(self.a_proj(x).to(f) + self.dt_bias.to(f))
        kw = {} if docs is None else {"cu_seqlens": docs}
        o, _ = self.delta_fn(q, k, v, g, beta, use_qk_l2norm=True, backend=self.backend, chunk_size=self.chunk_size,
                             **kw)
        o = self.o_norm(o) * F.silu(self.g_proj(x).view(B, T, H, V))
        return self.o_proj(o.reshape(B, T, H * V))


class SoftmaxAttention(nn.Module):
    """Causal multi-head softmax attention; ``attn_fn(q, k, v, causal=True)`` is pluggable."""

    def __init__(self, cfg: GDNConfig):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.attn_heads, h // cfg.attn_heads
        self.qkv = nn.Linear(h, 3 * h, bias=False)
        self.q_norm, self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps), RMSNorm(self.head_dim, cfg.norm_eps)
        self.o_proj = nn.Linear(h, h, bias=False)
        self.attn_fn = _serial_attention

    def forward(self, x: torch.Tensor, docs=None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).unbind(2)
        kw = {} if docs is None else {"cu_seqlens": docs}
        o = self.attn_fn(self.q_norm(q), self.k_norm(k), v, causal=True, **kw)
        return self.o_proj(o.reshape(B, T, C))


class GDNBlock(nn.Module):
    def __init__(self, cfg: GDNConfig, attention: bool):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mixer = SoftmaxAttention(cfg) if attention else GatedDeltaNet(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.mlp_size)

    def forward(self, x: torch.Tensor, docs=None) -> torch.Tensor:
        x = x + self.mixer(self.attn_norm(x), docs)
        return x + self.mlp(self.mlp_norm(x))


def _whole_window(cu_seqlens, length: int, batch: int):
    """The serial ``documents_fn``: this process holds the whole window."""
    return resolve_documents(cu_seqlens, length, None, batch=batch, what="model: cu_seqlens")


class GDNForCausalLM(nn.Module):
    """``model(input_ids [B, T], cu_seqlens=None) -> logits [B, T, vocab]``; a Gated DeltaNet LM, or a
    hybrid with ``attn_every``. Only the mixers' three pluggable ops see more than one token.
    ``cu_seqlens``: packed documents (:mod:`longseq.documents`; the whole window's boundaries): the
    delta rule, the short convolutions and attention do not cross them. ``documents_fn(cu_seqlens,
    T, B)`` (pluggable: a plan places the boundaries on its rank's piece) turns them into the
    :class:`longseq.documents.Documents` every layer gets."""

    def __init__(self, cfg: GDNConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(GDNBlock(cfg, cfg.is_attention(i)) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.documents_fn = _whole_window
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
            elif isinstance(m, GatedDeltaNet) and m.A_log.device.type != "meta":
                m.reset_gates()

    def forward(self, input_ids: torch.Tensor, cu_seqlens=None) -> torch.Tensor:
        docs = None if cu_seqlens is None else self.documents_fn(cu_seqlens, input_ids.shape[1], input_ids.shape[0])
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, docs)
        return self.lm_head(self.norm(x))


def count_parameters(config) -> int:
    """Parameters of ``GDNForCausalLM(config)`` (config or preset name), built on the meta device."""
    if isinstance(config, str):
        config = gdn_config(config)
    with torch.device("meta"):
        model = GDNForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Parameter count of a Gated DeltaNet / hybrid LM preset.")
    parser.add_argument("--preset", default="1b", choices=[*GDN_PRESETS, "all"])
    args = parser.parse_args(argv)
    for name in (GDN_PRESETS if args.preset == "all" else [args.preset]):
        c, n = GDN_PRESETS[name], count_parameters(name)
        kinds = "".join("A" if c.is_attention(i) else "D" for i in range(c.num_layers))
        print(f"GDN {name}: {n:,} parameters ({n / 1e9:.3f}B) [hidden {c.hidden_size}, layers {kinds} "
              f"(D delta rule, A attention), heads {c.num_heads}, K/V per head {c.head_k_dim}/{c.head_v_dim}]")


if __name__ == "__main__":
    main()
