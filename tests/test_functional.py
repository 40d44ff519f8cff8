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
