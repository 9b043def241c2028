"""Run directories: config snapshot, log file, and helpers shared by every long-running command."""

from __future__ import annotations

import logging
import os
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lrm.config import save_config


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def get_logger(name: str = "lrm") -> logging.Logger:
    logger = logging.getLogger(name)
    if not logger.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(h)
        logger.setLevel(os.environ.get("LRM_LOG_LEVEL", "INFO"))
        logger.propagate = False
    return logger


def prepare_run_dir(run_dir: str | Path, config: Any | None = None, logger_name: str = "lrm") -> Path:
    """Create ``run_dir``, save ``config.yaml`` and add a ``log.txt`` handler to the logger."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if config is not None:
        save_config(config, run_dir / "config.yaml")
    logger = get_logger(logger_name)
    log_path = str((run_dir / "log.txt").resolve())
    if not any(getattr(h, "baseFilename", None) == log_path for h in logger.handlers):
        fh = logging.FileHandler(log_path)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(fh)
    return run_dir


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} was asked for but CUDA is not available; use --device cpu or auto.")
    return dev
