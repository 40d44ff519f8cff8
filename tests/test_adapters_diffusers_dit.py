"""Full-3D-attention video DiTs of diffusers (Wan, LTX-Video, CogVideoX, HunyuanVideo) made
sequence-parallel by their shipped plans (longseq.adapters.diffusers_dit) equal one process.

Tiny random-weight models (6 heads x 12, 1-2 layers, 4x4 latents with 2x2 patches: S = 4 tokens a
frame), T = 5 frames (3/2 at P = 2, 2/2/1 at P = 3: token pieces of 12/8 and 8/8/4), B = 2, in
float64. Every parameter re-initialised N(0, 0.1²) and every gradient asserted nonzero. Compared
with one process on the whole inputs: the output, the input's gradient and every parameter
gradient (after ``sync_gradients``), ``max|a-b| <= rtol * max|ref|`` per tensor (``RTOL``: 1e-10
where the model computes in float64 throughout, 1e-5 where it casts to float32 itself). The ledger holds
the method's volume per attention stage and nothing else but the entry check and the exit gather:
Ulysses four all-to-alls each way (q, k, v send the heads other ranks own, the output the tokens
other ranks own), plus, for joint text, one all-gather of the text output over the heads; ring the
key/value blocks around the ring (forward: every block but the next rank's).
"""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

pytest.importorskip("diffusers")

import longseq  # noqa: E402
from longseq import dsp  # noqa: E402
from longseq.ledger import LEDGER  # noqa: E402
from longseq.sharding import split_sizes  # noqa: E402

from .tensor_checks import param_grads  # noqa: E402

# float64 throughout, except where the model itself computes in float32 (Wan's adaLN norms and
# output norm cast to float32): there the float32 rounding of the
# same ops on other token groupings shows.
RTOL = {"wan": 1e-5, "ltx": 1e-10, "cogvideox": 1e-10, "hunyuan": 1e-10}
B, T, S, H, D, N = 2, 5, 4, 6, 12, 3     # batch, frames, tokens a frame, heads, head dim, text tokens


def inputs(name, T=T, text_mask=True):
    from longseq.adapters.diffusers_dit import sample_inputs
    return sample_inputs(name, T, B, text_mask=text_mask)


def _model(name):
    from longseq.adapters import diffusers_dit as dd
    from longseq.models.stdit import init_for_testing
    return init_for_testing(dd.build(name), std=0.1, seed=0).double()


def _step(model, kw, target):
    x = kw["hidden_states"].detach().clone().requires_grad_(True)
    out = model(**{**kw, "hidden_states": x}).sample
    F.mse_loss(out, target).backward()
    return out.detach(), x.grad


def _rel(a, b):
    # a floor for gradients that are zero analytically (a key bias: softmax ignores a shift of the keys)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-9))


def _run(name, method, ring_text=False):
    from longseq.adapters import diffusers_dit as dd
    W = dist.group.WORLD
    groups = longseq.from_existing_groups(W)
    model = _model(name)
    kw = inputs(name, text_mask=not ring_text)            # ring takes no text padding mask
    target = torch.randn(kw["hidden_states"].shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ref_out, ref_dx = _step(model, kw, target)
    ref = param_grads(model)
    model.zero_grad(set_to_none=True)
    handle = dsp.parallelize(model, groups, dd.PLANS[name], attention=method,
                             ulysses_degree=2 if method == "usp" else None)
    with LEDGER.recording() as rec:
        out, dx = _step(model, kw, target)
    longseq.sync_gradients(model.parameters(), groups)
    got = param_grads(model)
    handle.remove()
    errs = {"out": _rel(out, ref_out), "dx": _rel(dx, ref_dx)}
    errs.update({k: _rel(got[k], ref[k]) for k in ref})
    zero = [k for k, g in ref.items() if not g.abs().sum() > 0]
    stages = sorted({r_.tag.rsplit(".attn.", 1)[0] for r_ in rec if ".attn." in r_.tag})
    return dict(errs=errs, zero=zero, stages=stages,
                records=[(r_.op, r_.tag, r_.elements_sent) for r_ in rec])


def _expected(method, P, r, stages, text):
    """{tag suffix: elements sent} per attention stage for this rank (module docstring)."""
    L = [n * S for n in split_sizes(T, P)]
    h = H // P
    if method == "ulysses":
        mine, others = B * L[r] * (H - h) * D, B * (sum(L) - L[r]) * h * D
        e = {".qkv": 3 * mine, ".out": others, ".qkv.bwd": 3 * others, ".out.bwd": mine}   # q, k, v packed
        if text:                 # the text output's heads: all-gathered, backward reduce-scattered
            e[".text"] = e[".text.bwd"] = B * N * h * D * (P - 1)
        return e
    kv = [n + (text if j == 0 else 0) for j, n in enumerate(L)]     # rank 0's block carries the text keys
    fwd = 2 * B * H * D * sum(n for j, n in enumerate(kv) if j != (r + 1) % P)
    # backward: the blocks go round again, and the dk, dv accumulator of every block but this rank's
    return {".kv": fwd, ".bwd.kv": fwd, ".bwd.dkv": 2 * B * H * D * sum(n for j, n in enumerate(kv) if j != r)}


# every model at P = 2 and 3, every method with and without joint text tokens; USP (2 x 2) at P = 4
CASES = {2: [("wan", "ulysses"), ("ltx", "ring"), ("cogvideox", "ring"), ("hunyuan", "ulysses")],
         3: [("wan", "ring"), ("ltx", "ulysses"), ("cogvideox", "ulysses"), ("hunyuan", "ring")],
         4: [("wan", "usp")]}


def _check(name, method, P, results):
    text = N if name in ("cogvideox", "hunyuan") else 0
    for r, res in enumerate(results):
        assert not res["zero"], (name, res["zero"])
        bad = {k: e for k, e in res["errs"].items() if not e <= RTOL[name]}
        assert not bad, (name, method, P, r, bad)
        assert res["stages"], (name, method)
        others = {tag for op, tag, _ in res["records"] if ".attn." not in tag}
        assert others <= {"dsp.check", "dsp.exit", "dsp.entry.bwd"}, (name, others)
        if method == "usp":
            continue
        exp = _expected(method, P, r, res["stages"], text)
        for stage in res["stages"]:
            got = {}
            for op, tag, sent in res["records"]:
                if tag.startswith(stage + ".attn.") and not tag.endswith(("check", "sizes")):
                    suffix = tag[len(stage + ".attn"):]
                    got[suffix] = got.get(suffix, 0) + sent
            assert got == exp, (name, method, P, r, stage, got, exp)


@pytest.mark.parametrize("P", [2, 3, 4])
def test_dits_equal_single_process(dist_pool, P):
    pool = dist_pool(P)
    for name, method in CASES[P]:
        _check(name, method, P, pool.run(_run, name, method, ring_text=method == "ring"))
