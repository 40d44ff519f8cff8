"""Checkpoints that prove themselves and data errors that name their file (issues 17 and 18):
manifests (a file or a directory), the newest good checkpoint, temporaries of killed writes, a
write that fails on purpose (full disk), run lineages, token-file sidecars. No processes."""
import errno
import json

import numpy as np
import pytest
import torch

from longseq.train import checkpoint as ck
from longseq.train import data as data_mod
from longseq.train import manifest
from longseq.train.config import ConfigError


def _ckpts(d, steps=(2, 4, 6), lineage="L", keep=0):
    for s in steps:
        ck.save_checkpoint(d, s, {"step": s, "w": torch.full((4096,), float(s))}, keep=keep, lineage=lineage)


def test_manifest_catches_overwrite_truncation_and_zero_length(tmp_path):
    d = tmp_path / "checkpoints"
    _ckpts(d)
    p = d / "ckpt_step00000006.pt"
    manifest.verify(p)
    raw = bytearray(p.read_bytes())
    raw[1000:1000 + 4096] = b"\x00" * 4096                         # 4 KiB overwritten inside: same size
    p.write_bytes(bytes(raw))
    with pytest.raises(manifest.CheckpointCorrupt, match="sha256"):
        manifest.verify(p)
    p.write_bytes(bytes(raw[:100]))
    with pytest.raises(manifest.CheckpointCorrupt, match="has 100 bytes, the manifest says"):
        manifest.verify(p)
    p.write_bytes(b"")
    with pytest.raises(manifest.CheckpointCorrupt, match="has 0 bytes"):
        manifest.verify(p)
    (d / "ckpt_step00000004.pt.manifest.json").unlink()
    with pytest.raises(manifest.CheckpointCorrupt, match="no manifest"):
        manifest.verify(d / "ckpt_step00000004.pt")


def test_manifest_of_a_directory(tmp_path):
    c = tmp_path / "ckpt_step00000010"
    (c / "sub").mkdir(parents=True)
    (c / "a.distcp").write_bytes(b"x" * 100)
    (c / "sub" / ".metadata").write_bytes(b"meta")
    manifest.write_manifest(c, lineage="L", step=10)
    manifest.verify(c)
    assert manifest.read_meta(c) == {"lineage": "L", "step": 10}
    (c / "sub" / ".metadata").unlink()
    with pytest.raises(manifest.CheckpointCorrupt, match="sub/.metadata is missing"):
        manifest.verify(c)


def test_the_newest_good_checkpoint_is_found_and_strict_refuses(tmp_path):
    d = tmp_path / "checkpoints"
    _ckpts(d)
    (d / "ckpt_step00000006.pt").write_bytes(b"")                  # the latest is damaged
    path, problems = ck.find_good(d, "L")
    assert path.name == "ckpt_step00000004.pt" and len(problems) == 1 and "ckpt_step00000006.pt" in problems[0]
    assert ck.load_checkpoint(path)["step"] == 4
    with pytest.raises(ck.CheckpointCorrupt, match="strict"):
        ck.find_good(d, "L", strict=True)


def test_a_write_that_fails_keeps_the_previous_checkpoint(tmp_path):
    class DiskFull:
        def __reduce_ex__(self, protocol):
            raise OSError(errno.ENOSPC, "No space left on device")

    d = tmp_path / "checkpoints"
    _ckpts(d, (2, 4), keep=1)
    before = sorted(f.name for f in d.iterdir())
    with pytest.raises(OSError, match="No space"):
        ck.save_checkpoint(d, 6, {"step": 6, "w": torch.zeros(4096), "x": DiskFull()}, keep=1, lineage="L")
    assert sorted(f.name for f in d.iterdir()) == before              # nothing new, nothing deleted, no temp
    assert (d / "latest").read_text().strip() == "ckpt_step00000004.pt"
    assert ck.find_latest(d).name == "ckpt_step00000004.pt"


def test_temporaries_of_killed_writes_are_removed(tmp_path):
    d = tmp_path / "checkpoints"
    _ckpts(d, (2,))
    (d / ".ckpt_step00000004.pt.tmp.4242").write_bytes(b"torn" * 1000)
    assert ck.clean_temporaries(d) == [".ckpt_step00000004.pt.tmp.4242"]
    assert ck.find_latest(d).name == "ckpt_step00000002.pt"


def test_lineages_clean_up_only_their_own_and_never_the_seed(tmp_path):
    d = tmp_path / "checkpoints"
    lin_a, _ = ck.start_lineage(d, "none")
    _ckpts(d, (10, 20, 30), lineage=lin_a)
    seed = d / "ckpt_step00000010.pt"
    lin_b, resume = ck.start_lineage(d, str(seed), run_id="job1")
    assert lin_b != lin_a and resume == str(seed)
    _ckpts(d, (12, 14, 16), lineage=lin_b, keep=1)
    names = [p.name for _, p in ck.list_checkpoints(d)]
    assert names == ["ckpt_step00000010.pt", "ckpt_step00000016.pt", "ckpt_step00000020.pt", "ckpt_step00000030.pt"]
    # a torchrun restart of the same job continues lineage B from its own newest, not the seed
    lin, resume = ck.start_lineage(d, str(seed), run_id="job1", restart=1)
    assert (lin, resume) == (lin_b, "auto")
    assert ck.find_good(d, lin)[0].name == "ckpt_step00000016.pt"
    # with none of its own yet, the restart falls back to the seed
    for _, p in ck.list_checkpoints(d):
        if manifest.read_meta(p).get("lineage") == lin_b:
            p.unlink()
    assert ck.find_good(d, lin)[0] == seed.resolve()


def test_token_file_sidecar_and_ids_outside_the_vocabulary(tmp_path):
    f = tmp_path / "train.bin"
    data_mod.write_token_file(f, np.arange(70000) % 70000, dtype="uint32")
    assert json.loads((tmp_path / "train.bin.meta.json").read_text())["dtype"] == "uint32"
    with pytest.raises(ConfigError, match="data.dtype=uint32"):
        data_mod.check_token_meta(f, "uint16", 100000)
    with pytest.raises(ConfigError, match="vocabulary of 70000"):
        data_mod.check_token_meta(f, "uint32", 1000)
    src = data_mod.TokenFile(f, "uint32", 0, False, 16, vocab_size=1000)
    assert src.window(0, 0, 17).max() == 16
    with pytest.raises(ValueError, match=r"train.bin: token 1000 is 1000, outside the model's vocabulary of 1000"):
        for i in range(src.num_samples):
            src.window(i, 0, 17)
    f.write_bytes(f.read_bytes()[:-8])                               # truncated
    with pytest.raises(ConfigError, match="truncated"):
        data_mod.check_token_meta(f, "uint32", 100000)


def test_latent_errors_name_the_file(tmp_path):
    data_mod.write_latent_sample(tmp_path, "a", np.zeros((4, 3, 2, 2), np.float32), np.zeros((5, 8), np.float32))
    lat = np.ones((4, 3, 2, 2), np.float32)
    lat[0, 0, 0, 0] = np.nan
    data_mod.write_latent_sample(tmp_path, "b", lat, np.zeros((5, 8), np.float32))
    src = data_mod.LatentFolder(tmp_path, 0, False, 10)
    with pytest.raises(ValueError, match=r"b.latent.npy: its latent holds NaN"):
        src.load(1, (0, 3))
    p = tmp_path / "a.latent.npy"
    p.write_bytes(p.read_bytes()[:-20])
    with pytest.raises(ValueError, match=r"cannot read .*a.latent.npy"):
        data_mod.LatentFolder(tmp_path, 0, False, 10).shape(0)


def test_seq_len_zero_and_a_token_file_of_the_wrong_dtype_are_config_errors(tmp_path):
    from longseq.train.config import load_config, validate
    with pytest.raises(ConfigError, match="seq_len=0"):
        validate(load_config(["model=gla_tiny", "parallel=none", "model.sample.seq_len=0"]), world=1)
    f = tmp_path / "t.bin"
    data_mod.write_token_file(f, np.arange(5000) % 300, dtype="uint32")
    with pytest.raises(ConfigError, match="pass data.dtype=uint32"):
        validate(load_config(["model=gla_tiny", "parallel=none", "data=tokens", f"data.path={f}",
                              "data.dtype=uint16", "model.sample.seq_len=64"]), world=1)
