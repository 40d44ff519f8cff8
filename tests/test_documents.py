"""Packed documents (longseq.documents, zeco.resets): the helpers, and every recurrent op with
``cu_seqlens`` against a loop over the separate documents (one process), then every sequence-parallel
method against the one-process op (P = 2 and 3, gloo CPU processes).

Windows: T = 12, B = 2 with per-row boundaries; the boundaries fall inside pieces, on rank edges and
on the first and last token of a piece for both P = 2 (pieces [0, 6), [6, 12)) and P = 3 ([0, 4),
[4, 8), [8, 12)); row 1 ends with an empty document (padding). Tolerance: float64, max |a - b| <=
1e-9 · max(1, max |ref|) per tensor (outputs, final states, every input gradient).
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from longseq.documents import Documents, check_cu_seqlens, cu_seqlens_from_lengths, document_labels, for_rank
from longseq.ledger import LEDGER
from longseq.zeco import recurrent_delta_rule_reference, sp_delta_rule, sp_gla
from longseq.zeco.delta import delta_rule
from longseq.zeco.gla import gla, recurrent_gla_reference
from tests.tensor_checks import rel_err

T, B, H, K, V = 12, 2, 6, 3, 4
# P=2 pieces [0,6),[6,12); P=3 pieces [0,4),[4,8),[8,12)
CU = torch.tensor([[0, 2, 4, 7, 8, 11, 12],     # 4, 8: P=3 rank edges; 7: last of a P=3 piece; 11: last token
                   [0, 5, 6, 9, 11, 12, 12]])   # 5: last of a P=2 piece; 6: P=2 rank edge; 12,12: empty doc
TOL = 1e-9


def _inputs(op, kda, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v = r(B, T, H, K), r(B, T, H, K), r(B, T, H, V)
    g = F.logsigmoid(r(B, T, H, *([K] if kda else [])) + 1.0) * 0.5
    xs = [q, k, v, g] + ([torch.sigmoid(r(B, T, H))] if op == "delta" else [])
    return xs, r(B, H, K, V), r(B, T, H, V), r(B, H, K, V)


def _run(op, xs, h0, cu=None):
    if op == "gla":
        q, k, v, g = xs
        return gla(q, k, v, g, initial_state=h0, output_final_state=True, backend="torch", chunk_size=4,
                   cu_seqlens=cu)
    return delta_rule(*xs, initial_state=h0, output_final_state=True, use_qk_l2norm=True, backend="torch",
                      chunk_size=4, cu_seqlens=cu)


def _loop(op, xs, h0):
    """The reference: the token-by-token recurrence on each document separately; the first document of
    a row starts from that row's initial state, the others from zero; the final state is the last one's."""
    outs, finals = [], []
    for b in range(B):
        st, ob = h0[b:b + 1], []
        bounds = CU[b].tolist()
        for j, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
            if e == s:
                continue
            init = st if s == 0 else None
            piece = [x[b:b + 1, s:e] for x in xs]
            if op == "gla":
                o, st = recurrent_gla_reference(*piece, initial_state=init)
            else:
                o, st = recurrent_delta_rule_reference(*piece, initial_state=init, use_qk_l2norm=True)
            ob.append(o)
        outs.append(torch.cat(ob, 1))
        finals.append(st)
    return torch.cat(outs), torch.cat(finals)


def _grads(fn, xs, h0, do, dht):
    leaves = [x.detach().clone().requires_grad_() for x in (*xs, h0)]
    o, ht = fn(leaves[:-1], leaves[-1])
    ((o * do).sum() + (ht * dht).sum()).backward()
    return [o.detach(), ht.detach()] + [x.grad for x in leaves]


# ---- helpers ---------------------------------------------------------------------------------------
def test_documents_views_of_pieces():
    d = Documents.for_piece(CU, 4, 8)
    assert d.ids().tolist() == [[2, 2, 2, 3], [0, 1, 2, 2]]
    assert d.positions().tolist() == [[0, 1, 2, 0], [4, 0, 0, 1]]
    assert d.starts().tolist() == [[True, False, False, True], [False, True, True, False]]
    w = Documents.whole(CU)
    assert not w.starts()[:, 0].any() and w.starts().sum().item() == 9      # token 0 is not a reset
    one = Documents.for_piece(torch.tensor([0, 3, 9, 12]), 4, 10)
    assert one.local_cu_seqlens().tolist() == [0, 5, 6]
    assert cu_seqlens_from_lengths([2, 3]).tolist() == [0, 2, 5]
    assert for_rank(CU[0], None).length == 12
    labels = torch.arange(4).expand(2, 4)
    assert document_labels(labels, d).tolist() == [[0, 1, -100, -100], [-100, -100, 2, 3]]
    last = Documents.for_piece(CU, 8, 12)            # row 1's trailing empty document is no boundary
    assert document_labels(torch.ones(2, 4, dtype=torch.long), last).tolist() == [[1, 1, -100, 1], [-100, 1, -100, 1]]


@pytest.mark.parametrize("bad, match", [([1, 3], "start at 0"), ([0, 5, 3], "decrease"), ([0.0, 2.0], "integers"),
                                        ([[0, 4], [0, 5]], "end at the window")])
def test_bad_cu_seqlens_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        check_cu_seqlens(torch.tensor(bad))


def test_wrong_piece_length_names_the_fix():
    xs, h0, _, _ = _inputs("gla", False)
    with pytest.raises(ValueError, match="covers|Documents.for_piece|whole window"):
        gla(*[x[:, :10] for x in xs], backend="torch", cu_seqlens=CU)


# ---- one process: the ops with cu_seqlens equal the loop over documents ----------------------------
@pytest.mark.parametrize("op, kda", [("gla", True), ("gla", False), ("delta", False), ("delta", True)])
def test_local_op_equals_loop_over_documents(op, kda):
    xs, h0, do, dht = _inputs(op, kda)
    got = _grads(lambda a, h: _run(op, a, h, CU), xs, h0, do, dht)
    ref = _grads(lambda a, h: _loop(op, a, h), xs, h0, do, dht)
    names = ["o", "final", "dq", "dk", "dv", "dg", "dbeta", "dh0"] if op == "delta" else \
        ["o", "final", "dq", "dk", "dv", "dg", "dh0"]
    for n, a, b in zip(names, got, ref):
        assert rel_err(a, b, torch.float64) <= TOL, (n, rel_err(a, b, torch.float64))


# ---- sequence parallel: every method equals the one-process op -------------------------------------
GLA_METHODS = [("zeco", True), ("zeco", False), ("lasp1", True), ("lasp2", True)]
DELTA_METHODS = ["zeco", "allgather", "p2p", "heads"]


def _sp_case(op, kda):
    P, me = dist.get_world_size(), dist.get_rank()
    docs = for_rank(CU, dist.group.WORLD)
    a, b = docs.start, docs.stop
    xs, h0, do, dht = _inputs(op, kda, seed=3)
    def ref_piece(dht):
        ref = _grads(lambda x, h: _run(op, x, h, CU), xs, h0, do, dht)
        return [ref[0][:, a:b], ref[1]] + [t[:, a:b] for t in ref[2:-1]] + [ref[-1]]

    refs = {True: ref_piece(dht), False: ref_piece(torch.zeros_like(dht))}   # heads: no final state
    methods = GLA_METHODS if op == "gla" else [(m, True) for m in DELTA_METHODS]
    errs = {}
    for method, overlap in methods:
        leaves = [x[:, a:b].detach().clone().requires_grad_() for x in xs] + [h0.detach().clone().requires_grad_()]
        last = me == P - 1 and method != "heads"
        if op == "gla":
            o, ht = sp_gla(*leaves[:4], group=dist.group.WORLD, method=method, overlap=overlap, chunk_size=4,
                           initial_state=leaves[4], output_final_state=last, backend="torch", cu_seqlens=CU)
        else:
            o, ht = sp_delta_rule(*leaves[:5], group=dist.group.WORLD, method=method, chunk_size=4, backend="torch",
                                  initial_state=leaves[5], output_final_state=last, use_qk_l2norm=True,
                                  cu_seqlens=CU)
        loss = (o * do[:, a:b]).sum() + ((ht * dht).sum() if last else 0.0)
        loss.backward()
        got = [o.detach(), ht.detach() if last else None] + [x.grad for x in leaves]
        # dh0: rank 0 holds it (heads: each rank its heads' slice); the sum over ranks is the total
        dh0 = got[-1].clone()
        dist.all_reduce(dh0)
        got[-1] = dh0
        for i, (x, y) in enumerate(zip(got, refs[method != "heads"])):
            if x is not None:
                errs[(method, overlap, i)] = rel_err(x, y, torch.float64)
    return errs


@pytest.mark.parametrize("P", [2, 3])
@pytest.mark.parametrize("op, kda", [("gla", True), ("delta", False)])
def test_sp_methods_with_documents_equal_one_process(dist_pool, P, op, kda):
    for r, errs in enumerate(dist_pool(P).run(_sp_case, op, kda)):
        bad = {k: e for k, e in errs.items() if not e <= TOL}
        assert not bad, f"rank {r}: {bad}"


def _ledger_case(op):
    docs = for_rank(CU, dist.group.WORLD)
    xs, h0, do, _ = _inputs(op, False, seed=5)
    leaves = [x[:, docs.start:docs.stop].detach().clone().requires_grad_() for x in xs]
    fn = sp_gla if op == "gla" else sp_delta_rule
    with LEDGER.recording() as rec:
        o, _ = fn(*leaves, group=dist.group.WORLD, method="zeco", backend="torch", chunk_size=4, num_blocks=2,
                  cu_seqlens=CU, check=False)
        (o * do[:, docs.start:docs.stop]).sum().backward()
    return [(r.op, r.tag, r.elements_sent, r.elements_recv) for r in rec]


@pytest.mark.parametrize("op", ["gla", "delta"])
def test_zeco_ledger_still_one_state_per_rank_per_direction(dist_pool, op):
    P = 3
    S = B * H * K * V
    for r, rows in enumerate(dist_pool(P).run(_ledger_case, op)):
        for d in ("fwd", "bwd"):
            mine = [x for x in rows if x[1].endswith(f"scan.{d}")]
            sent, recv = sum(x[2] for x in mine), sum(x[3] for x in mine)
            first, last = (0, P - 1) if d == "fwd" else (P - 1, 0)
            assert sent == (0 if r == last else S), (r, d, rows)
            assert recv == (0 if r == first else S), (r, d, rows)
        assert {x[1].rsplit(".", 1)[0] for x in rows} <= {"zeco.scan", "zeco.delta.scan"}, rows
