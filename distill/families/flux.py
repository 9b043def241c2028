"""FLUX.1 (``FluxTransformer2DModel``): 2x2-packed latents, img/txt position ids, CLIP-L pooled + T5 tokens.

As ``FluxPipeline`` calls it: latents ``(B, C, h, w)`` packed to ``(B, h/2 * w/2, 4C)``; ``timestep = t / 1000``
(the model multiplies by 1000); ``img_ids`` = (0, row, col) of each 2x2 patch, ``txt_ids`` = zeros; no text mask
(T5 padding attended, max_sequence_length 512 for dev, 256 for schnell); ``guidance`` = the guidance scale itself
for guidance-distilled dev (the model multiplies it by 1000), absent for schnell.
"""

from __future__ import annotations

import torch

from distill.families import Family, register_family


def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C), FluxPipeline._pack_latents' order."""
    B, C, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX packs 2x2 latent patches: h and w must be even, got {h}x{w} (use pixel sizes that "
                         "are multiples of 16)")
    x = x.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (h // 2) * (w // 2), C * 4)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of ``pack``: (B, h/2 * w/2, 4C) -> (B, C, h, w)."""
    B, _, D = x.shape
    x = x.view(B, h // 2, w // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, D // 4, h, w)


def image_ids(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(h/2 * w/2, 3) ids (0, row, col), FluxPipeline._prepare_latent_image_ids."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


@register_family("FluxTransformer2DModel")
class Flux(Family):
    name = "flux"
    needs_pooled = True
    default_guidance = 3.5  # FluxPipeline's guidance_scale default

    def text_dim(self):
        return self.cfg("joint_attention_dim")

    def latent_channels(self):
        return int(self.cfg("in_channels")) // 4  # 2x2 patches packed into channels

    def call(self, model, x, t, tokens, mask, pooled, guidance, **kw):
        B, C, h, w = x.shape
        if mask is not None:  # an explicit mask: zero the padding (the model has no text mask)
            tokens = tokens * mask.unsqueeze(-1).to(tokens.dtype)
        if self.guidance_embedded and guidance is None:
            raise ValueError("this FLUX model embeds guidance (dev): pass guidance= (Denoiser.distilled_guidance)")
        out = model(hidden_states=pack(x), encoder_hidden_states=tokens,
                    pooled_projections=self.require_pooled(pooled, model), timestep=t.to(x.dtype) / 1000,
                    img_ids=image_ids(h, w, x.device, x.dtype),
                    txt_ids=torch.zeros(tokens.shape[1], 3, device=x.device, dtype=x.dtype),
                    guidance=guidance if self.guidance_embedded else None, **kw).sample
        return unpack(out, h, w)
