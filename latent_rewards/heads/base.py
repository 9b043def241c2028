"""The shared head skeleton: conv trunk -> (text cross-attention) -> pool -> 1x1 -> Linear(1); and ensembles.

Family files (``image.py``, ``text_image.py``, ``video.py``, ``text_video.py``) subclass ``ConvLRM`` with fixed
``video`` / text settings and register entry points.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from latent_rewards.layers import (
    GN_GROUPS,
    NUM_COORD_FEATURES,
    ConvTrunk,
    CrossAttentionBlock,
    TextProjection,
    TimestepFiLM,
    coord_features,
)


class LRMInputError(ValueError):
    """Input an LRM cannot take (latents of a size its head does not divide, non-finite values, text of the wrong
    length or width), or data ``fit`` cannot learn from. The message names the problem and the fix; the CLI prints
    it as one line (``lrm.cli.USER_ERRORS``)."""


def check_patch_divides(shape: tuple[int, ...], patch: int, temporal_patch: int | None, head: str) -> None:
    """Refuse latents whose spatial size (and frame count, for 3D heads: ``temporal_patch``) the patch conv
    (kernel = stride = ``patch``) does not divide: it would silently drop the last rows / columns / frames (3x3
    latents into a patch-2 head are scored on their top-left 2x2). ``shape``: (..., [T,] C, H, W)."""
    H, W = int(shape[-2]), int(shape[-1])
    if H % patch or W % patch or H < patch:
        raise LRMInputError(
            f"{head}: latents of spatial size {H}x{W} do not fit its patch conv (kernel = stride = {patch}), which "
            f"needs H and W to be positive multiples of {patch}. Give latents whose size is a multiple of {patch} "
            f"(pixels a multiple of {patch} x the VAE's downsampling), or train a head whose patch divides {H}x{W}")
    if temporal_patch is not None and temporal_patch > 1:
        T = int(shape[-4])
        if T % temporal_patch:
            raise LRMInputError(
                f"{head}: {T} latent frames do not fit its temporal patch ({temporal_patch} frames per patch). Give "
                f"a multiple of {temporal_patch} latent frames, or train a head whose temporal_patch divides {T}")


class ConvLRM(nn.Module):
    """A latent reward head. ``forward(latents, text_emb=None, text_mask=None, t=None) -> (B,)``.

    Args:
        in_channels: latent channels C.
        width: trunk channels (Tab. 10: 128).
        depth: 3x3 conv blocks after the patch conv (Tab. 10: 1; the first has stride 2).
        patch: kernel = stride of the first conv (Tab. 10: 4). Use 2 (or 1) for small latents such as Shapes' 8x8.
        patch_padding: padding of the first conv (default: 1 for patch 4 as in Tab. 10, else 0).
        text_dim: text token width D; set for text-conditioned heads, ``None`` otherwise.
        attn_depth / attn_heads: cross-attention blocks (image tokens -> all text tokens) and their heads.
        video: ``None`` (images), ``"frame-avg"`` (2D trunk per frame, features averaged over frames) or ``"3d"``.
        temporal_stride: stride over frames of the first 3x3x3 conv (``video="3d"``).
        temporal_patch: frames per patch of the first conv (``video="3d"``; T must be divisible by it).
        norm_groups: GroupNorm groups (default 4; see ``layers.GN_GROUPS`` for why not one channel per group).
        pos_emb: text heads add a learned projection of Fourier (frame, row, column) coordinates to the trunk's
            tokens before cross-attention, so attributes tied to place and time (position, motion direction) can
            be read; without it pooled tokens are blind to frame order and position.
        timestep_cond: noise-aware head: FiLM of every trunk block by the diffusion timestep ``t`` (``t=None``
            means clean latents, t = 0).
    """

    modality = "image"

    def __init__(self, in_channels: int = 4, width: int = 128, depth: int = 1, patch: int = 4,
                 patch_padding: int | None = None, text_dim: int | None = None, attn_depth: int = 1,
                 attn_heads: int = 4, video: str | None = None, temporal_stride: int = 2,
                 timestep_cond: bool = False, timestep_emb_dim: int = 128, norm_groups: int = GN_GROUPS,
                 pos_emb: bool = True, temporal_patch: int = 1):
        super().__init__()
        if video not in (None, "frame-avg", "3d"):
            raise ValueError(f"video must be None, 'frame-avg' or '3d', got {video!r}")
        if in_channels < 1 or width < 1:
            raise ValueError(f"in_channels and width must be positive, got {in_channels}, {width}")
        self.in_channels = in_channels
        self.width = width
        self.text_dim = text_dim
        self.video = video
        self.timestep_cond = timestep_cond
        self.patch = patch
        self.temporal_patch = temporal_patch if video == "3d" else None
        self.trunk = ConvTrunk(in_channels, width, depth, patch, patch_padding, dims=3 if video == "3d" else 2,
                               temporal_stride=temporal_stride, norm_groups=norm_groups, temporal_patch=temporal_patch)
        self.film = TimestepFiLM(width, self.trunk.num_blocks, timestep_emb_dim) if timestep_cond else None
        self.pos = None
        if text_dim is not None:
            self.text_proj = TextProjection(text_dim, width)
            if pos_emb:
                self.pos = nn.Linear(NUM_COORD_FEATURES, width)
            self.cross = nn.ModuleList(CrossAttentionBlock(width, attn_heads) for _ in range(attn_depth))
        self.proj = nn.Conv2d(width, width, 1)  # Tab. 10 "Conv 1x1 128 -> 128" after pooling
        self.out = nn.Linear(width, 1)

    # ---- input checks --------------------------------------------------------------------------------
    @property
    def is_video(self) -> bool:
        return self.video is not None

    @property
    def needs_text(self) -> bool:
        return self.text_dim is not None

    def check_latents(self, shape: tuple[int, ...]) -> None:
        """Shape-only check of latents (no device sync): images / videos, channels, and a size the patch divides."""
        want = 5 if self.is_video else 4
        if len(shape) != want:
            form = "(B, T, C, H, W) videos" if self.is_video else "(B, C, H, W) images"
            raise LRMInputError(f"{type(self).__name__} takes {form}, got latents of shape {tuple(shape)}")
        if shape[-3] != self.in_channels:
            raise LRMInputError(f"latents have {shape[-3]} channels at dim -3 (shape {tuple(shape)}); this head was "
                                f"built with in_channels={self.in_channels}")
        check_patch_divides(shape, self.patch, self.temporal_patch, type(self).__name__)

    def check_inputs(self, latents: torch.Tensor, text_emb: torch.Tensor | None, text_mask: torch.Tensor | None):
        self.check_latents(tuple(latents.shape))
        if not self.needs_text:
            if text_emb is not None:
                raise LRMInputError(f"{type(self).__name__} is not text-conditioned; do not pass text_emb "
                                    "(use a text-* head for prompt-dependent rewards)")
            return None, None
        if text_emb is None:
            raise LRMInputError(f"{type(self).__name__} is text-conditioned: pass text_emb (B, L, {self.text_dim}) "
                                "token embeddings and text_mask (B, L)")
        if text_emb.dim() == 2:  # one pooled vector per prompt
            text_emb = text_emb.unsqueeze(1)
            text_mask = None
        if text_emb.dim() != 3 or text_emb.shape[-1] != self.text_dim or text_emb.shape[0] != latents.shape[0]:
            raise LRMInputError(f"text_emb must be (B={latents.shape[0]}, L, {self.text_dim}), got "
                                f"{tuple(text_emb.shape)}")
        if text_mask is not None and tuple(text_mask.shape) != tuple(text_emb.shape[:2]):
            raise LRMInputError(f"text_mask must be (B, L) = {tuple(text_emb.shape[:2])}, got "
                                f"{tuple(text_mask.shape)}")
        return text_emb, text_mask

    # ---- forward ---------------------------------------------------------------------------------------
    def _films(self, t: torch.Tensor | None, batch: int, device, repeat: int = 1):
        if self.film is None:
            if t is not None:
                raise ValueError(f"{type(self).__name__} is not noise-aware (timestep_cond=False): do not pass t, or "
                                 "build the head with timestep_cond=True")
            return None
        if t is None:
            t = torch.zeros(batch, device=device)
        t = torch.as_tensor(t, device=device).float().reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch)
        if t.numel() != batch:
            raise ValueError(f"t must be a scalar or (B={batch},) timesteps, got shape {tuple(t.shape)}")
        if repeat > 1:
            t = t.repeat_interleave(repeat)
        return self.film(t)

    def _attend(self, tokens: torch.Tensor, text: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        if text is None:
            return tokens
        for blk in self.cross:
            tokens = blk(tokens, text, mask)
        return tokens

    def _with_pos(self, x: torch.Tensor) -> torch.Tensor:
        """(B, W, [t,] h, w) feature map -> (B, N, W) tokens (+ coordinate embedding for text heads)."""
        tokens = x.flatten(2).transpose(1, 2)
        if self.pos is None or self.text_dim is None:
            return tokens
        t = x.shape[2] if x.dim() == 5 else 1
        return tokens + self.pos(coord_features(t, x.shape[-2], x.shape[-1], x.device)).to(tokens.dtype)

    def _head(self, pooled: torch.Tensor) -> torch.Tensor:
        # pooled (B, W) -> 1x1 conv -> Linear -> (B,)
        h = self.proj(pooled[:, :, None, None]).flatten(1)
        return self.out(h).squeeze(-1)

    def forward(self, latents: torch.Tensor, text_emb: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None, t: torch.Tensor | None = None) -> torch.Tensor:
        text_emb, text_mask = self.check_inputs(latents, text_emb, text_mask)
        text = self.text_proj(text_emb.to(latents.dtype)) if text_emb is not None else None  # (B, L, W)
        B = latents.shape[0]
        if self.video == "frame-avg":
            T = latents.shape[1]
            x = self.trunk(latents.flatten(0, 1), self._films(t, B, latents.device, repeat=T))  # (B*T, W, h, w)
            tokens = x.flatten(2).transpose(1, 2)  # (B*T, hw, W)
            if text is not None and self.pos is not None:
                pos = self.pos(coord_features(T, x.shape[2], x.shape[3], x.device)).to(tokens.dtype)  # (T*hw, W)
                tokens = (tokens.unflatten(0, (B, T)) + pos.view(1, T, -1, pos.shape[-1])).flatten(0, 1)
            if text is not None:
                text = text.repeat_interleave(T, 0)
                text_mask = None if text_mask is None else text_mask.repeat_interleave(T, 0)
            pooled = self._attend(tokens, text, text_mask).mean(1).unflatten(0, (B, T)).mean(1)  # (B, W)
        elif self.video == "3d":
            x = self.trunk(latents.transpose(1, 2), self._films(t, B, latents.device))  # (B, W, t, h, w)
            pooled = self._attend(self._with_pos(x), text, text_mask).mean(1)  # (B, W)
        else:
            x = self.trunk(latents, self._films(t, B, latents.device))  # (B, W, h, w)
            if text is None:
                pooled = x.mean((2, 3))  # AdaptiveAvgPool 1x1
            else:
                pooled = self._attend(self._with_pos(x), text, text_mask).mean(1)
        return self._head(pooled)


class EnsembleLRM(nn.Module):
    """K independently initialised heads; output = mean, std, or mean - lam * std (lower confidence bound)."""

    def __init__(self, members: list[nn.Module], reduce: str = "mean", lam: float = 1.0):
        super().__init__()
        if len(members) < 2:
            raise ValueError("an ensemble needs at least 2 members")
        self.members = nn.ModuleList(members)
        self.reduce = reduce
        self.lam = float(lam)
        first = members[0]
        for attr in ("in_channels", "text_dim", "video", "timestep_cond", "modality", "width"):
            setattr(self, attr, getattr(first, attr))

    @property
    def is_video(self) -> bool:
        return self.video is not None

    @property
    def needs_text(self) -> bool:
        return self.text_dim is not None

    def check_latents(self, shape: tuple[int, ...]) -> None:
        self.members[0].check_latents(shape)  # members share one architecture

    def forward_members(self, latents, text_emb=None, text_mask=None, t=None) -> torch.Tensor:
        """(K, B) member outputs."""
        return torch.stack([m(latents, text_emb, text_mask, t=t) for m in self.members])

    @staticmethod
    def aggregate(members: torch.Tensor, reduce: str, lam: float) -> torch.Tensor:
        mean = members.mean(0)
        if reduce == "mean":
            return mean
        std = members.std(0, unbiased=False)
        return std if reduce == "std" else mean - lam * std

    def forward(self, latents, text_emb=None, text_mask=None, t=None, return_members: bool = False) -> torch.Tensor:
        members = self.forward_members(latents, text_emb, text_mask, t)
        return members if return_members else self.aggregate(members, self.reduce, self.lam)


def member_outputs(model: nn.Module, latents, text_emb=None, text_mask=None, t=None) -> torch.Tensor:
    """(K, B) outputs of every member (K = 1 for a single head): what the trainer regresses.

    Goes through ``model.__call__`` so a DDP-wrapped model (``model.module``) keeps its gradient hooks.
    """
    if isinstance(getattr(model, "module", model), EnsembleLRM):
        return model(latents, text_emb, text_mask, t=t, return_members=True)
    return model(latents, text_emb, text_mask, t=t).unsqueeze(0)
