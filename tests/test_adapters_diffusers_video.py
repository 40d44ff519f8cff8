"""diffusers' spatio-temporal modules made DSP-parallel by plans in the public plan language
(models.adapters.diffusers_video) equal one process, forward and backward.

``TransformerSpatioTemporalModel`` (SVD_PLAN) with T = 5 frames and a 5x5 latent (S = 25 tokens:
13/12 at P = 2, 9/8/8 at P = 3), per-frame encoder states and an image-only indicator with one
image frame; ``TransformerTemporalModel`` (TEMPORAL_PLAN) with T = 5 and H = 5 rows (3/2, 2/2/1).
B = 2 (a folded batch-frame dim, wrong if the entry just split rows). Every parameter is
re-initialised N(0, 0.1²), every gradient asserted nonzero. Tolerance (float32), per tensor:
``max|a - b| <= 1e-5 * max|b| + 1e-8``. The ledger holds exactly the DSP minimum: per temporal
block two all-to-alls each way, each sending the switched activation minus the piece kept.
"""
import dataclasses
import functools
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

pytest.importorskip("diffusers")

import longseq  # noqa: E402
from longseq import dsp  # noqa: E402
from longseq.ledger import LEDGER  # noqa: E402
from longseq.sharding import split_sizes  # noqa: E402

from .tensor_checks import assert_close, param_grads  # noqa: E402

RTOL, ATOL = 1e-5, 1e-8
B, T = 2, 5


def _model(kind):
    from longseq.adapters import diffusers_video as dv
    from longseq.models.stdit import init_for_testing
    return init_for_testing(dv.build_svd() if kind == "svd" else dv.build_temporal(), std=0.1, seed=0)


def _inputs(kind, seed=1):
    """(args, kwargs, target) of one call; per-frame encoder states that differ across frames."""
    g = torch.Generator().manual_seed(seed)
    if kind == "svd":
        x = torch.randn(B * T, 32, 5, 5, generator=g)
        ind = torch.zeros(B, T)
        ind[1, 3] = 1.0                                        # one image-only frame
        kw = dict(encoder_hidden_states=torch.randn(B * T, 3, 12, generator=g), image_only_indicator=ind)
    else:   # the input's gradient is compared too: it crosses the whole GroupNorm's reduce-scatter
        x = torch.randn(B * T, 8, 5, 2, generator=g).requires_grad_(True)
        kw = dict(num_frames=T)
    return x, kw, torch.randn(x.shape, generator=g)


def _plan(kind):
    from longseq.adapters import diffusers_video as dv
    return dv.SVD_PLAN if kind == "svd" else dv.TEMPORAL_PLAN


def _run(kinds):
    W = dist.group.WORLD
    groups = longseq.from_existing_groups(W)
    res = {}
    for kind in kinds:
        model = _model(kind)
        x, kw, target = _inputs(kind)
        handle = dsp.parallelize(model, groups, _plan(kind))
        with LEDGER.recording() as rec:
            out = model(x, **kw).sample
            loss = F.mse_loss(out, target)
            loss.backward()
        longseq.sync_gradients(model.parameters(), groups)
        r = dict(out=out.detach(), loss=loss.detach(), grads=param_grads(model), x_grad=x.grad,
                 records=[(x_.op, x_.tag, x_.elements_sent, x_.elements_recv) for x_ in rec])
        handle.remove()
        model.zero_grad(set_to_none=True)
        handle = dsp.parallelize(model, groups, _plan(kind), gather_output=False)   # tuple output, sharded loss
        piece = model(x.detach(), **kw, return_dict=False)[0]
        loss = dsp.sharded_mse_loss(piece, handle.shard_target(target), W)
        loss.backward()
        longseq.sync_gradients(model.parameters(), groups)
        handle.remove()
        r.update(loss_sharded=loss.detach(), grads_sharded=param_grads(model))
        res[kind] = r
    return res


@functools.lru_cache(maxsize=None)
def _reference(kind):
    model = _model(kind)
    x, kw, target = _inputs(kind)
    out = model(x, **kw).sample
    loss = F.mse_loss(out, target)
    loss.backward()
    return out.detach(), loss.detach(), {**param_grads(model), **({"input": x.grad} if x.requires_grad else {})}


KINDS = ("svd", "temporal")


@pytest.mark.parametrize("P", [2, 3])
def test_diffusers_video_plans_equal_single_process(dist_pool, P):
    res = dist_pool(P).run(_run, KINDS)
    for kind in KINDS:
        ref_out, ref_loss, ref_grads = _reference(kind)
        assert all(g.abs().max() > 0 for g in ref_grads.values()), kind
        for r, rr in enumerate(res):
            out = rr[kind]
            assert_close(out["out"], ref_out, f"{kind} rank {r} output", RTOL, ATOL)
            for key in ("loss", "loss_sharded"):
                assert_close(out[key], ref_loss, f"{kind} rank {r} {key}", RTOL, ATOL)
            if out["x_grad"] is not None:
                out["grads"]["input"] = out["x_grad"]
            for key in ("grads", "grads_sharded"):
                assert out[key].keys() == ref_grads.keys() - ({"input"} if key == "grads_sharded" else set())
                for n, g in out[key].items():
                    assert g.abs().max() > 0, f"{kind} rank {r} {key}: {n} got a zero gradient"
                    assert_close(g, ref_grads[n], f"{kind} rank {r} {key} {n}", RTOL, ATOL)
            _assert_ledger(kind, P, r, out["records"])


def _assert_ledger(kind, P, r, recs):
    """The DSP minimum: per temporal block the switch in and out and their backward reverses, each
    sending the local activation minus the piece this rank keeps; nothing else but the input check,
    the exit gather and (TEMPORAL_PLAN) the whole GroupNorm's all-gather / reduce-scatter."""
    ts = split_sizes(T, P)
    if kind == "svd":
        blocks, S, C = ["temporal_transformer_blocks.0"], 25, 32
        ss = split_sizes(S, P)
        sent, recv = B * ts[r] * (S - ss[r]) * C, B * ss[r] * (T - ts[r]) * C
        extra = set()
    else:
        blocks, H, Wd, C = ["transformer_blocks.0", "transformer_blocks.1"], 5, 2, 16
        hs = split_sizes(H, P)
        sent, recv = B * ts[r] * (H - hs[r]) * Wd * C, B * hs[r] * (T - ts[r]) * Wd * C
        extra = {"dsp.norm.whole", "dsp.norm.whole.bwd", "dsp.entry.bwd"}
    a2a = [x for x in recs if x[0] == "all_to_all"]
    assert len(a2a) == 4 * len(blocks), (kind, r, a2a)
    for b in blocks:
        by = {x[1]: x[2:] for x in a2a if x[1].startswith(f"dsp.{b}.")}
        assert by == {f"dsp.{b}.in": (sent, recv), f"dsp.{b}.out.bwd": (sent, recv),
                      f"dsp.{b}.out": (recv, sent), f"dsp.{b}.in.bwd": (recv, sent)}, (kind, r, by)
    others = {x[1] for x in recs if x[0] != "all_to_all"}
    assert others == {"dsp.check", "dsp.exit"} | extra, (kind, others)


# ----------------------------------------------------------------------------------------------
# LONGSEQ_CHECK, and a plan that does not fit
# ----------------------------------------------------------------------------------------------
def _debug_and_misfit():
    from longseq.adapters import diffusers_video as dv
    W = dist.group.WORLD
    model = _model("svd")
    x, kw, _ = _inputs("svd")
    out = {}
    os.environ["LONGSEQ_CHECK"] = "1"               # the debug mode, switched on from the environment
    try:
        with dsp.parallelize(model, W, dv.SVD_PLAN) as h:
            model(x, **kw)
            out["report"] = [p for p, _, _ in h.check_report]
            model(x, **kw)                          # the first forward only: no second report
            out["report_after"] = len(h.check_report)
    finally:
        del os.environ["LONGSEQ_CHECK"]
    # the plan without the frame offset of time_proj: frames restart at 0 on every rank
    stages = tuple((p, s) for p, s in dv.SVD_PLAN.stages if p != "time_proj")
    for name, plan in {"no_offset": dataclasses.replace(dv.SVD_PLAN, stages=stages),
                       "no_indicator": dataclasses.replace(dv.SVD_PLAN, input=dv.SVD_PLAN.input[:2]),
                       "no_context": dataclasses.replace(dv.SVD_PLAN, input=dv.SVD_PLAN.input[::2])}.items():
        with dsp.parallelize(model, W, plan, check_stages=name == "no_offset"):
            try:
                model(x, **kw)
                out[name] = None
            except dsp.PlanError as e:
                out[name] = str(e)
    return out


def test_check_stages_and_misfit_errors(dist_pool):
    for r, out in enumerate(dist_pool(2).run(_debug_and_misfit)):
        # the right plan: every stage and the output agree with the one-rank recomputation
        assert out["report"][:3] == ["time_proj", "transformer_blocks.0", "temporal_transformer_blocks.0"]
        assert out["report"][-1] == "the model's output 'sample'" and out["report_after"] == len(out["report"])
        # a missing position offset is reported at the first stage it reaches, not at the output
        msg = out["no_offset"]
        assert msg is not None and "LONGSEQ_CHECK" in msg and "'temporal_transformer_blocks.0'" in msg, msg
        assert "transformer_blocks.0" in msg.split("agree (")[1]
        # without the input that binds B and T, the entry cannot unfold (B T): it says so, before the model runs
        msg = out["no_indicator"]
        assert msg is not None and "sizes of B, T" in msg and "'hidden_states'" in msg and "[10, 32, 5, 5]" in msg, msg
        # an input the plan forgets to shard: the model itself fails; the error names the plan, the step and shapes
        msg = out["no_context"]
        assert msg is not None and "DSP plan 'svd'" in msg and "hidden_states '(B T) C H W' [10, 32, 5, 5] -> local " in msg
        assert f"[{B * (3 - r)}, 32, 5, 5]" in msg and "The model's error" in msg, msg
