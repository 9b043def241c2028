"""The trainer's data: captions, their text embeddings and (optionally) data latents, from a LatentCache or
encoded Shapes world samples. ``PromptPool`` is the same data with the prompt-first constructor of ``lrm
finetune``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


def takes_pooled(denoiser: Any) -> bool:
    """Whether ``denoiser``'s network takes a pooled text vector (``pooled_projections``: FLUX, SD3, HunyuanVideo)
    and the Denoiser has the null caption's pooled vector for its CFG branch."""
    if getattr(denoiser, "null_pooled", None) is None:
        return False
    return bool(denoiser.family.needs_pooled or "pooled_projections" in getattr(denoiser, "_accepts", ()))


@dataclass
class DistillData:
    """Captions with their text embeddings, and data latents (CD, the GAN's real samples, the concurrent LRM) or
    None: ``latents`` (N, C, h, w) / (N, T, C, h, w) or None, ``text_tokens`` (N, L, D), ``text_mask`` (N, L) bool,
    ``prompts`` (N strings), ``text_pooled`` (N, P) or None: the pooled text vector the network takes as
    ``pooled=`` (FLUX / SD3 / HunyuanVideo: the pipeline's CLIP pooled vector, from ``lrm.text.PipelineText``)."""

    latents: torch.Tensor | None
    text_tokens: torch.Tensor
    text_mask: torch.Tensor
    prompts: list[str]
    text_pooled: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n = len(self.prompts)
        if not (self.text_tokens.shape[0] == self.text_mask.shape[0] == n) or (
                self.latents is not None and self.latents.shape[0] != n):
            raise ValueError(f"{type(self).__name__} sizes differ: {n} prompts, text_tokens "
                             f"{self.text_tokens.shape[0]}, text_mask {self.text_mask.shape[0]}, latents "
                             f"{None if self.latents is None else self.latents.shape[0]}")
        if self.text_pooled is not None and (self.text_pooled.dim() != 2 or self.text_pooled.shape[0] != n):
            raise ValueError(f"text_pooled must be (N={n}, P), got {tuple(self.text_pooled.shape)}")
        if self.latents is not None and self.latents.dim() not in (4, 5):
            raise ValueError(f"latents must be (N, C, h, w) or (N, T, C, h, w), got {tuple(self.latents.shape)}")

    def __len__(self) -> int:
        return len(self.prompts)

    def to(self, device) -> "DistillData":
        return DistillData(None if self.latents is None else self.latents.to(device), self.text_tokens.to(device),
                           self.text_mask.to(device).bool(), list(self.prompts),
                           None if self.text_pooled is None else self.text_pooled.to(device))

    def batch(self, idx: torch.Tensor) -> "DistillData":
        idx_l = idx.tolist()
        idx = idx.to(self.text_tokens.device)
        return DistillData(None if self.latents is None else self.latents[idx], self.text_tokens[idx],
                           self.text_mask[idx], [self.prompts[i] for i in idx_l],
                           None if self.text_pooled is None else self.text_pooled[idx])

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor | None]:
        """``(text_tokens, text_mask, prompts, latents or None)`` of rows ``idx``."""
        b = self.batch(idx)
        return b.text_tokens, b.text_mask, b.prompts, b.latents

    @classmethod
    def from_cache(cls, directory: str | Path, device: str | torch.device = "cpu") -> "DistillData":
        """Data latents and text (tokens, mask, pooled vector) of a ``data_cache.LatentCache``."""
        from data_cache import LatentCache

        cache = LatentCache.open(directory)
        t = cache.tensors(device=device)
        return DistillData(t["latents"].float(), t["text_tokens"].float(), t["text_mask"].bool(), list(cache.prompts),
                           t["text_pooled"].float())

    @classmethod
    @torch.no_grad()
    def from_shapes(cls, n: int, vae: Any, text_encoder: Any, num_frames: int | None = None, seed: int = 0,
                    batch_size: int = 256, progress: bool = True) -> "DistillData":
        """Encode ``n`` Shapes world samples (images, or videos with ``num_frames``) with the VAE."""
        from tqdm.auto import tqdm

        from shapes import ShapesWorld

        world = ShapesWorld(num_frames=num_frames, seed=seed)
        lat, toks, masks, pooled, prompts = [], [], [], [], []
        for s in tqdm(range(0, n, batch_size), desc="encode data", disable=not progress):
            pixels, captions, _ = world.batch(list(range(s, min(n, s + batch_size))))
            lat.append(vae.encode(pixels.to(vae.device)).float().cpu())
            emb = text_encoder(list(captions))
            toks.append(emb.tokens.cpu())
            masks.append(emb.mask.cpu())
            pooled.append(emb.pooled.cpu())
            prompts += list(captions)
        return DistillData(torch.cat(lat), torch.cat(toks), torch.cat(masks), prompts, torch.cat(pooled))


class PromptPool(DistillData):
    """``DistillData`` built prompt-first: ``PromptPool(text_tokens, text_mask, prompts, latents=None,
    text_pooled=None)``."""

    def __init__(self, text_tokens: torch.Tensor, text_mask: torch.Tensor, prompts: list[str],
                 latents: torch.Tensor | None = None, text_pooled: torch.Tensor | None = None):
        super().__init__(latents, text_tokens, text_mask.bool(), list(prompts), text_pooled)

    @classmethod
    def from_distill_data(cls, data: DistillData) -> "PromptPool":
        return cls(data.text_tokens, data.text_mask, data.prompts, data.latents, data.text_pooled)


__all__ = ["DistillData", "PromptPool", "takes_pooled"]
