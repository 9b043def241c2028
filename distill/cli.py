"""``lrm distill --config configs/distill_shapes_image.yaml [--key value ...]``: DOLLAR Alg. 1 from a config."""

from __future__ import annotations

import argparse

import torch

from distill.builders import (  # noqa: F401  (build_data / build_lrm: also imported from here by tests, benches)
    build_data,
    build_lrm,
    build_mixed_reward,
    build_teacher,
    build_text_encoder,
    build_vae,
    check_text_identity,
    check_text_width,
    teacher_is_diffusers,
    text_identity,
)
from distill.trainer import DistillConfig, DistillTrainer, make_accelerator
from lrm.run import get_logger, seed_everything


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
