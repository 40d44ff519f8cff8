"""The modelled link of longseq.comm (debug option): off by default, the delay happens, the ledger's
bytes do not change, and an overlapped isend/irecv hides it under compute.

Timing bounds are loose on purpose (the machine is shared): the delays are sleeps, which need no
CPU, and each assertion leaves a margin of at least a third of the quantity it checks.
"""
import math
import time

import pytest
import torch
import torch.distributed as dist

from longseq import comm
from longseq.ledger import LEDGER

ALPHA = 0.15      # seconds per message: large against gloo's loopback latency even under load
COMPUTE = 0.30    # the "local kernel" the transfer overlaps with (a sleep: needs no core)


def _bytes(rec) -> list:
    return sorted((r.op, r.tag, r.bytes_sent, r.bytes_recv) for r in rec)


def _blocking(alpha):
    """A send/recv pair and an all-reduce, timed, with and without the model; ledger rows of each."""
    me = dist.get_rank()
    x = torch.arange(1000, dtype=torch.float32)
    out = {}
    for name, a in (("off", None), ("on", alpha)):
        with comm.modelled_link(a, 1e9), LEDGER.recording() as rec:
            dist.barrier()
            t0 = time.monotonic()
            if me == 0:
                comm.send(x, 1, None, tag="t.p2p")
            else:
                got = comm.recv(x.shape, x.dtype, 0, None, tag="t.p2p")
                assert torch.equal(got, x)
            t1 = time.monotonic()
            y = comm.all_reduce(torch.ones(4), None, tag="t.ar")
            t2 = time.monotonic()
        assert torch.equal(y, torch.full((4,), 2.0))
        out[name] = dict(p2p_s=t1 - t0, ar_s=t2 - t1, rows=_bytes(rec))
    return out


def _overlap(alpha, compute):
    """Rank 1 posts irecv, computes, then waits (overlapped); then recv-then-compute (serial)."""
    me = dist.get_rank()
    x = torch.ones(256)
    res = {}
    with comm.modelled_link(alpha):
        for mode in ("overlapped", "serial"):
            dist.barrier()
            t0 = time.monotonic()
            if me == 0:
                comm.isend(x, 1, None, tag="t.ov").wait()
            else:
                buf = torch.empty(256)
                w = comm.irecv(buf, 0, None, tag="t.ov")
                if mode == "serial":
                    w.wait()
                time.sleep(compute)            # the local work
                w.wait()
                assert torch.equal(buf, x)
            res[mode] = time.monotonic() - t0
    return res


def test_link_model_off_by_default():
    assert comm.link_model() is None
    assert comm.set_link_model(0.001, 1e9) is None
    assert comm.link_model() == comm.LinkModel(0.001, 1e9)
    assert comm.set_link_model(None) == comm.LinkModel(0.001, 1e9)
    assert comm.link_model() is None
    with pytest.raises(ValueError):
        comm.LinkModel(-1.0)
    m = comm.LinkModel(1e-3, 1e9)
    assert math.isclose(m.message_s(1e6), 2e-3)
    assert math.isclose(m.collective_s("all_gather", 4, 1e6), 3 * 2e-3)


def test_link_model_delays_not_bytes_and_hides_under_compute(dist_pool):
    pool = dist_pool(2)
    blocking = pool.run(_blocking, ALPHA)
    for r, res in enumerate(blocking):
        # the same ledger rows (bytes) with the model on and off
        assert res["on"]["rows"] == res["off"]["rows"], f"rank {r}: the link model changed the ledger"
        assert res["on"]["rows"], "nothing recorded"
        # the modelled delay happened: one message ALPHA + 4 KB / 1 GB/s; the all-reduce 2 * ALPHA (P = 2)
        assert res["on"]["p2p_s"] >= ALPHA * 0.95, res
        assert res["on"]["ar_s"] >= 2 * ALPHA * 0.95, res
        assert res["off"]["p2p_s"] < res["on"]["p2p_s"]
    ov = pool.run(_overlap, ALPHA * 2, COMPUTE)[1]
    # serial: transfer + compute; overlapped: about max(transfer, compute) = COMPUTE, far below the sum
    assert ov["serial"] >= 2 * ALPHA + COMPUTE - 0.02, ov
    assert ov["overlapped"] < 0.8 * (2 * ALPHA + COMPUTE), ov
    assert ov["overlapped"] >= COMPUTE - 0.01, ov
