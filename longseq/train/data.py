"""Training data: deterministic per (seed, global sample index), sharded by DP group, optionally
read already sharded along the sequence by each SP rank.

The stream is indexed by a *position*: step ``s`` consumes global positions
``[s·G, (s+1)·G)`` (G = ``train.global_batch_size``); DP group ``d`` takes the ``b = G / DP``
positions ``s·G + d·b ... s·G + d·b + b - 1``. Every SP rank of a group computes the same
positions, so it builds (or reads) the same samples; a checkpoint stores the next position, and
nothing else is needed to resume the stream exactly. A position maps to a sample index (the
epoch's permutation of a finite set, or the position itself for an endless synthetic stream); the
*sample* is a function of the index, the diffusion noise and timestep of the position.

Sources (``data.kind``):

* ``synthetic``: ST-DiT latents ``[C, T, H, W]`` and captions ``[N, C_text]`` ~ N(0, 1) (shapes
  from ``model.sample``); GLA token streams from a random sparse Markov chain over the model's
  vocabulary (``data.markov_branching`` successors a token, 0 = uniform random tokens).
* ``latents``: a folder with one sample per file set (``<name>.latent.npy`` + ``<name>.caption.npy``
  [+ ``<name>.mask.npy``], or ``<name>.pt`` / ``<name>.safetensors`` with tensors ``latent``,
  ``caption`` [, ``mask``]), read lazily (``.npy`` through ``numpy.load(mmap_mode="r")``).
* ``tokens``: a flat headerless binary file of token ids (``data.dtype``), read with
  ``numpy.memmap``; sample i is the window ``[i·L, i·L + L + 1)``; an SP rank with the piece
  ``[a, b)`` of the L inputs reads only ``[i·L + a, i·L + b + 1)``. A sidecar ``<file>.meta.json``
  (``{"dtype", "vocab_size", "num_tokens"}``, written by :func:`write_token_file`) is checked against
  ``data.dtype``, the model's vocabulary and the file's size before training; without one, a window
  with an id >= the vocabulary raises naming the file and position.
  **Packed documents** (``data.pack=true``): the file is documents back to back, and each window
  carries the boundaries of the documents it holds, ``cu_seqlens`` (``[0, ..., L]`` over the L
  inputs, :mod:`longseq.documents`). They come from an end-of-document id (``data.eod_id``: a
  document ends *with* its EOD token, as GPT-style packing writes them) or from an index of
  document start offsets (``data.offsets``, a ``.npy`` of int64 file offsets, default
  ``<file>.docs.npy`` when it exists; :func:`write_token_file` writes one from a list of documents).
  Every SP rank gets the whole window's boundaries (identical on the group) with its piece of the
  tokens; the label of each document's last input (whose next token opens the next document) is
  ``-100`` (ignored), so no token is predicted across a boundary. With ``eod_id`` each rank reads
  the whole window once to find the boundaries (an offsets index needs no token read).

Every sample is checked finite when loaded; a file that cannot be read raises naming it.

A batch is a dict of tensors with a leading batch dim; ST-DiT: ``x0``, ``noise`` (float32
``[b, C, T', H, W]``), ``t`` (int64 ``[b]``), ``y`` ``[b, N, C_text]``, ``y_mask`` (bool, only
when the files carry masks); GLA: ``input_ids``, ``labels`` (int64 ``[b, L']``) and
``tokens_whole`` (the label tokens of the SP group's samples), and with packing ``cu_seqlens`` (int64
``[b, D+1]``, the whole windows' boundaries; rows with fewer documents repeat L at the end).
``T'``/``L'`` are this rank's piece when the method reads pre-sharded inputs, else whole.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from longseq.documents import Documents, document_labels
from longseq.sharding import shard_range

from .config import ConfigError

__all__ = ["Shard", "BatchSource", "make_source", "check_data", "seed_for", "write_latent_sample", "check_token_meta",
           "write_token_file", "docs_index_path"]

TOKEN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32, "int32": np.int32}


@dataclasses.dataclass(frozen=True)
class Shard:
    """This rank's piece of the sequence dimension: ``dim`` ("T" or "seq"), rank and size in the SP group."""

    dim: str
    rank: int
    size: int

    def range(self, n: int) -> tuple[int, int]:
        return shard_range(n, self.size, self.rank)


def seed_for(*parts: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence: well mixed, stable across versions)."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFF for p in parts]).generate_state(2, np.uint64)
    return int((int(state[0]) << 1 ^ int(state[1])) & 0x7FFFFFFFFFFFFFFF)


def _gen(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed_for(*parts))


# Stream tags keep the generators of different uses apart.
_SAMPLE, _NOISE, _PERM, _TABLE = 1, 2, 3, 4


# ----------------------------------------------------------------------------------------------
# Sources: one sample at a time
# ----------------------------------------------------------------------------------------------
class _Source:
    num_samples: Optional[int] = None       # None: endless

    def __init__(self, seed: int, shuffle: bool):
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self._perm_epoch, self._perm = None, None

    def index(self, position: int) -> int:
        n = self.num_samples
        if n is None:
            return position
        epoch, i = divmod(position, n)
        if not self.shuffle:
            return i
        if self._perm_epoch != epoch:
            self._perm = torch.randperm(n, generator=_gen(self.seed, _PERM, epoch)).tolist()
            self._perm_epoch = epoch
        return self._perm[i]


class _VideoSource(_Source):
    """ST-DiT samples: subclasses provide ``load(index, t_range) -> (x0, y, mask)`` and ``frames(index)``."""

    def __init__(self, seed, shuffle, num_timesteps: int):
        super().__init__(seed, shuffle)
        self.num_timesteps = int(num_timesteps)

    def sample(self, position: int, shard: Optional[Shard]) -> dict:
        idx = self.index(position)
        shape = self.shape(idx)                                  # [C, T, H, W] whole
        t_range = shard.range(shape[1]) if shard is not None else (0, shape[1])
        x0, y, mask = self.load(idx, t_range)
        g = _gen(self.seed, _NOISE, position)
        t = torch.randint(self.num_timesteps, (), generator=g)
        noise = torch.randn(shape, generator=g)                  # whole, so every layout draws the same
        out = {"x0": x0, "noise": noise[:, t_range[0]:t_range[1]].contiguous(), "t": t, "y": y}
        if mask is not None:
            out["y_mask"] = mask
        return out


class SyntheticVideo(_VideoSource):
    def __init__(self, seed, num_samples, num_timesteps, shape, caption_shape):
        super().__init__(seed, False, num_timesteps)
        self.num_samples = int(num_samples) or None
        self._shape, self._caption = tuple(shape), tuple(caption_shape)

    def shape(self, idx):
        return self._shape

    def load(self, idx, t_range):
        g = _gen(self.seed, _SAMPLE, idx)
        x0 = torch.randn(self._shape, generator=g)[:, t_range[0]:t_range[1]].contiguous()
        y = torch.randn(self._caption, generator=g)
        return x0, y, None


def _latent_files(path: Path) -> list[tuple[str, str]]:
    """(name, kind) of every sample in the folder, sorted by name; kind: npy | pt | safetensors."""
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".latent.npy"):
            out[f[: -len(".latent.npy")]] = "npy"
        elif f.endswith(".pt"):
            out[f[:-3]] = "pt"
        elif f.endswith(".safetensors"):
            out[f[: -len(".safetensors")]] = "safetensors"
    return sorted(out.items())


def _named(path, what: str):
    """Run ``what()``; any read error comes out as a ValueError naming ``path``."""
    try:
        return what()
    except (ValueError, OSError, EOFError, RuntimeError, KeyError) as e:
        raise ValueError(f"cannot read {path}: {type(e).__name__}: {e} (truncated or not a sample file? rewrite "
                         "it or remove it from data.path)") from e


class LatentFolder(_VideoSource):
    """A folder of latent videos + caption embeddings (see the module docstring)."""

    def __init__(self, path, seed, shuffle, num_timesteps):
        super().__init__(seed, shuffle, num_timesteps)
        self.path = Path(path)
        self.files = _latent_files(self.path)
        self.num_samples = len(self.files)
        self._shapes: dict[int, tuple] = {}

    def _p(self, idx, suffix):
        return self.path / f"{self.files[idx][0]}{suffix}"

    def shape(self, idx):
        name, kind = self.files[idx]
        suffix = {"npy": ".latent.npy", "pt": ".pt", "safetensors": ".safetensors"}[kind]
        return _named(self._p(idx, suffix), lambda: self._shape(idx))

    def load(self, idx, t_range):
        name, kind = self.files[idx]
        suffix = {"npy": ".latent.npy", "pt": ".pt", "safetensors": ".safetensors"}[kind]
        out = _named(self._p(idx, suffix), lambda: self._load(idx, t_range))
        for what, t in zip(("latent", "caption"), out[:2]):
            if not torch.isfinite(t).all():
                raise ValueError(f"{self._p(idx, suffix)}: its {what} holds NaN or inf; fix or remove the sample")
        return out

    def _shape(self, idx):
        if idx not in self._shapes:
            name, kind = self.files[idx]
            if kind == "npy":
                s = np.load(self._p(idx, ".latent.npy"), mmap_mode="r").shape
            elif kind == "pt":
                s = torch.load(self._p(idx, ".pt"), mmap=True, weights_only=True, map_location="cpu")["latent"].shape
            else:
                from safetensors import safe_open
                with safe_open(str(self._p(idx, ".safetensors")), framework="pt") as f:
                    s = f.get_slice("latent").get_shape()
            if len(s) != 4:
                raise ValueError(f"{name}: latent must be [C, T, H, W], got shape {list(s)}")
            self._shapes[idx] = tuple(int(v) for v in s)
        return self._shapes[idx]

    def _load(self, idx, t_range):
        a, b = t_range
        name, kind = self.files[idx]
        if kind == "npy":
            lat = np.load(self._p(idx, ".latent.npy"), mmap_mode="r")
            x0 = torch.from_numpy(np.array(lat[:, a:b], dtype=np.float32))   # the one read: a writable copy
            y = torch.from_numpy(np.ascontiguousarray(np.load(self._p(idx, ".caption.npy")), dtype=np.float32))
            mp = self._p(idx, ".mask.npy")
            mask = torch.from_numpy(np.load(mp).astype(bool)) if mp.exists() else None
        elif kind == "pt":
            d = torch.load(self._p(idx, ".pt"), mmap=True, weights_only=True, map_location="cpu")
            x0 = d["latent"][:, a:b].float().contiguous()
            y = d["caption"].float().contiguous()
            mask = d["mask"].bool() if "mask" in d else None
        else:
            from safetensors import safe_open
            with safe_open(str(self._p(idx, ".safetensors")), framework="pt") as f:
                x0 = f.get_slice("latent")[:, a:b].float().contiguous()
                y = f.get_tensor("caption").float()
                mask = f.get_tensor("mask").bool() if "mask" in f.keys() else None
        return x0, y, mask


class _TokenSource(_Source):
    packed = False

    def __init__(self, seed, shuffle, seq_len):
        super().__init__(seed, shuffle)
        self.seq_len = int(seq_len)

    def sample(self, position: int, shard: Optional[Shard]) -> dict:
        L = self.seq_len
        a, b = shard.range(L) if shard is not None else (0, L)
        idx = self.index(position)
        w = self.window(idx, a, b + 1)          # tokens [a, b] of the window: b - a + 1
        w = torch.as_tensor(w, dtype=torch.int64)
        out = {"input_ids": w[:-1].contiguous(), "labels": w[1:].contiguous()}
        if self.packed:
            bounds, ends_here = self.boundaries(idx)
            cu = torch.as_tensor(bounds, dtype=torch.int64)
            out["labels"] = document_labels(out["labels"].unsqueeze(0), Documents.for_piece(cu, a, b))[0]
            if ends_here and b == L and b > a:
                out["labels"][-1] = -100          # the next window opens a new document
            out["cu_seqlens"] = cu
        return out


class SyntheticTokens(_TokenSource):
    """Token streams from a sparse random Markov chain (each token has ``branching`` successors)."""

    def __init__(self, seed, num_samples, seq_len, vocab_size, branching):
        super().__init__(seed, False, seq_len)
        self.num_samples = int(num_samples) or None
        self.vocab, self.branching = int(vocab_size), int(branching)
        if self.branching > 0:
            rng = np.random.default_rng(seed_for(self.seed, _TABLE))
            self.table = rng.integers(0, self.vocab, size=(self.vocab, self.branching), dtype=np.int64)

    def window(self, idx, start, stop):
        rng = np.random.default_rng(seed_for(self.seed, _SAMPLE, idx))
        n = self.seq_len + 1
        if self.branching <= 0:
            return rng.integers(0, self.vocab, size=n, dtype=np.int64)[start:stop]
        choice = rng.integers(0, self.branching, size=n, dtype=np.int64)
        out = np.empty(n, dtype=np.int64)
        tok = int(rng.integers(0, self.vocab))
        table = self.table
        for i in range(stop):                                  # a chain: the prefix is needed anyway
            out[i] = tok
            tok = int(table[tok, choice[i]])
        return out[start:stop]


class TokenFile(_TokenSource):
    def __init__(self, path, dtype, seed, shuffle, seq_len, vocab_size: Optional[int] = None, *, pack: bool = False,
                 eod_id: Optional[int] = None, offsets=None):
        super().__init__(seed, shuffle, seq_len)
        self.path = str(path)
        self.vocab = vocab_size
        self.tokens = _named(self.path, lambda: np.memmap(self.path, dtype=TOKEN_DTYPES[str(dtype)], mode="r"))
        self.num_samples = (len(self.tokens) - 1) // self.seq_len
        self.packed, self.eod_id, self.starts = bool(pack), eod_id, None
        if self.packed:
            if offsets is None and eod_id is None and docs_index_path(path).exists():
                offsets = docs_index_path(path)
            if offsets is not None:
                st = _named(offsets, lambda: np.load(str(offsets), mmap_mode="r"))
                if st.ndim != 1 or (st.size and (int(st[0]) < 0 or bool(np.any(np.diff(st) < 0)))):
                    raise ValueError(f"{offsets}: a document index must be a 1-D array of increasing start offsets")
                self.starts = np.asarray(st, dtype=np.int64)
            elif eod_id is None:
                raise ValueError(f"data.pack=true needs the document boundaries of {self.path}: pass data.eod_id=<the "
                                 "end-of-document token id> or data.offsets=<a .npy of document start offsets> "
                                 f"(or write {docs_index_path(path).name} next to the file)")

    def boundaries(self, idx: int) -> tuple[list, bool]:
        """``(cu_seqlens, ends)`` of window ``idx``: ``[0, ..., L]`` over its L inputs, and whether a
        document ends with the last input (its target is another document's first token)."""
        L = self.seq_len
        base = idx * L
        if self.starts is not None:
            lo, hi, end = np.searchsorted(self.starts, [base + 1, base + L, base + L + 1], side="left")
            return [0, *(self.starts[lo:hi] - base).tolist(), L], bool(end > hi)
        w = np.asarray(self.tokens[base: base + L], dtype=np.int64)
        eod = w == int(self.eod_id)                                    # a document ends with its EOD token
        return [0, *(np.nonzero(eod[:-1])[0] + 1).tolist(), L], bool(eod[-1]) if w.size else False

    def window(self, idx, start, stop):
        base = idx * self.seq_len
        w = np.asarray(self.tokens[base + start: base + stop], dtype=np.int64)
        if self.vocab is not None and w.size and (int(w.max()) >= self.vocab or int(w.min()) < 0):
            bad = int(np.argmax((w >= self.vocab) | (w < 0)))
            raise ValueError(f"{self.path}: token {base + start + bad} is {int(w[bad])}, outside the model's vocabulary "
                             f"of {self.vocab}: check data.dtype (a uint32 file read as uint16?) and the model's "
                             "vocab_size")
        return w


def token_meta_path(path) -> Path:
    return Path(str(path) + ".meta.json")


def check_token_meta(path, dtype: str, vocab: Optional[int]) -> None:
    """Compare a token file with its sidecar (if any): dtype, vocabulary, size. Raises ConfigError."""
    import json
    mp = token_meta_path(path)
    if not mp.exists():
        return
    try:
        meta = json.loads(mp.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{mp}: unreadable ({e}); rewrite it or remove it") from None
    if meta.get("dtype") and meta["dtype"] != dtype:
        raise ConfigError(f"data.path={str(path)!r} holds {meta['dtype']} token ids ({mp.name}) but data.dtype={dtype}: "
                          f"pass data.dtype={meta['dtype']}")
    if vocab is not None and meta.get("vocab_size") is not None and int(meta["vocab_size"]) > vocab:
        raise ConfigError(f"data.path={str(path)!r} has a vocabulary of {meta['vocab_size']} ({mp.name}) but the model "
                          f"has {vocab}: raise the model's vocab_size or retokenize")
    n = meta.get("num_tokens")
    size = Path(path).stat().st_size
    if n is not None and int(n) * np.dtype(TOKEN_DTYPES[dtype]).itemsize != size:
        raise ConfigError(f"data.path={str(path)!r} has {size} bytes but {mp.name} says {n} {dtype} tokens "
                          f"({int(n) * np.dtype(TOKEN_DTYPES[dtype]).itemsize} bytes): the file is truncated or "
                          "was rewritten without its sidecar")


# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------
class BatchSource:
    """This rank's batches: ``batch(step_position)`` for the DP group's ``micro_batch`` samples."""

    def __init__(self, source, *, global_batch: int, dp_rank: int, dp_size: int, shard: Optional[Shard],
                 sp_size: int = 1, device: torch.device | str = "cpu"):
        self.source, self.shard, self.device = source, shard, torch.device(device)
        self.global_batch, self.dp_rank, self.dp_size = int(global_batch), int(dp_rank), int(dp_size)
        self.micro = self.global_batch // self.dp_size
        self.sp_size = sp_size

    def positions(self, start: int) -> range:
        first = start + self.dp_rank * self.micro
        return range(first, first + self.micro)

    def batch(self, start: int) -> dict:
        samples = [self.source.sample(p, self.shard) for p in self.positions(start)]
        if "y" in samples[0]:
            _pad_captions(samples)
        if "cu_seqlens" in samples[0]:
            _pad_boundaries(samples)
        try:
            out = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
        except RuntimeError as e:
            shapes = {k: sorted({tuple(s[k].shape) for s in samples}) for k in samples[0]}
            raise ValueError(f"the samples of one batch differ in shape ({shapes}); every sample must have the "
                             "same latent shape [C, T, H, W] (captions may differ in length)") from e
        for k, v in out.items():
            if v.is_floating_point() and not torch.isfinite(v).all():
                raise ValueError(f"the batch at data position {start} holds NaN or inf in {k!r}: check the data")
        if "labels" in out:
            out["tokens_whole"] = self.micro * self.source.seq_len
        nb = self.device.type == "cuda"
        # cu_seqlens stays on the CPU: the ops read the boundaries there (no device sync per layer)
        return {k: v.to(self.device, non_blocking=nb) if isinstance(v, torch.Tensor) and k != "cu_seqlens" else v
                for k, v in out.items()}


def _pad_boundaries(samples: list) -> None:
    """Windows with fewer documents repeat their length at the end (empty documents), so the
    ``cu_seqlens`` of a batch stack to ``[b, D+1]``."""
    n = max(s["cu_seqlens"].numel() for s in samples)
    for s in samples:
        cu = s["cu_seqlens"]
        if cu.numel() < n:
            s["cu_seqlens"] = torch.cat([cu, cu[-1:].expand(n - cu.numel())])


def _pad_captions(samples: list) -> None:
    """Captions of different lengths (or some with masks): pad to the longest, mask the padding."""
    n = max(s["y"].shape[0] for s in samples)
    if all(s["y"].shape[0] == n for s in samples) and all("y_mask" not in s for s in samples):
        return
    for s in samples:
        y, m = s["y"], s.get("y_mask")
        m = torch.ones(y.shape[0], dtype=torch.bool) if m is None else m
        if y.shape[0] < n:
            y = torch.cat([y, y.new_zeros(n - y.shape[0], *y.shape[1:])])
            m = torch.cat([m, m.new_zeros(n - m.shape[0])])
        s["y"], s["y_mask"] = y, m


def make_source(cfg):
    """The sample source of ``data.kind`` for ``model.family``."""
    from .methods import family_of
    kind, fam = str(cfg.data.kind), family_of(cfg)
    mc = fam.model_config(cfg.model)
    if fam.task == "diffusion":
        nt = int(cfg.model.objective.num_timesteps)
        if kind == "synthetic":
            s = cfg.model.sample
            return SyntheticVideo(cfg.data.seed, cfg.data.num_samples, nt,
                                  (mc.in_channels, int(s.frames), int(s.height), int(s.width)),
                                  (int(s.caption_tokens), mc.caption_channels))
        return LatentFolder(cfg.data.path, cfg.data.seed, cfg.data.shuffle, nt)
    L = int(cfg.model.sample.seq_len)
    if kind == "synthetic":
        return SyntheticTokens(cfg.data.seed, cfg.data.num_samples, L, int(mc.vocab_size),
                               cfg.data.markov_branching)
    d = cfg.data
    eod, offsets = d.get("eod_id", None), d.get("offsets", None)
    return TokenFile(d.path, d.dtype, d.seed, d.shuffle, L, int(mc.vocab_size), pack=bool(d.get("pack", False)),
                     eod_id=None if eod is None else int(eod), offsets=offsets)


def check_data(cfg, layout) -> None:
    """Data errors that need no process group: wrong kind for the family, missing or unusable paths."""
    from .methods import family_of
    kind, family = str(cfg.data.kind), str(cfg.model.family)
    allowed = family_of(cfg).data_kinds
    if kind not in ("synthetic", "latents", "tokens"):
        raise ConfigError(f"data.kind={kind!r} is unknown: choose data=synthetic, data=latents or data=tokens")
    if kind not in allowed:
        raise ConfigError(f"data={kind} does not fit model.family={family}: use data= one of {', '.join(allowed)}")
    if "seq_len" in cfg.model.sample and int(cfg.model.sample.seq_len) < 1:
        raise ConfigError(f"model.sample.seq_len={cfg.model.sample.seq_len}: a sample needs at least 1 token")
    if kind == "synthetic":
        if int(cfg.data.num_samples) < 0:
            raise ConfigError("data.num_samples must be >= 0 (0: an endless stream)")
        return
    path = Path(str(cfg.data.path)).expanduser()
    if kind == "latents":
        if not path.is_dir():
            raise ConfigError(f"data.path={str(cfg.data.path)!r} is not a folder (data=latents needs a folder of "
                              "<name>.latent.npy + <name>.caption.npy, .pt or .safetensors samples): pass "
                              "data.path=/path/to/latents (docs/training.md, 'Data')")
        files = _latent_files(path)
        if not files:
            raise ConfigError(f"data.path={str(path)!r} holds no samples (*.latent.npy, *.pt, *.safetensors): "
                              "see docs/training.md, 'Data'")
        missing = [n for n, k in files if k == "npy" and not (path / f"{n}.caption.npy").exists()]
        if missing:
            raise ConfigError(f"data.path={str(path)!r}: {len(missing)} latent(s) have no caption file, e.g. "
                              f"{missing[0]}.caption.npy: write one [N, C_text] array per latent")
        _check_latent_frames(path, files, layout.sp_size)
        return
    if not path.is_file():
        raise ConfigError(f"data.path={str(cfg.data.path)!r} is not a file (data=tokens needs a flat binary file "
                          "of token ids): pass data.path=/path/to/train.bin (docs/training.md, 'Data')")
    dtype = str(cfg.data.dtype)
    if dtype not in TOKEN_DTYPES:
        raise ConfigError(f"data.dtype={dtype!r} is not one of {', '.join(TOKEN_DTYPES)}")
    if cfg.data.get("pack", False):
        offsets = cfg.data.get("offsets", None)
        if cfg.data.get("eod_id", None) is None and offsets is None and not docs_index_path(path).exists():
            raise ConfigError(f"data.pack=true needs the document boundaries of {path}: pass data.eod_id=<the "
                              "end-of-document token id> or data.offsets=<a .npy of document start offsets> (or write "
                              f"{docs_index_path(path).name} next to it; docs/documents.md, 'Data: data.pack=true')")
        if offsets is not None and not Path(str(offsets)).expanduser().is_file():
            raise ConfigError(f"data.offsets={str(offsets)!r} is not a file (a .npy of int64 document start offsets)")
    check_token_meta(path, dtype, int(family_of(cfg).model_config(cfg.model).vocab_size))
    size, item = path.stat().st_size, np.dtype(TOKEN_DTYPES[dtype]).itemsize
    if size % item:
        raise ConfigError(f"data.path={str(path)!r} has {size} bytes, not a multiple of the {item}-byte "
                          f"data.dtype={dtype}: "
                          "the file is truncated or holds another dtype (data.dtype=uint16 | uint32 | int32)")
    if not token_meta_path(path).exists():
        _check_not_wider(path, dtype)
    n = size // item
    L = int(cfg.model.sample.seq_len)
    if n < L + 1:
        raise ConfigError(f"data.path={str(path)!r} holds {n} tokens, fewer than one window of "
                          f"model.sample.seq_len + 1 = {L + 1}: use a larger file or a smaller model.sample.seq_len")


def _check_not_wider(path: Path, dtype: str, probe: int = 1 << 16) -> None:
    """Without a sidecar, a file of 32-bit ids read as ``uint16`` looks like ids with a zero after
    each (little-endian high halves): refuse it when the first ``probe`` values show that pattern."""
    if dtype != "uint16":
        return
    head = np.fromfile(str(path), dtype=np.uint16, count=probe)
    if head.size >= 16 and head.size % 2 == 0 and not head[1::2].any() and head[0::2].any():
        raise ConfigError(f"data.path={str(path)!r} read as data.dtype=uint16 has a zero after every id: it looks like "
                          "a file of 32-bit ids; pass data.dtype=uint32 (or int32), or write the file with "
                          "longseq.train.data.write_token_file, whose sidecar records the dtype")


def _check_latent_frames(path: Path, files: list, sp_size: int) -> None:
    """Under SP the latent's T dimension is split over the ranks: the first sample must have at least
    ``sp_size`` frames (read from its ``.npy`` header, nothing loaded)."""
    if sp_size <= 1:
        return
    for name, kind in files[:1]:
        if kind != "npy":
            return
        shape = np.load(str(path / f"{name}.latent.npy"), mmap_mode="r").shape
        if len(shape) == 4 and shape[1] < sp_size:
            raise ConfigError(f"{path / (name + '.latent.npy')}: {shape[1]} latent frame(s) (T of [C, T, H, W] = "
                              f"{list(shape)}) cannot be split over parallel.sp_size={sp_size} ranks: use latents with "
                              f"at least {sp_size} frames or a smaller parallel.sp_size")


# ----------------------------------------------------------------------------------------------
# Writing fixtures (tests, docs)
# ----------------------------------------------------------------------------------------------
def write_latent_sample(folder, name: str, latent: np.ndarray, caption: np.ndarray,
                        mask: Optional[np.ndarray] = None) -> None:
    """Write one sample in the ``.npy`` layout of ``data=latents``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"{name}.latent.npy", np.ascontiguousarray(latent))
    np.save(folder / f"{name}.caption.npy", np.ascontiguousarray(caption))
    if mask is not None:
        np.save(folder / f"{name}.mask.npy", np.asarray(mask, dtype=bool))


def docs_index_path(path) -> Path:
    """The default document index of a token file: ``<file>.docs.npy`` (int64 start offsets)."""
    return Path(str(path) + ".docs.npy")


def write_token_file(path, tokens, dtype: str = "uint16", vocab_size: Optional[int] = None) -> None:
    """Write token ids as a flat binary file for ``data=tokens``, with its sidecar
    ``<path>.meta.json`` (dtype, vocab_size (default: the largest id + 1), num_tokens). ``tokens`` may
    be a list of documents (1-D arrays): they are written back to back, with the index of their
    start offsets ``<path>.docs.npy`` (for ``data.pack=true``)."""
    import json
    if isinstance(tokens, (list, tuple)) and tokens and not np.isscalar(tokens[0]):
        docs = [np.asarray(d).reshape(-1) for d in tokens]
        np.save(docs_index_path(path), np.cumsum([0] + [d.size for d in docs[:-1]]).astype(np.int64))
        tokens = np.concatenate(docs)
    a = np.asarray(tokens)
    out = a.astype(TOKEN_DTYPES[dtype])
    if not np.array_equal(out.astype(np.int64), a.astype(np.int64)):
        raise ValueError(f"token ids do not fit in {dtype}: choose a wider dtype")
    out.tofile(str(path))
    vocab = int(vocab_size) if vocab_size is not None else (int(a.max()) + 1 if a.size else 0)
    token_meta_path(path).write_text(json.dumps({"dtype": dtype, "vocab_size": vocab, "num_tokens": int(a.size)}))

