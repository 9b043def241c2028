"""``lrm distill --config configs/distill_shapes_image.yaml [--key value ...]``: DOLLAR Alg. 1 from a config."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from distill.builders import (
    build_teacher,
    build_text_encoder,
    build_vae,
    check_text_identity,
    check_text_width,
    teacher_is_diffusers,
)
from distill.trainer import DistillConfig, DistillData, DistillTrainer, make_accelerator
from lrm.config import ConfigError
from lrm.run import get_logger, seed_everything


def build_data(cfg: DistillConfig, vae: Any, device: torch.device, video: bool = False,
               text_encoder: Any = None) -> DistillData:
    """Data latents: the LatentCache ``data_cache``, else ``num_data`` encoded Shapes world samples (captions
    encoded by ``text_encoder``, default ``build_text_encoder(cfg)``)."""
    if cfg.data_cache is not None:
        data = DistillData.from_cache(cfg.data_cache)
        from data_cache import LatentCache

        vae.latent_space.check_compatible(LatentCache.open(cfg.data_cache).latent_space, f"cache {cfg.data_cache}")
        return data
    frames = cfg.num_frames if video else None
    text_encoder = text_encoder if text_encoder is not None else build_text_encoder(cfg, device)
    return DistillData.from_shapes(cfg.num_data, vae, text_encoder, num_frames=frames, seed=cfg.data_seed,
                                   progress=cfg.progress)


def text_identity(cfg: DistillConfig, text_encoder: Any = None) -> dict:
    """The identity of the text encoder behind the data's caption embeddings: the cache's record with
    ``data_cache``, else ``text_encoder.identity()`` (default: ``build_text_encoder(cfg)``)."""
    if cfg.data_cache is not None:
        from data_cache import LatentCache

        return dict(LatentCache.open(cfg.data_cache).text_encoder)
    if text_encoder is None:
        text_encoder = build_text_encoder(cfg, torch.device("cpu"))
    return text_encoder.identity()


def build_lrm(cfg: DistillConfig, data: DistillData, vae: Any, device: torch.device, text_encoder: Any = None):
    """The L_FT reward: a frozen ``LatentReward`` (checked against the VAE's latent space and, for text heads,
    against the text encoder of the data's captions) or a ``ConcurrentLRM``; ``None`` without use_lrm_ft."""
    if not cfg.use_lrm_ft:
        return None
    if cfg.lrm_mode == "frozen":
        if cfg.lrm_path is None:
            raise ConfigError("use_lrm_ft=true with lrm_mode=frozen needs lrm_path (a LatentReward directory from "
                              "`lrm train`), or set lrm_mode=concurrent")
        from latent_rewards import LatentReward

        lrm = LatentReward.from_pretrained(cfg.lrm_path, device=device)
        lrm.latent_space.check_compatible(vae.latent_space, f"latents of VAE {cfg.vae!r}")
        if lrm.needs_text:
            lrm.check_inputs(text_encoder=text_identity(cfg, text_encoder))
        return lrm
    from distill.lrm_ft import ConcurrentLRM
    from latent_rewards import create_lrm
    from reward_adapters import create_reward

    kw = dict(cfg.lrm_head_kwargs)
    kw.setdefault("in_channels", int(data.latents.shape[-3]))
    if cfg.lrm_head.startswith("text-"):
        kw.setdefault("text_dim", int(data.text_tokens.shape[-1]))
    head = create_lrm(cfg.lrm_head, **kw).to(device)
    reward = create_reward(cfg.pixel_reward, device=str(device))
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr_lrm)
    return ConcurrentLRM(head, opt, reward, vae)


def build_mixed_reward(cfg: DistillConfig, vae: Any, device: torch.device, text_encoder: Any = None):
    """Paper 004's mixed rewards from ``spatial_rewards`` / ``temporal_reward``: a LatentReward directory gives the
    latent form (checked against the VAE and, for text heads, the captions' encoder), any other name a pixel reward
    through the decoder; ``None`` when both are unset."""
    from pathlib import Path

    from distill.reward import LatentRewardTerm, MixedReward, PixelReward

    names = list(cfg.spatial_rewards) + ([cfg.temporal_reward] if cfg.temporal_reward else [])
    if not names:
        return None

    def term(name: str):
        if Path(name).is_dir():
            from latent_rewards import LatentReward

            lrm = LatentReward.from_pretrained(name, device=device)
            lrm.check_inputs(latent_space=vae.latent_space,
                             text_encoder=text_identity(cfg, text_encoder) if lrm.needs_text else None)
            return LatentRewardTerm(lrm)
        from reward_adapters import create_reward

        if vae is None:
            raise ConfigError(f"pixel reward {name!r} needs the VAE to decode; set vae")
        reward = create_reward(name, device=str(device))
        if not getattr(reward, "differentiable", False):
            raise ConfigError(f"reward {name!r} is not differentiable; use a differentiable one (colorfulness, "
                              "sharpness, brightness, ...) or a LatentReward directory")
        return PixelReward(reward, vae, checkpointing=cfg.gradient_checkpointing)

    spatial = [term(n) for n in cfg.spatial_rewards] + [None, None]
    return MixedReward(spatial[0], spatial[1], term(cfg.temporal_reward) if cfg.temporal_reward else None,
                       weights=(cfg.beta_gan, cfg.beta_spatial, cfg.beta_temporal))


def build_trainer(cfg: DistillConfig) -> DistillTrainer:
    """Teacher, VAE, data latents and LRM from the config -> a ready ``DistillTrainer``."""
    acc = make_accelerator(cfg)
    device = acc.device if cfg.device in ("auto", "cpu") else torch.device(cfg.device)
    seed_everything(cfg.seed + acc.process_index)  # before any module is built (the concurrent LRM head)
    # One text encoder for the teacher's null caption, the data captions and the LRM check (loaded only if needed).
    needs_text = teacher_is_diffusers(cfg) or cfg.data_cache is None
    text = build_text_encoder(cfg, device) if needs_text else None
    if cfg.data_cache is not None and text is not None:  # the teacher's null caption vs the cache's captions
        check_text_identity(text_identity(cfg), text.identity(), f"caption embeddings of cache {cfg.data_cache}")
    teacher = build_teacher(cfg, device, text_encoder=text)
    vae = build_vae(cfg, device)
    data = build_data(cfg, vae, device, video=teacher.is_video, text_encoder=text)
    check_text_width(teacher, data.text_tokens.shape[-1],
                     f"caption embeddings of {cfg.data_cache or 'the Shapes data'}")
    lrm = build_lrm(cfg, data, vae, device, text_encoder=text)
    mixed = build_mixed_reward(cfg, vae, device, text_encoder=text)
    return DistillTrainer(cfg, teacher, data, lrm=lrm, vae=vae, accelerator=acc, mixed_reward=mixed)


def run_distill(cfg: DistillConfig) -> DistillTrainer:
    trainer = build_trainer(cfg)
    trainer.train()
    out = trainer.save_student()
    get_logger("lrm.distill").info("student saved to %s; samples in %s/samples, log %s/log.csv", out, cfg.run_dir,
                                   cfg.run_dir)
    return trainer


def register(subparsers: argparse._SubParsersAction) -> None:
    from lrm.cli import add_config_command

    add_config_command(subparsers, "distill", DistillConfig, run_distill,
                       "distil a 50-step teacher into a 1-4 step student (VSD + CD, optional latent-reward "
                       "fine-tuning; DOLLAR Alg. 1)")
    from distill.export import register as register_export

    register_export(subparsers)  # lrm export
