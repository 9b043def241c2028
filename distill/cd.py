"""Consistency distillation as LCM does it, with DOLLAR's multi-step teacher (DOLLAR Eq. 4-6).

1. DDIM skip grid with N = 50 points on T = 1000: t_i = 20 (i + 1) - 1 = [19, 39, ..., 999].
2. Sample an index j; t_{n+m} = grid[j]; noise data x to x_{t_{n+m}}.
3. Run m teacher DDIM steps (CFG w = 7.5, Imagen form) down the grid to x_hat_{t_n}; stepping past
   grid[0] lands on the clean end point t = -1 (the boundary, where f(x, t) = x).
4. target = f_{theta^-}(x_hat_{t_n}, t_n) with theta^- an EMA (0.95) of the student; pred = f_theta(x_{t_{n+m}}).
5. L_CD = d(pred, target), d = pseudo-Huber sqrt((p - q)^2 + c^2) - c (elementwise mean, c = 1e-3) or L2.
The consistency function has LCM's boundary scalings f(x, t) = c_skip(t) x + c_out(t) x0_theta(x, t),
c_skip = s^2 / ((10 t)^2 + s^2), c_out = 10 t / sqrt((10 t)^2 + s^2), s = sigma_data = 0.5
(diffusers ``train_lcm_distill_sd.py`` ``scalings_for_boundary_conditions``).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable

import torch

from distill.objective import ObjectiveTerm, StepContext
from distill.samplers import pooled_kw
from lrm.config import ConfigError
from lrm.schedules import broadcast

DISTANCES = ("huber", "l2")


def ddim_grid(num_train_timesteps: int = 1000, num_ddim_steps: int = 50, device: torch.device | str = "cpu"
              ) -> torch.Tensor:
    """LCM's DDIM skip grid ``(arange(1, N + 1) * T // N) - 1``: [19, 39, ..., 999] for T = 1000, N = 50."""
    if num_ddim_steps < 1 or num_train_timesteps % num_ddim_steps:
        raise ValueError(f"num_ddim_steps must divide num_train_timesteps={num_train_timesteps}, got {num_ddim_steps}")
    step = num_train_timesteps // num_ddim_steps
    return torch.arange(1, num_ddim_steps + 1, device=device, dtype=torch.long) * step - 1


def boundary_scalings(t: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM's ``(c_skip, c_out)`` for integer timesteps ``t`` (B,); t <= 0 (incl. the clean end point -1) is the
    boundary: c_skip = 1, c_out = 0. Float32 (B,)."""
    ts = t.to(torch.float32).clamp_min(0.0) * timestep_scaling
    c_skip = sigma_data ** 2 / (ts ** 2 + sigma_data ** 2)
    c_out = ts / (ts ** 2 + sigma_data ** 2) ** 0.5
    return c_skip, c_out


def consistency_output(x_t: torch.Tensor, x0_pred: torch.Tensor, t: torch.Tensor, sigma_data: float = 0.5,
                       timestep_scaling: float = 10.0) -> torch.Tensor:
    """f(x_t, t) = c_skip(t) x_t + c_out(t) x0_pred(x_t, t)."""
    c_skip, c_out = boundary_scalings(t, sigma_data, timestep_scaling)
    return broadcast(c_skip, x_t) * x_t + broadcast(c_out, x0_pred) * x0_pred


def cd_distance(pred: torch.Tensor, target: torch.Tensor, distance: str = "huber", huber_c: float = 1e-3
                ) -> torch.Tensor:
    """Pseudo-Huber ``mean(sqrt((p - q)^2 + c^2) - c)`` (LCM, elementwise) or L2 ``mean((p - q)^2)``, in fp32."""
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    d = pred.float() - target.float().detach()
    if distance == "l2":
        return (d ** 2).mean()
    return (torch.sqrt(d ** 2 + huber_c ** 2) - huber_c).mean()


def sample_cd_indices(batch: int, num_ddim_steps: int = 50, device: torch.device | str = "cpu") -> torch.Tensor:
    """Grid index j of t_{n+m}, uniform over the whole grid (LCM), shape ``(batch,)``."""
    return torch.randint(0, num_ddim_steps, (batch,), device=device)


def grid_timesteps(grid: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``grid[index]`` with index < 0 -> -1 (the clean end point)."""
    return torch.where(index >= 0, grid[index.clamp_min(0)], torch.full_like(index, -1))


@torch.no_grad()
def teacher_multistep(teacher: Any, x: torch.Tensor, index: torch.Tensor, grid: torch.Tensor, num_steps: int,
                      text_tokens: torch.Tensor, text_mask: torch.Tensor | None, null_tokens: torch.Tensor | None,
                      null_mask: torch.Tensor | None, guidance_scale: float = 7.5,
                      autocast: Callable[[], Any] | None = None,
                      pooled: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_steps`` (m) deterministic DDIM steps of the CFG teacher from ``x`` at ``grid[index]`` down the grid
    (``pooled``: the captions' pooled text, FLUX / SD3 / HunyuanVideo).

    Returns ``(x_hat_{t_n}, t_n)``; samples that reach the clean end point (t = -1) stop there.
    DDIM (eta = 0): x_prev = a_prev x0_hat + b_prev eps_hat, with eps_hat implied by the CFG x0 prediction
    (CFG commutes with the affine x0 <-> eps maps at fixed x_t).
    """
    schedule = teacher.schedule
    for j in range(num_steps):
        cur_i, nxt_i = index - j, index - j - 1
        active = cur_i >= 0  # (B,)
        if not bool(active.any()):
            break
        t_cur = grid_timesteps(grid, cur_i).clamp_min(0)
        t_nxt = grid_timesteps(grid, nxt_i)
        with (autocast() if autocast is not None else nullcontext()):
            x0 = teacher.x0(x, t_cur, text_tokens, text_mask, guidance_scale=guidance_scale,
                            null_tokens=null_tokens, null_mask=null_mask, **pooled_kw(pooled))
        x0 = x0.to(x.dtype)
        a, b = broadcast(schedule.a(t_cur), x), broadcast(schedule.b(t_cur), x)
        eps = (x - a * x0) / b
        x_next = broadcast(schedule.a(t_nxt), x) * x0 + broadcast(schedule.b(t_nxt), x) * eps
        x = torch.where(broadcast(active.float(), x) > 0, x_next, x)
    t_n = grid_timesteps(grid, index - num_steps)
    return x, t_n


def cd_inputs_and_target(x0_data: torch.Tensor, teacher: Any, target_x0: Callable[[torch.Tensor, torch.Tensor],
                         torch.Tensor], text_tokens: torch.Tensor, text_mask: torch.Tensor | None,
                         null_tokens: torch.Tensor | None, null_mask: torch.Tensor | None, grid: torch.Tensor,
                         num_teacher_steps: int = 5, guidance_scale: float = 7.5, sigma_data: float = 0.5,
                         timestep_scaling: float = 10.0, index: torch.Tensor | None = None,
                         noise: torch.Tensor | None = None, autocast: Callable[[], Any] | None = None,
                         pooled: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 2-4: returns ``(x_{t_{n+m}}, t_{n+m}, target)``; the student's pred is
    ``consistency_output(x, student_x0(x, t), t)``. ``target_x0(x, t)`` is the EMA network's x0 prediction."""
    B = x0_data.shape[0]
    if index is None:
        index = sample_cd_indices(B, grid.numel(), device=x0_data.device)
    if noise is None:
        noise = torch.randn_like(x0_data)
    t_start = grid[index]
    x_start = teacher.schedule.add_noise(x0_data, noise, t_start)  # (B, ...)
    with torch.no_grad():
        x_hat, t_n = teacher_multistep(teacher, x_start, index, grid, num_teacher_steps, text_tokens, text_mask,
                                       null_tokens, null_mask, guidance_scale, autocast, pooled)
        with (autocast() if autocast is not None else nullcontext()):
            x0_tgt = target_x0(x_hat, t_n.clamp_min(0)).to(x_hat.dtype)
        target = consistency_output(x_hat, x0_tgt, t_n, sigma_data, timestep_scaling)
    return x_start, t_start, target


def cd_loss(student_x0: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0_data: torch.Tensor, teacher: Any,
            target_x0: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], text_tokens: torch.Tensor,
            text_mask: torch.Tensor | None, null_tokens: torch.Tensor | None, null_mask: torch.Tensor | None,
            grid: torch.Tensor, num_teacher_steps: int = 5, guidance_scale: float = 7.5, distance: str = "huber",
            huber_c: float = 1e-3, sigma_data: float = 0.5, timestep_scaling: float = 10.0,
            index: torch.Tensor | None = None, noise: torch.Tensor | None = None,
            autocast: Callable[[], Any] | None = None, pooled: torch.Tensor | None = None) -> torch.Tensor:
    """L_CD (steps 1-5) in one call; ``student_x0(x, t)`` carries the gradient."""
    x_start, t_start, target = cd_inputs_and_target(
        x0_data, teacher, target_x0, text_tokens, text_mask, null_tokens, null_mask, grid, num_teacher_steps,
        guidance_scale, sigma_data, timestep_scaling, index, noise, autocast, pooled)
    with (autocast() if autocast is not None else nullcontext()):
        x0 = student_x0(x_start, t_start)
    pred = consistency_output(x_start, x0.float(), t_start, sigma_data, timestep_scaling)
    return cd_distance(pred, target, distance, huber_c)


class CDTerm(ObjectiveTerm):
    """L_CD: the student's prediction at x_{t_{n+m}} rides in the step's one graded student call; the target network
    theta^- (an EMA of the student, updated after each student optimizer step) is the term's own network."""

    name, needs_teacher = "cd", True

    def __init__(self, weight: float = 0.5, ddim_steps: int = 50, teacher_steps: int = 5, guidance: float = 7.5,
                 ema_decay: float = 0.95, distance: str = "huber", huber_c: float = 1e-3):
        super().__init__(weight)
        self.ddim_steps, self.teacher_steps, self.guidance = int(ddim_steps), int(teacher_steps), float(guidance)
        self.ema_decay, self.distance, self.huber_c = float(ema_decay), distance, float(huber_c)
        self.target = None

    def setup(self, trainer: Any) -> None:
        if trainer.data.latents is None:
            raise ConfigError("the cd term needs data latents (a data_cache, or DistillData / PromptPool latents)")
        self.target = trainer.ema_target(self.ema_decay)
        self.grid = ddim_grid(trainer.schedule.num_train_timesteps, self.ddim_steps, device=trainer.device)

    def prepare(self, ctx: StepContext) -> None:
        tr, tok, mask, pooled = ctx.trainer, ctx.tok, ctx.mask, ctx.batch.text_pooled
        shadow, cfg = self.target.shadow, tr.config
        x_s, t_s, target = cd_inputs_and_target(
            ctx.batch.latents, tr.teacher, lambda x, t: shadow.x0(x, t, tok, mask, **pooled_kw(pooled)), tok, mask,
            *ctx.null_text(), self.grid, self.teacher_steps, self.guidance, cfg.sigma_data, cfg.timestep_scaling,
            autocast=tr.autocast, pooled=pooled)
        ctx.query("cd", x_s, t_s)
        ctx.extras["cd_target"] = target

    def generator_loss(self, ctx: StepContext) -> tuple[torch.Tensor, dict[str, Any]]:
        loss = cd_distance(ctx.outputs["cd"], ctx.extras.pop("cd_target"), self.distance, self.huber_c)
        return loss, {"loss_cd": float(loss.detach())}

    def after_generator_step(self, trainer: Any) -> None:
        trainer.update_ema(self.target)

    def modules(self) -> dict[str, Any]:
        return {"target": self.target.shadow.model}

    def sharded(self) -> dict[str, Any]:
        return {"target": self.target.shadow.model}
