"""Non-finite guard of the trainers: a step whose reward batch, loss or gradient norm is not finite is skipped
(logged, never applied to the weights or optimizer state); ``limit`` skips in a row stop the run with an error that
names the last checkpoint, which was written from finite weights."""

from __future__ import annotations

import math
from typing import Any

import torch


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps: the run stops instead of training on garbage."""


class NonFiniteGuard:
    def __init__(self, limit: int, logger: Any, where: str = "run"):
        self.limit, self.logger, self.where = int(limit), logger, where
        self.skipped = 0  # over the run (this process)
        self._in_a_row: dict[str, int] = {}  # per network / update kind

    def check(self, value: float | torch.Tensor, what: str, step: int, key: str = "generator") -> bool:
        """True if ``value`` (a number or a tensor) is finite; else counts, logs and returns False (skip the step).
        Raises ``NonFiniteError`` after more than ``limit`` skips in a row of the same ``key``."""
        finite = bool(torch.isfinite(value).all()) if isinstance(value, torch.Tensor) else math.isfinite(value)
        if finite:
            self._in_a_row[key] = 0
            return True
        self.skipped += 1
        n = self._in_a_row[key] = self._in_a_row.get(key, 0) + 1
        self.logger.warning("step %d: non-finite %s, update skipped (%d in a row, %d in this run)", step, what, n,
                            self.skipped)
        if n > self.limit:
            raise NonFiniteError(
                f"{self.where}: {n} steps in a row had a non-finite {what} (limit max_nonfinite_steps="
                f"{self.limit}); stopped without applying them. The last checkpoint holds finite weights: check the "
                "reward / inputs for NaN, lower the learning rate, then resume")
        return False


__all__ = ["NonFiniteGuard", "NonFiniteError"]
