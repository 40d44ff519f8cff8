"""Adapters: parallel plans for models longseq did not write, applied from outside (no edits to the
third-party source).

* :mod:`longseq.adapters.latte`   — diffusers' ``LatteTransformer3DModel`` made DSP-parallel
  (``latte.parallelize(model, group)``): ``LATTE_PLAN`` in the public plan language.
* :mod:`longseq.adapters.diffusers_video` — DSP plans for diffusers' ``TransformerSpatioTemporalModel``
  (``SVD_PLAN``) and ``TransformerTemporalModel`` (``TEMPORAL_PLAN``), for ``dsp.parallelize``.
* :mod:`longseq.adapters.diffusers_dit` — DSP plans for diffusers' full-3D-attention video DiTs
  (Wan 2.x, LTX-Video, CogVideoX, HunyuanVideo): attention stages run as Ulysses / ring / USP.
  ``diffusers_video`` also holds ``UNET3D_PLAN`` and ``MOTION_PLAN`` (ModelScope / AnimateDiff UNets).
* :mod:`longseq.adapters.fla_gla` — fla's gated-linear-attention models (GLA, HGRN2, RetNet, linear
  attention; a public routing table ``LAYERS`` / ``ROUTES``): their layers routed through
  ``zeco.sp_gla`` (``fla_gla.parallelize(model, group)``), with pure-PyTorch stand-ins for fla's
  Triton-only modules and functions where Triton cannot run.
* :mod:`longseq.adapters.fla_delta` — fla's Gated DeltaNet models (``fla.models.GatedDeltaNetForCausalLM``):
  their ``GatedDeltaNet`` layers through ``zeco.sp_delta_rule`` (``fla_delta.parallelize(model, group)``).
* :mod:`longseq.adapters.transformers` — transformers' Gated DeltaNet / KDA hybrids (Qwen3-Next, Qwen3.5,
  Kimi-Linear, OLMo-Hybrid, Bailing-Hybrid): delta rule through ``zeco.sp_delta_rule``, causal convs
  with point-to-point halos, softmax attention through ``AttentionInterface``
  (``transformers.parallelize(model, group)``).

Each module imports its third-party library lazily (on first use), so ``import longseq.adapters``
costs nothing. See docs/integration.md.
"""
import importlib

__all__ = ["latte", "diffusers_video", "diffusers_dit", "fla_gla", "fla_delta", "transformers"]


def __getattr__(name):
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
