"""Variational score distillation as DMD2 does it (DOLLAR Eq. 7-8, Alg. 1 lines 8-13).

Symbols: x_hat = G_theta(eps, c) the student's sample (x0 space); x_t = a_t x_hat + b_t eps' the
re-noised sample at t ~ U[0.02 T, 0.98 T]; x_real = teacher x0 prediction with CFG (w = 3.5,
Imagen form); x_fake = fake-score x0 prediction (no CFG). The generator gradient is

    grad = (x_fake - x_real) / mean_per_sample(|x_hat - x_real|)      (DMD2 normalisation)
    L_VSD = 0.5 * mean((x_hat - sg(x_hat - grad))^2)                   (so dL/dx_hat = grad / numel)

The fake score starts as a copy of the teacher and is trained on sg(x_hat) with the teacher's own
objective (conjugate v, Eq. 13), several updates per generator update (DMD2: 5).
Formulas follow DMD2 (Yin et al. 2024, public code ``distribution_matching_loss``).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable

import torch
import torch.nn.functional as F

from distill import parameterization as P
from distill.objective import ObjectiveTerm, StepContext
from distill.samplers import k_step_sample, pooled_kw


def sample_timesteps(batch: int, num_train_timesteps: int = 1000, min_frac: float = 0.02, max_frac: float = 0.98,
                     device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> torch.Tensor:
    """Integer t ~ U[min_frac T, max_frac T] (inclusive), shape ``(batch,)``; default [20, 980] for T = 1000."""
    if not 0.0 <= min_frac < max_frac <= 1.0:
        raise ValueError(f"need 0 <= min_frac < max_frac <= 1, got {min_frac}, {max_frac}")
    lo = int(round(min_frac * num_train_timesteps))
    hi = min(int(round(max_frac * num_train_timesteps)), num_train_timesteps - 1)
    return torch.randint(lo, hi + 1, (batch,), device=device, generator=generator)


def normalized_vsd_grad(x_hat: torch.Tensor, x_real: torch.Tensor, x_fake: torch.Tensor,
                        dtype: torch.dtype = torch.float32, eps: float = 1e-12) -> torch.Tensor:
    """DMD2's normalised gradient ``(x_fake - x_real) / mean|x_hat - x_real|`` (mean over all but dim 0).

    Computed in ``dtype`` (fp32 by default, fp64 for extra safety under bf16 training); returned in ``dtype``.
    """
    x_hat, x_real, x_fake = x_hat.detach().to(dtype), x_real.detach().to(dtype), x_fake.detach().to(dtype)
    dims = tuple(range(1, x_hat.dim()))
    weight = (x_hat - x_real).abs().mean(dim=dims, keepdim=True).clamp_min(eps)  # (B, 1, ...)
    grad = (x_fake - x_real) / weight
    return torch.nan_to_num(grad)


def vsd_loss_from_grad(x_hat: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``0.5 * mean((x_hat - sg(x_hat - grad))^2)``: a surrogate whose gradient w.r.t. x_hat is ``grad / numel``."""
    x = x_hat.to(grad.dtype)
    return 0.5 * F.mse_loss(x, (x - grad).detach(), reduction="mean")


def vsd_loss(x_hat: torch.Tensor, teacher: Any, fake: Any, text_tokens: torch.Tensor, text_mask: torch.Tensor | None,
             null_tokens: torch.Tensor | None, null_mask: torch.Tensor | None, guidance_scale: float = 3.5,
             t: torch.Tensor | None = None, noise: torch.Tensor | None = None, min_frac: float = 0.02,
             max_frac: float = 0.98, grad_dtype: torch.dtype = torch.float32,
             autocast: Callable[[], Any] | None = None,
             pooled: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """L_VSD for the student sample ``x_hat`` (grad flows into it); returns ``(loss, info)``.

    ``teacher`` (real score, CFG ``guidance_scale``) and ``fake`` are ``distill.denoiser.Denoiser`` objects;
    both run without gradients. ``t`` / ``noise`` may be given (tests); otherwise they are drawn. ``pooled``:
    the captions' pooled text (FLUX / SD3 / HunyuanVideo; the CFG branch uses the teacher's null pooled vector).
    """
    B = x_hat.shape[0]
    schedule = teacher.schedule
    if t is None:
        t = sample_timesteps(B, schedule.num_train_timesteps, min_frac, max_frac, device=x_hat.device)
    if noise is None:
        noise = torch.randn_like(x_hat)
    with torch.no_grad():
        x_t = schedule.add_noise(x_hat.detach(), noise, t)  # (B, ...)
        with (autocast() if autocast is not None else nullcontext()):
            x_real = teacher.x0(x_t, t, text_tokens, text_mask, guidance_scale=guidance_scale,
                                null_tokens=null_tokens, null_mask=null_mask, **pooled_kw(pooled))
            x_fake = fake.x0(x_t, t, text_tokens, text_mask, **pooled_kw(pooled))
    grad = normalized_vsd_grad(x_hat, x_real, x_fake, dtype=grad_dtype)
    loss = vsd_loss_from_grad(x_hat, grad)
    info = {"vsd_grad_norm": float(grad.flatten(1).norm(dim=1).mean()),
            "vsd_real_fake_gap": float((x_fake.float() - x_real.float()).abs().mean())}
    return loss.float(), info


def fake_score_loss(fake: Any, x_hat: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor | None,
                    t: torch.Tensor | None = None, noise: torch.Tensor | None = None, min_frac: float = 0.02,
                    max_frac: float = 0.98, autocast: Callable[[], Any] | None = None,
                    pooled: torch.Tensor | None = None) -> torch.Tensor:
    """The teacher's objective on sg(x_hat) for the fake score (Alg. 1 lines 12-13): MSE to the target of
    ``fake.parameterization`` (conjugate v: ``x0 - eps``, Eq. 13), mean over elements, in fp32."""
    x0 = x_hat.detach()
    B = x0.shape[0]
    schedule = fake.schedule
    if t is None:
        t = sample_timesteps(B, schedule.num_train_timesteps, min_frac, max_frac, device=x0.device)
    if noise is None:
        noise = torch.randn_like(x0)
    x_t = schedule.add_noise(x0, noise, t)
    with (autocast() if autocast is not None else nullcontext()):
        out = fake(x_t, t, text_tokens, text_mask, **pooled_kw(pooled))
    tgt = P.target(x0, noise, t, schedule, fake.parameterization)
    return F.mse_loss(out.float(), tgt.float())


def backward_simulation(student_x0: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
                        timesteps: list[int], schedule: Any, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the first ``num_steps`` student steps without gradients (DMD2 backward simulation).

    ``timesteps`` is the student's schedule in sampling order (descending, e.g. [999, 749, 499, 249]);
    ``student_x0(x_t, t)`` returns the student's x0 prediction. Starting from ``noise`` at ``timesteps[0]``,
    each step predicts x0 and re-noises it with fresh noise to the next timestep (``distill.samplers.k_step_sample``
    with ``stop_at=num_steps``). Returns ``(x_t, t)`` at ``timesteps[num_steps]``, the input of the graded step.
    """
    if not 0 <= num_steps < len(timesteps):
        raise ValueError(f"num_steps must be in [0, {len(timesteps)}), got {num_steps}")
    state = k_step_sample(student_x0, noise, timesteps, schedule, grad_steps=0, stop_at=num_steps)
    return state.x_t, state.t


class VSDTerm(ObjectiveTerm):
    """L_VSD on the backward-simulated x_hat, and its fake score (a trainable copy of the teacher) trained with the
    teacher's objective ``fake_updates`` times per trainer step (Alg. 1 lines 12-13); the first update reuses the
    generator step's samples, the others draw new ones."""

    name, needs_x_hat, needs_teacher = "vsd", True, True
    betas: tuple[float, float] | None = None  # None: the config's adam betas

    def __init__(self, weight: float = 1.0, guidance: float = 3.5, t_min: float = 0.02, t_max: float = 0.98,
                 grad_dtype: str = "float32", fake_updates: int = 5, lr: float = 5e-5):
        super().__init__(weight)
        self.guidance, self.t_min, self.t_max = float(guidance), float(t_min), float(t_max)
        self.grad_dtype = torch.float64 if grad_dtype == "float64" else torch.float32
        self.fake_updates, self.lr = int(fake_updates), float(lr)
        self.fake = self.opt = None

    def setup(self, trainer: Any) -> None:
        self.fake = trainer.trainable_copy("fake")

    def setup_optimizers(self, trainer: Any) -> None:
        cfg = trainer.config
        self.opt = torch.optim.AdamW(self.fake.model.parameters(), lr=self.lr,
                                     betas=self.betas or (cfg.adam_beta1, cfg.adam_beta2),
                                     weight_decay=cfg.weight_decay)
        self.fake.model = trainer.prepare_ddp(self.fake.model)

    def set_lr(self, scale: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = self.lr * scale

    def generator_loss(self, ctx: StepContext) -> tuple[torch.Tensor, dict[str, Any]]:
        tr = ctx.trainer
        loss, info = vsd_loss(ctx.x_hat, tr.teacher, self.fake, ctx.tok, ctx.mask, *ctx.null_text(), self.guidance,
                              min_frac=self.t_min, max_frac=self.t_max, grad_dtype=self.grad_dtype,
                              autocast=tr.autocast, pooled=ctx.batch.text_pooled)
        return loss, {"loss_vsd": float(loss.detach()), "vsd_grad_norm": info["vsd_grad_norm"]}

    # the fake score's own update -------------------------------------------------------------------------
    def fake_input(self, trainer: Any, ctx: StepContext | None) -> tuple[Any, torch.Tensor, Any]:
        """``(batch, sg(x_hat), extra)`` of one fake-score micro-batch: a generator step's, or a new draw."""
        if ctx is not None:
            return ctx.batch, ctx.x_hat, None
        batch = trainer.sample_batch()
        return batch, trainer.generate(batch), None

    def fake_loss(self, trainer: Any, batch: Any, x_hat: torch.Tensor, extra: Any) -> torch.Tensor:
        return fake_score_loss(self.fake, x_hat, batch.text_tokens, batch.text_mask, min_frac=self.t_min,
                               max_frac=self.t_max, autocast=trainer.autocast, pooled=batch.text_pooled)

    def fake_step(self, trainer: Any, reuse_last: bool = True) -> float:
        """One optimizer step of the fake score on the teacher objective at sg(x_hat)."""
        n = trainer.config.grad_accum
        self.fake.train()
        self.opt.zero_grad(set_to_none=True)
        last = [c for c in trainer.last if c.x_hat is not None] if reuse_last else []
        total = 0.0
        for micro in range(n):
            batch, x_hat, extra = self.fake_input(trainer, last[micro] if micro < len(last) else None)
            with trainer.no_sync(self.fake.model, micro == n - 1):
                loss = self.fake_loss(trainer, batch, x_hat, extra)
                trainer.accelerator.backward(loss / n)
            total += float(loss.detach()) / n
        gn = trainer.clip(self.fake.model)
        if trainer.guard.check(gn, "fake-score loss / gradient", trainer.step + 1, key="fake"):
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return total

    def update(self, trainer: Any) -> dict[str, Any]:
        losses = [self.fake_step(trainer, reuse_last=(i == 0)) for i in range(self.fake_updates)]
        return {"loss_fake": sum(losses) / len(losses)}

    def modules(self) -> dict[str, Any]:
        return {"fake": self.fake.model}

    def optimizers(self) -> dict[str, Any]:
        return {"fake": self.opt}

    def sharded(self) -> dict[str, Any]:
        return {"fake": self.fake.model}
