"""Per-rank compute for the simulator: FLOPs counted on the real code, or times measured on a GPU.

**FLOPs.** ``torch.utils.flop_counter.FlopCounterMode`` counts the matrix products (and attention
kernels) of one forward + backward of the real model code, run on the ``meta`` device (shapes only:
nothing is computed, so the papers' shapes cost nothing here). A rank's time is its FLOPs over
``peak_flops · mfu`` of the topology (the achieved fraction, an assumption stated in
configs/simulate/topology/*.yaml).

* ST-DiT: every method here splits the work evenly (DSP: T/P frames through the spatial stage and
  S/P locations through the temporal one; Ulysses: H/P heads of the whole sequence; Ring and
  Megatron-SP: the same attention in P blocks), so a rank does 1/P of the one-device FLOPs of the
  whole sample. The one-device FLOPs are counted at depth 1 and 2 and extended linearly to the
  model's depth (the blocks are identical). The kernels of the attentions the single-dimension
  methods distribute (``longseq.sp``'s plan: the temporal attention) are counted apart
  (``attn``): ring attention overlaps its transfers with them.
* GLA: everything but the GLA operator acts per token, so a rank's non-GLA FLOPs are those of the
  model on its own ``T/P`` tokens; the GLA operator's FLOPs are counted on ``zeco.sp_gla`` itself,
  per method and per rank role (first / middle / last), at the rank's shape, on a fake process group
  (ZeCO adds a local summary and a correction pass; LASP-1 and LASP-2 a summary), forward and
  backward separately (the forward / backward GLA kernel is the window All-Scan hides under).

**Measured.** ``python -m longseq.benchmarks.scaling --device cuda --compute-json F`` writes, for each
target of configs/simulate, the time of the same per-rank work measured on one GPU (fake process
group: the real method code at the rank's real shapes, no communication). :class:`MeasuredCompute`
reads it; entries it lacks fall back to FLOPs.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import functools
import json
from pathlib import Path
from typing import Optional

import torch

from longseq.benchmarks.workloads import Workload

__all__ = ["StditCompute", "GlaCompute", "stdit_compute", "gla_compute", "MeasuredCompute", "flops_of",
           "compute_key"]


@dataclasses.dataclass(frozen=True)
class StditCompute:
    """One rank's compute of one step (seconds, or FLOPs before conversion)."""

    fwd: float
    bwd: float
    attn_fwd: float          # of which: kernels of the attentions the baselines distribute (ring's window)
    attn_bwd: float

    @property
    def total(self) -> float:
        return self.fwd + self.bwd

    def scaled(self, k: float) -> "StditCompute":
        return StditCompute(self.fwd * k, self.bwd * k, self.attn_fwd * k, self.attn_bwd * k)


@dataclasses.dataclass(frozen=True)
class GlaCompute:
    """One rank's compute per layer (seconds, or FLOPs): the model outside the GLA operator, the
    serial GLA kernel (the overlap window) and the method's extra passes, fwd and bwd; ``head`` is
    the embedding, final norm and LM head (once per step)."""

    layers: int
    other_fwd: float
    other_bwd: float
    gla_fwd: float
    gla_bwd: float
    extra_fwd: float
    extra_bwd: float
    head_fwd: float
    head_bwd: float

    @property
    def total(self) -> float:
        per = self.other_fwd + self.other_bwd + self.gla_fwd + self.gla_bwd + self.extra_fwd + self.extra_bwd
        return self.layers * per + self.head_fwd + self.head_bwd

    def scaled(self, k: float) -> "GlaCompute":
        return GlaCompute(self.layers, *(getattr(self, f.name) * k for f in dataclasses.fields(self)[1:]))


def _count(fn, attn_patterns: tuple = ()) -> tuple[float, float, float, float]:
    """(fwd FLOPs, bwd FLOPs, attention fwd, attention bwd) of ``fn() -> loss`` then
    ``loss.backward()``; attention: the kernels of the modules matching ``attn_patterns``."""
    from torch.utils.flop_counter import FlopCounterMode

    fc = FlopCounterMode(display=False)
    with fc:
        loss = fn()
    fwd, afwd = fc.get_total_flops(), _attn(fc, attn_patterns)
    fc2 = FlopCounterMode(display=False)
    with fc2:
        loss.backward()
    # backward kernels are not attributed to modules by FlopCounterMode: twice the forward's, as
    # for any matrix product (dq, dk, dv / dS, dV)
    return float(fwd), float(fc2.get_total_flops()), float(afwd), 2.0 * float(afwd)


def _matches(pattern: str, path: str) -> bool:
    a, b = pattern.split("."), path.split(".")
    return len(a) == len(b) and all(fnmatch.fnmatchcase(y, x) for x, y in zip(a, b))


def _attn(fc, patterns: tuple) -> int:
    """Attention-kernel FLOPs (fused attention ops, or the batched matrix products that
    scaled_dot_product_attention decomposes into on the meta device; in ST-DiT only attention
    issues them) inside the modules matching ``patterns`` (paths below the model)."""
    total = 0
    for mod, counts in fc.get_flop_counts().items():
        path = mod.split(".", 1)[1] if "." in mod else ""
        if not any(_matches(p, path) for p in patterns):
            continue
        total += sum(v for k, v in counts.items() if "attention" in str(k) or str(k) == "aten.bmm")
    return total


def distributed_attentions() -> tuple:
    """Path patterns of the ST-DiT attentions the single-dimension methods distribute (ring
    attention overlaps its transfers with these kernels only): ``longseq.sp``'s plan."""
    try:
        from longseq.sp.plans import STDIT_SP_PLAN
        return tuple(STDIT_SP_PLAN.attentions)
    except ImportError:
        return ("blocks.*.temporal.attn",)


@functools.lru_cache(maxsize=None)
def _stdit_flops(preset: str, overrides: tuple, shape: tuple, depth: int) -> tuple:
    from longseq.models.stdit import STDiT, stdit_config
    d = dict(shape)
    cfg = stdit_config(preset, **dict(overrides), depth=depth)
    with torch.device("meta"):
        model = STDiT(cfg)
        x = torch.randn(d["B"], cfg.in_channels, d["T"], d["H"], d["W"])
        t = torch.rand(d["B"])
        y = torch.randn(d["B"], d["N"], cfg.caption_channels)
    return _count(lambda: model(x, t, y).float().pow(2).mean(), distributed_attentions())


def flops_of(w: Workload) -> StditCompute:
    """One-device FLOPs of one training step of an ST-DiT workload (the whole sample)."""
    depth = w.model_config().depth
    ov = tuple((k, v) for k, v in w.overrides if k != "depth")
    a = _stdit_flops(w.preset, ov, w.shape, 1)
    b = _stdit_flops(w.preset, ov, w.shape, 2)
    vals = [x + (depth - 1) * (y - x) for x, y in zip(a, b)]
    return StditCompute(*vals)


def stdit_compute(w: Workload, P: int) -> StditCompute:
    """FLOPs of one rank of ``P`` (even split of the one-device work)."""
    return flops_of(w).scaled(1.0 / P)


@functools.lru_cache(maxsize=None)
def _gla_model_flops(preset: str, overrides: tuple, B: int, T: int, layers: int) -> tuple:
    from longseq.models.gla import GLAForCausalLM, gla_config, lm_loss
    cfg = gla_config(preset, **dict(overrides), num_layers=layers)
    with torch.device("meta"):
        model = GLAForCausalLM(cfg)
        ids = torch.zeros(B, T, dtype=torch.long)
    return _count(lambda: lm_loss(model(ids), ids))


@functools.lru_cache(maxsize=None)
def _gla_op_flops(method: str, B: int, T: int, H: int, K: int, V: int, P: int, rank: int) -> tuple:
    """(fwd, bwd) FLOPs of the GLA operator on one rank: ``zeco.sp_gla`` on a fake group of P, or
    the serial ``zeco.gla.gla`` when ``method == "serial"``."""
    from longseq.zeco import gla, sp_gla
    from .fakepg import fake_world

    def run(group=None):
        with torch.device("meta"):
            q = torch.randn(B, T, H, K, requires_grad=True)
            k = torch.randn(B, T, H, K, requires_grad=True)
            v = torch.randn(B, T, H, V, requires_grad=True)
            g = torch.randn(B, T, H, K, requires_grad=True)
        if group is None:
            return _count(lambda: gla(q, k, v, g, backend="torch")[0].float().sum())
        return _count(lambda: sp_gla(q, k, v, g, group=group, method=method, check=False, backend="torch")[0]
                      .float().sum())

    if method == "serial" or P == 1:
        return run()[:2]
    with fake_world(rank, P) as grp:
        return run(grp)[:2]


def gla_compute(w: Workload, P: int, rank: int) -> GlaCompute:
    """FLOPs of rank ``rank`` of ``P`` for a GLA workload (per layer, see :class:`GlaCompute`)."""
    cfg = w.model_config()
    d = w.dims
    B, T = d["B"], d["T"] // P
    L = cfg.num_layers
    H, K, V = cfg.num_heads, cfg.head_k_dim, cfg.head_v_dim
    ov = tuple((k, v) for k, v in w.overrides if k != "num_layers")
    m1 = _gla_model_flops(w.preset, ov, B, T, 1)
    m2 = _gla_model_flops(w.preset, ov, B, T, 2)
    layer_f, layer_b = m2[0] - m1[0], m2[1] - m1[1]
    head_f, head_b = m1[0] - layer_f, m1[1] - layer_b
    # The operator's FLOPs are linear in the tokens (whole chunks) and, per rank, depend only on its
    # role in the chain (first / middle / last), not on P: count them on at most 4096 tokens and on
    # a chain of at most 3 ranks.
    Tc = 4096 if (T > 4096 and T % 4096 == 0) else T
    k_ = T / Tc
    ser_f, ser_b = (x * k_ for x in _gla_op_flops("serial", B, Tc, H, K, V, 1, 0))
    if P > 1:
        P3 = min(P, 3)
        r3 = 0 if rank == 0 else (P3 - 1 if rank == P - 1 else 1)
        op_f, op_b = (x * k_ for x in _gla_op_flops(w.method, B, Tc, H, K, V, P3, r3))
    else:
        op_f, op_b = ser_f, ser_b
    return GlaCompute(L, layer_f - ser_f, layer_b - ser_b, ser_f, ser_b, op_f - ser_f, op_b - ser_b,
                      max(head_f, 0.0), max(head_b, 0.0))


# ----------------------------------------------------------------------------------------------
# Measured on a device
# ----------------------------------------------------------------------------------------------
def compute_key(w: Workload, P: int, rank: int) -> str:
    """The key of one entry in a compute JSON: the workload at the target shape, P and the rank."""
    return json.dumps([w.family, w.method, w.preset, sorted(w.overrides), sorted(w.shape), w.precision, P, rank])


class MeasuredCompute:
    """Per-rank compute times measured on one device (``benchmarks.scaling --compute-json``)."""

    def __init__(self, path: Optional[str] = None):
        self.path = path
        self.entries: dict = {}
        self.device = None
        if path:
            blob = json.loads(Path(path).read_text())
            self.device = blob.get("device")
            self.entries = {e["key"]: e for e in blob.get("entries", [])}

    def stdit(self, w: Workload, P: int) -> Optional[StditCompute]:
        e = self.entries.get(compute_key(w, P, 0))
        if not e:
            return None
        return StditCompute(e["fwd_s"], e["bwd_s"], e.get("attn_fwd_s", 0.0), e.get("attn_bwd_s", 0.0))

    def gla(self, w: Workload, P: int, rank: int) -> Optional[GlaCompute]:
        e = self.entries.get(compute_key(w, P, rank))
        if not e:
            return None
        return GlaCompute(e["layers"], e["other_fwd_s"], e["other_bwd_s"], e["gla_fwd_s"], e["gla_bwd_s"],
                          e["extra_fwd_s"], e["extra_bwd_s"], e["head_fwd_s"], e["head_bwd_s"])
