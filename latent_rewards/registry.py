"""The LRM head registry (timm style): ``@register_lrm(name)``, ``create_lrm(name, **overrides)``, ``list_lrms()``."""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable

import torch
import torch.nn as nn

from lrm.config import ConfigError
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
        raise ConfigError(f"ensemble must be >= 1 (number of members), got {ensemble}")
    if ensemble_reduce not in ENSEMBLE_REDUCTIONS:
        raise ConfigError(f"ensemble_reduce must be one of {ENSEMBLE_REDUCTIONS}, got {ensemble_reduce!r}")
    try:
        if ensemble == 1:
            model = LRMS.create(name, **overrides)
        else:
            from latent_rewards.heads.base import EnsembleLRM

            model = EnsembleLRM([LRMS.create(name, **overrides) for _ in range(ensemble)], reduce=ensemble_reduce,
                                lam=ensemble_lambda)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        valid = head_options(name)
        bad = [k for k in overrides if k not in valid] or [str(e)]
        close = [m for k in bad for m in difflib.get_close_matches(k, valid, 1)]
        raise ConfigError(f"head {name!r} has no option {', '.join(map(repr, bad))}"
                          + (f" (did you mean {', '.join(map(repr, close))}?)" if close else "")
                          + f"; its options: {', '.join(valid)}") from None
    except ValueError as e:  # a bad option value (patch 0, video='x', text_dim for an image head, ...)
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"head {name!r}: {e}") from None
    model.lrm_config = {"name": name, "kwargs": dict(overrides), "ensemble": ensemble,
                        "ensemble_reduce": ensemble_reduce, "ensemble_lambda": float(ensemble_lambda)}
    return model


def head_options(name: str) -> list[str]:
    """The constructor options (``create_lrm`` overrides) head ``name`` takes: the keyword parameters of its class
    and of the classes it extends (the class is found by building the default head on the meta device: no memory,
    no random numbers drawn)."""
    _load_heads()
    with torch.device("meta"):
        cls = type(LRMS.create(name))
    names: list[str] = []
    for c in cls.__mro__:
        if c is nn.Module or not (isinstance(c, type) and issubclass(c, nn.Module)):
            continue
        for p in inspect.signature(c.__init__).parameters.values():
            if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in names:
                names.append(p.name)
    return names


def create_lrm_from_config(config: dict) -> nn.Module:
    """Inverse of ``model.lrm_config``."""
    return create_lrm(config["name"], ensemble=config.get("ensemble", 1),
                      ensemble_reduce=config.get("ensemble_reduce", "mean"),
                      ensemble_lambda=config.get("ensemble_lambda", 1.0), **config.get("kwargs", {}))


def _load_heads() -> None:
    import latent_rewards.heads  # noqa: F401  (registers every family)
