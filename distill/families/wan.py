"""Wan 2.1 / 2.2 (``WanTransformer3DModel``): flow, umT5 tokens, latents (B, C, T, h, w) in the model.

As ``WanPipeline`` calls it: ``timestep = t`` (1000 s), umT5 embeddings cut to each caption's length and zero-padded
to 512 (so padding is zeros, no mask is passed; a given mask zeroes the padding the same way). Wan 2.2 A14B's second
expert (``transformer_2`` below ``boundary_ratio``) is not wrapped: load it as its own Denoiser.
"""

from __future__ import annotations

from distill.families import Family, register_family


@register_family("WanTransformer3DModel")
class Wan(Family):
    name = "wan"
    video = True
    use_text_mask = True  # zero padding tokens, as the pipeline's umT5 encoding does

    def text_dim(self):
        return self.cfg("text_dim")

    def call(self, model, x, t, tokens, mask, pooled, guidance, **kw):
        if mask is not None:
            tokens = tokens * mask.unsqueeze(-1).to(tokens.dtype)
        out = model(hidden_states=x.permute(0, 2, 1, 3, 4), timestep=t, encoder_hidden_states=tokens,
                    **kw).sample  # (B, C, T, h, w)
        return out.permute(0, 2, 1, 3, 4)
