"""Sequence-parallel gated delta rule (zeco.sp_delta_rule: zeco / allgather / heads / p2p) and the dense
All-Scan, on gloo CPU processes, against the single-process op (zeco.delta.delta_rule) over the whole
sequence.

Tolerances: float64 max |sp - ref| <= 1e-9 * max(1, max |ref|) per tensor (outputs, per-rank final
states, dq, dk, dv, dg, dbeta, dh0); bf16 autocast (bf16 inputs and outputs, float32 states on the
wire) 2e-2 relative. The ledger tests count exactly the elements of zeco/sp_delta.py's table.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from longseq.ledger import LEDGER
from longseq.sharding import split_sizes
from longseq.zeco import all_scan, recurrent_delta_rule_reference, sp_delta_rule
from longseq.zeco.all_scan import scan_reference
from tests.tensor_checks import rel_err

REL = {torch.float64: 1e-9, torch.bfloat16: 2e-2}


def _inputs(B, T, H, K, V, kda, seed):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v = r(B, T, H, K), r(B, T, H, K), r(B, T, H, V)
    g = F.logsigmoid(r(B, T, H, *([K] if kda else [])) + 2.0) * 0.5
    beta = torch.sigmoid(r(B, T, H))
    return q, k, v, g, beta, r(B, H, K, V), r(B, T, H, V)


def _piece(x, sizes, r, dim=1):
    return x.narrow(dim, sum(sizes[:r]), sizes[r])


def _sp_vs_serial(T, B, H, K, V, chunk, amp, cases):
    """loss = <o, dO> + sum_r <S_end(prefix up to rank r's end), dht_r> (not for heads)."""
    P, me = dist.get_world_size(), dist.get_rank()
    sizes = split_sizes(T, P)
    ends = [sum(sizes[: i + 1]) for i in range(P)]
    dtype = torch.bfloat16 if amp else torch.float64
    out = {}
    for method, kda in cases:
        base = _inputs(B, T, H, K, V, kda, seed=11 + kda)
        if amp:  # bf16 tensors in, as a model under bf16 autocast hands them
            base = tuple(x.to(torch.bfloat16) if i < 3 or i == 4 else x.float() for i, x in enumerate(base))
        q, k, v, g, beta, h0, do = base
        gen = torch.Generator().manual_seed(99)
        dhts = [torch.randn(B, H, K, V, generator=gen, dtype=torch.float64).to(h0.dtype) for _ in range(P)]
        finals_used = method != "heads"
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, g, beta, h0)]
        # one process: the token-by-token recurrence over the whole sequence, piece after piece
        # (its state carried over), so the state at every rank's end is at hand
        st, outs, loss = leaves[5], [], 0.0
        for i in range(P):
            o_i, st = recurrent_delta_rule_reference(*(_piece(x, sizes, i) for x in leaves[:5]), initial_state=st,
                                                     use_qk_l2norm=True)
            outs.append(o_i)
            if finals_used:
                loss = loss + (st.double() * dhts[i].double()).sum()
            if i == me:
                final_me = st
        o_ref = torch.cat(outs, 1)
        loss = loss + (o_ref.double() * do.double()).sum()
        loss.backward()
        ref_grads = [x.grad for x in leaves]
        mine = [_piece(x, sizes, me).detach().clone().requires_grad_() for x in (q, k, v, g, beta)]
        h0_sp = h0.detach().clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            o, st = sp_delta_rule(*mine, group=dist.group.WORLD, method=method, initial_state=h0_sp,
                                  output_final_state=finals_used, use_qk_l2norm=True, chunk_size=chunk)
            l_sp = (o.double() * _piece(do, sizes, me).double()).sum()
            if finals_used:
                l_sp = l_sp + (st.double() * dhts[me].double()).sum()
        l_sp.backward()
        errs = {"o": rel_err(o, _piece(o_ref, sizes, me), dtype)}
        if finals_used:
            errs["final"] = rel_err(st, final_me, dtype)
            assert st.dtype == torch.float64 if not amp else st.dtype == torch.float32
        for i, name in enumerate(("dq", "dk", "dv", "dg", "dbeta")):
            errs[name] = rel_err(mine[i].grad, _piece(ref_grads[i], sizes, me), dtype)
        dh0 = h0_sp.grad.clone()
        dist.all_reduce(dh0)   # the shares over the ranks sum to the total
        errs["dh0"] = rel_err(dh0, ref_grads[5], dtype)
        out[(method, kda)] = errs
    return out


def _assert_ok(res, dtype):
    for case, errs in res.items():
        for name, e in errs.items():
            assert e <= REL[dtype], f"{case}: {name} error {e:.3g} > {REL[dtype]}"


CASES = [(m, kda) for m in ("zeco", "allgather", "p2p", "heads") for kda in (False, True)]


@pytest.mark.parametrize("P", [1, 2, 3, 4])
def test_sp_delta_rule_matches_serial(dist_pool, P):
    """Every method, GDN and KDA gates, T=14 uneven over P (chunk 4: chunks cross rank boundaries),
    initial state, per-rank final states, forward and every gradient; heads needs P | H (H = 12)."""
    for r in dist_pool(P).run(_sp_vs_serial, 14, 1, 12, 4, 3, 4, False, CASES):
        _assert_ok(r, torch.float64)


@pytest.mark.parametrize("P", [2, 3])
def test_sp_delta_rule_bf16_autocast(dist_pool, P):
    cases = [("zeco", False), ("zeco", True), ("allgather", False), ("heads", True)]
    for r in dist_pool(P).run(_sp_vs_serial, 19, 1, 6, 8, 4, 8, True, cases):
        _assert_ok(r, torch.bfloat16)


def _ledger_case(T, B, H, K, V, method):
    P, me = dist.get_world_size(), dist.get_rank()
    sizes = split_sizes(T, P)
    q, k, v, g, beta, _, do = _inputs(B, T, H, K, V, False, seed=3)
    mine = [_piece(x, sizes, me).float().requires_grad_() for x in (q, k, v, g, beta)]
    with LEDGER.recording() as rec:
        o, _ = sp_delta_rule(*mine, group=dist.group.WORLD, method=method, num_blocks=2, chunk_size=4,
                             check=False)
        fwd = [(c.op, c.tag, c.bytes_sent, c.bytes_recv) for c in rec]
        (o * _piece(do, sizes, me).float()).sum().backward()
        allrec = [(c.op, c.tag, c.bytes_sent, c.bytes_recv) for c in rec]
    return fwd, allrec[len(fwd):]


def _sum(recs, col):
    return sum(r[col] for r in recs)


@pytest.mark.parametrize("P", [2, 3, 4])
def test_ledger_zeco_one_state_per_rank_per_direction(dist_pool, P):
    """ZeCO: each rank sends / receives exactly one K*V fp32 state per head (in N=2 messages) per
    direction, whatever P and T; the all-gather moves (P-1)*(KV + KK) forward and (P-1)*KV backward."""
    B, H, K, V = 1, 2, 4, 6
    S, M = B * H * K * V, B * H * K * K
    for T in (9, 17):
        for r, (fwd, bwd) in enumerate(dist_pool(P).run(_ledger_case, T, B, H, K, V, "zeco")):
            assert {t for _, t, _, _ in fwd} <= {"zeco.delta.scan.fwd"} and {t for _, t, _, _ in bwd} <= {
                "zeco.delta.scan.bwd"}
            assert _sum(fwd, 2) == (0 if r == P - 1 else S * 4) and _sum(fwd, 3) == (0 if r == 0 else S * 4)
            assert _sum(bwd, 2) == (0 if r == 0 else S * 4) and _sum(bwd, 3) == (0 if r == P - 1 else S * 4)
            assert len([x for x in fwd if x[0] == "send"]) == (0 if r == P - 1 else 2)
    for r, (fwd, bwd) in enumerate(dist_pool(P).run(_ledger_case, 9, B, H, K, V, "allgather")):
        assert [x[:2] for x in fwd] == [("all_gather", "zeco.delta.ag.fwd")]
        assert fwd[0][3] == (P - 1) * (S + M) * 4 and fwd[0][2] == (P - 1) * (S + M) * 4
        assert [x[:2] for x in bwd] == [("all_gather", "zeco.delta.ag.bwd")] and bwd[0][3] == (P - 1) * S * 4
    for r, (fwd, bwd) in enumerate(dist_pool(P).run(_ledger_case, 9, B, H, K, V, "p2p")):
        assert _sum(fwd, 2) == (0 if r == P - 1 else S * 4) and len(fwd) == (1 if r in (0, P - 1) else 2)


def _bad(kind):
    P, me = dist.get_world_size(), dist.get_rank()
    q, k, v, g, beta, h0, _ = _inputs(1, 8, 3, 4, 4, False, seed=1)
    sizes = split_sizes(8, P)
    xs = [_piece(x, sizes, me) for x in (q, k, v, g, beta)]
    with LEDGER.recording() as rec:
        try:
            if kind == "heads":
                sp_delta_rule(*xs, group=dist.group.WORLD, method="heads")
            elif kind == "dtype":
                if me == 1:
                    xs = [x.float() for x in xs]
                sp_delta_rule(*xs, group=dist.group.WORLD)
            else:  # T = P - 1 tokens: the last rank has none
                xs = [x[:, :0] if me == P - 1 else x[:, :1] for x in (q, k, v, g, beta)]
                sp_delta_rule(*xs, group=dist.group.WORLD, method="zeco")
        except ValueError as e:
            return str(e), [c.tag for c in rec]
    return None, []


@pytest.mark.parametrize("kind,match", [("heads", "must divide"), ("dtype", "state_dtype"),
                                        ("short", "at least one token")])
def test_bad_input_raises_before_any_collective(dist_pool, kind, match):
    for msg, tags in dist_pool(2).run(_bad, kind):
        assert msg is not None and match in msg, msg
        assert set(tags) <= {"zeco.check", "zeco.check.detail"}, tags   # only the check (and its details) ran


def _dense_scan(reverse, nb):
    P, me = dist.get_world_size(), dist.get_rank()
    gen = torch.Generator().manual_seed(5)
    shape = (2, 3, 4, 5)
    locs = [torch.randn(*shape, generator=gen, dtype=torch.float64) for _ in range(P)]
    mats = [torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64) for _ in range(P)]
    init = torch.randn(*shape, generator=gen, dtype=torch.float64)
    ref = scan_reference(mats, locs, init, reverse=reverse)[me]
    with LEDGER.recording() as rec:
        inp, out = all_scan(mats[me], locs[me], dist.group.WORLD, initial_state=init, reverse=reverse,
                            num_blocks=nb, output_final_state=True)
    return (torch.allclose(inp, ref[0], atol=1e-12) and torch.allclose(out, ref[1], atol=1e-12),
            len(rec.filter(op="send")), rec.filter(op="send").elements_sent)


@pytest.mark.parametrize("reverse", [False, True])
def test_all_scan_dense_maps(dist_pool, reverse):
    for nb, n in ((1, 1), (2, 2), (9, 5)):   # blocks along V (5 columns): clamped to 5
        for r, (ok, ns, es) in enumerate(dist_pool(3).run(_dense_scan, reverse, nb)):
            last = r == (0 if reverse else 2)
            assert ok and (ns, es) == ((0, 0) if last else (n, 2 * 3 * 4 * 5))


# ----------------------------------------------------------------------------------------------
# Grouped value heads: q, k with Hk heads, v, g, beta with G·Hk
# ----------------------------------------------------------------------------------------------
def _grouped_case(T, B, Hk, G, K, V, kda):
    P, me = dist.get_world_size(), dist.get_rank()
    H = G * Hk
    sizes = split_sizes(T, P)
    q, k, v, g, beta, _, do = _inputs(B, T, H, K, V, kda, seed=21 + kda)
    q, k = q[:, :, :Hk], k[:, :, :Hk]
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, g, beta)]
    rep = [x.repeat_interleave(G, dim=2) for x in leaves[:2]]           # one process: q, k repeated
    o_ref, _ = recurrent_delta_rule_reference(*rep, *leaves[2:], use_qk_l2norm=True)
    (o_ref * do).sum().backward()
    out = {}
    for method in ("zeco", "allgather", "p2p", "heads"):
        mine = [_piece(x, sizes, me).detach().clone().requires_grad_() for x in (q, k, v, g, beta)]
        with LEDGER.recording() as rec:
            o, _ = sp_delta_rule(*mine, group=dist.group.WORLD, method=method, use_qk_l2norm=True, chunk_size=4,
                                 num_blocks=1)
            (o * _piece(do, sizes, me)).sum().backward()
        errs = {"o": rel_err(o, _piece(o_ref, sizes, me), torch.float64)}
        for i, name in enumerate(("dq", "dk", "dv", "dg", "dbeta")):
            errs[name] = rel_err(mine[i].grad, _piece(leaves[i].grad, sizes, me), torch.float64)
        state = [(c.op, c.tag, c.elements_sent, c.elements_recv) for c in rec if not c.tag.endswith("check")]
        out[method] = (errs, state)
    return out


@pytest.mark.parametrize("P", [2, 3])
def test_grouped_value_heads(dist_pool, P):
    """Hk = 2 key heads, G = 3 (6 value heads), T = 11 uneven, GDN and KDA gates: every method equals one
    process with q, k repeated (float64, 1e-9), and zeco moves exactly one K x V state per value head per
    rank per direction (B·Hv·K·V elements; nothing of q, k)."""
    B, Hk, G, K, V = 1, 2, 3, 4, 3
    for kda in (False, True):
        for r, res in enumerate(dist_pool(P).run(_grouped_case, 11, B, Hk, G, K, V, kda)):
            for method, (errs, _) in res.items():
                for name, e in errs.items():
                    assert e <= REL[torch.float64], f"P={P} kda={kda} {method}: {name} error {e:.3g}"
            state = res["zeco"][1]
            S = B * Hk * G * K * V
            assert sum(x[2] for x in state if x[1] == "zeco.delta.scan.fwd") == (0 if r == P - 1 else S)
            assert sum(x[3] for x in state if x[1] == "zeco.delta.scan.fwd") == (0 if r == 0 else S)
            assert sum(x[2] for x in state if x[1] == "zeco.delta.scan.bwd") == (0 if r == 0 else S)
            assert {x[1] for x in state} <= {"zeco.delta.scan.fwd", "zeco.delta.scan.bwd"}, state
