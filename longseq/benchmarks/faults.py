"""Fault-injection table: every fault of docs/training.md "Faults" against an uninterrupted run.

    python -m longseq.benchmarks.faults                    # DSP/ST-DiT and ZeCO/GLA, every case (~10-15 min, 2 cores)
    python -m longseq.benchmarks.faults --models dsp --cases sigstop

Each case runs ``python -m longseq.train`` under ``torch.distributed.run`` (CPU, gloo, one thread a
process) in a fresh directory, injects its fault (``train.fault_kind``, signals from outside, or
damage to the files), lets torchrun restart or reruns with ``train.resume=auto`` as a user would,
and compares the logged losses with an uninterrupted run of the same seed, bit for bit. A row:
the case, what happened (restarted / stopped cleanly + the one-line reason), whether the final
losses are identical (or "refused": the case must end in one line on every rank, e.g. NaN weights,
a crafted checkpoint), whether a checkpoint that fails its manifest was ever loaded, wall time.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from longseq.launch import descendants

STEPS, EVERY = 8, 2
MODELS = {
    "dsp": ["model=stdit_tiny", "parallel=dsp", "model.sample.frames=4", "model.sample.height=8",
            "model.sample.width=8"],
    "zeco": ["model=gla_tiny", "parallel=zeco", "model.sample.seq_len=64", "data.num_samples=0"],
}
COMMON = [f"train.steps={STEPS}", f"train.checkpoint_every={EVERY}", "train.global_batch_size=4",
          "train.keep_checkpoints=0", "optim.warmup_steps=2", "train.log_every=1", "train.tensorboard=false"]
CASES = ("sigkill_worker", "sigkill_job", "kill_in_write", "sigstop", "corrupt_latest", "truncated_latest",
         "disk_full", "resume_path_restart", "rollback_crash", "nan_weights", "zip_full_disk", "crafted_checkpoint",
         "slow_write")
# Cases that must end refused with one line (no final losses to compare): what the line must say.
REFUSED = {"nan_weights": "NonFiniteError", "crafted_checkpoint": "UnsafeCheckpoint"}


def _env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        e.pop(k, None)
    return e


def _cmd(overrides, nproc: int, restarts: int = 0) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "--max-restarts", str(restarts), "-m", "longseq.train", *COMMON, *overrides]


def _run(overrides, nproc=2, restarts=0, timeout=300):
    t0 = time.monotonic()
    p = subprocess.run(_cmd(overrides, nproc, restarts), env=_env(), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=timeout)
    return p.returncode, p.stdout, time.monotonic() - t0


def _losses(out: Path) -> list:
    try:
        return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    except OSError:
        return []


def _latest(out: Path) -> int:
    try:
        return int((out / "checkpoints" / "latest").read_text().strip()[9:17])
    except (OSError, ValueError):
        return 0


def _stop_line(text: str) -> str:
    for line in text.splitlines():
        if "stopped:" in line:
            return line.split("stopped:", 1)[1].strip()[:110]
    return ""


def _copy_upto(src: Path, dst: Path, upto: int) -> None:
    shutil.copytree(src, dst)
    for f in (dst / "checkpoints").iterdir():
        if f.name.startswith("ckpt_step") and int(f.name[9:17]) > upto:
            f.unlink()
    (dst / "checkpoints" / "latest").write_text(f"ckpt_step{upto:08d}.pt\n")


_CRAFT = """
import sys, torch
from pathlib import Path
class Payload:
    def __reduce__(self):
        return (Path.touch, (Path(sys.argv[2]),))
torch.save({"format": 1, "step": 6, "data_position": 24, "model": {}, "x": Payload()}, sys.argv[1])
"""


def _raw(text: str) -> bool:
    """A worker's raw traceback (a frame in longseq), as opposed to torchrun's own failure report."""
    return bool(re.search(r'^(\[rank\d+\]:)?\s*File ".*longseq/', text, re.M))


def _lineage(out: Path) -> str:
    return json.loads((out / "checkpoints" / "run.json").read_text())["lineage"]


def case(name: str, model: str, ref_dir: Path, ref: list, tmp: Path) -> dict:
    base = MODELS[model] + ["parallel.sp_size=2"]
    out = tmp / f"{model}-{name}"
    od = f"train.out_dir={out}"
    row = {"model": model, "case": name}
    t0 = time.monotonic()
    text = ""
    if name == "sigkill_worker":            # one worker SIGKILLed at step 5; torchrun restarts the job
        rc, text, _ = _run(base + [od, "train.resume=auto", "train.fault_at_step=5", "train.fault_kind=sigkill"],
                           restarts=1)
        row["outcome"] = "restarted" if rc == 0 and "resumed from" in text else f"exit {rc}"
    elif name == "sigkill_job":             # launcher and workers SIGKILLed after a checkpoint; rerun auto
        job = subprocess.Popen(_cmd(base + [od, "train.resume=auto", "train.debug_sleep_s=0.3"], 2), env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 200
        while _latest(out) < EVERY + 1 and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        for pid in [job.pid] + descendants(job.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        job.wait()
        killed = _latest(out)
        rc, text, _ = _run(base + [od, "train.resume=auto"])
        row["outcome"] = f"killed after step {killed}, rerun resumed" if rc == 0 else f"exit {rc}"
    elif name == "kill_in_write":           # rank 0 SIGKILLed half-way through the step-4 checkpoint write
        rc, text, _ = _run(base + [od, "train.resume=auto", "train.fault_at_step=4", "train.fault_kind=kill_in_write"],
                           restarts=1)
        ok = rc == 0 and "removed 1 temporary file(s)" in text and "resumed from ckpt_step00000002.pt" in text
        row["outcome"] = "restarted, temp removed, resumed from step 2" if ok else f"exit {rc}"
    elif name == "sigstop":                 # one rank of 4 (SP 2 x DP 2) stops answering at step 5
        rc, text, took = _run(base + [od, "train.resume=auto", "train.fault_at_step=5", "train.fault_kind=sigstop",
                                      "train.fault_rank=3", "train.collective_timeout_s=10"], nproc=4, restarts=1)
        ok = rc == 0 and "CollectiveError" in text and "resumed from" in text
        row["outcome"] = ("peers timed out (10 s), restarted" if ok else f"exit {rc}")
        row["reason"] = _stop_line(text)
        ref_dir = ref_dir.parent / f"{model}-ref4"                 # compared with a 4-process run
    elif name in ("corrupt_latest", "truncated_latest"):
        _copy_upto(ref_dir, out, 6)
        p6 = out / "checkpoints" / "ckpt_step00000006.pt"
        raw = bytearray(p6.read_bytes())
        if name == "corrupt_latest":
            raw[len(raw) // 2: len(raw) // 2 + 4096] = b"\0" * 4096
        else:
            raw = raw[: len(raw) // 3]
        p6.write_bytes(bytes(raw))
        rc, text, _ = _run(base + [od, "train.resume=auto"])
        ok = rc == 0 and "resumed from ckpt_step00000004.pt" in text and "failed verification" in text
        row["outcome"] = "step 6 refused (manifest), resumed from step 4" if ok else f"exit {rc}"
    elif name == "disk_full":               # the step-4 checkpoint write fails with ENOSPC
        rc, text, _ = _run(base + [od, "train.resume=none", "train.fault_at_step=4", "train.fault_kind=disk_full"])
        stopped = rc != 0 and "CheckpointWriteError" in text and _latest(out) == 2
        row["reason"] = _stop_line(text)
        rc2, text2, _ = _run(base + [od, "train.resume=auto"])
        row["outcome"] = ("stopped cleanly, step 2 intact; rerun resumed" if stopped and rc2 == 0 else f"exit {rc}/{rc2}")
        text += text2
    elif name == "resume_path_restart":     # resume=PATH, then a worker dies: the restart continues its own lineage
        _copy_upto(ref_dir, out, 8)
        seed = out / "checkpoints" / "ckpt_step00000004.pt"
        for f in (out / "checkpoints").iterdir():          # the new lineage rewrites steps 6 and 8
            if f.name.startswith(("ckpt_step00000006", "ckpt_step00000008")):
                f.unlink()
        (out / "checkpoints" / "latest").unlink()
        rc, text, _ = _run(base + [od, f"train.resume={seed}", "train.fault_at_step=7", "train.fault_kind=sigkill",
                                   "train.keep_checkpoints=1"], restarts=1)
        ok = rc == 0 and "resumed from ckpt_step00000006.pt (step 6)" in text and seed.exists()
        row["outcome"] = "restarted from its own step 6, seed kept" if ok else f"exit {rc}"
    elif name == "rollback_crash":          # issue 22 item 2: resume=<A's step 4> (a new LR), crash at step 5
        _copy_upto(ref_dir, out, 8)                              # run A, to be abandoned: latest -> its step 8
        seed = out / "checkpoints" / "ckpt_step00000004.pt"
        fixed = ["optim.lr=0.002", f"train.resume={seed}"]
        clean = tmp / f"{model}-rollback-clean"                   # the same rollback, never interrupted
        _copy_upto(ref_dir, clean, 4)
        _run(base + [f"train.out_dir={clean}"] + fixed[:1] + [f"train.resume={clean / 'checkpoints' / seed.name}"])
        rc, text, _ = _run(base + [od] + fixed + ["train.fault_at_step=5", "train.fault_kind=sigkill"], restarts=1)
        rc2, text2, _ = _run(base + [od, "train.resume=auto", "optim.lr=0.002"])    # a manual rerun afterwards
        ok = rc == 0 and rc2 == 0 and "resuming lineage" in text and "nothing to do" in text2
        row["outcome"] = ("restart resumed the new lineage's seed (step 4), rerun: nothing to do" if ok
                          else f"exit {rc}/{rc2}")
        want_override = _losses(clean)
        text += text2
    elif name == "nan_weights":             # issue 22 item 3: a finite step, non-finite weights (as optim.eps=0 does)
        huge = ["optim.eps=0", "optim.warmup_steps=0"]           # 0/0 where a gradient is exactly zero (ST-DiT)
        rc, text, _ = _run(base + [od, "train.resume=none"] + huge)
        rc2, text2, _ = _run(base + [od, "train.resume=auto"] + huge)
        stopped = rc != 0 and rc2 != 0 and _latest(out) == 0 and not _raw(text + text2)
        row["outcome"] = ("stopped before any checkpoint, rerun too (no NaN checkpoint)" if stopped
                          else f"exit {rc}/{rc2}, latest {_latest(out)}")
        row["reason"] = _stop_line(text)
    elif name == "zip_full_disk":           # issue 22 item 5: ENOSPC under torch's zip writer (a RuntimeError)
        rc, text, _ = _run(base + [od, "train.resume=none", "train.fault_at_step=4", "train.fault_kind=disk_full_zip"])
        stopped = rc != 0 and text.count("stopped: CheckpointWriteError") == 2 and _latest(out) == 2
        row["reason"] = _stop_line(text)
        rc2, text2, _ = _run(base + [od, "train.resume=auto"])
        row["outcome"] = ("both ranks stopped cleanly, step 2 intact; rerun resumed" if stopped and rc2 == 0
                          else f"exit {rc}/{rc2}")
        text += text2
    elif name == "crafted_checkpoint":      # issue 22 item 1: a pickle payload in the checkpoint latest names
        _copy_upto(ref_dir, out, 6)
        marker = out / "payload_ran"
        p6 = out / "checkpoints" / "ckpt_step00000006.pt"
        subprocess.run([sys.executable, "-c", _CRAFT, str(p6), str(marker)], check=True, env=_env())
        from longseq.train.manifest import write_manifest       # the attacker rewrites the manifest too
        write_manifest(p6, lineage=_lineage(out), step=6)
        rc, text, _ = _run(base + [od, "train.resume=auto"])
        refused = rc != 0 and text.count("stopped: UnsafeCheckpoint") == 2 and not marker.exists()
        row["outcome"] = "refused on every rank, payload not run" if refused else \
            f"exit {rc}, payload {'RAN' if marker.exists() else 'not run'}"
        row["reason"] = _stop_line(text)
    elif name == "slow_write":              # issue 22 item 8: rank 0's write outlasts the collective timeout
        rc, text, _ = _run(base + [od, "train.resume=none", "train.fault_at_step=4", "train.fault_kind=slow_write",
                                   "train.collective_timeout_s=5"])
        named = rc != 0 and "rank 0's write" in text and not _raw(text)
        row["reason"] = _stop_line(text)
        rc2, text2, _ = _run(base + [od, "train.resume=auto"])
        row["outcome"] = ("stopped, the message names rank 0's write; rerun resumed" if named and rc2 == 0
                          else f"exit {rc}/{rc2}")
        text += text2
    row["wall_s"] = round(time.monotonic() - t0, 1)
    got = _losses(out)
    want = ref if name != "sigstop" else _losses(ref_dir)
    if name == "rollback_crash":
        want = want_override
    if name in REFUSED:
        row["identical"] = "refused" if REFUSED[name] in text and not _raw(text) else "NO"
        row["bad_loaded"] = False
        return row
    row["identical"] = bool(got) and got == want
    row["bad_loaded"] = "resumed from ckpt_step00000006.pt" in text and name in ("corrupt_latest", "truncated_latest")
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--json", default=None, help="also write the rows here")
    a = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="longseq-faults-"))
    rows = []
    try:
        for model in a.models:
            ref_dir = tmp / f"{model}-ref"
            rc, text, _ = _run(MODELS[model] + ["parallel.sp_size=2", f"train.out_dir={ref_dir}", "train.resume=none"])
            if rc != 0:
                print(text[-3000:])
                return 1
            if "sigstop" in a.cases:
                _run(MODELS[model] + ["parallel.sp_size=2", f"train.out_dir={tmp / (model + '-ref4')}",
                                      "train.resume=none"], nproc=4)
            ref = _losses(ref_dir)
            for c in a.cases:
                row = case(c, model, ref_dir, ref, tmp)
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nfault-injection table ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"{platform.node()}, {os.cpu_count()} CPUs, torch gloo, {STEPS} steps, checkpoint every {EVERY})\n")
    print("| model | case | outcome | final losses bit-identical | damaged checkpoint loaded | wall s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        reason = f" ({r['reason']})" if r.get("reason") else ""
        same = r["identical"] if isinstance(r["identical"], str) else ("yes" if r["identical"] else "NO")
        print(f"| {r['model']} | {r['case']} | {r['outcome']}{reason} | {same} | "
              f"{'YES' if r['bad_loaded'] else 'no'} | {r['wall_s']} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0 if all(r["identical"] in (True, "refused") and not r["bad_loaded"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
