"""What a new user of ``python -m longseq.train`` meets: unknown keys and non-integers are errors
naming the fix, ``--cfg job`` works, the run says where its metrics and checkpoints go and prints an
ETA (switchable off), ``python -m longseq.plot`` draws the curves, and a resume applies the new
``train.steps`` / ``optim.*`` settings from its first step."""
from __future__ import annotations

import shutil
import sys

import pytest

from longseq.train.config import ConfigError, load_config, parse_args, validate
from longseq.train.loop import lr_factor, main
from tests import train_helpers as th


def _error(*overrides) -> str:
    with pytest.raises(ConfigError) as e:
        validate(load_config(list(overrides)), 1)
    return str(e.value)


def test_an_unknown_key_anywhere_names_the_closest_valid_one():
    msg = _error("+train.step=2")                       # Hydra's own advice after a typo
    assert "unknown config key 'train.step'" in msg and "did you mean train.steps?" in msg
    assert "did you mean model.sample.seq_len?" in _error("model=gla_tiny", "+model.sample.seq_lenn=8")
    msg = _error("train.stepz=5")
    assert "did you mean train.steps?" in msg and "+train.stepz" not in msg
    # keyword-argument dicts take any key
    assert load_config(["+parallel.options.num_blocks=2", "+model.overrides.depth=1"]).parallel.options.num_blocks == 2


def test_integers_must_be_integers():
    assert "train.steps=2.5 must be an integer: pass e.g. train.steps=2" in _error("train.steps=2.5")
    assert "must be an integer" in _error("train.global_batch_size=4.0")


def test_cfg_job_prints_the_config(capsys):
    assert parse_args(["--cfg", "job", "model=gla_tiny"]).overrides == ["model=gla_tiny"]
    assert parse_args(["--cfg", "model=gla_tiny"]).print_cfg
    assert main(["--cfg", "job", "model=gla_tiny"]) == 0
    assert "family: gla" in capsys.readouterr().out


BASE = ["model=stdit_tiny", "parallel=none", "model.sample.frames=2", "train.global_batch_size=2",
        "optim.warmup_steps=0", "optim.min_lr_ratio=0.1"]


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A 2-step run (lr 1e-2, cosine to 1e-3 at step 2) with its checkpoint, and its output."""
    out = tmp_path_factory.mktemp("run") / "run"
    p = th.run(BASE + ["train.steps=2", "optim.lr=1e-2", f"train.out_dir={out}", "train.resume=none"])
    return out, p.stdout


def test_the_run_says_where_things_go_and_prints_an_eta(two_steps, tmp_path):
    out, log = two_steps
    assert f"metrics -> {out / 'metrics.jsonl'}" in log and f"checkpoints -> {out / 'checkpoints'}" in log
    assert "step 2/2 |" in log and "| ETA 0s" in log
    quiet = th.run(BASE + ["train.steps=1", "train.progress=false", f"train.out_dir={tmp_path}"]).stdout
    assert "step 1/1" not in quiet and "ETA" not in quiet and "done: 1 steps" in quiet
    assert len(th.metrics(tmp_path)) == 1                 # metrics.jsonl still gets every step


def _resume(src, dst, *overrides):
    shutil.copytree(src, dst)
    th.run(BASE + ["optim.lr=1e-2", f"train.out_dir={dst}", "train.resume=auto", *overrides])
    return {r["step"]: r["lr"] for r in th.metrics(dst)}


def test_resume_with_more_steps_follows_the_new_schedule_from_its_first_step(two_steps, tmp_path):
    src, _ = two_steps
    lrs = _resume(src, tmp_path / "longer", "train.steps=6")
    for step in (3, 4, 5, 6):                           # the update after step-1 completed steps
        want = 1e-2 * lr_factor(step - 1, total=6, warmup=0, schedule="cosine", min_ratio=0.1)
        assert lrs[step] == pytest.approx(want, rel=1e-9), (step, lrs)


def test_resume_applies_new_optimizer_settings(two_steps, tmp_path):
    src, _ = two_steps
    lrs = _resume(src, tmp_path / "new_lr", "train.steps=4", "optim.lr=0.5", "optim.schedule=constant")
    assert lrs[3] == lrs[4] == 0.5
    from omegaconf import OmegaConf
    recorded = OmegaConf.load(tmp_path / "new_lr" / "config.yaml")     # what config.yaml says is what ran
    assert (recorded.optim.lr, recorded.optim.schedule) == (0.5, "constant")


def test_plot_draws_the_curves(two_steps, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from longseq.plot import main as plot_main
    out, _ = two_steps
    png = tmp_path / "curves.png"
    assert plot_main([str(out), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert plot_main([str(tmp_path / "nothing")]) == 2
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"python -m longseq.plot needs matplotlib, which is not installed: pip install 'longseq\[plot\]'"):
        from longseq.plot import plot_run
        plot_run(out)


def _launch(*overrides, timeout=180):
    """``python -m longseq.train --nproc_per_node 2 ...``: the entry checks the config, then starts torchrun."""
    import subprocess
    return subprocess.run([sys.executable, "-m", "longseq.train", "--nproc_per_node", "2", *th.FAST, *overrides],
                          cwd=th.ROOT, env=th.env(), timeout=timeout, capture_output=True, text=True)


def test_launcher_reports_a_config_error_once_before_any_worker_starts():
    p = _launch("model=stdit_tiny", "parallel=dsp", "parallel.sp_size=3")
    out = p.stdout + p.stderr
    assert p.returncode == 2, out
    assert out.count("config error: parallel.sp_size=3 does not divide the world size 2") == 1, out
    assert "Traceback" not in out and "ChildFailedError" not in out and "[rank" not in out, out


def test_launcher_trains_with_the_workers_it_starts(tmp_path):
    p = _launch(*BASE[2:], "model=stdit_tiny", "parallel=dsp", "parallel.sp_size=2", "train.steps=1",
                f"train.out_dir={tmp_path}", "train.resume=none")
    assert p.returncode == 0, p.stdout + p.stderr
    assert len(th.metrics(tmp_path)) == 1
