"""longseq as a user installs it: ``pip install <wheel>`` (and ``pip install -e``) into a fresh venv
that does NOT see this machine's packages, then ``python -m longseq.train --nproc_per_node 2``
trains DSP and ZeCO 2 steps, from an empty directory and from the checkout root (where the
checkout's ``longseq/`` comes first on ``sys.path``).

Torch is the one thing not installed per session: ``pip install torch==2.13.0`` unpacks ~900 MB
(95 s on the loaded 2-core machine), so it is installed once into a torch-only venv cached under
``~/.cache/longseq-tests`` (``$LONGSEQ_TEST_CACHE``), and each fresh venv sees that venv's
site-packages through a ``.pth`` file: torch and its own requirements, nothing else. Everything
longseq declares (numpy, einops, hydra-core) is installed into the fresh venv by pip from the
wheel's metadata, so a missing ``install_requires`` entry fails here.

Wall time: measured once on the 2-core machine while 8 sessions loaded it (load average ~35): 17
minutes with the torch venv cached (venv + deps 81 s, six 2-step trainings on 2 processes 50-100 s
each, the editable install's isolated build ~200 s); the torch venv itself took 95 s to make. Not
yet measured on an idle machine.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCH = os.environ.get("LONGSEQ_TEST_TORCH", "torch==2.13.0")
PY = f"python{sys.version_info.major}.{sys.version_info.minor}"
pytestmark = pytest.mark.timeout(1500)     # the first test also makes the venvs (and, once, the torch venv)


def _sh(cmd, cwd, env, timeout=300):
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, timeout=timeout, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
    return p.returncode, p.stdout


def _ok(cmd, cwd, env, timeout=300):
    rc, out = _sh(cmd, cwd, env, timeout)
    assert rc == 0, f"{' '.join(map(str, cmd))} failed (exit {rc}):\n{out[-4000:]}"
    return out


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LONGSEQ_CONFIG_DIR", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_PROGRESS_BAR="off")
    return env


def _pip(py, *args, cwd, timeout=600):
    """The test's own pip, installing into the venv of ``py`` (the venvs have no pip of their own)."""
    return _ok([sys.executable, "-m", "pip", "--python", py, "install", "--no-compile", *args], cwd, _env(),
               timeout)


def _site(venv: Path) -> Path:
    return venv / "lib" / PY / "site-packages"


def _torch_site() -> Path:
    """site-packages of the cached torch-only venv (made once; a lock keeps concurrent sessions apart)."""
    cache = Path(os.environ.get("LONGSEQ_TEST_CACHE") or Path.home() / ".cache" / "longseq-tests")
    cache.mkdir(parents=True, exist_ok=True)
    venv = cache / f"{PY}-{TORCH.replace('=', '')}"
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (venv / ".complete").is_file():
            tmp = cache / (venv.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            _ok([sys.executable, "-m", "venv", "--without-pip", tmp], cache, _env())
            _pip(tmp / "bin" / "python", TORCH, cwd=cache, timeout=900)
            shutil.rmtree(venv, ignore_errors=True)
            os.rename(tmp, venv)              # site-packages paths hold no venv path: a rename is safe
            (venv / ".complete").write_text(TORCH + "\n")
    return _site(venv)


def _copy_tree(dst: Path) -> Path:
    """The tracked and new files of the checkout (no stale build/ or egg-info gets in)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for f in files:
        src = ROOT / f
        if src.is_symlink():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.readlink(src), dst / f)
        elif src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)
    return dst


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """(python of a fresh venv with the wheel installed, an empty work directory, the tmp root)."""
    tmp = tmp_path_factory.mktemp("wheel")
    torch_site = _torch_site()
    src = _copy_tree(tmp / "src")
    _ok([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-w", tmp / "dist"], src,
        _env())
    wheel, = (tmp / "dist").glob("longseq-*.whl")
    venv = tmp / "venv"
    _ok([sys.executable, "-m", "venv", "--without-pip", venv], tmp, _env())      # no --system-site-packages
    (_site(venv) / "_longseq_test_torch.pth").write_text(f"{torch_site}\n")
    py = venv / "bin" / "python"
    out = _ok([py, "-c", "import importlib.util as u; print([m for m in ('numpy', 'einops', 'hydra', 'diffusers', "
               "'fla', 'pytest') if u.find_spec(m)])"], tmp, _env())
    assert out.strip() == "[]", f"the fresh venv sees packages it should not: {out}"
    _pip(py, wheel, cwd=tmp)                                     # with the dependencies the wheel declares
    work = tmp / "work"
    work.mkdir()
    return py, work, tmp


def _train(py, cwd, out_dir, method):
    model = (["model=stdit_tiny", "parallel=dsp", "model.sample.frames=2"] if method == "dsp" else
             ["model=gla_tiny", "parallel=zeco", "model.sample.seq_len=32"])
    p = subprocess.run([str(py), "-m", "longseq.train", "--nproc_per_node", "2", *model, "parallel.sp_size=2",
                        "train.steps=2", "train.global_batch_size=2", f"train.out_dir={out_dir}",
                        "train.tensorboard=false", "train.progress=false", "train.resume=none"],
                       cwd=cwd, env=_env(), timeout=300, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert p.returncode == 0 and "done: 2 steps" in p.stdout, f"{method} from {cwd}:\n{p.stdout[-3000:]}"
    assert (out_dir / "metrics.jsonl").read_text().count("\n") == 2
    return p.stdout


def test_the_wheel_has_no_top_level_generic_names_and_optional_packages_fail_in_one_line(venv):
    py, work, _ = venv
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
for build in (latte.build, fla_gla.build):
    try:
        build()
    except longseq.optional.MissingDependency as e:
        print("ONE LINE:", e)
"""], work, _env())
    assert "IMPORTED" not in out and out.count("missing") == 4, out
    assert "/site-packages/longseq/" in out and str(ROOT) not in out, out
    assert "adapters longseq.adapters.latte longseq.adapters.fla_gla" in out
    assert "needs diffusers, which is not installed: pip install 'longseq[diffusers]'" in out, out
    assert "needs flash-linear-attention, which is not installed: pip install 'longseq[fla]'" in out, out


def test_the_benchmarks_run_installed(venv):
    py, work, _ = venv
    """The simulator's help, and its configs and cached results found in the package data."""
    out = _ok([py, "-c", "from longseq.benchmarks import simulate as s; print(s.data('benchmarks/results/"
               "ledger_cache.json').is_file(), s.load_config([]).stdit.presets); s.main(['--help'])"], work, _env())
    assert out.startswith("True ['720m', '3b']") and "python -m longseq.benchmarks.simulate" in out, out


@pytest.mark.parametrize("method", ["dsp", "zeco"])
def test_the_wheel_trains_from_an_empty_directory_and_from_the_checkout_root(venv, method):
    py, work, tmp = venv
    _train(py, work, tmp / f"runs-{method}-empty", method)
    _train(py, ROOT, tmp / f"runs-{method}-root", method)     # ./longseq (the checkout's) comes first here


def test_an_editable_install_trains(venv):
    py, work, tmp = venv
    tree = _copy_tree(tmp / "editable")
    _pip(py, "-e", tree, cwd=tmp)
    out = _ok([py, "-c", "import longseq; print(longseq.__file__)"], work, _env())
    assert out.strip() == str(tree / "longseq" / "__init__.py"), out
    _train(py, work, tmp / "editable-dsp", "dsp")
    _train(py, tree, tmp / "editable-zeco", "zeco")
