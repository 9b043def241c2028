"""CogVideoX (``CogVideoXTransformer3DModel``): v-prediction DDPM, T5 tokens (226), latents (B, T, C, h, w) as ours.

As ``CogVideoXPipeline`` calls it: integer ``timestep = t``; no text mask (T5 padding attended); 3-D rotary embeddings
when ``use_rotary_positional_embeddings`` (5B, 1.5), built from the latent grid like
``CogVideoXPipeline._prepare_rotary_positional_embeddings``. The dynamic-CFG schedule is a sampler choice, not here.
"""

from __future__ import annotations

import torch

from distill.families import Family, register_family


def rotary_embeddings(config, T: int, h: int, w: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) for a latent clip of T frames and h x w latents (pipeline's rule, from latent sizes)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    p, p_t = config.patch_size, config.patch_size_t
    gh, gw = h // p, w // p
    base_w, base_h = config.sample_width // p, config.sample_height // p
    if p_t is None:  # CogVideoX 1.0
        crops = get_resize_crop_region_for_grid((gh, gw), base_w, base_h)
        return get_3d_rotary_pos_embed(embed_dim=config.attention_head_dim, crops_coords=crops, grid_size=(gh, gw),
                                       temporal_size=T, device=device)
    return get_3d_rotary_pos_embed(embed_dim=config.attention_head_dim, crops_coords=None, grid_size=(gh, gw),
                                   temporal_size=(T + p_t - 1) // p_t, grid_type="slice", max_size=(base_h, base_w),
                                   device=device)


@register_family("CogVideoXTransformer3DModel")
class CogVideoX(Family):
    name = "cogvideox"
    video = True

    def text_dim(self):
        return self.cfg("text_embed_dim")

    def call(self, model, x, t, tokens, mask, pooled, guidance, **kw):
        if mask is not None:
            tokens = tokens * mask.unsqueeze(-1).to(tokens.dtype)
        B, T, C, h, w = x.shape
        p_t = self.cfg("patch_size_t")
        if p_t and T % p_t:
            raise ValueError(f"CogVideoX 1.5 patches {p_t} latent frames together: T={T} latent frames must be a "
                             f"multiple of {p_t} (the pipeline pads the clip; use {T + p_t - T % p_t})")
        if self.cfg("use_rotary_positional_embeddings") and "image_rotary_emb" not in kw:
            kw["image_rotary_emb"] = rotary_embeddings(self.config, T, h, w, x.device)
        return model(hidden_states=x, encoder_hidden_states=tokens, timestep=t, **kw).sample
