"""Training data for an LRM: latents (+ text embeddings) and one reward, from a latent cache or in-memory tensors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class LatentData:
    """In-memory LRM training data (CPU or GPU tensors).

    latents: (N, C, h, w) or (N, T, C, h, w); target: (N,) reward in its original units.
    text_tokens (N, L, D), text_mask (N, L) bool, text_pooled (N, D): for text-conditioned rewards.
    prompts: N strings (used to split by prompt). latent_space / text_encoder: identity dicts recorded into the LRM.
    """

    latents: torch.Tensor
    target: torch.Tensor
    text_tokens: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None
    text_pooled: torch.Tensor | None = None
    prompts: list[str] | None = None
    reward_name: str = "reward"
    reward_info: dict[str, Any] = field(default_factory=dict)
    latent_space: dict[str, Any] | None = None
    text_encoder: dict[str, Any] | None = None
    source: str = "tensors"

    def __post_init__(self):
        n = self.latents.shape[0]
        if self.latents.dim() not in (4, 5):
            raise ValueError(f"latents must be (N, C, h, w) or (N, T, C, h, w), got {tuple(self.latents.shape)}")
        self.target = torch.as_tensor(self.target, dtype=torch.float32).reshape(-1)
        if self.target.shape[0] != n:
            raise ValueError(f"target has {self.target.shape[0]} values for {n} latents")
        for name in ("text_tokens", "text_mask", "text_pooled"):
            v = getattr(self, name)
            if v is not None and v.shape[0] != n:
                raise ValueError(f"{name} has {v.shape[0]} rows for {n} latents")
        if self.text_tokens is not None and self.text_mask is None:
            self.text_mask = torch.ones(self.text_tokens.shape[:2], dtype=torch.bool)
        if self.text_tokens is not None and self.text_pooled is None:
            m = self.text_mask.unsqueeze(-1).float()
            self.text_pooled = (self.text_tokens.float() * m).sum(1) / m.sum(1).clamp_min(1)
        if self.prompts is not None and len(self.prompts) != n:
            raise ValueError(f"got {len(self.prompts)} prompts for {n} latents")

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def has_text(self) -> bool:
        return self.text_tokens is not None

    def subset(self, idx) -> "LatentData":
        idx_t = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        pick = lambda v: None if v is None else v[idx_t.to(v.device)]
        return LatentData(
            latents=pick(self.latents), target=pick(self.target), text_tokens=pick(self.text_tokens),
            text_mask=pick(self.text_mask), text_pooled=pick(self.text_pooled),
            prompts=None if self.prompts is None else [self.prompts[i] for i in np.asarray(idx)],
            reward_name=self.reward_name, reward_info=self.reward_info, latent_space=self.latent_space,
            text_encoder=self.text_encoder, source=self.source)

    def to(self, device) -> "LatentData":
        mv = lambda v: None if v is None else v.to(device)
        return LatentData(mv(self.latents), mv(self.target), mv(self.text_tokens), mv(self.text_mask),
                          mv(self.text_pooled), self.prompts, self.reward_name, self.reward_info, self.latent_space,
                          self.text_encoder, self.source)

    def summary(self) -> dict[str, Any]:
        y = self.target[torch.isfinite(self.target)].float()
        return {"source": self.source, "num_samples": len(self), "latent_shape": list(self.latents.shape[1:]),
                "text_length": None if self.text_tokens is None else int(self.text_tokens.shape[1]),
                "num_prompts": None if self.prompts is None else len(set(self.prompts)),
                "target_mean": float(y.mean()), "target_std": float(y.std()),
                "target_min": float(y.min()), "target_max": float(y.max())}

    @classmethod
    def from_cache(cls, cache: Any, reward_name: str, device: str | torch.device = "cpu",
                   drop_missing: bool = True) -> "LatentData":
        """Read ``reward/<reward_name>`` and the latents/text of a ``data_cache.LatentCache`` (or its directory)."""
        if isinstance(cache, (str, bytes)) or hasattr(cache, "__fspath__"):
            from data_cache import LatentCache

            cache = LatentCache.open(cache)
        names = list(cache.reward_names)
        if reward_name not in names:
            from lrm.registry import UnknownNameError

            raise UnknownNameError(f"reward {reward_name!r} is not in the cache; it holds {names}. "
                                   "Add it to the cache (data_cache) or pick one of those.")
        t = cache.tensors(device=device)
        y = t[f"reward/{reward_name}"]
        info = dict(cache.manifest.get("rewards", {}).get(reward_name, {}))
        modality = info.get("modality", "image")
        text = modality.startswith("text")
        data = cls(latents=t["latents"], target=y,
                   text_tokens=t.get("text_tokens") if text else None, text_mask=t.get("text_mask") if text else None,
                   text_pooled=t.get("text_pooled") if text else None, prompts=list(cache.prompts),
                   reward_name=reward_name, reward_info=info, latent_space=cache.latent_space.to_dict(),
                   text_encoder=cache.manifest.get("text_encoder") if text else None,
                   source=f"cache:{getattr(cache, 'root', getattr(cache, 'path', '?'))}")
        if drop_missing:
            keep = torch.isfinite(y).cpu().numpy().nonzero()[0]
            if len(keep) < len(data):
                data = data.subset(keep)
        data._cache = cache  # noqa: SLF001 (split_by_prompt of the cache is used when the rows were not dropped)
        return data


def split_by_prompt(prompts: list[str] | None, n: int, val_fraction: float = 0.1,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Train/val indices with no prompt in both (random rows when there are no prompts)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    if prompts is None:
        perm = rng.permutation(n)
        k = max(1, int(round(n * val_fraction)))
        return np.sort(perm[k:]), np.sort(perm[:k])
    from collections import Counter

    counts = Counter(prompts)
    uniq = sorted(counts)
    if len(uniq) < 2:
        raise ValueError("all samples share one prompt: a split by prompt is impossible; pass prompts=None")
    is_val, taken = set(), 0
    for j in rng.permutation(len(uniq)):  # whole prompts go to val until it holds val_fraction of the rows
        if taken >= n * val_fraction or len(is_val) == len(uniq) - 1:
            break
        is_val.add(uniq[j])
        taken += counts[uniq[j]]
    val_mask = np.fromiter((p in is_val for p in prompts), dtype=bool, count=n)
    return np.nonzero(~val_mask)[0], np.nonzero(val_mask)[0]
