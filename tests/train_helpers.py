"""Helpers for the tests of ``python -m longseq.train``: launch it (plain or under torchrun) in a
subprocess with a timeout, and read back what a run wrote."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from longseq.launch import descendants

ROOT = Path(__file__).resolve().parents[1]

# Small and fast: every test run uses these unless it overrides them.
FAST = ["train.log_every=1", "train.tensorboard=false", "train.timeout_s=120"]


def env() -> dict:
    e = dict(os.environ)
    e["OMP_NUM_THREADS"] = "1"
    e.pop("RANK", None)
    e.pop("WORLD_SIZE", None)
    return e


def command(overrides, nproc: int = 1, torchrun_args=()) -> list:
    if nproc == 1 and not torchrun_args:
        return [sys.executable, "-m", "longseq.train", *FAST, *overrides]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            *torchrun_args, "-m", "longseq.train", *FAST, *overrides]


def run(overrides, nproc: int = 1, *, timeout: float = 120, torchrun_args=(), check: bool = True):
    """Run a training job to completion; returns the CompletedProcess (stdout+stderr in .stdout)."""
    p = subprocess.run(command(overrides, nproc, torchrun_args), cwd=ROOT, env=env(), timeout=timeout,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"training run failed (exit {p.returncode}):\n{p.stdout[-6000:]}")
    return p


def start(overrides, nproc: int = 1, *, log_path=None):
    """Start a job in the background (its own session); returns the Popen."""
    out = open(log_path, "w") if log_path else subprocess.DEVNULL
    return subprocess.Popen(command(overrides, nproc), cwd=ROOT, env=env(), stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)


def kill_job(proc: subprocess.Popen) -> list:
    """SIGKILL a launched job: the launcher and every process under it (torchrun starts its workers
    in sessions of their own, so they are found by walking /proc). Returns the pids killed."""
    pids = [proc.pid] + descendants(proc.pid)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    for pid in pids[1:]:
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
    return pids


def metrics(out_dir) -> list:
    path = Path(out_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(out_dir) -> list:
    return [r["loss"] for r in metrics(out_dir)]


def latest_step(out_dir) -> int:
    ptr = Path(out_dir) / "checkpoints" / "latest"
    try:
        name = ptr.read_text().strip()
    except OSError:
        return 0
    return int(name[len("ckpt_step"):-len(".pt")]) if name else 0


def final_state(out_dir) -> dict:
    import torch
    ckpt = Path(out_dir) / "checkpoints" / (Path(out_dir) / "checkpoints" / "latest").read_text().strip()
    return torch.load(ckpt, map_location="cpu", weights_only=False)
