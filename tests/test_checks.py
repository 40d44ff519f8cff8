"""Cross-rank checks of the public collective entries (issue 22, item 6): a bad argument on ONE rank,
or ranks that disagree (also on a later call), make EVERY rank raise the same exception (type and
message) before any data collective, instead of leaving the others in a collective until the
timeout; NaN in a decay propagates as in one process; the check is one fixed-size header exchange
(control bytes in the ledger, no object collective). Each case runs in the gloo pool with its
per-call timeout, so a hang fails the test instead of blocking it."""
import pytest
import torch
import torch.distributed as dist

from longseq.ledger import LEDGER

TIMEOUT = 60


def _outcome(fn):
    """``("ok", value)`` or ``(exception type name, message)``."""
    try:
        return "ok", fn()
    except (ValueError, TypeError) as e:
        return type(e).__name__, str(e)


def _gla_inputs(r, T=6, K=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(1, T, 2, K, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(1, T, 2, 3, generator=g, dtype=dtype)
    gate = -torch.rand(1, T, 2, K, generator=g, dtype=dtype)
    return q, k, v, gate


def _gla_case(kind):
    from longseq.zeco import sp_gla
    r, W = dist.get_rank(), dist.group.WORLD
    q, k, v, g = _gla_inputs(r)
    kw = {}
    if kind == "k_shape" and r == 1:
        k = k[..., :3]
    elif kind == "positive_decay" and r == 0:
        g = g.abs()
    elif kind == "int_dtype" and r == 1:
        q = q.to(torch.int64)
    elif kind == "initial_state" and r == 0:
        kw["initial_state"] = torch.zeros(1, 2, 4, 5)
    elif kind == "meta" and r == 1:
        q, k, v, g = (t.to("meta") for t in (q, k, v, g))
    elif kind == "num_blocks" and r == 1:
        kw["num_blocks"] = 0
    with LEDGER.recording() as rec:
        out = _outcome(lambda: tuple(sp_gla(q, k, v, g, group=W, **kw)[0].shape))
    return out, [(x.tag, x.control) for x in rec]


@pytest.mark.parametrize("kind,etype,match", [
    ("k_shape", "ValueError", "k must have q's shape"), ("positive_decay", "ValueError", "must be <= 0"),
    ("int_dtype", "TypeError", "floating-point"), ("initial_state", "ValueError", "initial_state"),
    ("meta", "ValueError", "meta device"), ("num_blocks", "ValueError", "num_blocks")])
@pytest.mark.parametrize("P", [2, 3])
def test_sp_gla_local_error_on_one_rank_raises_on_every_rank(dist_pool, P, kind, etype, match):
    res = dist_pool(P).run(_gla_case, kind, timeout=TIMEOUT)
    (e0, tags0) = res[0]
    for e, tags in res:
        assert e == e0, res                                   # the same type and message everywhere
        assert all(t.startswith("zeco.check") and c for t, c in tags), tags   # only control records
    assert e0[0] == etype and match in e0[1], e0


def _gla_later_change(kind):
    from longseq.zeco import sp_gla
    r, W = dist.get_rank(), dist.group.WORLD
    first = _outcome(lambda: tuple(sp_gla(*_gla_inputs(r), group=W)[0].shape))
    if kind == "K":
        xs = _gla_inputs(r, K=4 if r == 0 else 8)
    else:                                                      # dtype
        xs = _gla_inputs(r, dtype=torch.float32 if r == 0 else torch.float64)
    return first, _outcome(lambda: sp_gla(*xs, group=W)[0].shape)


@pytest.mark.parametrize("kind,field", [("K", "K"), ("dtype", "state_dtype")])
def test_sp_gla_disagreement_on_a_later_call_raises_everywhere(dist_pool, kind, field):
    res = dist_pool(2).run(_gla_later_change, kind, timeout=TIMEOUT)
    assert all(first[0] == "ok" for first, _ in res)
    later = [x for _, x in res]
    assert later[0] == later[1] and later[0][0] == "ValueError" and field in later[0][1], later
    assert "rank 0" in later[0][1] and "rank 1" in later[0][1]


def _gla_nan():
    from longseq.zeco import gla, sp_gla
    P, r, W = dist.get_world_size(), dist.get_rank(), dist.group.WORLD
    q, k, v, g = _gla_inputs(0, T=8)
    g[0, 1, 0, 0] = float("nan")                              # in rank 0's piece only
    pieces = [torch.tensor_split(t, P, 1)[r] for t in (q, k, v, g)]
    o, _ = sp_gla(*pieces, group=W)
    ref = torch.tensor_split(gla(q, k, v, g, backend="torch")[0], P, 1)[r]
    return torch.isnan(o).equal(torch.isnan(ref)), bool(torch.isnan(o).any())


def test_sp_gla_nan_in_decay_propagates_as_in_one_process(dist_pool):
    res = dist_pool(2).run(_gla_nan, timeout=TIMEOUT)
    assert all(same for same, _ in res), res
    assert res[1][1], "rank 1 (after the NaN) must see NaN, as one process does"


def _gla_mixed_check():
    from longseq.zeco import sp_gla
    r, W = dist.get_rank(), dist.group.WORLD
    xs = _gla_inputs(r)
    return [_outcome(lambda: tuple(sp_gla(*xs, group=W, check=c)[0].shape))
            for c in ((True, "always")[r], ("always", True)[r], (True, "first")[r])]


def test_sp_gla_true_always_first_interoperate(dist_pool):
    """True, "always" and a first-time "first" run the same exchange, so ranks may mix them."""
    for out in dist_pool(2).run(_gla_mixed_check, timeout=TIMEOUT):
        assert all(o == ("ok", (1, 6, 2, 3)) for o in out), out


def _delta_inputs(T=6):
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(1, T, 2, 4, generator=g) for _ in range(2))
    v = torch.randn(1, T, 2, 3, generator=g)
    gate = -torch.rand(1, T, 2, generator=g)
    beta = torch.rand(1, T, 2, generator=g)
    return q, k, v, gate, beta


def _delta_case(kind, method):
    from longseq.zeco import sp_delta_rule
    r, W = dist.get_rank(), dist.group.WORLD
    q, k, v, g, beta = _delta_inputs()
    if kind == "positive_decay" and r == 1:
        g = g.abs() + 0.5
    elif kind == "beta_shape" and r == 0:
        beta = beta[..., :1]
    elif kind == "later_K":
        sp_delta_rule(q, k, v, g, beta, group=W, method=method)
        if r == 1:
            q, k = (torch.randn(1, 6, 2, 8) for _ in range(2))
    with LEDGER.recording() as rec:
        out = _outcome(lambda: tuple(sp_delta_rule(q, k, v, g, beta, group=W, method=method)[0].shape))
    return out, [x.op for x in rec]


@pytest.mark.parametrize("kind,match", [("positive_decay", "must be <= 0"), ("beta_shape", "beta must be"),
                                        ("later_K", "K")])
def test_sp_delta_rule_errors_raise_on_every_rank(dist_pool, kind, match):
    for method in ("zeco", "heads"):
        res = dist_pool(2).run(_delta_case, kind, method, timeout=TIMEOUT)
        assert res[0][0] == res[1][0] and res[0][0][0] == "ValueError" and match in res[0][0][1], res
        for _, ops in res:
            assert "all_gather_object" not in ops[:1] and "all_to_all" not in ops and "send" not in ops, ops


def _delta_no_object_collective():
    from longseq.zeco import sp_delta_rule
    with LEDGER.recording() as rec:
        for _ in range(3):
            sp_delta_rule(*_delta_inputs(), group=dist.group.WORLD)
    return [(x.op, x.tag, x.control) for x in rec if x.tag.startswith("zeco.check")]


def test_sp_delta_rule_check_is_one_header_per_call(dist_pool):
    for rows in dist_pool(2).run(_delta_no_object_collective, timeout=TIMEOUT):
        assert rows == [("all_gather", "zeco.check", True)] * 3, rows


def _loss_bad_label():
    from longseq.zeco import sp_lm_loss
    r, W = dist.get_rank(), dist.group.WORLD
    logits = torch.randn(1, 4, 7)
    labels = torch.randint(0, 7, (1, 4))
    if r == 1:
        labels[0, 2] = 7                                       # out of range, on rank 1 only
    return _outcome(lambda: float(sp_lm_loss(logits, labels, W)))


def test_sp_lm_loss_bad_label_raises_on_every_rank(dist_pool):
    res = dist_pool(2).run(_loss_bad_label, timeout=TIMEOUT)
    assert res[0] == res[1] and res[0][0] == "ValueError" and "outside [0, 7)" in res[0][1], res


def _dsp_later_change():
    from longseq import dsp
    r, W = dist.get_rank(), dist.group.WORLD
    x = torch.randn(2, 3, 6, 4)
    first = _outcome(lambda: tuple(dsp.switch(x, W, 2, 1, gather_size=6).shape))
    y = torch.randn(2, 3, 6, 4 if r == 0 else 5)              # one rank's channels change on the 2nd call
    return first, _outcome(lambda: dsp.switch(y, W, 2, 1, gather_size=6).shape)


def test_dsp_switch_later_change_raises_everywhere(dist_pool):
    res = dist_pool(2).run(_dsp_later_change, timeout=TIMEOUT)
    assert all(f == ("ok", (2, 6, 3, 4)) for f, _ in res), res
    assert res[0][1] == res[1][1] and res[0][1][0] == "ValueError" and "disagree" in res[0][1][1], res


def _attention_bad(method):
    from longseq.sp import ring_attention, ulysses_attention
    r, W = dist.get_rank(), dist.group.WORLD
    q = torch.randn(1, 4, 2, 8)
    k = torch.randn(1, 4, 2, 8 if r == 0 else 6)             # head dim differs on rank 1
    fn = ulysses_attention if method == "ulysses" else ring_attention
    return _outcome(lambda: tuple(fn(q, k, k, W).shape))


@pytest.mark.parametrize("method", ["ulysses", "ring"])
def test_attention_bad_argument_on_one_rank(dist_pool, method):
    res = dist_pool(2).run(_attention_bad, method, timeout=TIMEOUT)
    assert res[0] == res[1] and res[0][0] == "ValueError", res
