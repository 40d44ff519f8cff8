"""Sharded checkpoints (``torch.distributed.checkpoint``) of FSDP runs of `python -m longseq.train`
(CPU gloo, 4 processes, ST-DiT tiny with DSP, ``parallel.fsdp=full``).

An uninterrupted run at SP 2 x DP 2 saves a DCP checkpoint at step 3 and runs to step 6. Resumed
from the step-3 checkpoint (alone in a fresh run directory):

* at the same layout: the same losses, bitwise (same shards, same reduction order), and the same
  final weights;
* at SP 4 x DP 1 and at SP 1 x DP 4 (DCP reshards the parameters and Adam moments to the new
  layout): the losses continue as the uninterrupted run's within 1e-5 relative (float32; another
  layout sums in another order). The data order is the same global batch per step on every layout
  (the stream position is in the checkpoint).

Atomicity: a checkpoint is written as ``.ckpt_stepN.dcp.tmp`` and renamed; a leftover temporary
directory and a ``latest`` naming a missing checkpoint are never taken for a checkpoint.
"""
from __future__ import annotations

import shutil

import pytest
import torch

from longseq.train import checkpoint as ckpt
from longseq.train.manifest import write_manifest
from tests import train_helpers as th

STEPS, SAVE_AT = 6, 3
BASE = ["model=stdit_tiny", "parallel=dsp", "parallel.fsdp=full", "model.sample.frames=4", "model.sample.height=8",
        "model.sample.width=8", f"train.steps={STEPS}", f"train.checkpoint_every={SAVE_AT}", "train.global_batch_size=4",
        "train.keep_checkpoints=0", "optim.warmup_steps=2"]
RTOL = 1e-5


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("dcp_reference")
    th.run(BASE + ["parallel.sp_size=2", f"train.out_dir={out}", "train.resume=none"], 4, timeout=240)
    losses = th.losses(out)
    assert len(losses) == STEPS and losses[-1] < losses[0], losses
    return out, losses


def _from_step3(ref_dir, tmp_path, name):
    """A run directory holding only the reference's step-3 checkpoint (and its metrics up to step 3)."""
    out = tmp_path / name
    (out / "checkpoints").mkdir(parents=True)
    src = ref_dir / "checkpoints" / f"ckpt_step{SAVE_AT:08d}.dcp"
    shutil.copytree(src, out / "checkpoints" / src.name)
    shutil.copy(src.with_name(src.name + ".manifest.json"), out / "checkpoints")    # what proves it whole
    (out / "checkpoints" / "latest").write_text(src.name + "\n")
    shutil.copy(ref_dir / "metrics.jsonl", out / "metrics.jsonl")
    return out


def _weights(out_dir, tmp_path):
    """The model's whole tensors of the final DCP checkpoint (converted with DCP's format_utils)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    name = (out_dir / "checkpoints" / "latest").read_text().strip()
    dst = tmp_path / f"{out_dir.name}_final.pt"
    dcp_to_torch_save(str(out_dir / "checkpoints" / name), str(dst))
    return torch.load(dst, weights_only=False)["model"]


def test_dcp_checkpoint_layout_and_exact_resume(reference, tmp_path):
    ref_dir, ref = reference
    d = ref_dir / "checkpoints"
    assert (d / "latest").read_text().strip() == f"ckpt_step{STEPS:08d}.dcp"
    for step in (SAVE_AT, STEPS):
        c = d / f"ckpt_step{step:08d}.dcp"
        files = sorted(f.name for f in c.iterdir())
        assert ".metadata" in files and "trainer.pt" in files and sum(f.endswith(".distcp") for f in files) == 4, files
    assert not any(f.name.endswith(".tmp") for f in d.iterdir())

    out = _from_step3(ref_dir, tmp_path, "same")
    p = th.run(BASE + ["parallel.sp_size=2", f"train.out_dir={out}", "train.resume=auto"], 4, timeout=240)
    assert f"resumed from ckpt_step{SAVE_AT:08d}.dcp (step {SAVE_AT})" in p.stdout, p.stdout[-3000:]
    got = th.losses(out)
    assert got == ref, f"exact resume at the same layout:\n{ref}\n{got}"
    a, b = _weights(ref_dir, tmp_path), _weights(out, tmp_path)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"parameter {k} differs after the resumed run"


@pytest.mark.parametrize("sp_size", [4, 1], ids=["sp4xdp1", "sp1xdp4"])
def test_dcp_resume_at_another_layout(reference, tmp_path, sp_size):
    ref_dir, ref = reference
    out = _from_step3(ref_dir, tmp_path, f"sp{sp_size}")
    p = th.run(BASE + [f"parallel.sp_size={sp_size}", f"train.out_dir={out}", "train.resume=auto"], 4, timeout=240)
    assert f"world 4 = SP {sp_size} x DP {4 // sp_size}" in p.stdout
    assert f"resumed from ckpt_step{SAVE_AT:08d}.dcp (step {SAVE_AT})" in p.stdout, p.stdout[-3000:]
    got = th.losses(out)
    assert got[:SAVE_AT] == ref[:SAVE_AT] and len(got) == STEPS
    torch.testing.assert_close(torch.tensor(got[SAVE_AT:], dtype=torch.float64),
                               torch.tensor(ref[SAVE_AT:], dtype=torch.float64), rtol=RTOL, atol=0,
                               msg=lambda m: f"SP {sp_size}: losses after resume\n{ref}\n{got}\n{m}")


def test_find_latest_ignores_temporaries_and_dangling_pointers(tmp_path):
    d = tmp_path / "checkpoints"
    (d / "ckpt_step00000004.dcp").mkdir(parents=True)
    (d / "ckpt_step00000004.dcp" / ".metadata").write_bytes(b"x")
    assert ckpt.find_latest(d) is None                       # not proven whole: no manifest yet
    write_manifest(d / "ckpt_step00000004.dcp")
    (d / ".ckpt_step00000008.dcp.tmp").mkdir()              # a save that crashed before its rename
    (d / "latest").write_text("ckpt_step00000006.dcp\n")   # names a checkpoint that is gone
    assert ckpt.find_latest(d) == d / "ckpt_step00000004.dcp"
    assert [s for s, _ in ckpt.list_checkpoints(d)] == [4]
    ckpt.remove_checkpoint(d / "ckpt_step00000004.dcp")
    assert ckpt.find_latest(d) is None
