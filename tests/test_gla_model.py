"""The GLA language model (models/gla.py), serial and made sequence-parallel by zeco.parallelize with
each method: loss and every parameter gradient equal a single-process run over the whole sequence.

Tolerances: float64 |sp - ref| <= 1e-10 * max(1, max |ref|) per tensor; float32 <= 1e-4 * max |ref|.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

import longseq
from longseq.ledger import LEDGER
from longseq.models.gla import GLA_PRESETS, GLAConfig, GLAForCausalLM, count_parameters, gla_config, lm_loss
from longseq.zeco import parallelize, shard_sequence, shift_labels, sp_gla, sp_lm_loss, unparallelize
from longseq.zeco.gla import gla


def _err(a, ref, dtype):
    a, ref = a.double(), ref.double()
    s = ref.abs().max().item()
    if dtype == torch.float64:
        s = max(s, 1.0)
    return (a - ref).abs().max().item() / max(s, 1e-30)


def _lm_case(method, dtype_name, tied, T, nb=None):
    dtype = getattr(torch, dtype_name)
    W = dist.group.WORLD
    torch.manual_seed(0)
    cfg = gla_config("tiny", tie_word_embeddings=tied)
    model = GLAForCausalLM(cfg).to(dtype)
    with torch.no_grad():  # non-trivial norm weights and gate biases, so their gradients are generic
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    sp_model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (2, T), generator=gen)
    labels = shift_labels(ids)
    # serial reference
    ref_loss = lm_loss(model(ids), labels)
    ref_loss.backward()
    # sequence parallel
    parallelize(sp_model, W, method=method, num_blocks=nb)
    with LEDGER.recording() as rec:
        loss = sp_lm_loss(sp_model(shard_sequence(ids, W)), shard_sequence(labels, W), W)
        loss.backward()
        longseq.sync_gradients(sp_model.parameters(), longseq.from_existing_groups(W))
    errs = {"loss": _err(loss.detach(), ref_loss.detach(), dtype)}
    zero = []
    for (n, p), (_, p_ref) in zip(sp_model.named_parameters(), model.named_parameters()):
        errs[n] = _err(p.grad, p_ref.grad, dtype)
        if p.grad.abs().max() == 0 or p_ref.grad.abs().max() == 0:
            zero.append(n)
    tags = sorted({r.tag for r in rec})
    unparallelize(sp_model)
    return errs, zero, tags


CASES = [(m, P) for P in (2, 3) for m in ("zeco", "lasp1", "lasp2")] + [("zeco", 4)]


@pytest.mark.parametrize("method,P", CASES)
def test_lm_sp_equals_serial_float64(dist_pool, method, P):
    res = dist_pool(P).run(_lm_case, method, "float64", False, 37, 3 if method == "zeco" else None)
    for errs, zero, tags in res:
        assert not zero, f"parameters without gradient: {zero}"
        bad = {k: e for k, e in errs.items() if e > 1e-10}
        assert not bad, bad
        layer_tag = {"zeco": "zeco.scan", "lasp1": "zeco.lasp1", "lasp2": "zeco.lasp2"}[method]
        assert any(t.startswith(layer_tag) for t in tags), tags
        assert "grad_sync.sp" in tags and "zeco.loss" in tags


def test_lm_sp_float32_tied(dist_pool):
    for errs, zero, _ in dist_pool(2).run(_lm_case, "zeco", "float32", True, 37):
        assert not zero
        bad = {k: e for k, e in errs.items() if e > 1e-4}
        assert not bad, bad


def test_model_serial_matches_reference_gla():
    """The model's attention with the default gla_fn equals the step-by-step reference recurrence."""
    torch.manual_seed(0)
    cfg = gla_config("tiny")
    model = GLAForCausalLM(cfg).double()
    attn = model.layers[0].attn
    from longseq.zeco.gla import recurrent_gla_reference

    calls = []

    def ref_fn(q, k, v, g, *, scale, backend, chunk_size):
        calls.append(q.shape)
        return recurrent_gla_reference(q, k, v, g, scale=scale)

    x = torch.randn(2, 21, cfg.hidden_size, dtype=torch.float64)
    y = attn(x)
    attn.gla_fn = ref_fn
    y_ref = attn(x)
    assert calls and torch.allclose(y, y_ref, atol=1e-10)


def test_shift_and_shard_cross_boundaries():
    ids = torch.arange(10).view(1, 10)
    labels = shift_labels(ids)
    assert labels.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, -100]]


def test_parameter_counts_and_presets():
    assert count_parameters("tiny") == sum(p.numel() for p in GLAForCausalLM(gla_config("tiny")).parameters())
    assert 0.9e9 < count_parameters("1b") < 1.2e9
    assert 2.8e9 < count_parameters("3b") < 3.2e9
    tied = count_parameters(gla_config("tiny", tie_word_embeddings=True))
    assert tied == count_parameters("tiny") - 64 * 32
    with pytest.raises(ValueError):
        gla_config("7b")
    with pytest.raises(ValueError):
        GLAConfig(hidden_size=30, num_heads=4)


def test_parallelize_requires_gla_layers():
    with pytest.raises(ValueError, match="gla_fn"):
        parallelize(torch.nn.Linear(2, 2), None)
    with pytest.raises(ValueError, match="method"):
        parallelize(GLAForCausalLM(gla_config("tiny")), None, method="ulysses")


def test_model_file_has_no_communication():
    import inspect

    import models.gla as mg
    src = inspect.getsource(mg)
    for word in ("torch.distributed", "longseq.comm", "all_reduce", "all_gather", "isend", "sp_gla"):
        assert word not in src.replace("zeco.sp_gla", ""), word
