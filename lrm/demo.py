"""``lrm demo``: the main job on the built-in Shapes world, end to end, on CPU in minutes."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lrm.cli import add_config_command
from lrm.config import opt
from lrm.io import write_json
from lrm.run import get_logger, prepare_run_dir, seed_everything

log = get_logger("lrm.demo")


@dataclass
class DemoConfig:
    out_dir: str = opt("runs/demo", "run directory for the demo's outputs")
    num_images: int = opt(32, "Shapes images to generate and round-trip through the VAE")
    num_videos: int = opt(4, "Shapes videos (16 frames) to round-trip through the VAE")
    seed: int = opt(0, "world seed")


def encode_decode_stage(cfg: DemoConfig, run_dir: Path) -> dict:
    """Generate Shapes images/videos, encode with the shipped VAE and decode; grid PNGs + PSNR."""
    from lrm.latent_space import VAE
    from shapes import ShapesWorld
    from shapes.grid import save_grid, save_video_strip
    from shapes.train_vae import psnr

    vae = VAE.shapes()
    t0 = time.time()
    imgs, captions, _ = ShapesWorld(seed=cfg.seed).batch(range(cfg.num_images))
    z = vae.encode(imgs)
    rec = vae.decode(z)
    vids, vcaps, _ = ShapesWorld(num_frames=16, seed=cfg.seed).batch(range(cfg.num_videos))
    vrec = vae.decode(vae.encode(vids))
    n = min(8, cfg.num_images)
    save_grid(torch.cat([imgs[:n], rec[:n]]), run_dir / "vae_roundtrip.png", nrow=n, scale=4)
    save_video_strip(torch.stack([vids, vrec], 1).flatten(0, 1), run_dir / "vae_roundtrip_video.png", scale=3)
    summary = {
        "latent_space": vae.latent_space.to_dict(),
        "image_latent_shape": list(z.shape[1:]),
        "psnr_image_db": float(psnr(rec, imgs).mean()),
        "psnr_video_frame_db": float(psnr(vrec.flatten(0, 1), vids.flatten(0, 1)).mean()),
        "captions": captions[:n] + vcaps,
        "seconds": time.time() - t0,
    }
    log.info("VAE round trip: %d images %.2f dB, %d videos %.2f dB per frame (latents %s)",
             cfg.num_images, summary["psnr_image_db"], cfg.num_videos, summary["psnr_video_frame_db"],
             tuple(z.shape[1:]))
    return summary


def run_demo(cfg: DemoConfig) -> dict:
    run_dir = prepare_run_dir(cfg.out_dir, cfg, "lrm.demo")
    seed_everything(cfg.seed)
    summary = {"encode_decode": encode_decode_stage(cfg, run_dir)}
    write_json(run_dir / "summary.json", summary)
    print(f"demo outputs in {run_dir}/: vae_roundtrip.png, vae_roundtrip_video.png, summary.json")
    return summary


def register(sub: argparse._SubParsersAction) -> None:
    add_config_command(sub, "demo", DemoConfig, run_demo, "run the main job on the built-in Shapes world")
