"""Process groups: which ranks share which SP and DP group, and the errors before any collective."""
import pytest
import torch.distributed as dist

import longseq
from longseq.groups import sp_dp_layout


def _groups(sp_size):
    g = longseq.init_parallel_groups(sp_size)
    return dict(rank=dist.get_rank(), sp_rank=g.sp_rank, sp_size=g.sp_size, dp_rank=g.dp_rank, dp_size=g.dp_size,
                sp=list(g.sp_global_ranks), dp=list(g.dp_global_ranks),
                sp_members=dist.get_world_size(g.sp_group), dp_members=dist.get_world_size(g.dp_group))


def _bad_sp_size():
    try:
        longseq.init_parallel_groups(3)
    except ValueError as e:
        return str(e)
    return None


def _wrap_megatron_style():
    # a "context-parallel" group built by someone else: pairs {0,1},{2,3}; DP {0,2},{1,3}
    cp = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    dp = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    r = dist.get_rank()
    g = longseq.from_existing_groups(cp[r // 2], dp[r % 2])
    return (g.sp_rank, g.sp_size, g.dp_rank, g.dp_size, g.sp_global_ranks, g.dp_global_ranks)


def test_world4_sp2(dist_pool):
    out = dist_pool(4).run(_groups, 2)
    assert [o["sp"] for o in out] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [o["dp"] for o in out] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [o["sp_rank"] for o in out] == [0, 1, 0, 1]
    assert [o["dp_rank"] for o in out] == [0, 0, 1, 1]
    assert all(o["sp_members"] == 2 and o["dp_members"] == 2 for o in out)


def test_world4_sp4(dist_pool):
    out = dist_pool(4).run(_groups, 4)
    assert all(o["sp"] == [0, 1, 2, 3] and o["dp_size"] == 1 for o in out)
    assert [o["sp_rank"] for o in out] == [0, 1, 2, 3]
    assert all(o["dp"] == [o["rank"]] for o in out)


def test_sp_not_dividing_world_raises_on_every_rank(dist_pool):
    msgs = dist_pool(4).run(_bad_sp_size)
    assert all(m is not None and "does not divide the world size 4" in m for m in msgs)


def test_existing_groups_are_wrapped(dist_pool):
    out = dist_pool(4).run(_wrap_megatron_style)
    assert out[3] == (1, 2, 1, 2, (2, 3), (1, 3))
    assert out[0] == (0, 2, 0, 2, (0, 1), (0, 2))


def test_layout_is_pure():
    assert sp_dp_layout(8, 4) == ([[0, 1, 2, 3], [4, 5, 6, 7]], [[0, 4], [1, 5], [2, 6], [3, 7]])
    with pytest.raises(ValueError, match="choose sp_size among"):
        sp_dp_layout(6, 4)


def test_use_before_init_raises():
    if dist.is_initialized():
        pytest.skip("the test process itself must not have a process group")
    with pytest.raises(RuntimeError, match="torchrun"):
        longseq.init_parallel_groups(1)
