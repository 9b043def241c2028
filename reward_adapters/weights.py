"""Finding and loading pretrained reward weights: local path, ``$LRM_CACHE_DIR``, or the Hugging Face hub.

Weights are loaded once per process (``cached``); a missing file raises ``WeightsNotFoundError``
naming the file, every place looked in, and how to provide it offline.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch

CACHE_ENV = "LRM_CACHE_DIR"
_MODELS: dict[tuple, Any] = {}


class WeightsNotFoundError(FileNotFoundError):
    pass


def cache_dir() -> Path | None:
    d = os.environ.get(CACHE_ENV)
    return Path(d).expanduser() if d else None


def resolve_weights(filename: str, *, path: str | os.PathLike | None = None, hub_repo: str | None = None,
                    subdir: str = "", url: str | None = None) -> Path:
    """Locate a weight file.

    Order: ``path`` (a file, or a directory holding ``filename``), ``$LRM_CACHE_DIR/<subdir>/<filename>``,
    then ``hf_hub_download(hub_repo, filename)`` (which honours ``HF_HUB_OFFLINE`` and the HF cache).
    """
    looked: list[str] = []
    if path is not None:
        p = Path(path).expanduser()
        cand = p / filename if p.is_dir() else p
        if cand.is_file():
            return cand
        looked.append(f"path={str(p)!r}")
    cd = cache_dir()
    if cd is not None:
        cand = cd / subdir / filename
        if cand.is_file():
            return cand
        looked.append(f"${CACHE_ENV}: {cand}")
    else:
        looked.append(f"${CACHE_ENV} (not set)")
    hub_err = None
    if hub_repo is not None:
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(hub_repo, filename))
        except Exception as e:  # offline, no network, gated repo, ...
            hub_err = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            looked.append(f"hub {hub_repo}/{filename} ({hub_err})")
    source = f"from the hub repo {hub_repo!r}" if hub_repo else (f"from {url}" if url else "")
    target = (cd or Path("$LRM_CACHE_DIR")) / subdir / filename
    raise WeightsNotFoundError(
        f"weights file {filename!r} not found. Looked in: {'; '.join(looked)}. "
        f"To use it offline, download it {source} on a machine with internet and either pass its path "
        f"(weights=...), or put it at {target} and set {CACHE_ENV}."
    )


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors, or from a .pt/.pth/.bin file (``weights_only``, no code runs).

    A checkpoint that wraps the state dict under "state_dict" (HPSv2) or "model" is unwrapped.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def cached(key: tuple, build: Callable[[], Any]) -> Any:
    """Build a model once per process per ``key`` (e.g. (kind, weights path, device, dtype))."""
    if key not in _MODELS:
        _MODELS[key] = build()
    return _MODELS[key]
