"""Shared building blocks of the LRM heads: conv trunks (2D / 3D), timestep FiLM, cross-attention.

The noise schedule of noise-aware heads is ``lrm.schedules.DDPMSchedule`` (shared with ``distill``).

Every head is a ``trunk -> (optional text cross-attention) -> pool -> output`` pipeline; the trunks follow
DOLLAR Tab. 10 (Conv kxk stride k -> GN -> SiLU; Conv 3x3 s2 -> GN -> SiLU) with configurable width/depth.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# Default GroupNorm groups. Tab. 10's 189,441 parameters count only GN's affine weights (2 x 128 per norm), which
# do not depend on the group count, and the paper does not state it. Few groups matter: with one channel per group
# (e.g. 32 groups at width 32) GN subtracts every channel's spatial mean and a head cannot learn rewards that
# depend on latent means (measured: Spearman 0.06 vs 0.97 with 4 groups on a linear function of channel means).
GN_GROUPS = 4


def group_norm(channels: int, groups: int = GN_GROUPS) -> nn.GroupNorm:
    groups = math.gcd(groups, channels)
    return nn.GroupNorm(groups, channels)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim) (DDPM / diffusers ``get_timestep_embedding``)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


NUM_COORD_FEATURES = 15  # 3 coordinates + sin/cos at 2 frequencies each


def coord_features(t: int, h: int, w: int, device=None) -> torch.Tensor:
    """Fourier features of (frame, row, column) in [-1, 1] for a t x h x w token grid -> (t*h*w, 15), row-major."""
    axes = [torch.linspace(-1, 1, n, device=device) if n > 1 else torch.zeros(1, device=device) for n in (t, h, w)]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)  # (t*h*w, 3)
    feats = [grid]
    for k in (1, 2):
        feats += [torch.sin(math.pi * k * grid / 2), torch.cos(math.pi * k * grid / 2)]
    return torch.cat(feats, -1)


class TimestepFiLM(nn.Module):
    """t -> per-block (scale, shift) pairs; zero-initialised so a fresh noise-aware head equals a clean one."""

    def __init__(self, width: int, num_blocks: int, emb_dim: int = 128):
        super().__init__()
        self.emb_dim = emb_dim
        self.num_blocks = num_blocks
        self.mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU())
        self.out = nn.Linear(emb_dim, 2 * width * num_blocks)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, t: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        h = self.out(self.mlp(timestep_embedding(t, self.emb_dim)))  # (B, 2 * width * blocks)
        chunks = h.chunk(2 * self.num_blocks, dim=-1)
        return [(chunks[2 * i], chunks[2 * i + 1]) for i in range(self.num_blocks)]


def _film(h: torch.Tensor, film: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    if film is None:
        return h
    scale, shift = film  # (B, C) each
    shape = (h.shape[0], h.shape[1]) + (1,) * (h.dim() - 2)
    return h * (1 + scale.view(shape)) + shift.view(shape)


class ConvBlock(nn.Module):
    """Conv -> GroupNorm -> (FiLM) -> SiLU, in 2D or 3D."""

    def __init__(self, cin: int, cout: int, kernel, stride, padding, dims: int = 2, norm_groups: int = GN_GROUPS):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.conv = conv(cin, cout, kernel, stride, padding)
        self.norm = group_norm(cout, norm_groups)

    def forward(self, x: torch.Tensor, film=None) -> torch.Tensor:
        return F.silu(_film(self.norm(self.conv(x)), film))


class ConvTrunk(nn.Module):
    """DOLLAR Tab. 10 trunk: patch conv (k=s=``patch``) then ``depth`` 3x3 convs (first stride 2, rest stride 1).

    2D: ``(N, C, H, W) -> (N, width, h, w)``. 3D (``dims=3``): ``(B, C, T, H, W) -> (B, width, t, h, w)`` with
    a temporal kernel of 3 and ``temporal_stride`` on the first 3x3x3 conv.
    Defaults (patch 4, padding 1, depth 1, width 128) are exactly Tab. 10.
    """

    def __init__(self, in_channels: int, width: int = 128, depth: int = 1, patch: int = 4,
                 patch_padding: int | None = None, dims: int = 2, temporal_stride: int = 2,
                 norm_groups: int = GN_GROUPS, temporal_patch: int = 1):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1 (number of 3x3 conv blocks after the patch conv), got {depth}")
        if patch < 1:
            raise ValueError(f"patch must be >= 1, got {patch}")
        pad = (1 if patch == 4 else 0) if patch_padding is None else patch_padding
        self.dims = dims
        if dims == 2:
            blocks = [ConvBlock(in_channels, width, patch, patch, pad, norm_groups=norm_groups)]
            for i in range(depth):
                blocks.append(ConvBlock(width, width, 3, 2 if i == 0 else 1, 1, norm_groups=norm_groups))
        else:
            kt = temporal_patch  # frames per temporal patch: longer spans make slow motion visible to 3x3x3 convs
            blocks = [ConvBlock(in_channels, width, (kt, patch, patch), (kt, patch, patch), (0, pad, pad), dims=3,
                                norm_groups=norm_groups)]
            for i in range(depth):
                stride = (temporal_stride, 2, 2) if i == 0 else (1, 1, 1)
                blocks.append(ConvBlock(width, width, 3, stride, 1, dims=3, norm_groups=norm_groups))
        self.blocks = nn.ModuleList(blocks)
        self.width = width

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def forward(self, x: torch.Tensor, films=None) -> torch.Tensor:
        for i, blk in enumerate(self.blocks):
            x = blk(x, None if films is None else films[i])
        return x


class CrossAttentionBlock(nn.Module):
    """Image (or video) tokens attend to all text tokens (key padding mask), residual, then a residual MLP."""

    def __init__(self, width: int, heads: int = 4, mlp_ratio: int = 2):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be divisible by attention heads {heads}")
        self.norm_q = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.SiLU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None) -> torch.Tensor:
        # x: (B, N, W) queries; text: (B, L, W) keys/values; text_mask: (B, L) True = real token.
        pad = None if text_mask is None else ~text_mask.bool()
        a, _ = self.attn(self.norm_q(x), text, text, key_padding_mask=pad, need_weights=False)
        x = x + a
        return x + self.mlp(self.norm_mlp(x))


class TextProjection(nn.Module):
    """Token embeddings (B, L, D) -> (B, L, width): Tab. 11's text MLP (Linear D -> width) + LayerNorm."""

    def __init__(self, text_dim: int, width: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(text_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(tokens))
