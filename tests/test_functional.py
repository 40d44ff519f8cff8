"""The autograd-aware collectives pass torch.autograd.gradcheck in float64 across 3 ranks.

Each check differentiates a whole function F(X) of a tensor X replicated on every rank:
shard_whole -> (collective under test, with per-rank work where its convention needs it) ->
gather_whole. F is then an ordinary function of X, identical on every rank, so gradcheck's
numerical and analytical Jacobians are comparable and every rank runs the same number of calls.
"""
import pytest
import torch
import torch.distributed as dist

from longseq import functional as LF

W = None


def _gradcheck(f, *xs):
    return torch.autograd.gradcheck(f, xs, eps=1e-6, atol=1e-8, rtol=1e-6, nondet_tol=0.0)


def _check_all_to_all():
    W = dist.group.WORLD
    T, S = 5, 4                      # uneven over 3 ranks both ways
    X = torch.randn(2, T, S, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)

    def F(X):
        local = LF.shard_whole(X, W, dim=1)                                     # shard T
        y = LF.all_to_all(local, W, scatter_dim=2, gather_dim=1, gather_size=T)  # -> shard S
        y = y * y                                                                # local work
        z = LF.all_to_all(y, W, scatter_dim=1, gather_dim=2, gather_size=S)      # -> shard T
        return LF.gather_whole(z, W, dim=1, full_size=T)

    ok = _gradcheck(F, X)
    return ok and torch.allclose(F(X), X * X)


def _check_gather_scatter():
    W, r = dist.group.WORLD, dist.get_rank()
    X = torch.randn(7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)

    def F_gather(X):
        local = LF.shard_whole(X, W, dim=0)
        whole = LF.all_gather(local, W, dim=0, full_size=7)     # each rank uses the whole with its own work
        mine = (whole * (r + 1)).sum(0, keepdim=True)           # [1, 3], rank-specific
        return LF.gather_whole(mine, W, dim=0)                  # [3, 3]: row r = (r+1) * X.sum(0)

    def F_scatter(X):
        local = LF.shard_whole(X, W, dim=0)                     # [n_r, 3]
        contrib = torch.stack([local.sum(0) * (r + j + 1) for j in range(3)])  # [3, 3] full-size, per rank
        mine = LF.reduce_scatter(contrib, W, dim=0)             # row r = sum_i (i + r + 1) * sum(X_i)
        return LF.gather_whole(mine, W, dim=0)

    def F_reduce(X):
        local = LF.shard_whole(X, W, dim=0)
        return LF.all_reduce_sum(local.pow(2).sum(0), W)        # = (X**2).sum(0)

    ok = _gradcheck(F_gather, X) and _gradcheck(F_scatter, X) and _gradcheck(F_reduce, X)
    values = torch.allclose(F_gather(X), torch.stack([(i + 1) * X.sum(0) for i in range(3)])) and \
        torch.allclose(F_reduce(X), (X ** 2).sum(0))
    return ok and values


@pytest.mark.parametrize("check", [_check_all_to_all, _check_gather_scatter])
def test_gradcheck_three_ranks(dist_pool, check):
    assert dist_pool(3).run(check) == [True, True, True]


# ----------------------------------------------------------------------------------------------
# Halo exchange: point to point, (w-1) rows per rank boundary, chained through short pieces
# ----------------------------------------------------------------------------------------------
def _halo_worker(sizes, h, layout):
    from longseq.ledger import LEDGER
    P, r = dist.get_world_size(), dist.get_rank()
    X, D = _halo_data(sizes, h, layout)
    dim = 1 if layout == "btd" else 2
    x = torch.split(X, sizes, dim)[r].clone().requires_grad_()
    with LEDGER.recording() as rec:
        if layout == "btd":
            halo = LF.gather_halo(x, h, dist.group.WORLD, tag="t.halo")
        else:
            halo = LF.halo_exchange_channels_first(x, h, dist.group.WORLD, tag="t.halo")
        (halo * D).sum().backward()
    return halo.detach(), x.grad, [(e.op, e.tag, e.elements_sent, e.elements_recv) for e in rec]


def _halo_data(sizes, h, layout):
    g = torch.Generator().manual_seed(3)
    B, C, T = 2, 3, sum(sizes)
    shape, dshape = ((B, T, C), (B, h, C)) if layout == "btd" else ((B, C, T), (B, C, h))
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(dshape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("sizes,h,layout", [([3, 2, 2], 3, "bct"),    # T=7 at P=3, conv width 4: short pieces
                                            ([1, 5, 1], 3, "btd"),    # rank 1's halo: rank 0's 1 row + 2 zeros
                                            ([4, 3, 5], 3, "bct")])
def test_halo_exchange_point_to_point(dist_pool, sizes, h, layout):
    """Each rank's halo equals the h rows before its piece in the whole (zero-padded) sequence, the
    pieces' gradients equal the whole's (float64, exact), and the ledger has exactly one send of h
    rows per rank boundary each way (B·C·h elements) and nothing else."""
    P = len(sizes)
    res = dist_pool(P).run(_halo_worker, sizes, h, layout)
    X, D = _halo_data(sizes, h, layout)
    dim = 1 if layout == "btd" else 2
    Xp = torch.cat([torch.zeros_like(X.narrow(dim, 0, h)), X], dim).requires_grad_()
    total = 0
    for i, start in enumerate([sum(sizes[:i]) for i in range(P)]):
        ref = Xp.narrow(dim, start, h)
        assert torch.equal(res[i][0], ref.detach()), f"rank {i} halo"
        total = total + (ref * D).sum()
    total.backward()
    assert torch.equal(torch.cat([x[1] for x in res], dim), Xp.grad.narrow(dim, h, sum(sizes)))
    rows = 2 * 3 * h
    for i, (_, _, recs) in enumerate(res):
        want = ([("send", "t.halo", rows, 0)] if i < P - 1 else []) + ([("recv", "t.halo", 0, rows)] if i else []) \
            + ([("send", "t.halo.bwd", rows, 0)] if i else []) + ([("recv", "t.halo.bwd", 0, rows)] if i < P - 1 else [])
        assert sorted(recs) == sorted(want), (i, recs)
