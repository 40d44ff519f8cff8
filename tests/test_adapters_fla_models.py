"""fla models beyond GLA, routed through ZeCO by the generic fla adapter's routing table
(``fla_gla.LAYERS`` / ``ROUTES``), equal one process at P = 2 and 3 on an uneven T, forward and
backward; the ledger holds one recurrent state per layer per rank (All-Scan), nothing more but
the check and the loss (and, for RetNet's rotary positions, one all-gather of the local lengths).

HGRN2 (per-key decay, ``chunk_gla`` with ``state_v_first``, fla's Triton ``rms_norm_linear`` and
``swish`` called by name), RetNet (fixed scalar decay per head, ``chunk_retention``, rotary
embeddings that must start at the rank's global offset), linear attention (no decay). Tolerance
(float32), per tensor: ``max|a - b| <= 2e-5 * max|b| + 1e-7``; every gradient asserted nonzero.
"""
import functools

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("fla")

import longseq  # noqa: E402
from longseq import zeco  # noqa: E402
from longseq.ledger import LEDGER  # noqa: E402
from longseq.sharding import shard_range  # noqa: E402

from .tensor_checks import assert_close, param_grads  # noqa: E402

RTOL, ATOL = 2e-5, 1e-7
B, T, VOCAB = 2, 23, 64
NAMES = ("hgrn2", "retnet", "linear_attn")


def _model(name):
    from longseq.adapters import fla_gla
    torch.manual_seed(0)
    model = fla_gla.build_model(name)
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _ids():
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(5))


def _state_elements(layer):
    """B·H·K·V of one layer's recurrent state."""
    K = getattr(layer, "head_f_dim", None) or layer.head_k_dim
    V = getattr(layer, "head_i_dim", None) or layer.head_v_dim
    return B * layer.num_heads * K * V


def _sp_run(names):
    from longseq.adapters import fla_gla
    group = dist.group.WORLD
    groups = longseq.from_existing_groups(group)
    out = {}
    for name in names:
        model = _model(name)
        ids = _ids()
        handle = fla_gla.parallelize(model, groups, method="zeco", chunk_size=8)
        labels = zeco.shard_sequence(zeco.shift_labels(ids), group)
        with LEDGER.recording() as rec:
            logits = model(input_ids=zeco.shard_sequence(ids, group)).logits
            loss = zeco.sp_lm_loss(logits, labels, group)
            loss.backward()
        longseq.sync_gradients(model.parameters(), groups)
        handle.remove()
        out[name] = dict(logits=logits.detach(), loss=loss.detach(), grads=param_grads(model, skip_missing=True),
                         state=_state_elements(model.get_submodule(handle.layers[0])), layers=len(handle.layers),
                         records=[(x.op, x.tag, x.elements_sent) for x in rec])
    return out


@functools.lru_cache(maxsize=None)
def _reference(name):
    from longseq.adapters import fla_gla
    from longseq.models.gla import lm_loss
    model = _model(name)
    ids = _ids()
    with fla_gla.adapt(model, chunk_size=8):
        logits = model(input_ids=ids).logits
        loss = lm_loss(logits, zeco.shift_labels(ids))
        loss.backward()
    return logits.detach(), loss.detach(), param_grads(model, skip_missing=True), len(list(model.parameters()))


@pytest.mark.parametrize("P", [2, 3])
def test_fla_models_sp_equal_single_process(dist_pool, P):
    res = dist_pool(P).run(_sp_run, NAMES)
    for name in NAMES:
        ref_logits, ref_loss, ref_grads, n_params = _reference(name)
        assert len(ref_grads) == n_params and all(g.abs().max() > 0 for g in ref_grads.values()), name
        for r, rr in enumerate(res):
            out = rr[name]
            a, b = shard_range(T, P, r)
            assert_close(out["logits"], ref_logits[:, a:b], f"{name} rank {r} logits", RTOL, ATOL)
            assert_close(out["loss"], ref_loss, f"{name} rank {r} loss", RTOL, ATOL)
            assert out["grads"].keys() == ref_grads.keys()
            for n, g in out["grads"].items():
                assert g.abs().max() > 0, f"{name} rank {r}: {n} got a zero gradient"
                assert_close(g, ref_grads[n], f"{name} rank {r} grad {n}", RTOL, ATOL)
            # one state per layer per rank: forward to the next rank, backward to the previous one
            recs, S, nl = out["records"], out["state"], out["layers"]
            fwd = sum(e for op, tag, e in recs if op == "send" and tag == "zeco.scan.fwd")
            bwd = sum(e for op, tag, e in recs if op == "send" and tag == "zeco.scan.bwd")
            assert fwd == (nl * S if r < P - 1 else 0) and bwd == (nl * S if r > 0 else 0), (name, r, fwd, bwd)
            tags = {tag for _, tag, _ in recs}
            allowed = {"zeco.scan.fwd", "zeco.scan.bwd", "zeco.check", "zeco.loss", "zeco.loss.count"}
            assert tags <= allowed | ({"fla_gla.positions"} if name == "retnet" else set()), (name, tags)


# ----------------------------------------------------------------------------------------------
# One process: the routes and the by-name stand-ins against fla's own references
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_routes_match_fla_naive_recurrence(name):
    """Each routed layer with its gla_fn set to fla's naive recurrent GLA equals it on zeco.gla:
    the route hands the kernel fla's q, k, v, the decay and the scale unchanged."""
    from fla.ops.gla.naive import naive_recurrent_gla

    from longseq.adapters import fla_gla

    def naive(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False, **_):
        o, _ = naive_recurrent_gla(q * (scale if scale is not None else q.shape[-1] ** -0.5) / q.shape[-1] ** -0.5,
                                   k, v, g, initial_state, output_final_state)
        return o, None

    model = _model(name)
    ids = _ids()
    with fla_gla.adapt(model) as h:
        ours = model(input_ids=ids).logits
        for path in h.layers:
            model.get_submodule(path).gla_fn = naive
        theirs = model(input_ids=ids).logits
    assert_close(ours, theirs, f"{name} logits", RTOL, ATOL)


def test_retention_decay_is_fla_s():
    """fla's chunk_retention is chunk_simple_gla with g_gamma = log(1 - 2^(-5-h)) per head."""
    import inspect

    import fla.ops.retention.chunk as rc

    from longseq.adapters.fla_gla import retention_decay
    assert "(1 - 2.0 ** (-5.0 - torch.arange(q.shape[2]" in inspect.getsource(rc.chunk_retention)
    q = torch.zeros(1, 2, 3, 4)
    g = retention_decay({"q": q})
    ref = torch.log(1 - 2.0 ** (-5.0 - torch.arange(3.0)))
    assert g.shape == q.shape and torch.allclose(g[0, 1, :, 2], ref)


def test_by_name_stand_ins_match_fla_references_and_keep_float64():
    from fla.modules.norm.layernorm import rms_norm_ref
    from fla.modules.rotary import RotaryEmbedding, rotary_embedding_ref

    from longseq.adapters.fla_gla import rms_norm, rms_norm_linear, rotary_embedding
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 3, 8, generator=g, dtype=torch.float64)
    rot = RotaryEmbedding(dim=8)
    rot._update_cos_sin_cache(12, dtype=torch.float64)
    for off in (0, 4):
        ref = rotary_embedding_ref(x, rot._cos_cached[off:off + 7], rot._sin_cached[off:off + 7])
        y = rotary_embedding(x, rot._cos_cached, rot._sin_cached, seqlen_offsets=off)
        assert y.dtype == torch.float64 and (y - ref).abs().max() < 1e-12
    h, w, lw = torch.randn(3, 5, 16, generator=g, dtype=torch.float64), torch.randn(16, dtype=torch.float64), \
        torch.randn(4, 16, dtype=torch.float64)
    y = rms_norm(h, w, None, 1e-6)
    assert y.dtype == torch.float64
    assert (y - rms_norm_ref(h, w, None, eps=1e-6, upcast=False)).abs().max() < 1e-12   # float64 all the way
    assert (rms_norm_linear(h, w, None, lw, None, eps=1e-6) - y @ lw.T).abs().max() < 1e-12


def test_routing_table_extends_in_a_few_lines():
    """A user's layer class routed by two table entries (here: fla's GLA layer under a new name)."""
    from fla.layers.gla import GatedLinearAttention

    from longseq.adapters import fla_gla

    class MyGLA(GatedLinearAttention):
        pass

    key = f"{MyGLA.__module__}.{MyGLA.__qualname__}"
    fla_gla.LAYERS[key] = ("chunk_gla", "fused_recurrent_gla")
    try:
        model = _model("linear_attn")
        torch.manual_seed(1)
        layer = MyGLA(hidden_size=32, num_heads=2, layer_idx=0)
        model.model.layers[0].attn = layer
        with fla_gla.adapt(model) as h:
            assert "model.layers.0.attn" in h.layers
            assert torch.isfinite(model(input_ids=_ids()).logits).all()
    finally:
        del fla_gla.LAYERS[key]
