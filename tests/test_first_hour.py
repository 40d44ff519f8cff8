"""What a newcomer meets in the first hour (issue 21), beyond the install (tests/test_installed_wheel.py)
and the docs' code (tests/test_docs_snippets.py): one line per clean error and per Ctrl-C under the
documented launch (``python -m longseq.train --nproc_per_node N``) and under torchrun's workers; a
missing optional package named by its extra; no alarming warnings; ``--help`` from the registries."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

from longseq.train.config import ConfigError, load_config, usage, validate
from tests import train_helpers as th

PY = sys.executable
DSP = ["model=stdit_tiny", "parallel=dsp", "parallel.sp_size=2", "model.sample.frames=2", "train.global_batch_size=2",
       "train.tensorboard=false", "train.timeout_s=120"]


def _launch(args, *, env=None, timeout=240):
    p = subprocess.run([PY, "-m", "longseq.train", "--nproc_per_node", "2", *args], cwd=th.ROOT,
                       env={**th.env(), **(env or {})}, timeout=timeout, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
    return p.returncode, p.stdout


# -- one line per clean error, and a kernel backend is not blamed on the plan ----------------------
def test_a_worker_side_stop_is_one_line_under_the_launcher(tmp_path):
    """LONGSEQ_KERNELS=triton on CPU stops at the first switch; before, the DSP plan wrapped it in a
    PlanError that blamed the plan, on every rank, followed by the launcher's summary."""
    rc, out = _launch(DSP + ["train.steps=1", f"train.out_dir={tmp_path}", "train.resume=none"],
                      env={"LONGSEQ_KERNELS": "triton", "TRITON_INTERPRET": "0"})
    lines = [ln for ln in out.splitlines() if "longseq.train:" in ln and "[longseq.train]" not in ln]
    assert rc == 3 and len(lines) == 1, out[-3000:]
    assert "stopped: SetupError: LONGSEQ_KERNELS=triton cannot run on cpu" in lines[0], out[-3000:]
    assert "PlanError" not in out and "Traceback" not in out and "workers failed" not in out, out[-3000:]


def test_a_missing_triton_names_the_extra(monkeypatch):
    import torch

    from longseq import kernels
    from longseq.optional import MissingDependency, SetupError, missing, require
    for name in ("triton", "triton.language"):          # also when an earlier test imported it
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setenv("LONGSEQ_KERNELS", "triton")
    with pytest.raises(SetupError, match=r"needs triton, which is not installed: pip install 'longseq\[gpu\]'"):
        kernels.backend_for(torch.device("cpu"))
    assert missing("triton", what="x") == "x needs triton, which is not installed: pip install 'longseq[gpu]'"
    with pytest.raises(MissingDependency) as e:
        require("triton.language", what="the kernels")
    assert "\n" not in str(e.value) and isinstance(e.value, ImportError)


def test_the_megatron_example_names_the_extra_of_a_missing_model_package():
    code = ("import sys, runpy; sys.modules['diffusers'] = None; sys.argv = ['megatron_style_train.py', '--model', "
            "'latte']; runpy.run_path('examples/megatron_style_train.py', run_name='__main__')")
    p = subprocess.run([PY, "-c", code], cwd=th.ROOT, env=th.env(), timeout=120, capture_output=True, text=True)
    out = p.stdout + p.stderr
    assert p.returncode == 2 and out.strip().splitlines() == [
        "megatron_style_train.py: --model latte needs diffusers, which is not installed: pip install "
        "'longseq[diffusers]'"], out


# -- Ctrl-C: one line with the step to resume from, both launch ways ------------------------------
def _interrupt(cmd, out_dir, after_step=2, timeout=240):
    """Start a slow run in its own process group with SIGINT's default action (a shell's
    background jobs ignore it), SIGINT the whole group once ``after_step`` was logged."""
    p = subprocess.Popen(cmd, cwd=th.ROOT, env=th.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    try:
        for line in p.stdout:
            seen.append(line)
            if re.search(rf"step +{after_step}/", line):
                os.killpg(p.pid, signal.SIGINT)
                break
        rest, _ = p.communicate(timeout=timeout)
    finally:
        th.kill_job(p)
    return p.returncode, "".join(seen), rest


SLOW = DSP + ["train.steps=40", "train.checkpoint_every=1", "train.debug_sleep_s=0.3", "train.resume=none"]
RESUME = re.compile(r"longseq\.train: interrupted \(SIGINT\) after step (\d+); to resume from step (\d+) "
                    r"\(checkpoints/ckpt_step0*\2\.pt\), rerun with train\.resume=auto")


@pytest.mark.parametrize("launch", ["launcher", "torchrun"])
def test_ctrl_c_stops_every_rank_with_one_line_naming_the_step_to_resume_from(tmp_path, launch):
    args = SLOW + [f"train.out_dir={tmp_path}"]
    cmd = ([PY, "-m", "longseq.train", "--nproc_per_node", "2", *args] if launch == "launcher" else
           [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "longseq.train", *args])
    rc, before, after = _interrupt(cmd, tmp_path)
    assert RESUME.findall(after) and len(RESUME.findall(after)) == 1, after[-3000:]
    done, resume = (int(v) for v in RESUME.search(after).groups())
    assert done >= 2 and resume in (done - 1, done) and resume == th.latest_step(tmp_path), after[-3000:]
    assert "KeyboardInterrupt" not in after and "[rank" not in after, after[-3000:]
    if launch == "launcher":                     # torchrun's own agent adds its SignalException report
        assert rc == 130 and after.strip().splitlines() == [RESUME.search(after).group(0)], after[-3000:]


# -- no alarming warnings; the header, the ledger flag --------------------------------------------
def test_an_fsdp_bf16_run_on_latents_prints_no_warning_and_no_ledger_table(tmp_path):
    from longseq.train.data import write_latent_sample
    rng = np.random.default_rng(0)
    for i in range(2):       # float32 latents read whole: the slice of the memory map is a read-only view
        write_latent_sample(tmp_path / "lat", f"s{i}", rng.standard_normal((4, 2, 16, 16)).astype(np.float32),
                            rng.standard_normal((6, 16)).astype(np.float32))
    out_dir = tmp_path / "run"
    rc, out = _launch(DSP + ["data=latents", f"data.path={tmp_path / 'lat'}", "parallel.fsdp=full",
                             "parallel.fsdp_param_dtype=bf16", "train.steps=2", f"train.out_dir={out_dir}",
                             "train.resume=none"], env={"PYTHONWARNINGS": "default"})
    assert rc == 0, out[-3000:]
    assert "returned a view tensor" not in out and "not writable" not in out, out[-3000:]
    assert "| precision bf16 (FSDP2 parameters" in out, out[-3000:]
    assert "summed over all ranks" not in out and f"ledger of this run -> {out_dir / 'ledger.txt'}" in out
    assert "all_to_all" in (out_dir / "ledger.txt").read_text()


# -- smaller things ------------------------------------------------------------------------------
def test_help_lists_every_preset_and_method_of_the_registries():
    from longseq import methods
    text = usage()
    for preset in ("gdn_tiny", "hybrid_tiny", "hybrid_1b", "stdit_3b", "gla_tiny"):
        assert preset in text, text
    for name in methods.method_names():
        assert re.search(rf"\b{name}\b", text), (name, text)
    assert "allgather (gdn, hf_causal_lm)" in text and "zeco (gla, gdn, hf_causal_lm)" in text and "the checkout" not in text


def test_comm_volume_says_how_many_processes_it_starts(monkeypatch, capsys):
    from longseq.benchmarks import comm_volume as cv
    monkeypatch.setattr(cv, "count", lambda P, precision: pytest.fail("stop here") if P > 2 else None)
    monkeypatch.setattr(cv, "analyse", lambda P, counted: [])
    with pytest.raises(pytest.fail.Exception):
        cv.main(["--worlds", "2", "8"])
    out = capsys.readouterr().out
    assert "P=2: starting 2 gloo processes" in out and "P=8: starting 8 gloo processes" in out


def test_one_element_is_singular():
    cfg = load_config(["model=stdit_tiny", "parallel=dsp", "parallel.sp_size=2", "model.sample.frames=1",
                       "train.global_batch_size=1"])
    with pytest.raises(ConfigError, match=r"has 1 element, fewer than"):
        validate(cfg, 2)
