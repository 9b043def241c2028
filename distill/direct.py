"""Direct reward-gradient fine-tuning (ReFL / DRaFT-K): backpropagate a differentiable pixel reward through the
VAE decoder into the student, on the last K sampling steps.

1. run the student's k-step sampler (predict x0, re-noise to the next timestep); the first k - K steps run
   without autograd, the last K with it (DRaFT-K; K = 1 is DRaFT-1 / ReFL-like);
2. (video) keep only some frames before decoding: ``"first"``, ``"middle"``, ``"last"``, ``"first-middle-last"``,
   ``"random"`` (``num_frames`` random frames) or ``"all"``; this is what makes video fit at all;
3. decode with ``VAE.decode(z, clamp=False)`` (optionally under activation checkpointing), bring pixels into
   [0, 1] (``pixel_clamp``), score with the differentiable reward, loss = -mean R.

Gradient checkpointing (``torch.utils.checkpoint``) re-computes each student call and the decoder in the backward
pass instead of storing activations: memory for compute, the standard DRaFT setting.
Follows DRaFT (Clark et al. 2024) and ReFL (Xu et al. 2023, ImageReward).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch.utils.checkpoint import checkpoint

from distill.objective import ObjectiveTerm, StepContext
from distill.samplers import k_step_sample, pooled_kw

FRAME_SUBSAMPLING = ("all", "first", "middle", "last", "first-middle-last", "random")
PIXEL_CLAMPS = ("clamp", "straight-through")


def subsample_frames(num_frames: int, mode: str = "all", k: int = 1,
                     generator: torch.Generator | None = None) -> list[int]:
    """Frame indices to decode and score for a video of ``num_frames`` frames (sorted, distinct)."""
    T = int(num_frames)
    if mode not in FRAME_SUBSAMPLING:
        raise ValueError(f"frame subsampling {mode!r} is not one of {FRAME_SUBSAMPLING}")
    mid = (T - 1) // 2
    if mode == "all":
        return list(range(T))
    if mode == "first":
        return [0]
    if mode == "middle":
        return [mid]
    if mode == "last":
        return [T - 1]
    if mode == "first-middle-last":
        return sorted({0, mid, T - 1})
    if not 1 <= k <= T:
        raise ValueError(f"random frame subsampling asks for {k} frames of a {T}-frame video; use 1..{T}")
    return sorted(torch.randperm(T, generator=generator)[:k].tolist())


def to_unit_range(x: torch.Tensor, mode: str = "straight-through") -> torch.Tensor:
    """Decoder output -> [0, 1]. ``clamp``: plain clamp (zero gradient on saturated pixels, DRaFT's choice);
    ``straight-through``: clamped values, identity gradient everywhere."""
    if mode == "clamp":
        return x.clamp(0, 1)
    if mode == "straight-through":
        return x + (x.clamp(0, 1) - x).detach()
    raise ValueError(f"pixel_clamp {mode!r} is not one of {PIXEL_CLAMPS}")


def decode_for_reward(vae: Any, latents: torch.Tensor, checkpointing: bool = False,
                      pixel_clamp: str = "straight-through", chunk: int = 4) -> torch.Tensor:
    """``VAE.decode(z, clamp=False)`` with gradients, mapped into [0, 1].

    With ``checkpointing`` the images / frames are decoded ``chunk`` at a time, each chunk under its own
    checkpoint, so the backward pass holds one chunk's decoder activations at a time instead of all of them. A video
    VAE (causal in time: ``vae.is_video``) decodes whole clips, so its chunks are clips, one per checkpoint.
    """
    fn = lambda z: vae.decode(z, clamp=False)  # noqa: E731
    if not checkpointing:
        return to_unit_range(fn(latents), pixel_clamp)
    if getattr(vae, "is_video", False):
        parts = [checkpoint(fn, c, use_reentrant=False) for c in latents.split(1)]
        return to_unit_range(torch.cat(parts), pixel_clamp)
    video = latents.dim() == 5
    z = latents.flatten(0, 1) if video else latents  # (N, C, h, w)
    parts = [checkpoint(fn, c, use_reentrant=False) for c in z.split(max(1, int(chunk)))]
    x = torch.cat(parts)
    if video:
        x = x.unflatten(0, latents.shape[:2])
    return to_unit_range(x, pixel_clamp)


def direct_reward_loss(x0: torch.Tensor, vae: Any, reward: Callable[..., torch.Tensor], prompts: Sequence[str] | None,
                       frames: str = "all", num_frames: int = 1, checkpointing: bool = False,
                       pixel_clamp: str = "straight-through", generator: torch.Generator | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 2-3: ``(-mean R(Dec(x0), c), rewards (B,) detached)``; the gradient reaches ``x0`` through the decoder.

    Videos: ``frames`` picks the scored frames. An image VAE decodes frame by frame, so only the picked latent
    frames are decoded; a video VAE (temporally compressed, causal) decodes the whole clip, then the picked frames
    of the decoded video are scored."""
    if not getattr(reward, "differentiable", True):
        raise ValueError(f"reward {getattr(reward, 'name', reward)!r} is not differentiable; the direct method needs "
                         "one (e.g. colorfulness, sharpness, brightness, hpsv2); use method=ddpo for black-box rewards")
    z = x0
    video_vae = getattr(vae, "is_video", False)
    if x0.dim() == 5 and not video_vae:  # (B, T, C, h, w), one latent per frame
        z = x0[:, subsample_frames(x0.shape[1], frames, num_frames, generator)]
    pixels = decode_for_reward(vae, z, checkpointing, pixel_clamp)  # (B, 3, H, W) or (B, T', 3, H, W)
    if x0.dim() == 5 and video_vae:
        pixels = pixels[:, subsample_frames(pixels.shape[1], frames, num_frames, generator)]
    r = reward(pixels, None if prompts is None else list(prompts))
    if r.dim() != 1 or r.shape[0] != x0.shape[0]:
        raise ValueError(f"the reward must return shape ({x0.shape[0]},), got {tuple(r.shape)}")
    if not r.requires_grad and torch.is_grad_enabled() and x0.requires_grad:
        raise RuntimeError(f"reward {getattr(reward, 'name', reward)!r} returned no gradient; it must be "
                           "differentiable in the pixels")
    return -r.float().mean(), r.detach().float()


def sample_with_grad(student_x0: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
                     timesteps: Sequence[int], schedule: Any, grad_steps: int = 1, checkpointing: bool = False,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Step 1: ``distill.samplers.k_step_sample`` with autograd on the last ``grad_steps`` steps only.

    ``student_x0(x_t, t (B,))`` is the student's x0 map; ``timesteps`` descending (e.g. [999, 749, 499, 249]).
    Returns the final x0 prediction (with a graph through the last ``grad_steps`` student calls).
    """
    K = len(timesteps)
    if not 1 <= grad_steps <= K:
        raise ValueError(f"grad_steps must be in [1, {K}] for a {K}-step student, got {grad_steps}")
    return k_step_sample(student_x0, noise, timesteps, schedule, grad_steps=grad_steps, checkpointing=checkpointing,
                         generator=generator).x0


class DirectRewardTerm(ObjectiveTerm):
    """Steps 1-3 as a term: its own k-step sample (fresh noise, graph on the last ``grad_steps`` steps), L = -R(Dec(x0),
    c); the KL term measures this sample's last step (``ctx.kl_point``)."""

    name, single_process = "direct", True

    def __init__(self, reward: Callable[..., torch.Tensor], grad_steps: int = 1, frames: str = "first-middle-last",
                 num_random_frames: int = 2, pixel_clamp: str = "straight-through", checkpointing: bool = False,
                 weight: float = 1.0):
        super().__init__(weight)
        if not getattr(reward, "differentiable", False):
            from lrm.config import ConfigError

            raise ConfigError(f"method=direct needs a differentiable gold reward; {getattr(reward, 'name', '?')!r} "
                              "is not (try colorfulness, sharpness or brightness, or use method=ddpo)")
        self.reward, self.grad_steps, self.frames = reward, int(grad_steps), frames
        self.num_random_frames, self.pixel_clamp = int(num_random_frames), pixel_clamp
        self.checkpointing = checkpointing

    def generator_loss(self, ctx: StepContext) -> tuple[torch.Tensor, dict[str, Any]]:
        tr, tok, mask, pooled = ctx.trainer, ctx.tok, ctx.mask, ctx.batch.text_pooled
        state = k_step_sample(lambda x, t: tr.student_x0(x, t, tok, mask, **pooled_kw(pooled)), tr.noise(tok.shape[0]),
                              tr.timesteps,
                              tr.schedule, self.grad_steps, self.checkpointing)
        loss, r = direct_reward_loss(state.x0, tr.vae, self.reward, ctx.batch.prompts, self.frames,
                                     self.num_random_frames, self.checkpointing, self.pixel_clamp)
        ctx.kl_point = (state.x_t.detach(), state.t, state.x0)  # the final step's input and output
        return loss, {"loss_direct": float(loss.detach()), "gold_reward": float(r.mean())}


__all__ = ["DirectRewardTerm", "FRAME_SUBSAMPLING", "PIXEL_CLAMPS", "subsample_frames", "to_unit_range",
           "decode_for_reward", "direct_reward_loss", "sample_with_grad"]
