"""Run directories: config snapshot, log file, and helpers shared by every long-running command."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from lrm.config import ConfigError, config_to_dict, save_config


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


def resolve_device(device: str = "auto", check_available: bool = True) -> torch.device:
    """``auto`` (CUDA when available, else CPU) or a device string: ``cpu``, ``cuda``, ``cuda:N``, ``mps``.

    Anything else, or (``check_available``) a device this machine does not have, is a ``ConfigError`` that lists
    the valid forms. ``check_available=False`` checks the form only (validating a config written for another
    machine)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps", "xpu"):
        hint = " (did you mean cuda?)" if str(device).lower().startswith("gpu") else ""
        raise ConfigError(f"device={device!r} is not a device{hint}; use one of auto, cpu, cuda, cuda:N (N = GPU "
                          "index), mps")
    if not check_available:
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={device!r} was asked for but CUDA is not available; use --device cpu or auto")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ConfigError(f"device={device!r}: this machine has {n} CUDA device(s), cuda:0 .. cuda:{n - 1}")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={device!r} was asked for but MPS is not available; use --device cpu or auto")
    if dev.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise ConfigError(f"device={device!r} was asked for but no XPU is available; use --device cpu or auto")
    return dev


# ---- resume identity: the config and a fingerprint of the inputs, compared before a run continues ------------------
RUN_RECORD = "run.json"


def fingerprint(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """A cheap content fingerprint of tensors (names, shapes, float64 sums and sums of squares), computed where they
    live: changed weights or data change it (not a cryptographic hash)."""
    h = hashlib.sha256()
    for name, t in named_tensors:
        t = t.detach()
        x = t.double() if t.is_floating_point() else t.long().double()
        h.update(f"{name}|{tuple(t.shape)}|{float(x.sum()):.10e}|{float((x * x).sum()):.10e};".encode())
    return h.hexdigest()[:16]


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


def check_resume(run_dir: str | Path, config: Any, inputs: dict[str, Any], mutable: Iterable[str]) -> None:
    """Refuse to resume ``run_dir`` with another configuration (keys outside ``mutable``) or other inputs
    (``inputs``: fingerprints of the teacher, VAE, data, ...) than the run recorded in ``run.json``; the message lists
    the differing keys and the fix. Writes nothing. A run directory without a record (older runs) is accepted."""
    path = Path(run_dir) / RUN_RECORD
    if not path.is_file():
        return
    rec = json.loads(path.read_text())
    now = {"config": _jsonable(config_to_dict(config)), "inputs": _jsonable(inputs)}
    mutable = set(mutable)
    diffs = []
    for part in ("config", "inputs"):
        old, new = rec.get(part, {}), now[part]
        for k in sorted(set(old) | set(new)):
            if (part == "inputs" or k not in mutable) and old.get(k) != new.get(k):
                diffs.append(f"{'' if part == 'config' else 'input '}{k}: {old.get(k)!r} -> {new.get(k)!r}")
    if diffs:
        shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
        raise ConfigError(f"{run_dir} holds a checkpoint of a different run ({shown}). Resume continues the same run "
                          "only: repeat its settings, pick a new run_dir, or pass --overwrite true to start over in "
                          "this one")


def record_run(run_dir: str | Path, config: Any, inputs: dict[str, Any]) -> None:
    """Write ``run.json`` (config + input fingerprints) that ``check_resume`` compares against."""
    path = Path(run_dir) / RUN_RECORD
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"config": _jsonable(config_to_dict(config)), "inputs": _jsonable(inputs)}, indent=1))
    os.replace(tmp, path)


def clear_checkpoints(run_dir: str | Path, checkpoint_dir: str | Path) -> None:
    """``--overwrite true``: remove a run's checkpoint (and its interrupted-save siblings) and its record, so the run
    starts over; other files are overwritten as the new run writes them."""
    ck = Path(checkpoint_dir)
    for p in (ck, ck.with_name(ck.name + ".old"), ck.with_name(ck.name + ".tmp")):
        if p.is_dir():
            shutil.rmtree(p)
    (Path(run_dir) / RUN_RECORD).unlink(missing_ok=True)
