"""The training entry's trust cases (issue 22, items 3, 5, 7): every bad config value is a
ConfigError naming the fix before any process group exists (the trial's raw-traceback and silent
cases); a resume that does not fit the run is refused in one line; weights made non-finite by an
update are never checkpointed (``skip`` rolls the update back); a checkpoint write that fails in
torch's zip writer stops every rank cleanly; one control collective a step."""
from __future__ import annotations

import copy
import json
import math
import re

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from longseq.train.config import ConfigError, load_config, resume_mismatch, validate
from tests import train_helpers as th

_BASES: dict = {}


def _cfg(model: str, overrides: dict):
    if model not in _BASES:
        _BASES[model] = load_config(["model=gla_tiny", "parallel=zeco"] if model == "gla" else [])
    c = copy.deepcopy(_BASES[model])
    OmegaConf.set_struct(c, False)
    for k, v in overrides.items():
        OmegaConf.update(c, k, v, force_add=True)
    return c


# (model, overrides, a fragment of the message): the trial's 27 raw-traceback and 8 silent values,
# and their neighbours (docs/training.md, "Bad input").
BAD = [
    ("stdit", {"train.collective_timeout_s": 0}, "collective_timeout_s=0 must be a number > 0"),
    ("stdit", {"train.collective_timeout_s": -1}, "collective_timeout_s=-1"),
    ("stdit", {"train.collective_timeout_s": float("nan")}, "collective_timeout_s=nan"),
    ("stdit", {"train.collective_timeout_s": "abc"}, "collective_timeout_s='abc'"),
    ("stdit", {"train.timeout_s": 0}, "train.timeout_s=0"),
    ("stdit", {"optim.lr": -1.0}, "optim.lr=-1.0 must be a number > 0"),
    ("stdit", {"optim.lr": float("nan")}, "optim.lr=nan"),
    ("stdit", {"optim.lr": "abc"}, "optim.lr='abc'"),
    ("stdit", {"optim.lr": 1e39}, "optim.lr=1e+39"),                  # AdamW's float32 step size overflows
    ("stdit", {"optim.betas": [0.9]}, "optim.betas"),
    ("stdit", {"optim.betas": [0.9, 1.5]}, "optim.betas"),
    ("stdit", {"optim.betas": "abc"}, "optim.betas"),
    ("stdit", {"optim.eps": -1.0}, "optim.eps=-1.0"),
    ("stdit", {"optim.eps": "abc"}, "optim.eps='abc'"),
    ("stdit", {"optim.name": "sgd"}, "only adamw"),
    ("stdit", {"optim.min_lr_ratio": -1.0}, "optim.min_lr_ratio=-1.0"),
    ("stdit", {"optim.min_lr_ratio": 2.0}, "optim.min_lr_ratio=2.0"),
    ("stdit", {"optim.grad_clip": -1.0}, "optim.grad_clip=-1.0"),
    ("stdit", {"optim.weight_decay": -1.0}, "optim.weight_decay=-1.0"),
    ("stdit", {"optim.warmup_steps": -1}, "optim.warmup_steps=-1"),
    ("stdit", {"train.keep_checkpoints": -1}, "train.keep_checkpoints=-1"),
    ("stdit", {"train.log_every": 0}, "train.log_every=0"),
    ("stdit", {"train.seed": 2 ** 70}, "train.seed=1180591620717411303424"),
    ("stdit", {"train.seed": -1}, "train.seed=-1"),
    ("stdit", {"data.seed": 2 ** 70}, "data.seed"),
    ("stdit", {"train.on_nonfinite": "ignore"}, "train.on_nonfinite='ignore'"),
    ("stdit", {"train.fault_kind": "bogus"}, "train.fault_kind='bogus'"),
    ("stdit", {"train.fault_at_step": 3, "train.fault_rank": 99}, "train.fault_rank=99"),
    ("stdit", {"train.fault_at_step": 0}, "train.fault_at_step=0"),
    ("stdit", {"train.backend": "nccl", "train.device": "cpu"}, "train.backend=nccl needs CUDA"),
    ("stdit", {"train.save_checkpoints": "maybe"}, "train.save_checkpoints"),
    ("stdit", {"train.tensorboard": "maybe"}, "train.tensorboard"),
    ("stdit", {"train.debug_sleep_s": -1.0}, "train.debug_sleep_s"),
    ("stdit", {"train.peak_tflops": 0}, "train.peak_tflops"),
    ("stdit", {"parallel.sp_size": 1.5}, "parallel.sp_size=1.5 is not an integer"),
    ("stdit", {"model.objective.beta_end": 2.0}, "beta_end=2.0"),
    ("stdit", {"model.objective.beta_start": 0.5}, "beta_end=0.02 is below beta_start=0.5"),
    ("stdit", {"model.objective.num_timesteps": 0}, "num_timesteps=0"),
    ("stdit", {"model.sample.frames": 0}, "model.sample.frames=0"),
    ("stdit", {"model.overrides.num_heads": 3}, "hidden_size must be divisible by num_heads"),
    ("stdit", {"model.overrides.hidden_size": 0}, "hidden_size=0 must be positive"),
    ("stdit", {"model.overrides.depth": 0}, "depth=0 must be positive"),
    ("stdit", {"parallel.options.bogus": 1}, "parallel.options.bogus is not an option of parallel=dsp"),
    ("stdit", {"parallel.options.gather_output": "yes"}, "must be true or false"),
    ("gla", {"model.overrides.num_heads": 3}, "divisible by num_heads 3"),
    ("gla", {"model.overrides.hidden_size": 0}, "hidden_size=0"),
    ("gla", {"model.overrides.vocab_size": 0}, "vocab_size=0"),
    ("gla", {"parallel.options.num_blocks": 0}, "parallel.options.num_blocks=0 must be a positive integer"),
    ("gla", {"data.markov_branching": -1}, "data.markov_branching=-1"),
    ("gla", {"model.sample.seq_len": 0}, "model.sample.seq_len=0"),
]


@pytest.mark.parametrize("model,overrides,fragment", BAD,
                         ids=[",".join(f"{k}={v}" for k, v in o.items()) for _, o, _ in BAD])
def test_a_bad_value_is_a_config_error_naming_it(model, overrides, fragment):
    with pytest.raises(ConfigError) as e:
        validate(_cfg(model, overrides), 2)
    assert fragment in str(e.value), str(e.value)


def test_out_dir_a_file_and_token_files_of_the_wrong_shape(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        validate(_cfg("stdit", {"train.out_dir": str(f)}), 1)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(np.arange(1000, dtype=np.uint16).tobytes() + b"\x01")
    tok = {"data.kind": "tokens", "data.path": str(odd), "data.dtype": "uint16", "data.shuffle": True,
           "model.sample.seq_len": 16}
    with pytest.raises(ConfigError, match="not a multiple of the 2-byte"):
        validate(_cfg("gla", tok), 1)
    wide = tmp_path / "wide.bin"                              # uint32 ids, no sidecar, read as uint16
    (np.arange(2000) % 60 + 1).astype(np.uint32).tofile(wide)
    with pytest.raises(ConfigError, match="32-bit ids; pass data.dtype=uint32"):
        validate(_cfg("gla", {**tok, "data.path": str(wide)}), 1)
    validate(_cfg("gla", {**tok, "data.path": str(wide), "data.dtype": "uint32"}), 1)


def test_latents_with_fewer_frames_than_sp_ranks(tmp_path):
    from longseq.train.data import write_latent_sample
    write_latent_sample(tmp_path, "a", np.zeros((4, 1, 8, 8), np.float32), np.zeros((8, 16), np.float32))
    c = _cfg("stdit", {"data.kind": "latents", "data.path": str(tmp_path), "data.shuffle": True})
    with pytest.raises(ConfigError, match="1 latent frame"):
        validate(c, 2)


def test_a_resume_that_does_not_fit_is_refused_in_one_line():
    new = _cfg("stdit", {"model.overrides.depth": 4})
    old = OmegaConf.to_container(_cfg("stdit", {}), resolve=True)
    msg = resume_mismatch(old, new, "ckpt_step00000004.pt")
    assert "another model" in msg and "train.resume=none" in msg and "train.out_dir" in msg and "\n" not in msg
    gla = OmegaConf.to_container(_cfg("gla", {}), resolve=True)
    assert "model.family='gla'" in resume_mismatch(gla, _cfg("stdit", {}), "x")
    for key, val in (("train.global_batch_size", 8), ("data.seed", 7)):
        msg = resume_mismatch(old, _cfg("stdit", {key: val}), "x")
        assert key in msg and "train.resume=none" in msg
    assert resume_mismatch(old, _cfg("stdit", {"optim.lr": 1e-4, "train.steps": 50}), "x") is None


# -- end to end ---------------------------------------------------------------------------------------
SMALL = ["model=stdit_tiny", "model.sample.frames=2", "model.sample.height=4", "model.sample.width=4",
         "optim.warmup_steps=0"]


def _finite_checkpoints(out):
    states = [torch.load(p, weights_only=False) for p in sorted((out / "checkpoints").glob("ckpt_step*.pt"))]
    return states, all(all(torch.isfinite(v).all() for v in s["model"].values()) for s in states)


def test_non_finite_weights_are_rolled_back_and_never_checkpointed(tmp_path):
    """optim.eps=0: the first update of a zero-initialised layer is 0/0 (finite loss and gradient
    norm, NaN weights). skip: both ways of finding it (the next step's control collective, a
    checkpoint's) roll the update back; every checkpoint is finite; one control collective a step."""
    out = tmp_path / "run"
    p = th.run(SMALL + ["parallel=none", "train.global_batch_size=1", "train.steps=3", "train.checkpoint_every=2",
                        "train.keep_checkpoints=0", "optim.eps=0", "train.on_nonfinite=skip", f"train.out_dir={out}",
                        "train.resume=none"], 1, timeout=240)
    assert "rolled back" in p.stdout
    states, finite = _finite_checkpoints(out)
    assert [s["step"] for s in states] == [2, 3] and finite
    rec = th.metrics(out)
    assert not rec[0].get("skipped") and rec[1].get("rolled_back") == 1      # found in step 2's control collective
    assert rec[1].get("skipped") and rec[2].get("skipped")                    # step 3's, before its checkpoint
    ledger = {(r["op"], r["tag"]): r["calls"] for r in json.loads((out / "ledger.json").read_text())}
    assert ledger[("all_gather", "train.control")] == 3 + 1                  # one a step, one for the first batch
    assert not [t for _, t in ledger if t in ("train.data.ok", "train.nonfinite", "train.loss.dp")]


def test_a_full_disk_in_the_zip_writer_stops_every_rank_cleanly(tmp_path):
    """A real ENOSPC under torch's zip writer (its RuntimeError, not an OSError) at the step-2 write:
    both ranks stop, no traceback, one line (rank 0 says the stop every rank agreed on), step 1 intact."""
    out = tmp_path / "run"
    p = th.run(SMALL + ["parallel=none", "train.global_batch_size=2", "train.steps=3", "train.checkpoint_every=1",
                        "train.fault_at_step=2", "train.fault_kind=disk_full_zip", f"train.out_dir={out}",
                        "train.resume=none"], 2, timeout=240, check=False)
    raw = re.search(r'^(\[rank\d+\]:)?\s*File ".*longseq/', p.stdout, re.M)      # a worker's traceback (not torchrun's)
    assert p.returncode != 0 and not raw, p.stdout[-3000:]
    lines = [ln for ln in p.stdout.splitlines() if "stopped: CheckpointWriteError" in ln]
    assert len(lines) == 1 and "unexpected pos" in lines[0] and "ckpt_step00000001.pt is intact" in lines[0]
    assert th.latest_step(out) == 1 and sorted(x.name for x in (out / "checkpoints").glob("ckpt_*.pt")) == \
        ["ckpt_step00000001.pt"]
    assert not [x for x in (out / "checkpoints").iterdir() if ".tmp." in x.name]
    assert math.isfinite(th.metrics(out)[0]["loss"])


def test_a_backend_failure_inside_fsdp_is_recognised():
    from longseq.train.loop import is_backend_failure
    assert is_backend_failure(RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed "
                                           "by peer [127.0.0.1]:1234"))
    assert is_backend_failure(RuntimeError("Timed out waiting 10000ms for recv operation to complete"))
    assert not is_backend_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_skip_restores_the_parameters_and_the_optimizer_state_bit_for_bit():
    from longseq.train.loop import _all_finite, _restore, _snapshot
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(m.parameters(), lr=0.1)
    params = list(m.parameters())
    for first in (True, False):                    # before the first step (no AdamW state yet) and after one
        m(torch.randn(2, 4)).sum().backward()
        before = [p.detach().clone() for p in params]
        state = {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(params) if p in opt.state}
        snap = _snapshot(params, opt)
        for g in opt.param_groups:
            g["eps"] = 0.0
        params[1].grad.zero_()                     # 0/0 in AdamW: a finite gradient, a NaN weight
        opt.step()
        assert not _all_finite(params)
        _restore(snap, params, opt)
        assert all(torch.equal(a, b) for a, b in zip(params, before)) and _all_finite(params)
        assert len(opt.state) == len(state) == (0 if first else 2)
        for i, p in enumerate(params):
            for k, v in state.get(i, {}).items():
                assert torch.equal(opt.state[p][k], v), k
        for g in opt.param_groups:
            g["eps"] = 1e-8
        opt.step()                                 # a real step, so the second round has AdamW state
        opt.zero_grad()
