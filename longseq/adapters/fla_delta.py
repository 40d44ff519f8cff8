"""Sequence parallelism for fla's Gated DeltaNet models (``fla.models.GatedDeltaNetForCausalLM``),
applied from outside, on fla's own parameters.

fla's ``GatedDeltaNet.forward`` (``fla/layers/gated_deltanet.py``) calls Triton kernels (its short
convolutions, ``chunk_gated_delta_rule`` with the gate ``g = -exp(A_log)·softplus(a + dt_bias)`` and
``beta = sigmoid(b)`` (×2 with ``allow_neg_eigval``) computed in the kernel, fused norms). The adapter
gives each such layer a forward computing the same function with the project's pieces: the short
convolutions (:func:`longseq.adapters.fla_gla.short_conv`) with their halo from the previous ranks
(:func:`longseq.functional.gather_halo`), the gated delta rule through :func:`zeco.sp_delta_rule`
(``method``; the local op :func:`zeco.delta.delta_rule` when ``group`` is None), then fla's
``o_norm`` and ``o_proj``. With ``torch_modules`` (default: when the model is not on CUDA) fla's
Triton-only ``RMSNorm``, ``FusedRMSNormGated``, ``GatedMLP`` and the fused cross-entropy get PyTorch
forwards (:mod:`longseq.adapters.fla_gla`'s ``rms_norm`` / ``rms_norm_gated``, ``TorchCrossEntropy``).

Under SP each rank holds its contiguous piece of the tokens (``zeco.shard_sequence``); form the loss
with ``zeco.shift_labels`` / ``zeco.sp_lm_loss`` on ``model(ids_local).logits`` (fla's
``labels=`` shifts inside a piece). Not supported: caches (``use_cache``), padding masks /
``cu_seqlens``, hybrid ``attn=`` layers (``NotImplementedError`` naming the alternative). Grouped
value heads (``num_v_heads > num_heads``) go to :func:`zeco.sp_delta_rule` as they are (one state per
value head). ``labels=`` under SP is refused (``ValueError`` naming ``zeco.sp_lm_loss``). fla 0.6's
``DeltaNet`` (no decay) is wrapped the same way, always in the chunked form (fla picks
``fused_recurrent`` by the local length). ``KimiDeltaAttention`` is not wrapped here yet.
"""
from __future__ import annotations

import inspect
import types
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from longseq.functional import gather_halo
from longseq.optional import require
from longseq.zeco import delta_rule, sp_delta_rule

from .fla_gla import TorchCrossEntropy, _refuse_labels, module_standins, short_conv

__all__ = ["parallelize", "tiny_config", "build"]


def tiny_config(kind: str = "gated_deltanet", **overrides):
    """A small fla config (CPU tests): hidden 32, 2 layers, 2 heads of dim 8; ``kind``
    ``"gated_deltanet"`` (``GatedDeltaNetConfig``) or ``"delta_net"`` (``DeltaNetConfig``)."""
    fm = require("fla.models", extra="fla", what="longseq.adapters.fla_delta (fla's delta-rule models)")
    kw = dict(hidden_size=32, num_hidden_layers=2, num_heads=2, expand_v=1.0, vocab_size=64,
              intermediate_size=64, use_cache=False, fuse_cross_entropy=False)
    if kind == "gated_deltanet":
        kw["head_dim"] = 8
        cls = fm.GatedDeltaNetConfig
    elif kind == "delta_net":
        kw["hidden_size"], kw["num_heads"] = 16, 2               # head dim 8 (expand_k = expand_v = 1)
        cls = fm.DeltaNetConfig
    else:
        raise ValueError(f"fla_delta.tiny_config: kind must be 'gated_deltanet' or 'delta_net', got {kind!r}")
    kw.update(overrides)
    return cls(**kw)


def build(kind: str = "gated_deltanet", **overrides) -> nn.Module:
    fm = require("fla.models", extra="fla", what="longseq.adapters.fla_delta (fla's delta-rule models)")
    cls = fm.GatedDeltaNetForCausalLM if kind == "gated_deltanet" else fm.DeltaNetForCausalLM
    return cls(tiny_config(kind, **overrides))


def _refuse_unsupported(attention_mask, use_cache, kwargs) -> None:
    if attention_mask is not None or use_cache or kwargs.get("cu_seqlens") is not None:
        raise NotImplementedError("fla_delta: padding masks, cu_seqlens and caches are not supported; "
                                  "train with use_cache=False and unpadded batches")


def _gdn_forward(self, hidden_states, attention_mask=None, past_key_values=None, use_cache=False,
                 output_attentions=False, **kwargs):
    _refuse_unsupported(attention_mask, use_cache, kwargs)
    x = hidden_states
    B, T, _ = x.shape
    group = self._longseq_group
    q = _conv(self, x, self.q_proj, "q_conv1d", group).view(B, T, self.num_heads, self.head_k_dim)
    k = _conv(self, x, self.k_proj, "k_conv1d", group).view(B, T, self.num_heads, self.head_k_dim)
    Hv = getattr(self, "num_v_heads", self.num_heads)     # grouped value heads: Hv = G·num_heads
    v = _conv(self, x, self.v_proj, "v_conv1d", group).view(B, T, Hv, self.head_v_dim)
    f = torch.promote_types(x.dtype, torch.float32)
    beta = torch.sigmoid(self.b_proj(x).to(f)) * (2.0 if self.allow_neg_eigval else 1.0)
    g = -self.A_log.to(f).exp() * F.softplus(self.a_proj(x).to(f) + self.dt_bias.to(f))
    o = _delta(self, q, k, v, g, beta)
    if self.use_gate:
        o = self.o_norm(o, self.g_proj(x).view(B, T, Hv, self.head_v_dim))
    else:
        o = self.o_norm(o)
    return self.o_proj(o.reshape(B, T, -1)), None, past_key_values


def _deltanet_forward(self, hidden_states, attention_mask=None, past_key_values=None, use_cache=False,
                      output_attentions=False, **kwargs):
    """fla's ``DeltaNet`` (no decay: ``g = 0``), always in the chunked form through :func:`_delta`: fla
    itself switches to ``fused_recurrent`` when the *local* length is <= 64, which under SP would
    depend on the piece length (the same function, other kernels)."""
    _refuse_unsupported(attention_mask, use_cache, kwargs)
    if self.qk_norm != "l2" or self.qk_activation not in ("silu", "identity", "relu"):
        raise NotImplementedError(f"fla_delta: DeltaNet with qk_norm={self.qk_norm!r} / qk_activation="
                                  f"{self.qk_activation!r} is not wrapped (qk_norm='l2' with silu / identity / relu is)")
    x = hidden_states
    B, T, _ = x.shape
    group = self._longseq_group
    q = _conv(self, x, self.q_proj, "q_conv1d", group)
    k = _conv(self, x, self.k_proj, "k_conv1d", group)
    v = _conv(self, x, self.v_proj, "v_conv1d", group)
    if not self.use_short_conv and self.qk_activation != "silu":
        q, k = self.q_proj(x), self.k_proj(x)                      # fla: silu only for qk_activation='silu'
    q, k = (t.view(B, T, self.num_heads, self.head_k_dim) for t in (q, k))
    if self.qk_activation == "relu":
        q, k = q.relu(), k.relu()
    v = v.view(B, T, self.num_heads, self.head_v_dim)
    f = torch.promote_types(x.dtype, torch.float32)
    beta = torch.sigmoid(self.b_proj(x).to(f)) if self.use_beta else x.new_ones(B, T, self.num_heads, dtype=f)
    beta = beta * (2.0 if self.allow_neg_eigval else 1.0)
    o = _delta(self, q, k, v, x.new_zeros(B, T, self.num_heads, dtype=f), beta)
    if self.use_gate:
        o = self.o_norm(o, self.g_proj(x).view(B, T, self.num_heads, self.head_v_dim))
    else:
        o = self.o_norm(o)
    return self.o_proj(o.reshape(B, T, -1)), None, past_key_values


def _conv(self, x, proj, conv_name, group):
    """``proj(x)`` through the layer's short convolution ``conv_name`` (halo from the previous ranks),
    or SiLU when the layer has none. ``[B, T, D]``, T sharded."""
    y = proj(x)
    if not self.use_short_conv:
        return F.silu(y)
    mod = getattr(self, conv_name)
    halo = gather_halo(y, mod.weight.shape[-1] - 1, group, tag="fla_delta.halo") if group is not None else None
    return short_conv(y, mod.weight, mod.bias, mod.activation, halo)


def _delta(self, q, k, v, g, beta):
    """The delta rule over the layer's group (:func:`zeco.sp_delta_rule`) or, without one, locally
    (grouped value heads: q, k repeated for the local op only)."""
    if self._longseq_group is None:
        Hv, Hk = v.shape[2], q.shape[2]
        if Hv != Hk:
            q, k = (t.repeat_interleave(Hv // Hk, dim=2) for t in (q, k))
        return delta_rule(q, k, v, g, beta, use_qk_l2norm=True)[0]
    return sp_delta_rule(q, k, v, g, beta, group=self._longseq_group, use_qk_l2norm=True, **self._longseq_opts)[0]


def parallelize(model: nn.Module, group: Optional[Any] = None, *, method: str = "zeco", torch_modules: Any = "auto",
                **options) -> nn.Module:
    """Adapt ``model`` in place (module docstring); ``group`` None: one process (the local op).
    ``options`` go to :func:`zeco.sp_delta_rule` (``num_blocks``, ``check``, ``chunk_size``, ``backend``).
    Returns the model."""
    from fla.layers.delta_net import DeltaNet
    from fla.layers.gated_deltanet import GatedDeltaNet

    if group is not None and hasattr(group, "sp_group"):
        group = group.sp_group
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "attn", None) is not None:
        raise NotImplementedError("fla_delta: hybrid softmax-attention layers (config.attn) are not wrapped yet: "
                                  "train a transformers hybrid (Qwen3-Next, Kimi-Linear, ...) with "
                                  "longseq.adapters.transformers.parallelize, or build fla's model without attn")
    if torch_modules == "auto":
        torch_modules = not any(p.is_cuda for p in model.parameters())
    n = 0
    for mod in model.modules():
        if isinstance(mod, (GatedDeltaNet, DeltaNet)):
            mod.forward = types.MethodType(_gdn_forward if isinstance(mod, GatedDeltaNet) else _deltanet_forward, mod)
            mod._longseq_group, mod._longseq_opts = group, dict(method=method, **options)
            n += 1
        elif torch_modules:
            for cls, fwd, _ in module_standins(conv=False):
                if isinstance(mod, cls):
                    mod.forward = types.MethodType(fwd, mod)
                    break
    if n == 0:
        raise ValueError(f"fla_delta: {type(model).__name__} has no fla GatedDeltaNet / DeltaNet layer: for fla's GLA family "
                         f"use longseq.adapters.fla_gla, for transformers' Gated DeltaNet / KDA models "
                         f"longseq.adapters.transformers")
    if group is not None and "labels" in inspect.signature(model.forward).parameters:
        model.register_forward_pre_hook(_refuse_labels, with_kwargs=True)   # a shift inside each piece
    if torch_modules and getattr(model, "criterion", 1) is None and getattr(cfg, "fuse_cross_entropy", False):
        model.criterion = TorchCrossEntropy()
    return model
