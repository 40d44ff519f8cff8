"""DSP plans for diffusers' spatio-temporal transformer modules, in the public plan language.

* ``SVD_PLAN`` — ``TransformerSpatioTemporalModel`` (Stable Video Diffusion's UNet blocks).
  Inputs folded by frame: ``hidden_states (B·T, C, H, W)``, per-frame ``encoder_hidden_states
  (B·T, N, E)`` and ``image_only_indicator [B, T]``, all sharded along T at the entry (the model
  reads ``num_frames`` from the indicator, so it sees this rank's T_r). Spatial blocks
  ``(B·T_r, S, C)`` run locally; each temporal block takes ``(B·T, S, C)`` and
  ``num_frames=``: the engine switches it to ``(B·T, S_r, C)`` (unfold, all-to-all, refold) and
  tells it the whole T. Two things the model builds from local sizes are put right: the frame
  index ``arange(num_frames)`` fed to ``time_proj`` gets this rank's offset
  (:func:`dsp.offset_positions`), and the temporal blocks' context, which the model takes from
  frame 0 of what it holds, is frame 0 of the whole input (``first_frame_context``).
* ``TEMPORAL_PLAN`` — ``TransformerTemporalModel`` (AnimateDiff / text-to-video UNets' temporal
  layers): ``hidden_states (B·T, C, H, W)`` with ``num_frames=T`` (rewritten to T_r), sharded
  along T; its GroupNorm takes statistics over T, H and W, so it runs whole (``shard=None``: one
  all-gather in, backward a reduce-scatter); its blocks ``(B·H·W, T, C)`` attend over frames, so
  they run with the image rows H sharded (one switch in, one out).

* ``UNET3D_PLAN`` — ``UNet3DConditionModel`` (ModelScope text-to-video) and ``MOTION_PLAN`` —
  ``UNetMotionModel`` (AnimateDiff): the whole UNet at the DSP minimum, no whole stage. Home T:
  resnets, spatial transformers, down / up sampling run per frame on this rank's frames. Their
  temporal layers: every GroupNorm whose statistics span T (the temporal convolutions' and the
  temporal transformers') is a statistics stage (one all-reduce of ``[B, G, 2]`` sums); every
  temporal Conv3d (kernel 3 across frames) a halo stage (one row from each neighbour, point to
  point); every temporal transformer block ``(B·S, T, C)`` runs with the spatial tokens S sharded
  (one switch in, one out). S changes from level to level (``varying=("S",)``), and ``**`` in a
  path matches any depth, so one line serves every level.

Usage: ``dsp.parallelize(model, groups, diffusers_video.SVD_PLAN)`` (output ``.sample`` or
``[0]``, gathered, or this rank's frames with ``gather_output=False`` and ``handle.shard_target``).
"""
from __future__ import annotations

import torch.nn as nn

from longseq import dsp
from longseq.dsp import Boundary, Plan, Stage
from longseq.optional import require

__all__ = ["SVD_PLAN", "TEMPORAL_PLAN", "UNET3D_PLAN", "MOTION_PLAN", "first_frame_context", "build_svd",
           "build_temporal", "build_unet3d", "build_motion"]


def first_frame_context(handle: dsp.DSPHandle, path: str, call: dsp.Call) -> None:
    """The temporal blocks' ``encoder_hidden_states``: frame 0's states of the whole input, once per
    token this rank holds (``(B·S_r, N, E)``, b-major like the switched activation)."""
    ehs = handle.inputs["encoder_hidden_states"]
    first = ehs.reshape(handle.whole("B"), handle.whole("T"), *ehs.shape[1:])[:, 0]
    call["encoder_hidden_states"] = first.repeat_interleave(handle.local("S"), dim=0)


SVD_PLAN = Plan(
    name="svd", home="T",
    input=(Boundary("(B T) C H W", name="hidden_states"), Boundary("(B T) N E", name="encoder_hidden_states"),
           Boundary("B T", name="image_only_indicator")),
    output=Boundary("(B T) C H W", name="sample", arg=0),
    stages=(("time_proj", Stage("(B T)", shard="T", out_layout="(B T) C", pre=dsp.offset_positions("T"))),
            ("transformer_blocks.*", Stage("(B T) S C", shard="T")),
            ("temporal_transformer_blocks.*", Stage("(B T) S C", shard="S", kwargs={"num_frames": "T"},
                                                    pre=first_frame_context))))

TEMPORAL_PLAN = Plan(
    name="diffusers-temporal", home="T",
    input=Boundary("(B T) C H W", name="hidden_states"), output=Boundary("(B T) C H W", name="sample", arg=0),
    kwargs={"num_frames": "T"},
    stages=(("norm", Stage("B C T H W", shard=None)),
            ("transformer_blocks.*", Stage("(B H W) T C", shard="H"))))


def _temporal_module():
    return require("diffusers.models.transformers.transformer_temporal", extra="diffusers",
                   what="longseq.adapters.diffusers_video (diffusers' video transformers)")


UNET3D_PLAN = Plan(
    name="unet3d", home="T", varying=("S",),
    input=Boundary("B C T H W", name="sample"), output=Boundary("B C T H W", name="sample", arg=0),
    stages=(("**.temp_convs.*.conv?.0", Stage("B C T H W", shard="T", stats=True)),      # GroupNorm over T, H, W
            ("**.temp_convs.*.conv1.2", Stage("B C T H W", shard="T", halo=1)),          # Conv3d (3, 1, 1)
            ("**.temp_convs.*.conv[234].3", Stage("B C T H W", shard="T", halo=1)),
            ("transformer_in.norm", Stage("B C T H W", shard="T", stats=True)),
            ("transformer_in.transformer_blocks.*", Stage("(B S) T C", shard="S")),
            ("**.temp_attentions.*.norm", Stage("B C T H W", shard="T", stats=True)),
            ("**.temp_attentions.*.transformer_blocks.*", Stage("(B S) T C", shard="S"))))

MOTION_PLAN = Plan(
    name="animatediff", home="T", varying=("S",),
    input=(Boundary("B C T H W", name="sample"), Boundary("(B T) N E", name="encoder_hidden_states")),
    output=Boundary("B C T H W", name="sample", arg=0),
    stages=(("**.motion_modules.*.norm", Stage("B C T H W", shard="T", stats=True)),
            ("**.motion_modules.*.transformer_blocks.*", Stage("(B S) T C", shard="S"))))


def build_unet3d(**overrides) -> nn.Module:
    """A tiny ``UNet3DConditionModel`` for CPU tests (two levels of 8 and 16 channels in 4 groups,
    one layer a block, an 8x8 latent: S = 64 and 16 tokens a frame at the two levels)."""
    from diffusers import UNet3DConditionModel
    cfg = dict(sample_size=8, in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
               up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), block_out_channels=(8, 16), layers_per_block=1,
               norm_num_groups=4, cross_attention_dim=8, attention_head_dim=4)
    return UNet3DConditionModel(**{**cfg, **overrides})


def build_motion(**overrides) -> nn.Module:
    """A tiny ``UNetMotionModel`` (AnimateDiff) for CPU tests, the same shape as :func:`build_unet3d`."""
    from diffusers import UNetMotionModel
    cfg = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
               down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"), norm_num_groups=4,
               up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"), cross_attention_dim=8,
               num_attention_heads=2, motion_num_attention_heads=2, motion_max_seq_length=8)
    return UNetMotionModel(**{**cfg, **overrides})


def build_svd(**overrides) -> nn.Module:
    """A tiny ``TransformerSpatioTemporalModel`` for CPU tests (2 heads x 16 = 32 channels: its
    GroupNorm has 32 groups and its frame embedding adds in_channels to the inner dim; 1 layer,
    cross-attention dim 12)."""
    TransformerSpatioTemporalModel = _temporal_module().TransformerSpatioTemporalModel
    cfg = dict(num_attention_heads=2, attention_head_dim=16, in_channels=32, num_layers=1, cross_attention_dim=12)
    return TransformerSpatioTemporalModel(**{**cfg, **overrides})


def build_temporal(**overrides) -> nn.Module:
    """A tiny ``TransformerTemporalModel`` for CPU tests (2 heads x 8, 8 channels in 4 groups, 2 layers)."""
    TransformerTemporalModel = _temporal_module().TransformerTemporalModel
    cfg = dict(num_attention_heads=2, attention_head_dim=8, in_channels=8, norm_num_groups=4, num_layers=2)
    return TransformerTemporalModel(**{**cfg, **overrides})
