"""Shared fixtures: ``dist_pool(n)`` gives an n-process gloo pool that lives for the whole session."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests.distributed import DistributedPool  # noqa: E402

_POOLS: dict[int, DistributedPool] = {}


@pytest.fixture(scope="session")
def dist_pool():
    def get(world_size: int) -> DistributedPool:
        if world_size not in _POOLS:
            _POOLS[world_size] = DistributedPool(world_size, timeout=float(os.environ.get("LONGSEQ_TEST_TIMEOUT", 180)))
        return _POOLS[world_size]

    yield get
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()
