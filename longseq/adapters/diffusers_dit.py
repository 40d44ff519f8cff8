"""DSP plans for diffusers' full-3D-attention video DiTs: Wan 2.x, LTX-Video, CogVideoX, HunyuanVideo.

These models attend over all T·H·W tokens of a video at once, so no stage runs locally under a
switch: the activation stays sharded along frames T (home) from the entry to the exit, every
per-token layer (patch embedding per frame, adaLN, MLP, cross-attention to the text, unpatchify)
runs on this rank's frames, and each self-attention is an attention stage
(``Stage(attention=True)``): its SDPA call runs as Ulysses, ring or USP over the group
(``dsp.parallelize(..., attention="ring")``), each rank holding ``T_r·H·W`` tokens, with the
model's own attention processor unchanged (:mod:`longseq.dsp.full_attention`). Frame counts need
not divide by P.

* ``WAN_PLAN`` — ``WanTransformer3DModel``: input ``[B, C, T, H, W]``; its ``rope`` builds the
  RoPE table from the input's shape: a table stage (sees the whole shape, keeps this rank's rows).
* ``LTX_PLAN`` — ``LTXVideoTransformer3DModel``: input tokens ``[B, T·H·W, C]`` with
  ``num_frames``, ``height``, ``width`` (T rewritten to this rank's frames); ``rope`` is a table
  stage told the whole ``num_frames``.
* ``COGVIDEOX_PLAN`` — ``CogVideoXTransformer3DModel`` with RoPE (CogVideoX 1.5 / 5B style):
  input ``[B, T, C, H, W]``; the pipeline's ``image_rotary_emb`` (cos, sin) ``[T·S, D]`` is cut to
  this rank's rows at the entry; the attention is joint: text tokens first (``Joint(at="start")``).
* ``HUNYUAN_PLAN`` — ``HunyuanVideoTransformer3DModel``: the dual- and single-stream blocks'
  attentions are joint with the text last (``Joint(at="end")``); a text padding mask is honoured
  by Ulysses.

Usage: ``dsp.parallelize(model, groups, diffusers_dit.WAN_PLAN, attention="ulysses")``; the
output is gathered (``.sample``), or this rank's frames with ``gather_output=False``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from longseq.dsp import Boundary, Joint, Plan, Stage

__all__ = ["WAN_PLAN", "LTX_PLAN", "COGVIDEOX_PLAN", "HUNYUAN_PLAN", "PLANS", "build", "sample_inputs"]

WAN_PLAN = Plan(
    name="wan", home="T",
    input=Boundary("B C T H W", name="hidden_states"), output=Boundary("B C T H W", name="sample", arg=0),
    stages=(("rope", Stage("B C T H W", shard=None, table=True, out_layout="A (T S) E D", out=(0, 1))),
            ("blocks.*.attn1", Stage("B (T S) C", shard="T", attention=True))))

LTX_PLAN = Plan(
    name="ltx-video", home="T",
    input=Boundary("B (T H W) C", name="hidden_states"), output=Boundary("B (T H W) C", name="sample", arg=0),
    kwargs={"num_frames": "T", "height": "H", "width": "W"},
    stages=(("rope", Stage("B (T H W) C", shard=None, table=True, out_layout="B (T H W) D", out=(0, 1),
                           kwargs={"num_frames": "T"})),
            ("transformer_blocks.*.attn1", Stage("B (T H W) C", shard="T", attention=True))))

COGVIDEOX_PLAN = Plan(
    name="cogvideox", home="T",
    input=(Boundary("B T C H W", name="hidden_states"), Boundary("(T S) D", name="image_rotary_emb")),
    output=Boundary("B T C H W", name="sample", arg=0),
    stages=(("transformer_blocks.*.attn1", Stage("B (T S) C", shard="T", attention=Joint(at="start"))),))

HUNYUAN_PLAN = Plan(
    name="hunyuan-video", home="T",
    input=Boundary("B C T H W", name="hidden_states"), output=Boundary("B C T H W", name="sample", arg=0),
    stages=(("rope", Stage("B C T H W", shard=None, table=True, out_layout="(T S) D", out=(0, 1))),
            ("transformer_blocks.*.attn", Stage("B (T S) C", shard="T", attention=Joint(at="end"))),
            ("single_transformer_blocks.*.attn", Stage("B (T S) C", shard="T", attention=Joint(at="end")))))

PLANS = {"wan": WAN_PLAN, "ltx": LTX_PLAN, "cogvideox": COGVIDEOX_PLAN, "hunyuan": HUNYUAN_PLAN}

# Tiny random-weight configurations for CPU tests and benchmarks: 6 heads x 12 (Ulysses divides the
# heads at P = 2 and 3), one or two layers, a 4x4 latent with 2x2 patches (S = 4 tokens per frame).
_TINY = {
    "wan": ("WanTransformer3DModel", dict(patch_size=(1, 2, 2), num_attention_heads=6, attention_head_dim=12,
                                          in_channels=4, out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32,
                                          num_layers=2, rope_max_seq_len=32)),
    "ltx": ("LTXVideoTransformer3DModel", dict(in_channels=8, out_channels=8, num_attention_heads=6,
                                               attention_head_dim=12, cross_attention_dim=72, num_layers=2,
                                               caption_channels=16)),
    "cogvideox": ("CogVideoXTransformer3DModel", dict(num_attention_heads=6, attention_head_dim=12, in_channels=4,
                                                      out_channels=4, time_embed_dim=16, text_embed_dim=16,
                                                      num_layers=2, sample_width=4, sample_height=4,
                                                      sample_frames=9, patch_size=2, max_text_seq_length=3,
                                                      use_rotary_positional_embeddings=True)),
    "hunyuan": ("HunyuanVideoTransformer3DModel", dict(in_channels=4, out_channels=4, num_attention_heads=6,
                                                       attention_head_dim=12, num_layers=1, num_single_layers=1,
                                                       num_refiner_layers=1, patch_size=2, patch_size_t=1,
                                                       guidance_embeds=False, text_embed_dim=16,
                                                       pooled_projection_dim=8, rope_axes_dim=(4, 4, 4))),
}


def build(name: str, **overrides) -> nn.Module:
    """A tiny random-weight diffusers model of ``name`` (a key of ``PLANS``) for CPU tests."""
    import diffusers
    cls, cfg = _TINY[name]
    return getattr(diffusers, cls)(**{**cfg, **overrides})


def sample_inputs(name: str, frames: int = 5, batch: int = 2, *, seed: int = 1, dtype: torch.dtype = torch.float64,
                  text_mask: bool = True, text: int = 3) -> dict:
    """Keyword inputs for :func:`build`'s tiny ``name``: a ``frames``-frame 4x4 latent (S = 4 tokens a
    frame after the 2x2 patches), ``text`` text tokens (the first sample's last one padded where the
    model takes a text mask and ``text_mask``), timesteps 3 and 7."""
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=dtype)
    B, T = batch, frames
    t = torch.tensor([3, 7] * B)[:B]
    N = text
    mask = torch.ones(B, N, dtype=torch.long)
    if text_mask:
        mask[0, N - 1] = 0
    if name == "wan":
        return dict(hidden_states=r(B, 4, T, 4, 4), timestep=t, encoder_hidden_states=r(B, N, 16))
    if name == "ltx":
        return dict(hidden_states=r(B, T * 4, 8), encoder_hidden_states=r(B, N, 16), timestep=t,
                    encoder_attention_mask=mask, num_frames=T, height=2, width=2)
    if name == "cogvideox":
        return dict(hidden_states=r(B, T, 4, 4, 4), encoder_hidden_states=r(B, N, 16), timestep=t,
                    image_rotary_emb=(r(T * 4, 12), r(T * 4, 12)))
    return dict(hidden_states=r(B, 4, T, 4, 4), timestep=t, encoder_hidden_states=r(B, N, 16),
                encoder_attention_mask=mask, pooled_projections=r(B, 8))
