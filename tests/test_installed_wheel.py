"""longseq as an installed library: a wheel of the checkout installed (not editable) into a fresh
venv, used from a directory outside the checkout. The venv sees this test process's site-packages
(torch, hydra, einops) through a .pth file; nothing adds the checkout to sys.path."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _sh(cmd, cwd, env, timeout=180):
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, timeout=timeout, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
    return p.returncode, p.stdout


def _ok(cmd, cwd, env, timeout=180):
    rc, out = _sh(cmd, cwd, env, timeout)
    assert rc == 0, f"{' '.join(map(str, cmd))} failed (exit {rc}):\n{out[-4000:]}"
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python of the fresh venv, a work directory outside the checkout, env)."""
    tmp = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE", "LONGSEQ_CONFIG_DIR")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PIP_DISABLE_PIP_VERSION_CHECK="1")
    # Build from a copy of the tracked and new files, so no stale build/ of the checkout gets in.
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    src = tmp / "src"
    for f in files:
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    _ok([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-w", tmp / "dist"], src, env)
    wheel, = (tmp / "dist").glob("longseq-*.whl")
    venv = tmp / "venv"
    _ok([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], tmp, env)
    py = venv / "bin" / "python"
    site = Path(_ok([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp, env).strip())
    seen = [p for p in sys.path if p.endswith("-packages") and Path(p).is_dir()] + [sysconfig.get_paths()["purelib"]]
    (site / "zz_test_venv.pth").write_text("\n".join(dict.fromkeys(seen)) + "\n")
    _ok([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", wheel], tmp, env)
    work = tmp / "work"
    work.mkdir()
    return py, work, env


def test_the_wheel_has_no_top_level_generic_names(installed):
    py, work, env = installed
    out = _ok([py, "-c", """
import importlib, longseq
print("longseq from", longseq.__file__)
for name in ("dsp", "zeco", "models", "benchmarks"):
    try:
        importlib.import_module(name)
        print("IMPORTED", name)
    except ModuleNotFoundError:
        print("missing", name)
from longseq.adapters import latte, fla_gla
from longseq import dsp, zeco
from longseq.models import register_model
print("adapters", latte.__name__, fla_gla.__name__)
"""], work, env)
    assert "IMPORTED" not in out and out.count("missing") == 4, out
    assert "/site-packages/longseq/" in out and str(ROOT) not in out, out
    assert "adapters longseq.adapters.latte longseq.adapters.fla_gla" in out


def test_the_benchmarks_run_installed(installed):
    py, work, env = installed
    """The simulator's help, and its configs and cached results found in the package data."""
    out = _ok([py, "-c", "from longseq.benchmarks import simulate as s; print(s.data('benchmarks/results/"
               "ledger_cache.json').is_file(), s.load_config([]).stdit.presets); s.main(['--help'])"], work, env)
    assert out.startswith("True ['720m', '3b']") and "python -m longseq.benchmarks.simulate" in out, out


@pytest.mark.parametrize("overrides", [
    ["model=stdit_tiny", "parallel=dsp", "parallel.sp_size=2", "model.sample.frames=2"],
    ["model=gla_tiny", "parallel=zeco", "parallel.sp_size=2", "model.sample.seq_len=32"],
])
def test_two_training_steps_under_torchrun_from_outside_the_checkout(installed, overrides):
    py, work, env = installed
    out_dir = work / overrides[1].replace("=", "-")
    out = _ok([py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "longseq.train",
               *overrides, "train.steps=2", "train.global_batch_size=2", f"train.out_dir={out_dir}",
               "train.tensorboard=false", "train.progress=false", "train.resume=none"], work, env, timeout=240)
    assert "done: 2 steps" in out, out[-3000:]
    assert (out_dir / "metrics.jsonl").read_text().count("\n") == 2
