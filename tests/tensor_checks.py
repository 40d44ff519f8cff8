"""Comparisons the equivalence tests share: every parameter's gradient, and one tensor against its
reference within ``max|a - b| <= rtol * max|ref| + atol`` (each test file states its tolerances)."""
from __future__ import annotations

import torch


def param_grads(model: torch.nn.Module, *, skip_missing: bool = False) -> dict:
    """``{name: grad}`` of every parameter (copies). A parameter without a gradient raises, unless
    ``skip_missing`` (then it is left out, and a test compares the key sets)."""
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()
            if not (skip_missing and p.grad is None)}


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str, rtol: float, atol: float) -> None:
    err, scale = (a - b).abs().max().item(), b.abs().max().item()
    assert err <= rtol * scale + atol, f"{what}: max|a-b| = {err:.3e} > {rtol} * {scale:.3e} + {atol}"


def rel_err(a: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> float:
    """Max abs error of ``a`` against ``ref`` over ``ref``'s max magnitude (at least 1 in float64,
    where values near 0 would make a relative error meaningless); 0 for empty tensors."""
    a, ref = a.double(), ref.double()
    if not ref.numel():
        return 0.0
    scale = ref.abs().max().item()
    if dtype == torch.float64:
        scale = max(scale, 1.0)
    return (a - ref).abs().max().item() / max(scale, 1e-30)
