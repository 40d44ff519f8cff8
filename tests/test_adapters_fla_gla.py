"""fla's GLA language model (``fla.models.GLAForCausalLM``) made sequence-parallel with ZeCO by
models.adapters.fla_gla equals one process.

fla's model is built as it is (its default fused flags on: fused RMSNorm, fused norm + swish gate,
fused SwiGLU, fused cross-entropy); on CPU the adapter gives fla's Triton-only modules PyTorch
forwards and routes the GLA kernel calls to the project's local operator ``zeco.gla.gla`` (one
process) or to ``zeco.sp_gla`` (P processes). The one-process reference is the adapted model on the
whole sequence with ``models.gla.lm_loss`` on targets shifted on the whole sequence; the parallel
run shards the tokens (``zeco.shard_sequence``) and the shifted labels, reduces the loss with
``zeco.sp_lm_loss`` and sums gradient shares with ``longseq.sync_gradients``.

Tolerance (float32), per tensor: ``max|a - b| <= 2e-5 * max|b| + 1e-7`` (the bound of
tests/test_zeco_sp.py for the float32 GLA operator) for the logits, the loss and every parameter
gradient; every gradient is asserted nonzero.
"""
import functools

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("fla")

import longseq  # noqa: E402
from longseq import zeco  # noqa: E402
from longseq.sharding import shard_range  # noqa: E402

from .tensor_checks import assert_close, param_grads  # noqa: E402

RTOL, ATOL = 2e-5, 1e-7
B, VOCAB = 2, 64

# (name, config overrides, T, method)
CASES = {
    "default": ({}, 37, "zeco"),                                               # fused flags, uneven T
    "unfused": (dict(fuse_norm=False, fuse_swiglu=False, fuse_cross_entropy=False), 37, "lasp2"),
    "short_conv_gqa": (dict(use_short_conv=True, num_heads=4, num_kv_heads=2), 7, "zeco"),   # tiny pieces
}


def _model(overrides):
    from longseq.adapters import fla_gla
    torch.manual_seed(0)
    model = fla_gla.build(**overrides)
    with torch.no_grad():   # nonzero everywhere (biases, conv weights), so every gradient is tested
        g = torch.Generator().manual_seed(3)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _ids(T, seed=5):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))




def _sp_run(names):
    from longseq.adapters import fla_gla
    group = dist.group.WORLD
    groups = longseq.from_existing_groups(group)
    out = {}
    for name in names:
        overrides, T, method = CASES[name]
        model = _model(overrides)
        ids = _ids(T)
        handle = fla_gla.parallelize(model, groups, method=method, chunk_size=16)
        labels = zeco.shard_sequence(zeco.shift_labels(ids), group)
        logits = model(input_ids=zeco.shard_sequence(ids, group)).logits
        loss = zeco.sp_lm_loss(logits, labels, group)
        loss.backward()
        longseq.sync_gradients(model.parameters(), groups)
        try:
            model(input_ids=zeco.shard_sequence(ids, group), labels=labels)
            refused = None
        except ValueError as e:
            refused = str(e)
        handle.remove()
        out[name] = dict(logits=logits.detach(), loss=loss.detach(), grads=param_grads(model, skip_missing=True),
                         refused=refused,
                         restored=not any("forward" in vars(m) or hasattr(m, "gla_fn") for m in model.modules()))
    return out


@functools.lru_cache(maxsize=None)
def _reference(name):
    from longseq.adapters import fla_gla
    from longseq.models.gla import lm_loss
    overrides, T, _ = CASES[name]
    model = _model(overrides)
    ids = _ids(T)
    with fla_gla.adapt(model, chunk_size=16):
        logits = model(input_ids=ids).logits
        loss = lm_loss(logits, zeco.shift_labels(ids))
        loss.backward()
        fla_loss = model(input_ids=ids, labels=ids).loss     # fla's own loss path (its shift, stand-in CE)
    return (logits.detach(), loss.detach(), param_grads(model, skip_missing=True), fla_loss.detach(),
            len(list(model.parameters())))


def _close(a, b, what):
    assert_close(a, b, what, RTOL, ATOL)


@pytest.mark.parametrize("P", [2, 3])
def test_fla_gla_sp_equals_single_process(dist_pool, P):
    names = list(CASES)
    res = dist_pool(P).run(_sp_run, names)
    for name in names:
        ref_logits, ref_loss, ref_grads, fla_loss, n_params = _reference(name)
        _close(fla_loss, ref_loss, f"{name}: fla's own loss")
        assert len(ref_grads) == n_params and all(g.abs().max() > 0 for g in ref_grads.values()), name
        T = CASES[name][1]
        for r, rr in enumerate(res):
            out = rr[name]
            a, b = shard_range(T, P, r)
            _close(out["logits"], ref_logits[:, a:b], f"{name} rank {r} logits")
            _close(out["loss"], ref_loss, f"{name} rank {r} loss")
            assert out["grads"].keys() == ref_grads.keys()
            for n, g in out["grads"].items():
                assert g.abs().max() > 0, f"{name} rank {r}: {n} got a zero gradient"
                _close(g, ref_grads[n], f"{name} rank {r} grad {n}")
            assert out["refused"] is not None and "shift_labels" in out["refused"]
            assert out["restored"]


# ----------------------------------------------------------------------------------------------
# One process: the stand-ins and the kernel routing against fla's own reference code
# ----------------------------------------------------------------------------------------------
def test_stand_ins_match_fla_references():
    from fla.modules.norm.layernorm import rms_norm_ref
    from fla.modules.norm.layernorm_gated import rms_norm_ref as gated_ref

    from longseq.adapters.fla_gla import rms_norm, rms_norm_gated, short_conv
    g = torch.Generator().manual_seed(0)
    x, res, z = (torch.randn(3, 5, 16, generator=g) for _ in range(3))
    w, b = torch.randn(16, generator=g), torch.randn(16, generator=g)
    torch.testing.assert_close(rms_norm(x, w, None, 1e-6), rms_norm_ref(x, w, None, eps=1e-6, upcast=True))
    y, r = rms_norm(x, w, b, 1e-6, residual=res, prenorm=True)
    y_ref, r_ref = rms_norm_ref(x, w, b, residual=res, eps=1e-6, prenorm=True, upcast=True)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(r, r_ref)
    torch.testing.assert_close(rms_norm_gated(x, z, w, None, 1e-6), gated_ref(x, w, None, z=z, eps=1e-6))
    # causal depthwise conv, kernel 4, silu: y_t = silu(sum_j w_j x_{t-3+j} + b)
    cw, cb = torch.randn(16, 1, 4, generator=g), torch.randn(16, generator=g)
    xp = torch.cat([torch.zeros(3, 3, 16), x], 1)
    ref = torch.nn.functional.silu(sum(cw[:, 0, j] * xp[:, j:j + 5] for j in range(4)) + cb)
    torch.testing.assert_close(short_conv(x, cw, cb, "silu"), ref)


def test_kernel_routing_matches_fla_naive_kernel():
    """The adapted model with its layers' gla_fn set to fla's own naive recurrent GLA equals the
    adapted model on zeco.gla: the routing hands the kernel fla's q, k, v, gk and scale unchanged."""
    from fla.ops.gla.naive import naive_recurrent_gla

    from longseq.adapters import fla_gla

    def naive(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False, **_):
        assert scale is None or scale == q.shape[-1] ** -0.5
        return naive_recurrent_gla(q, k, v, g, initial_state, output_final_state)

    model = _model({})
    ids = _ids(40)
    with fla_gla.adapt(model) as h:
        ours = model(input_ids=ids).logits
        for path in h.layers:
            model.get_submodule(path).gla_fn = naive
        theirs = model(input_ids=ids).logits
    _close(ours, theirs, "logits")
    import fla.layers.gla as layer_module
    import fla.ops.gla as ops
    assert layer_module.chunk_gla._longseq_original is ops.chunk_gla        # pass-through outside adapted layers


def test_adapt_errors():
    from longseq.adapters import fla_gla
    model = _model({})
    with fla_gla.adapt(model):
        with pytest.raises(ValueError, match="already adapted"):
            fla_gla.adapt(model)
    with pytest.raises(NotImplementedError, match="attnres_block_size"):
        fla_gla.adapt(_model(dict(attnres_block_size=2)))
    with pytest.raises(ValueError, match="no fla layer of the routing table"):
        fla_gla.adapt(torch.nn.Linear(2, 2))
    m2 = _model({})
    with fla_gla.adapt(m2):
        mask = torch.ones(B, 9, dtype=torch.long)
        mask[0, :2] = 0
        with pytest.raises(NotImplementedError, match="padding masks"):
            m2(input_ids=_ids(9), attention_mask=mask)


# ----------------------------------------------------------------------------------------------
# CUDA: fla's own Triton modules and kernels (no stand-ins), against fla's model left as it is
# ----------------------------------------------------------------------------------------------
# A wider model than the CPU cases so fla's kernels see real head sizes (K 64, V 128 per head).
CUDA_CASES = {
    "default": (dict(hidden_size=256, num_heads=2, intermediate_size=512), 300, "zeco"),
    "short_conv_gqa": (dict(hidden_size=256, num_heads=4, num_kv_heads=2, use_short_conv=True,
                            intermediate_size=512), 301, "lasp2"),
}
# fla's Triton dots run float32 in TF32 and its fused modules reorder sums: per tensor
# max|a - b| <= 1e-2 * max|ref| (observed errors are printed by the assertion on failure)
CUDA_RTOL = 1e-2


def _cuda_reference(name):
    """fla's model on CUDA exactly as fla runs it: logits, our loss on whole-sequence shifted
    targets, every gradient."""
    from longseq.models.gla import lm_loss
    overrides, T, _ = CUDA_CASES[name]
    model = _model(overrides).cuda()
    ids = _ids(T).cuda()
    logits = model(input_ids=ids).logits
    loss = lm_loss(logits, zeco.shift_labels(ids))
    loss.backward()
    return model, ids, logits.detach(), loss.detach(), param_grads(model, skip_missing=True)


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def _cuda_sp_errors(names):
    """In each of P gloo processes sharing GPU 0: the reference, then the same weights through
    fla_gla.parallelize; relative errors of this rank's logits, the loss and every gradient."""
    from longseq.adapters import fla_gla
    group = dist.group.WORLD
    groups = longseq.from_existing_groups(group)
    P, r = dist.get_world_size(), dist.get_rank()
    out = {}
    for name in names:
        _, ids, ref_logits, ref_loss, ref_grads = _cuda_reference(name)
        overrides, T, method = CUDA_CASES[name]
        model = _model(overrides).cuda()
        handle = fla_gla.parallelize(model, groups, method=method)
        logits = model(input_ids=zeco.shard_sequence(ids, group)).logits
        loss = zeco.sp_lm_loss(logits, zeco.shard_sequence(zeco.shift_labels(ids), group), group)
        loss.backward()
        longseq.sync_gradients(model.parameters(), groups)
        a, b = shard_range(T, P, r)
        grads = param_grads(model, skip_missing=True)
        out[name] = dict(
            substituted=[what for _, what in handle.substituted],
            logits=_rel(logits, ref_logits[:, a:b]), loss=_rel(loss, ref_loss),
            grads={n: _rel(g, ref_grads[n]) for n, g in grads.items()},
            missing=sorted(set(ref_grads) - set(grads)),
            zero=sorted(n for n, g in grads.items() if g.abs().max() == 0))
        handle.remove()
    return out


def _assert_cuda_errors(res):
    for r, by_name in enumerate(res):
        for name, e in by_name.items():
            assert not e["missing"] and not e["zero"], (name, r, e["missing"], e["zero"])
            # fla's fused Triton modules stay; only the short conv takes the halo-exchanging PyTorch forward
            assert set(e["substituted"]) <= {"ShortConvolution (halo)"}, e["substituted"]
            assert e["logits"] <= CUDA_RTOL and e["loss"] <= CUDA_RTOL, (name, r, e["logits"], e["loss"])
            bad = {n: x for n, x in e["grads"].items() if x > CUDA_RTOL}
            assert not bad, f"{name} rank {r}: gradients off by more than {CUDA_RTOL} relative: {bad}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (fla's Triton kernels)")
def test_cuda_fla_model_adapted_equals_fla_itself(dist_pool):
    """One process: fla's model on CUDA through the adapter (kernel calls routed to zeco's operator
    on fla's chunk kernels, fla's fused modules in place) equals fla's model as fla runs it."""
    _assert_cuda_errors(dist_pool(1).run(_cuda_sp_errors, list(CUDA_CASES)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (fla's Triton kernels)")
@pytest.mark.parametrize("P", [2, 3])
def test_cuda_fla_model_sp_equals_fla_itself(dist_pool, P):
    """P gloo processes on the one GPU (device tensors staged through host memory by longseq.comm):
    the sequence-parallel fla model equals fla's own one-process model on CUDA."""
    _assert_cuda_errors(dist_pool(P).run(_cuda_sp_errors, list(CUDA_CASES)))
