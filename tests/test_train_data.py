"""Training data: deterministic per (seed, sample index), SP ranks of a group see the same sample
(and read only their piece when the method takes pre-sharded input), DP groups different ones;
the latent-folder and token-file formats, with small fixtures; end-to-end runs on both."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from longseq.train import data as D
from tests import train_helpers as th

C, T, H, W, N, CT = 4, 5, 6, 4, 3, 16


def video(num_samples=0, seed=7):
    return D.SyntheticVideo(seed, num_samples, 1000, (C, T, H, W), (N, CT))


def test_synthetic_video_is_a_function_of_seed_and_index():
    a, b = video(), video()
    s0, s1 = a.sample(3, None), b.sample(3, None)
    for k in s0:
        assert torch.equal(s0[k], s1[k])
    assert not torch.equal(a.sample(4, None)["x0"], s0["x0"])
    assert not torch.equal(video(seed=8).sample(3, None)["x0"], s0["x0"])
    # A fixed set repeats its latents, with fresh noise and timestep at each position.
    rep = video(num_samples=2)
    assert torch.equal(rep.sample(0, None)["x0"], rep.sample(2, None)["x0"])
    assert not torch.equal(rep.sample(0, None)["noise"], rep.sample(2, None)["noise"])


@pytest.mark.parametrize("P", [2, 3])
def test_video_shards_are_pieces_of_the_whole(P):
    src = video()
    whole = src.sample(11, None)
    parts = [src.sample(11, D.Shard("T", r, P)) for r in range(P)]
    for k in ("x0", "noise"):
        assert torch.equal(torch.cat([p[k] for p in parts], dim=1), whole[k])
    for p in parts:
        assert torch.equal(p["y"], whole["y"]) and torch.equal(p["t"], whole["t"])


def test_batches_dp_groups_differ_sp_ranks_agree():
    src = video()
    G, dp = 4, 2
    pos = [D.BatchSource(src, global_batch=G, dp_rank=d, dp_size=dp, shard=None).positions(8) for d in range(dp)]
    assert list(pos[0]) == [8, 9] and list(pos[1]) == [10, 11]
    b0 = D.BatchSource(src, global_batch=G, dp_rank=0, dp_size=dp, shard=None).batch(8)
    b0_again = D.BatchSource(src, global_batch=G, dp_rank=0, dp_size=dp, shard=None).batch(8)
    b1 = D.BatchSource(src, global_batch=G, dp_rank=1, dp_size=dp, shard=None).batch(8)
    assert b0["x0"].shape == (2, C, T, H, W)
    assert torch.equal(b0["x0"], b0_again["x0"]) and not torch.equal(b0["x0"], b1["x0"])
    one = D.BatchSource(src, global_batch=G, dp_rank=0, dp_size=1, shard=None).batch(8)   # the global batch
    assert torch.equal(torch.cat([b0["x0"], b1["x0"]]), one["x0"])


def _latent_fixture(folder, n=3, seed=0, kinds=("npy",)):
    rng = np.random.default_rng(seed)
    whole = {}
    for i in range(n):
        lat = rng.standard_normal((C, T, H, W)).astype(np.float16 if i == 0 else np.float32)
        cap = rng.standard_normal((N + i, CT)).astype(np.float32)      # captions of different lengths
        kind = kinds[i % len(kinds)]
        name = f"clip{i:03d}"
        if kind == "npy":
            D.write_latent_sample(folder, name, lat, cap)
        elif kind == "pt":
            torch.save({"latent": torch.from_numpy(lat.astype(np.float32)), "caption": torch.from_numpy(cap)},
                       folder / f"{name}.pt")
        else:
            from safetensors.torch import save_file
            save_file({"latent": torch.from_numpy(lat.astype(np.float32)), "caption": torch.from_numpy(cap)},
                      str(folder / f"{name}.safetensors"))
        whole[name] = (lat.astype(np.float32), cap)
    return whole


@pytest.mark.parametrize("kinds", [("npy",), ("npy", "pt", "safetensors")])
def test_latent_folder_reads_the_T_shard(tmp_path, kinds):
    whole = _latent_fixture(tmp_path, kinds=kinds)
    src = D.LatentFolder(tmp_path, seed=1, shuffle=False, num_timesteps=1000)
    assert src.num_samples == 3
    for i, (name, (lat, cap)) in enumerate(sorted(whole.items())):
        full = src.sample(i, None)
        assert torch.equal(full["x0"], torch.from_numpy(lat)) and torch.equal(full["y"], torch.from_numpy(cap))
        for r in range(2):
            part = src.sample(i, D.Shard("T", r, 2))
            a, b = D.Shard("T", r, 2).range(T)
            assert torch.equal(part["x0"], torch.from_numpy(lat[:, a:b]))
            assert torch.equal(part["noise"], full["noise"][:, a:b])
    # Captions of different lengths are padded and masked within a batch.
    batch = D.BatchSource(src, global_batch=3, dp_rank=0, dp_size=1, shard=None).batch(0)
    assert batch["y"].shape == (3, N + 2, CT)
    assert batch["y_mask"].sum(1).tolist() == [N, N + 1, N + 2]


def test_latent_folder_npy_is_memory_mapped(tmp_path, monkeypatch):
    _latent_fixture(tmp_path, n=1)
    modes = []
    real = np.load

    def spy(path, *a, **kw):
        modes.append((str(path).rsplit(".", 2)[-2], kw.get("mmap_mode")))
        return real(path, *a, **kw)
    monkeypatch.setattr(D.np, "load", spy)
    D.LatentFolder(tmp_path, seed=1, shuffle=False, num_timesteps=10).sample(0, D.Shard("T", 1, 2))
    assert ("latent", "r") in modes and all(m == "r" for k, m in modes if k == "latent")


def test_shuffle_is_a_permutation_per_epoch(tmp_path):
    _latent_fixture(tmp_path, n=3)
    src = D.LatentFolder(tmp_path, seed=1, shuffle=True, num_timesteps=10)
    for epoch in range(3):
        assert sorted(src.index(epoch * 3 + i) for i in range(3)) == [0, 1, 2]


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_token_file_windows_and_pieces(tmp_path, dtype):
    L, n = 8, 40
    path = tmp_path / "tokens.bin"
    D.write_token_file(path, np.arange(n) + 1000, dtype)
    src = D.TokenFile(path, dtype, seed=0, shuffle=False, seq_len=L)
    assert src.num_samples == (n - 1) // L
    s = src.sample(2, None)
    assert s["input_ids"].tolist() == list(range(1016, 1024)) and s["labels"].tolist() == list(range(1017, 1025))
    for P in (2, 3):
        parts = [src.sample(2, D.Shard("seq", r, P)) for r in range(P)]
        assert torch.cat([p["input_ids"] for p in parts]).tolist() == s["input_ids"].tolist()
        assert torch.cat([p["labels"] for p in parts]).tolist() == s["labels"].tolist()


def test_synthetic_tokens_have_structure_and_pieces():
    src = D.SyntheticTokens(seed=3, num_samples=0, seq_len=12, vocab_size=50, branching=2)
    s = src.sample(5, None)
    ids = torch.cat([s["input_ids"], s["labels"][-1:]]).tolist()
    for a, b in zip(ids, ids[1:]):
        assert b in src.table[a]                                  # follows the Markov chain
    parts = [src.sample(5, D.Shard("seq", r, 3)) for r in range(3)]
    assert torch.cat([p["input_ids"] for p in parts]).tolist() == s["input_ids"].tolist()


# -- end to end -----------------------------------------------------------------------------------
def test_train_on_a_latent_folder_with_dsp_bf16(tmp_path):
    _latent_fixture(tmp_path / "latents", n=4)
    out = tmp_path / "run"
    th.run(["data=latents", f"data.path={tmp_path / 'latents'}", "parallel=dsp", "parallel.sp_size=2",
            "train.steps=3", "train.global_batch_size=2", "train.precision=bf16", "train.resume=none",
            f"train.out_dir={out}"], 2, timeout=120)
    m = th.metrics(out)
    assert len(m) == 3 and all(np.isfinite(r["loss"]) for r in m)
    assert m[-1]["data_position"] == 6


def test_train_on_a_token_file_with_zeco(tmp_path):
    rng = np.random.default_rng(0)
    D.write_token_file(tmp_path / "train.bin", rng.integers(0, 64, size=2000), "uint16")
    out = tmp_path / "run"
    th.run(["model=gla_tiny", "model.sample.seq_len=48", "data=tokens", f"data.path={tmp_path / 'train.bin'}",
            "parallel=zeco", "parallel.sp_size=2", "train.steps=3", "train.global_batch_size=2",
            "train.resume=none", f"train.out_dir={out}"], 2, timeout=120)
    m = th.metrics(out)
    assert len(m) == 3 and all(np.isfinite(r["loss"]) for r in m)
    assert abs(m[0]["loss"] - np.log(64)) < 0.3                 # uniform tokens: about log(vocab) at first


# -- packed documents (data.pack=true) ----------------------------------------------------------------
def _docs(rng, n, vocab, eod=None):
    """n documents of 3..17 tokens (ids 1..vocab-1; ending with ``eod`` when given)."""
    out = []
    for _ in range(n):
        d = rng.integers(1, vocab, size=int(rng.integers(3, 18)))
        if eod is not None:
            d[-1] = eod
        out.append(d)
    return out


def test_packed_windows_boundaries_and_labels(tmp_path):
    rng = np.random.default_rng(0)
    docs = _docs(rng, 12, 50)
    D.write_token_file(tmp_path / "a.bin", docs, "uint16")              # offsets index a.bin.docs.npy
    eod_docs = [np.append(d[:-1], 0) for d in docs]                    # the same lengths, ending with EOD = 0
    D.write_token_file(tmp_path / "b.bin", eod_docs, "uint16")
    L = 16
    starts = np.cumsum([0] + [len(d) for d in docs])
    by_index = D.TokenFile(tmp_path / "a.bin", "uint16", 0, False, L, pack=True)
    by_eod = D.TokenFile(tmp_path / "b.bin", "uint16", 0, False, L, pack=True, eod_id=0)
    for i in range(by_index.num_samples):
        base = i * L
        want = [0] + [int(s - base) for s in starts if base < s < base + L] + [L]
        s, e = by_index.sample(i, None), by_eod.sample(i, None)
        assert s["cu_seqlens"].tolist() == want and e["cu_seqlens"].tolist() == want
        for x in (s, e):   # the target of a document's last input (the next document's first token) is ignored
            ends = {int(t) - base - 1 for t in starts if base < t <= base + L}
            assert [j for j in range(L) if x["labels"][j] == -100] == sorted(ends)
        for P in (2, 3):   # each rank: its piece of tokens and labels, the whole window's boundaries
            parts = [by_index.sample(i, D.Shard("seq", r, P)) for r in range(P)]
            assert torch.cat([p["labels"] for p in parts]).tolist() == s["labels"].tolist()
            assert all(p["cu_seqlens"].tolist() == want for p in parts)
    b = D.BatchSource(by_index, global_batch=4, dp_rank=0, dp_size=1, shard=None).batch(0)
    assert b["cu_seqlens"].shape[0] == 4 and (b["cu_seqlens"][:, -1] == L).all()
    D.write_token_file(tmp_path / "c.bin", np.concatenate(eod_docs), "uint16")     # no index
    with pytest.raises(ValueError, match="eod_id"):
        D.TokenFile(tmp_path / "c.bin", "uint16", 0, False, L, pack=True)


@pytest.mark.parametrize("model, parallel", [("gdn_tiny", ["parallel=zeco"]),
                                             ("hybrid_tiny", ["parallel=zeco", "+parallel.options.attention=ring"])])
def test_train_packed_documents(tmp_path, model, parallel):
    """2 processes, packed file with EOD ids (the hybrid with Ulysses is the same run with
    parallel=p2p +parallel.options.attention=ulysses; its model-level equivalence is in
    tests/test_documents_models.py)."""
    rng = np.random.default_rng(1)
    D.write_token_file(tmp_path / "train.bin", np.concatenate(_docs(rng, 80, 64, eod=0)), "uint16", vocab_size=64)
    out = tmp_path / "run"
    th.run([f"model={model}", "model.sample.seq_len=24", "data=tokens", f"data.path={tmp_path / 'train.bin'}",
            "data.pack=true", "data.eod_id=0", *parallel, "parallel.sp_size=2", "train.steps=2",
            "train.global_batch_size=2", "train.resume=none", f"train.out_dir={out}"], 2, timeout=180)
    m = th.metrics(out)
    assert len(m) == 2 and all(np.isfinite(r["loss"]) for r in m)
