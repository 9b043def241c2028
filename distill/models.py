"""Tiny diffusers UNets for the Shapes world's teachers, and the loader for the shipped teachers.

Sizes are set by the shipping budget (image + video teacher <= 12 MB as fp16 safetensors):
image ``UNet2DConditionModel`` (48, 96) channels ~2.7M parameters, video ``UNet3DConditionModel``
(40, 80) channels ~3.1M parameters, both with cross-attention on MiniLM tokens (384-d) at both levels.
Latents are the Shapes VAE's ``(4, 8, 8)`` per image/frame; videos are 16 frames.
"""

from __future__ import annotations

from pathlib import Path

import torch

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def shapes_image_unet(latent_channels: int = 4, sample_size: int = 8, text_dim: int = 384, width: int = 48,
                      layers_per_block: int = 1, heads: int = 4, norm_num_groups: int = 16):
    """A tiny ``UNet2DConditionModel``: 2 levels (width, 2*width), cross-attention at both."""
    from diffusers import UNet2DConditionModel

    if width % norm_num_groups or width % heads:
        raise ValueError(f"width {width} must be divisible by norm_num_groups {norm_num_groups} and heads {heads}")
    # ``attention_head_dim`` is the number of heads in diffusers' UNets (legacy naming).
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=latent_channels, out_channels=latent_channels,
        block_out_channels=(width, 2 * width), layers_per_block=layers_per_block,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_dim, attention_head_dim=heads, norm_num_groups=norm_num_groups,
    )


def shapes_video_unet(latent_channels: int = 4, sample_size: int = 8, text_dim: int = 384, width: int = 40,
                      layers_per_block: int = 1, heads: int = 8, norm_num_groups: int = 8,
                      temporal_pos_embed: int = 0):
    """A tiny ``UNet3DConditionModel`` (spatial + temporal attention/convs) for ``16 x (4, 8, 8)`` videos;
    ``temporal_pos_embed > 0`` adds frame-index embeddings for up to that many frames
    (``add_temporal_pos_embed``)."""
    from diffusers import UNet3DConditionModel

    if width % norm_num_groups or width % heads:
        raise ValueError(f"width {width} must be divisible by norm_num_groups {norm_num_groups} and heads {heads}")
    unet = UNet3DConditionModel(
        sample_size=sample_size, in_channels=latent_channels, out_channels=latent_channels,
        block_out_channels=(width, 2 * width), layers_per_block=layers_per_block,
        down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D"),
        up_block_types=("CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=text_dim, attention_head_dim=heads, norm_num_groups=norm_num_groups,
    )
    return add_temporal_pos_embed(unet, temporal_pos_embed) if temporal_pos_embed else unet


def _temporal_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel

    return [b for m in model.modules() if isinstance(m, TransformerTemporalModel) for b in m.transformer_blocks]


def add_temporal_pos_embed(model: torch.nn.Module, max_frames: int) -> torch.nn.Module:
    """Give every temporal transformer block of a diffusers video UNet sinusoidal frame-index embeddings
    (``BasicTransformerBlock.pos_embed``, added to the normed frames before temporal self-attention).

    diffusers' ``UNet3DConditionModel`` builds its temporal attention without them, so attention alone cannot
    tell frame order; only the temporal convolutions can. The embeddings are fixed (no parameters) and not in the
    state dict, so weights stay diffusers-compatible; ``Denoiser`` records ``temporal_pos_embed`` in
    ``denoiser.json`` and re-adds them on load. In place; returns ``model``."""
    from diffusers.models.embeddings import SinusoidalPositionalEmbedding

    blocks = _temporal_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no temporal transformer blocks (TransformerTemporalModel)")
    param = next(model.parameters())
    for b in blocks:
        pe = SinusoidalPositionalEmbedding(b.norm1.normalized_shape[0], max_seq_length=max_frames)
        pe.register_buffer("pe", pe.pe.to(param.device, param.dtype), persistent=False)  # not in the state dict
        b.pos_embed = pe
    return model


def temporal_pos_embed(model: torch.nn.Module) -> int:
    """The frame count ``add_temporal_pos_embed`` gave ``model`` (0: none)."""
    for b in _temporal_blocks(model):
        if getattr(b, "pos_embed", None) is not None:
            return int(b.pos_embed.pe.shape[1])
    return 0


SHAPES_TEACHER_KINDS = ("image", "video", "video-flow")  # distill/weights/teacher-<kind>; teacher: shapes-<kind>


def load_shapes_teacher(kind: str = "image", device: str | torch.device = "cpu"):
    """The shipped Shapes teacher (``Denoiser``): ``image`` / ``video`` conjugate-v, scaled-linear DDPM, T = 1000;
    ``video-flow`` rectified flow (velocity target, as SD3 / Wan; paper 004's teachers)."""
    from distill.denoiser import Denoiser

    if kind not in SHAPES_TEACHER_KINDS:
        raise ValueError(f"kind must be one of {SHAPES_TEACHER_KINDS}, got {kind!r}")
    path = WEIGHTS_DIR / f"teacher-{kind}"
    needed = ("config.json", "diffusion_pytorch_model.safetensors", "denoiser.json")
    missing = [n for n in needed if not (path / n).exists()]
    if missing:
        train = f"lrm shapes train-teacher --kind {kind.removesuffix('-flow')}" + (
            " --parameterization flow" if kind == "video-flow" else "")
        raise FileNotFoundError(f"The Shapes {kind} teacher is missing {missing} in {path}. Train it with `{train} "
                                f"--out_dir runs/teacher-{kind}` (GPU, a few minutes) and copy runs/teacher-{kind}/"
                                f"teacher to {path}.")
    return Denoiser.from_pretrained(path, device=device)
