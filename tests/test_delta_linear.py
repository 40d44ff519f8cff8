"""The chunked delta rule's state pass: hand-written backward (zeco.delta.chunk.StatePass) against the
autograd loop it replaced (state_pass_reference, the oracle), and its cost linear in the sequence length.

* gradcheck in float64 on tiny shapes (with and without an initial state, ``[H | A]`` map pass columns);
* StatePass vs state_pass_reference: starts, final state and every gradient to 1e-12 relative (float64);
* cost: the backward of 4x the tokens must do at most 5x the work. Work is counted, not timed (the
  machine is shared): every aten op that runs during the backward adds its outputs' element counts
  (a TorchDispatchMode), so a per-chunk index whose backward zero-fills a full-size gradient shows up
  as elements. The same count must flag the reference loop as super-linear (> 5x), which shows the
  measure can fail (6.7x at these shapes); the GLA chunk operator is held to the same bound.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from longseq.zeco.delta import delta_rule, l2norm
from longseq.zeco.delta import chunk as delta_chunk
from longseq.zeco.gla.chunk import chunk_gla


def _rel(a, b):
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)


def _pass_inputs(B=2, H=2, n=5, K=3, V=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    return 0.5 * r(B, H, n, K, K), r(B, H, n, K, V), r(B, H, K, V)


@pytest.mark.parametrize("with_s0", [False, True])
def test_state_pass_gradcheck(with_s0):
    A, Hm, S0 = (x.requires_grad_() for x in _pass_inputs())
    if with_s0:
        f = lambda a, h, s: delta_chunk.state_pass(a, h, s)  # noqa: E731
        ins = (A, Hm, S0)
    else:
        f = lambda a, h: delta_chunk.state_pass(a, h, None)  # noqa: E731
        ins = (A, Hm)
    assert torch.autograd.gradcheck(f, ins, eps=1e-6, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("with_s0", [False, True])
@pytest.mark.parametrize("n", [1, 7])
def test_state_pass_matches_reference(with_s0, n):
    """Values and gradients (with respect to A, H, S0) of StatePass equal the autograd loop's."""
    A, Hm, S0 = _pass_inputs(n=n, seed=n)
    gen = torch.Generator().manual_seed(9)
    d_st, d_fin = torch.randn(Hm.shape, generator=gen, dtype=torch.float64), torch.randn(S0.shape, generator=gen,
                                                                                         dtype=torch.float64)
    res = []
    for fn in (delta_chunk.state_pass, delta_chunk.state_pass_reference):
        xs = [x.detach().clone().requires_grad_() for x in (A, Hm, S0)]
        starts, final = fn(xs[0], xs[1], xs[2] if with_s0 else None)
        loss = (starts * d_st).sum() + (final * d_fin).sum()
        grads = torch.autograd.grad(loss, xs if with_s0 else xs[:2], allow_unused=True)
        res.append((starts, final, [torch.zeros_like(x) if gr is None else gr for x, gr in zip(xs, grads)]))
    (s1, f1, g1), (s2, f2, g2) = res
    assert _rel(s1, s2) < 1e-12 and _rel(f1, f2) < 1e-12
    for name, a, b in zip(("dA", "dH", "dS0"), g1, g2):
        assert _rel(a, b) < 1e-12, name


def test_delta_rule_gradcheck_tiny():
    """The whole torch-backend operator (prepare, StatePass, outputs) passes gradcheck in float64."""
    gen = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    B, T, H, K, V = 1, 7, 1, 3, 2
    q, k, v = r(B, T, H, K), l2norm(r(B, T, H, K)), r(B, T, H, V)
    g = F.logsigmoid(r(B, T, H) + 2.0)
    beta = torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    h0 = r(B, H, K, V)
    xs = [x.requires_grad_() for x in (q, k, v, g, beta, h0)]

    def f(q, k, v, g, beta, h0):
        return delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, backend="torch", chunk_size=3)

    assert torch.autograd.gradcheck(f, xs, eps=1e-6, atol=1e-8, rtol=1e-6)


class _ElementCounter(TorchDispatchMode):
    """Sums the element counts of every aten op's tensor outputs while active."""

    def __init__(self):
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.elements += t.numel()
        return out


def _backward_elements(op, T: int) -> int:
    """Elements produced by the aten ops of ``op``'s backward at ``T`` tokens (B = H = 1, K = V = 4)."""
    gen = torch.Generator().manual_seed(T)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    q, k, v = r(1, T, 1, 4), l2norm(r(1, T, 1, 4)), r(1, T, 1, 4)
    g = F.logsigmoid(r(1, T, 1) + 2.0)
    beta = torch.rand(1, T, 1, generator=gen)
    xs = [x.requires_grad_() for x in (q, k, v, g, beta)]
    o, ht = op(*xs)
    loss = o.sum() + ht.sum()
    with _ElementCounter() as counter:
        loss.backward()
    assert xs[0].grad is not None and counter.elements > 0
    return counter.elements


def _delta(q, k, v, g, beta):
    return delta_rule(q, k, v, g, beta, output_final_state=True, backend="torch", chunk_size=16)


def _gla(q, k, v, g, beta):
    return chunk_gla(q, k, v, g, chunk_size=16)


@pytest.mark.parametrize("op", [_delta, _gla], ids=["delta_rule", "chunk_gla"])
def test_backward_work_is_linear_in_tokens(op):
    """4x the tokens (64 -> 256 chunks of 16): at most 5x the backward's elements."""
    small, large = _backward_elements(op, 1024), _backward_elements(op, 4096)
    assert large / small <= 5.0, f"backward elements {small} -> {large}: {large / small:.1f}x for 4x tokens"


def test_element_count_flags_the_quadratic_reference(monkeypatch):
    """The measure can fail: with the autograd loop swapped back in, the same ratio exceeds the 5x bound."""
    monkeypatch.setattr(delta_chunk, "state_pass", delta_chunk.state_pass_reference)
    small, large = _backward_elements(_delta, 1024), _backward_elements(_delta, 4096)
    assert large / small > 5.0, f"reference loop: {small} -> {large} ({large / small:.1f}x)"
