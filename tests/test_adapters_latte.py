"""diffusers' LatteTransformer3DModel made DSP-parallel by models.adapters.latte equals one process.

Each case runs, on P gloo ranks, ``latte.parallelize(model, group)``, a forward, an MSE loss and a
backward, then ``longseq.sync_gradients``: once with the output gathered (loss on the whole output)
and once with it left sharded (``dsp.sharded_mse_loss`` on the pieces). The reference is the same
model (same weights) on the same inputs in this process, not parallelized. Every parameter is
re-initialised N(0, 0.1²) (``models.stdit.init_for_testing``), so layers that a checkpoint may hold
at zero (proj_out, the adaLN tables) pass gradient on, and every gradient is asserted nonzero.

Sizes that P does not divide: T = 5 frames and a 6x6 latent with patch 2, S = 9 tokens per frame;
at P = 3 the frames split 2/2/1 (a rank with one frame, where Latte itself skips its temporal
position add) and the tokens 3/3/3; at P = 2, 3/2 and 5/4.

Tolerance (float32), per tensor: ``max|a - b| <= 1e-5 * max|b| + 1e-8`` for the output, the loss
and every parameter gradient.
"""
import functools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

pytest.importorskip("diffusers")

from longseq import dsp  # noqa: E402
import longseq  # noqa: E402
from longseq.ledger import LEDGER  # noqa: E402
from longseq.sharding import shard_range, split_sizes  # noqa: E402

from .tensor_checks import assert_close, param_grads  # noqa: E402

B, C_IN, N_TEXT, C_TEXT = 2, 4, 3, 12
RTOL, ATOL = 1e-5, 1e-8


def _model(T, H):
    from longseq.adapters import latte
    from longseq.models.stdit import init_for_testing
    return init_for_testing(latte.build(video_length=T, sample_size=H), std=0.1, seed=0)


def _inputs(T, H, W, seed=1, mask=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C_IN, T, H, W, generator=g)
    t = torch.tensor([17, 640])
    y = torch.randn(B, N_TEXT, C_TEXT, generator=g)
    target = torch.randn(B, 8, T, H, W, generator=g)
    m = None
    if mask:   # per frame (Latte's spatial blocks have batch B·T): sample 0's last caption token masked
        m = torch.ones(B * T, N_TEXT, dtype=torch.bool)
        m[:T, -1] = False
    return x, t, y, m, target




def _latte_run(T, H, W, mask):
    from longseq.adapters import latte
    W_ = dist.group.WORLD
    groups = longseq.from_existing_groups(W_)
    model = _model(T, H)
    x, t, y, m, target = _inputs(T, H, W, mask=mask)
    kw = dict(timestep=t, encoder_hidden_states=y, encoder_attention_mask=m)
    res = {}
    handle = latte.parallelize(model, W_)
    with LEDGER.recording() as rec:
        out = model(x, **kw).sample
        loss = F.mse_loss(out, target)
        loss.backward()
    longseq.sync_gradients(model.parameters(), groups)
    res.update(out=out.detach(), loss=loss.detach(), grads=param_grads(model),
               records=[(r.op, r.tag, r.elements_sent, r.elements_recv) for r in rec])
    handle.remove()
    model.zero_grad(set_to_none=True)
    # output left sharded, tuple output (return_dict=False), the loss reduced from the pieces
    handle = latte.parallelize(model, groups, gather_output=False)
    out_local = model(x, **kw, return_dict=False)[0]
    loss = dsp.sharded_mse_loss(out_local, handle.shard_target(target), W_)
    loss.backward()
    longseq.sync_gradients(model.parameters(), groups)
    res.update(out_local=out_local.detach(), loss_sharded=loss.detach(), grads_sharded=param_grads(model))
    handle.remove()
    res["buffer_restored"] = tuple(model.temp_pos_embed.shape)
    return res


@functools.lru_cache(maxsize=None)
def _reference(T, H, W, mask):
    model = _model(T, H)
    x, t, y, m, target = _inputs(T, H, W, mask=mask)
    out = model(x, timestep=t, encoder_hidden_states=y, encoder_attention_mask=m).sample
    loss = F.mse_loss(out, target)
    loss.backward()
    return out.detach(), loss.detach(), param_grads(model), tuple(model.temp_pos_embed.shape)


_RUNS: dict = {}


def _run(pool_of, P, T, H, W, mask):
    key = (P, T, H, W, mask)
    if key not in _RUNS:
        _RUNS[key] = pool_of(P).run(_latte_run, T, H, W, mask)
    return _RUNS[key]


def _close(a, b, what):
    assert_close(a, b, what, RTOL, ATOL)


CASES = [
    (2, (5, 6, 6), False),    # T=5 -> 3/2, S=9 -> 5/4
    (3, (5, 6, 6), False),    # T=5 -> 2/2/1, S=9 -> 3/3/3
    (3, (5, 6, 6), True),     # with a per-frame caption mask, sharded with the frames
]


@pytest.mark.parametrize("P,size,mask", CASES)
def test_latte_equals_single_process(dist_pool, P, size, mask):
    T, H, W = size
    res = _run(dist_pool, P, T, H, W, mask)
    ref_out, ref_loss, ref_grads, buf_shape = _reference(T, H, W, mask)
    assert ref_out.shape == (B, 8, T, H, W)
    assert all(g.abs().max() > 0 for g in ref_grads.values())
    for r, out in enumerate(res):
        a, b = shard_range(T, P, r)
        _close(out["out"], ref_out, f"rank {r} output")
        _close(out["out_local"], ref_out[:, :, a:b], f"rank {r} sharded output")
        _close(out["loss"], ref_loss, f"rank {r} loss")
        _close(out["loss_sharded"], ref_loss, f"rank {r} sharded loss")
        for key in ("grads", "grads_sharded"):
            assert out[key].keys() == ref_grads.keys()
            for name, g in out[key].items():
                assert g.abs().max() > 0, f"rank {r} {key}: {name} got a zero gradient"
                _close(g, ref_grads[name], f"rank {r} {key} {name}")
        assert out["buffer_restored"] == buf_shape            # remove() put temp_pos_embed back


def test_latte_ledger_two_switches_per_layer_each_way(dist_pool):
    """Per layer, forward: the T->S switch before the temporal block and S->T after it; backward:
    their reverses; each sends B·T_r·(S - S_r)·D elements per rank (the DSP formula), nothing else
    but the input check and the exit gather."""
    P, (T, H, W) = 3, (5, 6, 6)
    res = _run(dist_pool, P, T, H, W, False)
    S, D, layers = 9, 16, 2
    ts, ss = split_sizes(T, P), split_sizes(S, P)
    for r, out in enumerate(res):
        recs = out["records"]
        a2a = [x for x in recs if x[0] == "all_to_all"]
        assert len(a2a) == 4 * layers
        for i in range(layers):
            tag = f"dsp.temporal_transformer_blocks.{i}"
            by = {x[1]: x for x in a2a if x[1].startswith(tag + ".")}
            assert set(by) == {f"{tag}.in", f"{tag}.out", f"{tag}.in.bwd", f"{tag}.out.bwd"}
            sent = B * ts[r] * (S - ss[r]) * D          # [B, S, T_r, D] minus the piece kept
            recv = B * ss[r] * (T - ts[r]) * D          # [B, S_r, T, D] minus the piece kept
            for t in (f"{tag}.in", f"{tag}.out.bwd"):
                assert by[t][2:] == (sent, recv), (r, t, by[t])
            for t in (f"{tag}.out", f"{tag}.in.bwd"):
                assert by[t][2:] == (recv, sent), (r, t, by[t])
        others = {x[1] for x in recs if x[0] != "all_to_all"}
        assert others <= {"dsp.check", "dsp.exit", "dsp.entry.bwd"}, others


# ----------------------------------------------------------------------------------------------
# Errors, raised before any collective (one process suffices: a group of one)
# ----------------------------------------------------------------------------------------------
def _errors():
    from longseq.adapters import latte
    W_ = dist.group.WORLD
    torch.manual_seed(0)                     # the same weights on every rank: the input check passes
    model = latte.build(video_length=5, sample_size=6)
    x, t, y, _, _ = _inputs(5, 6, 6)
    msgs = {}
    with latte.parallelize(model, W_) as h:
        for name, call in {
            "frames": lambda: model(x[:, :, :4], timestep=t, encoder_hidden_states=y),
            "mask": lambda: model(x, timestep=t, encoder_hidden_states=y,
                                  encoder_attention_mask=torch.ones(B, N_TEXT, dtype=torch.bool)),
            "twice": lambda: latte.parallelize(model, W_),
            "block alone": lambda: model.temporal_transformer_blocks[0](torch.randn(18, 5, 16)),
        }.items():
            try:
                call()
                msgs[name] = None
            except Exception as e:  # noqa: BLE001
                msgs[name] = f"{type(e).__name__}: {e}"
        assert h.stages[0][0] == "transformer_blocks.0" and h.stages[-1][0] == "temporal_transformer_blocks.1"
    return msgs


def test_latte_errors(dist_pool):
    msgs = dist_pool(2).run(_errors)[0]
    assert "T=4" in msgs["frames"] and "video_length=5" in msgs["frames"]
    # the plan names the input at fault, its layout and the sizes, before the model runs
    assert "'encoder_attention_mask'" in msgs["mask"] and "(B T) ..." in msgs["mask"] and "B=2·T=5" in msgs["mask"]
    assert "already parallelized" in msgs["twice"]
    assert "outside a forward" in msgs["block alone"]
