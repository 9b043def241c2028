"""The LRM head registry (timm style): ``@register_lrm(name)``, ``create_lrm(name, **overrides)``, ``list_lrms()``."""

from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn

from lrm.registry import Registry

LRMS: Registry[nn.Module] = Registry("LRM")

ENSEMBLE_REDUCTIONS = ("mean", "std", "lcb")


def register_lrm(name: str, *, help: str | None = None) -> Callable:
    """Register a head factory under ``name``; the factory takes keyword overrides and returns an ``nn.Module``."""
    return LRMS.register(name, help=help)


def list_lrms(pattern: str = "*") -> list[str]:
    _load_heads()
    return LRMS.list(pattern)


def describe_lrm(name: str) -> str:
    _load_heads()
    return LRMS.describe(name)


def create_lrm(name: str, ensemble: int = 1, ensemble_reduce: str = "mean", ensemble_lambda: float = 1.0,
               **overrides: Any) -> nn.Module:
    """Build the head ``name`` with constructor ``overrides`` (``in_channels``, ``width``, ``depth``, ``text_dim``,
    ``patch``, ``timestep_cond``, ...).

    ``ensemble=K > 1`` builds K independently initialised members; the output is their ``ensemble_reduce``:
    ``"mean"``, ``"std"`` or ``"lcb"`` (mean - ``ensemble_lambda`` * std, a conservative reward).
    The returned module carries ``lrm_config`` (a JSON-able dict) so ``save_pretrained`` can rebuild it.
    """
    _load_heads()
    if ensemble < 1:
        raise ValueError(f"ensemble must be >= 1 (number of members), got {ensemble}")
    if ensemble_reduce not in ENSEMBLE_REDUCTIONS:
        raise ValueError(f"ensemble_reduce must be one of {ENSEMBLE_REDUCTIONS}, got {ensemble_reduce!r}")
    if ensemble == 1:
        model = LRMS.create(name, **overrides)
    else:
        from latent_rewards.heads.base import EnsembleLRM

        model = EnsembleLRM([LRMS.create(name, **overrides) for _ in range(ensemble)], reduce=ensemble_reduce,
                            lam=ensemble_lambda)
    model.lrm_config = {"name": name, "kwargs": dict(overrides), "ensemble": ensemble,
                        "ensemble_reduce": ensemble_reduce, "ensemble_lambda": float(ensemble_lambda)}
    return model


def create_lrm_from_config(config: dict) -> nn.Module:
    """Inverse of ``model.lrm_config``."""
    return create_lrm(config["name"], ensemble=config.get("ensemble", 1),
                      ensemble_reduce=config.get("ensemble_reduce", "mean"),
                      ensemble_lambda=config.get("ensemble_lambda", 1.0), **config.get("kwargs", {}))


def _load_heads() -> None:
    import latent_rewards.heads  # noqa: F401  (registers every family)
