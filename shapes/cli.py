"""``lrm shapes ...``: the built-in world's recipes and a quick look at its samples."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from lrm.cli import add_config_command
from lrm.config import opt


@dataclass
class SampleConfig:
    out: str = opt("runs/shapes-samples.png", "PNG grid to write")
    num: int = opt(32, "number of samples")
    image_size: int = opt(32, "32 or 64")
    num_frames: int = opt(0, "0 for images, else frames per video")
    seed: int = opt(0, "world seed")


def _sample(cfg: SampleConfig) -> None:
    from shapes.grid import save_grid, save_video_strip
    from shapes.world import ShapesWorld

    world = ShapesWorld(cfg.image_size, cfg.num_frames or None, cfg.seed)
    pixels, captions, _ = world.batch(range(cfg.num))
    path = save_video_strip(pixels, cfg.out, scale=3) if world.is_video else save_grid(pixels, cfg.out, scale=3)
    for i, c in enumerate(captions):
        print(f"{i:3d}  {c}")
    print(f"wrote {path}")


def _train_vae(cfg) -> None:
    from shapes.train_vae import train_vae

    train_vae(cfg)


def _train_teacher(cfg) -> None:
    from distill.train_teacher import train_teacher

    train_teacher(cfg)


def register(sub: argparse._SubParsersAction) -> None:
    from shapes.train_vae import TrainVAEConfig

    p = sub.add_parser("shapes", help="the built-in Shapes world: samples and training recipes",
                       description="the built-in Shapes world: samples and training recipes")
    s = p.add_subparsers(dest="shapes_command", metavar="SUBCOMMAND")
    add_config_command(s, "sample", SampleConfig, _sample, "write a grid of Shapes samples with their captions")
    add_config_command(s, "train-vae", TrainVAEConfig, _train_vae, "train the tiny Shapes VAE (GPU recommended)")
    try:
        from distill.train_teacher import TrainTeacherConfig
    except ImportError:  # the distill package is optional for the Shapes world
        TrainTeacherConfig = None
    if TrainTeacherConfig is not None:
        add_config_command(s, "train-teacher", TrainTeacherConfig, _train_teacher,
                           "train the Shapes image or video teacher (conjugate v, CFG-ready; GPU recommended)")
