"""Every collective in longseq.comm moves the right data and the ledger records exactly the volumes
of the rules in longseq/ledger.py, checked against counts computed by hand, at world sizes 2, 3, 4."""
import pytest
import torch
import torch.distributed as dist

import longseq
from longseq import comm
from longseq.ledger import LEDGER, format_table, summarize
from longseq.sharding import split_sizes

WORLDS = [2, 3, 4]


def _one(op_records):
    assert len(op_records) == 1, op_records
    return op_records[0]


def _all_to_all_uneven():
    """Rank r sends (r + j + 1) rows of width 3 to rank j; rows carry (sender, receiver)."""
    P, r, W = dist.get_world_size(), dist.get_rank(), dist.group.WORLD
    send = [r + j + 1 for j in range(P)]
    recv = [i + r + 1 for i in range(P)]
    x = torch.cat([torch.full((send[j], 3), 10.0 * r + j) for j in range(P)])
    with LEDGER.recording() as rec:
        y = comm.all_to_all_single(x, send, recv, W, tag="t.a2a")
    expect = torch.cat([torch.full((recv[i], 3), 10.0 * i + r) for i in range(P)])
    rec = _one(rec)
    return torch.equal(y, expect), (rec.op, rec.tag, rec.group_size, rec.elements_sent, rec.elements_recv, rec.bytes_sent)


@pytest.mark.parametrize("P", WORLDS)
def test_all_to_all_single_uneven(dist_pool, P):
    out = dist_pool(P).run(_all_to_all_uneven)
    for r, (ok, (op, tag, n, sent, got, bsent)) in enumerate(out):
        assert ok
        assert (op, tag, n) == ("all_to_all", "t.a2a", P)
        assert sent == 3 * sum(r + j + 1 for j in range(P) if j != r)
        assert got == 3 * sum(i + r + 1 for i in range(P) if i != r)
        assert bsent == 4 * sent  # float32


def _tensor_all_to_all(T, S):
    """[B, T, S, C] sharded on T -> sharded on S, uneven both ways, against slicing the whole."""
    P, r, W = dist.get_world_size(), dist.get_rank(), dist.group.WORLD
    g = torch.Generator().manual_seed(0)
    whole = torch.randn(2, T, S, 3, generator=g, dtype=torch.float64)
    t0 = sum(split_sizes(T, P)[:r]); s0 = sum(split_sizes(S, P)[:r])
    local = whole[:, t0:t0 + split_sizes(T, P)[r]]
    with LEDGER.recording() as rec:
        y = comm.all_to_all(local, W, scatter_dim=2, gather_dim=1, gather_sizes=split_sizes(T, P), tag="t.switch")
    ok = torch.equal(y, whole[:, :, s0:s0 + split_sizes(S, P)[r]])
    rec = _one(rec)
    return ok, rec.elements_sent, rec.elements_recv


@pytest.mark.parametrize("P", WORLDS)
def test_tensor_all_to_all_uneven(dist_pool, P):
    T, S = 2 * P + 1, 3 * P - 1
    out = dist_pool(P).run(_tensor_all_to_all, T, S)
    ts, ss = split_sizes(T, P), split_sizes(S, P)
    for r, (ok, sent, got) in enumerate(out):
        assert ok
        assert sent == 2 * 3 * ts[r] * (S - ss[r])   # my T rows, the S columns that leave
        assert got == 2 * 3 * ss[r] * (T - ts[r])


def _gathers(n_extra):
    P, r, W = dist.get_world_size(), dist.get_rank(), dist.group.WORLD
    sizes = split_sizes(2 * P + n_extra, P)
    x = torch.full((sizes[r], 5), float(r))
    res = {}
    with LEDGER.recording() as rec:
        g = comm.all_gather(x, W, dim=0, sizes=sizes, tag="t.ag")
        whole = torch.arange(sum(sizes) * 5, dtype=torch.float32).view(-1, 5) * (r + 1)
        rs = comm.reduce_scatter(whole, W, dim=0, tag="t.rs")
        ar = comm.all_reduce(torch.ones(7) * (r + 1), W, tag="t.ar")
        b = comm.broadcast(torch.full((6,), float(r)), 1, W, tag="t.bc")
    res["ag_ok"] = torch.equal(g, torch.cat([torch.full((s, 5), float(i)) for i, s in enumerate(sizes)]))
    tri = P * (P + 1) / 2
    lo = sum(sizes[:r])
    res["rs_ok"] = torch.allclose(rs, torch.arange(sum(sizes) * 5, dtype=torch.float32).view(-1, 5)[lo:lo + sizes[r]] * tri)
    res["ar_ok"] = torch.equal(ar, torch.full((7,), tri))
    res["bc_ok"] = torch.equal(b, torch.full((6,), 1.0))
    res["vol"] = {rr.op: (rr.elements_sent, rr.elements_recv) for rr in rec}
    res["table"] = format_table(summarize(rec))
    return res


@pytest.mark.parametrize("P", WORLDS)
@pytest.mark.parametrize("n_extra", [0, 1])
def test_gather_scatter_reduce_broadcast(dist_pool, P, n_extra):
    out = dist_pool(P).run(_gathers, n_extra)
    sizes = split_sizes(2 * P + n_extra, P)
    N = sum(sizes)
    for r, res in enumerate(out):
        assert res["ag_ok"] and res["rs_ok"] and res["ar_ok"] and res["bc_ok"]
        v = res["vol"]
        assert v["all_gather"] == (5 * sizes[r] * (P - 1), 5 * (N - sizes[r]))
        assert v["reduce_scatter"] == (5 * (N - sizes[r]), 5 * sizes[r] * (P - 1))
        assert v["all_reduce"] == (2 * 7 * (P - 1) // P,) * 2
        assert v["broadcast"] == ((6 * (P - 1), 0) if r == 1 else (0, 6))
        assert "all_gather" in res["table"] and "t.rs" in res["table"]


def _p2p():
    P, r, W = dist.get_world_size(), dist.get_rank(), dist.group.WORLD
    nxt, prv = (r + 1) % P, (r - 1) % P
    out = {}
    with LEDGER.recording() as rec:
        buf = torch.empty(4 + prv)
        ops = [comm.P2POp("send", torch.full((4 + r,), float(r)), nxt), comm.P2POp("recv", buf, prv)]
        for w in comm.batch_isend_irecv(ops, W, tag="t.batch"):
            w.wait()
        out["batch_ok"] = torch.equal(buf, torch.full((4 + prv,), float(prv)))
        if r == 0:
            comm.send(torch.arange(3.0), 1, W, tag="t.send")
            w = comm.isend(torch.arange(2.0), 1, W, tag="t.isend")
            w.wait()
        elif r == 1:
            a = comm.recv((3,), torch.float32, 0, W, tag="t.send")
            b = torch.empty(2)
            comm.irecv(b, 0, W, tag="t.isend").wait()
            out["p2p_ok"] = torch.equal(a, torch.arange(3.0)) and torch.equal(b, torch.arange(2.0))
    out["vol"] = sorted((x.op, x.tag, x.elements_sent, x.elements_recv) for x in rec)
    return out


@pytest.mark.parametrize("P", WORLDS)
def test_p2p(dist_pool, P):
    out = dist_pool(P).run(_p2p)
    for r, res in enumerate(out):
        prv = (r - 1) % P
        expect = [("recv", "t.batch", 0, 4 + prv), ("send", "t.batch", 4 + r, 0)]
        if r == 0:
            expect += [("send", "t.isend", 2, 0), ("send", "t.send", 3, 0)]
        if r == 1:
            expect += [("recv", "t.isend", 0, 2), ("recv", "t.send", 0, 3)]
            assert res["p2p_ok"]
        assert res["batch_ok"]
        assert res["vol"] == sorted(expect)


def _non_contiguous():
    """A transposed tensor through each primitive gives the same result as its contiguous copy."""
    P, r, W = dist.get_world_size(), dist.get_rank(), dist.group.WORLD
    base = torch.arange(6.0 * 2 * P).view(2 * P, 6) + 100 * r
    t = base.t()                                # [6, 2P], non-contiguous
    c = t.contiguous()
    same = []
    same.append(torch.equal(comm.all_to_all(t, W, scatter_dim=1, gather_dim=0, tag="nc"),
                            comm.all_to_all(c, W, scatter_dim=1, gather_dim=0, tag="nc")))
    same.append(torch.equal(comm.all_gather(t, W, dim=1, tag="nc"), comm.all_gather(c, W, dim=1, tag="nc")))
    same.append(torch.equal(comm.reduce_scatter(t, W, dim=1, tag="nc"), comm.reduce_scatter(c, W, dim=1, tag="nc")))
    same.append(torch.equal(comm.all_reduce(t.clone().t().t(), W, tag="nc"), comm.all_reduce(c.clone(), W, tag="nc")))
    return same


@pytest.mark.parametrize("P", [2, 3])
def test_non_contiguous_inputs_are_safe(dist_pool, P):
    for same in dist_pool(P).run(_non_contiguous):
        assert all(same)


def _compare_across_ranks():
    W = dist.group.WORLD
    r = dist.get_rank()
    with LEDGER.recording() as rec:
        comm.all_gather(torch.ones(r + 1), W, dim=0, sizes=[i + 1 for i in range(dist.get_world_size())], tag="t.cmp")
    per_rank = comm.all_gather_object(summarize(rec), W, tag="ledger.sync")
    return [s[("all_gather", "t.cmp")]["elements_sent"] for s in per_rank]


def test_volumes_compared_across_ranks(dist_pool):
    out = dist_pool(3).run(_compare_across_ranks)
    assert out[0] == out[1] == out[2] == [2, 4, 6]  # rank i sends i+1 elements to 2 peers


def test_totals_stay_on_outside_scopes():
    before = dict(LEDGER.totals)
    LEDGER.record("all_reduce", "unit", 4, torch.bfloat16, 6, 6)
    assert LEDGER.totals[("all_reduce", "unit")][1] - before.get(("all_reduce", "unit"), [0, 0, 0])[1] == 12
