"""Sequence parallelism for transformers' linear-attention causal LMs (Gated DeltaNet / KDA hybrids:
Qwen3-Next, Qwen3.5, Kimi-Linear, OLMo-Hybrid, Bailing-Hybrid, and any model built the same way),
applied from outside, on the model's own parameters, in one call::

    from longseq.adapters.transformers import parallelize
    handle = parallelize(model, group, method="zeco", attention="ulysses")
    logits = model(input_ids=zeco.shard_sequence(ids, group)).logits     # this rank's piece
    handle.remove()                                                      # the model as it was

Every rank holds its contiguous piece of the tokens (any lengths; ``zeco.shard_sequence`` gives the
``tensor_split`` pieces). What the adapter changes, found by what the modules are and how they call,
never by model name:

* **Delta-rule layers**: transformers' linear-attention layers declare their kernel functions
  (``use_kernelized_func``: each instance holds private wrappers in ``_kernel_funcs``, the per-layer
  hook that ``kernels.kernelize`` itself rebinds). A wrapper whose function takes
  ``(query, key, value, g, beta, chunk_size, initial_state, ...)`` is the chunked delta rule (Gated
  DeltaNet with ``g [B, T, H]``, KDA with ``g [B, T, H, K]``): its ``forward`` becomes
  :func:`zeco.sp_delta_rule` (``method``; q, k with the key heads, grouped value heads as the model
  has them: one ``K x V`` state per value head on the wire). One taking ``(conv1d, hidden_states,
  cache, layer_idx, ...)`` is the causal depthwise convolution on ``[B, C, T]``: it becomes the same
  convolution over ``[halo | x]`` with the ``w-1`` steps before the piece from the previous rank
  (:func:`longseq.functional.halo_exchange_channels_first`, point to point). The recurrent
  (decode) kernels are refused (caches under SP are not supported).
* **Softmax attention** (GQA, gated attention, MLA with or without RoPE): through transformers'
  public attention registry: ``AttentionInterface.register("longseq_sp", ...)`` and
  ``model.set_attn_implementation("longseq_sp")``; the registered function runs Ulysses
  (:func:`longseq.sp.ulysses_attention`, contiguous pieces of any lengths, k/v heads P does not
  divide repeated) or ring attention on the module's ``is_causal`` and ``scaling``; padding masks
  are refused. (transformers builds no mask for an implementation it has no mask function for.)
* **Positions**: a forward pre-hook on the model passes ``position_ids`` = this rank's global
  positions (one all-gather of the local lengths, tag ``transformers.positions``) when the caller
  gives none, so RoPE does not restart on every rank.
* **``labels=``** is refused with the fix (``zeco.sp_lm_loss`` on ``zeco.shift_labels`` of the whole
  ids): transformers' loss would shift inside each piece and drop the targets at the boundaries.
* MLPs, MoE blocks, norms and embeddings are untouched (they act per token).

``handle.remove()`` restores every attribute, hook and the attention implementation. Works with
FSDP2 (``fully_shard`` after or before: only per-instance attributes change) and with the training
entry (``model.family=hf_causal_lm``).
"""
from __future__ import annotations

import functools
import inspect
import types
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from longseq import comm
from longseq.functional import halo_exchange_channels_first
from longseq.sp.ring import ring_attention
from longseq.sp.ulysses import ulysses_attention
from longseq.zeco import sp_delta_rule
from longseq.zeco.sp_delta import DELTA_METHODS

from .fla_gla import FLAGLAHandle

__all__ = ["parallelize", "TransformersSPHandle", "ATTENTION_IMPLEMENTATION", "kernel_kind", "find_layers"]

ATTENTION_IMPLEMENTATION = "longseq_sp"
ATTENTIONS = ("ulysses", "ring")
_SPEC = "_longseq_sp_attention"
_CONV = ("conv1d", "hidden_states", "cache", "layer_idx")
_DELTA = {"query", "key", "value", "g", "beta", "initial_state", "output_final_state"}


# ----------------------------------------------------------------------------------------------
# What a layer's kernel function is, from its signature
# ----------------------------------------------------------------------------------------------
def _kernel_function(wrapper: nn.Module) -> Optional[Callable]:
    """The function a ``kernels`` function module wraps (the closure of its class's forward)."""
    for cell in getattr(type(wrapper).forward, "__closure__", None) or ():
        f = cell.cell_contents
        if callable(f) and not isinstance(f, (type, dict)):
            return f
    return None


def kernel_kind(wrapper: nn.Module) -> Optional[str]:
    """``"delta_chunk"`` | ``"delta_recurrent"`` | ``"conv"`` | None for one of a layer's kernel
    function modules, by the parameters of the function it wraps."""
    fn = _kernel_function(wrapper)
    if fn is None:
        return None
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None
    if tuple(params[:4]) == _CONV:
        return "conv"
    if _DELTA <= set(params):
        return "delta_chunk" if "chunk_size" in params else "delta_recurrent"
    return None


def find_layers(model: nn.Module) -> list[tuple[str, nn.Module, dict]]:
    """``(path, layer, {kernel name: kind})`` for every module whose declared kernel functions include
    a delta rule (module docstring)."""
    out = []
    for path, mod in model.named_modules():
        funcs = vars(mod).get("_kernel_funcs")
        if isinstance(funcs, dict):
            kinds = {name: kernel_kind(w) for name, w in funcs.items()}
            if any(k and k.startswith("delta") for k in kinds.values()):
                out.append((path, mod, kinds))
    return out


# ----------------------------------------------------------------------------------------------
# The replacements
# ----------------------------------------------------------------------------------------------
def _delta_forward(spec: dict, query, key, value, g, beta, chunk_size=64, initial_state=None,
                   output_final_state=False, use_qk_l2norm_in_kernel=False, cu_seqlens=None, **kwargs):
    """The chunked delta rule of a transformers layer (``[B, T, H, K]`` q, k with the key heads, v, g,
    beta with the value heads) as :func:`zeco.sp_delta_rule` over this rank's piece."""
    if initial_state is not None or output_final_state or cu_seqlens is not None:
        raise NotImplementedError("longseq.adapters.transformers: caches, initial states and packed sequences "
                                  "(cu_seqlens) are not supported under sequence parallelism; train with "
                                  "use_cache=False and unpadded batches")
    o, _ = sp_delta_rule(query, key, value, g, beta, group=spec["group"], method=spec["method"],
                         use_qk_l2norm=bool(use_qk_l2norm_in_kernel), num_blocks=spec["num_blocks"],
                         check=spec["check"])
    return o.to(query.dtype), None


def _bound(fn: Callable, spec: dict, wrapper: nn.Module, *args, **kwargs):
    return fn(spec, *args, **kwargs)


def _recurrent_refused(spec: dict, *args, **kwargs):
    raise NotImplementedError("longseq.adapters.transformers: cached (token-by-token) decoding is not supported "
                              "under sequence parallelism; generate with the unparallelized model (handle.remove())")


def _conv_forward(spec: dict, conv1d: nn.Conv1d, hidden_states: torch.Tensor, cache=None, layer_idx=None,
                  activation: Optional[str] = None, **kwargs) -> torch.Tensor:
    """transformers' causal depthwise convolution on ``[B, C, T]`` over ``[halo | x]``, the halo the
    ``w-1`` steps before this piece from the previous rank (zeros on rank 0): the same values as the
    padded convolution of the whole sequence, cut to this piece."""
    if cache is not None or kwargs.get("seq_idx") is not None or kwargs.get("cu_seqlens") is not None:
        raise NotImplementedError("longseq.adapters.transformers: a causal convolution with a cache or packed "
                                  "sequences under sequence parallelism; train with use_cache=False")
    from transformers.activations import ACT2FN
    w = conv1d.kernel_size[0]
    x = hidden_states.to(conv1d.weight.dtype)
    halo = halo_exchange_channels_first(x, w - 1, spec["group"], tag="transformers.conv.halo")
    out = F.conv1d(torch.cat([halo, x], -1), conv1d.weight, conv1d.bias, groups=x.shape[1])
    if activation is not None:
        out = ACT2FN[activation](out)
    return out.to(hidden_states.dtype)


def _local_attention(q, k, v, *, causal=False, dropout_p=0.0, softmax_scale=None, backend=None):
    """Local attention on ``[B, T, H, D]`` (k, v may have fewer heads, v another head dim, as MLA)."""
    rep = q.shape[2] // k.shape[2]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         dropout_p=dropout_p, is_causal=causal, scale=softmax_scale)
    return out.transpose(1, 2)


def sp_attention_interface(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                           scaling: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
    """transformers' attention-function signature (q, k, v ``[B, H, T_r, D]``) -> (``[B, T_r, H, Dv]``,
    None): Ulysses or ring attention over the group :func:`parallelize` gave ``module``."""
    spec = getattr(module, _SPEC, None)
    if spec is None:
        raise RuntimeError(f"attn_implementation={ATTENTION_IMPLEMENTATION!r} on a module that "
                           f"longseq.adapters.transformers.parallelize did not parallelize ({type(module).__name__})")
    if attention_mask is not None:
        raise NotImplementedError("longseq.adapters.transformers: attention masks (padding) under sequence "
                                  "parallelism are not supported; pass unpadded batches without attention_mask")
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    if dropout and module.training:
        raise NotImplementedError("longseq.adapters.transformers: attention dropout under sequence parallelism")
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    if spec["attention"] == "ring":
        if v.shape[-1] != q.shape[-1]:
            raise NotImplementedError("ring attention needs one head dim for q, k and v (this is MLA-like); use "
                                      "attention='ulysses'")
        out = ring_attention(q, k, v, spec["group"], causal=causal, softmax_scale=scaling, check=False,
                             tag="transformers.ring")
    else:
        out = ulysses_attention(q, k, v, spec["group"], causal=causal, softmax_scale=scaling,
                                attn_fn=_local_attention, check=False, tag="transformers.ulysses")
    return out, None


def _register_attention() -> None:
    from transformers import AttentionInterface
    AttentionInterface.register(ATTENTION_IMPLEMENTATION, sp_attention_interface)


# ----------------------------------------------------------------------------------------------
# Model-level hooks: positions, labels
# ----------------------------------------------------------------------------------------------
def _model_pre_hook(handle: "TransformersSPHandle", module, args, kwargs):
    if kwargs.get("labels") is not None:
        raise ValueError("longseq.adapters.transformers: labels= under sequence parallelism would be shifted inside "
                         "each rank's piece (the targets at the piece boundaries lost, a wrong loss). Call the model "
                         "without labels and take the loss on the pieces: labels = zeco.shard_sequence("
                         "zeco.shift_labels(ids), group); loss = zeco.sp_lm_loss(model(input_ids=ids_local).logits, "
                         "labels, group)")
    if kwargs.get("use_cache"):
        raise NotImplementedError("longseq.adapters.transformers: use_cache=True under sequence parallelism; pass "
                                  "use_cache=False")
    kwargs = {**kwargs, "use_cache": False}
    if kwargs.get("position_ids") is None:
        x = kwargs.get("input_ids", args[0] if args else None)
        x = kwargs.get("inputs_embeds") if x is None else x
        B, T = x.shape[0], x.shape[1]
        sizes = comm.all_gather_int(T, handle.group, tag="transformers.positions")
        start = sum(sizes[:comm.group_rank(handle.group)])
        kwargs["position_ids"] = torch.arange(start, start + T, device=x.device).unsqueeze(0).expand(B, T)
    return args, kwargs


# ----------------------------------------------------------------------------------------------
# The handle and parallelize
# ----------------------------------------------------------------------------------------------
class TransformersSPHandle:
    """What :func:`parallelize` changed; ``remove()`` undoes it (also as a context manager).
    ``layers``: ``(path, {kernel: kind})`` of the delta-rule layers; ``attention``: the paths of the
    softmax-attention modules given the SP attention."""

    def __init__(self, model: nn.Module, group: Any):
        self.model, self.group = model, group
        self.layers: list[tuple[str, dict]] = []
        self.attention: list[str] = []
        self._undo: list[Callable[[], None]] = []

    _set = FLAGLAHandle._set          # set an attribute, its undo recorded (fla_gla's, no fla import)

    def remove(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()

    def __enter__(self) -> "TransformersSPHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _sp_group(group: Any) -> Any:
    if hasattr(group, "sp_group"):            # longseq.ParallelGroups
        return group.sp_group
    if hasattr(group, "get_group") and hasattr(group, "mesh_dim_names"):   # a DeviceMesh
        names = group.mesh_dim_names or ()
        return group.get_group("sp" if "sp" in names else (names[-1] if names else 0))
    return group


def parallelize(model: nn.Module, group: Any, *, method: str = "zeco", attention: str = "ulysses",
                num_blocks: Optional[int] = None, check: Any = True) -> TransformersSPHandle:
    """Make a transformers linear-attention causal LM sequence-parallel over ``group`` (a process
    group, a :class:`longseq.ParallelGroups` or a DeviceMesh with an ``"sp"`` dim): module docstring.
    ``method``: of the delta-rule layers (:data:`zeco.sp_delta.DELTA_METHODS`); ``attention``:
    ``"ulysses"`` or ``"ring"`` for the softmax layers. Raises ``ValueError`` naming what to use
    when the model has no delta-rule layer this adapter recognises. Returns the handle."""
    if method not in DELTA_METHODS:
        raise ValueError(f"parallelize: method must be one of {DELTA_METHODS}, got {method!r}")
    if attention not in ATTENTIONS:
        raise ValueError(f"parallelize: attention must be one of {ATTENTIONS}, got {attention!r}")
    sp = _sp_group(group)
    layers = find_layers(model)
    if not layers:
        raise ValueError(
            f"longseq.adapters.transformers: {type(model).__name__} has no layer with a delta-rule kernel function "
            "(transformers' use_kernelized_func layers of Gated DeltaNet / KDA models, with the `kernels` package "
            "installed). For fla models use longseq.adapters.fla_delta (delta rule) or fla_gla (GLA family); for "
            "softmax-only models longseq.sp.parallelize with method='ulysses' / 'ring'")
    spec = dict(group=sp, method=method, num_blocks=num_blocks, check=check, attention=attention)
    h = TransformersSPHandle(model, sp)
    try:
        for path, layer, kinds in layers:
            for name, kind in kinds.items():
                wrapper = layer._kernel_funcs[name]
                fn = {"delta_chunk": _delta_forward, "delta_recurrent": _recurrent_refused,
                      "conv": _conv_forward}.get(kind)
                if fn is not None:    # a bound method, as kernels.kernelize binds its kernels
                    h._set(wrapper, "forward", types.MethodType(functools.partial(_bound, fn, spec), wrapper))
            h.layers.append((path, kinds))
        for path, mod in model.named_modules():
            if hasattr(mod, "is_causal") and hasattr(mod, "config") and not isinstance(mod, type(model)) and \
                    not any(path == p or path.startswith(p + ".") for p, _ in h.layers):
                h._set(mod, _SPEC, spec)
                h.attention.append(path)
        if h.attention:
            _register_attention()
            old = model.config._attn_implementation
            model.set_attn_implementation(ATTENTION_IMPLEMENTATION)
            h._undo.append(lambda: model.set_attn_implementation(old))
        hook = model.register_forward_pre_hook(lambda m, a, k: _model_pre_hook(h, m, a, k), with_kwargs=True)
        h._undo.append(hook.remove)
    except BaseException:
        h.remove()
        raise
    return h


