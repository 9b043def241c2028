"""HunyuanVideo (``HunyuanVideoTransformer3DModel``): flow, LLaMA-style tokens + mask, CLIP-L pooled, guidance embed.

As ``HunyuanVideoPipeline`` calls it: latents (B, C, T, h, w); ``timestep = t`` (1000 s); ``encoder_attention_mask``
from the LLaMA tokenizer (256 tokens after the template's 95 are cropped); ``guidance = 1000 * guidance_scale``
(pipeline default 6.0).
"""

from __future__ import annotations

import torch

from distill.families import Family, register_family


@register_family("HunyuanVideoTransformer3DModel")
class HunyuanVideo(Family):
    name = "hunyuan_video"
    video = True
    needs_pooled = True
    use_text_mask = True
    default_guidance = 6.0

    def text_dim(self):
        return self.cfg("text_embed_dim")

    def call(self, model, x, t, tokens, mask, pooled, guidance, **kw):
        if mask is None:
            mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        if self.guidance_embedded:
            if guidance is None:
                raise ValueError("HunyuanVideo embeds guidance: pass guidance= (Denoiser.distilled_guidance)")
            guidance = guidance.to(x.dtype) * 1000.0
        else:
            guidance = None
        out = model(hidden_states=x.permute(0, 2, 1, 3, 4), timestep=t.to(x.dtype), encoder_hidden_states=tokens,
                    encoder_attention_mask=mask.to(x.dtype), pooled_projections=self.require_pooled(pooled, model),
                    guidance=guidance, **kw).sample
        return out.permute(0, 2, 1, 3, 4)
