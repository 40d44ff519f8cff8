"""Factorized video UNets of diffusers (``UNet3DConditionModel``, ``UNetMotionModel``) made
DSP-parallel by their shipped plans (longseq.adapters.diffusers_video) equal one process, at the
DSP minimum: no whole stage; every temporal GroupNorm all-reduces its ``[B, G, 2]`` sums, every
temporal Conv3d gets one row from each neighbour point to point, every temporal transformer block
is switched in and out, and nothing else moves but the entry check and the exit gather.

Tiny models (two levels of 8 and 16 channels, an 8x8 latent: S = 64 and 16 tokens a frame), B = 2,
T = 5 frames (3/2 at P = 2, 2/2/1 at P = 3), float64, eval mode (the temporal convolutions'
dropout off), every parameter re-initialised N(0, 0.1²) and every gradient asserted nonzero.
Output, input gradient and every parameter gradient: ``max|a-b| <= 1e-10 * max|ref|`` per tensor.
The expected ledger is computed from the stage modules' whole input shapes (recorded in the
one-process run) by the formulas of docs/writing_a_plan.md, section 8.
"""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

pytest.importorskip("diffusers")

import longseq  # noqa: E402
from longseq import dsp  # noqa: E402
from longseq.ledger import LEDGER  # noqa: E402
from longseq.sharding import split_sizes  # noqa: E402

from .tensor_checks import param_grads  # noqa: E402

RTOL = 1e-10
B, T = 2, 5


def _setup(kind):
    from longseq.adapters import diffusers_video as dv
    from longseq.models.stdit import init_for_testing
    model = init_for_testing(dv.build_unet3d() if kind == "unet3d" else dv.build_motion(), std=0.1, seed=0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 4, T, 8, 8, generator=g, dtype=torch.float64)
    ehs = torch.randn(B if kind == "unet3d" else B * T, 2, 8, generator=g, dtype=torch.float64)
    plan = dv.UNET3D_PLAN if kind == "unet3d" else dv.MOTION_PLAN
    return model.double().eval(), x, dict(timestep=torch.tensor([3, 7]), encoder_hidden_states=ehs), plan


def _step(model, x, kw, target):
    x = x.detach().clone().requires_grad_(True)
    out = model(x, **kw).sample
    F.mse_loss(out, target).backward()
    return out.detach(), x.grad


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-9))


def _run(kind, plan_override=None):
    W = dist.group.WORLD
    groups = longseq.from_existing_groups(W)
    model, x, kw, plan = _setup(kind)
    plan = plan_override or plan
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    handle = dsp.parallelize(model, None, plan)           # one rank: the stages' whole input shapes
    shapes, hooks = {}, []
    def record(path, st):
        def hook(m, a, kw):
            x = a[0] if a else next(iter(kw.values()))
            shapes.setdefault(path, (tuple(x.shape), st, getattr(m, "num_groups", 0)))
        return hook
    for path, mod, st in handle.stages:
        hooks.append(mod.register_forward_pre_hook(record(path, st), with_kwargs=True))
    handle.remove()
    ref_out, ref_dx = _step(model, x, kw, target)
    for h in hooks:
        h.remove()
    ref = param_grads(model)
    model.zero_grad(set_to_none=True)
    handle = dsp.parallelize(model, groups, plan)
    with LEDGER.recording() as rec:
        out, dx = _step(model, x, kw, target)
    longseq.sync_gradients(model.parameters(), groups)
    got = param_grads(model)
    handle.remove()
    errs = {"out": _rel(out, ref_out), "dx": _rel(dx, ref_dx)}
    errs.update({k: _rel(got[k], ref[k]) for k in ref})
    return dict(errs=errs, zero=[k for k, g in ref.items() if not g.abs().sum() > 0], shapes=shapes,
                step=[(r.op, r.tag, r.elements_sent) for r in rec])


def expected(shapes, P, r):
    """{ledger tag: elements this rank sends} over one forward and backward (module docstring)."""
    t = split_sizes(T, P)
    e = {}
    for path, (shape, st, groups) in shapes.items():
        tag = f"dsp.{path}"
        if st.stats:                         # one all-reduce of [B, G, 2] each way (ring all-reduce volume)
            n = shape[0] * groups * 2
            e[tag + ".stats"] = e[tag + ".stats.bwd"] = 2 * n * (P - 1) // P
        elif any(st.halo):                   # one [B, C, 1, H, W] row to each neighbour, and back
            b, c, _, h, w = shape
            rows = (r < P - 1) + (r > 0)
            e[tag + ".halo"] = e[tag + ".halo.bwd"] = rows * b * c * h * w
        else:                                # (B S) T C: T -> S and back, each way
            bs, _, c = shape
            s = bs // B
            sr = split_sizes(s, P)[r]
            e[tag + ".in"] = e[tag + ".out.bwd"] = B * t[r] * (s - sr) * c
            e[tag + ".out"] = e[tag + ".in.bwd"] = B * (T - t[r]) * sr * c
    return e


def _check(kind, P, results):
    for r, res in enumerate(results):
        assert not res["zero"], (kind, res["zero"])
        bad = {k: v for k, v in res["errs"].items() if not v <= RTOL}
        assert not bad, (kind, P, r, bad)
        got = {}
        for op, tag, n in res["step"]:
            got[tag] = got.get(tag, 0) + n
        exp = expected(res["shapes"], P, r)
        assert not any(tag.endswith(".whole") for tag in got), got         # no whole stage
        extra = {k: v for k, v in got.items() if k not in exp}
        assert set(extra) <= {"dsp.check", "dsp.exit", "dsp.entry.bwd"}, extra
        assert {k: v for k, v in got.items() if k in exp} == exp, (kind, P, r)
        kinds = {st.stats: 0 for _, st, _ in res["shapes"].values()}
        assert len(kinds) == 2 and any(any(st.halo) for _, st, _ in res["shapes"].values()) == (kind == "unet3d")


@pytest.mark.parametrize("P", [2, 3])
def test_unets_equal_single_process_at_the_dsp_minimum(dist_pool, P):
    pool = dist_pool(P)
    for kind in ("unet3d", "motion"):
        _check(kind, P, pool.run(_run, kind))
