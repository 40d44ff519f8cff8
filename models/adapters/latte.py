"""DSP for diffusers' ``LatteTransformer3DModel``, applied from outside (diffusers is not edited).

Latte is a spatial-temporal video transformer, but unlike ``models.stdit.STDiT`` its forward keeps
the activation in *folded* 3-D layouts and reshapes between them itself::

    x [B, C, T, H, W] -> (B·T, C, H, W) -> pos_embed (patches + 2-D sin-cos)     -> (B·T, S, D)
    for i:  transformer_blocks[i]            spatial: attention over the S tokens of each frame,
                                             cross-attention to the caption, MLP;  batch B·T
            reshape (B·T, S, D) -> (B·S, T, D);  i == 0 and T > 1: + temp_pos_embed  [1, T, D]
            temporal_transformer_blocks[i]   temporal: attention over the T frames of each token;
                                             batch B·S
            reshape (B·S, T, D) -> (B·T, S, D)
    final adaLN (norm_out, scale_shift_table), proj_out, unpatchify -> [B, C_out, T, H, W]

with, prepared once before the blocks: the adaLN-single timestep embedding ``[B, 6D]`` repeated
per frame for the spatial blocks (``repeat_interleave(T)``) and per token for the temporal blocks
(``repeat_interleave(S)``), the projected caption repeated per frame, and the final layer's
embedded timestep repeated per frame.

The plan (``LATTE_PLAN``, home dimension T):

* **entry** (the DSP engine's model pre-hook): the input check across the group, then this rank's
  frames ``x[:, :, t0:t1]`` (no communication). Latte then computes ``num_frame = T_r`` from the
  sharded input, so everything it repeats per frame (caption, timestep, final embedded timestep) is
  repeated ``T_r`` times and lines up with the local frames by itself; a per-frame
  ``encoder_attention_mask`` ``[B·T, ...]`` is sharded here to this rank's ``[B·T_r, ...]``.
* **spatial blocks** see ``(B·T_r, S, D)``: whole frames, run locally, no communication.
* **temporal blocks**: a pre-hook views the input ``(B·S, T_r, D)`` as ``[B, S, T_r, D]`` and
  switches (one all-to-all, ``dsp.switch``) to ``[B, S_r, T, D]`` -> ``(B·S_r, T, D)``: whole frame
  sequences for this rank's tokens. It also slices the per-token timestep argument ``(B·S, 6D)`` to
  this rank's ``(B·S_r, 6D)``. A post-hook switches the output back to ``(B·S, T_r, D)``, so
  Latte's own reshapes around the block see the layout they expect.
* **temporal position embedding**: Latte adds ``temp_pos_embed`` (``[1, video_length, D]``, indexed
  by frame) in the T-sharded layout, where this rank holds frames ``t0..t1`` only (and skips it when
  ``num_frame == 1``, i.e. on a rank holding one frame). The adapter replaces the buffer by zeros
  ``[1, 1, D]`` while parallelized (Latte's own add becomes ``+ 0``) and adds the real embedding,
  rows ``0..T-1``, in the temporal block 0 pre-hook, after the switch, where T is whole.
* **exit**: the output ``[B, C_out, T_r, H, W]`` (inside Latte's ``Transformer2DModelOutput`` or
  tuple) is all-gathered along T (tag ``dsp.exit``), or left sharded with ``gather_output=False``.

Per layer this is the DSP cost: 2 all-to-alls forward (tags ``dsp.temporal_transformer_blocks.<i>.in``
/ ``.out``), 2 backward (``.bwd``), each sending ``B·T_r·(S - S_r)·D`` elements per rank.

Not supported (each raises a clear error): Latte's own gradient checkpointing (it wraps the block
*call*, so the hooks would run again, with their collectives, during backward: checkpoint whole
layers from outside instead), an ``encoder_attention_mask`` that is not per frame (Latte itself
fails on one with batch B when T > 1), ``T > 1`` different from ``video_length`` (Latte's own
broadcast fails there too).

Usage::

    from diffusers import LatteTransformer3DModel
    from longseq.adapters import latte
    model = LatteTransformer3DModel(**cfg)                   # same weights on every rank
    handle = latte.parallelize(model, groups)                # a process group or longseq.ParallelGroups
    out = model(x, timestep=t, encoder_hidden_states=y).sample   # whole output on every rank
    ...; handle.remove()
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
import torch.nn as nn

from longseq.dsp.plan import _PARALLELIZED, Boundary, DSPHandle, Plan
from longseq.dsp.primitives import gather, switch
from longseq.sharding import check_shardable, shard_range, split_sizes

__all__ = ["LATTE_PLAN", "LatteDSPHandle", "parallelize", "tiny_config", "build"]

#: The engine-level plan: the input video is sharded along frames T at the entry and gathered
#: along T at the exit. Latte's blocks take folded activations (``(B·T) S D`` and ``(B·S) T D``),
#: which the engine's stages (named dims, no folding) cannot describe; their hooks are in
#: :class:`LatteDSPHandle`.
LATTE_PLAN = Plan(
    name="latte",
    home="T",
    input=Boundary("B C T H W", arg=0, name="hidden_states"),
    output=Boundary("B C T H W"),
    stages=(),
)

SPATIAL, TEMPORAL = "transformer_blocks", "temporal_transformer_blocks"

# Latte's forward(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
#                 enable_temporal_attentions, return_dict): positions of the arguments used here
_MASK_ARG, _TEMPORAL_ARG = (3, "encoder_attention_mask"), (4, "enable_temporal_attentions")
# BasicTransformerBlock.forward(hidden_states, attention_mask, encoder_hidden_states,
#                               encoder_attention_mask, timestep, cross_attention_kwargs, class_labels)
_BLOCK_TIMESTEP_ARG = (4, "timestep")


def tiny_config(**overrides) -> dict:
    """A tiny Latte configuration for CPU tests (dim 16 = 2 heads x 8, 2 layers, 6x6 latents with
    patch 2, i.e. S = 9 tokens per frame, 5 frames), the architecture of the released Latte
    (adaLN-single, learned sigma, GELU-tanh MLP, attention bias)."""
    cfg = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
               cross_attention_dim=16, attention_bias=True, sample_size=6, patch_size=2,
               activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
               norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=12, video_length=5)
    cfg.update(overrides)
    return cfg


def build(**overrides) -> nn.Module:
    """``diffusers.LatteTransformer3DModel(**tiny_config(**overrides))``."""
    from diffusers import LatteTransformer3DModel
    return LatteTransformer3DModel(**tiny_config(**overrides))


def _arg(args: tuple, kwargs: dict, where: tuple[int, str], default: Any = None) -> Any:
    i, name = where
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _replace_arg(args: tuple, kwargs: dict, where: tuple[int, str], value: Any) -> tuple[tuple, dict]:
    i, name = where
    if len(args) > i:
        return (*args[:i], value, *args[i + 1:]), kwargs
    return args, {**kwargs, name: value}


def _check_model(model: nn.Module) -> None:
    need = [SPATIAL, TEMPORAL, "temp_pos_embed", "config"]
    missing = [n for n in need if not hasattr(model, n)]
    if missing:
        raise TypeError(f"latte.parallelize: {type(model).__name__} is not a diffusers LatteTransformer3DModel "
                        f"(it has no {', '.join(missing)})")
    if len(getattr(model, SPATIAL)) != len(getattr(model, TEMPORAL)):
        raise ValueError(f"latte.parallelize: {len(getattr(model, SPATIAL))} spatial but "
                         f"{len(getattr(model, TEMPORAL))} temporal blocks")


class LatteDSPHandle(DSPHandle):
    """The DSP engine's handle (entry, input check, ``remove()``, ``shard_target``, context manager)
    with Latte's block hooks (module docstring). ``blocks`` lists ``(path, kind)`` of the hooked
    blocks; ``whole_sizes`` holds B, T and S of the last forward."""

    def __init__(self, model: nn.Module, group: Any, *, gather_output: bool = True, check_inputs: Any = True):
        _check_model(model)
        self.blocks: list[tuple[str, str]] = []
        self._temp_pos: Optional[torch.Tensor] = None
        super().__init__(model, group, LATTE_PLAN, gather_output=gather_output, check_inputs=check_inputs)

    # -- set-up / tear-down ---------------------------------------------------------------
    def _install(self) -> None:
        m = self.model
        # Latte's own temporal position add becomes "+ 0" (a [1, 1, D] zero broadcasts to any
        # number of local frames); the real embedding is added where T is whole (temporal pre-hook).
        self._temp_pos = m.temp_pos_embed
        m.temp_pos_embed = torch.zeros(1, 1, self._temp_pos.shape[-1], dtype=self._temp_pos.dtype,
                                       device=self._temp_pos.device)
        self._hooks.append(m.register_forward_pre_hook(self._enter, with_kwargs=True))
        self._hooks.append(m.register_forward_hook(self._exit))
        for i, blk in enumerate(getattr(m, SPATIAL)):
            path = f"{SPATIAL}.{i}"
            self._hooks.append(blk.register_forward_pre_hook(self._spatial_pre(path), with_kwargs=True))
            self.blocks.append((path, "spatial"))
        for i, blk in enumerate(getattr(m, TEMPORAL)):
            path = f"{TEMPORAL}.{i}"
            self._hooks.append(blk.register_forward_pre_hook(self._temporal_pre(i, path), with_kwargs=True))
            self._hooks.append(blk.register_forward_hook(self._temporal_post(path), with_kwargs=True))
            self.blocks.append((path, "temporal"))

    def remove(self) -> None:
        """Take the hooks off and put Latte's temporal position embedding back."""
        super().remove()
        if self._temp_pos is not None:
            cur = self.model.temp_pos_embed        # follows model.to(...) made while parallelized
            self.model.temp_pos_embed = self._temp_pos.to(device=cur.device, dtype=cur.dtype)
            self._temp_pos = None

    # -- entry / exit ---------------------------------------------------------------------
    def _enter(self, module, args, kwargs):
        x = _arg(args, kwargs, (0, "hidden_states"))
        if not isinstance(x, torch.Tensor) or x.dim() != 5:
            raise TypeError("latte: the model's input hidden_states must be a [B, C, T, H, W] tensor, got "
                            + (f"shape {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__))
        if module.gradient_checkpointing and torch.is_grad_enabled():
            raise NotImplementedError(
                "latte.parallelize: Latte's gradient checkpointing re-runs the block calls (and so the DSP "
                "hooks and their all-to-alls) during backward; call model.disable_gradient_checkpointing() "
                "and checkpoint whole layers' forward from outside instead")
        B, _, T, H, W = x.shape
        p = module.config.patch_size
        S = (H // p) * (W // p)
        temporal = bool(_arg(args, kwargs, _TEMPORAL_ARG, True))
        L = self._temp_pos.shape[1]
        if temporal and T > 1 and T != L:
            raise ValueError(f"latte: the input has T={T} frames but the model's temporal position embedding "
                             f"has video_length={L} rows; Latte adds it to all frames, so T must be {L} (or 1)")
        if temporal:
            check_shardable(S, self.size, f"S (the {H // p}x{W // p} patch grid of the model's input, shape "
                                          f"{list(x.shape)}, patch {p})")
        mask = _arg(args, kwargs, _MASK_ARG)
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape[0] != B * T):
            raise ValueError(
                "latte: encoder_attention_mask must be per frame, [B·T, N] or [B·T, 1, N] "
                f"(B·T = {B * T}), got {list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}; "
                "Latte's spatial blocks (batch B·T) use it as it is")
        args, kwargs = super()._enter(module, args, kwargs)    # input check, this rank's frames
        self.whole_sizes.update(B=B, S=S)
        if mask is not None:
            t0, t1 = shard_range(T, self.size, self.rank)
            local = mask.reshape(B, T, *mask.shape[1:]).narrow(1, t0, t1 - t0)
            args, kwargs = _replace_arg(args, kwargs, _MASK_ARG, local.reshape(B * (t1 - t0), *mask.shape[1:]))
        return args, kwargs

    def _exit(self, module, args, out):
        self._active = False
        if isinstance(out, tuple):
            sample, rebuild = out[0], (lambda s: (s, *out[1:]))
        elif hasattr(out, "sample"):
            sample = out.sample
            rebuild = ((lambda s: dataclasses.replace(out, sample=s)) if dataclasses.is_dataclass(out)
                       else (lambda s: type(out)(sample=s)))
        else:
            raise TypeError(f"latte: unexpected model output {type(out).__name__}")
        self._expect_local(sample, self.plan.output.layout, "T", "the model's output")
        if not self.gather_output:
            return out
        return rebuild(gather(sample, 2, self.group, self.whole_sizes["T"], tag="dsp.exit", check=False))

    # -- blocks ---------------------------------------------------------------------------
    def _require_active(self, path: str) -> None:
        if not self._active:
            raise RuntimeError(f"DSP: block {path!r} was called outside a forward of the parallelized Latte model "
                               "(its hooks need the sizes recorded at the model's input; call handle.remove() first)")

    def _local(self, n: int) -> int:
        return split_sizes(n, self.size)[self.rank]

    def _spatial_pre(self, path: str):
        def hook(module, args, kwargs):
            self._require_active(path)
            x = _arg(args, kwargs, (0, "hidden_states"))
            ws = self.whole_sizes
            want = (ws["B"] * self._local(ws["T"]), ws["S"])
            if tuple(x.shape[:2]) != want:
                raise RuntimeError(f"DSP latte: {path} got {list(x.shape)}, expected (B·T_r, S, D) = {want} + (D,)")
            return None

        return hook

    def _temporal_pre(self, i: int, path: str):
        def hook(module, args, kwargs):
            self._require_active(path)
            ws = self.whole_sizes
            B, T, S = ws["B"], ws["T"], ws["S"]
            Tr = self._local(T)
            s0, s1 = shard_range(S, self.size, self.rank)
            x = _arg(args, kwargs, (0, "hidden_states"))
            D = x.shape[-1]
            if tuple(x.shape) != (B * S, Tr, D):
                raise RuntimeError(f"DSP latte: {path} got {list(x.shape)}, expected (B·S, T_r, D) = "
                                   f"{[B * S, Tr, D]}")
            # (B·S, T_r, D) -> [B, S, T_r, D] -> switch: S sharded, T whole -> (B·S_r, T, D)
            y = switch(x.reshape(B, S, Tr, D), self.group, 1, 2, T, tag=f"dsp.{path}.in", check=False)
            if i == 0 and T > 1:   # Latte: `if i == 0 and num_frame > 1: + temp_pos_embed`, frames 0..T-1
                y = y + self._temp_pos[:, :T].to(device=y.device, dtype=y.dtype)[:, None]
            args, kwargs = _replace_arg(args, kwargs, (0, "hidden_states"), y.reshape(B * (s1 - s0), T, D))
            ts = _arg(args, kwargs, _BLOCK_TIMESTEP_ARG)
            if isinstance(ts, torch.Tensor):   # repeated per token, (B·S, ...): keep this rank's tokens
                if ts.shape[0] != B * S:
                    raise RuntimeError(f"DSP latte: {path}'s timestep has shape {list(ts.shape)}, expected "
                                       f"(B·S, ...) with B·S = {B * S}")
                ts = ts.reshape(B, S, *ts.shape[1:]).narrow(1, s0, s1 - s0).reshape(B * (s1 - s0), *ts.shape[1:])
                args, kwargs = _replace_arg(args, kwargs, _BLOCK_TIMESTEP_ARG, ts)
            return args, kwargs

        return hook

    def _temporal_post(self, path: str):
        def hook(module, args, kwargs, out):
            if not self._active:
                return None
            ws = self.whole_sizes
            B, T, S = ws["B"], ws["T"], ws["S"]
            Sr = self._local(S)
            D = out.shape[-1]
            if tuple(out.shape) != (B * Sr, T, D):
                raise RuntimeError(f"DSP latte: {path} returned {list(out.shape)}, expected (B·S_r, T, D) = "
                                   f"{[B * Sr, T, D]}")
            # (B·S_r, T, D) -> [B, S_r, T, D] -> switch back: T sharded, S whole -> (B·S, T_r, D)
            z = switch(out.reshape(B, Sr, T, D), self.group, 2, 1, S, tag=f"dsp.{path}.out", check=False)
            return z.reshape(B * S, self._local(T), D)

        return hook


def parallelize(model: nn.Module, group: Any, *, gather_output: bool = True, check_inputs: Any = True) -> LatteDSPHandle:
    """Make a diffusers ``LatteTransformer3DModel`` DSP-parallel over ``group`` (a process group or a
    ``longseq.ParallelGroups``), in place, by hooks; returns the handle (``remove()`` undoes it).

    ``gather_output`` and ``check_inputs`` as in :func:`dsp.parallelize`: the output (``.sample``)
    is the whole video on every rank, or with ``gather_output=False`` this rank's frames
    (``handle.shard_target(noise)`` gives the matching piece of a target). Every rank of the group
    must call it with the same weights. Gradients follow longseq's convention: call
    ``longseq.sync_gradients`` after backward.
    """
    if model in _PARALLELIZED:
        raise ValueError("this model is already parallelized by DSP; call .remove() on its handle first")
    handle = LatteDSPHandle(model, group, gather_output=gather_output, check_inputs=check_inputs)
    _PARALLELIZED[model] = handle
    return handle
