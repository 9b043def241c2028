"""Image LRM: DOLLAR Tab. 10 (Conv 4x4 s4 p1 -> GN -> SiLU; Conv 3x3 s2 p1 -> GN -> SiLU; pool; 1x1; Linear)."""

from __future__ import annotations

from latent_rewards.heads.base import ConvLRM
from latent_rewards.registry import register_lrm


class ImageCNN(ConvLRM):
    """R(x) for image latents (B, C, H, W). Defaults are Tab. 10 exactly (189,441 parameters at C = 12)."""

    modality = "image"

    def __init__(self, in_channels: int = 4, **kw):
        for k in ("text_dim", "video"):
            if kw.get(k) is not None:
                raise ValueError(f"image-cnn takes no {k}; use a text-* or video-* head")
        kw.pop("text_dim", None)
        kw.pop("video", None)
        super().__init__(in_channels=in_channels, **kw)


@register_lrm("image-cnn")
def image_cnn(**kw) -> ImageCNN:
    """Image reward head, DOLLAR Tab. 10 (width 128, patch 4, depth 1 by default)."""
    return ImageCNN(**kw)
