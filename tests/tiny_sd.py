"""A tiny random Stable-Diffusion pipeline directory (``StableDiffusionPipeline.save_pretrained`` layout) for CPU
tests of the real path: ``unet/`` (UNet2DConditionModel, widths (32, 64), cross-attention 32, sample_size 8),
``vae/`` (AutoencoderKL, widths (32, 64): downsample 2, 4 latent channels), ``text_encoder/`` (CLIPTextModel,
hidden 32, 2 layers, 77 positions), ``tokenizer/`` (a CLIPTokenizer over a byte-level vocabulary written here, no
merges: offline, no download) and ``scheduler/`` (DDPMScheduler with SD-1.5's training schedule, epsilon).

16 px images -> 4x8x8 latents, the UNet's sample_size; every module seeded, so the files are the same on each run.
The session fixture ``tiny_sd_dir`` (tests/conftest.py) writes it once per test session.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TEXT_DIM = 32
SOT, EOT = "<|startoftext|>", "<|endoftext|>"


def _byte_symbols() -> list[str]:
    """CLIP / GPT-2's reversible byte -> printable unicode map (the 256 base symbols of the BPE vocabulary)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def tiny_clip_tokenizer(directory: Path):
    """A ``CLIPTokenizer`` with 514 tokens (the 256 byte symbols, each also word-final ``</w>``, and SOT / EOT) and no
    merges: text is tokenised character by character, as CLIP's BPE would before any merge."""
    from transformers import CLIPTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    syms = _byte_symbols()
    vocab = {s: i for i, s in enumerate(syms + [s + "</w>" for s in syms] + [SOT, EOT])}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=77)


def save_tiny_sd_pipeline(root: str | Path, seed: int = 0) -> Path:
    """Write the tiny pipeline into ``root`` and return it."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root = Path(root)
    tok = tiny_clip_tokenizer(root / "_tokenizer_src")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM, attention_head_dim=8, norm_num_groups=32)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=32, sample_size=16)
    torch.manual_seed(seed + 2)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=TEXT_DIM, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=TEXT_DIM, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, prediction_type="epsilon", clip_sample=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root)
    for f in (root / "_tokenizer_src").iterdir():
        f.unlink()
    (root / "_tokenizer_src").rmdir()
    return root


__all__ = ["save_tiny_sd_pipeline", "tiny_clip_tokenizer", "TEXT_DIM"]
