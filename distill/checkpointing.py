"""Gradient (activation) checkpointing for every trained network (``gradient_checkpointing: true``).

diffusers' own switch where the model has one (``_supports_gradient_checkpointing``: UNet2D, the SD3 / FLUX / Wan /
CogVideoX / HunyuanVideo transformers); otherwise the model's top-level blocks (``BLOCK_ATTRS``: UNet3D's
``transformer_in``, ``down_blocks``, ``mid_block``, ``up_blocks``) each run under ``torch.utils.checkpoint``
(non-reentrant): their activations are recomputed in the backward pass instead of kept, as diffusers does per block.
Either way a ``checkpoint_fn(block, *args)`` may replace the plain checkpoint (``distill.lora.LoraBase`` passes one
that restores the forward's adapter when the backward recomputes a block).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import nn

BLOCK_ATTRS = ("transformer_in", "down_blocks", "mid_block", "up_blocks")


def _plain_checkpoint(block: Callable[..., Any], *args: Any) -> Any:
    return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)


def checkpointed_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks ``enable_gradient_checkpointing`` wraps when the model has no switch of its own."""
    blocks: list[nn.Module] = []
    for attr in BLOCK_ATTRS:
        m = getattr(model, attr, None)
        if isinstance(m, nn.ModuleList):
            blocks.extend(m)
        elif isinstance(m, nn.Module):
            blocks.append(m)
    return blocks


def enable_gradient_checkpointing(model: nn.Module, checkpoint_fn: Callable[..., Any] | None = None) -> str:
    """Switch checkpointing on for ``model``; returns how: ``"diffusers"`` or ``"blocks"`` (``BLOCK_ATTRS``).

    Raises ``ValueError`` for a network with neither (name the fix: ``gradient_checkpointing: false``)."""
    if getattr(model, "_supports_gradient_checkpointing", False):
        if checkpoint_fn is None:
            model.enable_gradient_checkpointing()
        else:
            model.enable_gradient_checkpointing(checkpoint_fn)
        return "diffusers"
    blocks = checkpointed_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no gradient checkpointing switch and none of the blocks "
                         f"{BLOCK_ATTRS}; set gradient_checkpointing: false")
    fn = checkpoint_fn or _plain_checkpoint
    for block in blocks:
        if getattr(block, "_lrm_checkpointed", False):
            continue
        block.forward = _checkpointed(block.forward, fn)
        block._lrm_checkpointed = True
    return "blocks"


def _checkpointed(forward: Callable[..., Any], fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # sampling, evaluation: nothing to save
            return forward(*args, **kwargs)
        return fn(functools.partial(forward, **kwargs), *args)  # keyword inputs ride in the closure
    return run


__all__ = ["BLOCK_ATTRS", "checkpointed_blocks", "enable_gradient_checkpointing"]
