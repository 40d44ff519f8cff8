"""torch.compile(fullgraph=True) of sequence-parallel blocks matches eager, and the ledger agrees.

On 2 gloo ranks (CPU, inductor's C++ backend): an ST-DiT whose blocks are compiled with
``fullgraph=True`` under DSP, and a GLA model whose layers are compiled under ZeCO, each against
the same model run eagerly: output, loss and every parameter gradient within
``max|a - b| <= 1e-4 * max|b| + 1e-7`` (float32; inductor fuses and reorders reductions), and the
ledger rows of the compiled step (its first call, which compiles: no collective runs while tracing)
equal the eager step's, row for row. ``fullgraph=True`` makes any graph break an error.
Also: every custom op of :mod:`longseq.ops` passes ``torch.library.opcheck`` on a 2-rank group.
"""
import os

import pytest
import torch
import torch.distributed as dist

from longseq.ledger import LEDGER

from .tensor_checks import assert_close, param_grads

RTOL, ATOL = 1e-4, 1e-7
TIMEOUT = float(os.environ.get("LONGSEQ_TEST_TIMEOUT", 300)) * 2   # compiling on 2 loaded cores is slow


def _rows(rec):
    return [(r.op, r.tag, r.group_size, r.dtype, r.elements_sent, r.elements_recv) for r in rec]


def _step(model, loss_fn, inputs):
    for p in model.parameters():
        p.grad = None
    with LEDGER.recording() as rec:
        out = model(*inputs)
        loss = loss_fn(out)
        loss.backward()
    return out.detach(), loss.detach(), param_grads(model), _rows(rec)


def _compare(eager, compiled):
    (o0, l0, g0, r0), (o1, l1, g1, r1) = eager, compiled
    assert_close(o1, o0, "output", RTOL, ATOL)
    assert_close(l1, l0, "loss", RTOL, ATOL)
    assert g0.keys() == g1.keys()
    for n in g0:
        assert_close(g1[n], g0[n], f"grad {n}", RTOL, ATOL)
    assert r1 == r0, f"ledger rows differ:\neager    {r0}\ncompiled {r1}"
    return len(r0)


# ----------------------------------------------------------------------------------------------
# DSP: ST-DiT blocks compiled
# ----------------------------------------------------------------------------------------------
def _stdit_worker():
    from longseq import dsp
    from longseq.models import STDiT, init_for_testing, stdit_config
    torch._dynamo.reset()
    W = dist.group.WORLD
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 4, 4, 4, generator=g)           # B=1, C=4, T=4, H=W=4, patch 2: S=4
    ts, y = torch.rand(1, generator=g) * 1000, torch.randn(1, 3, 16, generator=g)
    target = torch.randn(1, 4, 4, 4, 4, generator=g)
    runs = []
    for compiled in (False, True):
        model = init_for_testing(STDiT(stdit_config("tiny", patch_size=2, depth=1)), std=0.1, seed=0)
        dsp.parallelize(model, W)                           # the entry check stays eager, outside the blocks
        if compiled:
            for blk in model.blocks:                        # each block: spatial, temporal and their switches
                blk.compile(fullgraph=True)
        runs.append(_step(model, lambda o: torch.nn.functional.mse_loss(o, target), (x, ts, y, None)))
    return _compare(*runs), [r[1] for r in runs[1][3]]


def test_compiled_stdit_block_under_dsp_matches_eager(dist_pool):
    for n, tags in dist_pool(2).run(_stdit_worker, timeout=TIMEOUT):
        assert n > 0
        assert any(t.startswith("dsp.blocks.0.temporal.in") for t in tags)
        assert any(t.endswith(".bwd") for t in tags)


# ----------------------------------------------------------------------------------------------
# ZeCO: a GLA layer compiled
# ----------------------------------------------------------------------------------------------
def _gla_worker(method):
    from longseq import zeco
    from longseq.models.gla import GLAForCausalLM, gla_config
    torch._dynamo.reset()
    W = dist.group.WORLD
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (1, 24), generator=g)                       # T=24 over 2 ranks
    ids_local = zeco.shard_sequence(ids, W)
    labels = zeco.shard_sequence(zeco.shift_labels(ids), W)
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = GLAForCausalLM(gla_config("tiny", num_layers=1, backend="torch"))
        zeco.parallelize(model, W, method=method, check=False)
        if compiled:
            model.layers[0].compile(fullgraph=True)                         # projections, gates, norms, sp_gla
        runs.append(_step(model, lambda o: zeco.sp_lm_loss(o, labels, W), (ids_local,)))
    return _compare(*runs), [r[1] for r in runs[1][3]]


@pytest.mark.parametrize("method", ["zeco"])
def test_compiled_gla_layer_under_zeco_matches_eager(dist_pool, method):
    for n, tags in dist_pool(2).run(_gla_worker, method, timeout=TIMEOUT):
        assert n > 0
        assert any(t == f"zeco.scan.fwd" for t in tags) and any(t == "zeco.scan.bwd" for t in tags)


# ----------------------------------------------------------------------------------------------
# opcheck: schema, fake implementation, autograd registration, AOT dispatch
# ----------------------------------------------------------------------------------------------
def _opcheck_worker():
    from longseq.ops import OPS, group_name
    name = group_name(dist.group.WORLD)
    r = dist.get_rank()
    x = torch.randn(4 - r, 4, 6, dtype=torch.float64, requires_grad=True)   # dim 0 uneven (tensor_split): 4 / 3
    w = torch.randn(5, 4, 6, dtype=torch.float64, requires_grad=True)       # the same shape on both ranks
    cases = {
        "all_to_all": (x, name, 1, 0, [4, 3], "t"),
        "all_gather": (x, name, 0, [4, 3], "t"),
        "reduce_scatter": (w, name, 0, "t"),
        "gather_whole": (x, name, 0, [4, 3], "t"),
        "shard_whole": (w, name, 0, "t"),
        "all_reduce_sum": (w, name, "t"),
    }
    assert cases.keys() == OPS.keys()
    for op, args in cases.items():
        torch.library.opcheck(OPS[op], args)
    return sorted(cases)


def test_custom_ops_pass_opcheck(dist_pool):
    for names in dist_pool(2).run(_opcheck_worker, timeout=TIMEOUT):
        assert len(names) == 6


# ----------------------------------------------------------------------------------------------
# The baselines' collectives: Ulysses' all-to-alls, ring's p2p steps, Megatron-SP's gather/scatter
# ----------------------------------------------------------------------------------------------
def _baselines_worker():
    from longseq.sp.megatron_sp import gather_sequence, scatter_sequence
    from longseq.sp.ring import ring_attention
    from longseq.sp.ulysses import ulysses_attention
    torch._dynamo.reset()
    W = dist.group.WORLD
    g = torch.Generator().manual_seed(2 + dist.get_rank())
    x = torch.randn(1, 6, 2, 8, generator=g)                 # [B, L_r, H, D], this rank's piece
    w = torch.randn(8, 8, generator=torch.Generator().manual_seed(7))

    def f(x, w):
        q = x @ w
        # the check is eager-only; the lengths given (eager would otherwise learn them, compiled assume equal)
        a = ulysses_attention(q, x, x, W, check=False, seq_len=12)
        b = ring_attention(q, a, a, W, causal=True, check=False, seq_sizes=[6, 6])
        h = gather_sequence(b.flatten(2), W, dim=1)          # [B, L, H·D]: Megatron-SP's region
        return scatter_sequence(h * h, W, dim=1)

    runs = []
    for fn in (f, torch.compile(f, fullgraph=True)):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        with LEDGER.recording() as rec:
            y = fn(xs, ws)
            y.square().sum().backward()
        runs.append((y.detach(), xs.grad, ws.grad, _rows(rec)))
    (y0, dx0, dw0, r0), (y1, dx1, dw1, r1) = runs
    for a, b, what in ((y1, y0, "output"), (dx1, dx0, "dx"), (dw1, dw0, "dw")):
        assert_close(a, b, what, RTOL, ATOL)
    assert r1 == r0, f"ledger rows differ:\neager    {r0}\ncompiled {r1}"
    return sorted({r[1] for r in r0})


def test_compiled_baseline_collectives_match_eager(dist_pool):
    for tags in dist_pool(2).run(_baselines_worker, timeout=TIMEOUT):
        for t in ("ring.kv", "ring.bwd.kv", "ring.bwd.dkv", "megatron_sp.rs", "megatron_sp.rs.bwd"):
            assert t in tags, (t, tags)
        assert any(t.startswith("ulysses") for t in tags)
