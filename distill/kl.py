"""KL / reference penalty toward the frozen initial student pi_ref (a term; the training-time forms of the estimators
``eval.kl`` reports: float32, differentiable in the student's side only).

- one-step output (``x0_kl``): ||x_hat_theta - x_hat_ref||^2 / 2 summed over elements, with x_hat_ref the initial
  student's x0 at the SAME state (x_t, t): ``eval.kl.smoothed_output_kl`` at sigma = 1 (one scaled-latent unit). An
  upper bound on the smoothed KL of the one-step outputs, not the KL of the deployed k-step sampler. The state is the
  backward-simulated one of x_hat, or the last step of the direct term's sample (``StepContext.kl_point``).
- Gaussian chain (``chain_step_kl``, DDPO): KL_t = ||mu_theta(x_t, t) - mu_ref(x_t, t)||^2 / (2 sigma_t^2) at the
  sampled states, both transitions with the same std (``eval.kl.gaussian_chain_kl``'s summands); the DDPO term adds
  it on its trained transitions (the pathwise part of the chain-rule KL, as DPOK's regulariser; Fan et al. 2023).
"""

from __future__ import annotations

from typing import Any

import torch

from distill.cd import consistency_output
from distill.objective import ObjectiveTerm, StepContext
from distill.samplers import pooled_kw


def gaussian_kl(mu: torch.Tensor, mu_ref: torch.Tensor, sigma: float | torch.Tensor = 1.0,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-sample ``KL(N(mu, sigma^2 I) || N(mu_ref, sigma^2 I)) = ||mu - mu_ref||^2 / (2 sigma^2)`` (summed over
    elements) in ``dtype``, ``(B,)``; differentiable in ``mu`` only. ``sigma``: a float or ``(B,)``. The one formula
    behind the training penalties here and the reported KLs of ``eval.kl``."""
    sq = (mu.to(dtype) - mu_ref.detach().to(dtype)).pow(2).flatten(1).sum(1)
    return sq / (2 * torch.as_tensor(sigma, dtype=dtype, device=sq.device) ** 2)


def x0_kl(x_hat: torch.Tensor, x_ref: torch.Tensor) -> torch.Tensor:
    """Per-sample ``||x_hat - x_ref||^2 / 2``: ``gaussian_kl`` at sigma = 1 (one scaled-latent unit)."""
    return gaussian_kl(x_hat, x_ref)


def chain_step_kl(mu: torch.Tensor, mu_ref: torch.Tensor, sigma: float) -> torch.Tensor:
    """Per-sample KL of one Gaussian transition with std ``sigma``: ``gaussian_kl``."""
    return gaussian_kl(mu, mu_ref, sigma)


class KLTerm(ObjectiveTerm):
    """``weight * mean x0_kl`` at the step's KL point (logged ``kl``); with a driver term (DDPO) the penalty is the
    driver's (``chain_step_kl``) and this term only holds pi_ref."""

    name = "kl"

    def __init__(self, weight: float):
        super().__init__(weight)
        self.ref = None

    def setup(self, trainer: Any) -> None:
        self.ref = trainer.frozen_init()
        # the point: the direct term's last step if there is one, else the backward-simulated x_hat
        self.needs_x_hat = trainer.driver is None and trainer.term("direct") is None

    @torch.no_grad()
    def ref_x0(self, trainer: Any, x_t: torch.Tensor, t: torch.Tensor, tok: torch.Tensor,
               mask: torch.Tensor | None, pooled: torch.Tensor | None = None) -> torch.Tensor:
        """pi_ref's x0 map at ``(x_t, t)`` (the same consistency function as ``trainer.student_x0``); ``pooled``: the
        captions' pooled text (FLUX / SD3 / HunyuanVideo)."""
        with trainer.autocast():
            x0 = self.ref.x0(x_t, t, tok, mask, **pooled_kw(pooled))
        return consistency_output(x_t, x0.float(), t, trainer.config.sigma_data, trainer.config.timestep_scaling)

    def generator_loss(self, ctx: StepContext) -> tuple[torch.Tensor | None, dict[str, Any]]:
        point = ctx.kl_point or (None if ctx.x_hat is None else (ctx.x_k, ctx.t_k, ctx.x_hat))
        if point is None:
            return None, {}
        x_t, t, x0 = point
        kl = x0_kl(x0, self.ref_x0(ctx.trainer, x_t.detach(), t, ctx.tok, ctx.mask, ctx.batch.text_pooled)).mean()
        return kl, {"kl": float(kl.detach())}


__all__ = ["KLTerm", "gaussian_kl", "x0_kl", "chain_step_kl"]
