"""dsp.switch / dsp.shard / dsp.gather: values against slicing the whole tensor (even and uneven
sizes, strided inputs), float64 gradcheck across ranks, the ledger's volumes, and the errors raised
before any collective."""
import contextlib

import pytest
import torch
import torch.distributed as dist

from longseq import dsp
from longseq.ledger import LEDGER
from longseq.sharding import shard_range, split_sizes


def _piece(x, dim, P, r):
    a, b = shard_range(x.shape[dim], P, r)
    return x.narrow(dim, a, b - a)


def _values(T, S, transposed):
    """[B, T, S, C] sharded on T -> switch -> sharded on S -> switch back; shard and gather."""
    P, r, W = dist.get_world_size(), dist.get_rank(), dist.group.WORLD
    whole = torch.randn(2, T, S, 3, generator=torch.Generator().manual_seed(7))
    res = {}
    with LEDGER.recording() as rec:
        t_local = dsp.shard(whole, 1, W)
        res["shard"] = torch.equal(t_local, _piece(whole, 1, P, r))
        if transposed:  # the same values held in a strided tensor: gloo must never see it as is
            big = torch.zeros(*t_local.shape[:-1], 2 * t_local.shape[-1])
            big[..., ::2] = t_local
            t_local = big[..., ::2]                  # every other channel of a wider buffer
            assert not t_local.is_contiguous()
        s_local = dsp.switch(t_local, W, scatter_dim=2, gather_dim=1, gather_size=T)
        res["switch"] = torch.equal(s_local, _piece(whole, 2, P, r))
        back = dsp.switch(s_local, W, scatter_dim=-3, gather_dim=-2, gather_size=S)   # negative dims
        res["back"] = torch.equal(back, _piece(whole, 1, P, r))
        res["gather"] = torch.equal(dsp.gather(back, 1, W, full_size=T), whole)
        res["gather_s"] = torch.equal(dsp.gather(s_local, 2, W, full_size=S), whole)
    res["vol"] = [(x.op, x.tag, x.elements_sent, x.elements_recv) for x in rec if not x.tag.endswith(".check")]
    res["checks"] = [(x.op, x.tag, x.elements_sent, x.control_sent) for x in rec if x.tag.endswith(".check")]
    # the whole size omitted: exchanged first (tag <tag>.sizes), same result
    with LEDGER.recording() as rec2:
        res["inferred"] = torch.equal(dsp.switch(t_local, W, 2, 1), s_local) and \
            torch.equal(dsp.gather(s_local, 2, W), whole)
    res["inferred_ops"] = [(x.op, x.tag) for x in rec2]
    return res


@pytest.mark.parametrize("P,T,S", [(2, 4, 6), (2, 5, 9), (3, 7, 10), (3, 6, 9), (4, 5, 9), (4, 8, 4)])
@pytest.mark.parametrize("transposed", [False, True])
def test_values_and_volumes(dist_pool, P, T, S, transposed):
    out = dist_pool(P).run(_values, T, S, transposed)
    ts, ss = split_sizes(T, P), split_sizes(S, P)
    B, C = 2, 3
    for r, res in enumerate(out):
        assert res["shard"] and res["switch"] and res["back"] and res["gather"] and res["gather_s"], (r, res)
        assert res["inferred"]
        # switch T->S: this rank's [B, T_r, S, C] minus the [B, T_r, S_r, C] it keeps; and back
        assert res["vol"] == [
            ("all_to_all", "dsp.switch", B * ts[r] * (S - ss[r]) * C, B * (T - ts[r]) * ss[r] * C),
            ("all_to_all", "dsp.switch", B * (T - ts[r]) * ss[r] * C, B * ts[r] * (S - ss[r]) * C),
            ("all_gather", "dsp.gather", B * ts[r] * S * C * (P - 1), B * (T - ts[r]) * S * C),
            ("all_gather", "dsp.gather", B * T * ss[r] * C * (P - 1), B * T * (S - ss[r]) * C),
        ]
        # one 24-byte header per call for the cross-rank check (shard, 2 switches, 2 gathers): control
        # bytes, no payload
        assert res["checks"] == [("all_gather", f"dsp.{k}.check", 0, 24 * (P - 1))
                                 for k in ("shard", "switch", "switch", "gather", "gather")]
        # the whole size omitted: it rides in the check's header, no separate size exchange
        assert res["inferred_ops"] == [("all_gather", "dsp.switch.check"), ("all_to_all", "dsp.switch"),
                                       ("all_gather", "dsp.gather.check"), ("all_gather", "dsp.gather")]
    if T % P == 0 and S % P == 0:   # the DESIGN formula: (P-1)·M/P² elements per rank per switch
        M = B * T * S * C
        assert all(res["vol"][0][2] == (P - 1) * M // P**2 for res in out)


def _gradcheck():
    W = dist.group.WORLD
    T, S = 5, 7                                       # uneven over 2, 3 and 4 ranks
    X = torch.randn(1, T, S, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    w = torch.randn(2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def F(X):
        t_local = dsp.shard(X, 1, W)                                        # T sharded
        h = torch.tanh(t_local @ w)                                          # per-frame work
        s_local = dsp.switch(h, W, scatter_dim=2, gather_dim=1, gather_size=T)  # -> S sharded
        h = torch.softmax(s_local, dim=1) * s_local                          # mixes frames: needs T whole
        t_local = dsp.switch(h, W, scatter_dim=1, gather_dim=2, gather_size=S)  # -> T sharded
        return dsp.gather(t_local.pow(2), 1, W, full_size=T)

    def ref(X):
        h = torch.tanh(X @ w)
        return (torch.softmax(h, dim=1) * h).pow(2)

    ok = torch.autograd.gradcheck(F, (X,), eps=1e-6, atol=1e-8, rtol=1e-6, nondet_tol=0.0)
    return bool(ok) and torch.allclose(F(X), ref(X), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("P", [2, 3, 4])
def test_gradcheck_float64(dist_pool, P):
    assert dist_pool(P).run(_gradcheck) == [True] * P


def _too_small(kind, check=True):
    """Each call raises the same error on every rank before the data collective: with the cross-rank
    check only its 8-byte digest and details are exchanged; with ``check=False`` nothing."""
    W, P = dist.group.WORLD, dist.get_world_size()
    x = torch.randn(2, P - 1, 6)
    with LEDGER.recording() as rec, contextlib.ExitStack() as stack:
        if not check:
            stack.enter_context(dsp.unchecked())
        try:
            if kind == "switch":
                dsp.switch(torch.randn(2, 1, P - 1, 3), W, scatter_dim=2, gather_dim=1, gather_size=P)
            elif kind == "switch_gather":
                dsp.switch(torch.randn(2, 1 if dist.get_rank() == 0 else 0, 4 * P, 3), W, 2, 1, gather_size=1)
            elif kind == "shard":
                dsp.shard(x, 1, W)
            elif kind == "gather":
                dsp.gather(torch.randn(2, 1 if dist.get_rank() < P - 1 else 0, 6), 1, W, full_size=P - 1)
            elif kind == "wrong_size":   # every rank's piece (3) does not fit the whole size given (4P)
                dsp.switch(torch.randn(2, 3, 4 * P, 3), W, 2, 1, gather_size=4 * P)
            elif kind == "same_dims":
                dsp.switch(torch.randn(2, 3, 4 * P, 3), W, 2, -2, gather_size=3 * P)
        except ValueError as e:
            return str(e), [r.tag for r in rec]
    return None, [r.tag for r in rec]


@pytest.mark.parametrize("kind,words", [
    ("switch", ["dim 2", "scatter_dim", "size 3", "4 ranks"]),
    ("switch_gather", ["dim 1", "gather_dim", "size 1", "4 ranks"]),
    ("shard", ["dim 1", "size 3", "4 ranks", "[2, 3, 6]"]),
    ("gather", ["dim 1", "size 3", "4 ranks"]),
    ("wrong_size", ["holds 3", "16", "gives it 4"]),
    ("same_dims", ["both 2"]),
])
@pytest.mark.parametrize("check", [True, False])
def test_errors_before_any_collective(dist_pool, kind, words, check):
    out = dist_pool(4).run(_too_small, kind, check)
    for r, (msg, tags) in enumerate(out):
        assert msg is not None, f"rank {r}: no error"
        for w in words:
            assert w in msg, (w, msg)
        if check:
            assert msg == out[0][0], "every rank raises the same error"
            assert tags and all(".check" in t for t in tags), f"rank {r}: a data collective before the error: {tags}"
        else:
            assert tags == [], f"rank {r}: a collective was issued before the error"


def _single_rank():
    """P = 1: the switch is a local copy, shard and gather are identities."""
    groups = [dist.new_group([i]) for i in range(dist.get_world_size())]   # every rank creates every group
    g = groups[dist.get_rank()]
    x = torch.randn(2, 3, 4, 5)
    y = dsp.switch(x, g, 2, 1, gather_size=3)
    return torch.equal(y, x) and torch.equal(dsp.shard(x, 1, g), x) and torch.equal(dsp.gather(x, 1, g), x)


def test_single_rank_group(dist_pool):
    assert dist_pool(2).run(_single_rank) == [True, True]


def _switch_in_bf16():
    """comm_dtype sends the switch in bf16 (half the bytes) and hands back the input dtype, forward and
    backward; the values equal a float32 switch of the bf16-rounded tensor exactly."""
    W, P, r = dist.group.WORLD, dist.get_world_size(), dist.get_rank()
    x = torch.randn(2, 3, 4 * P, 5, generator=torch.Generator().manual_seed(r), requires_grad=True)
    with LEDGER.recording() as rec:
        y = dsp.switch(x, W, 2, 1, 3 * P, comm_dtype=torch.bfloat16, check=False)
        y.backward(torch.ones_like(y))
    ref = dsp.switch(x.detach().to(torch.bfloat16).float(), W, 2, 1, 3 * P)
    return (y.dtype, torch.equal(y, ref), x.grad.dtype, torch.equal(x.grad, torch.ones_like(x)),
            [(rr.tag, rr.dtype, rr.bytes_sent, rr.elements_sent) for rr in rec])


@pytest.mark.parametrize("P", [2, 3])
def test_switch_comm_dtype_halves_bytes(dist_pool, P):
    for ydt, same, gdt, grad_ok, recs in dist_pool(P).run(_switch_in_bf16):
        assert ydt == torch.float32 and gdt == torch.float32 and same and grad_ok
        assert [t for t, *_ in recs] == ["dsp.switch", "dsp.switch.bwd"]
        for _, dt, nbytes, n in recs:
            assert dt == "bfloat16" and nbytes == 2 * n == 2 * (2 * 3 * 4 * 5 * (P - 1))
