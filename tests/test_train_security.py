"""Checkpoints and run directories as an attacker would use them (issue 22, items 1, 2, 4, 8): a
crafted pickle in a ``.pt`` checkpoint, a DCP ``trainer.pt``, a DCP ``.metadata`` or a DCP byte
item must not run; planted symlinks must not redirect a write; a run directory other users can
write is refused; a rollback (``resume=PATH``) is never lost to the abandoned lineage's newer
checkpoints. All in one process, no process group (fast)."""
from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from longseq.train import checkpoint as ck
from longseq.train import safe_load
from longseq.train.config import ConfigError
from longseq.train.manifest import CheckpointCorrupt, open_exclusive, write_atomic
from longseq.train.metrics import MetricsWriter, truncate_metrics


class _Payload:
    """Unpickling it creates ``marker`` (what an attacker's checkpoint would do instead)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _crafted_pt(path: Path, marker: Path) -> None:
    torch.save({"format": 1, "step": 8, "model": {"w": torch.zeros(2)}, "x": _Payload(marker)}, path)


def test_a_crafted_pt_checkpoint_is_refused_without_running(tmp_path):
    marker = tmp_path / "ran"
    p = tmp_path / "ckpt_step00000008.pt"
    _crafted_pt(p, marker)
    with pytest.raises(safe_load.UnsafeCheckpoint, match="refused to load"):
        ck.load_checkpoint(p)
    assert not marker.exists(), "the checkpoint's payload ran"
    good = tmp_path / "good.pt"                    # a real checkpoint (RNG states included) still loads
    torch.save({"step": 1, "model": {"w": torch.ones(2)}, "rng": [ck.rng_state()]}, good)
    st = ck.load_checkpoint(good)
    ck.set_rng_state(st["rng"][0])
    assert st["step"] == 1


def _dcp_dir(path: Path) -> None:
    """A DCP checkpoint directory as one process writes it (tensors and a byte item), with a trainer.pt."""
    import torch.distributed.checkpoint as dcp
    with pytest.warns(UserWarning):
        dcp.save({"model": {"w": torch.randn(2, 3)}, "optim": {"lr": 0.5}}, checkpoint_id=str(path), no_dist=True)
    torch.save({"step": 3, "scheduler": {}}, path / "trainer.pt")


def test_crafted_dcp_metadata_and_trainer_are_refused_without_running(tmp_path):
    from longseq.train import dcp_checkpoint
    d = tmp_path / "ckpt_step00000003.dcp"
    _dcp_dir(d)
    assert dcp_checkpoint.read_trainer(d)["step"] == 3              # the genuine files pass the allow-list
    marker = tmp_path / "ran"
    md = safe_load.read_dcp_metadata(d)
    raw = pickle.dumps(md)
    (d / ".metadata").write_bytes(pickle.dumps((_Payload(marker), md)))
    with pytest.raises(safe_load.UnsafeCheckpoint, match="not allowed in a DCP .metadata"):
        dcp_checkpoint.read_trainer(d)
    # torch's own reader would have run it: the reader longseq hands to dcp.load refuses too
    with pytest.raises(Exception) as e:
        safe_load.safe_reader(d).read_metadata()
    assert "not allowed" in str(e.value) and not marker.exists()
    (d / ".metadata").write_bytes(raw)
    torch.save({"step": 3, "x": _Payload(marker)}, d / "trainer.pt")
    with pytest.raises(safe_load.UnsafeCheckpoint):
        dcp_checkpoint.read_trainer(d)
    assert not marker.exists()


def test_a_crafted_dcp_byte_item_is_refused(tmp_path):
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, ReadItem
    marker = tmp_path / "ran"
    planner = safe_load.safe_planner()
    planner.flatten_state_dict = False
    planner.state_dict = {}
    buf = io.BytesIO()
    torch.save(_Payload(marker), buf)
    buf.seek(0)
    item = ReadItem(LoadItemType.BYTE_IO, MetadataIndex("optim.x"), torch.Size([0]), MetadataIndex("optim.x"),
                    torch.Size([0]), torch.Size([0]))
    with pytest.raises(safe_load.UnsafeCheckpoint):
        planner.load_bytes(item, buf)
    assert not marker.exists()


# -- symlinks and shared directories ------------------------------------------------------------------
def test_temporaries_never_write_through_a_planted_symlink(tmp_path):
    target = tmp_path / "victim"
    target.write_text("precious")
    link = tmp_path / "x.tmp"
    link.symlink_to(target)
    with pytest.raises(FileExistsError):
        open_exclusive(link)
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n" + json.dumps({"step": 2}) + "\n")
    (out / "metrics.jsonl.tmp").symlink_to(target)          # the name the old code wrote through
    truncate_metrics(out / "metrics.jsonl", 1)
    assert target.read_text() == "precious" and not (out / "metrics.jsonl").is_symlink()
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    (out / "metrics.jsonl").unlink()
    (out / "metrics.jsonl").symlink_to(target)              # appending through a link is refused
    with pytest.raises(OSError, match="symlink"):
        MetricsWriter(out, enabled=True, tensorboard=False)
    write_atomic(out / "config.yaml", lambda f: f.write(b"a: 1\n"))
    assert target.read_text() == "precious"


def test_a_run_directory_other_users_can_write_is_refused(tmp_path):
    from longseq.train.loop import _setup_run_dir
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    assert "writable by every user" in ck.shared_write_problem(shared, "train.out_dir")
    cfg = OmegaConf.create({"train": {"out_dir": str(shared), "allow_shared_out_dir": False}})
    with pytest.raises(ConfigError, match="allow_shared_out_dir"):
        _setup_run_dir(cfg, shared, ck.checkpoint_dir(shared), "auto")
    cfg.train.allow_shared_out_dir = True
    lineage, resume = _setup_run_dir(cfg, shared, ck.checkpoint_dir(shared), "auto")
    assert resume == "auto" and lineage
    os.chmod(shared, 0o755)
    assert ck.shared_write_problem(shared, "train.out_dir") is None


# -- lineage: a rollback is never lost ---------------------------------------------------------------------
def _write(d: Path, step: int, lineage: str):
    return ck.save_checkpoint(d, step, {"step": step, "model": {}}, lineage=lineage)


def test_a_rollback_is_not_lost_to_the_abandoned_lineage(tmp_path):
    d = tmp_path / "checkpoints"
    a, _ = ck.start_lineage(d, "none", run_id="jobA")
    for s in (2, 4, 6, 8):
        _write(d, s, a)                                      # run A (a bad LR) to step 8; latest -> 8
    seed = d / "ckpt_step00000004.pt"
    b, resume = ck.start_lineage(d, str(seed), run_id="jobB")       # train.resume=<A's step 4>
    assert b != a and resume == str(seed)
    # a crash at step 5, before B's first checkpoint: the torchrun restart, then a manual rerun
    lb, how = ck.start_lineage(d, str(seed), run_id="jobB", restart=1)
    assert (lb, how) == (b, "auto")
    assert ck.find_good(d, lb)[0] == seed, "the restart continued the abandoned lineage"
    lb, how = ck.start_lineage(d, "auto", run_id="")
    assert lb == b and ck.find_good(d, lb)[0] == seed, "the rerun continued the abandoned lineage"
    p6 = _write(d, 6, b)                                     # B's own checkpoints win from then on
    assert ck.find_good(d, b)[0] == p6


def test_latest_of_bad_bytes_falls_back_and_a_lagging_latest_is_passed(tmp_path):
    d = tmp_path / "checkpoints"
    lin, _ = ck.start_lineage(d, "none")
    _write(d, 2, lin)
    p4 = _write(d, 4, lin)
    (d / "latest").write_bytes(b"\xff\xfe\x00garbage")
    assert ck.find_good(d, lin)[0] == p4 and ck.find_good(d)[0] == p4
    (d / "latest").write_text("ckpt_step00000002.pt\n")    # killed after step 4 was complete, before latest moved
    assert ck.find_good(d, lin)[0] == p4


def test_an_orphan_manifest_is_removed(tmp_path):
    d = tmp_path / "checkpoints"
    p = _write(d, 2, "L")
    p.unlink()                                               # killed between deleting it and its manifest
    assert ck.clean_temporaries(d) == ["ckpt_step00000002.pt.manifest.json"]
    assert not list(d.glob("*.manifest.json"))


def test_a_zip_writer_full_disk_keeps_the_previous_checkpoint(tmp_path):
    d = tmp_path / "checkpoints"
    p2 = _write(d, 2, "L")
    big = {"step": 4, "model": {"w": torch.randn(10000)}}
    with pytest.raises(RuntimeError, match="unexpected pos"):     # torch's zip writer, not an OSError
        ck.save_checkpoint(d, 4, big, lineage="L", full_after=4096)
    assert sorted(os.listdir(d)) == sorted([p2.name, p2.name + ".manifest.json", "latest"])
    assert ck.find_good(d, "L")[0] == p2 and ck.load_checkpoint(p2)["step"] == 2


def test_retention_keeps_the_seed_and_the_newest(tmp_path):
    d = tmp_path / "checkpoints"
    a, _ = ck.start_lineage(d, "none")
    seed = _write(d, 2, a)
    b, _ = ck.start_lineage(d, str(seed))
    for s in (4, 6, 8):
        ck.save_checkpoint(d, s, {"step": s, "model": {}}, keep=1, lineage=b)
    assert [p.name for _, p in ck.list_checkpoints(d)] == ["ckpt_step00000002.pt", "ckpt_step00000008.pt"]


def test_unsafe_and_corrupt_are_one_line(tmp_path):
    p = tmp_path / "x.pt"
    p.write_bytes(b"not a zip")
    with pytest.raises(Exception) as e:
        ck.load_checkpoint(p)
    assert "\n" not in str(e.value)
    assert issubclass(safe_load.UnsafeCheckpoint, CheckpointCorrupt)       # a clean stop in the loop
