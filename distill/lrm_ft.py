"""Latent reward fine-tuning (DOLLAR Eq. 10-11, Alg. 1 lines 15-18).

L_FT(theta) = -mean R^l(x_hat_theta, c), with x_hat_theta the student's one-step x0 prediction: no decoder and
no pixel reward in the graph. The LRM is either frozen (a pretrained ``latent_rewards.LatentReward`` or any
callable ``lrm(latents, text_tokens, text_mask) -> (B,)``) or trained concurrently (``ConcurrentLRM``) on the
union of data latents and generated latents, regressing the pixel reward of their decodings (Eq. 10) on
standardised targets (running mean / std of every target seen, as ``latent_rewards.fit`` standardises), and
answering in the pixel reward's units.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from distill.objective import ObjectiveTerm, StepContext

LatentRewardFn = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor]


def takes_text(lrm: Any) -> bool:
    """Whether ``lrm`` is text-conditioned: its ``needs_text`` (``LatentReward``, LRM heads) if it has one, else
    True (plain callables ``lrm(latents, text_tokens, text_mask)`` and ``ConcurrentLRM``, which routes itself)."""
    return bool(getattr(lrm, "needs_text", True))


def call_lrm(lrm: LatentRewardFn, latents: torch.Tensor, text_tokens: torch.Tensor | None,
             text_mask: torch.Tensor | None) -> torch.Tensor:
    """``lrm(latents, text_tokens, text_mask)``, or ``lrm(latents)`` when the LRM takes no text (image-/video-only
    heads such as ``image-cnn`` / ``video-3d-cnn`` refuse text tokens)."""
    if takes_text(lrm):
        return lrm(latents, text_tokens, text_mask)
    return lrm(latents)


def lrm_ft_loss(lrm: LatentRewardFn, x_hat: torch.Tensor, text_tokens: torch.Tensor | None,
                text_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 11: ``(-mean R^l(x_hat, c), rewards (B,) detached)``; the gradient flows through the LRM into x_hat.

    Text is passed only to text-conditioned LRMs (``call_lrm``)."""
    r = call_lrm(lrm, x_hat, text_tokens, text_mask)
    if r.dim() != 1 or r.shape[0] != x_hat.shape[0]:
        raise ValueError(f"the latent reward must return shape (B,) = ({x_hat.shape[0]},), got {tuple(r.shape)}")
    r = r.float()
    return -r.mean(), r.detach()


class TargetStats(nn.Module):
    """Running count, sum and sum of squares (float64 buffers, so they are saved with a training checkpoint) of
    the concurrent LRM's targets; under ``torch.distributed`` every rank adds the targets of all ranks."""

    def __init__(self):
        super().__init__()
        for name in ("count", "total", "total_sq"):
            self.register_buffer(name, torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def update(self, targets: torch.Tensor) -> None:
        t = targets.detach().to(self.count.device, torch.float64).reshape(-1)
        sums = torch.stack([t.new_tensor(float(t.numel())), t.sum(), (t * t).sum()])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
        self.count += sums[0]
        self.total += sums[1]
        self.total_sq += sums[2]

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)`` of the targets so far as float64 0-d tensors on the buffers' device (no host sync: this
        runs on every reward call; 0-d tensors leave a float32 output float32); ``(0, 1)`` (no standardisation)
        before two targets are seen, and a constant target keeps std 1."""
        n = self.count.clamp_min(1)
        mean = self.total / n
        var = (self.total_sq / n - mean * mean).clamp_min(0)
        seen = self.count >= 2
        mean = torch.where(seen, mean, torch.zeros_like(mean))
        std = torch.where(seen & (var > 1e-12), var.sqrt(), torch.ones_like(var))
        return mean, std


class ConcurrentLRM:
    """An LRM head trained alongside the student (Alg. 1 lines 15-17).

    The head regresses standardised targets ``(R - mean) / std`` (running statistics of every target it was
    trained on, ``stats``); calling the LRM returns ``head(x) * std + mean``, i.e. rewards in the pixel reward's
    units, so ``beta_ft`` keeps its meaning (1 / reward units) whatever the reward's scale.

    Args:
        head: ``nn.Module`` called as ``head(latents, text_emb, text_mask)`` (text heads) or ``head(latents)``
            (``text_conditioned=False``), returning ``(B,)`` (e.g. ``latent_rewards.create_lrm(...)``).
        optimizer: optimizer over ``head``'s parameters.
        pixel_reward: ``reward(pixels, prompts) -> (B,)``, pixels in [0, 1] (a ``reward_adapters`` reward).
        vae: ``lrm.latent_space.VAE`` (``.decode(latents) -> pixels``) for the pixel reward targets.
        text_conditioned: pass text to the head; default: ``head.needs_text`` if present, else True.
        standardize: regress standardised targets (default); ``False`` regresses raw rewards.
    """

    def __init__(self, head: nn.Module, optimizer: torch.optim.Optimizer, pixel_reward: Callable[..., torch.Tensor],
                 vae: Any, text_conditioned: bool | None = None, max_grad_norm: float | None = 1.0,
                 standardize: bool = True):
        self.head = head
        self.optimizer = optimizer
        self.pixel_reward = pixel_reward
        self.vae = vae
        self.text_conditioned = bool(getattr(head, "needs_text", True)) if text_conditioned is None \
            else text_conditioned
        self.max_grad_norm = max_grad_norm
        self.standardize = standardize
        self.stats = TargetStats()

    def _forward(self, head: nn.Module, latents: torch.Tensor, text_tokens: torch.Tensor | None,
                 text_mask: torch.Tensor | None) -> torch.Tensor:
        if self.text_conditioned:
            return head(latents, text_tokens, text_mask)
        return head(latents)

    def _scaled(self, out: torch.Tensor) -> torch.Tensor:
        """Head output -> reward units."""
        if not self.standardize:
            return out
        mean, std = self.stats.mean_std()
        return out * std.to(out.device) + mean.to(out.device)

    def __call__(self, latents: torch.Tensor, text_tokens: torch.Tensor | None = None,
                 text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """R^l(latents, c) in reward units, differentiable in the latents. Under DDP (``head`` wrapped by the
        trainer) this calls the wrapped module directly: reward calls (L_FT) need no gradient all-reduce."""
        head = self.head.module if isinstance(self.head, DistributedDataParallel) else self.head
        return self._scaled(self._forward(head, latents, text_tokens, text_mask))

    @torch.no_grad()
    def pixel_targets(self, latents: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """R(Dec(x), c) for latents ``(B, ...)``: float32 ``(B,)`` on the latents' device."""
        pixels = self.vae.decode(latents.float(), clamp=True)
        r = self.pixel_reward(pixels, prompts)
        return torch.as_tensor(r, dtype=torch.float32).to(latents.device).reshape(-1)

    def loss(self, latents: torch.Tensor, text_tokens: torch.Tensor | None, text_mask: torch.Tensor | None,
             prompts: list[str], targets: torch.Tensor | None = None) -> torch.Tensor:
        """Eq. 10 on detached latents: ``mean (head(x) - (R(Dec(x), c) - mean) / std)^2`` with the current
        statistics (``step`` adds the batch's targets to them first)."""
        x = latents.detach().float()
        if targets is None:
            targets = self.pixel_targets(x, prompts)
        pred = self._forward(self.head, x, text_tokens, text_mask).float()  # DDP-wrapped: gradients all-reduced
        if self.standardize:
            mean, std = self.stats.mean_std()
            targets = (targets - mean.to(targets.device)) / std.to(targets.device)
        return F.mse_loss(pred, targets)

    def step(self, latents: torch.Tensor, text_tokens: torch.Tensor | None, text_mask: torch.Tensor | None,
             prompts: list[str]) -> float:
        """One optimizer step on Eq. 10; clears gradients the FT loss may have left on the head first."""
        self.head.train()
        self.optimizer.zero_grad(set_to_none=True)
        targets = self.pixel_targets(latents.detach(), prompts)
        self.stats.update(targets)
        loss = self.loss(latents, text_tokens, text_mask, prompts, targets=targets)
        loss.backward()
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.head.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


class LRMTerm(ObjectiveTerm):
    """L_FT = -R^l(x_hat, c) on the backward-simulated x_hat (logged ``proxy_reward``), with a frozen LRM or a
    ``ConcurrentLRM``, whose own update is Eq. 10 on data latents | the generator step's samples (Alg. 1 l. 15-16)."""

    name, needs_x_hat = "ft", True

    def __init__(self, lrm: Any, weight: float = 1.0):
        super().__init__(weight)
        self.lrm = lrm
        self.concurrent = isinstance(lrm, ConcurrentLRM)

    def setup(self, trainer: Any) -> None:
        if self.concurrent:
            self.lrm.head.to(trainer.device)
            self.lrm.stats.to(trainer.device)
        elif isinstance(self.lrm, nn.Module):
            self.lrm.to(trainer.device).eval().requires_grad_(False)
        if hasattr(self.lrm, "check_finite"):  # NaN latents: the guard skips the step (no host sync per call)
            self.lrm.check_finite = False

    def setup_optimizers(self, trainer: Any) -> None:
        if trainer.accelerator.num_processes > 1 and self.concurrent:  # else each rank fits only its own samples
            if trainer.fsdp:  # a small head: replicated (torch DDP, whatever accelerate's plugin would do)
                ids = [trainer.device.index] if trainer.device.type == "cuda" else None
                self.lrm.head = DistributedDataParallel(self.lrm.head, device_ids=ids)
            else:
                self.lrm.head = trainer.accelerator.prepare_model(self.lrm.head)
                self.lrm.optimizer = trainer.accelerator.prepare_optimizer(self.lrm.optimizer)

    def generator_loss(self, ctx: StepContext) -> tuple[torch.Tensor, dict[str, Any]]:
        loss, r = lrm_ft_loss(self.lrm, ctx.x_hat, ctx.tok, ctx.mask)
        return loss, {"loss_ft": float(loss.detach()), "proxy_reward": float(r.mean())}

    def update(self, trainer: Any) -> dict[str, Any]:
        if not self.concurrent:
            return {}
        last = [c for c in trainer.last if c.x_hat is not None and c.batch.latents is not None]
        if not last:
            b = trainer.sample_batch()
            last = [StepContext(trainer, b)]
            last[0].x_hat = trainer.generate(b)
        lat = torch.cat([torch.cat([c.batch.latents, c.x_hat]) for c in last])
        tok = torch.cat([torch.cat([c.tok, c.tok]) for c in last])
        mask = torch.cat([torch.cat([c.mask, c.mask]) for c in last])
        prompts = [p for c in last for p in (c.batch.prompts + c.batch.prompts)]
        return {"loss_lrm": self.lrm.step(lat, tok, mask, prompts)}

    def modules(self) -> dict[str, Any]:
        return {"lrm_head": self.lrm.head, "lrm_target_stats": self.lrm.stats} if self.concurrent else {}

    def optimizers(self) -> dict[str, Any]:
        return {"lrm": self.lrm.optimizer} if self.concurrent else {}

    def fingerprint(self) -> str | None:
        if self.concurrent or not isinstance(self.lrm, nn.Module):
            return None
        from lrm.run import fingerprint

        return fingerprint(self.lrm.state_dict().items())
