"""Bad input across ranks (issue 18, items 4, 6 and 7): the DSP primitives compare dtype and the
dims that are not sharded, a rank outside the group refuses before any collective, sp_gla refuses a
positive log decay, and a log decay of -inf gives the recurrence's finite result. Every
multi-process case runs in the shared gloo pool (bounded by its per-call timeout)."""
import datetime
import time

import pytest
import torch
import torch.distributed as dist

from longseq import comm, dsp, zeco
from longseq.ledger import LEDGER
from longseq.zeco.gla.naive import recurrent_gla_reference


def _error_of(fn):
    try:
        fn()
    except (ValueError, comm.CollectiveError) as e:
        return type(e).__name__, str(e)
    return None


def _disagree(kind):
    W, r = dist.group.WORLD, dist.get_rank()
    with LEDGER.recording() as rec:
        if kind == "switch_dtype":      # equal bytes: bf16 [2,3,6,8] on rank 0, fp32 [2,3,6,4] on rank 1
            x = torch.randn(2, 3, 6, 8).bfloat16() if r == 0 else torch.randn(2, 3, 6, 4)
            err = _error_of(lambda: dsp.switch(x, W, 2, 1, gather_size=6))
        elif kind == "switch_dims":     # same dtype, another channel count
            x = torch.randn(2, 3, 6, 8 if r == 0 else 4)
            err = _error_of(lambda: dsp.switch(x, W, 2, 1))
        elif kind == "shard_T":         # T = 4 on rank 0, 5 on rank 1
            err = _error_of(lambda: dsp.shard(torch.randn(2, 4 + r, 3), 1, W))
        elif kind == "gather_dtype":
            x = torch.randn(2, 3, 5, dtype=torch.float32 if r == 0 else torch.float64)
            err = _error_of(lambda: dsp.gather(x, 1, W, full_size=6))
        elif kind == "unchecked":       # the switch to skip the check: no check collective at all
            with dsp.unchecked():
                y = dsp.switch(torch.randn(2, 3, 6, 4), W, 2, 1, gather_size=6)
            err = tuple(y.shape)
    return err, [x.tag for x in rec]


@pytest.mark.parametrize("kind,tag", [("switch_dtype", "dsp.switch.check"), ("switch_dims", "dsp.switch.check"),
                                      ("shard_T", "dsp.shard.check"), ("gather_dtype", "dsp.gather.check")])
def test_dsp_ranks_that_disagree_get_the_same_error(dist_pool, kind, tag):
    out = dist_pool(2).run(_disagree, kind)
    (e0, tags0), (e1, _) = out
    assert e0 is not None and e0 == e1, out                      # the same error on every rank
    assert e0[0] == "ValueError" and "disagree" in e0[1] and "rank 0" in e0[1] and "rank 1" in e0[1], e0
    assert tags0[0] == tag and all(t.startswith(tag) for t in tags0), tags0   # no data collective ran


def test_dsp_check_can_be_skipped(dist_pool):
    for shape, tags in dist_pool(2).run(_disagree, "unchecked"):
        assert shape == (2, 6, 3, 4) and tags == ["dsp.switch"]


def _outsider(what):
    """Group {0, 1} of a 3-rank world; rank 2 passes it anyway."""
    g = dist.new_group([0, 1])
    r = dist.get_rank()
    with LEDGER.recording() as rec:
        if what == "dsp":
            res = _error_of(lambda: dsp.switch(torch.randn(1, 2, 4, 3), g, 2, 1, gather_size=4))
        else:
            q = torch.randn(1, 3, 2, 4)
            res = _error_of(lambda: zeco.sp_gla(q, q, q, -torch.rand(1, 3, 2, 4), group=g))
    return r, res, len(rec)


@pytest.mark.parametrize("what", ["dsp", "zeco"])
def test_rank_outside_the_group_refuses_before_any_collective(dist_pool, what):
    out = dist_pool(3).run(_outsider, what)
    r, res, n = out[2]
    assert res is not None and res[0] == "ValueError", res
    assert "not a member" in res[1] and "global ranks [0, 1]" in res[1] and n == 0, res
    assert out[0][1] is None and out[1][1] is None              # the members are unaffected


def _peer_stops(tag):
    """A member of an SP group stops answering: the other raises within the group's timeout, naming
    the collective and its tag (the groups get init_distributed's timeout, not torch's 30 minutes)."""
    import longseq
    from longseq.groups import set_collective_timeout_s
    set_collective_timeout_s(3)
    groups = longseq.init_parallel_groups(2)                     # SP {0,1} {2,3}
    r = dist.get_rank()
    if r == 3:
        time.sleep(9)
        return None
    t0 = time.monotonic()
    err = _error_of(lambda: comm.all_reduce(torch.ones(1), groups.sp_group, tag=tag))
    return err, time.monotonic() - t0, comm.in_flight()


def test_subgroup_timeout_names_the_collective(dist_pool):
    out = dist_pool(4).run(_peer_stops, "test.stalled", timeout=60)
    assert out[0][0] is None and out[1][0] is None               # SP {0, 1} is fine
    err, took, inflight = out[2]
    assert err is not None and err[0] == "CollectiveError", err
    assert "all_reduce" in err[1] and "'test.stalled'" in err[1] and "[2, 3]" in err[1], err
    assert took < 8, f"the SP group kept torch's default timeout ({took:.1f} s)"
    assert inflight is None


def test_groups_timeout_default():
    from longseq import groups
    assert groups.collective_timeout_s() > 0
    with pytest.raises(ValueError):
        groups.set_collective_timeout_s(0)


def _positive_decay():
    W, r = dist.group.WORLD, dist.get_rank()
    q = torch.randn(1, 4, 2, 4)
    g = -torch.rand(1, 4, 2, 4)
    g[0, 0, 0, 0] = 0.5
    return _error_of(lambda: zeco.sp_gla(q, q, q, g, group=W))


def test_sp_gla_refuses_a_positive_log_decay(dist_pool):
    for err in dist_pool(2).run(_positive_decay):
        assert err is not None and err[0] == "ValueError" and "<= 0" in err[1] and "0.5" in err[1], err


@pytest.mark.parametrize("scalar", [False, True])
def test_local_gla_with_a_decay_of_minus_inf_is_finite(scalar):
    torch.manual_seed(0)
    B, T, H, K, V = 1, 37, 2, 4, 3
    q, k = torch.randn(B, T, H, K, dtype=torch.float64), torch.randn(B, T, H, K, dtype=torch.float64)
    v = torch.randn(B, T, H, V, dtype=torch.float64)
    g = -torch.rand(*((B, T, H) if scalar else (B, T, H, K)), dtype=torch.float64)
    g[0, 5] = float("-inf")                                       # forget everything before step 5
    g[0, 20, 1] = float("-inf")
    ref_o, ref_h = recurrent_gla_reference(q, k, v, g)
    assert torch.isfinite(ref_o).all()
    qq, kk, vv, gg = (t.clone().requires_grad_() for t in (q, k, v, g))
    o, h = zeco.gla(qq, kk, vv, gg, output_final_state=True, chunk_size=16)
    torch.testing.assert_close(o, ref_o, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(h, ref_h, rtol=1e-9, atol=1e-9)
    (o.square().sum() + h.sum()).backward()
    qr, kr, vr, gr = (t.clone().requires_grad_() for t in (q, k, v, g))
    ro, rh = recurrent_gla_reference(qr, kr, vr, gr)
    (ro.square().sum() + rh.sum()).backward()
    for a, b in ((qq, qr), (kk, kr), (vv, vr)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-8)
    fin = torch.isfinite(g)
    assert torch.isfinite(gg.grad).all()
    torch.testing.assert_close(gg.grad[fin], gr.grad[fin], rtol=1e-8, atol=1e-8)
