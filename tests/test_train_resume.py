"""Checkpoints and exact resume of `python -m longseq.train` (CPU, gloo, 2 processes, SP 2).

* a job SIGKILLed (launcher and workers, no clean-up anywhere) after a checkpoint, then relaunched
  with ``train.resume=auto``, logs exactly the losses of an uninterrupted run (bitwise: CPU, same
  thread count, same reduction order) and ends with the same weights;
* under ``torchrun --max-restarts 1``, a rank that dies mid-run (``train.fault_at_step``) makes
  torchrun restart the job, which resumes from the latest checkpoint and ends exactly like an
  uninterrupted run.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from tests import train_helpers as th

STEPS, EVERY = 8, 2
BASE = ["model=stdit_tiny", "parallel=dsp", "parallel.sp_size=2", "model.sample.frames=4", "model.sample.height=8",
        "model.sample.width=8", f"train.steps={STEPS}", f"train.checkpoint_every={EVERY}", "train.global_batch_size=2",
        "train.keep_checkpoints=0", "optim.warmup_steps=2"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    th.run(BASE + [f"train.out_dir={out}", "train.resume=none"], 2, timeout=120)
    losses = th.losses(out)
    assert len(losses) == STEPS
    return out, losses


def _same_weights(a_dir, b_dir):
    a, b = th.final_state(a_dir), th.final_state(b_dir)
    assert a["step"] == b["step"] == STEPS
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"parameter {k} differs"
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"optimizer state {k} differs"


def test_sigkill_then_resume_auto_is_exact(reference, tmp_path):
    ref_dir, ref = reference
    out = tmp_path / "run"
    job = th.start(BASE + [f"train.out_dir={out}", "train.resume=auto", "train.debug_sleep_s=0.4"], 2,
                   log_path=tmp_path / "killed.log")
    deadline = time.monotonic() + 120
    try:
        while th.latest_step(out) < EVERY:
            assert job.poll() is None, "the job ended before its first checkpoint:\n" + (tmp_path / "killed.log").read_text()
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
    finally:
        th.kill_job(job)
    killed_at = th.latest_step(out)
    assert EVERY <= killed_at < STEPS, f"the kill should land mid-run (latest checkpoint: step {killed_at})"
    assert len(th.losses(out)) < STEPS

    p = th.run(BASE + [f"train.out_dir={out}", "train.resume=auto"], 2, timeout=120)
    assert f"resumed from ckpt_step{killed_at:08d}.pt" in p.stdout, p.stdout[-3000:]
    got = th.losses(out)
    assert got == ref, f"losses after resume differ from the uninterrupted run:\n{ref}\n{got}"
    assert [r["step"] for r in th.metrics(out)] == list(range(1, STEPS + 1))
    _same_weights(ref_dir, out)
    # Nothing half-written is left behind under a final name; `latest` names the final checkpoint.
    names = sorted(f.name for f in (out / "checkpoints").iterdir())
    assert (out / "checkpoints" / "latest").read_text().strip() == f"ckpt_step{STEPS:08d}.pt"
    assert all(n in ("latest", "run.json") or n.startswith("ckpt_step") for n in names), names   # no temporaries


def test_torchrun_restart_after_rank_failure_is_exact(reference, tmp_path):
    ref_dir, ref = reference
    out = tmp_path / "run"
    fault = 5                          # after the checkpoint of step 4
    p = th.run(BASE + [f"train.out_dir={out}", "train.resume=auto", f"train.fault_at_step={fault}",
                       "train.fault_rank=1"], 2, torchrun_args=["--max-restarts", "1"], timeout=180)
    assert "fault injection: rank 1 exits at step 5" in p.stdout, p.stdout[-3000:]
    assert "resumed from ckpt_step00000004.pt (step 4)" in p.stdout, p.stdout[-3000:]
    assert (Path(out) / f".fault_fired_step{fault}_rank1").exists()
    got = th.losses(out)
    assert got[-1] == ref[-1] and got == ref, f"{ref}\n{got}"
    _same_weights(ref_dir, out)


def test_resume_of_a_finished_run_does_nothing(reference, tmp_path):
    """Also: the replicated checkpoint loads on another layout (here one plain process)."""
    ref_dir, ref = reference
    p = th.run(BASE + [f"train.out_dir={ref_dir}", "train.resume=auto", "parallel.sp_size=1"], 1, timeout=120)
    assert "resumed from ckpt_step00000008.pt (step 8)" in p.stdout and "nothing to do" in p.stdout
    assert th.losses(ref_dir) == ref


def _copy_run(src, dst, upto):
    """The run directory as it stood after step ``upto``: its checkpoints up to there, its metrics."""
    import shutil
    shutil.copytree(src, dst)
    for f in (dst / "checkpoints").iterdir():
        if f.name.startswith("ckpt_step") and int(f.name[9:17]) > upto:
            f.unlink()
    (dst / "checkpoints" / "latest").write_text(f"ckpt_step{upto:08d}.pt\n")


def test_a_damaged_latest_checkpoint_resumes_from_the_newest_good_one(reference, tmp_path):
    ref_dir, ref = reference
    out = tmp_path / "run"
    _copy_run(ref_dir, out, 6)
    p6 = out / "checkpoints" / "ckpt_step00000006.pt"
    raw = bytearray(p6.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 4096] = b"\x00" * 4096           # loads without error, wrong weights
    p6.write_bytes(bytes(raw))
    (out / "checkpoints" / ".ckpt_step00000008.pt.tmp.999").write_bytes(b"torn")
    p = th.run(BASE + [f"train.out_dir={out}", "train.resume=auto"], 2, timeout=120)
    assert "ckpt_step00000006.pt: file ckpt_step00000006.pt has sha256" in p.stdout, p.stdout[-3000:]
    assert "resumed from ckpt_step00000004.pt (step 4)" in p.stdout
    assert "removed 1 temporary file(s)" in p.stdout
    assert th.losses(out) == ref
    _same_weights(ref_dir, out)


def test_strict_resume_refuses_a_damaged_latest_checkpoint(reference, tmp_path):
    ref_dir, _ = reference
    out = tmp_path / "run"
    _copy_run(ref_dir, out, 6)
    (out / "checkpoints" / "ckpt_step00000006.pt").write_bytes(b"")
    p = th.run(BASE + [f"train.out_dir={out}", "train.resume=strict"], 2, timeout=120, check=False)
    assert p.returncode != 0
    assert p.stdout.count("stopped: CheckpointCorrupt: train.resume=strict: ckpt_step00000006.pt: file "
                          "ckpt_step00000006.pt has 0 bytes") == 1, p.stdout[-3000:]   # rank 0 says it


def test_a_full_disk_stops_cleanly_with_the_previous_checkpoint_intact(reference, tmp_path):
    ref_dir, ref = reference
    out = tmp_path / "run"
    p = th.run(BASE + [f"train.out_dir={out}", "train.resume=none", "train.fault_at_step=4",
                       "train.fault_kind=disk_full"], 2, timeout=120, check=False)
    assert p.returncode != 0
    line = "stopped: CheckpointWriteError: rank 0: writing the checkpoint of step 4"
    assert p.stdout.count(line) == 1 and "the previous checkpoint ckpt_step00000002.pt is intact" in p.stdout, \
        p.stdout[-3000:]
    names = sorted(f.name for f in (out / "checkpoints").iterdir())
    assert names == ["ckpt_step00000002.pt", "ckpt_step00000002.pt.manifest.json", "latest", "run.json"], names
    # space freed: the same command resumes and ends exactly like the uninterrupted run
    th.run(BASE + [f"train.out_dir={out}", "train.resume=auto"], 2, timeout=120)
    assert th.losses(out) == ref


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_a_non_finite_loss_on_one_rank_is_agreed_on(reference, tmp_path, mode):
    ref_dir, ref = reference
    out = tmp_path / "run"
    p = th.run(BASE + [f"train.out_dir={out}", "train.resume=none", "train.fault_at_step=3", "train.fault_kind=nan",
                       "train.fault_rank=1", f"train.on_nonfinite={mode}", "train.steps=4"], 2, timeout=120,
               check=False)
    if mode == "stop":
        assert p.returncode != 0 and p.stdout.count("stopped: NonFiniteError") == 1, p.stdout[-3000:]
        assert "lower optim.lr" in p.stdout and th.latest_step(out) == 2     # nothing written from the NaN state
    else:
        assert p.returncode == 0 and "update skipped" in p.stdout, p.stdout[-3000:]
        rows = th.metrics(out)
        assert [r.get("skipped", False) for r in rows] == [False, False, True, False]
        assert th.losses(out)[:2] == ref[:2]
        st = th.final_state(out)
        assert all(torch.isfinite(v).all() for v in st["model"].values())
