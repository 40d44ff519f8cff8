"""examples/megatron_style_train.py: the Megatron-shaped script (its own CP/DP groups from
torch.distributed.new_group, handed to longseq.from_existing_groups) trains two steps on 2 CPU
processes under torchrun, for ST-DiT with DSP and for the GLA LM with ZeCO, printing finite losses
and exiting 0; and the CP 2 run's losses equal a one-process run's on the same samples (the script
printed with 7 significant digits: compared within 2e-6 relative, plus one unit in the last place).
"""
import math
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "megatron_style_train.py")
LOSS = re.compile(r"\| (?:lm|mse) loss: (\S+) \|")


def _run(cmd, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{out[-4000:]}"
    return [float(x) for x in LOSS.findall(out)], out


@pytest.mark.parametrize("model", ["stdit", "gla", "hybrid"])
def test_megatron_style_example_two_steps(model):
    args = ["--model", model, "--micro-batch-size", "1", "--train-iters", "2", "--lr", "1e-3"]
    losses, out = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        SCRIPT, "--context-parallel-size", "2", *args])
    assert "context-parallel 2 x data-parallel 1" in out
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), out[-3000:]
    ref, _ = _run([sys.executable, SCRIPT, *args])           # world 1 (no torchrun), the same samples
    assert len(ref) == 2
    for a, b in zip(losses, ref):
        assert abs(a - b) <= 2e-6 * abs(b) + 10 ** (math.floor(math.log10(abs(b))) - 6), (losses, ref)


def test_megatron_style_example_with_torch_fsdp2():
    """--use-torch-fsdp2: Megatron's groups as a (dp, cp) DeviceMesh, FSDP2 over dp x cp (CP 2 x DP 2):
    the same losses as the replicated CP 2 x DP 2 run (printed digits, as above)."""
    args = ["--model", "stdit", "--context-parallel-size", "2", "--global-batch-size", "2", "--train-iters", "3"]
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4", SCRIPT, *args]
    ref, _ = _run(run)
    got, out = _run(run + ["--use-torch-fsdp2"])
    assert "context-parallel 2 x data-parallel 2" in out
    assert len(got) == len(ref) == 3
    for a, b in zip(got, ref):
        assert abs(a - b) <= 2e-6 * abs(b) + 10 ** (math.floor(math.log10(abs(b))) - 6), (got, ref)
