"""The tiny ST-DiT trained DSP-parallel equals one process; the ledger matches the DSP formula.

Each case runs, on P gloo ranks, ``dsp.parallelize(model, group)`` with the default plan
(``dsp.STDIT_PLAN``), a forward, an MSE loss and a backward, then ``longseq.sync_gradients``; once
with the output gathered (loss on the whole output, identical on every rank) and once with the
output left sharded (``dsp.sharded_mse_loss`` on the pieces). The reference is the same model (same
weights: ``init_for_testing``, which makes every gradient nonzero) on the same inputs in this
process, unparallelized.

Tolerance (float32), per tensor: ``max|a - b| <= 1e-5 * max|b| + 1e-8`` for the output, the loss and
every parameter gradient (the reference run itself differs from a float64 run by about 1e-6
relative); float64 runs: ``1e-12 * max|b|``.
"""
import functools
import re

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from longseq import dsp
import longseq
from longseq.ledger import LEDGER
from longseq.sharding import shard_range, split_sizes

from .tensor_checks import assert_close, param_grads

STD = 0.1          # init_for_testing's scale: large enough that every gradient is well above roundoff
C_IN, C_TEXT, N_TEXT, HIDDEN, DEPTH = 4, 16, 3, 32, 2

# (P, (B, T, H, W), patch): S = ceil(H/p)·ceil(W/p)
CASES = [
    (1, (2, 3, 4, 4), 2),     # T=3, S=4 on one rank
    (2, (2, 4, 4, 4), 2),     # T=4, S=4: even
    (2, (2, 5, 3, 3), 1),     # T=5, S=9: uneven both ways
    (3, (2, 7, 2, 5), 1),     # T=7, S=10: uneven both ways
    (4, (2, 8, 4, 8), 2),     # T=8, S=8: even
    (4, (2, 5, 3, 3), 1),     # T=5, S=9: uneven both ways
]


def _model(patch, dtype=torch.float32, seed=0):
    from longseq.models import STDiT, init_for_testing, stdit_config
    cfg = stdit_config("tiny", patch_size=patch)
    assert (cfg.hidden_size, cfg.depth, cfg.caption_channels) == (HIDDEN, DEPTH, C_TEXT)
    return init_for_testing(STDiT(cfg), std=STD, seed=seed).to(dtype)


def _inputs(shape, seed, dtype=torch.float32):
    B, T, H, W = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C_IN, T, H, W, generator=g, dtype=dtype)
    ts = torch.rand(B, generator=g, dtype=dtype) * 1000
    y = torch.randn(B, N_TEXT, C_TEXT, generator=g, dtype=dtype)
    y_mask = torch.ones(B, N_TEXT, dtype=torch.bool)
    y_mask[0, -1] = False                                  # one shorter caption: the masked path
    target = torch.randn(B, C_IN, T, H, W, generator=g, dtype=dtype)
    return x, ts, y, y_mask, target




def _records(rec):
    return [(r.op, r.tag, r.elements_sent, r.elements_recv, r.bytes_sent) for r in rec]


# ----------------------------------------------------------------------------------------------
# Workers (run on every rank)
# ----------------------------------------------------------------------------------------------
def _dsp_run(shape, patch, dtype, seed):
    W = dist.group.WORLD
    groups = longseq.from_existing_groups(W)
    model = _model(patch, dtype)
    x, ts, y, y_mask, target = _inputs(shape, seed, dtype)
    res = {}
    # 1. output gathered: the loss is computed on the whole output, identically on every rank
    handle = dsp.parallelize(model, W)
    with LEDGER.recording() as rec:
        out = model(x, ts, y, y_mask)
        loss = F.mse_loss(out, target)
        loss.backward()
    longseq.sync_gradients(model.parameters(), groups)
    res.update(out=out.detach(), loss=loss.detach(), grads=param_grads(model), records=_records(rec))
    handle.remove()
    model.zero_grad(set_to_none=True)
    # 2. output left sharded: the loss is reduced from the pieces
    handle = dsp.parallelize(model, W, gather_output=False)
    with LEDGER.recording() as rec:
        out_local = model(x, ts, y, y_mask)
        loss = dsp.sharded_mse_loss(out_local, handle.shard_target(target), W)
        loss.backward()
    longseq.sync_gradients(model.parameters(), groups)
    res.update(out_local=out_local.detach(), loss_sharded=loss.detach(), grads_sharded=param_grads(model),
               records_sharded=_records(rec))
    handle.remove()
    return res


def _dsp_sp_dp(shape, patch):
    """World 4 = SP 2 x DP 2: each SP group trains on its own sample; gradients summed over SP,
    averaged over DP."""
    groups = longseq.init_parallel_groups(sp_size=2)
    model = _model(patch)
    x, ts, y, y_mask, target = _inputs(shape, seed=100 + groups.dp_rank)
    handle = dsp.parallelize(model, groups)           # a ParallelGroups: its SP group is used
    loss = F.mse_loss(model(x, ts, y, y_mask), target)
    loss.backward()
    longseq.sync_gradients(model.parameters(), groups)
    handle.remove()
    return loss.detach(), param_grads(model)


@functools.lru_cache(maxsize=None)
def _reference(shape, patch, dtype, seeds):
    """One process, no DSP: the loss averaged over the samples ``seeds``, its gradients."""
    model = _model(patch, dtype)
    outs, losses = [], []
    for s in seeds:
        x, ts, y, y_mask, target = _inputs(shape, s, dtype)
        out = model(x, ts, y, y_mask)
        outs.append(out.detach())
        losses.append(F.mse_loss(out, target))
    loss = sum(losses) / len(losses)
    loss.backward()
    return outs, [l.detach() for l in losses], param_grads(model)


_RUNS: dict = {}


def _run(pool_of, P, shape, patch, dtype=torch.float32, seed=1):
    key = (P, shape, patch, dtype, seed)
    if key not in _RUNS:
        _RUNS[key] = pool_of(P).run(_dsp_run, shape, patch, dtype, seed)
    return _RUNS[key]


def _close(a, b, what, rtol=1e-5, atol=1e-8):
    assert_close(a, b, what, rtol, atol)


# ----------------------------------------------------------------------------------------------
# Equality with one process
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("P,shape,patch", CASES)
def test_equals_single_process(dist_pool, P, shape, patch):
    out = _run(dist_pool, P, shape, patch)
    (ref_out,), (ref_loss,), ref_grads = _reference(shape, patch, torch.float32, (1,))
    T = shape[1]
    assert all(g.abs().max() > 0 for g in ref_grads.values())
    for r, res in enumerate(out):
        _close(res["out"], ref_out, f"rank {r} output")
        a, b = shard_range(T, P, r)
        _close(res["out_local"], ref_out[:, :, a:b], f"rank {r} sharded output")
        _close(res["loss"], ref_loss, f"rank {r} loss")
        _close(res["loss_sharded"], ref_loss, f"rank {r} sharded loss")
        for path in ("grads", "grads_sharded"):
            assert res[path].keys() == ref_grads.keys()
            for name, g in res[path].items():
                assert g.abs().max() > 0, f"rank {r} {path}: {name} got a zero gradient"
                _close(g, ref_grads[name], f"rank {r} {path} {name}")


def test_equals_single_process_float64(dist_pool):
    """The same at float64, tightly: the parallel run computes the same function, not an approximation."""
    shape, patch = (1, 7, 2, 5), 1
    out = _run(dist_pool, 3, shape, patch, torch.float64)
    (ref_out,), (ref_loss,), ref_grads = _reference(shape, patch, torch.float64, (1,))
    for r, res in enumerate(out):
        _close(res["out"], ref_out, f"rank {r} output", rtol=1e-12, atol=0)
        _close(res["loss_sharded"], ref_loss, f"rank {r} sharded loss", rtol=1e-12, atol=0)
        for path in ("grads", "grads_sharded"):
            for name, g in res[path].items():
                _close(g, ref_grads[name], f"rank {r} {path} {name}", rtol=1e-12, atol=0)


def test_sp_times_dp_equals_single_process(dist_pool):
    shape, patch = (1, 5, 3, 3), 1                           # uneven over SP 2
    out = dist_pool(4).run(_dsp_sp_dp, shape, patch)
    _, ref_losses, ref_grads = _reference(shape, patch, torch.float32, (100, 101))
    for r, (loss, grads) in enumerate(out):
        _close(loss, ref_losses[r // 2], f"rank {r} loss")
        for name, g in grads.items():
            _close(g, ref_grads[name], f"rank {r} {name}")


# ----------------------------------------------------------------------------------------------
# Communication: the ledger against the DESIGN formula
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("P,shape,patch", [c for c in CASES if c[0] > 1])
def test_ledger_two_switches_per_block_each_way(dist_pool, P, shape, patch):
    out = _run(dist_pool, P, shape, patch)
    B, T, H, W = shape
    S = -(-H // patch) * -(-W // patch)
    C = HIDDEN
    ts, ss = split_sizes(T, P), split_sizes(S, P)
    for r, res in enumerate(out):
        recs = res["records"]
        a2a = [x for x in recs if x[0] == "all_to_all"]
        fwd = [x for x in a2a if not x[1].endswith(".bwd")]
        bwd = [x for x in a2a if x[1].endswith(".bwd")]
        assert len(fwd) == 2 * DEPTH and len(bwd) == 2 * DEPTH, [x[1] for x in a2a]
        # Each switch sends this rank's local activation minus the piece it keeps, computed here from
        # the tensor_split sizes: [B, T_r, S, C] -> keeps [B, T_r, S_r, C]; [B, T, S_r, C] -> keeps the same.
        t_to_s = (B * ts[r] * (S - ss[r]) * C, B * (T - ts[r]) * ss[r] * C)      # (sent, received)
        s_to_t = (t_to_s[1], t_to_s[0])
        for i in range(DEPTH):
            by_tag = {x[1]: x for x in a2a if x[1].startswith(f"dsp.blocks.{i}.")}
            assert sorted(by_tag) == sorted(f"dsp.blocks.{i}.temporal.{k}" for k in ("in", "out", "in.bwd", "out.bwd"))
            p = f"dsp.blocks.{i}.temporal."
            assert by_tag[p + "in"][2:4] == t_to_s        # forward T -> S before the temporal stage
            assert by_tag[p + "out"][2:4] == s_to_t       # forward S -> T after it
            assert by_tag[p + "out.bwd"][2:4] == t_to_s   # backward: each switched the other way
            assert by_tag[p + "in.bwd"][2:4] == s_to_t
            assert all(x[4] == 4 * x[2] for x in by_tag.values())   # float32 bytes
        if T % P == 0 and S % P == 0:                       # DESIGN: (P-1)·M/P² elements per switch
            M = B * T * S * C
            assert {x[2] for x in a2a} == {(P - 1) * M // P**2}
        # Everything else: the input check (an 8-byte digest per rank), the exit all-gather; the entry is free.
        others = sorted((x[0], x[1]) for x in recs if x[0] != "all_to_all")
        assert others == [("all_gather", "dsp.check"), ("all_gather", "dsp.exit")]
        assert next(x for x in recs if x[1] == "dsp.check")[2] == P - 1     # one int64 to each other rank
        exit_rec = next(x for x in recs if x[1] == "dsp.exit")
        assert exit_rec[2] == B * C_IN * ts[r] * H * W * (P - 1)
        # The sharded loss replaces the exit all-gather by one all-reduce of two numbers.
        others = sorted((x[0], x[1], x[2]) for x in res["records_sharded"] if x[0] != "all_to_all")
        assert others == [("all_gather", "dsp.check", P - 1), ("all_reduce", "dsp.loss", 2 * 2 * (P - 1) // P)]
        assert sorted(x[1:4] for x in res["records_sharded"] if x[0] == "all_to_all") == sorted(x[1:4] for x in a2a)


# ----------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------
def _bad(kind):
    W, P, r = dist.group.WORLD, dist.get_world_size(), dist.get_rank()
    model = _model(patch=1, seed=0 if kind != "params" or r != P - 1 else 5)
    shape, seed, check = (1, 5, 3, 3), 1, True
    if kind in ("T_small", "T_small_unchecked"):
        shape, check = (1, P - 1, 3, 3), kind == "T_small"
    elif kind == "S_small":
        shape = (1, 5, 1, P - 1)
    elif kind == "shapes" and r == 1:
        shape = (1, 6, 3, 3)
    elif kind == "values" and r == P - 1:
        seed = 2
    x, ts, y, y_mask, _ = _inputs(shape, seed)
    handle = dsp.parallelize(model, W, check_inputs=check)
    msg = None
    with LEDGER.recording() as rec:
        try:
            model(x, ts, y, y_mask)
        except ValueError as e:
            msg = str(e)
    handle.remove()
    return msg, [(x.op, x.tag) for x in rec]


DETAIL = [("all_gather", "dsp.check"), ("all_gather_object", "dsp.check.detail")]   # digest, then what differs


@pytest.mark.parametrize("kind,words,ops", [
    ("T_small", ["T (dim 2 of the model's input", "size 3", "4 ranks"], [("all_gather", "dsp.check")]),
    ("T_small_unchecked", ["T (dim 2", "size 3", "4 ranks"], []),
    ("S_small", ["S (dim 2 of the input of 'blocks.0.temporal'", "size 3", "4 ranks"],
     [("all_gather", "dsp.check")]),
    ("shapes", ["different shapes", "rank 1: argument 0 [1, 4, 6, 3, 3]", "rank 0: argument 0 [1, 4, 5, 3, 3]"],
     DETAIL),
    ("values", ["different values in argument 0", "same sample"], DETAIL),
    ("params", ["parameters differ"], DETAIL),
])
def test_bad_inputs_raise_on_every_rank(dist_pool, kind, words, ops):
    """Every rank raises the same clear ValueError (no hang), before any all-to-all."""
    for r, (msg, seen) in enumerate(dist_pool(4).run(_bad, kind)):
        assert msg is not None, f"rank {r}: no error"
        for w in words:
            assert w in msg, (w, msg)
        assert seen == ops, (r, seen)


def test_unknown_plan_path():
    model = _model(patch=2)
    plan = dsp.Plan(name="typo", home="T", input=dsp.Boundary("B C T H W"), output=dsp.Boundary("B C T H W"),
                    stages=(("blocks.*.spatail", dsp.Stage("B T S C", shard="T")),))
    with pytest.raises(ValueError, match=re.escape("'blocks.*.spatail'")) as e:
        dsp.parallelize(model, None, plan=plan)
    assert "blocks.0.spatial" in str(e.value)
    with pytest.raises(ValueError, match="no submodule of Linear matches the path 'embed'"):
        dsp.parallelize(torch.nn.Linear(2, 2), None)            # the default plan is ST-DiT's
    with pytest.raises(ValueError, match="unknown DSP plan 'nope'"):
        dsp.parallelize(model, None, plan="nope")
    with pytest.raises(ValueError, match="has no dimension 'S'"):
        dsp.Plan(name="bad", home="T", input=dsp.Boundary("B C T H W"), output=dsp.Boundary("B C T H W"),
                 stages=(("final", dsp.Stage("B T C", shard="S")),))


def test_parallelize_is_undone_by_remove():
    model = _model(patch=2)
    x, ts, y, y_mask, _ = _inputs((1, 3, 4, 4), 1)
    before = model(x, ts, y, y_mask)
    handle = dsp.parallelize(model, None, plan=dsp.STDIT_PLAN)
    assert [p for p, _, _ in handle.stages] == ["embed", "blocks.0.spatial", "blocks.1.spatial",
                                                "blocks.0.temporal", "blocks.1.temporal", "final"]
    with pytest.raises(ValueError, match="already parallelized"):
        dsp.parallelize(model, None)
    with pytest.raises(RuntimeError, match="outside a forward"):
        model.blocks[0].spatial(torch.zeros(1, 3, 4, HIDDEN), torch.zeros(1, 6 * HIDDEN), torch.zeros(1, 2, HIDDEN))
    handle.remove()
    assert torch.equal(model(x, ts, y, y_mask), before)        # no hooks left: no distributed call either
    with dsp.parallelize(model, None, plan="stdit"):           # a context manager too
        pass
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def _check_modes():
    W, r = dist.group.WORLD, dist.get_rank()
    model = _model(patch=1)
    counts, msgs = {}, {}
    with torch.no_grad():
        for mode in (True, "always", "new", False):
            handle = dsp.parallelize(model, W, check_inputs=mode)
            with LEDGER.recording() as rec:
                for shape, seed in [((1, 4, 3, 3), 1), ((1, 4, 3, 3), 2), ((1, 5, 3, 3), 3), ((1, 4, 3, 3), 4)]:
                    x, ts, y, y_mask, _ = _inputs(shape, seed)
                    model(x, ts, y, y_mask)
            counts[str(mode)] = (rec.count("all_gather", tag="dsp.check"),
                                 rec.count("all_gather_object", tag="dsp.check.detail"))
            handle.remove()

        def second_step_error(x2_shape, seed2):
            handle = dsp.parallelize(model, W)            # the default
            model(*_inputs((1, 4, 3, 3), 1)[:4])
            try:
                model(*_inputs(x2_shape, seed2)[:4])
                return None
            except ValueError as e:
                return str(e)
            finally:
                handle.remove()

        # an SP rank loading a different sample on a later step
        msgs["values"] = second_step_error((1, 4, 3, 3), 2 + (r == 1))
        # a later step where rank 0 sees a shape it has seen and rank 1 a new one: with a check only
        # on new signatures rank 1 would wait in it while rank 0 went on to the all-to-alls
        msgs["shapes"] = second_step_error((1, 4, 3, 3) if r == 0 else (1, 6, 3, 3), 2)
    return counts, msgs


def test_input_check_modes(dist_pool):
    for counts, msgs in dist_pool(2).run(_check_modes):
        # default: an 8-byte digest every forward, the details never (nothing differs)
        assert counts == {"True": (4, 0), "always": (4, 0), "new": (2, 0), "False": (0, 0)}
        assert msgs["values"] is not None and "different values" in msgs["values"]
        assert msgs["shapes"] is not None and "different shapes" in msgs["shapes"]
