"""Batched torch versions of the reward models' PIL/torchvision preprocessing (on the reward's device).

Inputs are float pixels in [0, 1], ``(N, 3, H, W)`` (what ``ToTensor`` would give). No clamp, no uint8
round trip: every op is differentiable. The original pipelines resize a uint8 PIL image; on inputs
that are exact multiples of 1/255 the only difference is PIL's rounding of its resized output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def resize(x: torch.Tensor, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """Antialiased resize to (h, w) like torchvision's ``Resize``; a no-op when the size already matches."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode in ("bicubic", "bilinear"):
        return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)
    return F.interpolate(x, size=size, mode=mode)


def shortest_side_size(h: int, w: int, size: int) -> tuple[int, int]:
    """torchvision ``Resize(int)``: the short side becomes ``size``, the long side int(size * long / short)."""
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(size * long / short)
    return (size, new_long) if h <= w else (new_long, size)


def center_crop(x: torch.Tensor, size: int, rounding: str = "torchvision") -> torch.Tensor:
    """Center crop to size x size. torchvision rounds the offset (round(d / 2)); HF image processors floor it."""
    h, w = x.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"center_crop: image {h}x{w} is smaller than the crop {size}; resize first")
    if rounding == "torchvision":
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    elif rounding == "hf":
        top, left = (h - size) // 2, (w - size) // 2
    else:
        raise ValueError(f"rounding={rounding!r}; valid: 'torchvision', 'hf'")
    return x[..., top:top + size, left:left + size]


def resize_shortest_center_crop(x: torch.Tensor, size: int, mode: str = "bicubic",
                                rounding: str = "torchvision") -> torch.Tensor:
    """CLIP / BLIP / PickScore: Resize(size) on the short side, then CenterCrop(size)."""
    x = resize(x, shortest_side_size(x.shape[-2], x.shape[-1], size), mode)
    return center_crop(x, size, rounding)


def resize_longest_pad(x: torch.Tensor, size: int, fill: float = 0.0, mode: str = "bicubic") -> torch.Tensor:
    """HPSv2 ``ResizeMaxSize``: longest side to ``size`` (round(dim * scale)), then pad to a square with
    ``fill`` (left/top get pad // 2). Like the original, nothing happens when the longest side is already
    ``size`` (a 224x200 image stays non-square there too)."""
    h, w = x.shape[-2:]
    scale = size / float(max(h, w))
    if scale == 1.0:
        return x
    nh, nw = round(h * scale), round(w * scale)
    x = resize(x, (nh, nw), mode)
    ph, pw = size - nh, size - nw
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=fill)


def resize_squash(x: torch.Tensor, size: int, mode: str = "bicubic") -> torch.Tensor:
    return resize(x, (size, size), mode)


def normalize(x: torch.Tensor, mean=OPENAI_MEAN, std=OPENAI_STD) -> torch.Tensor:
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device)[:, None, None]
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device)[:, None, None]
    return (x - m) / s


def open_clip_preprocess(x: torch.Tensor, cfg: dict) -> torch.Tensor:
    """open_clip's eval transform from ``model.visual.preprocess_cfg`` (size, mode, mean, std, resize_mode)."""
    size = cfg.get("size", 224)
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    interp = cfg.get("interpolation", "bicubic")
    mode = cfg.get("resize_mode", "shortest")
    if mode == "shortest":
        x = resize_shortest_center_crop(x, size, interp)
    elif mode == "longest":
        # open_clip ResizeKeepRatio(longest=1) + CenterCropOrPad
        h, w = x.shape[-2:]
        scale = size / float(max(h, w))
        nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
        x = resize(x, (nh, nw), interp)
        ph, pw = size - nh, size - nw
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=float(cfg.get("fill_color", 0)) / 255.0)
    elif mode == "squash":
        x = resize_squash(x, size, interp)
    else:
        raise ValueError(f"unsupported open_clip resize_mode {mode!r}")
    return normalize(x, cfg.get("mean", OPENAI_MEAN), cfg.get("std", OPENAI_STD))
