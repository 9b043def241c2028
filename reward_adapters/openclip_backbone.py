"""Shared pieces of the open_clip-based rewards (HPSv2, LAION aesthetic, CLIP score)."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import torch
from torch import nn

from reward_adapters.base import Reward
from reward_adapters.weights import CACHE_ENV, WeightsNotFoundError, cached, open_clip_cache_dir

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def require_open_clip():
    try:
        import open_clip
    except ImportError as e:  # pragma: no cover - open_clip is a core dependency
        raise ImportError("this reward needs open_clip: pip install 'open_clip_torch>=3'") from e
    return open_clip


def create_open_clip(arch: str, pretrained: str | None, device: torch.device, state_dict_path=None,
                     strict_keys: bool = True) -> nn.Module:
    """An open_clip model built once per process: ``pretrained`` tag (or weights file), or random + a state dict.

    Tags download into ``$LRM_CACHE_DIR/open_clip`` when the variable is set (open_clip's ``cache_dir=``).
    """
    open_clip = require_open_clip()
    oc_cache = open_clip_cache_dir()

    def build():
        try:
            model = open_clip.create_model(arch, pretrained=pretrained, device="cpu", cache_dir=oc_cache)
        except Exception as e:  # unknown tag, offline hub, missing file: all end the same way
            where = (f"cache_dir={oc_cache} (${CACHE_ENV}/open_clip)" if oc_cache else
                     f"open_clip's default cache (${CACHE_ENV} not set)")
            fill = (f"open_clip.create_model('{arch}', pretrained='{pretrained}'"
                    + (f", cache_dir='{oc_cache}')" if oc_cache else ")"))
            raise WeightsNotFoundError(
                f"open_clip could not load {arch!r} with pretrained={pretrained!r}: {e}. Looked in: {where}. "
                f"Offline, run {fill} on a machine with internet and copy that cache directory here (or set "
                f"{CACHE_ENV} to a copy of it), or pass pretrained=<path to the .bin/.safetensors>."
            ) from e
        if state_dict_path is not None:
            from reward_adapters.weights import load_state_dict

            sd = load_state_dict(state_dict_path)
            missing, unexpected = model.load_state_dict(sd, strict=False)
            missing = [k for k in missing if k not in ("logit_bias",)]
            if strict_keys and missing:
                raise ValueError(f"{state_dict_path}: checkpoint does not fit open_clip {arch!r}; missing keys "
                                 f"{missing[:8]}{' ...' if len(missing) > 8 else ''}")
        return model.eval().requires_grad_(False).to(device)

    return cached(("open_clip", arch, pretrained, str(state_dict_path), str(device), oc_cache), build)


class TextCache:
    """Encodes each distinct prompt of a batch once (videos repeat prompts per frame, DDPO per sample)."""

    @staticmethod
    def encode(prompts: Sequence[str], encode_fn: Callable[[list[str]], torch.Tensor]) -> torch.Tensor:
        uniq = list(dict.fromkeys(prompts))
        feats = encode_fn(uniq)  # (U, D)
        index = torch.tensor([uniq.index(p) for p in prompts], device=feats.device)
        return feats[index]


class OpenCLIPReward(Reward):
    """Base for rewards on an open_clip model: holds model, tokenizer, preprocessing config, precision.

    Args:
        model: an open_clip CLIP model to use as is (tests inject tiny random ones).
        tokenizer: callable ``list[str] -> LongTensor (N, L)``; default ``open_clip.get_tokenizer(arch)``.
        precision: "fp32" (default), "bf16" or "fp16" (autocast on CUDA).
    """

    differentiable = True

    def __init__(self, model: nn.Module | None, arch: str, tokenizer: Callable | None = None,
                 precision: str = "fp32", **kw):
        super().__init__(**kw)
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r}; valid: {list(PRECISIONS)}")
        self.precision = precision
        self.arch = arch
        if model is not None:
            model = model.eval().requires_grad_(False).to(self.device)
        self.model = model
        self._tokenizer = tokenizer

    @property
    def tokenizer(self) -> Callable:
        if self._tokenizer is None:
            self._tokenizer = require_open_clip().get_tokenizer(self.arch, cache_dir=open_clip_cache_dir())
        return self._tokenizer

    @property
    def preprocess_cfg(self) -> dict[str, Any]:
        cfg = dict(getattr(self.model.visual, "preprocess_cfg", {}) or {})
        size = cfg.get("size", getattr(self.model.visual, "image_size", 224))
        cfg["size"] = int(size[0] if isinstance(size, (tuple, list)) else size)
        return cfg

    def autocast(self):
        dt = PRECISIONS[self.precision]
        if dt is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dt)

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed images (N, 3, S, S) -> L2-normalised features (N, D), float32."""
        with self.autocast():
            f = self.model.encode_image(x)
        return nn.functional.normalize(f.float(), dim=-1)

    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        def enc(texts: list[str]) -> torch.Tensor:
            tokens = self.tokenizer(texts).to(self.device)
            with torch.no_grad(), self.autocast():
                f = self.model.encode_text(tokens)
            return nn.functional.normalize(f.float(), dim=-1)

        return TextCache.encode(list(prompts), enc)
