"""Weight-free video rewards: VBench temporal flickering and an OpenCV optical-flow motion estimator."""

from __future__ import annotations

import numpy as np
import torch

from reward_adapters.base import NumpyReward, Reward, register_reward


@register_reward("temporal-flickering")
class TemporalFlickering(Reward):
    """VBench temporal flickering: (255 - mean |frame_t+1 - frame_t| on 0-255) / 255; 1 = no change.

    Args:
        quantize: round frames to uint8 first, as VBench scores decoded video files (default True).
            With ``quantize=False`` the reward is differentiable.
    """

    name = "temporal-flickering"
    version = "vbench-v1"
    modality = "video"

    def __init__(self, quantize: bool = True, **kw):
        super().__init__(**kw)
        self.quantize = bool(quantize)
        self.differentiable = not self.quantize
        if not self.quantize:
            self.version = "vbench-float-v1"

    def score_videos(self, pixels, prompts):
        x = pixels.to(self.device, torch.float32) * 255.0  # (B, T, 3, H, W)
        if self.quantize:
            x = x.round().clamp(0, 255)
        # VBench: per-pair mean abs diff, mean over pairs (all pairs have equal size, so one mean).
        mae = (x[:, 1:] - x[:, :-1]).abs().flatten(1).mean(dim=1)
        return (255.0 - mae) / 255.0


@register_reward("temporal-flickering-float",
                 help="temporal-flickering without the uint8 rounding: differentiable, a pixel R_v for training")
def temporal_flickering_float(**kw) -> TemporalFlickering:
    """``TemporalFlickering(quantize=False)`` by name, so a config can name it as a differentiable reward."""
    return TemporalFlickering(quantize=False, **kw)


# cv2.calcOpticalFlowFarneback settings (OpenCV's tutorial values) and the top fraction of magnitudes kept.
FARNEBACK_PARAMS = {"pyr_scale": 0.5, "levels": 3, "winsize": 15, "iterations": 3, "poly_n": 5, "poly_sigma": 1.2,
                    "flags": 0}
TOP_FRACTION = 0.05


def farneback_pair_scores(video_uint8: np.ndarray) -> np.ndarray:
    """Per consecutive pair: mean of the top 5% optical-flow magnitudes (pixels), Farneback flow.

    ``video_uint8``: (T, H, W, 3). The top-5% statistic follows VBench's dynamic degree, with
    OpenCV Farneback in place of RAFT.
    """
    import cv2

    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in video_uint8]
    out = []
    for a, b in zip(gray[:-1], gray[1:]):
        flow = cv2.calcOpticalFlowFarneback(a, b, None, **FARNEBACK_PARAMS)
        mag = np.sqrt((flow.astype(np.float64) ** 2).sum(axis=-1)).ravel()
        k = max(1, int(TOP_FRACTION * mag.size))
        out.append(float(np.mean(np.partition(mag, mag.size - k)[-k:])))
    return np.asarray(out)


def _motion(video_uint8: np.ndarray, prompt=None, mode: str = "magnitude") -> float:
    T, H, W = video_uint8.shape[:3]
    scale = min(H, W) / 256.0
    pairs = farneback_pair_scores(video_uint8)
    if mode == "magnitude":
        return float(pairs.mean() / scale)
    # Dynamic-degree-style decision (VBench thresholds, Farneback flow): moving if enough pairs exceed it.
    thres = 6.0 * scale
    count_num = round(4 * (T / 16.0))
    return float((pairs > thres).sum() >= max(1, count_num))


@register_reward("motion-magnitude")
class MotionMagnitude(NumpyReward):
    """Optical-flow motion (OpenCV Farneback): mean over frame pairs of the top-5% flow magnitude.

    Units: pixels per frame, rescaled to a 256-pixel short side. ``mode="dynamic-degree"`` returns
    a binary 0/1 moving decision with VBench's thresholds (6.0 at 256 px, round(4T/16) pairs) —
    an estimator of VBench's dynamic degree, which uses RAFT, not the VBench metric itself.
    """

    name = "motion-magnitude"
    version = "farneback-top5-v1"
    modality = "video"
    uint8_input = True
    score_fn = staticmethod(_motion)

    def __init__(self, mode: str = "magnitude", **kw):
        super().__init__(**kw)
        if mode not in ("magnitude", "dynamic-degree"):
            raise ValueError(f"mode={mode!r}; valid: 'magnitude', 'dynamic-degree'")
        self.mode = mode
        if mode == "dynamic-degree":
            self.version = "farneback-dynamic-degree-v1"

    def params(self) -> dict:
        return {"mode": self.mode}
