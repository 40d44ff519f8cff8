"""`python -m longseq.train`: an SP run and an SP x DP run take the same optimizer steps as one
process on the same global batch.

The one-process reference uses no plan at all (``parallel=none``), so the test covers the plan, the
per-rank loss normalisation, the gradient sync (SP sum, DP average) and the data layout (every SP
rank of a group sees the same samples, DP groups different ones). Tolerance: losses within
1e-5 relative (float32; the sharded runs sum in a different order); final weights within 1e-5
absolute, 0.3% of one AdamW step at lr 3e-3 (Adam divides by the gradient's running RMS, so a
rarely-seen embedding row with a near-zero gradient turns float32 rounding into visible noise).
The SP x DP runs also recompute every block (``train.activation_checkpointing=true``).
"""
from __future__ import annotations

import pytest
import torch

from tests import train_helpers as th

STEPS = 5
RTOL, ATOL = 1e-5, 1e-6
W_RTOL, W_ATOL = 1e-5, 1e-5


def _check_same(ref_dir, other_dir, what):
    ref, got = th.losses(ref_dir), th.losses(other_dir)
    assert len(ref) == len(got) == STEPS, (what, ref, got)
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64),
                               rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: losses differ\n{ref}\n{got}\n{m}")
    a, b = th.final_state(ref_dir)["model"], th.final_state(other_dir)["model"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=W_RTOL, atol=W_ATOL,
                                   msg=lambda m, k=k: f"{what}: parameter {k} differs after {STEPS} steps\n{m}")
    assert ref[-1] < ref[0], f"the loss should fall over {STEPS} steps: {ref}"


def _common(tmp, name):
    return [f"train.out_dir={tmp / name}", f"train.steps={STEPS}", "train.global_batch_size=4",
            "train.checkpoint_every=0", "train.resume=none"]


def test_stdit_dsp_matches_one_process(tmp_path):
    model = ["model=stdit_tiny", "model.sample.frames=6", "model.sample.height=8", "model.sample.width=8"]
    th.run(model + ["parallel=none"] + _common(tmp_path, "ref"), 1, timeout=120)
    th.run(model + ["parallel=dsp", "parallel.sp_size=2"] + _common(tmp_path, "sp2"), 2, timeout=120)
    th.run(model + ["parallel=dsp", "parallel.sp_size=2", "train.activation_checkpointing=true"]
           + _common(tmp_path, "sp2dp2"), 4, timeout=180)
    _check_same(tmp_path / "ref", tmp_path / "sp2", "ST-DiT DSP, SP 2")
    _check_same(tmp_path / "ref", tmp_path / "sp2dp2", "ST-DiT DSP, SP 2 x DP 2, activation checkpointing")


def test_gla_zeco_matches_one_process(tmp_path):
    model = ["model=gla_tiny", "model.sample.seq_len=64", "data.num_samples=0"]
    th.run(model + ["parallel=none"] + _common(tmp_path, "ref"), 1, timeout=120)
    th.run(model + ["parallel=zeco", "parallel.sp_size=2"] + _common(tmp_path, "sp2"), 2, timeout=120)
    th.run(model + ["parallel=zeco", "parallel.sp_size=2", "train.activation_checkpointing=true"]
           + _common(tmp_path, "sp2dp2"), 4, timeout=180)
    _check_same(tmp_path / "ref", tmp_path / "sp2", "GLA ZeCO, SP 2")
    _check_same(tmp_path / "ref", tmp_path / "sp2dp2", "GLA ZeCO, SP 2 x DP 2, activation checkpointing")
