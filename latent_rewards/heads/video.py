"""Video LRMs: per-frame 2D trunk with features averaged over frames (the paper's choice), or a Conv3d trunk."""

from __future__ import annotations

from latent_rewards.heads.base import ConvLRM
from latent_rewards.registry import register_lrm


class VideoCNN(ConvLRM):
    """R(x) for video latents (B, T, C, H, W). ``video="frame-avg"`` runs the Tab. 10 trunk on all B*T frames in
    one batch and averages the pooled features over frames (order-blind: it cannot see motion direction);
    ``video="3d"`` uses Conv3d blocks (kernel 3 over time) and sees temporal order."""

    modality = "video"

    def __init__(self, in_channels: int = 4, video: str = "frame-avg", **kw):
        if kw.pop("text_dim", None) is not None:
            raise ValueError("video-* heads take no text; use text-video-*")
        super().__init__(in_channels=in_channels, video=video, **kw)


@register_lrm("video-frame-avg")
def video_frame_avg(**kw) -> VideoCNN:
    """Video reward head: Tab. 10 trunk per frame, features averaged over frames (DOLLAR)."""
    return VideoCNN(video="frame-avg", **kw)


@register_lrm("video-3d-cnn")
def video_3d_cnn(**kw) -> VideoCNN:
    """Video reward head with a Conv3d trunk (sees temporal order and motion)."""
    return VideoCNN(video="3d", **kw)
