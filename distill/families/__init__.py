"""Per-family adapters: how ``Denoiser`` calls each diffusers network the way its pipeline does.

A family converts our latents (``(B, C, h, w)`` images, ``(B, T, C, h, w)`` videos) to the model's layout, scales our
timesteps (integers in ``[0, T)`` for DDPM, ``1000 s`` for flow) as the pipeline does, adds the extra conditioning
(pooled text, rotary / position ids, guidance embedding) and returns the raw output in our layout.
Registry keyed by the diffusers model class name: ``register_family("FluxTransformer2DModel")``,
``family_for(model)``, ``list_families()``. (timm-style registry)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable

import torch
from torch import nn

_FAMILIES: dict[str, type["Family"]] = {}


class Family(ABC):
    """Base adapter. Subclasses set the class attributes and implement ``call``."""

    name = "base"
    video = False  # our latents are (B, T, C, h, w)
    needs_pooled = False  # the model takes ``pooled_projections`` (a pooled text vector)
    use_text_mask = False  # default of ``Denoiser.use_text_mask`` (as the family's pipeline calls it)
    default_guidance: float | None = None  # pipeline default of the embedded guidance (guidance-distilled models)

    def __init__(self, model: nn.Module):
        self.config = getattr(model, "config", None)

    def cfg(self, key: str, default: Any = None) -> Any:
        return getattr(self.config, key, default)

    def text_dim(self) -> int | None:
        """Width of the caption tokens the network takes."""
        return self.cfg("cross_attention_dim") or self.cfg("joint_attention_dim")

    def latent_channels(self) -> int | None:
        """Channels of the VAE latents the network takes (before any packing the family does)."""
        c = self.cfg("in_channels")
        return None if c is None else int(c)

    def pooled_dim(self) -> int | None:
        return self.cfg("pooled_projection_dim") if self.needs_pooled else None

    @property
    def guidance_embedded(self) -> bool:
        """The network takes a ``guidance`` value (guidance distillation: one pass instead of CFG's two)."""
        return bool(self.cfg("guidance_embeds", False))

    @abstractmethod
    def call(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor,
             mask: torch.Tensor | None, pooled: torch.Tensor | None, guidance: torch.Tensor | None,
             **kw: Any) -> torch.Tensor:
        """The network's output for our latents ``x`` at ``t``, prepared as the family's pipeline prepares them."""

    def require_pooled(self, pooled: torch.Tensor | None, model: nn.Module) -> torch.Tensor:
        if pooled is None:
            raise ValueError(f"{type(model).__name__} needs pooled text (pooled_projections of width "
                             f"{self.pooled_dim()}): pass pooled=... (lrm.text.PipelineText gives it)")
        return pooled


def register_family(*class_names: str) -> Callable[[type[Family]], type[Family]]:
    def deco(cls: type[Family]) -> type[Family]:
        for n in class_names:
            _FAMILIES[n] = cls
        return cls
    return deco


def list_families() -> list[str]:
    _load()
    return sorted(_FAMILIES)


def family_for(model: nn.Module | str, strict: bool = False) -> Family:
    """The adapter for ``model`` (an instance, or a class name: then without its config).

    An unregistered class (a home-made network with a diffusers-style call) gets the UNet3D adapter if its name says
    ``3D``, the SD3-style ``hidden_states=`` call if it says ``Transformer``, else the UNet2D call; ``strict=True``
    raises instead, listing the registered classes.
    """
    _load()
    name = model if isinstance(model, str) else type(model).__name__
    if name not in _FAMILIES:
        if strict:
            raise ValueError(f"no Denoiser family for {name!r}; supported: {sorted(_FAMILIES)}")
        name = ("UNet3DConditionModel" if "3D" in name else "SD3Transformer2DModel" if "Transformer" in name
                else "UNet2DConditionModel")
    return _FAMILIES[name](None if isinstance(model, str) else model)


def _load() -> None:
    from distill.families import cogvideox, flux, hunyuan_video, sd3, unet, wan  # noqa: F401  (registration)


__all__ = ["Family", "family_for", "list_families", "register_family"]
