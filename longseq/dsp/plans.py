"""Ready-made DSP plans: data only, naming module paths (the models themselves are not imported).

``STDIT_PLAN`` fits ``models.stdit.STDiT`` (Open-Sora's ST-DiT family): the input video
``[B, C, T, H, W]`` is sharded along frames T; ``embed`` (per-frame patches), every
``blocks.*.spatial`` (per-frame attention, cross-attention, MLP) and ``final`` (per-frame
unpatchify) run with T sharded; every ``blocks.*.temporal`` (per-location attention over frames)
runs with the S = h·w spatial tokens sharded, reached by one all-to-all in and one out.
"""
from __future__ import annotations

from .plan import Boundary, Plan, Stage

__all__ = ["STDIT_PLAN", "PLANS"]

STDIT_PLAN = Plan(
    name="stdit",
    home="T",
    input=Boundary("B C T H W", arg=0, name="x"),
    output=Boundary("B C T H W"),
    stages=(
        ("embed", Stage("B C T H W", shard="T", out_layout="B T S C")),
        ("blocks.*.spatial", Stage("B T S C", shard="T")),
        ("blocks.*.temporal", Stage("B T S C", shard="S")),
        ("final", Stage("B T S C", shard="T", out_layout="B C T H W")),
    ),
)

PLANS = {"stdit": STDIT_PLAN}
