"""Finding and loading pretrained reward weights: local path, ``$LRM_CACHE_DIR``, the Hugging Face hub or a URL.

``$LRM_CACHE_DIR`` reaches every loader: single files are looked for in ``$LRM_CACHE_DIR/<reward>/<file>``
(and URL downloads land there), Hugging Face repos (``hf_hub_download``, ``from_pretrained``) use
``$LRM_CACHE_DIR/hf`` as their hub cache, open_clip pretrained tags use ``$LRM_CACHE_DIR/open_clip``.
Unset, each library's own default cache is used (HF_HOME, TORCH_HOME).

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


def hub_cache_dir() -> str | None:
    """``cache_dir=`` for Hugging Face loaders: ``$LRM_CACHE_DIR/hf`` (None: the HF default, HF_HOME)."""
    cd = cache_dir()
    return str(cd / "hf") if cd is not None else None


def open_clip_cache_dir() -> str | None:
    """``cache_dir=`` for open_clip pretrained tags: ``$LRM_CACHE_DIR/open_clip`` (None: open_clip's default)."""
    cd = cache_dir()
    return str(cd / "open_clip") if cd is not None else None


def is_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set: no hub or URL downloads are attempted."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def torch_hub_checkpoints() -> Path:
    """Where URL downloads go when ``$LRM_CACHE_DIR`` is unset: torch.hub's checkpoint dir (TORCH_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_weights(filename: str, *, path: str | os.PathLike | None = None, hub_repo: str | None = None,
                    subdir: str = "", url: str | None = None, option: str = "weights") -> Path:
    """Locate a weight file, downloading it when allowed.

    Order: ``path`` (a file, or a directory holding ``filename``), ``$LRM_CACHE_DIR/<subdir>/<filename>``,
    then ``hf_hub_download(hub_repo, filename, cache_dir=$LRM_CACHE_DIR/hf)`` (honours ``HF_HUB_OFFLINE``),
    then ``url`` downloaded with ``torch.hub.download_url_to_file`` into ``$LRM_CACHE_DIR/<subdir>/`` (or
    torch.hub's checkpoint dir when the variable is unset; skipped offline). ``option`` is the keyword the
    caller takes a local path under (named in the error message).
    """
    looked: list[str] = []
    if path is not None:
        p = Path(path).expanduser()
        cand = p / filename if p.is_dir() else p
        if cand.is_file():
            return cand
        looked.append(f"{option}={str(p)!r}")
    cd = cache_dir()
    if cd is not None:
        cand = cd / subdir / filename
        if cand.is_file():
            return cand
        looked.append(f"${CACHE_ENV}: {cand}")
    else:
        looked.append(f"${CACHE_ENV} (not set)")
    if hub_repo is not None:
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(hub_repo, filename, cache_dir=hub_cache_dir()))
        except Exception as e:  # offline, no network, gated repo, ...
            where = f", cache_dir={hub_cache_dir()}" if hub_cache_dir() else ""
            looked.append(f"hub {hub_repo}/{filename}{where} ({_first_line(e)})")
    if url is not None:
        dest = (cd / subdir if cd is not None else torch_hub_checkpoints()) / filename
        if cd is None:  # the download target is a place to look in too
            if dest.is_file():
                return dest
            looked.append(f"torch hub dir: {dest}")
        if is_offline():
            looked.append(f"download of {url} skipped (HF_HUB_OFFLINE is set)")
        else:
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(url, str(dest), progress=False)  # temp file + move
                return dest
            except Exception as e:  # no network, 404, disk full
                looked.append(f"download {url} -> {dest} ({_first_line(e)})")
    source = f"from the hub repo {hub_repo!r}" if hub_repo else (f"from {url}" if url else "")
    target = (cd or Path("$LRM_CACHE_DIR")) / subdir / filename
    raise WeightsNotFoundError(
        f"weights file {filename!r} not found. Looked in: {'; '.join(looked)}. "
        f"To use it offline, download it {source} on a machine with internet and either pass its path "
        f"({option}=...), or put it at {target} and set {CACHE_ENV}."
    )


def load_from_hub(what: str, repo: str, loader: Callable, option: str, files: str = "") -> Any:
    """``loader(repo, cache_dir=$LRM_CACHE_DIR/hf)`` (the HF default cache when unset) for a hub id or a local
    directory; a failure (offline, missing files) raises ``WeightsNotFoundError`` naming ``what``, where it looked,
    the ``huggingface-cli download`` to run (of ``files`` only, when given) and the ``option`` for a local path."""
    hub_cache = hub_cache_dir()
    try:
        return loader(repo, cache_dir=hub_cache)
    except (OSError, ValueError) as e:
        where = f"{CACHE_ENV}/hf = {hub_cache}" if hub_cache else f"the HF cache (HF_HOME; {CACHE_ENV} not set)"
        dl = f"huggingface-cli download {repo}{' ' + files if files else ''}" + (
            f" --cache-dir {hub_cache}" if hub_cache else "")
        raise WeightsNotFoundError(
            f"could not load {what} from {repo!r} ({_first_line(e)}). Looked in: {where}. Offline, run `{dl}` on a "
            f"machine with internet and copy that cache over, or pass a local directory as {option}=..."
        ) from e


def check_tokenizer_vocab(tok: Any, repo: str, what: str) -> Any:
    """transformers 5 builds a tokenizer holding only its special tokens when the vocab file is missing
    (e.g. ``BertTokenizer.from_pretrained`` offline) instead of raising; refuse such a tokenizer."""
    size = getattr(tok, "vocab_size", None)
    if size is not None and size <= len(getattr(tok, "all_special_tokens", [])):
        raise OSError(f"{what} from {repo!r} has a vocabulary of {size} tokens (only the special tokens): its "
                      "vocab file was not found")
    return tok


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


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
