"""Sequence-parallel GLA (zeco.sp_gla: ZeCO / LASP-1 / LASP-2) and the All-Scan collective, on gloo
CPU processes, against single-process GLA (zeco.gla.gla) over the whole sequence.

Tolerances: float64 max |sp - ref| <= 1e-10 * max(1, max |ref|) per tensor; float32
max |sp - ref| <= 2e-5 * max |ref| (float32 ops; both sides float32).
The ledger tests count exactly the elements named in zeco/sp_gla.py's table.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from longseq.ledger import LEDGER
from longseq.sharding import split_sizes
from longseq.zeco import all_scan, all_scan_start, gla, num_blocks_for, set_default_half_bytes, sp_gla
from longseq.zeco.all_scan import DEFAULT_HALF_BYTES, scan_reference
from tests.tensor_checks import rel_err

W = None  # the world group (set in workers)
REL = {torch.float64: 1e-10, torch.float32: 2e-5}


def _inputs(B, T, H, K, V, scalar, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v = r(B, T, H, K), r(B, T, H, K), r(B, T, H, V)
    gshape = (B, T, H) if scalar else (B, T, H, K)
    g = F.logsigmoid(r(*gshape) + 2.0) * 0.5
    # a random fifth of the entries decays strongly (down to -20): exercises underflowing decays
    g = torch.where(torch.rand(gshape, generator=gen, dtype=torch.float64) < 0.2, (g * 40).clamp_min(-20), g)
    h0, do = r(B, H, K, V), r(B, T, H, V)
    return [x.to(dtype) for x in (q, k, v, g, h0, do)]


def _piece(x, sizes, r, dim=1):
    s = sum(sizes[:r])
    return x.narrow(dim, s, sizes[r])


def _sp_vs_serial(T, B, H, K, V, chunk, dtype_name, cases):
    """For each (method, scalar, overlap, num_blocks): SP forward/backward vs serial GLA.

    loss = <o, dO> + sum_r <S_end(prefix up to rank r's end), dht_r> (per-rank final states)."""
    dtype = getattr(torch, dtype_name)
    P, me = dist.get_world_size(), dist.get_rank()
    grp = dist.group.WORLD
    sizes = split_sizes(T, P)
    ends = [sum(sizes[: i + 1]) for i in range(P)]
    out = {}
    for (method, scalar, overlap, nb) in cases:
        q, k, v, g, h0, do = _inputs(B, T, H, K, V, scalar, dtype, seed=7 + 3 * scalar)
        gen = torch.Generator().manual_seed(99)
        dhts = [torch.randn(B, H, K, V, generator=gen, dtype=torch.float64).to(dtype) for _ in range(P)]
        # serial reference over the whole sequence
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, g, h0)]
        o_ref, _ = gla(*leaves[:4], initial_state=leaves[4], chunk_size=chunk)
        loss = (o_ref.double() * do.double()).sum()
        finals = []
        for i in range(P):
            if ends[i] == 0:
                st = leaves[4]
            else:
                _, st = gla(*(x[:, : ends[i]] for x in leaves[:4]), initial_state=leaves[4],
                            output_final_state=True, chunk_size=chunk)
            finals.append(st)
            loss = loss + (st.double() * dhts[i].double()).sum()
        loss.backward()
        ref_grads = [x.grad for x in leaves]
        # sequence parallel
        # leaves stored [B, H, T, D]: the inputs are non-contiguous views [B, T, H, D] (gloo and strides)
        leaves_t = [_piece(x, sizes, me).transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v, g)]
        mine = [x.transpose(1, 2) for x in leaves_t]
        h0_sp = h0.detach().clone().requires_grad_()
        o, st = sp_gla(*mine, group=grp, method=method, initial_state=h0_sp, output_final_state=True,
                       num_blocks=nb, chunk_size=chunk, overlap=overlap)
        l_sp = (o.double() * _piece(do, sizes, me).double()).sum() + (st.double() * dhts[me].double()).sum()
        l_sp.backward()
        errs = {
            "o": rel_err(o, _piece(o_ref, sizes, me), dtype),
            "final": rel_err(st, finals[me], dtype),
            "dq": rel_err(leaves_t[0].grad.transpose(1, 2), _piece(ref_grads[0], sizes, me), dtype),
            "dk": rel_err(leaves_t[1].grad.transpose(1, 2), _piece(ref_grads[1], sizes, me), dtype),
            "dv": rel_err(leaves_t[2].grad.transpose(1, 2), _piece(ref_grads[2], sizes, me), dtype),
            "dg": rel_err(leaves_t[3].grad.transpose(1, 2), _piece(ref_grads[3], sizes, me), dtype),
        }
        # initial_state: rank 0 holds the whole gradient, the others zero (shares sum to the total)
        dh0 = h0_sp.grad.clone()
        dist.all_reduce(dh0)
        errs["dh0"] = rel_err(dh0, ref_grads[4], dtype)
        errs["dh0_zero_off_rank0"] = 0.0 if me == 0 else h0_sp.grad.abs().max().item()
        out[(method, scalar, overlap, nb)] = errs
    return out


ALL_CASES = [(m, s, True, None) for m in ("zeco", "lasp1", "lasp2") for s in (False, True)] + [
    ("zeco", False, False, None), ("zeco", True, False, 3), ("zeco", False, True, 3), ("zeco", False, True, 100)]


def _assert_ok(res, dtype):
    for case, errs in res.items():
        for name, e in errs.items():
            assert e <= REL[dtype], f"{case}: {name} error {e:.3g} > {REL[dtype]}"


@pytest.mark.parametrize("P", [1, 2, 3, 4])
def test_sp_gla_matches_serial_float64(dist_pool, P):
    """Every method, per-key and scalar decay, uneven T=37 over P ranks (chunk 16, so chunks cross
    rank boundaries), initial state and per-rank final states, forward and all gradients."""
    res = dist_pool(P).run(_sp_vs_serial, 37, 2, 2, 8, 6, 16, "float64", ALL_CASES)
    for r in res:
        _assert_ok(r, torch.float64)


@pytest.mark.parametrize("P", [2, 4])
def test_sp_gla_matches_serial_float32(dist_pool, P):
    cases = [(m, s, True, None) for m in ("zeco", "lasp1", "lasp2") for s in (False, True)] + [("zeco", False, False, 2)]
    res = dist_pool(P).run(_sp_vs_serial, 37, 2, 2, 8, 6, 16, "float32", cases)
    for r in res:
        _assert_ok(r, torch.float32)


def test_sp_gla_empty_pieces(dist_pool):
    """T=3 over 4 ranks: the last rank holds no token and passes the state through."""
    cases = [(m, False, True, None) for m in ("zeco", "lasp1", "lasp2")] + [("zeco", True, False, None)]
    for r in dist_pool(4).run(_sp_vs_serial, 3, 1, 2, 4, 3, 2, "float64", cases):
        _assert_ok(r, torch.float64)


# ----------------------------------------------------------------------------------------------
# All-Scan
# ----------------------------------------------------------------------------------------------
def _scan_case(shape, per_row, reverse, nb, with_init, transposed):
    P, me = dist.get_world_size(), dist.get_rank()
    gen = torch.Generator().manual_seed(5)
    locs = [torch.randn(*shape, generator=gen, dtype=torch.float64) for _ in range(P)]
    dshape = shape[:-1] if per_row else shape[:-2]
    decs = [torch.rand(*dshape, generator=gen, dtype=torch.float64) for _ in range(P)]
    init = torch.randn(*shape, generator=gen, dtype=torch.float64) if with_init else None
    ref = scan_reference(decs, locs, init, reverse=reverse)
    loc = locs[me]
    if transposed:  # a strided view must still give the right answer (gloo and strides)
        loc = loc.transpose(-1, -2).contiguous().transpose(-1, -2)
    with LEDGER.recording() as rec:
        inp, out = all_scan(decs[me], loc, dist.group.WORLD, initial_state=init, reverse=reverse,
                            num_blocks=nb, output_final_state=True, tag="t.scan")
    h = all_scan_start(decs[me], loc, dist.group.WORLD, initial_state=init, reverse=reverse, num_blocks=nb,
                       output_final_state=True, tag="t.scan.async")
    _ = torch.randn(64, 64) @ torch.randn(64, 64)  # local work while the scan travels
    inp2, out2 = h.wait()
    first = me == (P - 1 if reverse else 0)
    none_ok = (inp is None) == (first and init is None) and (inp2 is None) == (inp is None)
    if inp is None:  # the first rank starting from zero: not materialised
        inp = inp2 = torch.zeros(shape, dtype=torch.float64)
    ok = none_ok and (torch.allclose(inp, ref[me][0], atol=1e-12) and torch.allclose(out, ref[me][1], atol=1e-12)
          and torch.equal(inp, inp2) and torch.equal(out, out2))
    sends = rec.filter(op="send")
    recvs = rec.filter(op="recv")
    return ok, h.num_blocks, len(sends), sends.elements_sent, len(recvs), recvs.elements_recv


@pytest.mark.parametrize("P", [2, 3])
@pytest.mark.parametrize("reverse", [False, True])
def test_all_scan(dist_pool, P, reverse):
    shape = (2, 3, 5, 4)  # [B, H, K rows, V]
    numel = 2 * 3 * 5 * 4
    for nb, expect_n in [(1, 1), (2, 2), (7, 7), (30, 30), (99, 30)]:  # more blocks than rows (30): clamped
        for per_row, with_init, transposed in [(True, False, False), (False, True, True)]:
            res = dist_pool(P).run(_scan_case, shape, per_row, reverse, nb, with_init, transposed)
            for r, (ok, n, ns, es, nr, er) in enumerate(res):
                assert ok, (nb, per_row, r)
                assert n == expect_n
                first = (r == P - 1) if reverse else (r == 0)
                last = (r == 0) if reverse else (r == P - 1)
                assert (ns, es) == ((0, 0) if last else (expect_n, numel))   # one state sent, in N blocks
                assert (nr, er) == ((0, 0) if first else (expect_n, numel))  # one state received


def _stream_discipline(reverse, with_init):
    """The CUDA stream protocol of all_scan_start, checked on CPU with a stand-in side stream: the
    side stream waits for the caller before any message is posted, every send and receive (the
    helper thread's included) is posted and waited on the side stream, and the caller's stream
    waits for the side stream before wait() returns."""
    import contextlib
    import sys
    import threading

    from longseq import comm

    A = sys.modules["longseq.zeco.all_scan"]   # the module (zeco.all_scan, the attribute, is the function)

    P, me = dist.get_world_size(), dist.get_rank()
    side, here, log = object(), threading.local(), []
    saved = {n: getattr(A, n) for n in ("_side_stream", "_fork", "_on", "_join")}
    saved_comm = {n: getattr(comm, n) for n in ("isend", "irecv")}

    @contextlib.contextmanager
    def on(stream):
        prev = getattr(here, "stream", None)
        here.stream = stream
        try:
            yield
        finally:
            here.stream = prev

    def traced(name, fn):
        def call(*a, **k):
            log.append((name, getattr(here, "stream", None) is side))
            work = fn(*a, **k)

            class Work:
                def wait(self):
                    log.append((name + ".wait", getattr(here, "stream", None) is side))
                    return work.wait()
            return Work()
        return call

    A._side_stream = lambda dev: side
    A._fork = lambda stream, dev: log.append(("fork", stream is side))
    A._on = lambda stream: on(stream) if stream is side else contextlib.nullcontext()
    A._join = lambda stream, dev, *t: log.append(("join", stream is side))
    comm.isend, comm.irecv = traced("isend", saved_comm["isend"]), traced("irecv", saved_comm["irecv"])
    try:
        gen = torch.Generator().manual_seed(1)
        locs = [torch.randn(2, 4, 3, generator=gen) for _ in range(P)]
        decs = [torch.rand(2, 4, generator=gen) for _ in range(P)]
        init = torch.randn(2, 4, 3, generator=gen) if with_init else None
        h = all_scan_start(decs[me], locs[me], dist.group.WORLD, initial_state=init, reverse=reverse,
                           num_blocks=2, output_final_state=True)
        inp, out = h.wait()
    finally:
        for n, f in saved.items():
            setattr(A, n, f)
        for n, f in saved_comm.items():
            setattr(comm, n, f)
    ref = scan_reference(decs, locs, init, reverse=reverse)[me]
    ok = torch.allclose(out, ref[1]) and (inp is None or torch.allclose(inp, ref[0]))
    return ok, log


@pytest.mark.parametrize("reverse", [False, True])
def test_all_scan_stream_discipline(dist_pool, reverse):
    for with_init in (False, True):
        for r, (ok, log) in enumerate(dist_pool(3).run(_stream_discipline, reverse, with_init)):
            assert ok, r
            assert log[0] == ("fork", True) and log[-1] == ("join", True), log
            msgs = log[1:-1]
            assert msgs and all(on_side for _, on_side in msgs), f"rank {r}: posted or waited off the side stream: {log}"
            assert sum(n == "isend" for n, _ in msgs) == (0 if r == (0 if reverse else 2) else 2)
            assert sum(n == "irecv.wait" for n, _ in msgs) == (0 if r == (2 if reverse else 0) else 2)

def test_num_blocks_rule():
    f4 = torch.float32
    MiB = 1 << 20
    # N = round(sqrt((P-1) * bytes / 1 MiB)), clamped to [1, rows]
    assert DEFAULT_HALF_BYTES == MiB
    assert [num_blocks_for((1, 4, 256, 512), f4, world_size=P) for P in (1, 2, 4, 64)] == [1, 1, 2, 11]
    assert [num_blocks_for((4, 5, 256, 512), f4, world_size=P) for P in (2, 4)] == [3, 5]
    assert num_blocks_for((1, 1, 2, 3), f4, world_size=8) == 1             # tiny state: one block
    assert num_blocks_for((1, 1, 4, 1 << 20), f4, world_size=64) == 4      # never more blocks than rows
    assert num_blocks_for((1, 4, 256, 512), f4, world_size=2, half_bytes=MiB // 8) == 4
    assert num_blocks_for((2, 2, 8, 8), f4, 3) == 3
    assert num_blocks_for((2, 2, 8, 8), f4, 100) == 32                     # clamped to the 2*2*8 rows
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            num_blocks_for((2, 2, 8, 8), f4, bad)
    old = set_default_half_bytes(MiB // 8)
    try:
        assert num_blocks_for((1, 4, 256, 512), f4, world_size=2) == 4
    finally:
        set_default_half_bytes(old)


# ----------------------------------------------------------------------------------------------
# Validation and the cross-rank check
# ----------------------------------------------------------------------------------------------
def _mismatch(kind):
    me = dist.get_rank()
    B, T, H, K, V = 1, 4, 2, 4, 3
    if kind == "K" and me == 1:
        K = 5
    if kind == "method":
        method = "lasp1" if me == 1 else "zeco"
    else:
        method = "zeco"
    q = torch.randn(B, T, H, K); v = torch.randn(B, T, H, V)
    g = F.logsigmoid(torch.randn(B, T, H, K))
    try:
        sp_gla(q, q.clone(), v, g, group=dist.group.WORLD, method=method, check="always")
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.parametrize("kind", ["K", "method"])
def test_cross_rank_mismatch_raises_on_every_rank(dist_pool, kind):
    msgs = dist_pool(2).run(_mismatch, kind)
    for m in msgs:
        assert m is not None and "disagree" in m and (kind in m)


def test_local_validation_errors():
    q = torch.randn(1, 4, 2, 4)
    v = torch.randn(1, 4, 2, 3)
    g = torch.zeros(1, 4, 2, 4)
    with pytest.raises(ValueError, match="method"):
        sp_gla(q, q, v, g, group=None, method="ring")
    with pytest.raises(ValueError, match="k must"):
        sp_gla(q, q[..., :3], v, g, group=None)
    with pytest.raises(ValueError, match="g must"):
        sp_gla(q, q, v, g[..., :2], group=None)
    with pytest.raises(ValueError, match="v must"):
        sp_gla(q, q, v[:, :3], g, group=None)
    with pytest.raises(ValueError, match="initial_state"):
        sp_gla(q, q, v, g, group=None, initial_state=torch.zeros(1, 2, 3, 4))


# ----------------------------------------------------------------------------------------------
# Ledger: what each method moves per layer
# ----------------------------------------------------------------------------------------------
def _ledger(method, scalar, nb):
    P, me = dist.get_world_size(), dist.get_rank()
    B, H, K, V = 2, 3, 8, 5
    sizes = split_sizes(23, P)
    q, k, v, g, _, do = _inputs(B, 23, H, K, V, scalar, torch.float32, 1)
    mine = [_piece(x, sizes, me).requires_grad_() for x in (q, k, v, g)]
    with LEDGER.recording() as fwd:
        o, _ = sp_gla(*mine, group=dist.group.WORLD, method=method, num_blocks=nb)
    with LEDGER.recording() as bwd:
        (o * _piece(do, sizes, me)).sum().backward()

    def summary(rec):
        out = {op: (rec.payload().count(op=op), rec.payload().filter(op=op).elements_sent,
                    rec.payload().filter(op=op).elements_recv, sorted({x.tag for x in rec.payload().filter(op=op)}),
                    rec.payload().filter(op=op).bytes_sent)
               for op in ("send", "recv", "all_gather", "all_gather_object")}
        out["control"] = [(x.op, x.tag, x.control_sent) for x in rec.control()]   # the cross-rank check
        return out
    return summary(fwd), summary(bwd)


@pytest.mark.parametrize("P", [2, 4])
def test_ledger_volumes(dist_pool, P):
    B, H, K, V = 2, 3, 8, 5
    S = B * H * K * V
    for scalar in (False, True):
        G = B * H if scalar else B * H * K
        for method, nb in (("zeco", 4), ("lasp1", None), ("lasp2", None)):
            res = dist_pool(P).run(_ledger, method, scalar, nb)
            for r, (f, b) in enumerate(res):
                assert f["all_gather_object"][0] == 0 and b["all_gather_object"][0] == 0
                # every call's check: one 24-byte header per rank, control bytes, no payload
                assert f["control"] == [("all_gather", "zeco.check", 24 * (P - 1))] and b["control"] == []
                if method == "lasp2":
                    assert f["send"][0] == f["recv"][0] == b["send"][0] == b["recv"][0] == 0
                    assert f["all_gather"][:3] == (1, (P - 1) * (S + G), (P - 1) * (S + G))
                    assert f["all_gather"][3] == ["zeco.lasp2.fwd"]
                    assert b["all_gather"][:3] == (1, (P - 1) * S, (P - 1) * S)
                    continue
                msgs = nb if method == "zeco" else 1
                tag = "zeco.scan" if method == "zeco" else "zeco.lasp1"
                assert f["all_gather"][0] == b["all_gather"][0] == 0
                # forward: rank -> rank+1; one state sent by every rank but the last
                assert f["send"][:3] == ((0, 0, 0) if r == P - 1 else (msgs, S, 0))
                assert f["recv"][:3] == ((0, 0, 0) if r == 0 else (msgs, 0, S))
                assert f["send"][4] == (0 if r == P - 1 else 4 * S)  # float32 states
                # backward: rank -> rank-1
                assert b["send"][:3] == ((0, 0, 0) if r == 0 else (msgs, S, 0))
                assert b["recv"][:3] == ((0, 0, 0) if r == P - 1 else (msgs, 0, S))
                if r not in (0, P - 1):
                    assert f["send"][3] == [tag + ".fwd"] and b["send"][3] == [tag + ".bwd"]


def _autocast_scan_dtypes(method):
    """Under bf16 autocast, every state message is float32 on both ends (a sender/receiver dtype
    mismatch corrupts silently on gloo), and the result stays close to the float32 run."""
    from longseq import zeco
    from longseq.ledger import LEDGER
    W, r = dist.group.WORLD, dist.get_rank()
    g = torch.Generator().manual_seed(0)
    B, T, H, K, V = 1, 16, 2, 8, 8
    q, k, v = (torch.randn(B, T, H, d, generator=g) for d in (K, K, V))
    gk = torch.nn.functional.logsigmoid(torch.randn(B, T, H, K, generator=g))
    sl = slice(r * T // 2, (r + 1) * T // 2)
    args = [t[:, sl].contiguous() for t in (q, k, v, gk)]
    ref, _ = zeco.sp_gla(*args, group=W, method=method)
    with LEDGER.recording() as rec, torch.autocast("cpu", dtype=torch.bfloat16):
        o, _ = zeco.sp_gla(*args, group=W, method=method)
    dtypes = sorted({x.dtype for x in rec if x.op in ("send", "recv")})
    return dtypes, (o.float() - ref).abs().max().item() / ref.abs().max().item()


@pytest.mark.parametrize("method", ["zeco", "lasp1"])
def test_autocast_state_messages_agree_in_dtype(dist_pool, method):
    for dtypes, rel in dist_pool(2).run(_autocast_scan_dtypes, method):
        assert dtypes == ["float32"]
        assert rel < 5e-2  # bf16 autocast of the local work
