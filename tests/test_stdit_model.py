"""ST-DiT: shapes, the per-frame / per-location independence of the stages that a DSP plan relies
on, gradients, presets and the CLI."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longseq.models import STDIT_PRESETS, STDiT, count_parameters, init_for_testing, stdit_config
from longseq.models import stdit as stdit_module

ROOT = Path(__file__).resolve().parents[1]
C_TEXT = STDIT_PRESETS["tiny"].caption_channels


def _model(dtype=torch.float64, **overrides):
    torch.manual_seed(0)
    return init_for_testing(STDiT(stdit_config("tiny", **overrides))).to(dtype)


def _inputs(b=2, t=5, h=6, w=10, n=4, dtype=torch.float64, c_in=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c_in, t, h, w, generator=g, dtype=dtype)
    ts = torch.rand(b, generator=g, dtype=dtype) * 1000
    y = torch.randn(b, n, C_TEXT, generator=g, dtype=dtype)
    y_mask = torch.ones(b, n, dtype=torch.bool)
    y_mask[0, n // 2:] = False                       # sample 0 has a shorter caption
    return x, ts, y, y_mask


def _conditioning(model, ts, y):
    t_emb = model.timestep(ts)
    return t_emb, model.t_block(t_emb), model.caption(y)


@pytest.mark.parametrize("t,h,w,patch,pred_sigma", [
    (3, 6, 10, 2, False), (1, 5, 7, 2, False), (5, 4, 3, 1, True), (2, 9, 4, 3, False)])
def test_output_shape_uneven_sizes(t, h, w, patch, pred_sigma):
    model = _model(torch.float32, patch_size=patch, pred_sigma=pred_sigma)
    x, ts, y, y_mask = _inputs(t=t, h=h, w=w, dtype=torch.float32)
    out = model(x, ts, y, y_mask)
    assert out.shape == (2, 8 if pred_sigma else 4, t, h, w)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("a,b", [(0, 1), (1, 4), (2, 5), (0, 5)])
def test_spatial_stage_is_per_frame(a, b):
    """block.spatial(x[:, a:b]) == block.spatial(x)[:, a:b]: it may run with T sharded."""
    model = _model()
    x, ts, y, y_mask = _inputs()
    _, t_mod, y = _conditioning(model, ts, y)
    h = torch.randn(2, 5, 15, 32, dtype=torch.float64)            # [B, T, S, C]
    for blk in model.blocks:
        full = blk.spatial(h, t_mod, y, y_mask)
        torch.testing.assert_close(blk.spatial(h[:, a:b], t_mod, y, y_mask), full[:, a:b])
        assert not torch.allclose(full, h)                         # the stage does something


@pytest.mark.parametrize("a,b", [(0, 1), (3, 11), (14, 15), (0, 15)])
def test_temporal_stage_is_per_location(a, b):
    """block.temporal(x[:, :, a:b]) == block.temporal(x)[:, :, a:b]: it may run with S sharded
    (block 0 adds the temporal position embedding, from T alone)."""
    model = _model()
    _, ts, _, _ = _inputs()
    t_mod = model.t_block(model.timestep(ts))
    h = torch.randn(2, 5, 15, 32, dtype=torch.float64)
    assert model.blocks[0].temporal.add_pos_embed and not model.blocks[1].temporal.add_pos_embed
    for blk in model.blocks:
        full = blk.temporal(h, t_mod)
        torch.testing.assert_close(blk.temporal(h[:, :, a:b], t_mod), full[:, :, a:b])


def test_temporal_stage_mixes_frames_and_spatial_stage_mixes_locations():
    """The converse: each stage does depend on the dimension it needs whole."""
    model = _model()
    _, ts, y, y_mask = _inputs()
    t_emb, t_mod, y = _conditioning(model, ts, y)
    h = torch.randn(2, 5, 15, 32, dtype=torch.float64)
    blk = model.blocks[1]
    assert not torch.allclose(blk.temporal(h[:, :2], t_mod), blk.temporal(h, t_mod)[:, :2])
    assert not torch.allclose(blk.spatial(h[:, :, :4], t_mod, y, y_mask), blk.spatial(h, t_mod, y, y_mask)[:, :, :4])


@pytest.mark.parametrize("parts", [2, 3, 4])
def test_stage_wise_sharded_run_equals_model(parts):
    """Run the model the way a DSP plan does, in one process: embed and spatial stages on T-pieces,
    temporal stages on S-pieces, final layer on T-pieces (uneven torch.tensor_split pieces)."""
    model = _model()
    x, ts, y, y_mask = _inputs(t=5, h=6, w=10)
    ref = model(x, ts, y, y_mask)

    t_emb, t_mod, yc = _conditioning(model, ts, y)
    grid = model.embed.grid_size(6, 10)
    pieces = [model.embed(p) for p in x.tensor_split(parts, dim=2)]          # T-sharded
    for blk in model.blocks:
        pieces = [blk.spatial(p, t_mod, yc, y_mask) for p in pieces]
        h = torch.cat(pieces, dim=1).tensor_split(parts, dim=2)               # switch T -> S
        h = [blk.temporal(p, t_mod) for p in h]
        pieces = torch.cat(h, dim=2).tensor_split(parts, dim=1)               # switch S -> T
    out = torch.cat([model.final(p, t_emb, grid, (6, 10)) for p in pieces], dim=2)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("how", ["init_for_testing", "zero_init=False"])
def test_every_parameter_gets_a_nonzero_gradient(how):
    if how == "init_for_testing":
        model = _model(torch.float32)
    else:
        torch.manual_seed(0)
        model = STDiT(stdit_config("tiny", zero_init=False))
    x, ts, y, y_mask = _inputs(t=3, h=4, w=6, dtype=torch.float32)
    out = model(x, ts, y, y_mask)
    (out * torch.randn_like(out)).sum().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"parameters without gradient: {dead}"


def test_dit_zero_init_starts_at_zero_output():
    torch.manual_seed(0)
    model = STDiT(stdit_config("tiny"))
    x, ts, y, y_mask = _inputs(dtype=torch.float32)
    assert model(x, ts, y, y_mask).abs().max() == 0


def test_caption_mask():
    model = _model()
    x, ts, y, y_mask = _inputs(n=4)
    out = model(x, ts, y, y_mask)
    y2 = y.clone()
    y2[0, 2:] = 100.0                                   # padding tokens of sample 0 changed
    torch.testing.assert_close(model(x, ts, y2, y_mask), out)
    # sample 0 with its padding cut off, sample 1 with a full caption: same as the masked batch
    torch.testing.assert_close(model(x[:1], ts[:1], y[:1, :2]), out[:1])
    torch.testing.assert_close(model(x[1:], ts[1:], y[1:]), out[1:])
    torch.testing.assert_close(model(x, ts, y, torch.ones_like(y_mask)), model(x, ts, y))
    no_caption = torch.zeros_like(y_mask)
    no_caption[1] = True
    assert torch.isfinite(model(x, ts, y, no_caption)).all()    # an empty caption adds nothing


def test_attention_backend_option():
    ref = _model(attn_backend="math")
    other = _model(attn_backend="sdpa")
    other.load_state_dict(ref.state_dict())
    assert other.blocks[0].spatial.attn.backend == "sdpa"
    x, ts, y, y_mask = _inputs()
    torch.testing.assert_close(other(x, ts, y, y_mask), ref(x, ts, y, y_mask))


def test_bfloat16_forward():
    model = _model(torch.bfloat16)
    x, ts, y, y_mask = _inputs(t=2, h=4, w=4, dtype=torch.bfloat16)
    out = model(x, ts, y, y_mask)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_preset_parameter_counts():
    assert abs(count_parameters("720m") / 720e6 - 1) < 0.10
    assert abs(count_parameters("3b") / 3e9 - 1) < 0.10
    tiny = STDiT(stdit_config("tiny"))
    assert count_parameters(stdit_config("tiny")) == sum(p.numel() for p in tiny.parameters())
    with pytest.raises(ValueError, match="720m"):
        stdit_config("7b")


def test_cli_prints_parameter_count():
    res = subprocess.run([sys.executable, "-m", "longseq.models.stdit", "--preset", "720m"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert f"{count_parameters('720m'):,}" in res.stdout
    assert "Warning" not in res.stderr


def test_model_file_has_no_distributed_code():
    src = Path(stdit_module.__file__).read_text()
    assert "torch.distributed" not in src and "dist." not in src
