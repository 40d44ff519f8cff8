"""fla's GatedDeltaNetForCausalLM and DeltaNetForCausalLM through longseq.adapters.fla_delta: sequence-parallel (zeco) equals
the same adapted model in one process at P = 2 and 3, loss and every parameter gradient; float64
parameters, but fla's formulas (fla_gla's stand-ins) run the short convolution and the norm statistics
in float32, so max |sp - ref| <= 2e-6 * max(1, max |ref|) (float32 rounding, not float64)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("fla.models")

import longseq  # noqa: E402
from longseq.zeco import shard_sequence, shift_labels, sp_lm_loss  # noqa: E402


def _case(method, T, overrides=None):
    from longseq.adapters import fla_delta
    from longseq.models.gla import lm_loss
    W = dist.group.WORLD
    torch.manual_seed(0)
    model = fla_delta.build(**(overrides or {})).double()      # overrides may hold kind="delta_net"
    sp_model = fla_delta.parallelize(copy.deepcopy(model), W, method=method)
    fla_delta.parallelize(model, None)
    ids = torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(1))
    labels = shift_labels(ids)
    ref = lm_loss(model(input_ids=ids).logits, labels)
    ref.backward()
    loss = sp_lm_loss(sp_model(input_ids=shard_sequence(ids, W)).logits, shard_sequence(labels, W), W)
    loss.backward()
    longseq.sync_gradients(sp_model.parameters(), longseq.from_existing_groups(W))
    errs = {"loss": abs(loss.item() - ref.item())}
    for (n, p), (_, q) in zip(sp_model.named_parameters(), model.named_parameters()):
        assert q.grad.abs().max() > 0, n
        errs[n] = (p.grad - q.grad).abs().max().item() / max(q.grad.abs().max().item(), 1.0)
    try:
        sp_model(input_ids=shard_sequence(ids, W), labels=shard_sequence(ids, W))
        errs["labels refused"] = 1.0
    except ValueError as e:
        errs["labels refused"] = 0.0 if "sp_lm_loss" in str(e) else 1.0
    return errs


# grouped value heads; DeltaNet (no decay, chunked form at every piece length; with the gated output norm)
@pytest.mark.parametrize("P,overrides", [(2, None), (3, None), (3, {"num_v_heads": 4}), (2, {"kind": "delta_net"}),
                                         (3, {"kind": "delta_net", "use_gate": True})])
def test_fla_gated_deltanet_sp_equals_one_process(dist_pool, P, overrides):
    for errs in dist_pool(P).run(_case, "zeco", 11, overrides):
        bad = {k: v for k, v in errs.items() if v > 2e-6}
        assert not bad, bad
