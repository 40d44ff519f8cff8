"""Packed documents through whole models: the GLA LM, the Gated DeltaNet LM and the hybrid (GDN +
softmax attention) of longseq.models take ``cu_seqlens``; one process equals a loop over the separate
documents (logits and every parameter gradient), and every SP method equals one process (P = 2, 3;
boundaries inside pieces, on rank edges, on a piece's first and last token: the windows of
tests/test_documents.py). Float64 models; tolerance max |a - b| <= 1e-9 · max(1, max |ref|).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

import longseq
from longseq.documents import Documents, document_labels
from longseq.models.gdn import GDNForCausalLM, gdn_config
from longseq.models.gla import GLAForCausalLM, gla_config, lm_loss
from longseq.zeco import shard_sequence, shift_labels, sp_lm_loss
from tests.test_documents import CU, T
from tests.tensor_checks import rel_err

TOL = 1e-9


def _model(kind):
    torch.manual_seed(0)
    if kind == "gla":
        m = GLAForCausalLM(gla_config("tiny", chunk_size=4))
    else:
        m = GDNForCausalLM(gdn_config("tiny" if kind == "gdn" else "hybrid_tiny", chunk_size=4))
    m = m.double()
    with torch.no_grad():   # generic norm weights and biases, so their gradients are generic too
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return m


def _ids(vocab):
    return torch.randint(0, vocab, (CU.shape[0], T), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", ["gla", "gdn", "hybrid"])
def test_model_with_documents_equals_loop_over_documents(kind):
    model = _model(kind)
    ids = _ids(model.config.vocab_size)
    R = torch.randn(*ids.shape, model.config.vocab_size, generator=torch.Generator().manual_seed(2),
                    dtype=torch.float64)
    logits = model(ids, cu_seqlens=CU)
    (logits * R).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss, ref = 0.0, torch.empty_like(logits)
    for b in range(ids.shape[0]):
        bounds = CU[b].tolist()
        for s, e in zip(bounds[:-1], bounds[1:]):
            if e > s:
                out = model(ids[b:b + 1, s:e])
                ref[b:b + 1, s:e] = out.detach()
                loss = loss + (out * R[b:b + 1, s:e]).sum()
    loss.backward()
    assert rel_err(logits, ref, torch.float64) <= TOL
    for n, p in model.named_parameters():
        assert p.grad.abs().max() > 0, n
        assert rel_err(got[n], p.grad, torch.float64) <= TOL, n


CASES = [("gla", "zeco", None), ("gla", "lasp1", None), ("gla", "lasp2", None),
         ("gdn", "zeco", None), ("gdn", "allgather", None), ("gdn", "p2p", None), ("gdn", "heads", None),
         ("hybrid", "zeco", "ulysses"), ("hybrid", "zeco", "ring")]


def _sp_models():
    from longseq import zeco
    from longseq.zeco.plans_delta import parallelize as parallelize_delta
    W = dist.group.WORLD
    groups = longseq.from_existing_groups(W)
    docs = Documents.whole(CU)
    errs = {}
    for kind, method, attention in CASES:
        if (method == "heads" or attention == "ulysses") and 4 % dist.get_world_size():
            continue   # 4 heads: P = 3 cannot split them (ring covers the hybrid at P = 3)
        model = _model(kind)
        ids = _ids(model.config.vocab_size)
        labels = document_labels(shift_labels(ids), docs)
        lm_loss(model(ids, cu_seqlens=CU), labels).backward()
        sp = copy.deepcopy(model)
        if kind == "gla":
            zeco.parallelize(sp, W, method=method)
        else:
            parallelize_delta(sp, W, method=method, attention=attention or "ulysses")
        sp.zero_grad()
        loss = sp_lm_loss(sp(shard_sequence(ids, W), cu_seqlens=CU), shard_sequence(labels, W), W)
        loss.backward()
        longseq.sync_gradients(sp.parameters(), groups)
        ref_loss = lm_loss(model(ids, cu_seqlens=CU), labels)
        errs[(kind, method, attention, "loss")] = rel_err(loss.detach(), ref_loss.detach(), torch.float64)
        for (n, p), (_, p_ref) in zip(sp.named_parameters(), model.named_parameters()):
            errs[(kind, method, attention, n)] = rel_err(p.grad, p_ref.grad, torch.float64)
    return errs


@pytest.mark.parametrize("P", [2, 3])
def test_sp_models_with_documents_equal_one_process(dist_pool, P):
    for r, errs in enumerate(dist_pool(P).run(_sp_models)):
        assert len(errs) > 40
        bad = {k: e for k, e in errs.items() if not e <= TOL}
        assert not bad, f"rank {r}: {bad}"
