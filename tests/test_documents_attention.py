"""Attention with packed documents: the local op's block-diagonal mask equals attention over each
document separately; Ulysses, ring (even and uneven pieces) and USP (2 x 2) with ``cu_seqlens`` equal
the one-process op (outputs and dq, dk, dv), causal and not. The windows of tests/test_documents.py
(boundaries inside pieces, on rank edges, on a piece's first and last token). Float64; tolerance
max |a - b| <= 1e-9 · max(1, max |ref|).
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from longseq.attention import attention
from longseq.documents import Documents
from longseq.sharding import split_sizes
from tests.test_documents import CU, T
from tests.tensor_checks import rel_err

B, H, D = 2, 4, 4
TOL = 1e-9


def _qkv(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, H, D, generator=gen, dtype=torch.float64) for _ in range(4)]


def _grads(fn, q, k, v, do):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    o = fn(*leaves)
    (o * do).sum().backward()
    return [o.detach()] + [x.grad for x in leaves]


@pytest.mark.parametrize("causal", [True, False])
def test_local_attention_with_documents_equals_loop(causal):
    q, k, v, do = _qkv()
    got = _grads(lambda a, b, c: attention(a, b, c, causal=causal, backend="math", cu_seqlens=CU), q, k, v, do)

    def loop(a, b, c):
        out = torch.zeros_like(a)
        for r in range(B):
            bounds = CU[r].tolist()
            for s, e in zip(bounds[:-1], bounds[1:]):
                if e > s:
                    out[r:r + 1, s:e] = attention(a[r:r + 1, s:e], b[r:r + 1, s:e], c[r:r + 1, s:e], causal=causal,
                                                  backend="math")
        return out
    ref = _grads(loop, q, k, v, do)
    sdpa = _grads(lambda a, b, c: attention(a, b, c, causal=causal, backend="sdpa", cu_seqlens=CU), q, k, v, do)
    for a, b, c in zip(got, ref, sdpa):
        assert rel_err(a, b, torch.float64) <= TOL and rel_err(c, b, torch.float64) <= TOL


def _sp_attention(kind, causal, sizes=None, u=None):
    from longseq.sp import init_usp_groups, ring_attention, ulysses_attention, usp_attention
    P, me = dist.get_world_size(), dist.get_rank()
    sizes = sizes or split_sizes(T, P)
    a = sum(sizes[:me])
    b = a + sizes[me]
    q, k, v, do = _qkv(seed=4)
    ref = _grads(lambda x, y, z: attention(x, y, z, causal=causal, backend="math", cu_seqlens=CU), q, k, v, do)
    W = dist.group.WORLD
    if kind == "ulysses":
        fn = lambda x, y, z: ulysses_attention(x, y, z, W, causal=causal, seq_sizes=sizes, cu_seqlens=CU)  # noqa
    elif kind == "ring":
        docs = Documents.for_piece(CU, a, b)
        fn = lambda x, y, z: ring_attention(x, y, z, W, causal=causal, seq_sizes=sizes, cu_seqlens=docs)  # noqa
    else:
        groups = init_usp_groups(W, ulysses_degree=u)
        fn = lambda x, y, z: usp_attention(x, y, z, groups, causal=causal, seq_sizes=sizes, cu_seqlens=CU)  # noqa
    got = _grads(fn, q[:, a:b], k[:, a:b], v[:, a:b], do[:, a:b])
    return [rel_err(x, y[:, a:b], torch.float64) for x, y in zip(got, ref)]


@pytest.mark.parametrize("kind, P, sizes, u", [("ulysses", 2, None, None), ("ring", 2, None, None),
                                               ("ring", 3, None, None), ("ring", 2, [5, 7], None),
                                               ("ulysses", 2, [7, 5], None), ("usp", 4, None, 2)])
def test_sp_attention_with_documents_equals_one_process(dist_pool, kind, P, sizes, u):
    for causal in (True, False):
        for r, errs in enumerate(dist_pool(P).run(_sp_attention, kind, causal, sizes, u)):
            assert max(errs) <= TOL, (causal, r, errs)
