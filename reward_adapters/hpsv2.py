"""HPSv2 v2.0 / v2.1 (Wu et al. 2023): open_clip ViT-H-14 fine-tuned on human preferences.

Original scoring (hpsv2 1.2 ``img_score.score``): ``ResizeMaxSize(224)`` (longest side to 224, bicubic,
zero-pad to a square) on the ToTensor image, OpenAI mean/std, then the diagonal of
``image_features @ text_features.T`` with both L2-normalised: a cosine, no logit scale.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from reward_adapters.base import register_reward
from reward_adapters.openclip_backbone import OpenCLIPReward, create_open_clip
from reward_adapters.preprocess import OPENAI_MEAN, OPENAI_STD, normalize, resize_longest_pad
from reward_adapters.weights import resolve_weights

HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
HPS_HUB_REPO = "xswu/HPSv2"


class HPSv2Reward(OpenCLIPReward):
    """HPSv2 human preference score (cosine of open_clip ViT-H-14 image and text features).

    Args:
        hps_version: "v2.0" or "v2.1".
        weights: path to ``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt`` (or a directory holding it);
            default: ``$LRM_CACHE_DIR/hpsv2/`` then the hub repo xswu/HPSv2.
        arch: open_clip architecture (ViT-H-14 for the released checkpoints).
        model / tokenizer: inject an open_clip model and tokenizer instead (tests use tiny random ones).
        precision: "fp32", "bf16" or "fp16" (the original runs under fp16 autocast).
    """

    modality = "text-image"

    def __init__(self, hps_version: str = "v2.0", weights: str | None = None, arch: str = "ViT-H-14",
                 model: nn.Module | None = None, tokenizer: Callable | None = None, precision: str = "fp32", **kw):
        if hps_version not in HPS_FILES:
            raise ValueError(f"hps_version={hps_version!r}; valid: {list(HPS_FILES)}")
        self.name = "hpsv2" if hps_version == "v2.0" else "hpsv2.1"
        self.version = f"hps-{hps_version}" + ("" if model is None else "-injected")
        device = torch.device(kw.get("device", "cpu"))
        if model is None:
            path = resolve_weights(HPS_FILES[hps_version], path=weights, hub_repo=HPS_HUB_REPO, subdir="hpsv2")
            model = create_open_clip(arch, None, device, state_dict_path=path)
        super().__init__(model, arch, tokenizer=tokenizer, precision=precision, **kw)
        self.hps_version = hps_version

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> (N, 3, S, S) model input: resize longest side, zero-pad, normalise."""
        x = resize_longest_pad(pixels.to(self.device, torch.float32), int(self.preprocess_cfg["size"]), fill=0.0)
        return normalize(x, OPENAI_MEAN, OPENAI_STD)

    def score_images(self, pixels, prompts):
        img = self.image_features(self.preprocess(pixels))  # (N, D)
        txt = self.text_features(prompts)  # (N, D)
        return (img * txt).sum(dim=-1)


@register_reward("hpsv2")
def hpsv2(**kw) -> HPSv2Reward:
    """HPSv2 v2.0 (open_clip ViT-H-14, pad-to-square preprocessing, cosine score)."""
    return HPSv2Reward(hps_version="v2.0", **kw)


hpsv2.modality = "text-image"  # shown by `lrm rewards list`


@register_reward("hpsv2.1")
def hpsv2_1(**kw) -> HPSv2Reward:
    """HPSv2.1 (same model family and preprocessing as v2.0, newer checkpoint)."""
    return HPSv2Reward(hps_version="v2.1", **kw)


hpsv2_1.modality = "text-image"  # shown by `lrm rewards list`
