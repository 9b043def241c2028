"""LAION aesthetic predictors on OpenAI CLIP ViT-L/14 image embeddings (L2-normalised).

- "aesthetic": the improved predictor (christophschuhmann/improved-aesthetic-predictor,
  ``sac+logos+ava1-l14-linearMSE.pth``): Linear 768-1024-128-64-16-1 with dropout and no
  activations (an affine map at eval time).
- "aesthetic-v1": LAION-AI/aesthetic-predictor ``sa_0_4_vit_l_14_linear.pth``: Linear(768, 1).
Scores are on the predictors' 1-10 scale (VBench divides by 10: pass ``scale=0.1``).

The heads are not on the Hugging Face hub: they are looked for at ``head_weights=``, then in
``$LRM_CACHE_DIR/aesthetic/`` (torch.hub's checkpoint dir when unset), and otherwise downloaded from
their GitHub URL into that directory (``torch.hub.download_url_to_file``; not when ``HF_HUB_OFFLINE``).
"""

from __future__ import annotations

import torch
from torch import nn

from reward_adapters.base import register_reward
from reward_adapters.openclip_backbone import OpenCLIPReward, create_open_clip
from reward_adapters.preprocess import open_clip_preprocess
from reward_adapters.weights import cached, load_state_dict, resolve_weights

HEAD_FILES = {
    "improved": ("sac+logos+ava1-l14-linearMSE.pth",
                 "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                 "sac+logos+ava1-l14-linearMSE.pth"),
    "v1": ("sa_0_4_vit_l_14_linear.pth",
           "https://github.com/LAION-AI/aesthetic-predictor/raw/main/sa_0_4_vit_l_14_linear.pth"),
}


class AestheticMLP(nn.Module):
    """The improved predictor's head; state-dict keys layers.{0,2,4,6,7} as in the released file."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def build_head(kind: str, dim: int = 768) -> nn.Module:
    return AestheticMLP(dim) if kind == "improved" else nn.Linear(dim, 1)


class AestheticReward(OpenCLIPReward):
    """LAION aesthetic score of an image.

    Args:
        head: "improved" (default) or "v1".
        head_weights: path to the head's .pth / .safetensors, or a directory holding the released file
            (default ``$LRM_CACHE_DIR/aesthetic/<file>``, else downloaded from ``HEAD_FILES[head]``'s URL).
        arch / pretrained: the CLIP backbone (ViT-L-14 / "openai" for the released heads).
        model / head_module: inject modules instead of loading (tests use tiny random ones).
        scale: multiply the score (0.1 gives VBench's 0-1 aesthetic quality).
    """

    modality = "image"

    def __init__(self, head: str = "improved", head_weights: str | None = None, arch: str = "ViT-L-14",
                 pretrained: str | None = "openai", model: nn.Module | None = None,
                 head_module: nn.Module | None = None, scale: float = 1.0, precision: str = "fp32", **kw):
        if head not in HEAD_FILES:
            raise ValueError(f"head={head!r}; valid: {list(HEAD_FILES)}")
        self.name = "aesthetic" if head == "improved" else "aesthetic-v1"
        self.version = f"laion-{head}-{arch}-{pretrained}" + ("" if model is None and head_module is None
                                                                else "-injected")
        device = torch.device(kw.get("device", "cpu"))
        if head_module is None:  # the small file first: a missing head fails before the CLIP model loads
            fname, url = HEAD_FILES[head]
            path = resolve_weights(fname, path=head_weights, subdir="aesthetic", url=url, option="head_weights")

            def build():
                m = build_head(head)
                m.load_state_dict(load_state_dict(path))
                return m

            head_module = cached(("aesthetic-head", str(path)), build)
        if model is None:
            model = create_open_clip(arch, pretrained, device)
        super().__init__(model, arch, tokenizer=None, precision=precision, **kw)
        self.head = head_module.eval().requires_grad_(False).to(self.device)
        self.scale = float(scale)

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        return open_clip_preprocess(pixels.to(self.device, torch.float32), self.preprocess_cfg)

    def score_images(self, pixels, prompts):
        emb = self.image_features(self.preprocess(pixels))  # (N, 768), L2-normalised
        return self.scale * self.head(emb).squeeze(-1)


@register_reward("aesthetic")
def aesthetic(**kw) -> AestheticReward:
    """LAION improved aesthetic predictor (MLP on CLIP ViT-L/14 embeddings), 1-10 scale."""
    return AestheticReward(head="improved", **kw)


aesthetic.modality = "image"  # shown by `lrm rewards list`


@register_reward("aesthetic-v1")
def aesthetic_v1(**kw) -> AestheticReward:
    """LAION aesthetic predictor v1 (Linear(768, 1) on CLIP ViT-L/14 embeddings)."""
    return AestheticReward(head="v1", **kw)


aesthetic_v1.modality = "image"  # shown by `lrm rewards list`
