"""Local gated delta rule (zeco.delta): the chunked WY form against the token-by-token recurrence and
against fla's own naive references, forward and backward, GDN (scalar) and KDA (per-channel) gates.

Tolerances: float64 chunk vs our recurrence 1e-10 relative (outputs, final state, every gradient);
against fla's float32 naive references 2e-5 relative.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from longseq.zeco.delta import (chunk_prepare, delta_rule, l2norm, local_maps, recurrent_delta_rule_reference)


def _rel(a, b):
    return (a.double() - b.double()).abs().max().item() / max(b.double().abs().max().item(), 1e-30)


def _inputs(B, T, H, K, V, kda, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v = r(B, T, H, K), l2norm(r(B, T, H, K)), r(B, T, H, V)
    g = F.logsigmoid(r(B, T, H, *([K] if kda else [])) + 2.0)
    beta = torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    h0 = r(B, H, K, V)
    return [x.to(dtype) for x in (q, k, v, g, beta, h0)]


@pytest.mark.parametrize("kda", [False, True])
@pytest.mark.parametrize("T,chunk", [(37, 16), (5, 16), (16, 4)])
def test_chunk_matches_recurrence_fwd_bwd(kda, T, chunk):
    xs = [x.requires_grad_() for x in _inputs(2, T, 2, 8, 6, kda)]
    gen = torch.Generator().manual_seed(1)
    do, dht = torch.randn(2, T, 2, 6, generator=gen, dtype=torch.float64), torch.randn(2, 2, 8, 6, generator=gen,
                                                                                         dtype=torch.float64)
    res = []
    for fn in ("chunk", "ref"):
        if fn == "chunk":
            o, ht = delta_rule(*xs[:5], initial_state=xs[5], output_final_state=True, backend="torch", chunk_size=chunk)
        else:
            o, ht = recurrent_delta_rule_reference(*xs[:5], initial_state=xs[5])
        grads = torch.autograd.grad((o * do).sum() + (ht * dht).sum(), xs)
        res.append((o, ht, grads))
    (o1, h1, g1), (o2, h2, g2) = res
    assert _rel(o1, o2) < 1e-10 and _rel(h1, h2) < 1e-10
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dbeta", "dh0"), g1, g2):
        assert _rel(a, b) < 1e-10, name


@pytest.mark.parametrize("kda", [False, True])
def test_matches_fla_naive(kda):
    fla_naive = pytest.importorskip("fla.ops.kda.naive" if kda else "fla.ops.gated_delta_rule.naive")
    q, k, v, g, beta, h0 = _inputs(1, 21, 2, 8, 8, kda, dtype=torch.float32, seed=3)
    o, ht = delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=8)
    if kda:
        o_f, h_f = fla_naive.naive_recurrent_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    else:
        o_f, h_f = fla_naive.naive_recurrent_gated_delta_rule(q, k, v, beta, g, initial_state=h0,
                                                              output_final_state=True)
    assert _rel(o, o_f) < 2e-5 and _rel(ht, h_f) < 2e-5


@pytest.mark.parametrize("kda", [False, True])
def test_local_maps_are_the_affine_map(kda):
    """o = o_local + F·S_in and S_end = S_local + A·S_in for any incoming state (ZeCO's correction)."""
    q, k, v, g, beta, h0 = _inputs(2, 29, 2, 8, 6, kda, seed=5)
    o_ref, h_ref = recurrent_delta_rule_reference(q, k, v, g, beta, initial_state=h0)
    o_loc, Fc, A, S_loc = local_maps(chunk_prepare(q, k, v, g, beta, scale=8 ** -0.5, chunk_size=8))
    assert Fc.shape == q.shape and A.shape == (2, 2, 8, 8)
    assert _rel(o_loc + torch.einsum("bthk,bhkv->bthv", Fc, h0), o_ref) < 1e-10
    assert _rel(S_loc + A @ h0, h_ref) < 1e-10


def test_l2norm_option_and_bf16():
    q, k, v, g, beta, h0 = _inputs(1, 12, 2, 8, 4, False, dtype=torch.float32, seed=7)
    o1, _ = delta_rule(q * 3, k * 2, v, g, beta, use_qk_l2norm=True)
    o2, _ = recurrent_delta_rule_reference(q, k, v, g, beta, use_qk_l2norm=True)
    assert _rel(o1, o2) < 2e-5
    ob, hb = delta_rule(*(x.bfloat16() for x in (q, k, v)), g, beta.bfloat16(), output_final_state=True)
    assert ob.dtype == torch.bfloat16 and hb.dtype == torch.float32
    assert _rel(ob, recurrent_delta_rule_reference(q, k, v, g, beta)[0]) < 3e-2


def test_bad_shapes_are_named():
    q, k, v, g, beta, h0 = _inputs(1, 4, 2, 8, 4, False)
    with pytest.raises(ValueError, match="beta must be"):
        delta_rule(q, k, v, g, beta[..., :1])
    with pytest.raises(ValueError, match="Gated DeltaNet"):
        delta_rule(q, k, v, g[..., :1], beta)
