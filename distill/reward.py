"""Mixed rewards on the student's final sample (paper 004 §3.4-3.5, Eq. 13-15).

    L_spatial  = -E[ 1/3 sum_{m in first, middle, last} (R_it(x0^m, c) + R_iq(x0^m)) ]     (Eq. 13)
    L_temporal = -E[ R_v(x0, c) ]                                                          (Eq. 14)
    L_total    = L_traj + l1 L_gen + l2 L_spatial + l3 L_temporal, (l1, l2, l3) = (0.5, 1, 1.5)  (Eq. 15)

Frames: first 0, middle (T - 1) // 2, last T - 1 of the latent video (B, T, C, h, w), duplicates kept as Eq. 13's
1/3 sum (T = 1: [0, 0, 0]; T = 2: [0, 0, 1]); ``reward_adapters.base.select_frames(T, "first-middle-last")``, the
rule image rewards use on videos. The frames are picked on the latents in both forms, so a pixel reward scores the
decodings of exactly the latent frames a latent reward scores (the VAEs here decode frame by frame).
Each R is a ``PixelReward`` (decoder + differentiable pixel reward: ``distill.direct.direct_reward_loss``, the paper's
form) or a latent reward (``LatentReward`` or any ``lrm(latents, text_tokens, text_mask) -> (B,)``, through
``distill.lrm_ft.lrm_ft_loss``: no decoder in the loop). Frame terms take image-level rewards on ``(B*3, C, h, w)``
latents / ``(B*3, 3, H, W)`` pixels with the captions repeated per frame; since every sample has 3 frames, -mean over
the B*3 frame rewards is Eq. 13's -E[1/3 sum]. Peer: T2V-Turbo-v2 weights -0.2 (R_HPS + R_CLIP) - 0.5 R_InternVideo2.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from distill.direct import PIXEL_CLAMPS, direct_reward_loss
from distill.lrm_ft import lrm_ft_loss
from distill.objective import ObjectiveTerm, StepContext
from reward_adapters.base import Reward, select_frames

DEFAULT_WEIGHTS = (0.5, 1.0, 1.5)  # (lambda_1 L_gen, lambda_2 L_spatial, lambda_3 L_temporal), paper §4.1


def spatial_frames(num_frames: int) -> list[int]:
    """[first, middle, last] = [0, (T - 1) // 2, T - 1] (duplicates kept for T < 3)."""
    if int(num_frames) < 1:
        raise ValueError(f"a video needs at least one frame, got num_frames={num_frames}")
    return select_frames(int(num_frames), "first-middle-last")


@dataclass
class PixelReward:
    """R through the decoder: decode (``VAE.decode(z, clamp=False)``), map to [0, 1] (``pixel_clamp``), score."""

    reward: Callable[..., torch.Tensor]
    vae: Any
    checkpointing: bool = False
    pixel_clamp: str = "straight-through"

    def __post_init__(self):
        if self.pixel_clamp not in PIXEL_CLAMPS:
            raise ValueError(f"pixel_clamp {self.pixel_clamp!r} is not one of {PIXEL_CLAMPS}")

    def loss(self, latents: torch.Tensor, text_tokens: torch.Tensor | None, text_mask: torch.Tensor | None,
             prompts: Sequence[str] | None) -> tuple[torch.Tensor, torch.Tensor]:
        return direct_reward_loss(latents, self.vae, self.reward, prompts, frames="all",
                                  checkpointing=self.checkpointing, pixel_clamp=self.pixel_clamp)


@dataclass
class LatentRewardTerm:
    """R on the latents: a ``LatentReward`` or any ``lrm(latents, text_tokens, text_mask) -> (B,)``."""

    lrm: Callable[..., torch.Tensor]

    def loss(self, latents: torch.Tensor, text_tokens: torch.Tensor | None, text_mask: torch.Tensor | None,
             prompts: Sequence[str] | None) -> tuple[torch.Tensor, torch.Tensor]:
        return lrm_ft_loss(self.lrm, latents, text_tokens, text_mask)


def as_term(r: Any) -> PixelReward | LatentRewardTerm:
    """``PixelReward`` / ``LatentRewardTerm`` as given; a ``reward_adapters`` reward must be wrapped with its decoder
    (``PixelReward``); any other callable is a latent reward."""
    if isinstance(r, (PixelReward, LatentRewardTerm)):
        return r
    if isinstance(r, Reward):
        raise TypeError(f"{getattr(r, 'name', type(r).__name__)!r} is a pixel reward: pass PixelReward(reward, vae)")
    if not callable(r):
        raise TypeError(f"a reward term is PixelReward, LatentRewardTerm or a callable lrm, got {type(r).__name__}")
    return LatentRewardTerm(r)


def frames_as_images(x0: torch.Tensor, text_tokens: torch.Tensor | None, text_mask: torch.Tensor | None,
                     prompts: Sequence[str] | None):
    """Video latents ``(B, T, C, h, w)`` -> first/middle/last frames ``(B*3, C, h, w)`` (sample-major) with captions
    repeated per frame; image latents ``(B, C, h, w)`` pass through. Returns ``(frames, tokens, mask, prompts)``."""
    if x0.dim() == 4:
        return x0, text_tokens, text_mask, prompts
    if x0.dim() != 5:
        raise ValueError(f"latents must be (B, C, h, w) or (B, T, C, h, w), got shape {tuple(x0.shape)}")
    idx = spatial_frames(x0.shape[1])
    n = len(idx)
    frames = x0[:, idx].flatten(0, 1)  # (B*3, C, h, w)
    rep = (lambda v: None if v is None else v.repeat_interleave(n, dim=0))
    ps = None if prompts is None else [p for p in prompts for _ in range(n)]
    return frames, rep(text_tokens), rep(text_mask), ps


def spatial_loss(x0: torch.Tensor, r_it: Any = None, r_iq: Any = None, text_tokens: torch.Tensor | None = None,
                 text_mask: torch.Tensor | None = None, prompts: Sequence[str] | None = None
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 13 (either reward may be None); ``(loss, info)`` with each reward's mean over frames."""
    terms = {"r_it": r_it, "r_iq": r_iq}
    if all(v is None for v in terms.values()):
        raise ValueError("spatial_loss needs r_it or r_iq")
    frames, tok, mask, ps = frames_as_images(x0, text_tokens, text_mask, prompts)
    loss, info = x0.new_zeros((), dtype=torch.float32), {}
    for name, r in terms.items():
        if r is not None:
            part, rewards = as_term(r).loss(frames, tok, mask, ps)
            loss, info[name] = loss + part, float(rewards.mean())
    return loss, info


def temporal_loss(x0: torch.Tensor, r_v: Any, text_tokens: torch.Tensor | None = None,
                  text_mask: torch.Tensor | None = None, prompts: Sequence[str] | None = None
                  ) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 14 on the whole clip ``(B, T, C, h, w)``."""
    if x0.dim() != 5:
        raise ValueError(f"the temporal reward scores videos (B, T, C, h, w), got shape {tuple(x0.shape)}")
    loss, rewards = as_term(r_v).loss(x0, text_tokens, text_mask, prompts)
    return loss, {"r_v": float(rewards.mean())}


def total_loss(l_traj: torch.Tensor, l_gen: torch.Tensor | None = None, l_spatial: torch.Tensor | None = None,
               l_temporal: torch.Tensor | None = None, weights: Sequence[float] = DEFAULT_WEIGHTS) -> torch.Tensor:
    """Eq. 15: L_traj + l1 L_gen + l2 L_spatial + l3 L_temporal (absent terms count 0)."""
    if len(weights) != 3:
        raise ValueError(f"weights are (lambda_1, lambda_2, lambda_3), got {tuple(weights)}")
    out = l_traj
    for w, term in zip(weights, (l_gen, l_spatial, l_temporal)):
        if term is not None:
            out = out + float(w) * term
    return out


@dataclass
class MixedReward:
    """The reward part of Eq. 15: ``loss(x0, ...) = l2 L_spatial + l3 L_temporal`` (terms left None are skipped)."""

    r_it: Any = None
    r_iq: Any = None
    r_v: Any = None
    weights: tuple[float, float, float] = field(default=DEFAULT_WEIGHTS)

    def loss(self, x0: torch.Tensor, text_tokens: torch.Tensor | None = None, text_mask: torch.Tensor | None = None,
             prompts: Sequence[str] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        zero = x0.new_zeros((), dtype=torch.float32)
        l_s, info = (spatial_loss(x0, self.r_it, self.r_iq, text_tokens, text_mask, prompts)
                     if (self.r_it is not None or self.r_iq is not None) else (None, {}))
        l_t, info_t = (temporal_loss(x0, self.r_v, text_tokens, text_mask, prompts) if self.r_v is not None
                       else (None, {}))
        loss = total_loss(zero, None, l_s, l_t, self.weights)
        return loss, {**info, **info_t, "l_spatial": float(l_s.detach()) if l_s is not None else 0.0,
                      "l_temporal": float(l_t.detach()) if l_t is not None else 0.0}


class MixedRewardTerm(ObjectiveTerm):
    """Paper 004's mixed rewards (Eq. 13-15) on the backward-simulated x_hat; the lambdas live in ``mixed``."""

    name, needs_x_hat = "mixed", True

    def __init__(self, mixed: MixedReward):
        super().__init__(1.0)
        self.mixed = mixed

    def generator_loss(self, ctx: StepContext) -> tuple[torch.Tensor, dict[str, Any]]:
        loss, _ = self.mixed.loss(ctx.x_hat, ctx.tok, ctx.mask, ctx.batch.prompts)
        return loss, {"loss_mixed": float(loss.detach())}


__all__ = ["MixedRewardTerm", "DEFAULT_WEIGHTS", "spatial_frames", "PixelReward", "LatentRewardTerm", "as_term",
           "frames_as_images", "spatial_loss", "temporal_loss", "total_loss", "MixedReward"]
