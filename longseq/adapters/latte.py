"""DSP for diffusers' ``LatteTransformer3DModel``: a plan in the public plan language.

Latte keeps its activation *folded* and reshapes between the layouts itself::

    x [B, C, T, H, W] -> pos_embed -> (B·T, S, D)
    for i:  transformer_blocks[i]             (B·T, S, D): attention over each frame's S tokens
            -> (B·S, T, D); i == 0 and T > 1: + temp_pos_embed [1, T, D]
            temporal_transformer_blocks[i]    (B·S, T, D): attention over each token's T frames
            -> (B·T, S, D)
    norm_out, proj_out, unpatchify -> [B, C_out, T, H, W]   (.sample, or [0] with return_dict=False)

``LATTE_PLAN`` (home T): the entry keeps this rank's frames of the video and of a per-frame
``encoder_attention_mask`` ``(B·T, ...)``; Latte reads ``num_frame`` from the sharded input, so the
caption and timestep it repeats per frame line up by themselves. The spatial blocks run on whole
frames; around each temporal block the engine unfolds ``(B·S, T_r, D)`` to ``[B, S, T_r, D]``,
switches to ``[B, S_r, T, D]`` and refolds (2 all-to-alls forward, 2 backward, each
``B·T_r·(S-S_r)·D`` elements per rank), and cuts the per-token timestep ``(B·S, 6D)`` to this
rank's tokens. One :class:`TemporalPositions` extension: Latte adds ``temp_pos_embed`` (indexed by
frame) where T is sharded, and skips it on a rank holding one frame; while parallelized the buffer
is a broadcastable zero and the real rows ``0..T-1`` are added before temporal block 0, where T
is whole. Refused (clear errors): Latte's own gradient checkpointing (it re-runs the block calls,
and so the all-to-alls, in backward), ``T > 1`` other than ``video_length``, a mask that is not per
frame, S < P.

Usage::

    model = LatteTransformer3DModel(**cfg)                   # same weights on every rank
    handle = latte.parallelize(model, groups)                # or dsp.parallelize(model, groups, latte.LATTE_PLAN)
    out = model(x, timestep=t, encoder_hidden_states=y).sample
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from longseq import dsp
from longseq.dsp import Boundary, Plan, Stage
from longseq.optional import require

__all__ = ["LATTE_PLAN", "TemporalPositions", "parallelize", "tiny_config", "build"]


class TemporalPositions(dsp.Extension):
    """Latte's frame-indexed ``temp_pos_embed``, added where T is whole (module docstring)."""

    def __init__(self):
        self.pos: dict = {}                         # handle -> the model's real buffer

    def install(self, handle):
        m = handle.model
        self.pos[handle] = m.temp_pos_embed
        m.temp_pos_embed = m.temp_pos_embed.new_zeros(1, 1, m.temp_pos_embed.shape[-1])

    def remove(self, handle):
        cur = handle.model.temp_pos_embed            # follows model.to(...) made while parallelized
        handle.model.temp_pos_embed = self.pos.pop(handle).to(device=cur.device, dtype=cur.dtype)

    def enter(self, handle, call):
        x, T, L = call["hidden_states"], call["hidden_states"].shape[2], self.pos[handle].shape[1]
        if handle.model.gradient_checkpointing and torch.is_grad_enabled():
            raise NotImplementedError("latte: Latte's gradient checkpointing re-runs the block calls (and the DSP "
                                      "all-to-alls) in backward; disable it and checkpoint layers from outside")
        if call["enable_temporal_attentions"] and T > 1 and T != L:
            raise ValueError(f"latte: the input has T={T} frames but temp_pos_embed has video_length={L} rows "
                             f"(shape {list(x.shape)}); Latte adds it to all frames, so T must be {L} (or 1)")

    def before(self, handle, path, call):
        if path == "temporal_transformer_blocks.0" and handle.whole("T") > 1:
            x = call["hidden_states"]
            pos = self.pos[handle][:, :handle.whole("T")]
            call["hidden_states"] = x + pos.to(device=x.device, dtype=x.dtype)


LATTE_PLAN = Plan(
    name="latte", home="T",
    input=(Boundary("B C T H W", name="hidden_states"), Boundary("(B T) ...", name="encoder_attention_mask")),
    output=Boundary("B C T H W", name="sample", arg=0),
    stages=(("transformer_blocks.*", Stage("(B T) S C", shard="T")),
            ("temporal_transformer_blocks.*", Stage("(B S) T C", shard="S", args={"timestep": "(B S) C"}))),
    extensions=(TemporalPositions(),))


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
    diffusers = require("diffusers", extra="diffusers", what="longseq.adapters.latte (diffusers' Latte)")
    return diffusers.LatteTransformer3DModel(**tiny_config(**overrides))


def parallelize(model: nn.Module, group: Any, **options) -> dsp.DSPHandle:
    """``dsp.parallelize(model, group, LATTE_PLAN, **options)`` for a diffusers
    ``LatteTransformer3DModel`` (options as in :func:`dsp.parallelize`)."""
    if not hasattr(model, "temp_pos_embed"):
        raise TypeError(f"latte.parallelize: {type(model).__name__} is not a diffusers LatteTransformer3DModel")
    return dsp.parallelize(model, group, LATTE_PLAN, **options)
