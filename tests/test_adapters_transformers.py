"""transformers' Gated DeltaNet / KDA hybrids (the five tiny presets of longseq.models.hf_lm) under
``longseq.adapters.transformers.parallelize``, on gloo CPU processes, against one process running the
same model unchanged.

Per model, float64, one of P = 2 (T = 11) and P = 3 (T = 7: pieces 3/2/2, shorter than the conv
width's halo of 3, so halos chain through two ranks) (``SPLIT``), one or two AdamW steps (two for
Qwen3-Next, GDN + gated GQA, and Kimi-Linear, KDA + MLA). Two references, both one process:

* the same model adapted over a one-rank group (the same float64 maths, no communication): loss and
  logits within ``1e-9`` relative (measured ~1e-16); every parameter's gradient (summed over the
  ranks) and the parameters after each AdamW step within ``1e-6`` relative to the tensor's largest
  entry: the models' own RMSNorms compute in float32 even in a float64 model, so a norm weight's
  gradient, a sum over tokens, is rounded in float32 per piece (measured ~1e-7);
* the model unchanged (transformers' own kernels, which cast the delta rule to float32 inside), first
  step: loss and logits ``<= 1e-6`` absolute, gradients ``<= 1e-2`` relative to each parameter's
  largest (the model's float32 kernel sets these; AdamW would amplify that noise on parameters whose
  gradient is ~0, so the steps are compared against the first reference only).

Ledger: zeco moves one K x V state per value head per rank per direction (B·Hv·K·V elements), the
convolution halo exactly (w-1)·C rows' elements per boundary.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.distributed as dist

from longseq.ledger import LEDGER

MODELS = ["qwen3_next_tiny", "qwen3_5_tiny", "kimi_linear_tiny", "olmo_hybrid_tiny", "bailing_hybrid_tiny"]


def _train(presets, T):
    """``presets``: {preset: optimizer steps}; returns per preset (errors, worst parameter, ledger rows of
    the last step, adapted layers, restored after ``remove``)."""
    warnings.filterwarnings("ignore")
    import transformers
    transformers.logging.set_verbosity_error()
    from longseq import zeco
    from longseq.adapters.transformers import parallelize
    from longseq.models.hf_lm import build
    W = dist.group.WORLD
    P, r = dist.get_world_size(), dist.get_rank()
    singles = _single_rank_groups(P)
    out = {}
    for preset, steps in presets.items():
        torch.manual_seed(0)
        model = build(preset).double()
        ref, own = copy.deepcopy(model), copy.deepcopy(model)
        h = parallelize(model, W, method="zeco", attention="ulysses")
        parallelize(ref, singles[r], method="zeco", attention="ulysses")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
        errs = {"loss": 0.0, "logits": 0.0, "grad": 0.0, "param": 0.0}
        worst = ""
        for step in range(steps):
            ids = torch.randint(3, 64, (2, T), generator=torch.Generator().manual_seed(10 + step))
            labels = zeco.shift_labels(ids)
            logits_ref = ref(input_ids=ids).logits
            loss_ref = torch.nn.functional.cross_entropy(logits_ref.flatten(0, 1), labels.flatten())
            loss_ref.backward()
            with LEDGER.recording() as rec:
                logits = model(input_ids=zeco.shard_sequence(ids, W)).logits
                loss = zeco.sp_lm_loss(logits, zeco.shard_sequence(labels, W), W)
                loss.backward()
            errs["loss"] = max(errs["loss"], _rel(loss, loss_ref))
            errs["logits"] = max(errs["logits"], _rel(logits, zeco.shard_sequence(logits_ref, W)))
            grads = []
            for (name, p), pr in zip(model.named_parameters(), ref.parameters()):
                g = torch.zeros_like(p) if p.grad is None else p.grad
                dist.all_reduce(g)
                grads.append(g.clone())
                e = _rel(g, torch.zeros_like(pr) if pr.grad is None else pr.grad)
                if e > errs["grad"]:
                    errs["grad"], worst = e, name
            if step == 0:
                own_errs = _against_own_kernels(own, ids, labels, logits, loss, grads, W)
            opt.step(), opt_ref.step()
            opt.zero_grad(), opt_ref.zero_grad()
            errs["param"] = max(errs["param"], max(_rel(p, pr) for p, pr in zip(model.parameters(), ref.parameters())))
        errs.update(own_errs)
        rows = [(x.op, x.tag, x.elements_sent, x.elements_recv) for x in rec]
        h.remove()
        restored = model.config._attn_implementation != "longseq_sp" and all(
            "forward" not in vars(w) for _, lay, _ in __import__("longseq.adapters.transformers", fromlist=["x"])
            .find_layers(model) for w in lay._kernel_funcs.values())
        out[preset] = (errs, worst, rows, [p for p, _ in h.layers], restored)
    return out


_SINGLES: dict = {}


def _single_rank_groups(P):
    """One one-rank process group per rank (every rank creates all of them, in order; cached)."""
    if P not in _SINGLES:
        _SINGLES[P] = [dist.new_group([i]) for i in range(P)]
    return _SINGLES[P]


def _rel(a, b):
    """max|a - b| / (max|b| + 1e-3): relative to the tensor's scale (absolute for tiny tensors)."""
    return ((a - b).abs().max() / (b.abs().max() + 1e-3)).item()


def _against_own_kernels(own, ids, labels, logits, loss, grads, W):
    """The unchanged model (transformers' float32-inside kernels) on the whole sequence."""
    from longseq import zeco
    lo = own(input_ids=ids).logits
    ls = torch.nn.functional.cross_entropy(lo.flatten(0, 1), labels.flatten())
    ls.backward()
    gerr = max(((g - (torch.zeros_like(p) if p.grad is None else p.grad)).abs().max()
                / (p.grad.abs().max() + 1e-12 if p.grad is not None else 1.0)).item() for g, p in zip(grads, own.parameters()))
    return {"own_loss": (loss - ls).abs().item(), "own_logits": (logits - zeco.shard_sequence(lo, W)).abs().max().item(),
            "own_grad": gerr}


def _state_and_halo(preset):
    """(B·Hv·K·V, (w-1)·C) of the preset's delta-rule layer, B = 2."""
    from longseq.models.hf_lm import hf_config
    c = hf_config(preset)
    if hasattr(c, "linear_num_value_heads"):
        hv, k, v, hk = c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim, c.linear_num_key_heads
    else:
        hv = hk = c.linear_num_heads if hasattr(c, "linear_num_heads") else c.num_attention_heads
        k = v = getattr(c, "linear_head_dim", None) or c.head_dim
    w = getattr(c, "linear_conv_kernel_dim", None) or c.short_conv_kernel_size
    return 2 * hv * k * v, (w - 1) * 2 * (2 * hk * k + hv * v)


# Each model at one of P = 2 / 3 (alternating, so both P, both T and both attention kinds, GQA and MLA,
# are covered); two AdamW steps for one GDN and one KDA/MLA model, one step for the rest (a second step
# exercises nothing a first does not, beyond the optimizer, already covered by the two).
SPLIT = {(2, 11): {"qwen3_next_tiny": 2, "bailing_hybrid_tiny": 1, "olmo_hybrid_tiny": 1},
         (3, 7): {"kimi_linear_tiny": 2, "qwen3_5_tiny": 1}}


def test_split_covers_every_model():
    assert sorted(m for d in SPLIT.values() for m in d) == sorted(MODELS)


@pytest.mark.parametrize("P,T", list(SPLIT))
def test_five_models_train_like_one_process(dist_pool, P, T):
    res = dist_pool(P).run(_train, SPLIT[(P, T)], T, timeout=400)
    for r, per_rank in enumerate(res):
        for preset, (errs, worst, rows, layers, restored) in per_rank.items():
            where = f"{preset} P={P} rank {r}"
            for key, tol in (("loss", 1e-9), ("logits", 1e-9), ("grad", 1e-6), ("param", 1e-6)):
                assert errs[key] <= tol, (where, key, errs, worst)
            assert errs["own_loss"] <= 1e-6 and errs["own_logits"] <= 1e-6 and errs["own_grad"] <= 1e-2, (where, errs)
            assert len(layers) == 1 and restored, (where, layers)
            S, halo = _state_and_halo(preset)
            fwd = sum(x[2] for x in rows if x[1] == "zeco.delta.scan.fwd")
            bwd = sum(x[2] for x in rows if x[1] == "zeco.delta.scan.bwd")
            assert fwd == (0 if r == P - 1 else S) and bwd == (0 if r == 0 else S), (where, fwd, bwd, S)
            sent = sum(x[2] for x in rows if x[1] == "transformers.conv.halo")
            assert sent == (0 if r == P - 1 else halo), (where, sent, halo)


def _refusals():
    warnings.filterwarnings("ignore")
    from longseq.adapters.transformers import parallelize
    from longseq.models.hf_lm import build
    W = dist.group.WORLD
    model = build("qwen3_5_tiny")
    h = parallelize(model, W)
    ids = torch.randint(3, 64, (1, 4))
    msgs = {}
    try:
        model(input_ids=ids, labels=ids)
    except ValueError as e:
        msgs["labels"] = str(e)
    h.remove()
    try:
        parallelize(torch.nn.Linear(2, 2), W)
    except ValueError as e:
        msgs["none"] = str(e)
    return msgs


def test_refusals_name_the_fix(dist_pool):
    msgs = dist_pool(2).run(_refusals)[0]
    assert "zeco.sp_lm_loss" in msgs["labels"] and "shift_labels" in msgs["labels"]
    assert "fla_delta" in msgs["none"] and "longseq.sp.parallelize" in msgs["none"]
