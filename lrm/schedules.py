"""Noise schedules: ``x_t = a_t x0 + b_t eps`` for DDPM (variance preserving) and rectified flow.

The one schedule module of the toolkit: the denoisers, samplers and losses of ``distill`` and the noise-aware heads
of ``latent_rewards`` (``fit``, ``LatentReward.noise_schedule``) use these classes.
Both expose the same small interface so parameterisations, samplers and losses never branch on the
schedule type: ``a(t)``, ``b(t)`` (float32, shape ``(B,)``), ``add_noise(x0, noise, t)`` (diffusers' argument
order), ``alphas_cumprod``.
Timesteps are integers in ``[0, T)``; ``t = -1`` means "clean" (``a = 1, b = 0``), the end point of a
sampler whose last step predicts x0 (diffusers' DDIM with ``set_alpha_to_one=True``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch

BETA_SCHEDULES = ("scaled_linear", "linear", "cosine")


def _as_timesteps(t: torch.Tensor | int | float, like: torch.Tensor | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        t = torch.tensor([t])
    if t.dim() == 0:
        t = t[None]
    if like is not None and t.numel() == 1 and like.shape[0] != 1:
        t = t.expand(like.shape[0])
    return t


def broadcast(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``(B,)`` coefficients -> ``(B, 1, ..., 1)`` matching ``x`` (any trailing dims), in x's dtype/device."""
    if coef.shape[0] != x.shape[0] and coef.shape[0] != 1:
        raise ValueError(f"timesteps have batch {coef.shape[0]} but the tensor has batch {x.shape[0]} "
                         f"(shape {tuple(x.shape)}); pass one timestep per sample or a scalar")
    return coef.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def _config_getter(scheduler: Any):
    """``get(key, default)`` over a diffusers scheduler, its config object or a config dict."""
    cfg = getattr(scheduler, "config", scheduler)
    return cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)


class _Schedule(ABC):
    kind: str = ""
    num_train_timesteps: int

    @abstractmethod
    def _ab(self, t: torch.Tensor, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a_t, b_t)`` of ``x_t = a_t x0 + b_t eps`` for integer timesteps ``t``."""

    def a(self, t) -> torch.Tensor:
        return self._ab(_as_timesteps(t))[0]

    def b(self, t) -> torch.Tensor:
        return self._ab(_as_timesteps(t))[1]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t, *, check: bool = True) -> torch.Tensor:
        """``a_t x0 + b_t noise`` for ``x0, noise`` of shape ``(B, ...)`` and ``t`` of shape ``(B,)`` or scalar.

        ``check=False`` skips the range check of ``t`` (a host sync for timesteps on a GPU), for loops that draw
        ``t`` inside the schedule's range themselves.
        """
        if x0.shape != noise.shape:
            raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must have the same shape")
        a, b = self._ab(_as_timesteps(t, x0), check)
        return broadcast(a, x0) * x0 + broadcast(b, x0) * noise

    def snr(self, t) -> torch.Tensor:
        return (self.a(t) / self.b(t).clamp_min(1e-12)) ** 2

    def _check_t(self, t: torch.Tensor) -> torch.Tensor:
        if t.dtype.is_floating_point and not torch.equal(t, t.round()):
            raise ValueError(f"{type(self).__name__} takes integer timesteps in [0, {self.num_train_timesteps}), "
                             f"got non-integer values {t.flatten()[:4].tolist()}")
        t = t.long()
        if (t < -1).any() or (t >= self.num_train_timesteps).any():
            raise ValueError(f"timesteps must lie in [-1, {self.num_train_timesteps - 1}] (-1 = clean), got "
                             f"min {int(t.min())} max {int(t.max())}")
        return t


class DDPMSchedule(_Schedule):
    """Variance-preserving DDPM schedule: ``a_t = sqrt(abar_t)``, ``b_t = sqrt(1 - abar_t)``.

    ``beta_schedule``: ``"scaled_linear"`` (Stable Diffusion: betas linear in sqrt space),
    ``"linear"`` (DDPM), ``"cosine"`` (Nichol & Dhariwal, diffusers' ``squaredcos_cap_v2``, beta <= 0.999).
    Betas are built in float32 exactly as diffusers does, so ``alphas_cumprod`` matches its schedulers bit for bit;
    it is kept as float64 for exact conversions.
    ``alphas_cumprod`` (T,) gives any other schedule (``beta_schedule == "custom"``; e.g. a fine-tuned model's own,
    or the one a noise-aware LRM recorded in its metadata); the beta arguments are then ignored.
    """

    kind = "ddpm"

    def __init__(self, num_train_timesteps: int = 1000, beta_schedule: str = "scaled_linear",
                 beta_start: float = 0.00085, beta_end: float = 0.012,
                 alphas_cumprod: torch.Tensor | list[float] | None = None):
        if alphas_cumprod is not None:
            ac = torch.as_tensor(alphas_cumprod, dtype=torch.float32).reshape(-1)  # (T,)
            if not ((ac > 0) & (ac <= 1)).all():
                raise ValueError("alphas_cumprod must lie in (0, 1]")
            self.num_train_timesteps = len(ac)
            self.beta_schedule, self.beta_start, self.beta_end = "custom", None, None
            self.betas = 1 - ac / torch.cat([ac.new_ones(1), ac[:-1]])
            self._set_alphas_cumprod(ac.double())
            return
        if beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule {beta_schedule!r} is not one of {BETA_SCHEDULES}")
        if num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
        T = num_train_timesteps
        self.num_train_timesteps = T
        self.beta_schedule, self.beta_start, self.beta_end = beta_schedule, float(beta_start), float(beta_end)
        if beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float32) ** 2
        elif beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
        else:
            f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
            betas = torch.tensor([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=torch.float32)
        self.betas = betas
        # diffusers: cumprod in float32; we keep the same values, widened to float64.
        self._set_alphas_cumprod(torch.cumprod(1.0 - betas, dim=0).double())

    def _set_alphas_cumprod(self, alphas_cumprod: torch.Tensor) -> None:
        self.alphas_cumprod = alphas_cumprod  # (T,) float64
        ac = torch.cat([alphas_cumprod, torch.ones(1, dtype=torch.float64)])  # index -1 -> clean
        self._a = ac.sqrt().float()
        self._b = (1 - ac).sqrt().float()
        self._abar = ac.float()

    def _index(self, t: torch.Tensor, check: bool = True) -> torch.Tensor:
        return self._check_t(t) if check else t.long()

    def _ab(self, t: torch.Tensor, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        t = self._index(t, check)
        return self._a.to(t.device)[t], self._b.to(t.device)[t]

    def abar(self, t) -> torch.Tensor:
        t = self._index(_as_timesteps(t))
        return self._abar.to(t.device)[t]

    def to_dict(self, with_alphas_cumprod: bool = False) -> dict[str, Any]:
        """JSON-able description (``schedule_from_dict`` inverts it). A custom schedule always records its
        ``alphas_cumprod`` (8 decimals); ``with_alphas_cumprod`` adds them for the named ones too (the record of a
        noise-aware LRM, which ``LatentReward.noise_schedule`` reads)."""
        d: dict[str, Any] = {"type": "ddpm", "num_train_timesteps": self.num_train_timesteps,
                             "beta_schedule": self.beta_schedule}
        if self.beta_schedule != "custom":
            d.update(beta_start=self.beta_start, beta_end=self.beta_end)
        if with_alphas_cumprod or self.beta_schedule == "custom":
            d["alphas_cumprod"] = [round(float(a), 8) for a in self.alphas_cumprod.float()]
        return d

    @classmethod
    def from_diffusers(cls, scheduler: Any) -> "DDPMSchedule":
        """From a diffusers DDPM/DDIM/Euler/LCM scheduler (or its config). Raises for trained betas."""
        get = _config_getter(scheduler)
        names = {"scaled_linear": "scaled_linear", "linear": "linear", "squaredcos_cap_v2": "cosine"}
        bs = get("beta_schedule", "linear")
        if bs not in names:
            raise ValueError(f"diffusers beta_schedule {bs!r} is not supported; supported: {list(names)}")
        if get("trained_betas", None) is not None:
            raise ValueError("schedulers with trained_betas are not supported; use a beta_schedule")
        if get("rescale_betas_zero_snr", False):
            raise ValueError("rescale_betas_zero_snr=True is not supported by DDPMSchedule")
        return cls(int(get("num_train_timesteps", 1000)), names[bs], float(get("beta_start", 0.0001)),
                   float(get("beta_end", 0.02)))

    def __repr__(self) -> str:
        if self.beta_schedule == "custom":
            return f"DDPMSchedule(num_train_timesteps={self.num_train_timesteps}, beta_schedule='custom')"
        return (f"DDPMSchedule(num_train_timesteps={self.num_train_timesteps}, beta_schedule={self.beta_schedule!r}, "
                f"beta_start={self.beta_start}, beta_end={self.beta_end})")


class FlowSchedule(_Schedule):
    """Rectified flow: ``x_t = (1 - s) x0 + s z`` with ``s = t / T`` (SD3 / Wan convention, timestep = 1000 s).

    Timesteps may be fractional here (flow models take continuous time); ``t = -1`` still means clean.
    """

    kind = "flow"

    def __init__(self, num_train_timesteps: int = 1000):
        self.num_train_timesteps = int(num_train_timesteps)
        s = torch.arange(self.num_train_timesteps, dtype=torch.float64) / self.num_train_timesteps
        self.alphas_cumprod = (1 - s) ** 2 / ((1 - s) ** 2 + s ** 2)  # same SNR as a DDPM with these values

    def _s(self, t, check: bool = True) -> torch.Tensor:
        t = _as_timesteps(t).float()
        if check and ((t < -1).any() or (t > self.num_train_timesteps).any()):
            raise ValueError(f"flow timesteps must lie in [0, {self.num_train_timesteps}] (or -1 = clean), "
                             f"got min {float(t.min())} max {float(t.max())}")
        return torch.where(t < 0, torch.zeros_like(t), t / self.num_train_timesteps)

    def _ab(self, t: torch.Tensor, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        s = self._s(t, check)
        return 1 - s, s

    def abar(self, t) -> torch.Tensor:
        a, b = self.a(t), self.b(t)
        return a ** 2 / (a ** 2 + b ** 2)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "flow", "num_train_timesteps": self.num_train_timesteps}

    @classmethod
    def from_diffusers(cls, scheduler: Any) -> "FlowSchedule":
        get = _config_getter(scheduler)
        if get("shift", 1.0) not in (1.0, None) or get("use_dynamic_shifting", False):
            raise ValueError("FlowSchedule models the unshifted flow; pass timesteps already shifted, or set shift=1.0")
        return cls(int(get("num_train_timesteps", 1000)))

    def __repr__(self) -> str:
        return f"FlowSchedule(num_train_timesteps={self.num_train_timesteps})"


def schedule_from_scheduler_config(scheduler: Any) -> tuple[DDPMSchedule | FlowSchedule, str, Any]:
    """``(schedule, parameterisation, flow_shift)`` from a diffusers scheduler (object, config or config dict).

    Flow matching (``FlowMatch*`` schedulers; ``UniPCMultistepScheduler`` with ``use_flow_sigmas`` or
    ``prediction_type="flow_prediction"``, as Wan ships): ``FlowSchedule`` and ``"flow"``. The scheduler's shift
    (``shift`` / ``flow_shift``; ``"dynamic"`` for FLUX's resolution-dependent ``use_dynamic_shifting``) only warps
    which timesteps a sampler visits, not ``x_t = (1 - s) x0 + s z`` nor ``timestep = 1000 s``, so it is returned
    for the sampler, not folded into the schedule. DDPM family: ``DDPMSchedule.from_diffusers`` and
    ``prediction_type`` epsilon -> ``"eps"``, v_prediction -> ``"v"`` (CogVideoX), sample -> ``"x0"``.
    """
    get = _config_getter(scheduler)
    name = str(get("_class_name", type(scheduler).__name__))
    pred = get("prediction_type", "epsilon")
    if "FlowMatch" in name or pred == "flow_prediction" or get("use_flow_sigmas", False):
        shift = "dynamic" if get("use_dynamic_shifting", False) else float(get("flow_shift", None) or
                                                                             get("shift", None) or 1.0)
        return FlowSchedule(int(get("num_train_timesteps", 1000))), "flow", shift
    types = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
    if pred not in types:
        raise ValueError(f"{name} prediction_type {pred!r} is not supported; supported: {list(types)} "
                         "(or pass parameterization=)")
    if get("rescale_betas_zero_snr", False) or get("snr_shift_scale", None) not in (None, 1.0):
        # CogVideoX: SNR-shifted (snr_shift_scale) and zero-terminal-SNR alphas_cumprod; take the scheduler's own
        # table, its terminal 0 raised to 2**-24 (diffusers' Euler convention) so that x0 / eps stay finite.
        import diffusers

        cfg = dict(scheduler) if isinstance(scheduler, dict) else dict(getattr(scheduler, "config", {}))
        cls = getattr(diffusers, name, None)
        if cls is None:
            raise ValueError(f"cannot rebuild {name!r} from diffusers to read its rescaled alphas_cumprod")
        ac = cls.from_config(cfg).alphas_cumprod.double().clamp_min(2.0 ** -24)
        return DDPMSchedule(alphas_cumprod=ac), types[pred], None
    return DDPMSchedule.from_diffusers(scheduler), types[pred], None


def schedule_from_dict(d: dict[str, Any]) -> DDPMSchedule | FlowSchedule:
    """Inverse of ``schedule.to_dict()`` (stored in ``denoiser.json`` and a noise-aware LRM's metadata).

    Also reads the record noise-aware LRMs wrote before the schedules were shared (no ``type``; ``alphas_cumprod``).
    """
    d = dict(d)
    kind = d.pop("type", None)
    if kind is None and "alphas_cumprod" in d:
        kind, d["beta_schedule"] = "ddpm", "custom"
    if kind == "ddpm":
        if d.get("beta_schedule") == "custom":
            return DDPMSchedule(alphas_cumprod=d["alphas_cumprod"])
        d.pop("alphas_cumprod", None)  # a rounded copy of what the betas give
        return DDPMSchedule(**d)
    if kind == "flow":
        return FlowSchedule(**d)
    raise ValueError(f"unknown schedule type {kind!r}; expected 'ddpm' or 'flow'")


__all__ = ["BETA_SCHEDULES", "DDPMSchedule", "FlowSchedule", "broadcast", "schedule_from_dict",
           "schedule_from_scheduler_config"]
