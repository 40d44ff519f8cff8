"""The single-dimension SP baselines (Ulysses, ring, Megatron-SP, USP) on the tiny ST-DiT equal one
process, and move exactly the volumes of DESIGN.md's table per block; DSP alongside.

Each case runs, on P gloo ranks, ``longseq.sp.parallelize(model, group, method)``, a forward, an MSE
loss, a backward and ``longseq.sync_gradients``, twice: with the output gathered (loss on the whole
output) and with it left sharded (``dsp.sharded_mse_loss`` on this rank's frames). The reference is
the same model (``init_for_testing``: every gradient nonzero) on the same inputs in this process.

Tolerance (float32), per tensor: ``max|a - b| <= 1e-5 * max|b| + 1e-8`` for the output, the loss
and every parameter gradient (as DSP's tests).

Volumes: per rank, per block, forward and backward, the elements sent by the block's temporal
attention (the tags of its path) equal counts computed here from the shapes; with m = B·(T/P)·S·C:
Ulysses 4m(P-1)/P each way; ring 2m(P-1) forward, 4m(P-1) backward (k, v again, then dk, dv);
Megatron-SP 2m(P-1) each way; USP u x r: 4m(u-1)/u + 2m(r-1) forward, 4m(u-1)/u + 4m(r-1) backward;
DSP 2m(P-1)/P each way. Nothing else communicates inside the blocks.
"""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import longseq
from longseq.ledger import LEDGER

from .tensor_checks import assert_close, param_grads

STD = 0.1
C_IN, C_TEXT, N_TEXT, HIDDEN, HEADS, DEPTH = 4, 16, 3, 32, 4, 2


def _model(patch):
    from longseq.models import STDiT, init_for_testing, stdit_config
    return init_for_testing(STDiT(stdit_config("tiny", patch_size=patch, num_heads=HEADS)), std=STD, seed=0)


def _inputs(shape, seed):
    B, T, H, W = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C_IN, T, H, W, generator=g)
    ts = torch.rand(B, generator=g) * 1000
    y = torch.randn(B, N_TEXT, C_TEXT, generator=g)
    y_mask = torch.ones(B, N_TEXT, dtype=torch.bool)
    y_mask[0, -1] = False
    target = torch.randn(B, C_IN, T, H, W, generator=g)
    return x, ts, y, y_mask, target




def _run_methods(methods, shape, patch, seed):
    """On every rank: each (method, options) with both loss paths; rank 0 returns the tensors."""
    from longseq import dsp
    import longseq.sp as sp
    W = dist.group.WORLD
    groups = longseq.from_existing_groups(W)
    model = _model(patch)
    x, ts, y, y_mask, target = _inputs(shape, seed)
    out = {}
    for method, opts in methods:
        res = {}
        handle = sp.parallelize(model, W, method, **opts)
        with LEDGER.recording() as rec:
            pred = model(x, ts, y, y_mask)
            loss = F.mse_loss(pred, target)
            with LEDGER.recording() as rec_bwd:
                loss.backward()
        longseq.sync_gradients(model.parameters(), groups)
        res.update(out=pred.detach(), loss=loss.detach(), grads=param_grads(model),
                   records=[(r.op, r.tag, r.elements_sent) for r in rec],
                   bwd_tags=sorted({r.tag for r in rec_bwd}))
        handle.remove()
        model.zero_grad(set_to_none=True)
        handle = sp.parallelize(model, W, method, gather_output=False, **opts)
        pred = model(x, ts, y, y_mask)
        loss = dsp.sharded_mse_loss(pred, handle.shard_target(target), W)
        loss.backward()
        longseq.sync_gradients(model.parameters(), groups)
        res.update(loss_sharded=loss.detach(), grads_sharded=param_grads(model))
        handle.remove()
        model.zero_grad(set_to_none=True)
        # the model is as before: no attn_fn, no hooks left
        assert all(m.attn_fn is None for m in model.modules() if hasattr(m, "attn_fn"))
        if dist.get_rank() != 0:
            res = {"records": res["records"], "loss": res["loss"]}
        out[(method, tuple(sorted(opts.items())))] = res
    return out


_REF: dict = {}


def _reference(shape, patch, seed):
    key = (shape, patch, seed)
    if key not in _REF:
        model = _model(patch)
        x, ts, y, y_mask, target = _inputs(shape, seed)
        pred = model(x, ts, y, y_mask)
        loss = F.mse_loss(pred, target)
        loss.backward()
        _REF[key] = (pred.detach(), loss.detach(), param_grads(model))
    return _REF[key]


def _close(a, b, what, rtol=1e-5, atol=1e-8):
    assert_close(a, b, what, rtol, atol)


_RUNS: dict = {}


def _results(pool_of, P, methods, shape, patch=2, seed=1):
    key = (P, tuple((m, tuple(sorted(o.items()))) for m, o in methods), shape, patch, seed)
    if key not in _RUNS:
        _RUNS[key] = pool_of(P).run(_run_methods, methods, shape, patch, seed)
    return _RUNS[key]


ALL4 = [("dsp", {}), ("ulysses", {}), ("ring", {}), ("megatron_sp", {}), ("usp", {"ulysses_degree": 2})]
# (P, methods, (B, T, H, W)); patch 2 -> S = ceil(H/2)·ceil(W/2)
CASES = [
    (2, ALL4 + [("usp", {"ulysses_degree": 1})], (2, 4, 4, 4)),                   # T=4, S=4
    (4, ALL4, (2, 8, 4, 8)),                                                       # T=8, S=8; USP 2x2
    (3, [("ring", {}), ("megatron_sp", {}), ("dsp", {})], (1, 6, 4, 6)),          # ring at P=3, S=6
    (3, [("ring", {}), ("megatron_sp", {}), ("usp", {"ulysses_degree": 1})], (2, 5, 4, 4)),   # T=5: uneven frames
    (2, [("ulysses", {}), ("ring", {}), ("usp", {"ulysses_degree": 2})], (1, 3, 2, 6)),        # T=3: uneven frames
]


def _case_id(c):
    return f"P{c[0]}-T{c[2][1]}"


@pytest.mark.parametrize("P,methods,shape", CASES, ids=[_case_id(c) for c in CASES])
def test_equals_single_process(dist_pool, P, methods, shape):
    res = _results(dist_pool, P, methods, shape)
    ref_out, ref_loss, ref_grads = _reference(shape, 2, 1)
    for (method, opts), r in res[0].items():
        name = f"{method}{dict(opts) or ''} P={P}"
        _close(r["out"], ref_out, f"{name}: output")
        _close(r["loss"], ref_loss, f"{name}: loss")
        _close(r["loss_sharded"], ref_loss, f"{name}: sharded loss")
        assert set(r["grads"]) == set(ref_grads)
        for n, g in ref_grads.items():
            assert g.abs().max() > 0, n
            _close(r["grads"][n], g, f"{name}: grad {n}")
            _close(r["grads_sharded"][n], g, f"{name}: grad {n} (sharded loss)")
    for rank_res in res[1:]:
        for key, r in rank_res.items():
            assert torch.equal(r["loss"], res[0][key]["loss"])


# ----------------------------------------------------------------------------------------------
# Volumes per block
# ----------------------------------------------------------------------------------------------
def _expected(method, opts, P, r, B, T, S, C, H):
    """(forward, backward) elements sent by rank r in one block's temporal attention (or DSP's
    temporal stage), from the shapes; even sizes (P | T, P | S, P | H)."""
    Tr, Sr, D = T // P, S // P, C // H
    N = B * S                                  # temporal attention: one sequence per location
    if method == "dsp":
        t2s = B * Tr * (S - Sr) * C            # keep my S-piece of my frames, send the rest
        s2t = B * Sr * (T - Tr) * C
        return t2s + s2t, s2t + t2s
    if method == "ulysses":
        a2a_in = N * Tr * (H - H // P) * D     # q, k, v: my frames, the heads that leave
        a2a_out = N * (T - Tr) * (H // P) * D  # out: my heads, the frames that leave
        return 3 * a2a_in + a2a_out, 3 * a2a_in + a2a_out
    if method == "ring":
        kv = 2 * N * Tr * C                    # k and v of one rank's frames
        return kv * (P - 1), kv * (P - 1) + kv * (P - 1)
    if method == "megatron_sp":
        ag = N * Tr * C * (P - 1)              # my frames to every peer
        rs = N * (T - Tr) * C                  # partial sums of the other ranks' frames
        return ag + rs, rs + ag
    if method == "usp":
        u = opts["ulysses_degree"]
        rd = P // u
        a2a_in = N * Tr * (H - H // u) * D
        a2a_out = N * (u * Tr - Tr) * (H // u) * D
        kv = 2 * N * (u * Tr) * (H // u) * D  # after the all-to-all: the group's frames, my heads
        return 3 * a2a_in + a2a_out + kv * (rd - 1), 3 * a2a_in + a2a_out + 2 * kv * (rd - 1)
    raise AssertionError(method)


def _block_sent(records, method, block):
    prefix = f"dsp.blocks.{block}.temporal." if method == "dsp" else f"{method}.blocks.{block}.temporal.attn."
    fwd = sum(s for _, tag, s in records if tag.startswith(prefix) and ".bwd" not in tag)
    bwd = sum(s for _, tag, s in records if tag.startswith(prefix) and ".bwd" in tag)
    return fwd, bwd


@pytest.mark.parametrize("P,shape", [(2, (2, 4, 4, 4)), (4, (2, 8, 4, 8))])
def test_volume_per_block_matches_formula(dist_pool, P, shape):
    import longseq.sp as sp
    methods = [c[1] for c in CASES if c[0] == P and c[2] == shape][0]
    res = _results(dist_pool, P, methods, shape)
    B, T, Hh, Ww = shape
    S, C = (Hh // 2) * (Ww // 2), HIDDEN
    m = B * (T // P) * S * C
    lines = [f"\nP={P}, [B, T, S, C] = [{B}, {T}, {S}, {C}], m = {m}: elements sent per rank per block (fwd + bwd)"]
    totals = {}
    for (method, opts), _ in res[0].items():
        o = dict(opts)
        for r, rank_res in enumerate(res):
            records = rank_res[(method, opts)]["records"]
            exp = _expected(method, o, P, r, B, T, S, C, HEADS)
            for blk in range(DEPTH):
                got = _block_sent(records, method, blk)
                assert got == exp, f"{method}{o} rank {r} block {blk}: sent {got}, expected {exp}"
            # nothing else inside the blocks communicates (only the boundary: check, exit gather)
            inside = {tag for _, tag, _ in records if ".blocks." in tag}
            assert all(t.startswith(("dsp.blocks.", f"{method}.blocks.")) and ".temporal" in t for t in inside), inside
        # the formula of DESIGN.md's table (longseq.sp.block_volume) agrees with the counts
        fwd, bwd = sp.block_volume(method, m, P, o.get("ulysses_degree"))
        assert (fwd, bwd) == tuple(float(x) for x in _expected(method, o, P, 0, B, T, S, C, HEADS))
        totals[(method, opts)] = fwd + bwd
    dsp_total = totals[("dsp", ())]
    for (method, opts), tot in totals.items():
        lines.append(f"  {method + (str(dict(opts)) if opts else ''):<28} {int(tot):>8}   x{tot / dsp_total:.2f} DSP")
    print("\n".join(lines))
    assert all(tot >= 2 * dsp_total for (m_, _), tot in totals.items() if m_ != "dsp")


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------
def _errors():
    import longseq.sp as sp
    W = dist.group.WORLD
    msgs = {}

    def catch(name, fn):
        try:
            h = fn()
            msgs[name] = None
            if hasattr(h, "remove"):
                h.remove()
        except (ValueError, TypeError) as e:
            msgs[name] = f"{type(e).__name__}: {e}"

    model = _model(2)                        # 4 heads; the world is 3 ranks
    catch("unknown", lambda: sp.parallelize(model, W, "deepspeed"))
    catch("ulysses_heads", lambda: sp.parallelize(model, W, "ulysses"))
    catch("usp_degree", lambda: sp.parallelize(model, W, "usp", ulysses_degree=2))
    catch("usp_heads", lambda: sp.parallelize(model, W, "usp", ulysses_degree=3))
    catch("ring_option", lambda: sp.parallelize(model, W, "ulysses", ulysses_degree=1))
    catch("dsp_option", lambda: sp.parallelize(model, W, "dsp", ulysses_degree=1))
    from longseq.models import STDiT, stdit_config
    two = STDiT(stdit_config("tiny"))       # 2 heads < 3 ranks
    catch("megatron_heads", lambda: sp.parallelize(two, W, "megatron_sp"))
    # T = 2 frames over 3 ranks: every rank needs a frame (raised at the first forward, on every rank)
    x, ts, y, y_mask, _ = _inputs((1, 2, 4, 4), 0)
    h = sp.parallelize(model, W, "ring")
    catch("t_lt_p", lambda: model(x, ts, y))
    h.remove()
    catch("kernel", lambda: sp.parallelize(model, W, "ring", kernel="flash"))
    catch("dtype", lambda: sp.parallelize(model, W, "ring", grad_comm_dtype="half-ish"))
    # no state is left behind by the failed calls: a valid parallelize still works (config-style names)
    catch("ok", lambda: sp.parallelize(model, W, "ring", grad_comm_dtype="bf16"))
    return msgs


def test_errors(dist_pool):
    msgs = dist_pool(3).run(_errors)[0]
    assert "unknown sequence-parallel method 'deepspeed'" in msgs["unknown"] and "ulysses" in msgs["unknown"]
    assert "must divide the number of attention heads (4)" in msgs["ulysses_heads"]
    assert "ulysses_degree=2 must divide the SP group size 3" in msgs["usp_degree"]
    assert "USP's Ulysses degree" in msgs["usp_heads"] and "(4)" in msgs["usp_heads"]
    assert "options of method 'usp'" in msgs["ring_option"]
    assert "method 'dsp' takes no ulysses_degree" in msgs["dsp_option"]
    assert "2 attention heads" in msgs["megatron_heads"]
    assert "cannot shard" in msgs["t_lt_p"] and "size 2 over 3 ranks" in msgs["t_lt_p"]
    assert "unknown ring attention kernel 'flash'" in msgs["kernel"]
    assert "grad_comm_dtype 'half-ish'" in msgs["dtype"]
    assert msgs["ok"] is None
