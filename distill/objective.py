"""The one interface every objective term of ``GeneratorTrainer`` (``distill/generator.py``) implements.

A term is one algorithm's contribution to the student's update, in the file named after it (``vsd.py``, ``cd.py``,
``tdm.py``, ``gan.py``, ``lrm_ft.py``, ``direct.py``, ``reward.py``, ``ddpo.py``, ``kl.py``). Per generator step:

1. ``prepare(ctx)`` (no grad): draw what the term needs before the one graded student call (CD asks for its own
   student inputs with ``ctx.query``; every term with ``needs_x_hat`` shares the backward-simulated x_hat).
2. ``generator_loss(ctx) -> (loss or None, logs)``: added to the student's loss as ``weight * loss``.
3. ``after_generator_step(trainer)``: after the student's optimizer step (CD: the EMA target).
4. ``update(trainer) -> logs``: the term's own networks (fake score, discriminator, concurrent LRM).
A ``driver`` term (DDPO) replaces steps 1-2 with its own sampling and optimizer steps (``run(trainer)``).
Checkpoints hold ``modules()``, ``optimizers()`` and ``state_dict()``; ``sharded()`` lists networks FSDP shards.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn


class StepContext:
    """One micro-batch of a generator step: the batch (``DistillData``: latents or None, text, prompts), the
    graded state ``(x_k, t_k)`` and the student's x0 there, ``x_hat`` (with its graph), the extra student
    outputs terms asked for (``outputs[name]``), and ``extras`` terms leave for their own update."""

    def __init__(self, trainer: Any, batch: Any):
        self.trainer, self.batch = trainer, batch
        self.tok, self.mask = batch.text_tokens, batch.text_mask
        self.x_k = self.t_k = self.x_hat = None
        self.queries: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.extras: dict[str, Any] = {}
        self.kl_point: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (x_t, t, x0) of the KL term
        self._null = None

    def query(self, name: str, x_t: torch.Tensor, t: torch.Tensor) -> None:
        """Ask for the student's x0 at ``(x_t, t)`` in the step's one graded call (``outputs[name]``)."""
        self.queries[name] = (x_t, t)

    def release(self) -> "StepContext":
        """After the backward: keep the detached x_hat (the terms' updates reuse it), drop every graph."""
        self.x_hat = None if self.x_hat is None else self.x_hat.detach()
        self.queries, self.outputs, self.kl_point = {}, {}, None
        return self

    def null_text(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's null caption for this batch's size and length."""
        if self._null is None:
            self._null = self.trainer.teacher.null_text(*self.tok.shape[:2])
        return self._null


class ObjectiveTerm:
    """Base class: a term with a ``name`` (log column ``loss_<name>``) and a ``weight`` in the student's loss."""

    name: str = "term"
    needs_x_hat: bool = False  # uses the backward-simulated student sample x_hat
    needs_teacher: bool = False
    driver: bool = False  # owns the whole student update (``run``)
    single_process: bool = False  # not wired for DDP / FSDP

    def __init__(self, weight: float = 1.0):
        self.weight = float(weight)

    def setup(self, trainer: Any) -> None:
        """Build the term's networks (before FSDP sharding and optimizers)."""

    def setup_optimizers(self, trainer: Any) -> None:
        """Optimizers and DDP wrappers of the term's networks (after sharding)."""

    def prepare(self, ctx: StepContext) -> None:
        pass

    def generator_loss(self, ctx: StepContext) -> tuple[torch.Tensor | None, dict[str, Any]]:
        return None, {}

    def after_generator_step(self, trainer: Any) -> None:
        pass

    def update(self, trainer: Any) -> dict[str, Any]:
        return {}

    def run(self, trainer: Any) -> dict[str, Any]:
        """The whole student update of a driver term (``driver = True``: DDPO's sampling + PPO steps); the trainer
        calls it only on its driver, so reaching this base version is a wiring error."""
        raise TypeError(f"{type(self).__name__}.run was called but the term is not a driver (driver = False); the "
                        "trainer runs generator_step() for non-driver terms")

    def set_lr(self, scale: float) -> None:
        """Warm-up: scale the term's optimizers' learning rates."""

    def modules(self) -> dict[str, nn.Module]:
        return {}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {}

    def sharded(self) -> dict[str, nn.Module]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def fingerprint(self) -> str | None:
        """A fingerprint of a frozen input the term brings (a pretrained LRM), checked on resume."""
        return None

    def close(self) -> None:
        pass


__all__ = ["ObjectiveTerm", "StepContext"]
