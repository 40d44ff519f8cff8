"""The cost model (benchmarks/costmodel): collective formulas against hand-computed cases, the
pipelined All-Scan chain, overlap, and the ledger path end to end (real gloo runs -> simulator; fake
process group captures equal gloo's ledgers; volumes scale exactly from small shapes).

Fake-process-group captures run in a spawned helper process (a process can hold one process group;
the test process may hold another)."""
from __future__ import annotations

import concurrent.futures
import multiprocessing as mp

import pytest
import torch.distributed as dist

from longseq.benchmarks.costmodel import collectives as C
from longseq.benchmarks.costmodel.compute import GlaCompute, StditCompute
from longseq.benchmarks.costmodel.ledger import (Row, aggregate, capture, capture_workload, doubled, factor_values,
                                         fit_exponents, scale_rows, with_factors)
from longseq.benchmarks.costmodel.simulator import gla_estimate, gla_timeline, grad_sync_exposed, stdit_estimate
from longseq.benchmarks.costmodel.topology import Link, Topology
from longseq.benchmarks.workloads import Workload, build_step

INTRA, INTER = Link(5e-6, 360e9), Link(10e-6, 45e9)
H100 = Topology("h100", 8, INTRA, INTER, peak_flops=989e12, mfu=0.4)
UNIT = Topology("unit", 1024, Link(0.0, 1.0), Link(0.0, 1.0))        # time == bytes


def approx(x, rel=1e-12):
    return pytest.approx(x, rel=rel)


# ----------------------------------------------------------------------------------------------
# Collectives, by hand
# ----------------------------------------------------------------------------------------------
def test_all_to_all_intra_inter_mixed():
    b = 1e6                                           # bytes to each peer
    # 8 ranks, one node: 7 peers over NVSwitch
    assert C.all_to_all(H100, 8, 7 * b) == approx(5e-6 + 7 * b / 360e9)
    # 4 ranks inside a node
    assert C.all_to_all(H100, 4, 3 * b) == approx(5e-6 + 3 * b / 360e9)
    # 16 ranks = 2 nodes: 7 peers on NVLink and 8 over the NIC, concurrently; the NIC dominates
    assert C.all_to_all(H100, 16, 15 * b) == approx(max(5e-6 + 7 * b / 360e9, 10e-6 + 8 * b / 45e9))
    # 64 ranks = 8 nodes
    assert C.all_to_all(H100, 64, 63 * b) == approx(10e-6 + 56 * b / 45e9)


def test_ring_collectives_by_placement():
    chunk = 2e6
    assert C.all_gather(H100, 8, 7 * chunk) == approx(7 * (5e-6 + chunk / 360e9))
    assert C.reduce_scatter(H100, 4, 3 * chunk) == approx(3 * (5e-6 + chunk / 360e9))
    assert C.all_gather(H100, 32, 31 * chunk) == approx(31 * (10e-6 + chunk / 45e9))
    n = 64e6                                           # an all-reduce of 64 MB over 16 ranks (2 nodes)
    sent = 2 * n * 15 / 16                              # the ledger's convention
    ring = 30 * (10e-6 + (n / 16) / 45e9)
    tree = 2 * 4 * 10e-6 + 2 * n / 45e9
    assert C.all_reduce(H100, 16, sent) == approx(min(ring, tree))
    # a tiny all-reduce (the loss) over 256 ranks takes the tree: log latency
    assert C.all_reduce(H100, 256, 2 * 8 * 255 / 256) == approx(2 * 8 * 10e-6 + 2 * 8 / 45e9)


def test_strided_groups_and_p2p_placement():
    # USP's ring group {0, 8, 16, 24}: every hop leaves the node even though P = 4
    assert H100.spans_nodes(4, 0, 8) and not H100.spans_nodes(4, 0, 1)
    assert C.all_gather(H100, 4, 3e6, stride=8) == approx(3 * (10e-6 + 1e6 / 45e9))
    assert H100.peers(4, 0, 0, 8) == (0, 3)
    assert C.p2p(H100, 3, 4, 1e6) == approx(5e-6 + 1e6 / 360e9)
    assert C.p2p(H100, 7, 8, 1e6) == approx(10e-6 + 1e6 / 45e9)
    assert C.price(H100, "send", 16, 1e6, calls=3) == approx(3 * (10e-6 + 1e6 / 45e9))
    assert C.price(H100, "recv", 16, 1e6, calls=3) == 0.0


def test_measured_fits_override_algorithms():
    topo = Topology("fit", 1024, Link(1e-6, 1e9), Link(1e-6, 1e9), fits=(("all_to_all", 4, Link(2e-3, 1e9)),))
    assert C.all_to_all(topo, 4, 3e6) == approx(2e-3 + 3e6 / 1e9)
    assert C.all_to_all(topo, 2, 1e6) == approx(1e-6 + 1e6 / 1e9)     # no fit for P = 2: the algorithm


# ----------------------------------------------------------------------------------------------
# All-Scan: the pipelined chain
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("P,N", [(2, 1), (4, 1), (4, 4), (8, 3), (16, 8)])
def test_chain_homogeneous_matches_closed_form(P, N):
    s = 8e6
    arr = C.pipelined_chain([INTRA] * (P - 1), s, N, [0.0] * P)
    assert arr[-1] == approx(C.chain_closed_form(P, s, N, INTRA))
    assert arr[-1] == approx((P - 1 + N - 1) * (5e-6 + s / N / 360e9))
    # each rank's state arrives one stage after its predecessor's
    stage = 5e-6 + s / N / 360e9
    for i in range(1, P):
        assert arr[i] == approx((i + N - 1) * stage)


def test_chain_pipelining_beats_lasp1_and_mixed_links():
    s, P = 8e6, 16
    lasp1 = C.pipelined_chain([INTRA] * (P - 1), s, 1, [0.0] * P)[-1]
    assert lasp1 == approx((P - 1) * (5e-6 + s / 360e9))
    zeco = C.pipelined_chain([INTRA] * (P - 1), s, 8, [0.0] * P)[-1]
    assert zeco == approx((P - 1 + 7) * (5e-6 + s / 8 / 360e9)) and zeco < lasp1 / 2
    # 3 ranks, hop 0 on NVLink, hop 1 over InfiniBand, N = 2: hand-computed
    a, b = 5e-6 + 4e6 / 360e9, 10e-6 + 4e6 / 45e9      # stage times of a 4 MB block on each hop
    arr = C.pipelined_chain([INTRA, INTER], 8e6, 2, [0.0] * 3)
    # rank 1 gets block 0 at a, block 1 at 2a; hop 1 sends block 0 at a (until a+b), block 1 at max(2a, a+b)
    assert arr[1] == approx(2 * a)
    assert arr[2] == approx(max(2 * a, a + b) + b)


def test_chain_waits_for_late_ranks():
    # rank 1 posts its scan late (its local summary took 1 ms): the chain waits for it (rendezvous)
    arr = C.pipelined_chain([INTRA, INTRA], 8e6, 1, [0.0, 1e-3, 0.0])
    st = 5e-6 + 8e6 / 360e9
    assert arr[1] == approx(1e-3 + st)
    assert arr[2] == approx(arr[1] + st)


# ----------------------------------------------------------------------------------------------
# Overlap
# ----------------------------------------------------------------------------------------------
def _row(op, tag, P, nbytes, calls=1):
    return Row(op, tag, P, "bfloat16", 2, calls, nbytes // 2 if op != "recv" else 0, nbytes // 2 if op == "recv" else 0)


def test_ring_overlap_and_serial_collectives():
    P = 4
    comp = StditCompute(fwd=1.0, bwd=2.0, attn_fwd=0.1, attn_bwd=0.2)
    sends = _row("send", "ring.kv", P, int(360e9 * 0.5))            # 0.5 s on NVLink (+ latency)
    t_p2p = C.price(H100, "send", P, sends.bytes_sent)
    est = stdit_estimate("ring", P, [sends, _row("recv", "ring.kv", P, sends.bytes_sent)], comp, H100, "off")
    window = 0.3 * (P - 1) / P
    assert est.step_s == approx(3.0 + t_p2p - window)
    # a small transfer hides entirely under the attention
    small = _row("send", "ring.kv", P, int(360e9 * 0.01))
    assert stdit_estimate("ring", P, [small], comp, H100, "off").step_s == approx(3.0)
    # all-to-alls do not overlap
    a2a = _row("all_to_all", "dsp.x", P, int(3e9))
    assert stdit_estimate("dsp", P, [a2a], comp, H100, "off").step_s == approx(3.0 + C.all_to_all(H100, P, 3e9))


def test_grad_sync_modes():
    assert grad_sync_exposed(1.0, 10, 5.0, "serial") == 1.0
    assert grad_sync_exposed(1.0, 10, 5.0, "overlap") == approx(0.1)         # the last bucket
    assert grad_sync_exposed(8.0, 10, 5.0, "overlap") == approx(3.0)
    assert grad_sync_exposed(8.0, 10, 5.0, "off") == 0.0
    with pytest.raises(ValueError):
        grad_sync_exposed(1.0, 1, 1.0, "sometimes")


def _gla_comp(other=1e-3, gla=1e-3, extra=0.0, L=4):
    return GlaCompute(L, other, 2 * other, gla, 2 * gla, extra, extra, 0.0, 0.0)


def test_zeco_scan_hides_under_local_kernel():
    P, L, s = 8, 4, 2 * 2**20
    comp = _gla_comp(L=L)
    d = ("send", 8, s)
    out = gla_timeline("zeco", P, L, [comp] * P, H100, fwd=d, bwd=d)
    assert max(out["end"]) == approx(comp.total, rel=1e-9)             # the scan (~10 us) < the kernel (1 ms)
    slow = Topology("slow", 8, Link(5e-6, 1e9), Link(5e-6, 1e9))
    out = gla_timeline("zeco", P, L, [comp] * P, slow, fwd=d, bwd=d)
    assert max(out["end"]) > comp.total + 1e-3                           # 2 MiB at 1 GB/s does not hide


def test_zeco_without_overlap_pays_the_chain():
    """``overlap=False`` (sp_gla(overlap=False)): the scan is waited for before the kernel, so the
    chain that hides under the kernel with overlap is paid in full."""
    P, L, s = 4, 2, 64 * 2**10
    comp = _gla_comp(L=L)
    d = ("send", 2, s)
    slow = Topology("slow", 8, Link(1e-4, 1e9), Link(1e-4, 1e9))
    hidden = max(gla_timeline("zeco", P, L, [comp] * P, slow, fwd=d, bwd=d)["end"])
    paid = max(gla_timeline("zeco", P, L, [comp] * P, slow, fwd=d, bwd=d, overlap=False)["end"])
    assert hidden == approx(comp.total, rel=1e-9)                       # a 0.5 ms chain under 1 ms kernels
    assert paid > comp.total + C.chain_closed_form(P, s, 2, slow.intra) # at least one whole chain exposed


def test_lasp1_wavefront_and_layer_barrier():
    """Without barriers the LASP-1 chain is not paid in full per layer: layers pipeline across ranks
    (rank i runs layer l+1 while rank i+1 waits for layer l). Its blocking send still waits for the
    next rank to post its receive, which couples neighbours, so it costs more than the pure
    wavefront (the chain once per pass) and much less than a chain per layer (a barrier per layer)."""
    P, L, s = 4, 6, 36e6                                                   # 36 MB over NVLink ~ 0.1 ms a hop
    comp = _gla_comp(other=1e-3, gla=1e-3, L=L)
    d = ("send", 1, s)
    hop = INTRA.time(s)
    free = max(gla_timeline("lasp1", P, L, [comp] * P, H100, fwd=d, bwd=d)["end"])
    sync = max(gla_timeline("lasp1", P, L, [comp] * P, H100, fwd=d, bwd=d, layer_barrier=True)["end"])
    assert sync == approx(comp.total + 2 * L * (P - 1) * hop, rel=1e-9)
    assert comp.total + 2 * (P - 1) * hop <= free + 1e-12
    assert free < sync - 5 * hop
    # with two ranks the coupling is total: the receiver is the only one behind, every layer
    two = max(gla_timeline("lasp1", 2, L, [comp] * 2, H100, fwd=d, bwd=d)["end"])
    assert two == approx(comp.total + 2 * L * hop, rel=1e-9)
    # ZeCO's non-blocking relay on the same links: the chain hides under the GLA kernel
    z = max(gla_timeline("zeco", P, L, [comp] * P, H100, fwd=("send", 4, s), bwd=("send", 4, s))["end"])
    assert z == approx(comp.total, rel=1e-9)
    # LASP-2: one all-gather per layer and pass, a synchronisation point
    ag = ("all_gather", 1, (P - 1) * s)
    l2 = max(gla_timeline("lasp2", P, L, [comp] * P, H100, fwd=ag, bwd=ag)["end"])
    assert l2 == approx(comp.total + 2 * L * C.all_gather(H100, P, (P - 1) * s), rel=1e-9)


# ----------------------------------------------------------------------------------------------
# The ledger path: real gloo runs -> simulator; fake group captures; exact scaling
# ----------------------------------------------------------------------------------------------
STDIT = Workload.make("stdit", "dsp", "tiny", dict(B=1, T=4, H=4, W=8, N=2), dict(depth=2))
GLA = Workload.make("gla", "zeco", "tiny", dict(B=1, T=64), dict(num_layers=2))


def _gloo_rows(w):
    """On every gloo rank: a warm-up step, then the rows of one recorded step."""
    from longseq.ledger import LEDGER
    step = build_step(w, dist.group.WORLD)
    step()
    with LEDGER.recording() as rec:
        step()
    return [r.to_json() for r in aggregate(rec)]


def _fake_rows(w, P, rank):
    return [r.to_json() for r in capture(w, P, rank)]


def _fake_scaling_check(w, P):
    """Fit exponents from a small capture and its doublings, predict a third shape, capture it."""
    small = capture_workload(w, P)
    f0 = factor_values(small)
    from longseq.benchmarks.costmodel.ledger import FACTORS
    base = capture(small, P, 0)
    dbl = {f: capture(doubled(small, f), P, 0) for f in FACTORS[w.family]}
    exps = fit_exponents(base, dbl)
    f1 = dict(f0)
    if w.family == "stdit":
        f1.update(T=4 * f0["T"], S=2 * f0["S"], C=2 * f0["C"], depth=3, B=2, N=3)
    else:
        f1.update(T=8 * f0["T"], depth=3, B=2)
    third = with_factors(small, f1)
    got = {r.key: r for r in capture(third, P, 0) if not r.tag.startswith("grad_sync")}
    pred = {r.key: r for r in scale_rows(base, exps, f0, f1) if not r.tag.startswith("grad_sync")}
    return ({k: (r.calls, r.elements_sent, r.elements_recv) for k, r in got.items()},
            {k: (r.calls, r.elements_sent, r.elements_recv) for k, r in pred.items()},
            {str(k): v for k, v in exps.items()})


@pytest.fixture(scope="module")
def helper():
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
        yield ex


@pytest.mark.parametrize("w", [STDIT, GLA, STDIT.replace(method="ring"), GLA.replace(method="lasp2")],
                         ids=["dsp", "zeco", "ring", "lasp2"])
def test_gloo_ledger_priced_exactly_and_fake_capture_equal(dist_pool, helper, w):
    P = 2
    per_rank = dist_pool(P).run(_gloo_rows, w)
    rows = {r: [Row.from_json(d) for d in per_rank[r]] for r in range(P)}
    # 1. the simulator prices exactly the bytes the ledger recorded (time == bytes on a unit topology)
    ledger_sp = max(sum(r.bytes_sent for r in rows[k] if not r.tag.startswith("grad_sync")) for k in rows)
    assert ledger_sp > 0
    if w.family == "stdit":
        est = stdit_estimate(w.method, P, rows[0], StditCompute(0.0, 0.0, 0.0, 0.0), UNIT, "serial")
        assert est.sp_bytes == ledger_sp
        total = sum(r.bytes_sent for r in rows[0])
        assert est.comm_s + est.grad_sync_s == approx(total)
    else:
        comp = GlaCompute(2, 0, 0, 0, 0, 0, 0, 0, 0)
        est = gla_estimate(w.method, P, rows, lambda i: comp, 2, UNIT, "serial")
        assert est.sp_bytes == ledger_sp
        gs = sum(r.bytes_sent for r in rows[0] if r.tag.startswith("grad_sync"))
        assert est.grad_sync_s == approx(gs)
    # 2. the fake process group records what gloo recorded, rank by rank
    for r in range(P):
        fake = helper.submit(_fake_rows, w, P, r).result()
        assert sorted(map(str, fake)) == sorted(map(str, per_rank[r])), f"rank {r}"


@pytest.mark.parametrize("w,P", [(STDIT, 2), (STDIT.replace(method="ring"), 4), (GLA, 4),
                                 (GLA.replace(method="lasp2"), 8)], ids=["dsp2", "ring4", "zeco4", "lasp2-8"])
def test_volumes_scale_exactly_to_a_third_shape(helper, w, P):
    got, pred, exps = helper.submit(_fake_scaling_check, w, P).result()
    assert got == pred
    if w.method == "dsp":
        # the switches are linear in the activation: exponent 1 in B, T, S, C
        sw = [e for k, e in exps.items() if "temporal.in" in k]
        assert sw and all(e["sent"][f] == 1 for e in sw for f in ("B", "T", "S", "C"))
    if w.family == "gla":
        # the state exchange does not grow with the sequence
        st = [e for k, e in exps.items() if ".fwd" in k or ".bwd" in k]
        assert st and all(e[side]["T"] == 0 for e in st for side in ("sent", "recv"))
        assert all(max(e["sent"]["B"], e["recv"]["B"]) == 1 for e in st)


def test_non_monomial_rows_are_refused():
    base = [Row("all_to_all", "x", 2, "float32", 4, 1, 10, 10)]
    with pytest.raises(ValueError, match="not a power of 2"):
        fit_exponents(base, {"T": [Row("all_to_all", "x", 2, "float32", 4, 1, 30, 30)]})
    with pytest.raises(ValueError, match="changes which collectives"):
        fit_exponents(base, {"T": [Row("all_to_all", "y", 2, "float32", 4, 1, 20, 20)]})


def test_measured_compute_round_trip(tmp_path):
    """``benchmarks.scaling --compute-json`` (here on the CPU, tiny targets) writes entries that
    ``benchmarks.simulate compute_json=`` finds for every target: no silent fallback to FLOPs."""
    import json
    import subprocess
    import sys

    tiny = ["stdit.presets=[tiny]", "stdit.gpus=[2]", "stdit.methods=[dsp,ring]", "stdit.frames_per_gpu=1",
            "stdit.latent=[8,8]", "stdit.caption_tokens=4", "gla.preset=tiny", "gla.gpus=[2]",
            "gla.tokens_per_gpu=64", "gla.headline.tokens_per_gpu=64", "gla.headline.gpus=2",
            "gla.methods=[zeco,lasp2]"]
    cj, out = tmp_path / "compute.json", tmp_path / "sim.json"
    run = dict(capture_output=True, text=True, timeout=300)
    r = subprocess.run([sys.executable, "-m", "longseq.benchmarks.scaling", "--device", "cpu", "--repeats", "1",
                        "--warmup", "1", "--compute-json", str(cj), "--sim-overrides", *tiny], **run)
    assert r.returncode == 0, r.stderr[-2000:]
    entries = json.loads(cj.read_text())["entries"]
    assert entries and all(e.get("fwd_s", e.get("gla_fwd_s", 0)) > 0 for e in entries)
    r = subprocess.run([sys.executable, "-m", "longseq.benchmarks.simulate", f"compute_json={cj}", *tiny, "validate=false",
                        f"out={out}", f"figures={tmp_path / 'fig'}", f"ledger_cache={tmp_path / 'cache.json'}"], **run)
    assert r.returncode == 0, r.stderr[-2000:]
    sim = json.loads(out.read_text())
    stdit = sim["stdit"]
    gla = sim["gla"]["rows"] + sim["gla"]["layer_sync"] + [sim["gla"]["single"]]
    assert stdit and all(rec["compute_source"] == "measured" for rec in stdit), [rec["compute_source"] for rec in stdit]
    assert gla and all(rec["compute_source"] == "measured" for rec in gla), [rec.get("compute_source") for rec in gla]
    assert "compute: measured (cpu" in r.stdout


# ----------------------------------------------------------------------------------------------
# FSDP2's collectives (benchmarks/costmodel/fsdp.py)
# ----------------------------------------------------------------------------------------------
def test_fsdp_bytes_follow_the_formulas():
    from longseq.benchmarks.costmodel.fsdp import FsdpCosts, fsdp_costs
    from longseq.models.gla import GLABlock, GLAForCausalLM, gla_config
    f = FsdpCosts(layers=6, layer_params=1000, root_params=300, world=8, param_bytes=2, reduce_bytes=4)
    assert f.all_gather_sent() == approx(1000 * 2 * 7 / 8)           # the shard n/W to W-1 peers
    assert f.all_gather_sent(root=True) == approx(300 * 2 * 7 / 8)
    assert f.reduce_scatter_sent() == approx(1000 * 4 * 7 / 8)       # n minus the own chunk, fp32
    assert f.calls == {"all_gather": 13, "reduce_scatter": 7}        # 2 per layer + root; 1 per layer + root
    assert f.bytes_per_step == approx(6 * (2 * 1750 + 3500) + 525 + 1050)
    t = f.times(UNIT)                                                # UNIT: a ring moves its bytes in bytes seconds
    assert (t["ag"], t["rs"], t["root_ag"], t["root_rs"]) == (approx(1750), approx(3500), approx(525), approx(1050))
    cfg = gla_config("tiny")
    g = fsdp_costs(cfg, GLABlock, GLAForCausalLM, world=4, param_bytes=2)
    layer = sum(p.numel() for p in GLABlock(cfg).parameters())
    assert g.layer_params == layer and g.layers == cfg.num_layers
    assert g.root_params + cfg.num_layers * layer == sum(p.numel() for p in GLAForCausalLM(cfg).parameters())
    assert FsdpCosts(4, 1000, 300, 1).bytes_per_step == 0             # one rank: nothing to gather


FSDP_T = dict(ag=1e-4, rs=2e-4, root_ag=5e-5, root_rs=7e-5)


def test_fsdp_prefetch_hides_all_but_the_first_gathers_and_last_scatters():
    """Compute >> collectives: only the root's and first layer's all-gather (forward and backward)
    and the last reduce-scatters are exposed; the rest is prefetched under the layers' compute."""
    P, L = 4, 6
    comp = _gla_comp(L=L)
    none = (None, 0, 0.0)
    out = gla_timeline("zeco", P, L, [comp] * P, H100, fwd=none, bwd=none, fsdp=FSDP_T)
    t = FSDP_T
    assert max(out["end"]) == approx(comp.total + t["root_ag"] + 2 * t["ag"] + t["rs"] + t["root_rs"], rel=1e-9)
    assert out["fsdp_s"] == approx(t["root_ag"] + 2 * L * t["ag"] + L * t["rs"] + t["root_rs"])
    # no compute to hide under: the lane's whole time is paid
    zero = _gla_comp(other=0.0, gla=0.0, L=L)
    out = gla_timeline("zeco", P, L, [zero] * P, H100, fwd=none, bwd=none, fsdp=FSDP_T)
    assert max(out["end"]) == approx(out["fsdp_s"], rel=1e-9)


def test_fsdp_bounds_the_lasp1_wavefront_to_one_layer():
    """FSDP's collectives span the SP ranks: with free collectives LASP-1's layers still pipeline,
    but a rank cannot start layer l+1 before every rank has started layer l, so the step lies
    between the free wavefront and a barrier per layer."""
    P, L, s = 4, 6, 36e6
    comp = _gla_comp(other=1e-3, gla=1e-3, L=L)
    d = ("send", 1, s)
    free = max(gla_timeline("lasp1", P, L, [comp] * P, H100, fwd=d, bwd=d)["end"])
    sync = max(gla_timeline("lasp1", P, L, [comp] * P, H100, fwd=d, bwd=d, layer_barrier=True)["end"])
    zero = dict.fromkeys(FSDP_T, 0.0)
    fsdp = max(gla_timeline("lasp1", P, L, [comp] * P, H100, fwd=d, bwd=d, fsdp=zero)["end"])
    assert free - 1e-12 <= fsdp <= sync + 1e-12
    # ZeCO's relay hides under its kernel either way: FSDP with free collectives costs it nothing
    z = ("send", 4, s)
    assert max(gla_timeline("zeco", P, L, [comp] * P, H100, fwd=z, bwd=z, fsdp=zero)["end"]) == approx(comp.total,
                                                                                                        rel=1e-9)
