"""ZeCO for fla's gated-linear-attention models, applied from outside: one adapter, one routing table.

Every fla layer of ``LAYERS`` (GLA, HGRN2, simple GLA, retention, linear attention; extend it in
two lines, see ``ROUTES``) has its kernel calls routed to a ``gla_fn`` while its forward runs:
each kernel's arguments become ``q, k, v`` and the log decay ``g [B, T, H, K]`` of the GLA it
computes (per key, scalar per head, fixed per head, or none). Triton functions the layers call
by name get PyTorch stand-ins on CPU (``FUNCTIONS``), rotary embeddings the rank's global offset
under SP. The rest of this docstring describes the GLA case; docs/integration.md lists every fla
layer and whether it works.

fla's ``GatedLinearAttention.forward`` (``fla/layers/gla.py``) projects q, k, v and the low-rank
gate ``gk``, then calls one of its module-level kernels — ``fused_recurrent_gla`` when the sequence
has at most 64 tokens, else ``chunk_gla`` (``attn_mode``) — and finishes with fla's norm and output
gate and ``o_proj``. The adapter leaves that code as it is and changes two things from outside:

* **The kernel call.** :func:`adapt` gives each ``GatedLinearAttention`` a ``gla_fn`` attribute
  (default :func:`zeco.gla.gla`, the project's local operator: fla's Triton kernels on CUDA, the
  pure-PyTorch chunked kernels elsewhere) and wraps its ``forward`` so that, while it runs, the
  names ``chunk_gla`` / ``fused_recurrent_gla`` / ``fused_chunk_gla`` that fla's code looks up
  dispatch to ``self.gla_fn`` (a pass-through dispatcher installed once in fla's layer module: a
  call from anywhere else, or from a layer that is not adapted, reaches fla's kernel unchanged).
  The layers then look like the project's own ``models.gla.GLAAttention`` to
  :func:`zeco.parallelize`, which swaps every ``gla_fn`` for :func:`zeco.sp_gla` over the group —
  :func:`parallelize` does both. Everything else in fla's GLA model acts per token.
* **Triton-only modules** (``torch_modules``; default: when the model is not on CUDA, where
  Triton cannot run): fla's fused ``RMSNorm`` (also with ``fuse_norm=False`` the per-head
  ``g_norm`` is fla's Triton RMSNorm), ``FusedRMSNormGated`` (norm + swish output gate),
  ``GatedMLP``'s SwiGLU (also with ``fuse_swiglu=False``), the swish gate function, the feature
  map, ``ShortConvolution`` and the fused cross-entropy get pure-PyTorch forwards computing the same
  function (fla's own ``*_ref`` formulas: float32 statistics, output in the input's dtype), in
  place, on the same parameters. Modules with no stand-in (fused attention residuals
  ``attnres_block_size``, softmax-attention layers of hybrid configs ``attn=``, fused
  linear cross-entropy, powLU MLPs, GELU gates) make :func:`adapt` raise ``NotImplementedError``
  naming them.

Sequence parallelism (``parallelize``): rank i holds the i-th contiguous piece of the tokens
(``zeco.shard_sequence``, ``tensor_split`` sizes); every GLA layer's recurrence goes through
``sp_gla`` (All-Scan, LASP-1 or LASP-2), a ``ShortConvolution`` (``use_short_conv=True``) gets the
``conv_size - 1`` inputs before its piece from the previous ranks (one small all-gather per call,
backward reduce-scatter), and the loss must be formed on labels shifted on the whole sequence —
fla's ``forward(labels=...)`` shifts inside the piece and would drop each boundary's target, so
under SP passing ``labels`` raises; use ``zeco.shift_labels`` then ``zeco.shard_sequence`` and
``zeco.sp_lm_loss`` on ``model(ids_local).logits``. Padding masks / ``cu_seqlens`` (variable length)
and caches (``use_cache``) are not supported under SP (``NotImplementedError``): train with
``use_cache=False`` (or ``model.train()``).

Usage::

    from fla.models import GLAConfig, GLAForCausalLM
    from longseq.adapters import fla_gla
    from longseq import zeco
    model = GLAForCausalLM(GLAConfig(..., use_cache=False))          # the same weights on every rank
    handle = fla_gla.parallelize(model, groups, method="zeco")
    labels = zeco.shard_sequence(zeco.shift_labels(ids), groups.sp_group)
    logits = model(input_ids=zeco.shard_sequence(ids, groups.sp_group)).logits
    loss = zeco.sp_lm_loss(logits, labels, groups.sp_group)
    loss.backward(); longseq.sync_gradients(model.parameters(), groups)
    handle.remove()                                                   # the model is as before
"""
from __future__ import annotations

import functools
import inspect
import threading
import types
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from longseq import functional as LF
from longseq.optional import require

__all__ = ["adapt", "parallelize", "FLAGLAHandle", "KERNEL_NAMES", "LAYERS", "ROUTES", "FUNCTIONS", "MODELS",
           "build_model", "module_standins", "gla_decay", "scalar_decay", "retention_decay", "no_decay", "rms_norm_linear",
           "rms_norm_swish_gate_linear", "rotary_embedding", "tiny_config", "build", "rms_norm",
           "rms_norm_gated", "short_conv", "TorchCrossEntropy"]

_STATE = threading.local()          # .layer: the adapted GatedLinearAttention whose forward is running
_MARK = "_longseq_fla_adapter"      # set on a model that is adapted (the handle)


def tiny_config(**overrides) -> dict:
    """A tiny fla GLA configuration for CPU tests: hidden 32, 2 layers, 2 heads (K 8, V 16 per
    head), vocab 64, no cache. fla's default fused flags stay on: the adapter's PyTorch stand-ins
    replace the fused modules on CPU."""
    cfg = dict(hidden_size=32, num_hidden_layers=2, num_heads=2, vocab_size=64, intermediate_size=64,
               use_cache=False, max_position_embeddings=4096)
    cfg.update(overrides)
    return cfg


def build(**overrides) -> nn.Module:
    """``fla.models.GLAForCausalLM(GLAConfig(**tiny_config(**overrides)))``."""
    fm = require("fla.models", extra="fla", what="longseq.adapters.fla_gla (fla's GLA model)")
    return fm.GLAForCausalLM(fm.GLAConfig(**tiny_config(**overrides)))


#: fla models whose layers the routing table covers, tested on CPU against one process:
#: name -> (config class, model class, tiny overrides). Build one with :func:`build_model`.
MODELS = {
    "gla": ("GLAConfig", "GLAForCausalLM", {}),
    "hgrn2": ("HGRN2Config", "HGRN2ForCausalLM", dict(expand_ratio=8)),           # per-key decay, k = 1 - decay
    "retnet": ("RetNetConfig", "RetNetForCausalLM", {}),                         # scalar decay per head, rotary
    "linear_attn": ("LinearAttentionConfig", "LinearAttentionForCausalLM", {}),  # no decay (g = 0)
}


def build_model(name: str, **overrides) -> nn.Module:
    """A tiny fla causal LM of ``MODELS`` (hidden 32, 2 layers, 2 heads, vocab 64, no cache)."""
    fm = require("fla.models", extra="fla", what=f"longseq.adapters.fla_gla ({name}, an fla model)")
    cfg_cls, model_cls, extra = MODELS[name]
    return getattr(fm, model_cls)(getattr(fm, cfg_cls)(**tiny_config(**{**extra, **overrides})))


# ----------------------------------------------------------------------------------------------
# Pure-PyTorch stand-ins for fla's Triton modules (fla's reference formulas)
# ----------------------------------------------------------------------------------------------
def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half / bfloat16 / float32 inputs, float64 for float64 (never lower than the input)."""
    return torch.promote_types(x.dtype, torch.float32)


def rms_norm(x, weight, bias, eps, residual=None, prenorm=False, residual_in_fp32=False):
    """fla's ``rms_norm`` (``LayerNormFunction`` with ``is_rms_norm``): statistics in float32 (float64 for float64),
    ``y`` in x's dtype; with ``residual`` the normalised input is ``x + residual`` and ``prenorm``
    also returns it (in residual's dtype, float32 with ``residual_in_fp32``)."""
    res_dtype = residual.dtype if residual is not None else (torch.float32 if residual_in_fp32 else x.dtype)
    ct = _compute_dtype(x)
    xf = x.to(ct)
    if residual is not None:
        xf = xf + residual.to(ct)
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(ct)
    if bias is not None:
        y = y + bias.to(ct)
    y = y.to(x.dtype)
    if not prenorm:
        return y
    return y, (xf.to(res_dtype) if (residual is not None or res_dtype != x.dtype) else x)


def rms_norm_gated(x, g, weight, bias, eps, activation="swish", residual=None, prenorm=False,
                   residual_in_fp32=False):
    """fla's ``rms_norm_gated``: ``rms_norm(x) * act(g)``, act swish/silu (``g·sigmoid(g)``) or
    sigmoid, in float32 (float64 for float64), output in x's dtype."""
    out = rms_norm(x, weight, bias, eps, residual, prenorm, residual_in_fp32)
    y, res = (out if prenorm else (out, None))
    gf = g.to(_compute_dtype(x))
    if activation in ("swish", "silu"):
        gate = gf * torch.sigmoid(gf)
    elif activation == "sigmoid":
        gate = torch.sigmoid(gf)
    else:
        raise NotImplementedError(f"fla gated norm activation {activation!r}")
    y = (y.to(gf.dtype) * gate).to(x.dtype)
    return (y, res) if prenorm else y


def short_conv(x, weight, bias, activation, halo=None):
    """fla's ``ShortConvolution`` (causal depthwise conv1d, kernel W, then the activation):
    ``x [B, T, D]``, ``weight [D, 1, W]``; ``halo [B, W-1, D]`` are the inputs just before x (zeros
    at the start of a sequence)."""
    B, T, D = x.shape
    W = weight.shape[-1]
    if halo is None:
        halo = x.new_zeros(B, W - 1, D)
    xp = torch.cat([halo.to(x.dtype), x], dim=1).transpose(1, 2)           # [B, D, W-1+T]
    ct = _compute_dtype(x)
    y = F.conv1d(xp.to(ct), weight.to(ct), None if bias is None else bias.to(ct), groups=D)
    if activation in ("swish", "silu"):
        y = F.silu(y)
    elif activation is not None:
        raise NotImplementedError(f"fla ShortConvolution activation {activation!r}")
    return y.transpose(1, 2).to(x.dtype)


class TorchCrossEntropy:
    """Stands in for fla's ``FusedCrossEntropyLoss`` as ``model.criterion`` (a plain object, not a
    submodule, so the model's module tree is unchanged): ``F.cross_entropy`` in float32 with
    ``ignore_index`` and ``reduction`` (fla copies it and sets ``reduction="sum"`` for
    ``num_items_in_batch``)."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean"):
        self.ignore_index, self.reduction = ignore_index, reduction

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.to(_compute_dtype(logits)), target, ignore_index=self.ignore_index,
                               reduction=self.reduction)


def _torch_activation(fn: Callable) -> Optional[Callable]:
    """The PyTorch equivalent of one of fla's (Triton) activation functions, or None."""
    from fla.modules.activations import ACT2FN
    table = {"swish": F.silu, "silu": F.silu, "sigmoid": torch.sigmoid, "logsigmoid": F.logsigmoid,
             "relu": F.relu, "sqrelu": lambda x: F.relu(x).square()}
    for name, f in ACT2FN.items():
        if f is fn:
            return table.get(name)
    return fn if getattr(fn, "__module__", "").startswith(("torch", "builtins")) else None


def _rmsnorm_forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
    return rms_norm(x, self.weight, self.bias, self.eps, residual, prenorm, residual_in_fp32)


def _gated_norm_forward(self, x, g, residual=None, prenorm=False, residual_in_fp32=False):
    return rms_norm_gated(x, g, self.weight, self.bias, self.eps, self.activation, residual, prenorm,
                          residual_in_fp32)


def _mlp_forward(self, x, **kwargs):
    return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def module_standins(*, conv: bool = True) -> list[tuple[type, Callable, str]]:
    """``(fla module class, PyTorch forward, name)`` for fla's modules whose Triton forwards get a
    pure-PyTorch stand-in where Triton cannot run (``conv``: also ``ShortConvolution``, whose stand-in
    fetches its halo from the previous ranks); other adapters install the same ones."""
    from fla.modules import FusedRMSNormGated, GatedMLP, RMSNorm, ShortConvolution
    out = [(RMSNorm, _rmsnorm_forward, "RMSNorm"),
           (FusedRMSNormGated, _gated_norm_forward, "FusedRMSNormGated"),
           (GatedMLP, _mlp_forward, "GatedMLP (SwiGLU)")]
    return out + [(ShortConvolution, _conv_forward, "ShortConvolution")] if conv else out


def _conv_forward(self, x, residual=None, mask=None, cache=None, output_final_state=False, cu_seqlens=None,
                  **kwargs):
    if cache is not None or output_final_state or cu_seqlens is not None:
        raise NotImplementedError("fla_gla: ShortConvolution with a cache (use_cache) or cu_seqlens is not "
                                  "supported by the adapter; train with use_cache=False and unpadded batches")
    if mask is not None:
        x = x * mask.unsqueeze(-1).to(x.dtype)
    group = getattr(self, "_longseq_sp_group", None)
    halo = LF.gather_halo(x, self.weight.shape[-1] - 1, group, tag="fla_gla.conv.halo") if group is not None else None
    y = short_conv(x, self.weight, self.bias, self.activation, halo)
    if residual is not None:
        y = y + residual
    return y, None


# ----------------------------------------------------------------------------------------------
# Routing fla's kernel calls to the layer's gla_fn: the public routing table
# ----------------------------------------------------------------------------------------------
def gla_decay(a: dict) -> torch.Tensor:
    """Per-key log decay ``g`` (or ``gk``) ``[B, T, H, K]``: fla's GLA kernels (GLA, HGRN2)."""
    return a.get("g") if a.get("g") is not None else a.get("gk")


def scalar_decay(a: dict) -> torch.Tensor:
    """A scalar log decay per head and step, ``g [B, T, H]`` (or per head, ``g_gamma [H]``),
    broadcast over the keys: fla's simple-GLA kernels."""
    q, g = a["q"], a.get("g")
    if g is None:
        g = a["g_gamma"].to(q.dtype).view(1, 1, -1).expand(*q.shape[:3])
    return g.unsqueeze(-1).expand(*q.shape)


def retention_decay(a: dict) -> torch.Tensor:
    """Retention's fixed decay per head h, ``log(1 - 2^(-5 - h))`` (fla's ``chunk_retention``)."""
    q = a["q"]
    h = torch.arange(q.shape[2], dtype=torch.float64, device=q.device)
    return scalar_decay({"q": q, "g_gamma": torch.log1p(-(2.0 ** (-5.0 - h)))})


def no_decay(a: dict) -> torch.Tensor:
    """Plain linear attention (decay 1, ``g = 0``); fla's ``normalize=True`` (a running denominator) is
    not a GLA and raises."""
    if a.get("normalize"):
        raise NotImplementedError("normalize=True (a running sum of keys as denominator) is not a GLA recurrence")
    return torch.zeros_like(a["q"])


#: kernel name -> the log decay ``g [B, T, H, K]`` of the GLA it computes, from its bound arguments
#: (a dict by parameter name). A kernel listed here computes
#: ``S_t = exp(g_t)·S_{t-1} + k_t v_t^T, o_t = scale·q_t S_t`` on fla's ``[B, T, H, K]`` layout.
ROUTES: dict[str, Callable[[dict], torch.Tensor]] = {
    **dict.fromkeys(("chunk_gla", "fused_recurrent_gla", "fused_chunk_gla"), gla_decay),
    **dict.fromkeys(("chunk_simple_gla", "fused_recurrent_simple_gla", "fused_chunk_simple_gla"), scalar_decay),
    **dict.fromkeys(("chunk_retention", "fused_recurrent_retention", "fused_chunk_retention", "parallel_retention"),
                    retention_decay),
    **dict.fromkeys(("chunk_linear_attn", "fused_recurrent_linear_attn", "fused_chunk_linear_attn"), no_decay),
}

#: fla layer class (``module.QualName``) -> the kernel names its forward calls, routed while it runs.
#: Extend it for another layer whose recurrence is a GLA: ``LAYERS["pkg.mod.MyAttention"] =
#: ("my_kernel",)`` and ``ROUTES["my_kernel"] = lambda a: a["g"]``.
LAYERS: dict[str, tuple[str, ...]] = {
    "fla.layers.gla.GatedLinearAttention": ("chunk_gla", "fused_recurrent_gla", "fused_chunk_gla"),
    "fla.layers.hgrn2.HGRN2Attention": ("chunk_gla", "fused_recurrent_gla", "fused_chunk_gla"),
    "fla.layers.simple_gla.SimpleGatedLinearAttention": ("chunk_simple_gla", "fused_recurrent_simple_gla"),
    "fla.layers.multiscale_retention.MultiScaleRetention": ("chunk_retention", "fused_recurrent_retention",
                                                            "fused_chunk_retention", "parallel_retention"),
    "fla.layers.linear_attn.LinearAttention": ("chunk_linear_attn", "fused_recurrent_linear_attn",
                                               "fused_chunk_linear_attn"),
}

#: The kernel names fla's GatedLinearAttention.forward looks up in its module (kept for compatibility).
KERNEL_NAMES = LAYERS["fla.layers.gla.GatedLinearAttention"]


def rms_norm_linear(x, norm_weight, norm_bias, linear_weight, linear_bias, residual=None, eps=1e-5, prenorm=False,
                    residual_in_fp32=False):
    """fla's ``rms_norm_linear``: ``linear(rms_norm(x))``."""
    out = rms_norm(x, norm_weight, norm_bias, eps, residual, prenorm, residual_in_fp32)
    y, res = out if prenorm else (out, None)
    y = F.linear(y, linear_weight, linear_bias)
    return (y, res) if prenorm else y


def rms_norm_swish_gate_linear(x, g, norm_weight, norm_bias, linear_weight, linear_bias, residual=None,
                               prenorm=False, residual_in_fp32=False, eps=1e-6):
    """fla's ``rms_norm_swish_gate_linear``: ``linear(rms_norm(x) · swish(g))``."""
    out = rms_norm_gated(x, g, norm_weight, norm_bias, eps, "swish", residual, prenorm, residual_in_fp32)
    y, res = out if prenorm else (out, None)
    y = F.linear(y, linear_weight, linear_bias)
    return (y, res) if prenorm else y


def rotary_embedding(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0, cu_seqlens=None,
                     chunk_indices=None):
    """fla's ``rotary_embedding`` on ``x [B, T, H, D]`` with tables ``cos, sin [L, R/2]``, positions
    ``seqlen_offsets + t``: the first R dims rotated in pairs (halves, or neighbours if interleaved)."""
    if cu_seqlens is not None or not isinstance(seqlen_offsets, int):
        raise NotImplementedError("fla_gla: rotary embedding with cu_seqlens or per-sequence offsets")
    T, R = x.shape[1], 2 * cos.shape[-1]
    ct = _compute_dtype(x)
    c = cos[seqlen_offsets:seqlen_offsets + T].to(ct)[None, :, None]
    s_ = sin[seqlen_offsets:seqlen_offsets + T].to(ct)[None, :, None]
    xr = x[..., :R].to(ct)
    if interleaved:
        a, b = xr[..., 0::2], xr[..., 1::2]
        y = torch.stack([a * c - b * s_, a * s_ + b * c], -1).flatten(-2)
    else:
        a, b = xr[..., :R // 2], xr[..., R // 2:]
        y = torch.cat([a * c - b * s_, a * s_ + b * c], -1)
    return torch.cat([y.to(x.dtype), x[..., R:]], -1)


#: fla's Triton functions that layers call by name -> PyTorch stand-ins (used when the adapter
#: runs with ``torch_modules``; in the globals of every routed layer's module and of fla's rotary).
FUNCTIONS: dict[str, Callable] = {
    "swish": F.silu, "silu": F.silu, "sigmoid": torch.sigmoid, "logsigmoid": F.logsigmoid,
    "swiglu": lambda x, y: F.silu(x) * y, "rms_norm_linear": rms_norm_linear,
    "rms_norm_swish_gate_linear": rms_norm_swish_gate_linear, "rotary_embedding": rotary_embedding,
}


def _layer_kernels(mod: nn.Module) -> Optional[tuple[str, ...]]:
    for cls in type(mod).__mro__:
        names = LAYERS.get(f"{cls.__module__}.{cls.__qualname__}")
        if names is not None:
            return names
    return None


_KNOWN = {"q", "k", "v", "g", "gk", "g_gamma", "scale", "initial_state", "output_final_state", "state_v_first",
          "transpose_state_layout", "normalize", "chunk_size", "output_attentions"}


def _route(name: str, sig: inspect.Signature, args: tuple, kwargs: dict):
    layer = _STATE.layer
    bound = sig.bind(*args, **kwargs)
    a: dict = {}
    for key, val in bound.arguments.items():
        kind = sig.parameters[key].kind
        a.update(val if kind is inspect.Parameter.VAR_KEYWORD else {key: val})
    unsupported = sorted(key for key, val in a.items() if key not in _KNOWN and val is not None and val is not False)
    if any(a.get(x) is None for x in ("q", "k", "v")):
        unsupported.append("q, k and v")
    if unsupported:
        raise NotImplementedError(
            f"fla_gla: {type(layer).__name__} called {name} with {unsupported}, which the adapter does not "
            "route (padding masks / variable-length batches, value gates, reverse scans)")
    try:
        g = ROUTES[name](a)
    except NotImplementedError as e:
        raise NotImplementedError(f"fla_gla: {type(layer).__name__} called {name}: {e}") from None
    if g is None:
        raise NotImplementedError(f"fla_gla: {type(layer).__name__} called {name} without a decay")
    q, k, v = a["q"], a["k"], a["v"]
    sp = hasattr(layer, "_zeco_serial_gla_fn")      # zeco.parallelize has swapped gla_fn for sp_gla
    h0, final = a.get("initial_state"), bool(a.get("output_final_state", False))
    if sp and (h0 is not None or final):
        raise NotImplementedError("fla_gla: recurrent-state caches (use_cache / past_key_values) are not "
                                  "supported under sequence parallelism; use use_cache=False for training")
    v_first = bool(a.get("state_v_first") or a.get("transpose_state_layout"))
    if h0 is not None and v_first:
        h0 = h0.transpose(-1, -2)
    o, ht = layer.gla_fn(q, k, v, g.to(q.dtype).contiguous(), scale=a.get("scale"), initial_state=h0, output_final_state=final,
                         **layer._longseq_gla_opts)
    if ht is not None and v_first:
        ht = ht.transpose(-1, -2)
    return o, ht


def _dispatcher(name: str, original: Callable) -> Callable:
    """fla's ``original`` unless a routed layer's forward runs in this thread: then its kernel call
    goes to the layer's ``gla_fn``, and (with ``torch_modules``) a Triton function to its stand-in."""
    sig = inspect.signature(original) if name in ROUTES else None

    @functools.wraps(original)
    def call(*args, **kwargs):
        layer = getattr(_STATE, "layer", None)
        if layer is None:
            return original(*args, **kwargs)
        if name in layer._longseq_kernels:
            return _route(name, sig, args, kwargs)
        if layer._longseq_torch and name in FUNCTIONS:
            return FUNCTIONS[name](*args, **kwargs)
        return original(*args, **kwargs)

    call._longseq_original = original
    return call


def _is_fla_function(f: Any) -> bool:
    mod = getattr(f, "__module__", None) or getattr(getattr(f, "__self__", None), "__module__", "") or ""
    return callable(f) and not isinstance(f, type) and mod.startswith(("fla.modules", "fla.ops")) and \
        not mod.startswith("fla.ops.utils")


def _install_dispatchers(fn: Callable, names: tuple[str, ...] = ()) -> list[str]:
    """Once per module: the kernel ``names`` and the by-name Triton functions (``FUNCTIONS``) that
    ``fn`` (a forward) looks up in its globals become pass-through dispatchers. Returns the fla
    functions it calls by name that have neither a route nor a stand-in."""
    g = fn.__globals__
    missing = []
    for name in dict.fromkeys(names + tuple(fn.__code__.co_names)):
        f = g.get(name)
        if f is None or hasattr(f, "_longseq_original"):
            continue
        if name in names or name in FUNCTIONS:
            g[name] = _dispatcher(name, f)
        elif _is_fla_function(f) and name not in ROUTES:
            missing.append(name)
    return missing


def _routed_forward(layer, original_forward, *args, **kwargs):
    prev = getattr(_STATE, "layer", None)
    _STATE.layer = layer
    try:
        return original_forward(*args, **kwargs)
    finally:
        _STATE.layer = prev


# ----------------------------------------------------------------------------------------------
# The handle
# ----------------------------------------------------------------------------------------------
class FLAGLAHandle:
    """What :func:`adapt` / :func:`parallelize` changed on the model; ``remove()`` undoes all of it
    (also as a context manager). ``layers``: the adapted ``GatedLinearAttention`` paths;
    ``substituted``: ``(path, what)`` for each Triton module given a PyTorch forward."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers: list[str] = []
        self.substituted: list[tuple[str, str]] = []
        self.rotaries: list[str] = []
        self.offset = 0                 # this rank's global token offset (rotary positions under SP)
        self.group = None
        self._undo: list[Callable[[], None]] = []

    def _set(self, obj: Any, attr: str, value: Any) -> None:
        had = attr in vars(obj)
        old = vars(obj).get(attr)

        def undo():
            if had:
                setattr(obj, attr, old)
            elif attr in vars(obj):
                delattr(obj, attr)
        setattr(obj, attr, value)
        self._undo.append(undo)

    def remove(self) -> None:
        if self.group is not None:
            from longseq import zeco
            zeco.unparallelize(self.model)
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        if vars(self.model).get(_MARK) is self:
            delattr(self.model, _MARK)

    def __enter__(self) -> "FLAGLAHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _on_cuda(model: nn.Module) -> bool:
    return any(p.device.type == "cuda" for p in model.parameters())


def adapt(model: nn.Module, *, torch_modules: Any = "auto", backend: str = "auto", chunk_size: int = 64) -> FLAGLAHandle:
    """Route every fla layer of the routing table (``LAYERS``: GLA, HGRN2, simple GLA, retention,
    linear attention) in ``model`` through its ``gla_fn`` (default :func:`zeco.gla.gla` with
    ``backend`` / ``chunk_size``), in place; with ``torch_modules`` (``True``, ``False`` or
    ``"auto"``: when no parameter is on CUDA) also give fla's Triton-only modules PyTorch forwards
    and the Triton functions the layers call by name (``FUNCTIONS``) PyTorch stand-ins. Single
    process; :func:`parallelize` adds sequence parallelism. Raises ``NotImplementedError`` naming
    modules / functions that cannot run this way, ``ValueError`` when the model has no routed
    layer or is already adapted."""
    from fla.modules import GatedMLP
    from fla.modules.rotary import RotaryEmbedding

    from longseq.zeco.gla import gla as local_gla

    if vars(model).get(_MARK) is not None:
        raise ValueError("fla_gla: this model is already adapted; call .remove() on its handle first")
    if torch_modules == "auto":
        torch_modules = not _on_cuda(model)
    cfg = getattr(model, "config", None)
    h = FLAGLAHandle(model)
    blockers = []
    if cfg is not None and getattr(cfg, "attnres_block_size", None) is not None:
        blockers.append("attention residuals (config.attnres_block_size): fla's fused_attnres")
    if cfg is not None and getattr(cfg, "attn", None) is not None:
        blockers.append("hybrid softmax-attention layers (config.attn): ZeCO handles GLA layers only")
    if torch_modules and cfg is not None and getattr(cfg, "fuse_linear_cross_entropy", False):
        blockers.append("fuse_linear_cross_entropy=True: fla's fused linear cross-entropy (set it False)")
    covered: list[str] = []          # substituted modules: their children never run
    try:
        for path, mod in model.named_modules():
            if any(path.startswith(c + ".") for c in covered):
                continue
            kernels = _layer_kernels(mod)
            if kernels is not None:
                missing = _install_dispatchers(type(mod).forward, kernels)
                if torch_modules and missing:
                    blockers.append(f"{path}: {type(mod).__name__} calls fla's {', '.join(missing)} by name, which "
                                    "has no PyTorch stand-in (add one to fla_gla.FUNCTIONS)")
                h._set(mod, "forward", functools.partial(_routed_forward, mod, mod.forward))
                h._set(mod, "gla_fn", local_gla)
                h._set(mod, "_longseq_gla_opts", {"backend": backend, "chunk_size": chunk_size})
                h._set(mod, "_longseq_kernels", kernels)
                h._set(mod, "_longseq_torch", bool(torch_modules))
                h.layers.append(path)
                if torch_modules:
                    for attr in ("gate_fn", "feature_map_fn"):
                        fn = getattr(mod, attr, None)
                        if fn is None:
                            continue
                        sub = _torch_activation(fn)
                        if sub is None:
                            blockers.append(f"{path}.{attr}: {getattr(fn, '__name__', fn)!r} has no PyTorch stand-in")
                        elif sub is not fn:
                            h._set(mod, attr, sub)
                            h.substituted.append((f"{path}.{attr}", "activation"))
            if isinstance(mod, RotaryEmbedding):       # its Triton rotary_embedding, by name
                _install_dispatchers(type(mod).forward)
                h.rotaries.append(path)
            if not torch_modules:
                continue
            for cls, fwd, what in module_standins():
                if isinstance(mod, cls):
                    if cls is GatedMLP and mod.hidden_act != "swish":
                        blockers.append(f"{path}: GatedMLP with hidden_act={mod.hidden_act!r}")
                    h._set(mod, "forward", types.MethodType(fwd, mod))
                    h.substituted.append((path, what))
                    covered.append(path)
                    break
            else:
                if type(mod).__module__.startswith("fla.") and not list(mod.children()) and kernels is None and \
                        not isinstance(mod, RotaryEmbedding):
                    blockers.append(f"{path}: {type(mod).__name__} (fla, Triton) has no PyTorch stand-in")
        if not h.layers:
            raise ValueError(f"fla_gla: {type(model).__name__} has no fla layer of the routing table "
                             f"(fla_gla.LAYERS: {', '.join(n.rsplit('.', 1)[1] for n in LAYERS)})")
        if torch_modules and cfg is not None and hasattr(model, "criterion") and model.criterion is None and \
                getattr(cfg, "fuse_cross_entropy", False):
            h._set(model, "criterion", TorchCrossEntropy())          # fla's FusedCrossEntropyLoss is Triton
            h.substituted.append(("criterion", "FusedCrossEntropyLoss"))
        if blockers:
            raise NotImplementedError("fla_gla: cannot run without fla's Triton kernels:\n  " + "\n  ".join(blockers))
    except BaseException:
        h.remove()
        raise
    h._set(model, _MARK, h)
    return h


def _refuse_labels(module, args, kwargs):
    if kwargs.get("labels") is not None or (len(args) > 4 and args[4] is not None):
        raise ValueError(
            "fla_gla: under sequence parallelism do not pass labels to the model: fla shifts them inside this "
            "rank's piece and would drop the target of each piece's last token. Shift on the whole sequence "
            "and shard (zeco.shard_sequence(zeco.shift_labels(ids), group)), then "
            "zeco.sp_lm_loss(model(input_ids=ids_local).logits, labels_local, group)")
    return None


def _global_offset(handle: FLAGLAHandle, module, args, kwargs):
    """Model pre-hook: this rank's global token offset (one all-gather of the local lengths, checked
    to be the ``tensor_split`` layout), for the rotary embeddings (``longseq.position_offset``)."""
    from longseq import comm, position_offset
    from longseq.sharding import split_sizes
    x = kwargs.get("input_ids", args[0] if args else None)
    x = kwargs.get("inputs_embeds") if x is None else x
    sizes = comm.all_gather_int(int(x.shape[1]), handle.group, tag="fla_gla.positions")
    if sizes != split_sizes(sum(sizes), len(sizes)):
        raise ValueError(f"fla_gla: the ranks hold {sizes} tokens, not the tensor_split layout of {sum(sizes)}; "
                         "shard with zeco.shard_sequence")
    handle.offset = position_offset(sum(sizes), handle.group)
    return None


def _rotary_forward(handle, original, q, k, seqlen_offset=0, cu_seqlens=None, max_seqlen=None, **kwargs):
    """fla's rotary embedding at this rank's global positions: its offset added to fla's."""
    if cu_seqlens is not None or not isinstance(seqlen_offset, int):
        raise NotImplementedError("fla_gla: rotary embeddings with cu_seqlens / per-sequence offsets under SP")
    off = handle.offset
    return original(q, k, seqlen_offset=seqlen_offset + off, cu_seqlens=None,
                    max_seqlen=None if max_seqlen is None else max_seqlen + off, **kwargs)


def parallelize(model: nn.Module, group: Any, *, method: str = "zeco", num_blocks: Optional[int] = None,
                overlap: bool = True, check: Any = True, torch_modules: Any = "auto", backend: str = "auto",
                chunk_size: int = 64) -> FLAGLAHandle:
    """Make an fla GLA model sequence-parallel over ``group`` (a process group or a
    ``longseq.ParallelGroups``): :func:`adapt`, then :func:`zeco.parallelize` (every layer's GLA
    through :func:`zeco.sp_gla` with ``method`` / ``num_blocks`` / ``overlap`` / ``check``), short
    convolutions with halos from the previous ranks, rotary embeddings at this rank's global
    positions (one all-gather of the local lengths per forward, tag ``fla_gla.positions``), and
    ``labels`` refused (module docstring).
    Returns the handle; ``remove()`` restores the model."""
    from longseq import zeco
    from fla.modules import ShortConvolution

    sp_group = group.sp_group if hasattr(group, "sp_group") else group
    h = adapt(model, torch_modules=torch_modules, backend=backend, chunk_size=chunk_size)
    try:
        zeco.parallelize(model, sp_group, method=method, num_blocks=num_blocks, overlap=overlap, check=check)
        h.group = sp_group
        for path, mod in model.named_modules():
            if isinstance(mod, ShortConvolution):
                if "forward" not in vars(mod):      # fla's Triton conv on CUDA: the PyTorch one with halos
                    h._set(mod, "forward", types.MethodType(_conv_forward, mod))
                    h.substituted.append((path, "ShortConvolution (halo)"))
                h._set(mod, "_longseq_sp_group", sp_group)
        for path in h.rotaries:                     # positions restart at 0 on every rank without this
            mod = model.get_submodule(path)
            h._set(mod, "forward", functools.partial(_rotary_forward, h, mod.forward))
        if h.rotaries:
            hook = model.register_forward_pre_hook(functools.partial(_global_offset, h), with_kwargs=True)
            h._undo.append(hook.remove)
        if "labels" in inspect.signature(model.forward).parameters:
            hook = model.register_forward_pre_hook(_refuse_labels, with_kwargs=True)
            h._undo.append(hook.remove)
    except BaseException:
        h.remove()
        raise
    return h
