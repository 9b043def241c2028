"""Text-video LRMs: the video trunks plus token-level cross-attention to the prompt."""

from __future__ import annotations

from latent_rewards.heads.base import ConvLRM
from latent_rewards.registry import register_lrm


class TextVideoCNN(ConvLRM):
    """R(x, c) for video latents. Frame-avg: each frame's spatial tokens attend to the text, are pooled and
    averaged over frames. 3D: all spatio-temporal tokens of the Conv3d trunk attend to the text."""

    modality = "text-video"

    def __init__(self, in_channels: int = 4, text_dim: int = 384, video: str = "frame-avg", **kw):
        super().__init__(in_channels=in_channels, text_dim=text_dim, video=video, **kw)


@register_lrm("text-video-frame-avg")
def text_video_frame_avg(**kw) -> TextVideoCNN:
    """Text-video reward head: per-frame trunk + cross-attention, averaged over frames."""
    return TextVideoCNN(video="frame-avg", **kw)


@register_lrm("text-video-3d-cnn")
def text_video_3d_cnn(**kw) -> TextVideoCNN:
    """Text-video reward head: Conv3d trunk + cross-attention over spatio-temporal tokens."""
    return TextVideoCNN(video="3d", **kw)
