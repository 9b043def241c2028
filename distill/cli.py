"""``lrm distill --config configs/distill_shapes_image.yaml [--key value ...]``: DOLLAR Alg. 1 from a config."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from distill.trainer import DistillConfig, DistillData, DistillTrainer
from lrm.config import ConfigError
from lrm.run import get_logger


def build_teacher(cfg: DistillConfig, device: torch.device):
    from distill.denoiser import Denoiser

    if cfg.teacher in ("shapes-image", "shapes-video"):
        from distill.models import load_shapes_teacher

        return load_shapes_teacher(cfg.teacher.split("-")[1], device=device)
    return Denoiser.from_pretrained(cfg.teacher, device=device)


def build_vae(cfg: DistillConfig, device: torch.device):
    from lrm.latent_space import VAE

    if cfg.vae == "shapes":
        return VAE.shapes(device=device)
    return VAE.from_pretrained(cfg.vae, subfolder=cfg.vae_subfolder, device=device)


def build_data(cfg: DistillConfig, vae: Any, device: torch.device, video: bool = False) -> DistillData:
    """Data latents: the LatentCache ``data_cache``, else ``num_data`` encoded Shapes world samples."""
    if cfg.data_cache is not None:
        data = DistillData.from_cache(cfg.data_cache)
        from data_cache import LatentCache

        vae.latent_space.check_compatible(LatentCache.open(cfg.data_cache).latent_space, f"cache {cfg.data_cache}")
        return data
    from lrm.text import TextEncoder

    frames = cfg.num_frames if video else None
    return DistillData.from_shapes(cfg.num_data, vae, TextEncoder(cfg.text_encoder, device=device),
                                   num_frames=frames, seed=cfg.data_seed, progress=cfg.progress)


def build_lrm(cfg: DistillConfig, data: DistillData, vae: Any, device: torch.device):
    if not cfg.use_lrm_ft:
        return None
    if cfg.lrm_mode == "frozen":
        if cfg.lrm_path is None:
            raise ConfigError("use_lrm_ft=true with lrm_mode=frozen needs lrm_path (a LatentReward directory from "
                              "`lrm train-lrm`), or set lrm_mode=concurrent")
        from latent_rewards import LatentReward

        lrm = LatentReward.from_pretrained(cfg.lrm_path, device=device)
        lrm.latent_space.check_compatible(vae.latent_space, f"latents of VAE {cfg.vae!r}")
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


def build_trainer(cfg: DistillConfig) -> DistillTrainer:
    """Teacher, VAE, data latents and LRM from the config -> a ready ``DistillTrainer``."""
    from accelerate import Accelerator

    acc = Accelerator(cpu=(cfg.device == "cpu"))
    device = acc.device if cfg.device in ("auto", "cpu") else torch.device(cfg.device)
    teacher = build_teacher(cfg, device)
    vae = build_vae(cfg, device)
    data = build_data(cfg, vae, device, video=teacher.is_video)
    lrm = build_lrm(cfg, data, vae, device)
    return DistillTrainer(cfg, teacher, data, lrm=lrm, vae=vae, accelerator=acc)


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
