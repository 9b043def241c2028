"""SD3 / SD3.5 (``SD3Transformer2DModel``): flow, timestep = 1000 s as the pipeline passes it, pooled CLIP-L+G text.

Without ``pooled=`` the masked mean of the caption tokens is used when its width matches (our small-world default).
"""

from __future__ import annotations

import inspect

import torch

from distill.families import Family, register_family


@register_family("SD3Transformer2DModel")
class SD3(Family):
    name = "sd3"

    def call(self, model, x, t, tokens, mask, pooled, guidance, **kw):
        if pooled is None and "pooled_projections" not in kw and "pooled_projections" in inspect.signature(
                model.forward).parameters:
            pdim = self.cfg("pooled_projection_dim")
            m = torch.ones(tokens.shape[:2], device=tokens.device, dtype=tokens.dtype) if mask is None else mask.to(
                tokens.dtype)
            pooled = (tokens * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp_min(1)
            if pooled.shape[-1] != pdim:
                raise ValueError(f"{type(model).__name__} wants pooled_projections of width {pdim}; the masked token "
                                 f"mean has width {pooled.shape[-1]}. Pass pooled=...")
        if pooled is not None:
            kw["pooled_projections"] = pooled
        return model(hidden_states=x, encoder_hidden_states=tokens, timestep=t, **kw).sample
