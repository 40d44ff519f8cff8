"""Fuzz of the public API across 2-4 gloo ranks (hypothesis): ranks that disagree on shapes, dims or
dtypes, sequences shorter than P, zero-length tensors, NaN inputs, for dsp.switch / shard / gather
and zeco.sp_gla. Every case must end in the single-process reference result on every rank or in the
same ValueError on every rank; a hang fails the test through the pool's timeout. The outcome counts
are printed (pytest -s) and asserted to cover both kinds. ``LONGSEQ_FUZZ_EXAMPLES`` raises the count."""
import collections
import os

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longseq import dsp, zeco
from longseq.sharding import shard_range
from longseq.zeco.gla.naive import recurrent_gla_reference

EXAMPLES = int(os.environ.get("LONGSEQ_FUZZ_EXAMPLES", "40"))
OUTCOMES: collections.Counter = collections.Counter()


def _piece(x, dim, P, r):
    a, b = shard_range(x.shape[dim], P, r)
    return x.narrow(dim, a, b - a)


def _dsp_case(spec):
    """One DSP case on this rank: ("ok", tensor) or ("err", message)."""
    P, r, W = dist.get_world_size(), dist.get_rank(), dist.group.WORLD
    B, T, S, C, op, bad, who = (spec[k] for k in ("B", "T", "S", "C", "op", "bad", "who"))
    mine = bad if r == who else "none"
    dtype = torch.float64 if mine == "dtype" else torch.float32
    Cr = C + 1 if mine == "channels" else C
    Tr = T + 1 if mine == "whole" and op == "shard" else T          # pieces of switch/gather: see "channels"
    whole = torch.randn(B, Tr, S, Cr, generator=torch.Generator().manual_seed(spec["seed"])).to(dtype)
    if spec["nan"] and whole.numel():
        whole.view(-1)[0] = float("nan")
    try:
        if op == "shard":
            out = dsp.shard(whole, 1, W)
        elif op == "switch":
            x = _piece(whole, 1, P, r) if T >= P else whole[:, :0]
            dims = (2, 1) if mine != "dims" else (3, 1)
            out = dsp.switch(x, W, dims[0], dims[1], gather_size=spec["give_size"] and T or None)
        else:
            x = _piece(whole, 1, P, r) if T >= P else whole[:, :0]
            out = dsp.gather(x, 1, W, full_size=spec["give_size"] and T or None)
        return "ok", out
    except ValueError as e:
        return "err", str(e)


def _dsp_expected(spec, P, r):
    whole = torch.randn(spec["B"], spec["T"], spec["S"], spec["C"],
                        generator=torch.Generator().manual_seed(spec["seed"]))
    if spec["nan"] and whole.numel():
        whole.view(-1)[0] = float("nan")
    return {"shard": lambda: _piece(whole, 1, P, r), "switch": lambda: _piece(whole, 2, P, r),
            "gather": lambda: whole}[spec["op"]]()


def _run_many(fn, specs):
    return [fn(s) for s in specs]


dsp_spec = st.fixed_dictionaries({
    "B": st.integers(1, 2), "T": st.integers(0, 6), "S": st.integers(0, 6), "C": st.integers(1, 3),
    "op": st.sampled_from(["switch", "shard", "gather"]),
    "bad": st.sampled_from(["none", "none", "dtype", "channels", "whole", "dims"]),
    "who": st.integers(0, 3), "nan": st.booleans(), "give_size": st.booleans(),
    "seed": st.integers(0, 2 ** 16)})


def _judge(P, outs, expected_fn, must_fail, tol=0.0):
    """Count one case: the same error on every rank, or (never when ranks disagree) every rank's
    result equal to ``expected_fn(rank)`` within ``tol`` (NaN where it has NaN)."""
    kinds = {k for k, _ in outs}
    assert len(kinds) == 1, f"ranks ended differently: {[k for k, _ in outs]} {outs}"
    if kinds == {"err"}:
        msgs = {m for _, m in outs}
        assert len(msgs) == 1, f"different errors on the ranks: {msgs}"
        OUTCOMES["same error on every rank"] += 1
        return
    assert not must_fail, f"ranks that disagree got a result: {outs}"
    for r, (_, got) in enumerate(outs):
        torch.testing.assert_close(got, expected_fn(r), rtol=tol, atol=tol, equal_nan=True)
    OUTCOMES["correct result"] += 1


@pytest.mark.parametrize("P", [2, 3, 4])
def test_fuzz_dsp_primitives(dist_pool, P):
    pool = dist_pool(P)
    batch = []
    OUTCOMES.clear()

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(dsp_spec)
    def collect(spec):
        batch.append(spec)

    collect()
    results = pool.run(_run_many, _dsp_case, batch, timeout=120)     # every case, one round trip
    for i, spec in enumerate(batch):
        outs = [results[r][i] for r in range(P)]
        applies = {"dtype": True, "channels": True, "whole": spec["op"] == "shard", "dims": spec["op"] == "switch"}
        disagree = spec["bad"] != "none" and applies[spec["bad"]] and spec["who"] < P
        _judge(P, outs, lambda r, s=spec: _dsp_expected(s, P, r), disagree)
    print(f"\nfuzz dsp P={P}: {len(batch)} cases, {dict(OUTCOMES)}")
    assert sum(OUTCOMES.values()) == len(batch)


def _gla_inputs(spec):
    """The whole q, k, v, g (B=1, H=2, K=4, V=3) of a case; NaN in v when asked."""
    g = torch.Generator().manual_seed(spec["seed"])
    B, T, H, K, V = 1, spec["T"], 2, 4, 3
    q, k = torch.randn(B, T, H, K, generator=g), torch.randn(B, T, H, K, generator=g)
    v = torch.randn(B, T, H, V, generator=g)
    lg = -torch.rand(B, T, H, K, generator=g)
    if spec["nan"] and T:
        v[0, 0, 0, 0] = float("nan")
    return q, k, v, lg


def _gla_case(spec):
    P, r, W = dist.get_world_size(), dist.get_rank(), dist.group.WORLD
    q, k, v, lg = _gla_inputs(spec)
    a, b = shard_range(spec["T"], P, r)
    pieces = [t[:, a:b] for t in (q, k, v, lg)]
    if spec["bad"] == "K" and r == spec["who"] % P:
        pieces = [t[..., :3] if i != 2 else t for i, t in enumerate(pieces)]
    if spec["bad"] == "dtype" and r == spec["who"] % P:
        pieces = [t.double() for t in pieces]
    try:
        o, _ = zeco.sp_gla(*pieces, group=W, check="always", method=spec["method"])
        return "ok", o
    except ValueError as e:
        return "err", str(e)


def _gla_expected(spec, P, r):
    o, _ = recurrent_gla_reference(*_gla_inputs(spec))
    a, b = shard_range(spec["T"], P, r)
    return o[:, a:b]


gla_spec = st.fixed_dictionaries({
    "T": st.integers(0, 9), "bad": st.sampled_from(["none", "none", "K", "dtype"]), "who": st.integers(0, 3),
    "nan": st.booleans(), "method": st.sampled_from(["zeco", "lasp1", "lasp2"]), "seed": st.integers(0, 2 ** 16)})


@pytest.mark.parametrize("P", [2, 4])
def test_fuzz_sp_gla(dist_pool, P):
    pool = dist_pool(P)
    batch = []
    OUTCOMES.clear()

    @settings(max_examples=max(10, EXAMPLES // 2), deadline=None, suppress_health_check=list(HealthCheck),
              database=None)
    @given(gla_spec)
    def collect(spec):
        batch.append(spec)

    collect()
    results = pool.run(_run_many, _gla_case, batch, timeout=120)
    for i, spec in enumerate(batch):
        outs = [results[r][i] for r in range(P)]
        kinds = {k for k, _ in outs}
        if kinds == {"ok"}:
            for r, (_, got) in enumerate(outs):
                torch.testing.assert_close(got, _gla_expected(spec, P, r), rtol=1e-4, atol=1e-4, equal_nan=True)
            assert spec["bad"] == "none", f"ranks that disagree got a result: {spec}"
            OUTCOMES["correct result"] += 1
        else:
            assert kinds == {"err"} and len({m for _, m in outs}) == 1, outs
            OUTCOMES["same error on every rank"] += 1
    print(f"\nfuzz sp_gla P={P}: {len(batch)} cases, {dict(OUTCOMES)}")
    assert sum(OUTCOMES.values()) == len(batch)


# ---- (a) the baselines' attention primitives: Ulysses, ring (plain and causal) ----------------------
def _attn_inputs(spec, L=None, H=None, D=None):
    """The whole q, k, v [B, L, H, D] of a case (float32); NaN in v when asked."""
    g = torch.Generator().manual_seed(spec["seed"])
    shape = (spec["B"], spec["L"] if L is None else L, spec["H"] if H is None else H, spec["D"] if D is None else D)
    q, k, v = (torch.randn(*shape, generator=g) for _ in range(3))
    if spec["nan"] and v.numel():
        v.view(-1)[0] = float("nan")
    return q, k, v


def _attn_case(spec):
    from longseq.sp import ring_attention, ulysses_attention
    P, r, W = dist.get_world_size(), dist.get_rank(), dist.group.WORLD
    mine = spec["bad"] if r == spec["who"] % P else "none"
    L = spec["L"] + (1 if mine == "L" else 0)
    q, k, v = _attn_inputs(spec, L=L, H=spec["H"] + (mine == "heads"), D=spec["D"] + (mine == "dim"))
    if mine == "dtype":
        q, k, v = q.double(), k.double(), v.double()
    q, k, v = (_piece(t, 1, P, r) for t in (q, k, v))
    try:
        if spec["op"] == "ulysses":
            out = ulysses_attention(q, k, v, W, seq_len=L)
        else:
            out = ring_attention(q, k, v, W, causal=spec["op"] == "ring_causal", seq_len=L)
        return "ok", out
    except ValueError as e:
        return "err", str(e)


def _attn_expected(spec, P, r):
    q, k, v = (t.double() for t in _attn_inputs(spec))
    s = torch.einsum("blhd,bmhd->bhlm", q, k) / spec["D"] ** 0.5
    if spec["op"] == "ring_causal":
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    o = torch.einsum("bhlm,bmhd->blhd", s.softmax(-1), v).float()
    return _piece(o, 1, P, r)


attn_spec = st.fixed_dictionaries({
    "B": st.integers(1, 2), "L": st.integers(0, 12), "H": st.sampled_from([2, 3, 4, 6, 12]), "D": st.integers(1, 3),
    "op": st.sampled_from(["ulysses", "ring", "ring_causal"]),
    "bad": st.sampled_from(["none", "none", "none", "L", "heads", "dim", "dtype"]), "who": st.integers(0, 3),
    "nan": st.booleans(), "seed": st.integers(0, 2 ** 16)})


def _collect(strategy, n):
    batch = []

    @settings(max_examples=n, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(strategy)
    def collect(spec):
        batch.append(spec)

    collect()
    return batch


def _fuzz(pool, P, case, expected, strategy, n, tol, label):
    """Run ``n`` drawn cases of ``case`` on every rank (one round trip) and judge each against
    ``expected(spec, P, r)``; a case whose ``bad`` names a rank in the group must fail."""
    OUTCOMES.clear()
    batch = _collect(strategy, n)
    results = pool.run(_run_many, case, batch, timeout=120)
    for i, spec in enumerate(batch):
        _judge(P, [results[r][i] for r in range(P)], lambda r, s=spec: expected(s, P, r),
               spec["bad"] != "none" and spec["who"] < P, tol)
    print(f"\nfuzz {label} P={P}: {len(batch)} cases, {dict(OUTCOMES)}")
    assert sum(OUTCOMES.values()) == len(batch)


@pytest.mark.parametrize("P", [2, 3])
def test_fuzz_sp_attention(dist_pool, P):
    _fuzz(dist_pool(P), P, _attn_case, _attn_expected, attn_spec, max(10, EXAMPLES // 2), 1e-5, "sp attention")


# ---- (b) parallelize on the tiny ST-DiT: dsp.parallelize and sp.parallelize(method=...) -------------
def _stdit():
    from longseq.models import STDiT, init_for_testing, stdit_config
    return init_for_testing(STDiT(stdit_config("tiny", patch_size=1)), std=0.1, seed=0)


def _stdit_inputs(spec, B=None, T=None, H=None, W=None):
    """x [B, 4, T, H, W], timestep [B], caption [B, 3, 16], its mask (last token off in sample 0)."""
    g = torch.Generator().manual_seed(spec["seed"])
    B = spec["B"] if B is None else B
    x = torch.randn(B, 4, spec["T"] if T is None else T, spec["H"] if H is None else H, spec["W"] if W is None else W,
                    generator=g)
    ts, y = torch.rand(B, generator=g) * 1000, torch.randn(B, 3, 16, generator=g)
    mask = torch.ones(B, 3, dtype=torch.bool)
    mask[0, -1] = False
    return x, ts, y, mask


_MODEL: dict = {}


def _model_case(spec):
    import longseq.sp as sp
    P, r, W = dist.get_world_size(), dist.get_rank(), dist.group.WORLD
    model = _MODEL.setdefault("stdit", _stdit())
    mine = spec["bad"] if r == spec["who"] % P else "none"
    x, ts, y, mask = _stdit_inputs(spec, **({mine: spec[mine] + 1} if mine in ("B", "T", "H", "W") else {}))
    if mine == "dtype":
        x = x.double()
    handle = None
    try:
        handle = (dsp.parallelize(model, W) if spec["method"] == "dsp.parallelize"
                  else sp.parallelize(model, W, spec["method"]))
        with torch.no_grad():
            return "ok", model(x, ts, y, mask)
    except ValueError as e:
        return "err", str(e)
    finally:
        if handle is not None:
            handle.remove()


def _model_expected(spec, P=None, r=None):
    """The whole output, on every rank (``P``, ``r`` unused: gather_output)."""
    model = _MODEL.setdefault("stdit", _stdit())
    with torch.no_grad():
        return model(*_stdit_inputs(spec))


model_spec = st.fixed_dictionaries({
    "B": st.integers(1, 2), "T": st.integers(1, 4), "H": st.integers(1, 3), "W": st.integers(2, 3),
    "method": st.sampled_from(["dsp.parallelize", "dsp", "ulysses", "ring"]),
    "bad": st.sampled_from(["none", "none", "B", "T", "H", "W", "dtype"]), "who": st.integers(0, 3),
    "seed": st.integers(0, 2 ** 16)})


@pytest.mark.parametrize("P", [2, 3])
def test_fuzz_parallelize_stdit(dist_pool, P):
    _fuzz(dist_pool(P), P, _model_case, _model_expected, model_spec, max(8, EXAMPLES // 3), 1e-5, "parallelize ST-DiT")


# ---- (c) zeco.sp_delta_rule: methods zeco / allgather / heads / p2p -------------------------------
def _delta_inputs(spec):
    """The whole q, k [B=1, T, H=2, K=4], v [.., V=3], g [.., H] (log space), beta [.., H]; NaN in v."""
    g = torch.Generator().manual_seed(spec["seed"])
    T = spec["T"]
    q, k = torch.randn(1, T, 2, 4, generator=g), torch.randn(1, T, 2, 4, generator=g)
    v = torch.randn(1, T, 2, 3, generator=g)
    lg, beta = -torch.rand(1, T, 2, generator=g), torch.rand(1, T, 2, generator=g)
    if spec["nan"] and T:
        v[0, 0, 0, 0] = float("nan")
    return q, k, v, lg, beta


def _delta_case(spec):
    P, r, W = dist.get_world_size(), dist.get_rank(), dist.group.WORLD
    a, b = shard_range(spec["T"], P, r)
    q, k, v, lg, beta = (t[:, a:b] for t in _delta_inputs(spec))
    mine = spec["bad"] if r == spec["who"] % P else "none"
    if mine == "K":
        q, k = q[..., :3], k[..., :3]
    elif mine == "heads":
        q, k, v, lg, beta = (t[:, :, :1] for t in (q, k, v, lg, beta))
    elif mine == "dtype":
        q, k, v, lg, beta = (t.double() for t in (q, k, v, lg, beta))
    elif mine == "method":
        spec = {**spec, "method": "p2p" if spec["method"] != "p2p" else "zeco"}
    try:
        o, _ = zeco.sp_delta_rule(q, k, v, lg, beta, group=W, method=spec["method"], backend="torch")
        return "ok", o
    except ValueError as e:
        return "err", str(e)


def _delta_expected(spec, P, r):
    from longseq.zeco.delta.naive import recurrent_delta_rule_reference
    o, _ = recurrent_delta_rule_reference(*_delta_inputs(spec))
    return _piece(o, 1, P, r)


delta_spec = st.fixed_dictionaries({
    "T": st.integers(0, 12), "bad": st.sampled_from(["none", "none", "none", "K", "heads", "dtype", "method"]),
    "who": st.integers(0, 3), "nan": st.booleans(), "method": st.sampled_from(["zeco", "allgather", "heads", "p2p"]),
    "seed": st.integers(0, 2 ** 16)})


@pytest.mark.parametrize("P", [2, 4])
def test_fuzz_sp_delta_rule(dist_pool, P):
    _fuzz(dist_pool(P), P, _delta_case, _delta_expected, delta_spec, max(10, EXAMPLES // 2), 1e-4, "sp_delta_rule")
