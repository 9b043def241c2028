"""CLIP score: scaled cosine of open_clip image and text features, for any architecture / pretrained tag.

Default ``scale=100`` matches torchmetrics' CLIPScore (which also clips negatives at 0: pass
``clip_negative=True``; Hessel et al. 2021 use scale 2.5 with the clip).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from reward_adapters.base import register_reward
from reward_adapters.openclip_backbone import OpenCLIPReward, create_open_clip
from reward_adapters.preprocess import open_clip_preprocess


@register_reward("clip-score")
class CLIPScoreReward(OpenCLIPReward):
    """scale * cos(image, text) with an open_clip model (default ViT-L-14 / openai).

    Args:
        arch / pretrained: any open_clip architecture and pretrained tag (or a local weights path).
        model / tokenizer: inject an open_clip model and tokenizer instead (tests).
        scale: multiplier (100 as torchmetrics); clip_negative: max(score, 0) as torchmetrics/Hessel.
    """

    name = "clip-score"
    modality = "text-image"

    def __init__(self, arch: str = "ViT-L-14", pretrained: str | None = "openai", model: nn.Module | None = None,
                 tokenizer: Callable | None = None, scale: float = 100.0, clip_negative: bool = False,
                 precision: str = "fp32", **kw):
        self.version = f"{arch}-{pretrained}" + ("" if model is None else "-injected")
        device = torch.device(kw.get("device", "cpu"))
        if model is None:
            model = create_open_clip(arch, pretrained, device)
        super().__init__(model, arch, tokenizer=tokenizer, precision=precision, **kw)
        self.scale = float(scale)
        self.clip_negative = bool(clip_negative)

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        return open_clip_preprocess(pixels.to(self.device, torch.float32), self.preprocess_cfg)

    def score_images(self, pixels, prompts):
        img = self.image_features(self.preprocess(pixels))
        txt = self.text_features(prompts)
        s = self.scale * (img * txt).sum(dim=-1)
        return s.clamp_min(0) if self.clip_negative else s
