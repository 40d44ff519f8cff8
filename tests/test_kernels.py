"""longseq.kernels: the PyTorch path against slicing, the backend choice and its errors, the shared
layout, and, in subprocesses, the Triton kernels under TRITON_INTERPRET=1 bit for bit against the
PyTorch path plus a subset of the switch / All-Scan / equivalence tests with each backend forced."""
import itertools
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from longseq import kernels as K
from longseq.kernels import layout
from longseq.kernels import reference as R
from longseq.sharding import split_sizes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the representative subset of existing tests run with a forced backend (P <= 3, small shapes):
# the switch's values, strided input and ledger volumes; its autograd (float64 gradcheck across
# ranks); ST-DiT forward+backward against one process and its ledger; All-Scan and sp_gla
SUBSET = [
    "tests/test_dsp_primitives.py::test_values_and_volumes[True-3-7-10]",
    "tests/test_dsp_primitives.py::test_gradcheck_float64[2]",
    "tests/test_dsp_stdit.py::test_equals_single_process[3-shape3-1]",
    "tests/test_dsp_stdit.py::test_ledger_two_switches_per_block_each_way[3-shape2-1]",
    "tests/test_zeco_sp.py::test_all_scan[False-3]",
    "tests/test_zeco_sp.py::test_sp_gla_matches_serial_float32[2]",
]


def _run_pytest(env_extra, targets, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", **env_extra)
    env.pop("PYTEST_ADDOPTS", None)
    p = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs", *targets],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    m = re.search(r"(\d+) passed", out)
    assert m and int(m.group(1)) >= len(targets), out[-2000:]
    assert not re.search(r"\d+ (skipped|deselected|xfailed|failed|error)", out), out[-2000:]
    return int(m.group(1))


def _pieces(x, dim, sizes):
    return torch.split(x, list(sizes), dim)


@pytest.mark.parametrize("nd", [4, 5])
def test_reference_pack_unpack_against_slicing(nd):
    shape = (3, 5, 7, 4, 3)[:nd]
    x = torch.randn(*shape).permute(*reversed(range(nd))).contiguous().permute(*reversed(range(nd)))
    for sd, gd in itertools.permutations(range(nd), 2):
        sizes = split_sizes(shape[sd], 3)
        buf = R.pack(x, sd, sizes)
        assert buf.shape == (x.numel(),)
        assert torch.equal(buf, torch.cat([p.reshape(-1) for p in _pieces(x, sd, sizes)]))
        gs = split_sizes(shape[gd], 3)
        flat = torch.cat([p.reshape(-1) for p in _pieces(x, gd, gs)])
        out = R.unpack(flat, shape, gd, gs)
        assert out.is_contiguous() and torch.equal(out, x)


def test_dispatch_uses_reference_for_uncovered_inputs(monkeypatch):
    monkeypatch.setenv(K.ENV_VAR, "torch")
    x = torch.randn(2, 3, 4, 2, 3, 2)                 # 6-D: beyond the kernels
    assert torch.equal(K.pack(x, 1, [2, 1]), R.pack(x, 1, [2, 1]))
    assert layout.canonical(x, 1) is None
    assert layout.tensor_split_qr([1, 2]) is None and layout.tensor_split_qr([3, 2, 2]) == (2, 1)
    with pytest.raises(ValueError, match="do not make shape"):
        K.unpack(torch.zeros(5), (2, 3), 0, [1, 1])


def test_backend_choice_and_errors(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(K.ENV_VAR, raising=False)
    assert K.backend_for(cpu) == "torch"                 # auto on CPU tensors
    monkeypatch.setenv(K.ENV_VAR, "torch")
    assert K.backend_for(cpu) == "torch"
    monkeypatch.setenv(K.ENV_VAR, "cuda")
    with pytest.raises(RuntimeError, match="LONGSEQ_KERNELS=cuda cannot run on cpu.*CUDA tensors only"):
        K.pack(torch.randn(4, 4), 0, [2, 2])
    monkeypatch.setenv(K.ENV_VAR, "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        K.scan_update(torch.empty(2, 2), torch.randn(2, 2), torch.randn(2, 2), None)
    monkeypatch.setenv(K.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="torch, triton, cuda"):
        K.backend_for(cpu)


def test_layout_widens_units_only_where_strides_allow():
    x = torch.randn(1, 2, 4, 1152, dtype=torch.bfloat16)
    t5, d5 = layout.canonical(x, 2)
    assert (t5.dtype, tuple(t5.shape), d5) == (torch.int64, (1, 1, 2, 4, 288), 3)
    t5, _ = layout.canonical(x[..., 1:], 2)               # odd offset: 2-byte units
    assert t5.dtype == torch.int16
    t5, d5 = layout.canonical(x, 3)                       # split along the last dim: never widened
    assert (t5.dtype, d5) == (torch.int16, 4)
    br, bc, rows, cols = layout.tile((1, 1, 2, 4, 288), 3, 2, 0)
    assert (bc, rows, cols) == (32, 4, 288) and br * bc <= 4096


def test_reference_scan_update():
    inp, loc, d = torch.randn(5, 3), torch.randn(5, 3, dtype=torch.bfloat16), torch.rand(5, 1)
    out = torch.empty(5, 3)
    assert torch.equal(R.scan_update(out, inp, loc, d), (d * inp) + loc.float())
    assert torch.equal(R.scan_update(out, None, loc, d), loc.float())
    assert torch.equal(R.scan_update(out, inp, loc, None), inp + loc.float())


def test_triton_interpreted_bitwise_and_forced_subset():
    """Triton kernels under the interpreter equal the PyTorch path bit for bit, and the subset of the
    switch / All-Scan / equivalence tests passes with LONGSEQ_KERNELS=triton."""
    n = _run_pytest({"TRITON_INTERPRET": "1", "LONGSEQ_KERNELS": "triton"},
                    ["tests/kernels_triton_cases.py", *SUBSET])
    assert n > 70


def test_forced_torch_subset():
    """Forcing the PyTorch path (what auto picks on CPU, so the whole suite runs it too) is honoured."""
    _run_pytest({"LONGSEQ_KERNELS": "torch"}, [SUBSET[0], SUBSET[4]])


def test_benchmark_runs_on_cpu(tmp_path):
    from longseq.benchmarks import switch_kernels

    assert switch_kernels.main(["--device", "cpu", "--frames", "4", "--procs", "2", "--spatial", "8",
                                "--channels", "4", "--repeats", "1", "--warmup", "0", "--state", "1", "1", "4", "4",
                                "--blocks", "2", "--out-dir", str(tmp_path)]) == 0
    import json
    blob = json.loads((tmp_path / "switch_kernels.json").read_text())
    rows = {(r["switch"], r["backend"]) for r in blob["switch"]}
    assert {("T->S", "copy"), ("T->S", "old"), ("T->S", "torch"), ("S->T", "cuda")} <= rows
    torch_row = next(r for r in blob["switch"] if r["backend"] == "torch")
    assert torch_row["exact"] is True and torch_row["pack_gbs"] > 0
    assert "not run" in (tmp_path / "switch_kernels.md").read_text()      # cuda on a CPU machine
    assert {r["row"] for r in blob["scan"]} >= {"old (cast, addcmul)", "torch (reference: mul, add)"}


def test_pinned_autotune_keeps_first_config(tmp_path):
    (tmp_path / "tuned.py").write_text(textwrap.dedent("""
        import triton, triton.language as tl
        @triton.autotune(configs=[triton.Config({"B": 1}), triton.Config({"B": 2})], key=["n"])
        @triton.jit
        def k(x, n, B: tl.constexpr):
            pass
        print("configs", len(k.configs), k.configs[0].kwargs["B"])
    """))
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    p = subprocess.run([sys.executable, "-m", "longseq.benchmarks.pinned", "tuned"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "configs 1 1" in p.stdout, p.stdout + p.stderr
