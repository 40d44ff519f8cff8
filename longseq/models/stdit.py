"""ST-DiT: a spatial-temporal diffusion transformer for latent video (Open-Sora STDiT family).

Activations inside the model are ``[B, T, S, C]``: batch, frames, spatial tokens per frame
(S = h·w patches), channels. Each block has two stages, each acting along one dimension only:

* ``block.spatial``  (self-attention over S, cross-attention to captions, MLP): independent per
  frame, so it needs S whole and accepts any number of frames (T may be sharded);
* ``block.temporal`` (self-attention over T): independent per spatial location, so it needs T
  whole and accepts any number of locations (S may be sharded).

No stage stores a size: each reads what it needs from its input. Conditioning is adaLN-single
(PixArt-α): one shared ``t_block`` maps the timestep embedding to ``[B, 6C]``, and every stage adds
its own learned ``scale_shift_table``. The model holds no distributed code; a parallel plan wraps
``embed``, ``blocks[i].spatial``, ``blocks[i].temporal`` and ``final`` from outside.

    python -m longseq.models.stdit --preset 720m     # prints the parameter count (built on the meta device)
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from longseq.attention import attention

__all__ = [
    "STDiTConfig", "STDIT_PRESETS", "stdit_config", "STDiT", "STDiTBlock", "SpatialStage",
    "TemporalStage", "PatchEmbed", "FinalLayer", "TimestepEmbedder", "CaptionEmbedder",
    "count_parameters", "init_for_testing", "sincos_1d", "sincos_2d",
]


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------
@dataclass
class STDiTConfig:
    in_channels: int = 4
    patch_size: int = 2
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    caption_channels: int = 4096
    pred_sigma: bool = False          # predict a variance too: out_channels = 2 * in_channels
    freq_dim: int = 256               # sinusoidal timestep features fed to the timestep MLP
    attn_backend: Optional[str] = None  # longseq.attention backend; None = process default
    zero_init: bool = True            # DiT init: zero the final linear and the stages' output projections

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.pred_sigma else self.in_channels


STDIT_PRESETS: Dict[str, STDiTConfig] = {
    # fast on CPU, for tests
    "tiny": STDiTConfig(hidden_size=32, depth=2, num_heads=2, caption_channels=16, freq_dim=32),
    # Open-Sora STDiT-XL/2 (the DSP paper's 720M model)
    "720m": STDiTConfig(hidden_size=1152, depth=28, num_heads=16, caption_channels=4096),
    # the DSP paper's 3B model: same depth, twice the width
    "3b": STDiTConfig(hidden_size=2304, depth=28, num_heads=24, caption_channels=4096),
}


def stdit_config(name: str, **overrides) -> STDiTConfig:
    """A copy of preset ``name`` (``tiny``, ``720m``, ``3b``) with fields replaced by ``overrides``."""
    if name not in STDIT_PRESETS:
        raise ValueError(f"unknown STDiT preset {name!r}; valid: {', '.join(STDIT_PRESETS)}")
    return dataclasses.replace(STDIT_PRESETS[name], **overrides)


# ----------------------------------------------------------------------------------------------
# Fixed sin-cos embeddings (computed from sizes at forward time)
# ----------------------------------------------------------------------------------------------
def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """``[L] positions -> [L, dim]``: sin of ``pos·ω_i`` in the first half, cos in the second."""
    assert dim % 2 == 0, "sin-cos embedding needs an even dimension"
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float32, device=pos.device) / (dim / 2))
    angles = pos.float()[:, None] * omega[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(dim: int, h: int, w: int, device=None) -> torch.Tensor:
    """``[h·w, dim]`` float32, row-major over the ``h × w`` grid: half the channels encode the
    row, half the column."""
    assert dim % 4 == 0, "2-D sin-cos embedding needs a dimension divisible by 4"
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    return torch.cat([sincos_1d(dim // 2, rows), sincos_1d(dim // 2, cols)], dim=1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x [B, T, S, C]``, shift and scale ``[B, C]`` -> ``x·(1 + scale) + shift``."""
    return x * (1 + scale[:, None, None]) + shift[:, None, None]


def _split_mod(table: torch.Tensor, t_mod: torch.Tensor):
    """``table [n, C]`` + the first n chunks of ``t_mod [B, 6C]`` -> n tensors ``[B, C]``."""
    n, c = table.shape
    return (table[None] + t_mod[:, : n * c].view(-1, n, c)).unbind(1)


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------
class Mlp(nn.Sequential):
    """``[..., c_in] -> [..., c_out]``: Linear, GELU (tanh), Linear."""

    def __init__(self, c_in: int, c_hidden: int, c_out: int):
        super().__init__(nn.Linear(c_in, c_hidden), nn.GELU(approximate="tanh"), nn.Linear(c_hidden, c_out))


class SelfAttention(nn.Module):
    """Multi-head self-attention over the middle dim: ``[N, L, C] -> [N, L, C]``.

    ``attn_fn`` is a hook point for a parallel plan: ``None`` (default) calls
    ``longseq.attention.attention``; a plan may set a callable with the same signature
    (``fn(q, k, v, backend=...)``, ``[N, L, H, D]`` in and out), e.g. a sequence-parallel attention.
    """

    def __init__(self, dim: int, num_heads: int, backend: Optional[str] = None):
        super().__init__()
        assert dim % num_heads == 0, "hidden_size must be divisible by num_heads"
        self.num_heads, self.backend = num_heads, backend
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_fn: Optional[Callable] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, l, c = x.shape
        q, k, v = self.qkv(x).view(n, l, 3, self.num_heads, c // self.num_heads).unbind(2)
        fn = attention if self.attn_fn is None else self.attn_fn
        return self.proj(fn(q, k, v, backend=self.backend).reshape(n, l, c))


class CrossAttention(nn.Module):
    """Video tokens attend to caption tokens: x ``[B, L, C]``, y ``[B, N, C]``,
    y_mask ``[B, N]`` bool (True = real token) or None -> ``[B, L, C]``.

    Each query token is independent, so any grouping of the B·L tokens gives the same result.
    """

    def __init__(self, dim: int, num_heads: int, backend: Optional[str] = None):
        super().__init__()
        self.num_heads, self.backend = num_heads, backend
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor, y_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, l, c = x.shape
        h, d = self.num_heads, c // self.num_heads
        q = self.q(x).view(b, l, h, d)
        k, v = self.kv(y).view(b, y.shape[1], 2, h, d).unbind(2)
        if y_mask is None or bool(y_mask.all()):
            out = attention(q, k, v, backend=self.backend)
        else:  # captions of different lengths: attend to each sample's real tokens only
            out = torch.zeros_like(q)
            for i in range(b):
                keep = y_mask[i].bool()
                if keep.any():
                    out[i] = attention(q[i:i + 1], k[i:i + 1, keep], v[i:i + 1, keep], backend=self.backend)[0]
        return self.proj(out.reshape(b, l, c))


# ----------------------------------------------------------------------------------------------
# Stages and blocks
# ----------------------------------------------------------------------------------------------
class SpatialStage(nn.Module):
    """Per-frame stage: needs S whole; any number of frames.

    ``forward(x [B, T, S, C], t_mod [B, 6C], y [B, N, C], y_mask [B, N] | None) -> [B, T, S, C]``:
    adaLN-modulated spatial self-attention (gated residual), cross-attention to the captions,
    adaLN-modulated MLP (gated residual).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, backend: Optional[str] = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, num_heads, backend)
        self.cross_attn = CrossAttention(dim, num_heads, backend)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dim)
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim ** 0.5)

    def forward(self, x: torch.Tensor, t_mod: torch.Tensor, y: torch.Tensor,
                y_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, t, s, c = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = _split_mod(self.scale_shift_table, t_mod)
        h = modulate(self.norm1(x), shift1, scale1).reshape(b * t, s, c)   # one sequence per frame
        x = x + gate1[:, None, None] * self.attn(h).view(b, t, s, c)
        x = x + self.cross_attn(x.reshape(b, t * s, c), y, y_mask).view(b, t, s, c)
        return x + gate2[:, None, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class TemporalStage(nn.Module):
    """Per-location stage: needs T whole; any number of spatial locations.

    ``forward(x [B, T, S, C], t_mod [B, 6C], frame_offset=0) -> [B, T, S, C]``: in block 0 first
    adds the 1-D sin-cos temporal position embedding of frames ``frame_offset .. frame_offset+T-1``
    (``frame_offset`` is nonzero only when a parallel plan hands the stage a slice of the frames
    and distributes its attention), then adaLN-modulated temporal self-attention with a gated
    residual. Its shift, scale and gate are its own ``scale_shift_table [3, C]`` plus the first
    three chunks of ``t_mod``.
    """

    def __init__(self, dim: int, num_heads: int, add_pos_embed: bool = False, backend: Optional[str] = None):
        super().__init__()
        self.add_pos_embed = add_pos_embed
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, num_heads, backend)
        self.scale_shift_table = nn.Parameter(torch.randn(3, dim) / dim ** 0.5)

    def forward(self, x: torch.Tensor, t_mod: torch.Tensor, frame_offset: int = 0) -> torch.Tensor:
        b, t, s, c = x.shape
        if self.add_pos_embed:
            pos = torch.arange(frame_offset, frame_offset + t, device=x.device)
            x = x + sincos_1d(c, pos).to(x.dtype)[None, :, None]
        shift, scale, gate = _split_mod(self.scale_shift_table, t_mod)
        h = modulate(self.norm(x), shift, scale).transpose(1, 2).reshape(b * s, t, c)  # one sequence per location
        h = self.attn(h).view(b, s, t, c).transpose(1, 2)
        return x + gate[:, None, None] * h


class STDiTBlock(nn.Module):
    """``x [B, T, S, C] -> [B, T, S, C]``: ``spatial`` then ``temporal``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, first: bool = False,
                 backend: Optional[str] = None):
        super().__init__()
        self.spatial = SpatialStage(dim, num_heads, mlp_ratio, backend)
        self.temporal = TemporalStage(dim, num_heads, add_pos_embed=first, backend=backend)

    def forward(self, x, t_mod, y, y_mask=None):
        return self.temporal(self.spatial(x, t_mod, y, y_mask), t_mod)


# ----------------------------------------------------------------------------------------------
# Embeddings and output
# ----------------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """``x [B, C_in, T, H, W] -> [B, T, S, C]``: per-frame p×p patches (Conv2d), plus the fixed
    2-D sin-cos spatial position embedding ``[S, C]``. H and W are zero-padded up to multiples
    of p; ``grid_size(H, W)`` gives the patch grid ``(h, w)``, S = h·w. Frames are independent."""

    def __init__(self, in_channels: int, dim: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def grid_size(self, height: int, width: int) -> Tuple[int, int]:
        p = self.patch_size
        return -(-height // p), -(-width // p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c_in, t, height, width = x.shape
        h, w = self.grid_size(height, width)
        p = self.patch_size
        x = F.pad(x, (0, w * p - width, 0, h * p - height))
        x = x.transpose(1, 2).reshape(b * t, c_in, h * p, w * p)
        x = self.proj(x).flatten(2).transpose(1, 2)                       # [B·T, S, C]
        x = x + sincos_2d(x.shape[-1], h, w, x.device).to(x.dtype)
        return x.view(b, t, h * w, -1)


class TimestepEmbedder(nn.Module):
    """``t [B]`` (float diffusion step) -> ``[B, C]``: sinusoidal features, then an MLP."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class CaptionEmbedder(nn.Module):
    """Caption projection ``y [B, N, C_text] -> [B, N, C]`` (MLP, GELU tanh)."""

    def __init__(self, caption_channels: int, dim: int):
        super().__init__()
        self.mlp = Mlp(caption_channels, dim, dim)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.mlp(y)


class FinalLayer(nn.Module):
    """``x [B, T, S, C]``, t_emb ``[B, C]``, grid ``(h, w)``, size ``(H, W)`` -> ``[B, C_out, T, H, W]``.

    adaLN-single modulated LayerNorm, Linear to p·p·C_out per token, unpatchify, crop to (H, W)
    (default h·p, w·p). Needs S whole (to unpatchify); any number of frames.
    """

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.patch_size, self.out_channels = patch_size, out_channels
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim ** 0.5)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor, grid: Tuple[int, int],
                size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        b, t, s, _ = x.shape
        (h, w), p, c = grid, self.patch_size, self.out_channels
        assert s == h * w, f"final layer got S={s} tokens for a {h}x{w} grid"
        shift, scale = (self.scale_shift_table[None] + t_emb[:, None]).unbind(1)
        x = self.linear(modulate(self.norm(x), shift, scale))              # [B, T, S, p·p·C_out]
        x = x.view(b, t, h, w, p, p, c).permute(0, 6, 1, 2, 4, 3, 5)        # [B, C_out, T, h, p, w, p]
        x = x.reshape(b, c, t, h * p, w * p)
        height, width = size if size is not None else (h * p, w * p)
        if (height, width) != (h * p, w * p):        # crop the patch padding: a copy, so the output is no view
            x = x[..., :height, :width].contiguous()
        return x


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------
class STDiT(nn.Module):
    """Spatial-temporal DiT.

    ``forward(x [B, C_in, T, H, W], t [B], y [B, N, C_text], y_mask [B, N] | None)
    -> [B, C_out, T, H, W]``. Submodules: ``embed`` (patches + spatial position embedding),
    ``timestep`` (t -> ``[B, C]``), ``t_block`` (``[B, C] -> [B, 6C]``), ``caption``
    (``[B, N, C_text] -> [B, N, C]``), ``blocks`` (each ``.spatial`` and ``.temporal``), ``final``.
    """

    def __init__(self, config: Optional[STDiTConfig] = None, **overrides):
        super().__init__()
        cfg = dataclasses.replace(config or STDiTConfig(), **overrides)
        self.config = cfg
        c = cfg.hidden_size
        self.embed = PatchEmbed(cfg.in_channels, c, cfg.patch_size)
        self.timestep = TimestepEmbedder(c, cfg.freq_dim)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))
        self.caption = CaptionEmbedder(cfg.caption_channels, c)
        self.blocks = nn.ModuleList(
            STDiTBlock(c, cfg.num_heads, cfg.mlp_ratio, first=(i == 0), backend=cfg.attn_backend)
            for i in range(cfg.depth))
        self.final = FinalLayer(c, cfg.patch_size, cfg.out_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DiT / PixArt-style init; with ``config.zero_init`` the outputs of the final layer,
        the cross-attentions and the temporal attentions start at zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.embed.proj.bias)
        for lin in (self.timestep.mlp[0], self.timestep.mlp[2], self.t_block[1],
                    self.caption.mlp[0], self.caption.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        if self.config.zero_init:
            zeroed = [self.final.linear]
            for blk in self.blocks:
                zeroed += [blk.spatial.cross_attn.proj, blk.temporal.attn.proj]
            for lin in zeroed:
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                y_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        size = tuple(x.shape[-2:])
        grid = self.embed.grid_size(*size)
        x = self.embed(x)                       # [B, T, S, C]
        t_emb = self.timestep(t)                # [B, C]
        t_mod = self.t_block(t_emb)             # [B, 6C]
        y = self.caption(y)                     # [B, N, C]
        for blk in self.blocks:                 # through the block's __call__, so per-block wrappers
            x = blk(x, t_mod, y, y_mask)        # (torch.compile, FSDP2's fully_shard) see every block
        return self.final(x, t_emb, grid, size)


# ----------------------------------------------------------------------------------------------
# Utilities
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def init_for_testing(model: nn.Module, std: float = 0.02, seed: Optional[int] = 0) -> nn.Module:
    """Overwrite every parameter with N(0, std²) so that every parameter gets a nonzero gradient
    (the DiT init zeroes output projections, which blocks the gradients of what feeds them)."""
    gen = None
    if seed is not None:
        gen = torch.Generator(device="cpu").manual_seed(seed)
    for p in model.parameters():
        p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(std).to(p))
    return model


def count_parameters(config) -> int:
    """Number of parameters of ``STDiT(config)`` (config or preset name), built on the meta
    device so that nothing is allocated."""
    if isinstance(config, str):
        config = stdit_config(config)
    with torch.device("meta"):
        model = STDiT(config)
    return sum(p.numel() for p in model.parameters())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Parameter count of an STDiT preset.")
    parser.add_argument("--preset", default="720m", choices=[*STDIT_PRESETS, "all"])
    args = parser.parse_args(argv)
    for name in (STDIT_PRESETS if args.preset == "all" else [args.preset]):
        cfg, n = STDIT_PRESETS[name], count_parameters(name)
        print(f"STDiT {name}: {n:,} parameters ({n / 1e9:.3f}B) "
              f"[hidden {cfg.hidden_size}, depth {cfg.depth}, heads {cfg.num_heads}, patch {cfg.patch_size}]")


if __name__ == "__main__":
    main()
