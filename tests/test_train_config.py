"""Config composition and the errors `python -m longseq.train` raises before any process-group
work, each naming the fix."""
from __future__ import annotations

import subprocess
import time

import numpy as np
import pytest

from longseq import methods as registry
from longseq.models import registry as model_registry
from longseq.train import methods
from longseq.train.config import ConfigError, load_config, resolve_parallel, validate
from tests import train_helpers as th


def cfg(*overrides):
    return load_config(list(overrides))


def error(*overrides, world=1) -> str:
    with pytest.raises(ConfigError) as e:
        validate(cfg(*overrides), world)
    return str(e.value)


# -- composition ---------------------------------------------------------------------------------
def test_defaults_and_overrides():
    c = cfg()
    assert (c.model.name, c.parallel.method, c.data.kind, c.optim.name) == ("stdit_tiny", "dsp", "synthetic", "adamw")
    c = cfg("model=stdit_720m", "parallel.sp_size=8", "train.precision=bf16", "train.steps=7", "optim.lr=1e-4")
    assert (c.model.preset, c.parallel.sp_size, c.train.precision, c.train.steps, c.optim.lr) == \
        ("720m", 8, "bf16", 7, 1e-4)
    assert cfg().optim.lr == cfg().model.lr                   # optim.lr follows the model's recommendation
    for name in ("stdit_tiny", "stdit_720m", "stdit_3b", "gla_tiny", "gla_1b", "gla_3b"):
        assert cfg(f"model={name}").model.name == name
    for m in registry.method_names():
        assert cfg(f"parallel={m}").parallel.method == m


def test_layout_sp_null_is_the_world():
    assert resolve_parallel(cfg(), 4).sp_size == 4
    lay = resolve_parallel(cfg("parallel.sp_size=2"), 4)
    assert (lay.sp_size, lay.dp_size, lay.micro_batch) == (2, 2, 2)
    assert resolve_parallel(cfg("parallel=none"), 4).dp_size == 4


def test_typo_in_a_key_names_it():
    with pytest.raises(ConfigError, match="stepz"):
        cfg("train.stepz=5")
    with pytest.raises(ConfigError, match="help"):
        cfg("parallel=nonexistent")


# -- errors before any process-group work -------------------------------------------------------
def test_sp_size_not_dividing_world():
    msg = error("parallel.sp_size=3", world=4)
    assert "does not divide the world size 4" in msg and "parallel.sp_size among [1, 2, 4]" in msg


def test_global_batch_not_divisible_by_dp():
    msg = error("parallel.sp_size=1", "train.global_batch_size=3", world=2)
    assert "train.global_batch_size=2" in msg


def test_unknown_method():
    msg = error("parallel.method=bogus")
    assert "unknown method parallel.method='bogus'" in msg and "dsp" in msg and "zeco" in msg


def test_a_registered_family_and_method_train(monkeypatch):
    """A family and a method added with the public functions are found by the training entry."""
    import torch
    from longseq.models.gla import GLAForCausalLM, gla_config
    monkeypatch.setattr(model_registry, "MODEL_FAMILIES", dict(model_registry.MODEL_FAMILIES))
    monkeypatch.setattr(registry, "METHODS", dict(registry.METHODS))
    monkeypatch.setattr(methods, "MODEL_FAMILIES", model_registry.MODEL_FAMILIES)
    assert "unknown" in error("model=gla_tiny", "model.family=mylm", "parallel=none")
    model_registry.register_model("mylm", config=gla_config, model=GLAForCausalLM, task="causal_lm")
    assert "parallelizes GLA/GDN/HF_CAUSAL_LM models, not MYLM" in error("model=gla_tiny", "model.family=mylm", "parallel=zeco")
    calls = []
    registry.register_method("zeco", "mylm", lambda model, group, **kw: calls.append(kw) or model,
                             input_shard="seq")
    c = cfg("model=gla_tiny", "model.family=mylm", "parallel=zeco", "+parallel.options.num_blocks=2")
    assert validate(c, 2).sp_size == 2
    with pytest.raises(ValueError, match="already registered"):
        registry.register_method("zeco", "mylm", None)

    class Groups:
        sp_group = None
    t = methods.build(c, Groups(), torch.device("cpu"))
    assert isinstance(t.model, GLAForCausalLM) and t.input_shard == "seq" and calls == [{"num_blocks": 2}]


def test_method_for_the_wrong_family():
    msg = error("parallel=zeco")                                  # model is stdit_tiny
    assert "parallelizes GLA/GDN/HF_CAUSAL_LM models" in msg and "dsp" in msg


def test_none_with_sp():
    assert "parallel.sp_size must be 1" in error("parallel=none", "parallel.sp_size=2", world=2)


def test_ulysses_heads_not_divisible():
    c = cfg("parallel.sp_size=4")                                 # stdit_tiny: 2 heads
    layout = resolve_parallel(c, 4)
    with pytest.raises(ConfigError) as e:
        methods.check_model(registry.find_method("ulysses", "stdit"), c, layout)
    assert "must divide num_heads=2" in str(e.value) and "parallel.sp_size in [1, 2]" in str(e.value)
    assert "num_heads=2" in error("parallel=ulysses", "parallel.sp_size=4", world=4)


def test_sequence_shorter_than_sp():
    assert "fewer than parallel.sp_size=4" in error("model.sample.frames=2", "parallel.sp_size=4", world=4)


def test_missing_data_path(tmp_path):
    assert "data.path is required" in error("data=latents")
    assert "is not a folder" in error("data=latents", f"data.path={tmp_path / 'nope'}")
    assert "holds no samples" in error("data=latents", f"data.path={tmp_path}")
    np.save(tmp_path / "a.latent.npy", np.zeros((4, 2, 4, 4), np.float32))
    assert "no caption file" in error("data=latents", f"data.path={tmp_path}")
    assert "data=tokens does not fit model.family=stdit" in error("data=tokens", "data.path=x.bin")


def test_bad_choices():
    assert "train.precision='fp8'" in error("train.precision=fp8")
    assert "optim.schedule" in error("optim.schedule=linear")
    assert "neither auto/strict/none nor an existing checkpoint" in error("train.resume=/no/such/ckpt.pt")


def test_cli_reports_config_errors_before_starting(tmp_path):
    """Under torchrun: exits non-zero fast with the message, no process group (no gloo output)."""
    t0 = time.monotonic()
    p = subprocess.run(th.command(["parallel.sp_size=3", f"train.out_dir={tmp_path}"], 2), cwd=th.ROOT,
                       env=th.env(), timeout=120, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert p.returncode != 0
    assert "config error: parallel.sp_size=3 does not divide the world size 2" in p.stdout, p.stdout[-3000:]
    assert "Gloo" not in p.stdout and "ProcessGroup" not in p.stdout
    assert not (tmp_path / "checkpoints").exists()
    assert time.monotonic() - t0 < 60
    p = subprocess.run(th.command(["parallel=none", "data=latents"]), cwd=th.ROOT, env=th.env(), timeout=60,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert p.returncode == 2 and "data.path is required but not set" in p.stdout, p.stdout[-3000:]


# -- pieces of the loop, in-process ---------------------------------------------------------------
def test_lr_schedule():
    from longseq.train.loop import lr_factor
    f = [lr_factor(s, total=10, warmup=2, schedule="cosine", min_ratio=0.1) for s in range(10)]
    assert f[:2] == [0.5, 1.0] and f[2] == 1.0 and all(a >= b for a, b in zip(f[2:], f[3:]))
    assert abs(lr_factor(10, total=10, warmup=2, schedule="cosine", min_ratio=0.1) - 0.1) < 1e-12
    assert lr_factor(7, total=10, warmup=2, schedule="constant", min_ratio=0.1) == 1.0


@pytest.mark.parametrize("model", ["stdit_tiny", "gla_tiny"])
def test_activation_checkpointing_keeps_results_and_state_dict(model):
    import torch
    c = cfg(f"model={model}")
    fam = methods.family_of(c)
    torch.manual_seed(0)
    a = fam.build(c.model)
    torch.manual_seed(0)
    b = fam.build(c.model)
    assert methods.apply_activation_checkpointing(fam.units(b)) == (4 if model == "stdit_tiny" else 2)
    assert list(a.state_dict()) == list(b.state_dict())
    if model == "stdit_tiny":
        args = (torch.randn(2, 4, 3, 4, 4), torch.tensor([3.0, 500.0]), torch.randn(2, 5, 16))
    else:
        args = (torch.randint(0, 64, (2, 20)),)
    outs = []
    for m in (a, b):
        out = m(*args)
        out.float().pow(2).mean().backward()
        outs.append((out.detach(), [p.grad.clone() for p in m.parameters()]))
    assert torch.equal(outs[0][0], outs[1][0])
    for ga, gb in zip(outs[0][1], outs[1][1]):
        assert torch.equal(ga, gb)


def test_checkpoint_files_are_atomic_and_latest_is_found(tmp_path):
    import torch
    from longseq.train import checkpoint as ck
    d = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        ck.save_checkpoint(d, step, {"step": step, "w": torch.full((3,), float(step))}, keep=2)
    assert [s for s, _ in ck.list_checkpoints(d)] == [4, 6]
    assert ck.find_latest(d).name == "ckpt_step00000006.pt"
    assert ck.load_checkpoint(ck.find_latest(d))["step"] == 6
    (d / ".ckpt_step00000008.pt.tmp.123").write_bytes(b"torn")       # a write killed half-way
    assert ck.find_latest(d).name == "ckpt_step00000006.pt"
    (d / "latest").unlink()                                          # killed between file and pointer
    assert ck.find_latest(d).name == "ckpt_step00000006.pt"
    (d / "latest").write_text("ckpt_step00000099.pt\n")              # names a file that is gone
    assert ck.find_latest(d).name == "ckpt_step00000006.pt"
    assert not [f for f in d.iterdir() if ".tmp." in f.name and f.name != ".ckpt_step00000008.pt.tmp.123"]


def test_gdn_and_hybrid_compose_with_delta_methods():
    """model=gdn_tiny / hybrid_tiny with the delta-rule methods compose (and heads checks the heads)."""
    for model in ("gdn_tiny", "hybrid_tiny"):
        for method in ("zeco", "allgather", "heads", "p2p"):
            validate(cfg(f"model={model}", f"parallel={method}", "parallel.sp_size=2"), 2)
    assert "must divide num_heads=4" in error("model=gdn_tiny", "parallel=heads", "parallel.sp_size=3", world=3)
