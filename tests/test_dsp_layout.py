"""The plan language's pure parts: layouts (parse, bind, unfold / fold), positions, Call and the
plan-level validation, on one process."""
import pytest
import torch

import longseq
from longseq import dsp
from longseq.dsp import layout as L


def test_parse_and_errors():
    lay = L.parse("(B T) S C")
    assert lay.groups == (("B", "T"), ("S",), ("C",)) and lay.folded == ["B", "T"] and lay.names == ["B", "T", "S", "C"]
    assert L.parse("(B T) ...").groups == (("B", "T"), ("...",))
    for bad, words in [("(B (T)", "nested"), ("B T)", "unopened"), ("(B T", "unclosed"), ("B B", "twice"),
                       ("(B ...)", "folded")]:
        with pytest.raises(L.LayoutError, match=words):
            L.parse(bad)


def test_bind_infers_one_unknown_per_group_and_names_the_mismatch():
    x = torch.zeros(10, 9, 4)
    sizes = {"T": 5}
    assert L.bind(L.parse("(B T) S C"), x, sizes, {"B", "T", "S"}, None, lambda n: n, "x") == []
    assert sizes == {"T": 5, "B": 2, "S": 9}                  # C is local to the layout: not bound
    # T sharded: this rank holds 3 of 5 frames, so (B T) is 6
    assert L.bind(L.parse("(B T) S C"), torch.zeros(6, 9, 4), dict(sizes), {"B", "T", "S"}, "T", lambda n: 3, "y") == []
    with pytest.raises(L.LayoutError, match=r"x has shape \[7, 9, 4\].*B=2·T=5 = 10, not 7"):
        L.bind(L.parse("(B T) S C"), torch.zeros(7, 9, 4), dict(sizes), {"B", "T", "S"}, None, lambda n: n, "x")
    assert L.bind(L.parse("(B T) S"), torch.zeros(10, 3), {}, {"B", "T"}, None, lambda n: n, "z") == ["B", "T"]
    with pytest.raises(L.LayoutError, match="3 dims"):
        L.bind(L.parse("B T S"), torch.zeros(2, 3), {}, set(), None, lambda n: n, "w")


def test_unfold_fold_roundtrip_with_ellipsis():
    lay = L.parse("(B T) ... C")
    x = torch.arange(2 * 5 * 3 * 7 * 4.0).reshape(10, 3, 7, 4)
    u, names = L.unfold(lay, x, {"B": 2, "T": 5})
    assert u.shape == (2, 5, 3, 7, 4) and names == ["B", "T", "...", "...", "C"]
    assert torch.equal(u[1, 2], x[1 * 5 + 2])                  # row b·T + t
    assert torch.equal(L.fold(lay, u, {"B": 2, "T": 5}), x)


def test_positions():
    assert longseq.position_range(5, 3, 2) == range(4, 5)
    assert longseq.positions(7, None).tolist() == list(range(7))    # one rank holds everything
    assert longseq.position_offset(7, None) == 0


def test_call_reads_and_writes_by_name_or_position():
    def f(x, timestep=None, *, num_frames=1):
        return x
    c = dsp.Call(f, (1,), {"timestep": 2})
    assert c["x"] == c[0] == 1 and c["timestep"] == 2 and c["num_frames"] == 1 and "num_frames" not in c
    c["num_frames"] = 5
    c[0] = 3
    assert c.args == (3, 2) and c.kwargs == {"num_frames": 5}
    with pytest.raises(KeyError):
        c["nope"] = 1


def test_plan_validation_names_the_entry():
    B_ = dsp.Boundary
    with pytest.raises(dsp.PlanError, match=r"input 'mask' layout '\(B S\) N' has no dimension 'T'"):
        dsp.Plan(name="p", home="T", input=(B_("(B T) C"), B_("(B S) N", name="mask")), output=B_("(B T) C"))
    with pytest.raises(dsp.PlanError, match="kwargs\\['num_frames'\\] names 'F'"):
        dsp.Plan(name="p", home="T", input=B_("(B T) C"), output=B_("(B T) C"), kwargs={"num_frames": "F"})
    with pytest.raises(dsp.PlanError, match=r"stage 'blk': layout '\(B T C': unclosed"):
        dsp.Plan(name="p", home="T", input=B_("(B T) C"), output=B_("(B T) C"),
                 stages=(("blk", dsp.Stage("(B T C", shard="T")),))
    p = dsp.Plan(name="p", home="T", input=B_("(B T) C"), output=B_("(B T) C"),
                 stages=(("blk", dsp.Stage("(B S) T C", shard="S")),))
    assert p.sharded_dims == ["T", "S"] and p.bound_names == {"B", "T", "S"}
    assert p.pinned().stages[0][1].shard == "T"


def test_parse_traces_under_compile_without_cache_warning():
    """Plans parse layouts inside the forward: Dynamo must trace that without an lru_cache warning."""
    import warnings

    def f(x):
        return x * len(L.parse("(B T) S C").names)

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        torch._dynamo.reset()
        y = torch.compile(f, backend="eager", fullgraph=True)(torch.ones(3))
    assert torch.equal(y, torch.full((3,), 4.0))
    assert not [m for m in w if "lru_cache" in str(m.message)], [str(m.message)[:120] for m in w]
