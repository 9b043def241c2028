"""Samplers: DDIM (teacher), the k-step student sampler, and the stochastic posterior sampler with
per-step log-probabilities for DDPO.

Timestep spacing: the teacher's 50-step DDIM uses DOLLAR's ``t_n in [19, 39, ..., 999]``, i.e. diffusers'
``timestep_spacing="trailing"`` (``round(arange(T, 0, -T/N)) - 1``). Each step goes to the next timestep
of the list; the last one goes to ``t = -1`` (clean: ``abar = 1``, diffusers' ``set_alpha_to_one=True``),
so the final output is the last x0 prediction. Steps are written for a generic ``x_t = a_t x0 + b_t eps``
schedule (DDPM or flow):

    sigma^2 = eta^2 * (b_s^2 / b_t^2) * (b_t^2 - (a_t / a_s)^2 b_s^2)        (s = previous timestep)
    x_s     = a_s x0 + sqrt(b_s^2 - sigma^2) eps + sigma z                     (DDIM, DOLLAR Eq. 14 / 25)

For DDPM this is DDIM's sigma with ``sigma^2 = eta^2 (1 - abar_s)/(1 - abar_t) (1 - abar_t/abar_s)``; at
``eta = 1`` it is the DDPM posterior variance ``(1 - alpha_t)(1 - abar_{t-1})/(1 - abar_t)`` (Eq. 26's sigma).

Transition log-probs (DDPO) are the MEAN of the per-element Gaussian log-density by default, as in ddpo-pytorch and
TRL (``reduction="sum"`` gives the exact density); see ``gaussian_log_prob``.

On a flow schedule (``x_t = (1 - s) x0 + s eps``, a = 1 - s, b = s) the same formulas are exactly DDIM(eta) of the
variance-preserving process ``x_t / sqrt(a_t^2 + b_t^2)`` with ``abar_t = a_t^2 / (a_t^2 + b_t^2)``
(``FlowSchedule.alphas_cumprod``), mapped back to the flow scale: the x0 / eps predictions come from the flow (velocity)
output, the transition std is the DDPM-posterior std at eta = 1. This is what DDPO on a flow model samples and scores;
it is not Flow-GRPO's SDE (``x + [v + sigma_t^2 / (2t) (x + (1 - t) v)] dt + sigma_t sqrt(dt) z``, Liu et al. 2025),
which has another noise level per step. A flow chain cannot end at t = 0 (s = 0: b = 0, a zero-variance last step):
``default_final_timestep`` is 1 there (0 on DDPM schedules).

Every sampler takes ``pooled=``: the captions' pooled text vector for families whose network takes one (FLUX, SD3,
HunyuanVideo), passed to each Denoiser call (the CFG branch uses the Denoiser's null pooled vector).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

STUDENT_TIMESTEPS = {1: [999], 2: [499, 999], 4: [249, 499, 749, 999]}


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """Trailing spacing, descending: 50 steps on T = 1000 -> [999, 979, ..., 19] (diffusers "trailing")."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    ts = [int(round(v)) - 1 for v in _arange_desc(num_train_timesteps, num_steps)]
    return ts


def _arange_desc(T: int, n: int) -> list[float]:
    import numpy as np

    return list(np.round(np.arange(T, 0, -T / n)))[:n]


def _descending(timesteps, num_train_timesteps: int) -> list[int]:
    ts = [int(t) for t in timesteps]
    if not ts:
        raise ValueError("timesteps must not be empty")
    if len(set(ts)) != len(ts):
        raise ValueError(f"timesteps must be distinct, got {ts}")
    if min(ts) < 0 or max(ts) >= num_train_timesteps:
        raise ValueError(f"timesteps must lie in [0, {num_train_timesteps - 1}], got {ts}")
    return sorted(ts, reverse=True)


def step_sigma(schedule, t: int, t_prev: int, eta: float) -> float:
    """Std of the DDIM(eta) transition ``t -> t_prev`` (``t_prev = -1`` is clean)."""
    a_t, b_t = float(schedule.a(t)), float(schedule.b(t))
    a_s, b_s = float(schedule.a(t_prev)), float(schedule.b(t_prev))
    if b_t <= 0:
        return 0.0
    var = (b_s ** 2 / b_t ** 2) * max(b_t ** 2 - (a_t / a_s) ** 2 * b_s ** 2, 0.0)
    return eta * math.sqrt(var)


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)


def pooled_kw(pooled: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """``{"pooled": pooled}``, or ``{}`` when None (a Denoiser-like without pooled text keeps its plain call)."""
    return {} if pooled is None else {"pooled": pooled}


def default_final_timestep(schedule: Any) -> int:
    """Where a stochastic chain ends by default: 0 on a DDPM schedule (``abar_0`` just below 1), 1 on a flow
    schedule (t = 0 is s = 0, no noise: the last transition would have zero variance)."""
    return 1 if getattr(schedule, "kind", None) == "flow" else 0


def step_mean(denoiser, x_t: torch.Tensor, t: int, t_prev: int, text_tokens, text_mask, eta: float = 0.0,
              guidance_scale: float | None = None, pooled: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, float, torch.Tensor]:
    """Mean ``mu`` (Eq. 25) and std of ``p(x_{t_prev} | x_t)``, and the x0 prediction."""
    schedule = denoiser.schedule
    x0, eps = denoiser.x0_eps(x_t, t, text_tokens, text_mask, guidance_scale, **pooled_kw(pooled))
    sigma = step_sigma(schedule, t, t_prev, eta)
    a_s, b_s = float(schedule.a(t_prev)), float(schedule.b(t_prev))
    mu = a_s * x0 + math.sqrt(max(b_s ** 2 - sigma ** 2, 0.0)) * eps
    return mu, sigma, x0


def ddim_step(denoiser, x_t: torch.Tensor, t: int, t_prev: int, text_tokens, text_mask=None, eta: float = 0.0,
              guidance_scale: float | None = None, generator: torch.Generator | None = None,
              noise: torch.Tensor | None = None, pooled: torch.Tensor | None = None) -> torch.Tensor:
    """One DDIM(eta) step ``x_t -> x_{t_prev}`` (``t_prev = -1``: return the x0 prediction)."""
    mu, sigma, _ = step_mean(denoiser, x_t, t, t_prev, text_tokens, text_mask, eta, guidance_scale, pooled)
    if sigma > 0:
        mu = mu + sigma * (noise if noise is not None else _randn_like(mu, generator))
    return mu


def ddim_sample(denoiser, noise: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor | None = None,
                num_steps: int = 50, eta: float = 0.0, guidance_scale: float | None = None,
                generator: torch.Generator | None = None, timesteps=None, progress: bool = False,
                enable_grad: bool = False, pooled: torch.Tensor | None = None) -> torch.Tensor:
    """DDIM from pure noise ``x_T = noise`` to x0 latents. ``timesteps`` (any order, descending used)
    overrides ``num_steps``'s trailing spacing. Runs without autograd unless ``enable_grad``."""
    T = denoiser.schedule.num_train_timesteps
    ts = _descending(timesteps, T) if timesteps is not None else ddim_timesteps(num_steps, T)
    prevs = ts[1:] + [-1]
    x = noise
    ctx = contextlib.nullcontext() if enable_grad else torch.no_grad()
    with ctx:
        for t, s in tqdm(list(zip(ts, prevs)), desc="ddim", disable=not progress, leave=False):
            x = ddim_step(denoiser, x, t, s, text_tokens, text_mask, eta, guidance_scale, generator, pooled=pooled)
    return x


class KStepState(NamedTuple):
    """What ``k_step_sample`` returns."""

    x0: torch.Tensor  # the last x0 prediction made (``noise`` itself when none was made: ``stop_at=0``)
    x_t: torch.Tensor  # the state of the last step: the final prediction's input, or with ``stop_at`` the state there
    t: torch.Tensor  # (B,) long, the timestep of ``x_t``


def k_step_sample(student_x0: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
                  timesteps: Sequence[int], schedule: Any, grad_steps: int | None = None, checkpointing: bool = False,
                  stop_at: int | None = None, generator: torch.Generator | None = None) -> KStepState:
    """The k-step (consistency-style) student sampler, the one loop every trainer, term and generator runs.

    1. ``x_{t_0} = noise``; for step ``i``: ``x0_i = student_x0(x_{t_i}, t_i)`` with ``t_i`` a ``(B,)`` long tensor;
    2. re-noise with fresh noise to the next timestep: ``x_{t_{i+1}} = a x0_i + b eps`` (``schedule.add_noise``;
       eps from ``generator`` when given, else the global RNG; the state keeps ``noise``'s dtype);
    3. the last step's ``x0`` is the sample.

    ``timesteps``: sampling order (descending, e.g. [999, 749, 499, 249]), run as given.
    ``grad_steps``: only the last ``grad_steps`` predictions (and their re-noising) run in the caller's grad mode,
    the earlier ones under ``torch.no_grad()`` (DRaFT-K); ``None``: every step in the caller's mode; ``0``: none.
    ``checkpointing``: graded student calls under activation checkpointing (recomputed in the backward pass).
    ``stop_at=k``: run the first ``k`` steps only and return the state ``(x_{t_k}, t_k)``, the input of step ``k``
    (DMD2's backward simulation; TDM's stage start), without calling the student there.
    """
    ts = [int(t) for t in timesteps]
    K = len(ts)
    if K == 0:
        raise ValueError("timesteps must not be empty")
    if stop_at is not None and not 0 <= stop_at < K:
        raise ValueError(f"stop_at must be in [0, {K}) for a {K}-step sampler (the step whose input state to "
                         f"return), got {stop_at}")
    n = K if stop_at is None else int(stop_at)  # predictions made
    g = n if grad_steps is None else int(grad_steps)
    if not 0 <= g <= n:
        raise ValueError(f"grad_steps must be in [0, {n}] (steps run), got {grad_steps}")
    B = noise.shape[0]
    x, x0 = noise, noise
    for i in range(n):
        tt = torch.full((B,), ts[i], device=noise.device, dtype=torch.long)
        graded = i >= n - g
        with (contextlib.nullcontext() if graded else torch.no_grad()):
            x0 = checkpoint(student_x0, x, tt, use_reentrant=False) if graded and checkpointing else student_x0(x, tt)
            if i + 1 < K:  # the last step of a full run keeps its input as the state
                x = schedule.add_noise(x0.to(noise.dtype), _randn_like(noise, generator), ts[i + 1])
    return KStepState(x0, x, torch.full((B,), ts[min(n, K - 1)], device=noise.device, dtype=torch.long))


def student_sample(denoiser, noise: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor | None = None,
                   timesteps=(999, 749, 499, 249), generator: torch.Generator | None = None,
                   guidance_scale: float | None = None, pooled: torch.Tensor | None = None) -> torch.Tensor:
    """``k_step_sample`` of a ``Denoiser``'s x0 prediction (timesteps sorted descending); returns the last x0
    prediction. Keeps autograd (wrap in ``torch.no_grad()`` to sample)."""
    ts = _descending(timesteps, denoiser.schedule.num_train_timesteps)
    return k_step_sample(lambda x, t: denoiser.x0(x, t, text_tokens, text_mask, guidance_scale, **pooled_kw(pooled)),
                         noise,
                         ts,
                         denoiser.schedule, generator=generator).x0


# ---- stochastic posterior sampler with log-probs (DDPO) ---------------------------------------------------
LOG_PROB_REDUCTIONS = ("mean", "sum")


def _check_reduction(reduction: str) -> str:
    if reduction not in LOG_PROB_REDUCTIONS:
        raise ValueError(f"reduction must be one of {LOG_PROB_REDUCTIONS} ('mean': ddpo-pytorch / TRL, what DDPO's "
                         f"clip range is tuned for; 'sum': the exact log-density), got {reduction!r}")
    return reduction


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: float, reduction: str = "mean") -> torch.Tensor:
    """Per-sample log-density of one Gaussian transition ``N(x; mean, std^2 I)`` (Eq. 26), ``(B,)`` float32.

    Each element contributes ``-(x - mu)^2 / (2 sigma^2) - log sigma - log sqrt(2 pi)``; ``reduction`` says how the
    elements (all but the batch dimension: C*H*W, or T*C*H*W for video) are combined:

    - ``"mean"`` (default, DDPO's convention): their average. The DDPO policy ratio ``exp(logp - logp_old)`` is then
      the geometric mean of the per-element density ratios, and PPO's clip range 1e-4 / the learning rates of
      ddpo-pytorch and TRL are tuned for it.
    - ``"sum"``: their sum, the exact log-density (likelihoods, KL estimates). Log-ratios are ``C*H*W`` times the
      mean's (16384 on SD latents), so a ratio clipped at 1 +- 1e-4 is clipped almost always.
    """
    # reduction "mean" as ddpo-pytorch ddim_with_logprob.py ddim_step_with_logprob / TRL 0.11 modeling_sd_base.py
    _check_reduction(reduction)
    if std <= 0:
        raise ValueError("the transition has zero variance (deterministic step); use eta > 0 and a final "
                         "timestep with noise (final_timestep >= 0 on a DDPM schedule, >= 1 on a flow schedule)")
    var = std ** 2
    d = (x.float() - mean.float()) ** 2
    lp = (-0.5 * (d / var + math.log(2 * math.pi * var))).flatten(1)  # (B, C*H*W)
    return lp.mean(1) if reduction == "mean" else lp.sum(1)


def step_log_prob(denoiser, x_t: torch.Tensor, x_prev: torch.Tensor, t: int, t_prev: int, text_tokens,
                  text_mask=None, eta: float = 1.0, guidance_scale: float | None = None,
                  reduction: str = "mean", pooled: torch.Tensor | None = None) -> torch.Tensor:
    """``log p_theta(x_prev | x_t)`` of a given transition, ``(B,)``; differentiable in the model (PPO / REINFORCE).
    ``reduction``: ``"mean"`` over the latent elements (DDPO's convention) or ``"sum"`` (exact density), see
    ``gaussian_log_prob``."""
    _check_reduction(reduction)
    mu, sigma, _ = step_mean(denoiser, x_t, t, t_prev, text_tokens, text_mask, eta, guidance_scale, pooled)
    return gaussian_log_prob(x_prev.detach(), mu, sigma, reduction)


@dataclass
class SampleTrajectory:
    x0: torch.Tensor  # final sample (the latent at ``prev_timesteps[-1]``)
    latents: list[torch.Tensor]  # K + 1 latents x_{t_0} (noise) ... x_{final}
    timesteps: torch.Tensor  # (K,) long, the timestep each transition starts from
    prev_timesteps: torch.Tensor  # (K,) long, where it ends
    log_probs: torch.Tensor  # (B, K) float32, log p(x_{k+1} | x_k), reduced over elements by ``log_prob_reduction``
    means: list[torch.Tensor] = field(default_factory=list)  # K posterior means (Eq. 25)
    stds: torch.Tensor | None = None  # (K,) float32 transition stds
    log_prob_reduction: str = "mean"  # "mean" (DDPO's convention) or "sum" (exact density), see gaussian_log_prob


def stochastic_sample(denoiser, noise: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor | None,
                      timesteps, eta: float = 1.0, guidance_scale: float | None = None,
                      generator: torch.Generator | None = None, grad_steps: int | None = None,
                      final_timestep: int | None = None, reduction: str = "mean",
                      pooled: torch.Tensor | None = None) -> SampleTrajectory:
    """Sample with the DDIM(eta) posterior along ``timesteps`` and record per-step log-probs (DOLLAR Eq. 25-26).

    The chain ends at ``final_timestep`` (None: ``default_final_timestep`` -- 0 on DDPM schedules, where ``abar_0``
    is just below 1 so the last transition has a proper Gaussian; 1 on flow schedules, whose t = 0 has no noise).
    Truncation: only the last ``grad_steps`` transitions run with autograd (``None`` = all, ``0`` = none); the
    earlier ones run under ``torch.no_grad()``. Latents are detached between steps, so gradients reach the model
    only through each step's mean (the score-function form DDPO needs).
    ``reduction`` of the recorded log-probs: ``"mean"`` over the latent elements (default, DDPO's convention) or
    ``"sum"`` (exact density); the means and stds (for exact KLs) do not depend on it.

    Against ddpo-pytorch's ``ddim_step_with_logprob`` (= TRL 0.11 ``scheduler_step``) on an SD-configured
    ``DDIMScheduler``: same mean ``sqrt(abar_s) x0 + sqrt(1 - abar_s - sigma^2) eps``, same
    ``sigma = eta sqrt((1 - abar_s)/(1 - abar_t) (1 - abar_t/abar_s))``, same log-prob with ``reduction="mean"``
    (tests/distill/test_ddpo_parity.py). Differences: (1) the reference steps to ``t - T // N`` clamped at 0 (uniform
    spacing only; its last step lands on ``abar_0``, like ``final_timestep=0``), here each step goes to the next
    listed timestep; for [999, 749, 499, 249] -> 0 the two agree. (2) x0 is never clipped here; the reference clips
    it only when the scheduler has ``clip_sample=True``, which SD's scheduler config (used by both) does not.
    (3) sigma is computed in float64 from the float32 schedule (the reference: float32), ~1e-7 relative.
    """
    _check_reduction(reduction)
    ts = _descending(timesteps, denoiser.schedule.num_train_timesteps)
    if final_timestep is None:
        final_timestep = default_final_timestep(denoiser.schedule)
    elif final_timestep == 0 and eta > 0 and getattr(denoiser.schedule, "kind", None) == "flow":
        raise ValueError("final_timestep 0 on a flow schedule is s = 0 (no noise): the last transition has zero "
                         "variance and no log-prob; use final_timestep >= 1 (None picks 1)")
    if final_timestep >= ts[-1]:
        raise ValueError(f"final_timestep {final_timestep} must be below the last timestep {ts[-1]}")
    prevs = ts[1:] + [final_timestep]
    K = len(ts)
    g = K if grad_steps is None else int(grad_steps)
    if not 0 <= g <= K:
        raise ValueError(f"grad_steps must be in [0, {K}] (number of steps), got {grad_steps}")
    x = noise
    latents, means, logps, stds = [noise], [], [], []
    for k, (t, s) in enumerate(zip(ts, prevs)):
        ctx = torch.no_grad() if k < K - g else contextlib.nullcontext()
        with ctx:
            mu, sigma, _ = step_mean(denoiser, x.detach(), t, s, text_tokens, text_mask, eta, guidance_scale, pooled)
            x_prev = (mu + sigma * _randn_like(mu, generator)).detach()
            logps.append(gaussian_log_prob(x_prev, mu, sigma, reduction))
        means.append(mu)
        stds.append(sigma)
        latents.append(x_prev)
        x = x_prev
    return SampleTrajectory(
        x0=x, latents=latents, timesteps=torch.tensor(ts), prev_timesteps=torch.tensor(prevs),
        log_probs=torch.stack(logps, 1), means=means, stds=torch.tensor(stds, dtype=torch.float32),
        log_prob_reduction=reduction)
