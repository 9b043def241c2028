"""Image grids and GIF strips for looking at samples (used by demos, recipes and reports)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def to_uint8(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """``(..., 3, H, W)`` float in [0, 1] -> ``(..., H, W, 3)`` uint8."""
    a = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
    a = np.clip(a, 0, 1)
    return (np.moveaxis(a, -3, -1) * 255 + 0.5).astype(np.uint8)


def make_grid(images: torch.Tensor | np.ndarray, nrow: int = 8, pad: int = 2, scale: int = 1) -> np.ndarray:
    """``(N, 3, H, W)`` in [0, 1] -> one ``(H', W', 3)`` uint8 grid, ``scale``x nearest upsampling."""
    a = to_uint8(images)
    if scale > 1:
        a = a.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, _ = a.shape
    ncol = min(nrow, n)
    nrows = (n + ncol - 1) // ncol
    grid = np.full((nrows * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = a[i]
    return grid


def save_grid(images, path: str | Path, nrow: int = 8, scale: int = 1) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(make_grid(images, nrow=nrow, scale=scale)).save(path)
    return path


def save_video_strip(videos: torch.Tensor, path: str | Path, frames: int = 8, scale: int = 1) -> Path:
    """``(N, T, 3, H, W)`` -> PNG with one row per video and ``frames`` evenly spaced frames."""
    T = videos.shape[1]
    idx = np.linspace(0, T - 1, min(frames, T)).round().astype(int)
    picked = videos[:, idx]  # (N, F, 3, H, W)
    return save_grid(picked.flatten(0, 1), path, nrow=len(idx), scale=scale)


def save_gif(videos: torch.Tensor, path: str | Path, nrow: int = 4, scale: int = 2, fps: int = 8) -> Path:
    """``(N, T, 3, H, W)`` -> animated GIF of the grid over time."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = [Image.fromarray(make_grid(videos[:, t], nrow=nrow, scale=scale)) for t in range(videos.shape[1])]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
    return path
