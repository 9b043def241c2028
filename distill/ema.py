"""Exponential moving averages of parameters (the CD target network theta^- and optional student EMA)."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, decay: float) -> None:
    """``target <- decay * target + (1 - decay) * source`` for parameters; buffers are copied.

    ``decay = 0`` copies ``source``; ``decay = 1`` leaves ``target`` unchanged.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
    tp, sp = dict(target.named_parameters()), dict(source.named_parameters())
    if tp.keys() != sp.keys():
        missing = sorted(set(sp) ^ set(tp))[:5]
        raise ValueError(f"EMA target and source have different parameters (e.g. {missing}); build the target "
                         "as a deep copy of the source")
    for name, p in sp.items():
        tp[name].lerp_(p.detach().to(tp[name].dtype), 1.0 - decay)
    tb = dict(target.named_buffers())
    for name, b in source.named_buffers():
        if name in tb:
            tb[name].copy_(b)


class EMA(nn.Module):
    """A frozen deep copy of ``model`` updated by ``update(model)`` with ``decay``.

    LCM's target network theta^- is ``EMA(student, decay=0.95)``; ``EMA(..., 0.999)`` is the usual eval EMA.
    ``shadow``: a network to use as the copy instead of a deep copy (LoRA: a Denoiser over the "ema" adapter of the
    student's base, whose parameters are the EMA adapter's only; it must start equal to ``model``).
    """

    def __init__(self, model: nn.Module, decay: float, shadow: nn.Module | None = None):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.shadow = (copy.deepcopy(model) if shadow is None else shadow).requires_grad_(False).eval()

    def update(self, model: nn.Module) -> None:
        ema_update(self.shadow, model, self.decay)

    def forward(self, *args, **kwargs):
        return self.shadow(*args, **kwargs)
