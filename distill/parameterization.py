"""What a network predicts, and exact conversions between the parameterisations.

With ``x_t = a_t x0 + b_t eps`` (see ``lrm.schedules``):

==============  ===========================  =============================================
kind            training target              x0 from the output ``o``
==============  ===========================  =============================================
``eps``         ``eps``                      ``(x_t - b o) / a``
``v``           ``a eps - b x0`` (Eq. 3)     ``(a x_t - b o) / (a^2 + b^2)``  (= ``a x_t - b o`` for DDPM)
``conjugate_v`` ``x0 - eps`` (DOLLAR Eq.13)  ``(x_t + b o) / (a + b)``        (DOLLAR Eq. 15)
``x0``          ``x0``                       ``o``
``flow``        ``eps - x0`` (z - x0)        ``(x_t - b o) / (a + b)``        (= ``x_t - s o`` for flow)
==============  ===========================  =============================================

Every conversion is affine in the output for fixed ``(x_t, t)``, so classifier-free guidance gives the
same result whether it is applied to the raw output, to eps or to x0 (see ``distill.denoiser``).
"""

from __future__ import annotations

import torch

from lrm.schedules import _as_timesteps, broadcast

PARAMETERIZATIONS = ("eps", "v", "conjugate_v", "x0", "flow")


def _check(kind: str) -> None:
    if kind not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization {kind!r}; choose one of {PARAMETERIZATIONS}")


def _ab(x: torch.Tensor, t, schedule) -> tuple[torch.Tensor, torch.Tensor]:
    t = _as_timesteps(t, x)
    return broadcast(schedule.a(t), x), broadcast(schedule.b(t), x)


def to_x0_eps(out: torch.Tensor, x_t: torch.Tensor, t, schedule, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x0, eps)`` implied by the network output ``out`` of parameterisation ``kind`` at ``(x_t, t)``."""
    _check(kind)
    if out.shape != x_t.shape:
        raise ValueError(f"model output {tuple(out.shape)} and x_t {tuple(x_t.shape)} must have the same shape")
    a, b = _ab(x_t, t, schedule)
    if kind == "eps":
        eps = out
        x0 = (x_t - b * eps) / a
    elif kind == "v":  # v = a eps - b x0
        n = a * a + b * b
        x0 = (a * x_t - b * out) / n
        eps = (b * x_t + a * out) / n
    elif kind == "conjugate_v":  # v = x0 - eps  (DOLLAR Eq. 13, 15)
        x0 = (x_t + b * out) / (a + b)
        eps = x0 - out
    elif kind == "x0":
        x0 = out
        eps = (x_t - a * x0) / b
    else:  # flow velocity u = eps - x0
        x0 = (x_t - b * out) / (a + b)
        eps = x0 + out
    return x0, eps


def to_x0(out: torch.Tensor, x_t: torch.Tensor, t, schedule, kind: str) -> torch.Tensor:
    """The clean-sample prediction implied by ``out``."""
    return to_x0_eps(out, x_t, t, schedule, kind)[0]


def to_eps(out: torch.Tensor, x_t: torch.Tensor, t, schedule, kind: str) -> torch.Tensor:
    """The noise prediction implied by ``out``."""
    return to_x0_eps(out, x_t, t, schedule, kind)[1]


def target(x0: torch.Tensor, eps: torch.Tensor, t, schedule, kind: str) -> torch.Tensor:
    """The regression target of parameterisation ``kind`` for data ``x0`` noised with ``eps`` at ``t``."""
    _check(kind)
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    if kind == "conjugate_v":
        return x0 - eps
    if kind == "flow":
        return eps - x0
    a, b = _ab(x0, t, schedule)
    return a * eps - b * x0


def convert(out: torch.Tensor, x_t: torch.Tensor, t, schedule, src_kind: str, dst_kind: str) -> torch.Tensor:
    """Re-express a ``src_kind`` output as the ``dst_kind`` output predicting the same ``(x0, eps)``."""
    _check(dst_kind)
    if src_kind == dst_kind:
        _check(src_kind)
        return out
    x0, eps = to_x0_eps(out, x_t, t, schedule, src_kind)
    return target(x0, eps, t, schedule, dst_kind)
