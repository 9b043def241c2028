"""UNet2DConditionModel (SD 1.x / 2.x / XL-style images) and UNet3DConditionModel (ModelScope videos)."""

from __future__ import annotations

from distill.families import Family, register_family


@register_family("UNet2DConditionModel")
class UNet2D(Family):
    name = "unet2d"

    def call(self, model, x, t, tokens, mask, pooled, guidance, **kw):
        if mask is not None:
            kw["encoder_attention_mask"] = mask
        return model(x, t, encoder_hidden_states=tokens, **kw).sample


@register_family("UNet3DConditionModel")
class UNet3D(Family):
    name = "unet3d"
    video = True

    def call(self, model, x, t, tokens, mask, pooled, guidance, **kw):
        # UNet3DConditionModel has no encoder mask: zero the padding tokens (keys/values without bias -> 0).
        if mask is not None:
            tokens = tokens * mask.unsqueeze(-1).to(tokens.dtype)
        out = model(x.permute(0, 2, 1, 3, 4), t, encoder_hidden_states=tokens, **kw).sample  # (B, C, T, h, w)
        return out.permute(0, 2, 1, 3, 4)  # (B, T, C, h, w)
