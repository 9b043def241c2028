"""Trajectory distribution matching (paper 004 §3.2, Eq. 2-10; TDM, Luo et al. 2025).

Symbols: a K-step student on T "total steps" (T = the schedule's 1000 by default; the public code uses 900). Stage
k = 1..K starts at tau_k = k T / K - 1 (the student's timesteps: 249/499/749/999 for K = 4) and ends at
e_k = tau_{k-1} + 1 (tau_0 = -1, so e_1 = 0). One update (public code ``train_tdm_demo.py``, main loop):

1. k ~ U{1..K} per sample; x_{tau_k} = the student's own deterministic trajectory point (DDIM eta = 0 with its own
   eps_hat over ``student_timesteps``, no grad); x0_hat = G_theta(x_{tau_k}, tau_k) (graded for the generator).
2. Re-noise (``renoise``): x_e = a_e x0_hat + b_e eps_hat (the student's eps_hat), then the forward kernel to
   tau ~ U{max(20, e_k), ..., tau_k - 11} (``torch.randint(lo, tau_k - 10)``, high exclusive):
   x_tau = (a_tau / a_e) x_e + sqrt(b_tau^2 - (a_tau b_e / a_e)^2) xi, which keeps the marginal of any
   x_t = a_t x0 + b_t eps schedule (DDPM and rectified flow).
3. Generator: y = sg(x0_hat + (x0_real - x0_fake) + (s - 1)(x0_real - x0_uncond)) = sg(x0_hat + x0_real,cfg - x0_fake),
   L = d(x0_hat - y). ``distance="paper"``: sqrt(||delta||^2 + c^2) - c per sample, c = 0.00054 sqrt(d) (Eq. 7/9);
   ``"code"``: mean of the elementwise sqrt(delta^2 + c^2) - c, c = 1e-3, over w = mean|x0_hat - x0_real,cfg|.
   In x0 space Eq. 9's sigma v_psi - sigma v_phi is exactly x0_phi - x0_psi; Eq. 7's score gap is that times
   a_tau / b_tau^2, a per-tau factor dropped here as in the code.
4. Fake score (``fake_score_loss``): omega ||mu_psi(x_tau) - x0_hat||^2 (Eq. 8) with omega = min(SNR_tau, 5) times
   the code's importance weight exp(-mean(n^2)/2) / exp(-mean(xi^2)/2), n the total noise of x_tau around x0_hat;
   ``target="native"`` regresses the fake's own parameterisation instead (flow: n - x0_hat, Eq. 10 with x0_hat in
   place of the paper's x_{t_i}). Code: AdamW betas (0, 0.95), wd 1e-2, lr_fake 2e-5, lr_gen 4e-6, 1:1 updates.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, NamedTuple, Sequence

import torch

from distill import parameterization as P
from distill.objective import StepContext
from distill.samplers import pooled_kw
from distill.vsd import VSDTerm
from lrm.config import ConfigError
from lrm.schedules import broadcast

DISTANCES = ("paper", "code")
FAKE_TARGETS = ("x0", "native")


def stage_bounds(num_stages: int, total_steps: int = 1000) -> tuple[list[int], list[int]]:
    """``(starts, ends)`` for k = 1..K: tau_k = k T // K - 1 and e_k = tau_{k-1} + 1 (e_1 = 0)."""
    K, T = int(num_stages), int(total_steps)
    if K < 1 or T < 2 * K:
        raise ValueError(f"need 1 <= num_stages <= total_steps / 2, got num_stages={K}, total_steps={T}")
    starts = [k * T // K - 1 for k in range(1, K + 1)]
    return starts, [0] + [s + 1 for s in starts[:-1]]


def student_timesteps(num_stages: int, total_steps: int = 1000) -> list[int]:
    """The student's sampling timesteps, descending (stage starts): [999, 749, 499, 249] for K = 4, T = 1000."""
    return stage_bounds(num_stages, total_steps)[0][::-1]


def sample_stage(batch: int, num_stages: int, total_steps: int = 1000, min_t: int = 20, margin: int = 10,
                 separate: bool = True, device: torch.device | str = "cpu", generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 1-2 draws, each ``(B,)`` long: ``(k, tau_k, e_k, tau)`` with tau uniform in [max(min_t, e_k), hi) and
    hi = tau_k - margin (``separate``, the code's ``--use_separate``) or T - margin (README mode 2: [e_k, T))."""
    starts, ends = stage_bounds(num_stages, total_steps)
    s, e = torch.tensor(starts), torch.tensor(ends)
    lo = e.clamp_min(min_t)
    hi = s - margin if separate else torch.full_like(s, int(total_steps) - margin)
    if (hi <= lo).any():
        bad = int((hi <= lo).nonzero()[0]) + 1
        raise ValueError(f"stage {bad} of {num_stages} on {total_steps} steps has an empty tau range "
                         f"[{int(lo[bad - 1])}, {int(hi[bad - 1])}); use fewer stages or smaller min_t / margin")
    k = torch.randint(1, len(starts) + 1, (batch,), generator=generator)
    lo_k, hi_k = lo[k - 1], hi[k - 1]
    tau = lo_k + (torch.rand(batch, generator=generator, dtype=torch.float64) * (hi_k - lo_k)).long()
    return tuple(v.to(device) for v in (k, s[k - 1], e[k - 1], tau))


def pick_stage_inputs(points: Sequence[torch.Tensor], k: torch.Tensor) -> torch.Tensor:
    """Per sample b, ``points[k_b - 1][b]``: ``points[i]`` is the trajectory at stage i + 1's start tau_{i+1}."""
    stacked = torch.stack(list(points))  # (K, B, ...)
    return stacked[k.to(stacked.device) - 1, torch.arange(stacked.shape[1], device=stacked.device)]


def transition(x_m: torch.Tensor, t_m: torch.Tensor, t: torch.Tensor, schedule: Any, noise: torch.Tensor
               ) -> torch.Tensor:
    """Forward kernel q(x_t | x_m) of ``x_t = a_t x0 + b_t eps``: (a_t / a_m) x_m + sqrt(b_t^2 - (a_t b_m / a_m)^2) xi.
    ``t`` must be at least as noisy as ``t_m`` (``t_m = -1``: clean, plain ``add_noise``)."""
    a_m, b_m = broadcast(schedule.a(t_m), x_m), broadcast(schedule.b(t_m), x_m)
    a_t, b_t = broadcast(schedule.a(t), x_m), broadcast(schedule.b(t), x_m)
    ratio = a_t / a_m
    var = b_t ** 2 - (ratio * b_m) ** 2
    if bool((var < -1e-6).any()):
        raise ValueError("transition goes from t_m to a less noisy t; draw t >= t_m (sample_stage does)")
    return ratio * x_m + var.clamp_min(0).sqrt() * noise


class Renoised(NamedTuple):
    x_tau: torch.Tensor  # (B, ...) the fake / teacher input
    tau: torch.Tensor  # (B,)
    x_end: torch.Tensor  # x_{e_k}: x0_hat re-noised to the stage end with the student's eps_hat
    noise_total: torch.Tensor  # n with x_tau = a_tau x0_hat + b_tau n (the code's "mixed noise")
    noise: torch.Tensor  # xi, the fresh noise of the kernel


@torch.no_grad()
def renoise(x0_hat: torch.Tensor, x_start: torch.Tensor, t_start: torch.Tensor, t_end: torch.Tensor,
            tau: torch.Tensor, schedule: Any, noise: torch.Tensor | None = None) -> Renoised:
    """Step 2 (no grad): eps_hat = (x_{tau_k} - a x0_hat) / b, x_e = a_e x0_hat + b_e eps_hat, x_tau ~ q(. | x_e)."""
    x0 = x0_hat.detach().float()
    xs = x_start.detach().float()
    b_s = broadcast(schedule.b(t_start), xs)
    if bool((b_s <= 0).any()):
        raise ValueError("the stage start has no noise (b = 0); stage starts must be noisy timesteps")
    eps_hat = (xs - broadcast(schedule.a(t_start), xs) * x0) / b_s
    x_end = schedule.add_noise(x0, eps_hat, t_end)
    xi = torch.randn_like(x0) if noise is None else noise.float()
    x_tau = transition(x_end, t_end, tau, schedule, xi)
    n = (x_tau - broadcast(schedule.a(tau), x0) * x0) / broadcast(schedule.b(tau), x0)
    return Renoised(x_tau.to(x0_hat.dtype), tau, x_end.to(x0_hat.dtype), n, xi)


def paper_huber_c(numel: int) -> float:
    """The paper's c = 0.00054 sqrt(d) for d latent dimensions per sample (Eq. 7)."""
    return 0.00054 * float(numel) ** 0.5


def pseudo_huber(delta: torch.Tensor, c: float | None = None) -> torch.Tensor:
    """Per-sample sqrt(||delta||^2 + c^2) - c, ``(B,)`` fp32; c defaults to ``paper_huber_c(d)``."""
    d = delta.float().flatten(1)
    c = paper_huber_c(d.shape[1]) if c is None else float(c)
    return torch.sqrt((d * d).sum(1) + c * c) - c


def generator_target(x0_hat: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor,
                     x0_uncond: torch.Tensor | None = None, guidance_scale: float = 1.0) -> torch.Tensor:
    """sg(x0_hat + (x0_real - x0_fake) + (s - 1)(x0_real - x0_uncond)); ``x0_uncond=None``: x0_real is guided."""
    if x0_uncond is None and guidance_scale != 1.0:
        raise ValueError("pass x0_uncond for guidance_scale != 1, or a CFG x0_real with guidance_scale=1")
    y = x0_hat.float() + (x0_real.float() - x0_fake.float())
    if x0_uncond is not None:
        y = y + (guidance_scale - 1.0) * (x0_real.float() - x0_uncond.float())
    return y.detach()


def tdm_loss_from_x0(x0_hat: torch.Tensor, x0_real_cfg: torch.Tensor, x0_fake: torch.Tensor, distance: str = "paper",
                     c: float | None = None, eps: float = 1e-12) -> torch.Tensor:
    """Step 3 on given predictions; the gradient reaches ``x0_hat`` only. ``c``: None = 0.00054 sqrt(d) / 1e-3."""
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    y = generator_target(x0_hat, x0_real_cfg, x0_fake)
    delta = x0_hat.float() - y  # (B, ...)
    if distance == "paper":
        return pseudo_huber(delta, c).mean()
    c = 1e-3 if c is None else float(c)
    dims = tuple(range(1, x0_hat.dim()))
    w = (x0_hat.detach().float() - x0_real_cfg.float()).abs().mean(dims, keepdim=True).clamp_min(eps)
    return ((torch.sqrt(delta ** 2 + c * c) - c) / w).mean()


def tdm_generator_loss(x0_hat: torch.Tensor, r: Renoised, teacher: Any, fake: Any, text_tokens: torch.Tensor,
                       text_mask: torch.Tensor | None, null_tokens: torch.Tensor | None = None,
                       null_mask: torch.Tensor | None = None, guidance_scale: float = 4.5, distance: str = "paper",
                       c: float | None = None, autocast: Callable[[], Any] | None = None,
                       pooled: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """L_traj for the graded ``x0_hat`` at ``r.x_tau``: teacher x0 with Imagen CFG s (= the target's split form,
    Denoiser CFG is affine) and the fake's plain x0, both without grad. Returns ``(loss, info)``."""
    with torch.no_grad(), (autocast() if autocast is not None else nullcontext()):
        x_real = teacher.x0(r.x_tau, r.tau, text_tokens, text_mask, guidance_scale=guidance_scale,
                            null_tokens=null_tokens, null_mask=null_mask, **pooled_kw(pooled))
        x_fake = fake.x0(r.x_tau, r.tau, text_tokens, text_mask, **pooled_kw(pooled))
    loss = tdm_loss_from_x0(x0_hat, x_real, x_fake, distance, c)
    return loss, {"tdm_real_fake_gap": float((x_real.float() - x_fake.float()).abs().mean())}


def importance_weight(noise_total: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The code's exp(-mean(n^2) / 2) / exp(-mean(xi^2) / 2) per sample, ``(B,)`` fp32."""
    n, xi = noise_total.float().flatten(1), noise.float().flatten(1)
    return torch.exp(-0.5 * (n * n).mean(1) + 0.5 * (xi * xi).mean(1))


def fake_score_loss(fake: Any, x0_hat: torch.Tensor, r: Renoised, text_tokens: torch.Tensor,
                    text_mask: torch.Tensor | None, target: str = "x0", snr_cap: float | None = 5.0,
                    importance: bool = True, autocast: Callable[[], Any] | None = None,
                    pooled: torch.Tensor | None = None) -> torch.Tensor:
    """Step 4: per-sample MSE x omega, mean; gradient reaches the fake's parameters only (x0_hat, x_tau are data)."""
    if target not in FAKE_TARGETS:
        raise ValueError(f"target must be one of {FAKE_TARGETS}, got {target!r}")
    x0, x_tau = x0_hat.detach().float(), r.x_tau.detach()
    with (autocast() if autocast is not None else nullcontext()):
        out = fake(x_tau, r.tau, text_tokens, text_mask, **pooled_kw(pooled)).float()
    if target == "x0":
        pred, tgt = P.to_x0(out, x_tau.float(), r.tau, fake.schedule, fake.parameterization), x0
    else:
        pred, tgt = out, P.target(x0, r.noise_total.float(), r.tau, fake.schedule, fake.parameterization)
    per = ((pred - tgt) ** 2).flatten(1).mean(1)  # (B,)
    w = torch.ones_like(per)
    if snr_cap is not None:
        w = w * fake.schedule.snr(r.tau).to(per.device).float().clamp_max(float(snr_cap))
    if importance:
        w = w * importance_weight(r.noise_total, r.noise).to(per.device)
    return (per * w).mean()


class TDMTerm(VSDTerm):
    """L_traj (steps 1-3) on the backward-simulated x_hat, re-noised inside its stage; the fake score learns the
    re-noised student samples (step 4, Eq. 8 / 10) with AdamW betas (0, 0.95) as the TDM code."""

    name = "tdm"
    betas = (0.0, 0.95)

    def __init__(self, weight: float = 1.0, guidance: float = 4.5, distance: str = "paper", fake_updates: int = 1,
                 lr: float = 5e-5):
        super().__init__(weight, fake_updates=fake_updates, lr=lr)
        self.guidance, self.distance = float(guidance), distance

    @torch.no_grad()
    def point(self, trainer: Any, x_hat: torch.Tensor, x_k: torch.Tensor, t_k: torch.Tensor) -> Renoised:
        """Steps 1-2 for the graded step's stage [stage end e, t_k]: tau ~ U[max(20, e), t_k - 10), then x_hat
        re-noised along the student's own trajectory (``renoise``)."""
        ts = trainer.timesteps
        i = ts.index(int(t_k.flatten()[0]))
        end = ts[i + 1] + 1 if i + 1 < len(ts) else 0
        lo, hi = max(20, end), int(t_k.flatten()[0]) - 10
        if hi <= lo:
            raise ConfigError(f"TDM: the stage [{end}, {ts[i]}] of student timesteps {ts} is too short for a tau in "
                              "[max(20, end), start - 10); use fewer, wider steps")
        tau = torch.randint(lo, hi, (x_hat.shape[0],), device=x_hat.device)
        e = torch.full_like(tau, end)
        t_start = t_k.reshape(-1).expand(x_hat.shape[0]) if t_k.numel() == 1 else t_k
        return renoise(x_hat, x_k, t_start, e, tau, trainer.schedule)

    def generator_loss(self, ctx: StepContext) -> tuple[torch.Tensor, dict[str, Any]]:
        tr = ctx.trainer
        r = ctx.extras["tdm"] = self.point(tr, ctx.x_hat, ctx.x_k, ctx.t_k)
        loss, _ = tdm_generator_loss(ctx.x_hat, r, tr.teacher, self.fake, ctx.tok, ctx.mask, *ctx.null_text(),
                                     self.guidance, self.distance, autocast=tr.autocast, pooled=ctx.batch.text_pooled)
        return loss, {"loss_tdm": float(loss.detach())}

    def fake_input(self, trainer: Any, ctx: StepContext | None) -> tuple[Any, torch.Tensor, Any]:
        if ctx is not None:
            return ctx.batch, ctx.x_hat, ctx.extras["tdm"]
        batch = trainer.sample_batch()
        with torch.no_grad():
            x_k, t_k = trainer.graded_input(batch)
            x_hat = trainer.student_x0(x_k, t_k, batch.text_tokens, batch.text_mask, **pooled_kw(batch.text_pooled))
        return batch, x_hat, self.point(trainer, x_hat, x_k, t_k)

    def fake_loss(self, trainer: Any, batch: Any, x_hat: torch.Tensor, r: Any) -> torch.Tensor:
        return fake_score_loss(self.fake, x_hat, r, batch.text_tokens, batch.text_mask, autocast=trainer.autocast,
                               pooled=batch.text_pooled)


__all__ = ["TDMTerm", "DISTANCES", "FAKE_TARGETS", "stage_bounds", "student_timesteps", "sample_stage",
           "pick_stage_inputs", "transition", "Renoised", "renoise", "paper_huber_c", "pseudo_huber",
           "generator_target", "tdm_loss_from_x0", "tdm_generator_loss", "importance_weight", "fake_score_loss"]
