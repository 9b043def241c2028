"""Image rewards that need no weights: JPEG (in)compressibility, colorfulness, sharpness, brightness."""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from reward_adapters.base import NumpyReward, Reward, register_reward

# ITU-R BT.601 luma, as OpenCV's RGB2GRAY and PIL's "L" conversion use.
LUMA = (0.299, 0.587, 0.114)


def jpeg_size_kb(img_uint8: np.ndarray, prompt=None, quality: int = 95) -> float:
    """Size in kB (1000 bytes) of the JPEG encoding at ``quality`` of one uint8 (H, W, 3) image."""
    buf = io.BytesIO()
    Image.fromarray(img_uint8).save(buf, format="JPEG", quality=quality)
    return buf.tell() / 1000.0


def _jpeg_reward(img_uint8: np.ndarray, prompt=None, quality: int = 95, sign: float = -1.0) -> float:
    return sign * jpeg_size_kb(img_uint8, quality=quality)


class _JPEG(NumpyReward):
    # DDPO (ddpo-pytorch rewards.jpeg_compressibility): uint8 via round(x*255), PIL JPEG q95, size/1000.
    score_fn = staticmethod(_jpeg_reward)
    uint8_input = True
    version = "ddpo-q95-v1"
    sign = -1.0

    def __init__(self, quality: int = 95, **kw):
        super().__init__(**kw)
        if not 1 <= quality <= 100:
            raise ValueError(f"quality must be in 1..100, got {quality}")
        self.quality = int(quality)
        if quality != 95:
            self.version = f"ddpo-q{quality}-v1"

    def params(self) -> dict:
        return {"quality": self.quality, "sign": self.sign}


@register_reward("jpeg-compressibility")
class JPEGCompressibility(_JPEG):
    """-(JPEG size in kB at quality 95) of the uint8 RGB image (DDPO's compressibility reward)."""

    name = "jpeg-compressibility"
    sign = -1.0


@register_reward("jpeg-incompressibility")
class JPEGIncompressibility(_JPEG):
    """+(JPEG size in kB at quality 95) of the uint8 RGB image (DDPO's incompressibility reward)."""

    name = "jpeg-incompressibility"
    sign = 1.0


@register_reward("colorfulness")
class Colorfulness(Reward):
    """Hasler & Suesstrunk (2003) colorfulness M on the 0-255 scale (torch, batched, differentiable)."""

    name = "colorfulness"
    version = "hasler-suesstrunk-v1"
    differentiable = True

    def score_images(self, pixels, prompts):
        x = pixels.to(self.device, torch.float32) * 255.0  # (N, 3, H, W)
        r, g, b = x[:, 0], x[:, 1], x[:, 2]
        rg = (r - g).flatten(1)
        yb = (0.5 * (r + g) - b).flatten(1)
        std = torch.sqrt(rg.var(dim=1, unbiased=False) + yb.var(dim=1, unbiased=False))
        mean = torch.sqrt(rg.mean(dim=1) ** 2 + yb.mean(dim=1) ** 2)
        return std + 0.3 * mean


def luma(pixels: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, H, W) BT.601 luma."""
    w = torch.tensor(LUMA, dtype=pixels.dtype, device=pixels.device)
    return torch.einsum("nchw,c->nhw", pixels, w)


@register_reward("sharpness")
class Sharpness(Reward):
    """Variance of the Laplacian of the gray image on the 0-255 scale (OpenCV 3x3 kernel, reflect-101 border)."""

    name = "sharpness"
    version = "laplacian-var-v1"
    differentiable = True

    def score_images(self, pixels, prompts):
        gray = luma(pixels.to(self.device, torch.float32) * 255.0)[:, None]  # (N, 1, H, W)
        k = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], device=gray.device)
        # cv2.Laplacian(ksize=1) with BORDER_REFLECT_101 == torch "reflect" padding.
        lap = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="reflect"), k[None, None])
        return lap.flatten(1).var(dim=1, unbiased=False)


@register_reward("brightness")
class Brightness(Reward):
    """Mean BT.601 luma in [0, 1]."""

    name = "brightness"
    version = "bt601-luma-v1"
    differentiable = True

    def score_images(self, pixels, prompts):
        return luma(pixels.to(self.device, torch.float32)).flatten(1).mean(dim=1)
