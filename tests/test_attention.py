"""longseq.attention: every backend equals the math reference; dispatch, errors, LSE."""
import math
import sys
import types

import pytest
import torch
from hypothesis import given, settings, strategies as st

from longseq import attention as A
from longseq.attention import attention, attention_with_lse, available_backends, resolve_backend

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOL = {torch.float32: 2e-5, torch.float64: 1e-10, torch.bfloat16: 3e-2, torch.float16: 3e-3}


@pytest.fixture(autouse=True)
def _clean_default(monkeypatch):
    monkeypatch.delenv(A.ENV_VAR, raising=False)
    A.set_default_backend(None)
    A._INSTALLED.clear()
    yield
    A.set_default_backend(None)
    A._INSTALLED.clear()


def _qkv(b=2, lq=7, lk=7, h=4, hkv=None, d=8, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    hkv = hkv or h
    make = lambda l, n: torch.randn(b, l, n, d, generator=g).to(device, dtype).requires_grad_()
    return make(lq, h), make(lk, hkv), make(lk, hkv)


def _naive(q, k, v, causal=False, scale=None):
    """Loop-per-head float64 reference, independent of the module's code."""
    b, lq, h, d = q.shape
    lk, rep = k.shape[1], h // k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    out = torch.zeros(b, lq, h, d, dtype=torch.float64)
    lse = torch.zeros(b, h, lq, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            s = q[bi, :, hi].double() @ k[bi, :, hi // rep].double().T * scale
            if causal:
                s = s.masked_fill(torch.ones(lq, lk).tril(lk - lq) == 0, -math.inf)
            lse[bi, hi] = torch.logsumexp(s, -1)
            out[bi, :, hi] = torch.softmax(s, -1) @ v[bi, :, hi // rep].double()
    return out, lse


def _fwd_bwd(fn, q, k, v, seed=1):
    out = fn(q, k, v)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    grads = torch.autograd.grad((out.float() * go.float()).sum(), (q, k, v))
    return (out, *grads)


CASES = [  # (lq, lk, h, hkv, causal, scale)
    (7, 7, 4, 4, False, None),
    (7, 7, 4, 4, True, None),
    (5, 9, 4, 2, False, 0.3),
    (5, 9, 4, 1, True, None),  # causal with Lq < Lk: bottom-right aligned
]


def test_math_matches_naive_loop():
    for lq, lk, h, hkv, causal, scale in CASES:
        q, k, v = _qkv(lq=lq, lk=lk, h=h, hkv=hkv, dtype=torch.float64)
        ref, _ = _naive(q, k, v, causal, scale)
        out = attention(q, k, v, causal=causal, softmax_scale=scale, backend="math")
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["sdpa", "flash_attn", "xformers", "math", "auto"])
@pytest.mark.parametrize("case", CASES)
def test_backend_equals_math(backend, case, device):
    lq, lk, h, hkv, causal, scale = case
    dtypes = [torch.float32, torch.bfloat16] if device == "cpu" else [torch.float32, torch.bfloat16, torch.float16]
    ran = False
    for dtype in dtypes:
        q, k, v = _qkv(lq=lq, lk=lk, h=h, hkv=hkv, dtype=dtype, device=device)
        if backend != "auto" and backend not in available_backends(q):
            continue
        kw = dict(causal=causal, softmax_scale=scale)
        got = _fwd_bwd(lambda *t: attention(*t, backend=backend, **kw), q, k, v)
        ref = _fwd_bwd(lambda *t: attention(*t, backend="math", **kw), q, k, v)
        for g, r in zip(got, ref):
            assert g.dtype == r.dtype == dtype and g.shape == r.shape
            torch.testing.assert_close(g.float(), r.float(), atol=TOL[dtype], rtol=TOL[dtype])
        ran = True
    if not ran:
        pytest.skip(f"{backend} cannot run on {device} here")


@settings(max_examples=15, deadline=None)
@given(b=st.integers(1, 2), lq=st.integers(1, 12), extra=st.integers(0, 5), hkv=st.sampled_from([1, 2]),
       rep=st.sampled_from([1, 3]), d=st.sampled_from([4, 16]), causal=st.booleans())
def test_sdpa_equals_math_random_shapes(b, lq, extra, hkv, rep, d, causal):
    q, k, v = _qkv(b=b, lq=lq, lk=lq + extra, h=hkv * rep, hkv=hkv, d=d)
    got = _fwd_bwd(lambda *t: attention(*t, causal=causal, backend="sdpa"), q, k, v)
    ref = _fwd_bwd(lambda *t: attention(*t, causal=causal, backend="math"), q, k, v)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, atol=2e-5, rtol=2e-5)


# ----------------------------------------------------------------------------------------------
# Dispatch and errors
# ----------------------------------------------------------------------------------------------
def test_default_backend_env_and_setter(monkeypatch):
    q = torch.zeros(1, 2, 1, 4)
    assert resolve_backend(None, q) == "sdpa"
    monkeypatch.setenv(A.ENV_VAR, "math")
    assert resolve_backend(None, q) == "math"
    A.set_default_backend("sdpa")                 # the setter wins over the environment
    assert resolve_backend(None, q) == "sdpa"
    with A.attention_backend("math"):
        assert resolve_backend(None, q) == "math"
    assert resolve_backend(None, q) == "sdpa"
    A.set_default_backend(None)
    assert resolve_backend(None, q) == "math"
    monkeypatch.setenv(A.ENV_VAR, "nope")
    with pytest.raises(ValueError, match="sdpa"):
        attention(q, q, q)


def test_auto_on_cpu_is_sdpa():
    q = torch.zeros(1, 2, 1, 4)
    assert resolve_backend("auto", q) == "sdpa"
    assert {"sdpa", "math"} <= set(available_backends(q))


def test_unknown_backend_lists_valid_ones():
    q = torch.zeros(1, 2, 1, 4)
    with pytest.raises(ValueError) as e:
        attention(q, q, q, backend="flash")
    for name in ("sdpa", "flash_attn", "xformers", "math", "auto"):
        assert name in str(e.value)
    with pytest.raises(ValueError):
        A.set_default_backend("flash")


@pytest.mark.parametrize("backend,modules,pip", [
    ("flash_attn", ["flash_attn"], r"needs flash-attn, which is not installed: pip install 'longseq\[gpu\]'"),
    ("xformers", ["xformers", "xformers.ops"], r"needs xformers, which is not installed: pip install 'longseq\[gpu\]'"),
])
def test_missing_backend_says_what_to_install(monkeypatch, backend, modules, pip):
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)   # makes `import m` fail
    q = torch.zeros(1, 2, 1, 4)
    with pytest.raises(ImportError, match=pip):
        attention(q, q, q, backend=backend)
    assert backend not in available_backends()
    assert resolve_backend("auto", q) == "sdpa"


def test_backend_that_cannot_run_inputs(monkeypatch):
    fake_fa = types.ModuleType("flash_attn")
    fake_fa.flash_attn_func = lambda *a, **k: pytest.fail("must not be called on CPU")
    fake_xf = types.ModuleType("xformers.ops")
    monkeypatch.setitem(sys.modules, "flash_attn", fake_fa)
    monkeypatch.setitem(sys.modules, "xformers", types.ModuleType("xformers"))
    monkeypatch.setitem(sys.modules, "xformers.ops", fake_xf)
    q = torch.zeros(1, 2, 1, 4)
    assert {"flash_attn", "xformers"} <= set(available_backends())
    assert "flash_attn" not in available_backends(q)
    with pytest.raises(RuntimeError, match="CUDA"):
        attention(q, q, q, backend="flash_attn")
    with pytest.raises(RuntimeError, match="CUDA"):
        attention(q, q, q, backend="xformers")
    assert resolve_backend("auto", q) == "sdpa"     # auto skips what cannot run


def test_shape_errors():
    q = torch.zeros(1, 5, 3, 4)
    with pytest.raises(ValueError, match="multiple"):
        attention(q, torch.zeros(1, 5, 2, 4), torch.zeros(1, 5, 2, 4))
    with pytest.raises(ValueError, match="Lq <= Lk"):
        attention(q, q[:, :3], q[:, :3], causal=True)
    with pytest.raises(ValueError, match=r"\[B, L, H, D\]"):
        attention(q[0], q[0], q[0])


# ----------------------------------------------------------------------------------------------
# Attention with LSE
# ----------------------------------------------------------------------------------------------
def _lse_fwd_bwd(impl, q, k, v, **kw):
    out, lse = attention_with_lse(q, k, v, impl=impl, **kw)
    g = torch.Generator().manual_seed(3)
    go, gl = torch.randn(out.shape, generator=g).to(out), torch.randn(lse.shape, generator=g).to(lse)
    grads = torch.autograd.grad((out.float() * go.float()).sum() + (lse * gl).sum(), (q, k, v))
    return (out, lse, *grads)


@pytest.mark.parametrize("case", CASES)
def test_lse_matches_logsumexp_of_scores(case):
    lq, lk, h, hkv, causal, scale = case
    q, k, v = _qkv(lq=lq, lk=lk, h=h, hkv=hkv)
    ref_out, ref_lse = _naive(q, k, v, causal, scale)
    for impl in ("math", "auto"):
        out, lse = attention_with_lse(q, k, v, causal=causal, softmax_scale=scale, impl=impl)
        assert lse.shape == (q.shape[0], h, lq) and lse.dtype == torch.float32 and lse.is_contiguous()
        torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [c for c in CASES if not (c[4] and c[0] != c[1])])
def test_lse_aten_cpu_equals_math_fwd_bwd(case, dtype):
    lq, lk, h, hkv, causal, scale = case
    q, k, v = _qkv(lq=lq, lk=lk, h=h, hkv=hkv, dtype=dtype)
    got = _lse_fwd_bwd("aten_cpu", q, k, v, causal=causal, softmax_scale=scale)
    ref = _lse_fwd_bwd("math", q, k, v, causal=causal, softmax_scale=scale)
    for g, r in zip(got, ref):
        assert g.dtype == r.dtype and g.shape == r.shape
        torch.testing.assert_close(g.float(), r.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("impl", ["math", "aten_cpu"])
def test_lse_gradcheck(impl):
    for causal in (False, True):
        q, k, v = _qkv(b=1, lq=4, lk=4, h=2, hkv=1, d=3, dtype=torch.float64)
        fn = lambda q, k, v: attention_with_lse(q, k, v, causal=causal, impl=impl)
        assert torch.autograd.gradcheck(fn, (q, k, v))


def test_lse_impl_choice():
    q, k, v = _qkv(lq=3, lk=5)
    with pytest.raises(RuntimeError, match="aten_cpu"):
        attention_with_lse(q, k, v, causal=True, impl="aten_cpu")   # needs Lq == Lk when causal
    attention_with_lse(q, k, v, causal=True)                          # auto falls back to math
    with pytest.raises(ValueError, match="impl"):
        attention_with_lse(q, k, v, impl="flash")


@pytest.mark.parametrize("impl", ["math", "aten_cpu"])
def test_lse_merges_key_blocks_like_ring_attention(impl):
    """Attention over keys [K1; K2] equals the LSE-weighted merge of the two partial results,
    in value and in gradient: what ring attention relies on."""
    q, k, v = _qkv(lq=6, lk=6, h=2)
    full = _fwd_bwd(lambda *t: attention(*t, backend="math"), q, k, v)

    def merged(q, k, v):
        o1, l1 = attention_with_lse(q, k[:, :2], v[:, :2], impl=impl)
        o2, l2 = attention_with_lse(q, k[:, 2:], v[:, 2:], impl=impl)
        lse = torch.logaddexp(l1, l2)
        w1, w2 = (torch.exp(l - lse).transpose(1, 2)[..., None] for l in (l1, l2))  # [B, L, H, 1]
        return w1 * o1 + w2 * o2

    for g, r in zip(_fwd_bwd(merged, q, k, v), full):
        torch.testing.assert_close(g, r, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_dropout_is_applied(backend):
    q, k, v = _qkv()
    plain = attention(q, k, v, backend=backend)
    torch.manual_seed(0)
    dropped = attention(q, k, v, dropout_p=0.5, backend=backend)
    assert dropped.shape == plain.shape and not torch.allclose(dropped, plain)
