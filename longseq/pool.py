"""Run a function on N gloo processes on 127.0.0.1 and collect each rank's result (the process pool
the tests and the benchmarks share; installed with the package, so ``python -m longseq.benchmarks.*``
runs from any directory).

``DistributedPool(n)`` starts n spawned workers that join one process group once and then run
functions sent to them, so a test class pays the start-up once. ``pool.run(fn, *args)`` returns the
list of per-rank results, or raises ``DistributedTestError`` with the failing rank's traceback, or
``DistributedTimeout`` when a rank hangs or dies; the pool is then torn down and restarted on the
next call, so one broken test never blocks the run. ``fn(*args)`` must be importable (module level);
inside it, ``torch.distributed`` is initialised (world = the pool) and results are returned with
``torch.save`` so tensors of any kind come back.
"""
from __future__ import annotations

import datetime
import io
import multiprocessing as mp
import os
import queue
import time
import traceback
from typing import Any, Callable

from longseq.launch import free_port

__all__ = ["DistributedPool", "DistributedTestError", "DistributedTimeout", "run_distributed"]


class DistributedTestError(RuntimeError):
    """A rank raised; the message holds its traceback."""


class DistributedTimeout(RuntimeError):
    """A rank hung past the timeout or died without reporting."""


def _worker(rank: int, world: int, port: int, backend: str, inbox, outbox, pg_timeout: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=pg_timeout))
    outbox.put((rank, "ready", None))
    while True:
        task = inbox.get()
        if task is None:
            break
        call_id, fn, args, kwargs = task
        try:
            result = fn(*args, **kwargs)
            buf = io.BytesIO()
            torch.save(result, buf)
            outbox.put((rank, "ok", (call_id, buf.getvalue())))
        except BaseException:  # noqa: BLE001 - report everything, the parent decides
            outbox.put((rank, "err", (call_id, traceback.format_exc())))
    dist.destroy_process_group()


class DistributedPool:
    """``world_size`` gloo workers on 127.0.0.1, reused across calls."""

    def __init__(self, world_size: int, *, backend: str = "gloo", timeout: float = 120.0, start_timeout: float = 120.0):
        self.world_size, self.backend, self.timeout, self.start_timeout = world_size, backend, timeout, start_timeout
        self._procs: list = []
        self._calls = 0

    # -- life cycle -------------------------------------------------------------------------
    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self._out = ctx.Queue()
        self._ins = [ctx.Queue() for _ in range(self.world_size)]
        port = free_port()
        self._procs = [
            ctx.Process(target=_worker, args=(r, self.world_size, port, self.backend, self._ins[r], self._out,
                                              max(self.timeout, 30.0)), daemon=True)
            for r in range(self.world_size)
        ]
        for p in self._procs:
            p.start()
        ready = set()
        deadline = time.monotonic() + self.start_timeout
        while len(ready) < self.world_size:
            rank, kind, _ = self._get(deadline, "start-up")
            ready.add(rank)

    def close(self) -> None:
        for q, p in zip(getattr(self, "_ins", []), self._procs):
            if p.is_alive():
                try:
                    q.put(None)
                except Exception:
                    pass
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self._procs = []

    def _kill(self) -> None:
        for p in self._procs:
            if p.is_alive():
                p.kill()
        for p in self._procs:
            p.join(timeout=5)
        self._procs = []

    def __enter__(self) -> "DistributedPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- calls ----------------------------------------------------------------------------
    def _get(self, deadline: float, what: str):
        while True:
            dead = [r for r, p in enumerate(self._procs) if p.exitcode is not None]
            if not dead:
                try:
                    return self._out.get(timeout=0.2)
                except queue.Empty:
                    pass
            if dead:
                codes = {r: self._procs[r].exitcode for r in dead}
                self._kill()
                raise DistributedTimeout(f"{what}: rank(s) {dead} died (exit codes {codes}) without reporting")
            if time.monotonic() > deadline:
                self._kill()
                raise DistributedTimeout(f"{what}: no answer from every rank within the timeout; ranks were killed")

    def run(self, fn: Callable, *args: Any, timeout: float | None = None, **kwargs: Any) -> list:
        """Run ``fn(*args, **kwargs)`` on every rank; return the results in rank order."""
        import torch

        if not self._procs or any(p.exitcode is not None for p in self._procs):
            self._kill()
            self._start()
        self._calls += 1
        call_id = self._calls
        for q in self._ins:
            q.put((call_id, fn, args, kwargs))
        results: dict[int, Any] = {}
        deadline = time.monotonic() + (timeout or self.timeout)
        name = getattr(fn, "__qualname__", str(fn))
        while len(results) < self.world_size:
            rank, kind, payload = self._get(deadline, f"{name} on {self.world_size} ranks")
            cid, data = payload
            if cid != call_id:
                continue
            if kind == "err":
                time.sleep(0.2)  # a peer that died is the cause: report the death rather than its echo
                dead = [r for r, p in enumerate(self._procs) if p.exitcode is not None]
                if dead:
                    self._kill()
                    raise DistributedTimeout(f"{name}: rank(s) {dead} died; rank {rank} then failed:\n{data}")
                self._kill()  # the other ranks may be stuck in a collective
                raise DistributedTestError(f"rank {rank} of {self.world_size} failed in {name}:\n{data}")
            results[rank] = torch.load(io.BytesIO(data), weights_only=False)
        return [results[r] for r in range(self.world_size)]


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 120.0, **kwargs: Any) -> list:
    """One-shot: start ``world_size`` processes, run ``fn`` once, stop them."""
    with DistributedPool(world_size, timeout=timeout) as pool:
        return pool.run(fn, *args, **kwargs)
