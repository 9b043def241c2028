"""Text-image LRMs: Tab. 10 trunk + token-level cross-attention; and Tab. 11 as tabulated (ablation only)."""

from __future__ import annotations

import torch
import torch.nn as nn

from latent_rewards.heads.base import ConvLRM, LRMInputError, check_patch_divides
from latent_rewards.layers import GN_GROUPS, ConvTrunk
from latent_rewards.registry import register_lrm


class TextImageCNN(ConvLRM):
    """R(x, c): image spatial tokens (queries) attend to all text tokens (key padding mask), with a residual,
    then a residual MLP; tokens are mean-pooled and go through Tab. 10's 1x1 conv and Linear."""

    modality = "text-image"

    def __init__(self, in_channels: int = 4, text_dim: int = 384, **kw):
        if kw.pop("video", None) is not None:
            raise ValueError("text-image-cnn takes image latents; use text-video-* for videos")
        super().__init__(in_channels=in_channels, text_dim=text_dim, **kw)


class TextImagePaper(nn.Module):
    """DOLLAR Tab. 11 exactly as tabulated (763,009 parameters at C = 12, D = 4096, width 128).

    Image features f = 1x1(pool(trunk(x))); text: Linear(D -> 128) per token, averaged to one vector u;
    q = W_q f, k = W_k u, v = W_v u (no biases); softmax(q k / sqrt(d)) over ONE key is exactly 1, so the
    attention output is v = W_v u and the reward **does not depend on the image at all** (gradients to the
    image trunk are exactly zero). Kept only to document and ablate that flaw; use ``text-image-cnn``.

    Shared head options: ``width`` / ``depth`` / ``patch`` / ``norm_groups`` as in ``ConvLRM``; ensembles through
    ``create_lrm(..., ensemble=K)``. Timestep conditioning is refused (``timestep_cond=True`` or a ``t`` argument
    raise): FiLM of the trunk could not reach an output that ignores the trunk, so a "noise-aware" variant would
    be the same text-only function of ``c`` with dead parameters.
    """

    modality = "text-image"
    video = None
    timestep_cond = False

    def __init__(self, in_channels: int = 4, text_dim: int = 384, width: int = 128, depth: int = 1, patch: int = 4,
                 patch_padding: int | None = None, norm_groups: int = GN_GROUPS, timestep_cond: bool = False,
                 timestep_emb_dim: int = 128, video: str | None = None):
        super().__init__()
        if timestep_cond:
            raise ValueError("text-image-cnn-paper cannot be timestep-conditioned: its output does not depend on the "
                             "latents (Tab. 11 attends to one key), so there is no noisy input to condition; use "
                             "text-image-cnn with timestep_cond=True")
        if video is not None:
            raise ValueError("text-image-cnn-paper takes image latents; use text-video-* for videos")
        del timestep_emb_dim  # accepted with the other shared options; only used by timestep-conditioned heads
        self.in_channels = in_channels
        self.text_dim = text_dim
        self.width = width
        self.patch = patch
        self.trunk = ConvTrunk(in_channels, width, depth, patch, patch_padding, norm_groups=norm_groups)
        self.proj = nn.Conv2d(width, width, 1)
        self.text_mlp = nn.Linear(text_dim, width)
        self.q = nn.Linear(width, width, bias=False)
        self.k = nn.Linear(width, width, bias=False)
        self.v = nn.Linear(width, width, bias=False)
        self.out = nn.Linear(width, 1)

    is_video = False
    needs_text = True

    def check_latents(self, shape: tuple[int, ...]) -> None:
        if len(shape) != 4 or shape[1] != self.in_channels:
            raise LRMInputError(f"latents must be (B, {self.in_channels}, H, W), got {tuple(shape)}")
        check_patch_divides(shape, self.patch, None, type(self).__name__)

    def forward(self, latents: torch.Tensor, text_emb: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None, t: torch.Tensor | None = None) -> torch.Tensor:
        if t is not None:
            raise ValueError("text-image-cnn-paper is not noise-aware (timestep_cond=False): do not pass t")
        self.check_latents(tuple(latents.shape))
        if text_emb is None or text_emb.dim() != 3 or text_emb.shape[-1] != self.text_dim:
            raise LRMInputError(f"text_emb must be (B, L, {self.text_dim}) token embeddings")
        f = self.proj(self.trunk(latents).mean((2, 3), keepdim=True)).flatten(1)  # (B, W)
        tok = self.text_mlp(text_emb)  # (B, L, W)
        if text_mask is None:
            u = tok.mean(1)
        else:
            m = text_mask.to(tok.dtype).unsqueeze(-1)
            u = (tok * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, W)
        q, k, v = self.q(f)[:, None], self.k(u)[:, None], self.v(u)[:, None]  # (B, 1, W)
        attn = torch.softmax(q @ k.transpose(1, 2) / self.width ** 0.5, dim=-1)  # (B, 1, 1) == 1
        return self.out((attn @ v).squeeze(1)).squeeze(-1)


@register_lrm("text-image-cnn")
def text_image_cnn(**kw) -> TextImageCNN:
    """Text-image reward head: Tab. 10 trunk + token-level cross-attention to the prompt."""
    return TextImageCNN(**kw)


@register_lrm("text-image-cnn-paper")
def text_image_cnn_paper(**kw) -> TextImagePaper:
    """Tab. 11 as tabulated (ablation only: its output ignores the image)."""
    return TextImagePaper(**kw)
