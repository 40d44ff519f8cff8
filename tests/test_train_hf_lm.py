"""`python -m longseq.train` on transformers' delta-rule hybrids (``model.family=hf_causal_lm``, the tiny
presets ``model=qwen3_next_tiny`` / ``kimi_linear_tiny`` of longseq.models.hf_lm) with ZeCO on 2
processes, 2 steps, 15 tokens (pieces 8 / 7).

* Kimi-Linear (KDA + MLA), no FSDP: the losses equal a one-process run of the unchanged model
  (``parallel=none``) within 1e-4 relative: float32, and the reference runs transformers' own
  float32 delta-rule kernel, the SP run longseq's (another summation order).
* Qwen3-Next (GDN with grouped value heads + gated GQA + MoE) under FSDP2 (``parallel.fsdp=full``):
  trains (2 finite losses, the run says FSDP2) and the ZeCO ledger rows are in the log.

The other two combinations (Kimi-Linear with FSDP2, Qwen3-Next without) run the same way by hand.
"""
from __future__ import annotations

import math

import pytest
import torch

from tests import train_helpers as th

pytest.importorskip("transformers")

COMMON = ["train.steps=2", "train.global_batch_size=1", "model.sample.seq_len=15", "data.num_samples=0"]


def test_kimi_linear_zeco_matches_one_process(tmp_path):
    model = ["model=kimi_linear_tiny", *COMMON]
    th.run(model + ["parallel=none", f"train.out_dir={tmp_path / 'ref'}"], 1, timeout=150)
    th.run(model + ["parallel=zeco", "parallel.sp_size=2", f"train.out_dir={tmp_path / 'sp2'}"], 2, timeout=150)
    ref, got = th.losses(tmp_path / "ref"), th.losses(tmp_path / "sp2")
    assert len(ref) == len(got) == 2, (ref, got)
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64),
                               rtol=1e-4, atol=1e-6)


def test_qwen3_next_zeco_fsdp2_trains(tmp_path):
    p = th.run(["model=qwen3_next_tiny", *COMMON, "parallel=zeco", "parallel.sp_size=2", "parallel.fsdp=full",
                f"train.out_dir={tmp_path / 'fsdp'}"], 2, timeout=150)
    assert "FSDP2 full over 2 ranks" in p.stdout
    losses = th.losses(tmp_path / "fsdp")
    assert len(losses) == 2 and all(math.isfinite(x) and 3.0 < x < 5.5 for x in losses), losses   # ~ln 64 = 4.16
    ledger = (tmp_path / "fsdp" / "ledger.txt").read_text()          # written by every run (print_ledger: off)
    assert "zeco.delta.scan.fwd" in ledger and "transformers.conv.halo" in ledger, ledger
