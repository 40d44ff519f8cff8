"""Tests for the local gated-linear-attention operator (zeco.gla).

Tolerances:
* float32 against fla's reference ``naive_recurrent_gla`` (float32 internally):
  max |ours - ref| <= 1e-4 * max |ref| per tensor (outputs, final state, all gradients).
* float64 against our own float64 step-by-step reference: max abs error <= 1e-10
  (inputs are O(1); observed errors are ~1e-14).
"""
from __future__ import annotations

import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from longseq.zeco.gla import (
    ChunkGLAFunction,
    GLAFunction,
    chunk_gla_bwd,
    chunk_gla_fwd,
    fla_available,
    gla,
    gla_bwd,
    gla_fwd,
    recurrent_gla_reference,
    resolve_backend,
)
from longseq.zeco.gla import fla_backend

REL32 = 1e-4
ABS64 = 1e-10


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _inputs(B, T, H, K, V, *, dtype=torch.float32, scalar=False, strong=True, seed=0):
    """Random q, k, v, g (log-sigmoid decays, some down to about -20), h0, do, dht."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v = r(B, T, H, K), r(B, T, H, K), r(B, T, H, V)
    gshape = (B, T, H) if scalar else (B, T, H, K)
    g = F.logsigmoid(r(*gshape))
    if strong:  # a random subset of entries decays very strongly (g in [-20, 0))
        mult = torch.where(torch.rand(gshape, generator=gen, dtype=torch.float64) < 0.2, 20.0, 1.0)
        g = (g * mult).clamp_min(-20.0)
    h0 = r(B, H, K, V)
    do, dht = r(B, T, H, V), r(B, H, K, V)
    return [x.to(dtype) for x in (q, k, v, g, h0, do, dht)]


def _ref_grads(fn, q, k, v, g, h0, do, dht):
    """Outputs and autograd gradients of loss = <o, do> + <ht, dht> for a reference fn."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, g, h0)]
    o, ht = fn(*leaves)
    loss = (o.double() * do.double()).sum() + (ht.double() * dht.double()).sum()
    grads = torch.autograd.grad(loss, leaves)
    return o.detach(), ht.detach(), grads


# --------------------------------------------------------------------------- fla reference
fla_naive = pytest.importorskip("fla.ops.gla.naive", reason="flash-linear-attention not installed")


def _fla_gla(q, k, v, g, h0):
    return fla_naive.naive_recurrent_gla(q, k, v, g, initial_state=h0, output_final_state=True)


@pytest.mark.parametrize("T,chunk", [(100, 64), (130, 64), (100, 16), (130, 16), (1, 64), (64, 64)])
def test_chunk_vs_fla_naive_float32(T, chunk):
    q, k, v, g, h0, do, dht = _inputs(2, T, 2, 16, 8, seed=T + chunk)
    o_ref, ht_ref, g_ref = _ref_grads(_fla_gla, q, k, v, g, h0, do, dht)
    o, ht = gla_fwd(q, k, v, g, initial_state=h0, backend="torch", chunk_size=chunk)
    assert o.dtype == torch.float32 and ht.dtype == torch.float32
    assert _rel_err(o, o_ref) < REL32
    assert _rel_err(ht, ht_ref) < REL32
    grads = gla_bwd(q, k, v, g, initial_state=h0, do=do, dht=dht, backend="torch", chunk_size=chunk)
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dh0"), grads, g_ref):
        assert a.shape == b.shape, name
        assert _rel_err(a, b) < REL32, (name, _rel_err(a, b))


def test_autograd_function_vs_fla_naive_float32():
    q, k, v, g, h0, do, dht = _inputs(1, 70, 2, 8, 8, seed=3)
    o_ref, ht_ref, g_ref = _ref_grads(_fla_gla, q, k, v, g, h0, do, dht)
    o, ht, grads = _ref_grads(
        lambda *a: gla(*a[:4], initial_state=a[4], output_final_state=True, backend="torch",
                       chunk_size=32),
        q, k, v, g, h0, do, dht)
    assert _rel_err(o, o_ref) < REL32 and _rel_err(ht, ht_ref) < REL32
    for a, b in zip(grads, g_ref):
        assert _rel_err(a, b) < REL32


# --------------------------------------------------------------------------- float64, tight
@pytest.mark.parametrize("T,chunk,scalar", [
    (100, 64, False), (130, 16, False), (130, 64, True), (37, 13, False), (5, 64, False),
    (48, 48, True),
])
def test_chunk_vs_own_reference_float64(T, chunk, scalar):
    q, k, v, g, h0, do, dht = _inputs(2, T, 2, 8, 6, dtype=torch.float64, scalar=scalar, seed=T)
    o_ref, ht_ref, g_ref = _ref_grads(
        lambda *a: recurrent_gla_reference(*a[:4], None, a[4]), q, k, v, g, h0, do, dht)
    o, ht = chunk_gla_fwd(q, k, v, g, None, h0, chunk)
    assert o.dtype == torch.float64 and ht.dtype == torch.float64
    assert (o - o_ref).abs().max() < ABS64
    assert (ht - ht_ref).abs().max() < ABS64
    grads = chunk_gla_bwd(q, k, v, g, None, h0, do, dht, chunk)
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dh0"), grads, g_ref):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert (a - b).abs().max() < ABS64, (name, (a - b).abs().max().item())


def test_custom_scale_and_no_initial_state_float64():
    q, k, v, g, _, do, dht = _inputs(1, 50, 3, 4, 5, dtype=torch.float64, seed=11)
    h0 = torch.zeros(1, 3, 4, 5, dtype=torch.float64)
    o_ref, ht_ref, g_ref = _ref_grads(
        lambda *a: recurrent_gla_reference(*a[:4], 0.37, a[4]), q, k, v, g, h0, do, dht)
    o, ht = gla_fwd(q, k, v, g, scale=0.37, backend="torch", chunk_size=16)
    assert (o - o_ref).abs().max() < ABS64 and (ht - ht_ref).abs().max() < ABS64
    dq, dk, dv, dg, dh0 = gla_bwd(q, k, v, g, scale=0.37, do=do, dht=dht, backend="torch",
                                  chunk_size=16)
    for a, b in zip((dq, dk, dv, dg, dh0), g_ref):  # dh0 is returned without an initial state
        assert (a - b).abs().max() < ABS64


def test_gradcheck_float64():
    q, k, v, g, h0, _, _ = _inputs(1, 7, 1, 3, 2, dtype=torch.float64, seed=5)
    args = [x.clone().requires_grad_() for x in (q, k, v, g, h0)]
    assert torch.autograd.gradcheck(
        lambda q, k, v, g, h0: ChunkGLAFunction.apply(q, k, v, g, 0.5, h0, 4), args)
    assert torch.autograd.gradcheck(
        lambda q, k, v, g, h0: GLAFunction.apply(q, k, v, g, h0, 0.5, "torch", 3), args)
    gs = args[3].detach()[..., 0].clone().requires_grad_()  # scalar decay
    assert torch.autograd.gradcheck(
        lambda q, k, v, g, h0: ChunkGLAFunction.apply(q, k, v, g, 0.5, h0, 4),
        [args[0], args[1], args[2], gs, args[4]])


def test_gla_bwd_with_dht_matches_reference_autograd():
    """gla_bwd(do, dht) == autograd of the reference with loss <o, do> + <S_T, dht>."""
    q, k, v, g, h0, do, dht = _inputs(2, 90, 2, 8, 4, dtype=torch.float64, seed=21)
    _, _, g_ref = _ref_grads(
        lambda *a: recurrent_gla_reference(*a[:4], None, a[4]), q, k, v, g, h0, do, dht)
    got = gla_bwd(q, k, v, g, initial_state=h0, do=do, dht=dht, backend="torch", chunk_size=32)
    for a, b in zip(got, g_ref):
        assert (a - b).abs().max() < ABS64
    # and dht alone (zero do): only the final-state term
    _, _, g_ref0 = _ref_grads(
        lambda *a: recurrent_gla_reference(*a[:4], None, a[4]), q, k, v, g, h0,
        torch.zeros_like(do), dht)
    got0 = gla_bwd(q, k, v, g, initial_state=h0, do=torch.zeros_like(do), dht=dht,
                   backend="torch", chunk_size=32)
    for a, b in zip(got0, g_ref0):
        assert (a - b).abs().max() < ABS64


# --------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_strong_decay_long_chunk_is_finite(dtype):
    """g = -30 everywhere (cumsum reaches -1920 in a 64 chunk; exp(+1920) would overflow)."""
    q, k, v, _, h0, do, dht = _inputs(1, 200, 2, 8, 4, dtype=dtype, seed=7)
    g = torch.full_like(q, -30.0)
    o, ht = gla_fwd(q, k, v, g, initial_state=h0, backend="torch", chunk_size=64)
    grads = gla_bwd(q, k, v, g, initial_state=h0, do=do, dht=dht, backend="torch", chunk_size=64)
    for t in (o, ht, *grads):
        assert torch.isfinite(t).all()
    # with such decay each state is (almost exactly) the last k v^T
    o_ref, ht_ref = recurrent_gla_reference(q.double(), k.double(), v.double(), g.double(),
                                            None, h0.double())
    assert _rel_err(o, o_ref) < REL32 and _rel_err(ht, ht_ref) < REL32


def test_mixed_extreme_decay_matches_reference_float64():
    """Per-key mix of g = -30 and g = 0 (and -1000), so exponents span a huge range."""
    q, k, v, _, h0, do, dht = _inputs(1, 150, 1, 6, 3, dtype=torch.float64, seed=9)
    g = torch.zeros_like(q)
    g[..., 0::3] = -30.0
    g[..., 1] = -1000.0
    g[:, 40:45] = 0.0
    o_ref, ht_ref, g_ref = _ref_grads(
        lambda *a: recurrent_gla_reference(*a[:4], None, a[4]), q, k, v, g, h0, do, dht)
    o, ht = chunk_gla_fwd(q, k, v, g, None, h0, 64)
    grads = chunk_gla_bwd(q, k, v, g, None, h0, do, dht, 64)
    assert (o - o_ref).abs().max() < 1e-9 and (ht - ht_ref).abs().max() < 1e-9
    for a, b in zip(grads, g_ref):
        assert torch.isfinite(a).all() and (a - b).abs().max() < 1e-9


def test_bf16_inputs_keep_dtypes():
    q, k, v, g, h0, do, dht = _inputs(1, 40, 2, 8, 8, seed=13)
    qb, kb, vb, dob = (x.bfloat16() for x in (q, k, v, do))
    o, ht = gla_fwd(qb, kb, vb, g, initial_state=h0, backend="torch", chunk_size=16)
    assert o.dtype == torch.bfloat16 and ht.dtype == torch.float32
    o32, _ = gla_fwd(qb.float(), kb.float(), vb.float(), g, initial_state=h0, backend="torch")
    assert _rel_err(o, o32) < 1e-2
    dq, dk, dv, dg, dh0 = gla_bwd(qb, kb, vb, g, initial_state=h0, do=dob, dht=dht,
                                  backend="torch", chunk_size=16)
    assert (dq.dtype, dk.dtype, dv.dtype, dg.dtype, dh0.dtype) == (
        torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.float32, torch.float32)


# --------------------------------------------------------------------------- scalar decay
def test_scalar_decay_vs_fla_simple_gla_naive():
    simple = pytest.importorskip("fla.ops.simple_gla.naive")
    q, k, v, g, h0, do, dht = _inputs(2, 100, 2, 8, 8, scalar=True, seed=17)
    assert g.shape == (2, 100, 2)
    o_ref, ht_ref, g_ref = _ref_grads(
        lambda q, k, v, g, h0: simple.naive_recurrent_simple_gla(
            q, k, v, g, scale=None, initial_state=h0, output_final_state=True),
        q, k, v, g, h0, do, dht)
    o, ht = gla_fwd(q, k, v, g, initial_state=h0, backend="torch", chunk_size=64)
    assert _rel_err(o, o_ref) < REL32 and _rel_err(ht, ht_ref) < REL32
    grads = gla_bwd(q, k, v, g, initial_state=h0, do=do, dht=dht, backend="torch", chunk_size=64)
    assert grads[3].shape == g.shape
    for a, b in zip(grads, g_ref):
        assert _rel_err(a, b) < REL32


def test_scalar_decay_equals_expanded_per_key_float64():
    q, k, v, g, h0, do, dht = _inputs(1, 70, 2, 4, 4, dtype=torch.float64, scalar=True, seed=19)
    ge = g.unsqueeze(-1).expand_as(q).contiguous()
    o1, h1 = gla_fwd(q, k, v, g, initial_state=h0, backend="torch", chunk_size=16)
    o2, h2 = gla_fwd(q, k, v, ge, initial_state=h0, backend="torch", chunk_size=16)
    assert (o1 - o2).abs().max() < ABS64 and (h1 - h2).abs().max() < ABS64
    b1 = gla_bwd(q, k, v, g, initial_state=h0, do=do, dht=dht, backend="torch", chunk_size=16)
    b2 = gla_bwd(q, k, v, ge, initial_state=h0, do=do, dht=dht, backend="torch", chunk_size=16)
    assert (b1[3] - b2[3].sum(-1)).abs().max() < ABS64
    for i in (0, 1, 2, 4):
        assert (b1[i] - b2[i]).abs().max() < ABS64


# --------------------------------------------------------------------------- ZeCO identity
@pytest.mark.parametrize("scalar", [False, True])
def test_linearity_in_initial_state(scalar):
    """o = o(S0=0) + (scale q * A) S0 and S_end = S_end(0) + diag(Gamma) S0 (DESIGN.md)."""
    q, k, v, g, S0, _, _ = _inputs(2, 77, 2, 8, 4, dtype=torch.float64, scalar=scalar, seed=23)
    scale = 8 ** -0.5
    o, S_end = gla_fwd(q, k, v, g, initial_state=S0, backend="torch", chunk_size=16)
    o0, S_end0 = gla_fwd(q, k, v, g, backend="torch", chunk_size=16)
    ge = g.unsqueeze(-1).expand_as(q) if scalar else g
    A = ge.cumsum(1).exp()                               # [B, T, H, K]: prod_{s<=t} a_s
    Gamma = ge.sum(1).exp()                              # [B, H, K]
    o_lin = o0 + torch.einsum("bthk,bhkv->bthv", scale * q * A, S0)
    S_lin = S_end0 + Gamma.unsqueeze(-1) * S0
    assert (o - o_lin).abs().max() < ABS64
    assert (S_end - S_lin).abs().max() < ABS64
    # two pieces chained through the state equal the whole sequence
    o1, S1 = gla_fwd(q[:, :40], k[:, :40], v[:, :40], g[:, :40], initial_state=S0,
                     backend="torch", chunk_size=16)
    o2, S2 = gla_fwd(q[:, 40:], k[:, 40:], v[:, 40:], g[:, 40:], initial_state=S1,
                     backend="torch", chunk_size=16)
    assert (torch.cat([o1, o2], 1) - o).abs().max() < ABS64 and (S2 - S_end).abs().max() < ABS64


def test_backward_pieces_chain_through_dht():
    """Backward of two pieces with dht = dh0 of the later piece equals the whole backward."""
    q, k, v, g, S0, do, dht = _inputs(1, 90, 2, 4, 4, dtype=torch.float64, seed=29)
    whole = gla_bwd(q, k, v, g, initial_state=S0, do=do, dht=dht, backend="torch", chunk_size=16)
    _, S1 = gla_fwd(q[:, :50], k[:, :50], v[:, :50], g[:, :50], initial_state=S0, backend="torch")
    b2 = gla_bwd(q[:, 50:], k[:, 50:], v[:, 50:], g[:, 50:], initial_state=S1, do=do[:, 50:],
                 dht=dht, backend="torch", chunk_size=16)
    b1 = gla_bwd(q[:, :50], k[:, :50], v[:, :50], g[:, :50], initial_state=S0, do=do[:, :50],
                 dht=b2[4], backend="torch", chunk_size=16)
    for i in range(4):
        assert (torch.cat([b1[i], b2[i]], 1) - whole[i]).abs().max() < ABS64
    assert (b1[4] - whole[4]).abs().max() < ABS64


# --------------------------------------------------------------------------- API / errors
def test_gla_user_op_and_output_final_state():
    q, k, v, g, h0, do, _ = _inputs(1, 30, 2, 4, 4, seed=31)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g, h0)]
    o, ht = gla(*leaves[:4], initial_state=leaves[4], backend="torch")
    assert ht is None and o.shape == v.shape
    (o * do).sum().backward()
    _, _, g_ref = _ref_grads(lambda *a: recurrent_gla_reference(*a[:4], None, a[4]),
                             q, k, v, g, h0, do, torch.zeros(1, 2, 4, 4))
    for leaf, b in zip(leaves, g_ref):
        assert _rel_err(leaf.grad, b) < REL32
    o, ht = gla(q, k, v, g, output_final_state=True, backend="auto")
    assert ht.shape == (1, 2, 4, 4) and ht.dtype == torch.float32


def test_T_zero_and_one():
    q, k, v, g, h0, do, dht = _inputs(1, 1, 1, 3, 2, dtype=torch.float64, seed=37)
    o, ht = gla_fwd(q[:, :0], k[:, :0], v[:, :0], g[:, :0], initial_state=h0, backend="torch")
    assert o.shape == (1, 0, 1, 2) and (ht - h0).abs().max() == 0
    o_ref, ht_ref = recurrent_gla_reference(q, k, v, g, None, h0)
    o, ht = gla_fwd(q, k, v, g, initial_state=h0, backend="torch")
    assert (o - o_ref).abs().max() < ABS64 and (ht - ht_ref).abs().max() < ABS64


def test_backend_resolution_on_cpu():
    q = torch.zeros(1, 2, 1, 2)
    assert resolve_backend("auto", q) == "torch"
    assert resolve_backend("torch", q) == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("triton", q)
    if fla_available():
        with pytest.warns(RuntimeWarning, match="falling back"):
            assert resolve_backend("fla", q) == "torch"
        q, k, v, g, h0, _, _ = _inputs(1, 20, 1, 4, 4, seed=41)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            o1, h1 = gla_fwd(q, k, v, g, initial_state=h0, backend="fla")
        o2, h2 = gla_fwd(q, k, v, g, initial_state=h0, backend="torch")
        assert torch.equal(o1, o2) and torch.equal(h1, h2)


def test_fla_missing_raises_import_error_naming_pip(monkeypatch):
    fla_backend._load.cache_clear()
    monkeypatch.setitem(sys.modules, "fla.ops.gla.chunk", None)  # makes the import fail
    try:
        assert not fla_backend.fla_available()
        q, k, v, g, _, _, _ = _inputs(1, 4, 1, 2, 2, seed=43)
        with pytest.raises(ImportError, match="pip install flash-linear-attention"):
            gla_fwd(q, k, v, g, backend="fla")
        with pytest.raises(ImportError, match="pip install flash-linear-attention"):
            gla(q, k, v, g, backend="fla")
        assert resolve_backend("auto", q) == "torch"
    finally:
        fla_backend._load.cache_clear()


def test_validation_errors():
    q, k, v, g, h0, do, dht = _inputs(2, 10, 3, 4, 5, seed=47)
    cases = [
        (dict(q=q[0]), ValueError, r"q must be \[B, T, H, K\]"),
        (dict(k=k[:1]), ValueError, "k must have q's shape"),
        (dict(k=k[..., :3]), ValueError, "K mismatch"),
        (dict(v=v[:, :9]), ValueError, "v must be"),
        (dict(v=v[:, :, :2]), ValueError, "v must be"),
        (dict(g=g[..., :3]), ValueError, "g must be"),
        (dict(g=g[:, :5, :, 0]), ValueError, "g must be"),
        (dict(initial_state=h0[..., :4]), ValueError, "initial_state must be"),
        (dict(initial_state=h0.transpose(-1, -2)), ValueError, "initial_state must be"),
        (dict(v=v.double()), TypeError, "share one dtype"),
        (dict(q=q.long()), TypeError, "floating-point"),
        (dict(scale="x"), TypeError, "scale"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
    ]
    base = dict(q=q, k=k, v=v, g=g, initial_state=h0, scale=None, backend="torch", chunk_size=8)
    for override, exc, msg in cases:
        kw = {**base, **override}
        args = [kw.pop(n) for n in ("q", "k", "v", "g")]
        with pytest.raises(exc, match=msg):
            gla_fwd(*args, **kw)
        with pytest.raises(exc, match=msg):
            gla_bwd(*args, do=do, dht=dht, **kw)
    with pytest.raises(ValueError, match="do must have v's shape"):
        gla_bwd(q, k, v, g, do=do[:, :4], backend="torch")
    with pytest.raises(ValueError, match="dht must be"):
        gla_bwd(q, k, v, g, do=do, dht=dht[0], backend="torch")


def test_fla_backend_module_imports_lazily():
    """Import-level check of the fla backend (its kernels need CUDA)."""
    assert callable(fla_backend.fla_gla_fwd) and callable(fla_backend.fla_gla_bwd)
    assert fla_backend._gla_chunk_size(1) == 16 and fla_backend._gla_chunk_size(33) == 64
    assert fla_backend._gla_chunk_size(20) == 32
    if fla_available():
        f = fla_backend.require_fla()
        assert {"chunk_gla_fwd", "chunk_gla_bwd", "chunk_simple_gla_fwd",
                "chunk_simple_gla_bwd", "chunk_local_cumsum"} <= set(f)


# --------------------------------------------------------------------------- GPU (lead)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scalar", [False, True])
@pytest.mark.parametrize("T", [100, 300, 1000])
def test_fla_backend_matches_torch_on_cuda(scalar, T):
    if not fla_available():
        pytest.skip("flash-linear-attention not installed")
    q, k, v, g, h0, do, dht = (x.cuda() for x in _inputs(2, T, 2, 64, 64, scalar=scalar, seed=T))
    ref_f = gla_fwd(q, k, v, g, initial_state=h0, backend="torch")
    ref_b = gla_bwd(q, k, v, g, initial_state=h0, do=do, dht=dht, backend="torch")
    got_f = gla_fwd(q, k, v, g, initial_state=h0, backend="fla")
    got_b = gla_bwd(q, k, v, g, initial_state=h0, do=do, dht=dht, backend="fla")
    for name, a, b in zip(("o", "ht"), got_f, ref_f):
        assert a.dtype == b.dtype and _rel_err(a, b) < 2e-3, (name, _rel_err(a, b))
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dh0"), got_b, ref_b):
        assert a.shape == b.shape and _rel_err(a, b) < 2e-3, (name, _rel_err(a, b))
    # without an initial state, dh0 is still returned
    got = gla_bwd(q, k, v, g, do=do, dht=dht, backend="fla")
    ref = gla_bwd(q, k, v, g, do=do, dht=dht, backend="torch")
    assert _rel_err(got[4], ref[4]) < 2e-3
    assert resolve_backend("auto", q) == "fla"
