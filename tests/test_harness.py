"""The multi-process harness itself: results come back, and a rank that raises, hangs or dies fails
the test within the timeout instead of blocking the run."""
import os
import time

import pytest
import torch
import torch.distributed as dist

from tests.distributed import DistributedPool, DistributedTestError, DistributedTimeout


def _rank_tensor():
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return dist.get_rank(), t


def _raise_on_rank1():
    if dist.get_rank() == 1:
        raise ValueError("boom on rank 1")
    dist.barrier()  # rank 0 is left waiting in a collective


def _hang_on_rank1():
    if dist.get_rank() == 1:
        time.sleep(3600)
    dist.barrier()


def _die_on_rank1():
    if dist.get_rank() == 1:
        os._exit(7)
    dist.barrier()


def test_results_in_rank_order(dist_pool):
    out = dist_pool(2).run(_rank_tensor)
    assert [r for r, _ in out] == [0, 1]
    assert all(t.item() == 1.0 for _, t in out)


def test_exception_reports_traceback_of_failing_rank():
    with DistributedPool(2, timeout=60) as pool:
        with pytest.raises(DistributedTestError, match="(?s)rank 1 of 2 failed.*boom on rank 1"):
            pool.run(_raise_on_rank1)
        # the pool restarts and keeps working after a failure
        assert [r for r, _ in pool.run(_rank_tensor)] == [0, 1]


def test_hang_fails_within_timeout():
    with DistributedPool(2, timeout=60) as pool:
        pool.run(_rank_tensor)  # started
        t0 = time.monotonic()
        with pytest.raises(DistributedTimeout, match="no answer"):
            pool.run(_hang_on_rank1, timeout=4)
        assert time.monotonic() - t0 < 20


def test_dead_rank_fails_fast():
    with DistributedPool(2, timeout=60) as pool:
        pool.run(_rank_tensor)
        t0 = time.monotonic()
        with pytest.raises(DistributedTimeout, match=r"rank\(s\) \[1\] died"):
            pool.run(_die_on_rank1, timeout=30)
        assert time.monotonic() - t0 < 20
