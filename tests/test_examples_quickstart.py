"""examples/quickstart_dsp.py and quickstart_zeco.py (the README's "Use it"): 2 CPU processes under
torchrun print the same 5 losses as one process (printed with 5 decimals: within one unit of the last
place), the loss falls, and rank 0's ledger shows the method's collectives."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSS = re.compile(r"^step \d+ loss (\S+)$", re.M)


def _run(cmd, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{out[-4000:]}"
    return [float(x) for x in LOSS.findall(proc.stdout)], out


@pytest.mark.parametrize("name,tags", [("dsp", ["dsp.blocks.0.temporal.in", "dsp.blocks.1.temporal.out.bwd"]),
                                       ("zeco", ["zeco.scan.fwd", "zeco.scan.bwd"])])
def test_quickstart_sp2_equals_one_process(name, tags):
    script = os.path.join(ROOT, "examples", f"quickstart_{name}.py")
    losses, out = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        script])
    ref, _ = _run([sys.executable, script])
    assert len(losses) == len(ref) == 5, out[-3000:]
    assert all(abs(a - b) <= 1.01e-5 for a, b in zip(losses, ref)), (losses, ref)
    assert losses[-1] < losses[0]
    for tag in tags:
        assert tag in out, (tag, out[-3000:])
