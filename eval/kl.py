"""Distance of a fine-tuned generator from its reference: KL and d = sqrt(KL) (Gao et al. 2022).

Two estimators:

1. Stochastic samplers (DDPM/DDIM-eta posterior chains, DDPO's sampler): both chains are Gaussian with the
   same per-step std sigma_t, so along a trajectory x_T, ..., x_0 drawn from the fine-tuned chain
       KL(pi_theta || pi_ref) = E sum_t ||mu_theta(x_t, t) - mu_ref(x_t, t)||^2 / (2 sigma_t^2)
   (chain rule of KL; both means evaluated at the fine-tuned chain's states). ``gaussian_chain_kl``.

2. Deterministic few-step samplers (1-4 step students): the output is a deterministic function G(eps) of
   the noise, so the KL between the output distributions is undefined/infinite in general. We smooth
   both outputs with N(0, sigma^2 I) and use shared noise:
       KL_sigma = E_eps ||G_theta(eps) - G_ref(eps)||^2 / (2 sigma^2)
   By joint convexity of KL this is an UPPER BOUND on KL(p_theta * N(0, sigma^2) || p_ref * N(0, sigma^2)),
   and it equals the chain formula above for a one-step chain whose final step has std sigma.
   ``smoothed_output_kl`` / ``paired_output_kl``. The default sigma = 1 is one unit of the scaled latent
   space (the data has about unit variance there); report sigma together with d, and compare d values
   only at the same sigma.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch


def _stack(x: torch.Tensor | Sequence[torch.Tensor], name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if len(x) == 0:
        raise ValueError(f"{name} is empty: pass one tensor per sampling step")
    return torch.stack(list(x))


def gaussian_chain_kl(mu_theta: torch.Tensor | Sequence[torch.Tensor], mu_ref: torch.Tensor | Sequence[torch.Tensor],
                      sigma: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Per-sample KL between two Gaussian chains with shared per-step std.

    Args:
        mu_theta: ``(S, B, ...)`` (or a list of S ``(B, ...)`` tensors): the fine-tuned chain's step means.
        mu_ref: same shape: the reference model's step means at the SAME states x_t.
        sigma: ``(S,)`` per-step std sigma_t (or ``(S, B)`` per sample). Every sigma_t must be > 0:
            leave a deterministic last step out of the sum (or use ``smoothed_output_kl`` for it).

    Returns:
        ``(B,)`` float64: sum_t ||mu_theta - mu_ref||^2 / (2 sigma_t^2).
    """
    mt = _stack(mu_theta, "mu_theta").to(torch.float64)  # (S, B, ...)
    mr = _stack(mu_ref, "mu_ref").to(torch.float64)
    if mt.shape != mr.shape:
        raise ValueError(f"mu_theta {tuple(mt.shape)} and mu_ref {tuple(mr.shape)} must have the same shape")
    if mt.dim() < 2:
        raise ValueError(f"means must be (S, B, ...) with a step and a batch axis, got shape {tuple(mt.shape)}")
    S, B = mt.shape[:2]
    s = torch.as_tensor(sigma, dtype=torch.float64, device=mt.device)
    if s.dim() == 1:
        s = s[:, None].expand(S, B) if s.shape[0] == S else s
    if s.shape != (S, B):
        raise ValueError(f"sigma must have shape ({S},) or ({S}, {B}), got {tuple(torch.as_tensor(sigma).shape)}")
    if not (s > 0).all():
        raise ValueError(
            f"every sigma_t must be > 0, got min {float(s.min()):.3g}: a deterministic step has infinite KL unless "
            "the means agree; drop it from the chain or use smoothed_output_kl"
        )
    from distill.kl import gaussian_kl

    return gaussian_kl(mt.flatten(0, 1), mr.flatten(0, 1), s.reshape(-1), torch.float64).view(S, B).sum(0)  # (B,)


def smoothed_output_kl(x_theta: torch.Tensor, x_ref: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Per-sample ``||x_theta - x_ref||^2 / (2 sigma^2)`` for outputs generated from SHARED noise.

    Mean over samples = upper bound on the KL between the sigma-smoothed output distributions (see module doc).
    """
    if x_theta.shape != x_ref.shape:
        raise ValueError(f"x_theta {tuple(x_theta.shape)} and x_ref {tuple(x_ref.shape)} must have the same shape")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    from distill.kl import gaussian_kl

    return gaussian_kl(x_theta, x_ref, sigma, torch.float64)  # (B,)


def paired_output_kl(generator: Callable, reference: Callable, noise: torch.Tensor, text_tokens=None, text_mask=None,
                     sigma: float = 1.0) -> torch.Tensor:
    """Run ``generator`` and ``reference`` (``fn(noise, text_tokens, text_mask) -> latents``) on the same noise
    and return the per-sample smoothed-output KL ``(B,)``."""
    from eval.evaluate import call_generator

    with torch.no_grad():
        a = call_generator(generator, noise, text_tokens, text_mask)["latents"]
        b = call_generator(reference, noise, text_tokens, text_mask)["latents"]
    return smoothed_output_kl(a, b, sigma)


def kl_to_distance(kl: torch.Tensor | Sequence[float] | float) -> float:
    """d = sqrt(KL) with KL the mean over samples of the per-sample KL (Gao et al. 2022)."""
    k = torch.as_tensor(kl, dtype=torch.float64)
    m = float(k.mean()) if k.numel() else float("nan")
    if m < 0:
        raise ValueError(f"KL must be >= 0, got mean {m}")
    return math.sqrt(m)
