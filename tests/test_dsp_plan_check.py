"""Wrong plans fail loudly: ``dsp.check_plan`` reports every stage that differs from one process
(not only the first), and a stage that fails on one rank is named there while its peer stops at
the collective timeout with an error saying that a peer failed in that stage.

Model: diffusers' ``TransformerTemporalModel`` (tiny: 8 channels in 4 groups, 2 blocks), B = 2,
T = 5 frames, H = 5 rows, P = 2, float64.
"""
import dataclasses
import datetime

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("diffusers")

from longseq import dsp  # noqa: E402
from longseq.dsp import Stage  # noqa: E402


def _model_inputs():
    from longseq.adapters import diffusers_video as dv
    from longseq.models.stdit import init_for_testing
    model = init_for_testing(dv.build_temporal(), std=0.1, seed=0).double()
    x = torch.randn(2 * 5, 8, 5, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return model, x


def _check_plans():
    from longseq.adapters import diffusers_video as dv
    model, x = _model_inputs()
    W = dist.group.WORLD
    good = dataclasses.replace(dv.TEMPORAL_PLAN, stages=(("norm", Stage("B C T H W", shard="T", stats=True)),
                                                         dv.TEMPORAL_PLAN.stages[1]))
    report = dsp.check_plan(model, W, good, x, num_frames=5)
    # two mistakes: the GroupNorm over T left local (reaches block 0), block 1 left T-sharded (the output)
    bad = dataclasses.replace(dv.TEMPORAL_PLAN, stages=(("transformer_blocks.0", Stage("(B H W) T C", shard="H")),))
    try:
        dsp.check_plan(model, W, bad, x, num_frames=5)
        msg = None
    except dsp.PlanError as e:
        msg = str(e)
    out = model(x, num_frames=5).sample           # the model is left as it was
    ref = model(x, num_frames=5).sample
    return dict(report=[(p, e) for p, e, _ in report], msg=msg, same=bool(torch.equal(out, ref)))


def test_check_plan_reports_every_stage_that_differs(dist_pool):
    for res in dist_pool(2).run(_check_plans):
        assert [p for p, _ in res["report"]] == ["norm", "transformer_blocks.0", "transformer_blocks.1",
                                                 "the model's output 'sample'"]
        assert all(e <= 1e-10 for _, e in res["report"]), res["report"]
        msg = res["msg"]
        assert msg is not None and "2 place(s) differ" in msg, msg
        assert "stage 'transformer_blocks.0'" in msg and "between the entry and it" in msg, msg
        assert "the model's output 'sample'" in msg and "between stage 'transformer_blocks.0' and it" in msg, msg
        assert res["same"]


def _one_rank_fails():
    from longseq.adapters import diffusers_video as dv
    model, x = _model_inputs()
    g = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=4))

    def lose_an_argument(handle, path, call):      # on rank 1 only: the stage's argument is missing there
        if handle.rank == 1:
            raise KeyError("encoder_hidden_states")
    st = dataclasses.replace(dv.TEMPORAL_PLAN.stages[1][1], pre=lose_an_argument)
    plan = dataclasses.replace(dv.TEMPORAL_PLAN, stages=(dv.TEMPORAL_PLAN.stages[0], ("transformer_blocks.*", st)))
    handle = dsp.parallelize(model, g, plan)
    try:
        model(x, num_frames=5)
        return None
    except dsp.PlanError as e:
        return str(e)
    finally:
        handle.remove()


def test_a_stage_failing_on_one_rank_stops_its_peer(dist_pool):
    msgs = dist_pool(2).run(_one_rank_fails)
    assert "in stage 'transformer_blocks.0' (in) (its arguments: hidden_states [" in msgs[1], msgs[1]
    assert "KeyError: 'encoder_hidden_states'" in msgs[1], msgs[1]
    assert "a peer failed (rank 1:" in msgs[0] and "stage 'transformer_blocks.0'" in msgs[0], msgs[0]
    assert "after the collective timeout" in msgs[0], msgs[0]
