"""One attention dispatch for every longseq model.

All functions take and return flash-attn's layout: q ``[B, Lq, H, D]``, k and v ``[B, Lk, Hkv, D]``
(``H`` a multiple of ``Hkv``: grouped-query attention repeats k and v), output ``[B, Lq, H, D]``.

Backends (``backend=`` or the process default):

* ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention``; works everywhere; the default.
* ``"flash_attn"``: ``flash_attn.flash_attn_func``; CUDA tensors in fp16/bf16 (``pip install flash-attn``).
* ``"xformers"``: ``xformers.ops.memory_efficient_attention``; CUDA tensors (``pip install xformers``).
* ``"math"``: explicit ``softmax(q kᵀ · scale) v`` in float32; the reference for tests.
* ``"auto"``: the first of flash_attn, xformers, sdpa that is installed and can run the inputs.

The default is ``set_default_backend(name)`` if called, else the environment variable
``LONGSEQ_ATTN_BACKEND``, else ``"sdpa"``. Optional packages are imported only when needed.

``causal=True`` lets query i see keys j <= i + (Lk - Lq): flash-attn's bottom-right alignment,
the ordinary causal mask when Lq == Lk. It needs Lq <= Lk.

``attention_with_lse`` also returns the log-sum-exp of the scaled scores ``[B, H, Lq]`` in float32,
differentiable in both outputs; ring attention merges partial results with it.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from .optional import MissingDependency, require

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "attention",
    "attention_with_lse",
    "attention_backend",
    "available_backends",
    "get_default_backend",
    "set_default_backend",
    "resolve_backend",
]

BACKENDS = ("auto", "sdpa", "flash_attn", "xformers", "math")
ENV_VAR = "LONGSEQ_ATTN_BACKEND"
_MODULE = {"flash_attn": "flash_attn", "xformers": "xformers.ops"}
_HALF = (torch.float16, torch.bfloat16)

_default_backend: Optional[str] = None


# ----------------------------------------------------------------------------------------------
# Choosing a backend
# ----------------------------------------------------------------------------------------------
def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; valid backends: {', '.join(BACKENDS)}")
    return name


def set_default_backend(name: Optional[str]) -> None:
    """Set the process default backend (``None`` goes back to ``$LONGSEQ_ATTN_BACKEND`` / sdpa)."""
    global _default_backend
    _default_backend = None if name is None else _check_name(name)


def get_default_backend() -> str:
    """The backend used when ``backend=None``."""
    if _default_backend is not None:
        return _default_backend
    return _check_name(os.environ.get(ENV_VAR) or "sdpa")


@contextlib.contextmanager
def attention_backend(name: Optional[str]) -> Iterator[None]:
    """Context manager: use ``name`` as the process default inside the ``with`` block."""
    global _default_backend
    previous = _default_backend
    set_default_backend(name)
    try:
        yield
    finally:
        _default_backend = previous


def _import(name: str):
    """Import an optional backend lazily; a missing package names what to pip install."""
    try:
        return require(_MODULE[name], extra="gpu", what=f"attention backend {name!r}")
    except MissingDependency as e:
        raise MissingDependency(f"{e} (or use backend='sdpa')") from None


_INSTALLED: dict[str, bool] = {}


def _installed(name: str) -> bool:
    """Whether backend ``name`` imports (memoised in a dict, not ``functools.lru_cache``, which
    ``torch.compile`` cannot trace: "auto" asks on every call, inside compiled forwards too)."""
    ok = _INSTALLED.get(name)
    if ok is None:
        ok = _INSTALLED[name] = _imports(name)
    return ok


def _imports(name: str) -> bool:
    if name not in _MODULE:
        return name in BACKENDS
    try:
        _import(name)
        return True
    except ImportError:
        return False


def _why_not(name: str, q: torch.Tensor) -> Optional[str]:
    """Why backend ``name`` cannot run inputs like ``q`` (None if it can)."""
    if name == "flash_attn":
        if q.device.type != "cuda" or q.dtype not in _HALF:
            return f"flash_attn needs CUDA tensors in fp16/bf16, got {q.device.type} {q.dtype}"
        if q.shape[-1] > 256:
            return f"flash_attn supports head dim <= 256, got {q.shape[-1]}"
    if name == "xformers" and q.device.type != "cuda":
        return f"xformers needs CUDA tensors, got {q.device.type}"
    return None


def available_backends(q: Optional[torch.Tensor] = None) -> list:
    """Installed backends (without ``"auto"``); with ``q``, only those that can run such inputs."""
    names = [n for n in ("flash_attn", "xformers", "sdpa", "math") if _installed(n)]
    if q is not None:
        names = [n for n in names if _why_not(n, q) is None]
    return names


def resolve_backend(backend: Optional[str], q: torch.Tensor) -> str:
    """The concrete backend that ``attention(q, ..., backend=backend)`` will run."""
    name = get_default_backend() if backend is None else _check_name(backend)
    if name == "auto":
        for cand in ("flash_attn", "xformers"):
            if _why_not(cand, q) is None and _installed(cand):
                return cand
        return "sdpa"
    if name in _MODULE:
        _import(name)  # raises ImportError naming the pip package
        reason = _why_not(name, q)
        if reason is not None:
            raise RuntimeError(f"attention backend {name!r} cannot run these inputs: {reason}; "
                               f"use backend='sdpa' or 'auto'")
    return name


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, L, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape[:3] + k.shape[3:] or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})")
    if causal and q.shape[1] > k.shape[1]:
        raise ValueError(f"causal attention needs Lq <= Lk, got Lq={q.shape[1]}, Lk={k.shape[1]}")


def _repeat_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    rep = q.shape[2] // k.shape[2]
    if rep == 1:
        return k, v
    return k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)


def _causal_mask(lq: int, lk: int, device) -> torch.Tensor:
    """Bool ``[Lq, Lk]``, True where query i may see key j (j <= i + Lk - Lq)."""
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    return j <= i + (lk - lq)


def _scale(q: torch.Tensor, softmax_scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale


# ----------------------------------------------------------------------------------------------
# Backends: each takes [B, L, H, D] and returns [B, Lq, H, D]
# ----------------------------------------------------------------------------------------------
def _acc_dtype(q: torch.Tensor) -> torch.dtype:
    """float32, or float64 for float64 inputs (so gradcheck works)."""
    return torch.promote_types(q.dtype, torch.float32)


def _math_scores(q, k, causal, scale):
    """Scaled scores ``[B, H, Lq, Lk]`` in float32 (float64 for float64 inputs), -inf where masked."""
    acc = _acc_dtype(q)
    s = torch.einsum("bqhd,bkhd->bhqk", q.to(acc), k.to(acc)) * scale
    if causal:
        s = s.masked_fill(~_causal_mask(q.shape[1], k.shape[1], q.device), float("-inf"))
    return s


def _attn_math(q, k, v, causal, dropout_p, scale):
    k, v = _repeat_kv(q, k, v)
    p = torch.softmax(_math_scores(q, k, causal, scale), dim=-1)
    if dropout_p > 0.0:
        p = F.dropout(p, dropout_p)
    return torch.einsum("bhqk,bkhd->bqhd", p, v.to(p.dtype)).to(q.dtype)


def _attn_sdpa(q, k, v, causal, dropout_p, scale):
    k, v = _repeat_kv(q, k, v)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, L, D]
    mask = None
    if causal and q.shape[1] != k.shape[1]:
        mask, causal = _causal_mask(q.shape[1], k.shape[1], q.device), False
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, dropout_p=dropout_p,
                                         is_causal=causal, scale=scale)
    return out.transpose(1, 2)


def _attn_flash(q, k, v, causal, dropout_p, scale):
    fa = _import("flash_attn")
    return fa.flash_attn_func(q, k, v, dropout_p=dropout_p, softmax_scale=scale, causal=causal)


def _attn_xformers(q, k, v, causal, dropout_p, scale):
    xops = _import("xformers")
    k, v = _repeat_kv(q, k, v)
    bias = None
    if causal:
        bias = (xops.LowerTriangularMask() if q.shape[1] == k.shape[1]
                else xops.fmha.attn_bias.LowerTriangularFromBottomRightMask())
    return xops.memory_efficient_attention(q, k, v, attn_bias=bias, p=dropout_p, scale=scale)


_IMPLS = {"math": _attn_math, "sdpa": _attn_sdpa, "flash_attn": _attn_flash, "xformers": _attn_xformers}


def _attn_masked(q, k, v, mask, dropout_p, scale, math_backend: bool):
    """Attention with an explicit bool mask ``[B | 1, Lq, Lk]`` (True: attend); sdpa, or math."""
    k, v = _repeat_kv(q, k, v)
    if math_backend:
        s = _math_scores(q, k, False, scale).masked_fill(~mask.unsqueeze(1), float("-inf"))
        p = torch.softmax(s, dim=-1)
        if dropout_p > 0.0:
            p = F.dropout(p, dropout_p)
        return torch.einsum("bhqk,bkhd->bqhd", p, v.to(p.dtype)).to(q.dtype)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask.unsqueeze(1), dropout_p=dropout_p,
                                          scale=scale).transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
              backend: Optional[str] = None, cu_seqlens=None) -> torch.Tensor:
    """``softmax(q kᵀ · softmax_scale) v`` per head.

    q ``[B, Lq, H, D]``, k and v ``[B, Lk, Hkv, D]`` -> ``[B, Lq, H, D]`` in q's dtype.
    ``softmax_scale`` defaults to ``D ** -0.5``; ``backend`` to the process default (module doc).
    ``cu_seqlens`` (``[D+1]`` / ``[B, D+1]`` over the Lq = Lk tokens, or a
    :class:`longseq.documents.Documents`): packed documents, a block-diagonal (causal) mask
    (:func:`longseq.documents.attention_mask`); runs on sdpa with the mask (``"math"``: the math
    kernel), whatever backend is asked.
    """
    _check_shapes(q, k, v, causal)
    name = resolve_backend(backend, q)
    if cu_seqlens is not None:
        from .documents import attention_mask, resolve
        if q.shape[1] != k.shape[1]:
            raise ValueError(f"attention with cu_seqlens needs Lq == Lk (one window), got {q.shape[1]}, {k.shape[1]}")
        docs = resolve(cu_seqlens, q.shape[1], batch=q.shape[0], what="attention: cu_seqlens")
        mask = attention_mask(docs, causal=causal, device=q.device)
        return _attn_masked(q, k, v, mask, dropout_p, _scale(q, softmax_scale), name == "math")
    return _IMPLS[name](q, k, v, causal, dropout_p, _scale(q, softmax_scale))


# ----------------------------------------------------------------------------------------------
# Attention with log-sum-exp
# ----------------------------------------------------------------------------------------------
def _lse_math(q, k, v, causal, scale):
    """Pure PyTorch, float32 accumulation, differentiable in out and lse through autograd."""
    k, v = _repeat_kv(q, k, v)
    s = _math_scores(q, k, causal, scale)
    lse = torch.logsumexp(s, dim=-1)                      # [B, H, Lq]
    p = torch.exp(s - lse[..., None])
    out = torch.einsum("bhqk,bkhd->bqhd", p, v.to(p.dtype)).to(q.dtype)
    return out, lse


def _aten_cpu_op():
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


class _CpuFlashWithLse(torch.autograd.Function):
    """PyTorch's CPU flash kernel, with a backward that also honours the gradient of the LSE.

    The aten op returns the LSE as a non-differentiable output. Its gradient g adds g_i·P_ij to
    the score gradient, i.e. dq += scale·g·(P k) and dk += scale·Pᵀ(g·q): the first is the
    output of attention(q, k, k), the second that attention's value-gradient for output-gradient
    g·q, so both come from the same kernels in O(L) memory.
    Tensors here are [B, H, L, D] (the op's layout), contiguous.
    """

    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        out, lse = op(q, k, v, 0.0, causal, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale = causal, scale
        return out, lse

    @staticmethod
    def backward(ctx, g_out, g_lse):
        q, k, v, out, lse = ctx.saved_tensors
        fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        causal, scale = ctx.causal, ctx.scale
        if g_out is None:
            g_out = torch.zeros_like(out)
        dq, dk, dv = bwd(g_out.contiguous(), q, k, v, out, lse, 0.0, causal, scale=scale)
        if g_lse is not None:
            pk, lse_k = fwd(q, k, k, 0.0, causal, scale=scale)          # P k, same P (same q, k)
            g = g_lse.to(q.dtype)[..., None]                            # [B, H, Lq, 1]
            dq = dq + scale * g * pk
            gq = (g * q).contiguous()
            _, _, pt_gq = bwd(gq, q, k, k, pk, lse_k, 0.0, causal, scale=scale)  # Pᵀ (g·q)
            dk = dk + scale * pt_gq
        return dq, dk, dv, None, None


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                       softmax_scale: Optional[float] = None, impl: str = "auto"):
    """Attention that also returns the log-sum-exp of the scaled scores.

    q ``[B, Lq, H, D]``, k and v ``[B, Lk, Hkv, D]`` -> (out ``[B, Lq, H, D]`` in q's dtype,
    lse ``[B, H, Lq]`` float32; float64 for float64 inputs). Both outputs are differentiable.
    ``impl``: ``"math"`` (pure PyTorch, float32), ``"aten_cpu"`` (PyTorch's CPU flash kernel;
    CPU tensors, causal only with Lq == Lk), ``"auto"`` (aten_cpu where it applies, else math).
    """
    _check_shapes(q, k, v, causal)
    if impl not in ("auto", "math", "aten_cpu"):
        raise ValueError(f"unknown impl {impl!r}; valid: auto, math, aten_cpu")
    scale = _scale(q, softmax_scale)
    fits_cpu = (_aten_cpu_op() is not None and q.device.type == "cpu"
                and not (causal and q.shape[1] != k.shape[1]))
    if impl == "aten_cpu" and not fits_cpu:
        raise RuntimeError("impl='aten_cpu' needs PyTorch's CPU flash kernel, CPU tensors and, "
                           "when causal, Lq == Lk; use impl='math'")
    if impl == "math" or not fits_cpu:
        return _lse_math(q, k, v, causal, scale)
    k, v = _repeat_kv(q, k, v)
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    out, lse = _CpuFlashWithLse.apply(qt, kt, vt, causal, scale)
    return out.transpose(1, 2), lse.contiguous()  # the kernel's LSE is laid out [B, L, H]
