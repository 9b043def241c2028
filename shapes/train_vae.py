"""Recipe: train the Shapes world's tiny VAE (diffusers ``AutoencoderKL``) and ship it as safetensors.

Loss: L1 + MSE on pixels + a small KL term. After training, the latent scaling factor is set to
1 / std of held-out latents (as Stable Diffusion's 0.18215 was chosen), and PSNR on held-out images
and video frames is written to ``metrics.json`` with a comparison grid PNG.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lrm.checkpoint import find_checkpoint, load_training_state, save_training_state
from lrm.config import opt
from lrm.io import write_json
from lrm.run import get_logger, prepare_run_dir, resolve_device, seed_everything
from shapes.grid import save_grid
from shapes.world import ShapesWorld

log = get_logger("lrm.shapes")


@dataclass
class TrainVAEConfig:
    out_dir: str = opt("runs/shapes-vae", "run directory; the trained VAE is saved to OUT_DIR/vae")
    image_size: int = opt(32, "training image size in pixels (32 or 64)")
    downsample: int = opt(4, "spatial downsampling factor of the VAE (4 or 8)")
    latent_channels: int = opt(4, "latent channels")
    width: int = opt(64, "channels of the widest VAE block")
    steps: int = opt(6000, "optimizer steps")
    batch_size: int = opt(256, "images per step")
    lr: float = opt(2e-3, "peak AdamW learning rate (warm-up 200 steps, cosine decay)")
    kl_weight: float = opt(1e-6, "weight of the KL term")
    num_images: int = opt(40000, "training images generated up front")
    num_videos: int = opt(1000, "training videos (16 frames each) whose frames join the pool")
    eval_images: int = opt(512, "held-out images for PSNR")
    eval_videos: int = opt(32, "held-out videos for per-frame PSNR")
    save_every: int = opt(1000, "steps between resumable checkpoints")
    workers: int = opt(8, "processes generating Shapes data")
    seed: int = opt(0, "random seed")
    device: str = opt("auto", "auto, cpu or cuda")
    resume: bool = opt(True, "resume from OUT_DIR/checkpoint if it exists")

    def __post_init__(self):
        if self.downsample not in (4, 8):
            raise ValueError(f"downsample must be 4 or 8, got {self.downsample}")
        if self.image_size % self.downsample:
            raise ValueError(f"image_size {self.image_size} must be divisible by downsample {self.downsample}")
        if self.steps <= 0 or self.batch_size <= 0:
            raise ValueError("steps and batch_size must be positive")


def build_vae(cfg: TrainVAEConfig):
    from diffusers import AutoencoderKL

    n_blocks = int(math.log2(cfg.downsample)) + 1
    w = cfg.width
    chans = tuple([w // 2] + [w] * (n_blocks - 1))
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n_blocks,
        up_block_types=("UpDecoderBlock2D",) * n_blocks,
        block_out_channels=chans, layers_per_block=1, latent_channels=cfg.latent_channels,
        norm_num_groups=16, sample_size=cfg.image_size,
    )


def _gen_images(args):
    seed, start, n, size = args
    w = ShapesWorld(image_size=size, seed=seed)
    return np.stack([w.sample(i).pixels for i in range(start, start + n)])


def _gen_video_frames(args):
    seed, start, n, size = args
    w = ShapesWorld(image_size=size, num_frames=16, seed=seed)
    return np.concatenate([w.sample(i).pixels for i in range(start, start + n)])


def make_pool(seed: int, n_images: int, n_videos: int, size: int, workers: int) -> torch.Tensor:
    chunk = 500
    jobs_i = [(seed, s, min(chunk, n_images - s), size) for s in range(0, n_images, chunk)]
    jobs_v = [(seed, s, min(chunk // 16 + 1, n_videos - s), size) for s in range(0, n_videos, chunk // 16 + 1)]
    with ProcessPoolExecutor(max_workers=max(1, workers)) as ex:
        parts = list(ex.map(_gen_images, jobs_i)) + list(ex.map(_gen_video_frames, jobs_v))
    return torch.from_numpy(np.concatenate(parts))


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [0, 1]."""
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)


@torch.no_grad()
def evaluate_vae(vae, image_size: int, n_images: int, n_videos: int, seed: int = 12345, device="cpu") -> dict:
    """Held-out PSNR (images and per video frame) and the latent std used for the scaling factor."""
    vae.eval()
    imgs = torch.from_numpy(_gen_images((seed, 0, n_images, image_size))).to(device)
    vids = torch.from_numpy(_gen_video_frames((seed, 0, n_videos, image_size))).to(device)
    out = {}
    stds = []
    for name, x in (("image", imgs), ("video_frame", vids)):
        recs, ps = [], []
        for chunk in x.split(256):
            z = vae.encode(chunk * 2 - 1).latent_dist.mean
            stds.append(z.flatten())
            r = ((vae.decode(z).sample + 1) / 2).clamp(0, 1)
            recs.append(r)
            ps.append(psnr(r, chunk))
        p = torch.cat(ps)
        out[f"psnr_{name}_mean"] = float(p.mean())
        out[f"psnr_{name}_min"] = float(p.min())
        out[f"_{name}_recon"] = torch.cat(recs)[:16].cpu()
        out[f"_{name}_orig"] = x[:16].cpu()
    z = torch.cat(stds)
    out["latent_mean"] = float(z.mean())
    out["latent_std"] = float(z.std())
    return out


def train_vae(cfg: TrainVAEConfig) -> Path:
    run_dir = prepare_run_dir(cfg.out_dir, cfg, "lrm.shapes")
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    vae = build_vae(cfg).to(device)
    n_params = sum(p.numel() for p in vae.parameters())
    log.info("VAE: %d parameters, %dx downsampling, %d latent channels; %d steps x %d images on %s",
             n_params, cfg.downsample, cfg.latent_channels, cfg.steps, cfg.batch_size, device)
    optim = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    warm = 200
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps))))
    ckpt_dir = run_dir / "checkpoint"
    start = 0
    if cfg.resume and find_checkpoint(ckpt_dir) is not None:
        start = load_training_state(ckpt_dir, {"vae": vae}, {"vae": optim}, {"vae": sched})["step"]
        log.info("resumed from %s at step %d", ckpt_dir, start)
    t0 = time.time()
    pool = make_pool(cfg.seed, cfg.num_images, cfg.num_videos, cfg.image_size, cfg.workers).to(device)
    log.info("data pool: %d images (%.1fs)", len(pool), time.time() - t0)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed + start)
    vae.train()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train-vae")
    for step in bar:
        idx = torch.randint(0, len(pool), (cfg.batch_size,), generator=gen).to(device)
        x = pool[idx] * 2 - 1  # (B, 3, H, W) in [-1, 1]
        if torch.rand((), generator=gen) < 0.5:
            x = x.flip(-1)
        dist = vae.encode(x).latent_dist
        z = dist.sample()
        rec = vae.decode(z).sample
        l1 = (rec - x).abs().mean()
        mse = F.mse_loss(rec, x)
        kl = dist.kl().mean() / x[0].numel()
        loss = l1 + mse + cfg.kl_weight * kl * x[0].numel()
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optim.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(l1=f"{l1.item():.4f}", kl=f"{kl.item():.3f}")
        if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            save_training_state(ckpt_dir, step + 1, {"vae": vae}, {"vae": optim}, {"vae": sched})
    vae.eval()
    metrics = evaluate_vae(vae, cfg.image_size, cfg.eval_images, cfg.eval_videos, device=device)
    vae.register_to_config(scaling_factor=1.0 / metrics["latent_std"])
    out = run_dir / "vae"
    vae.to("cpu").save_pretrained(out, safe_serialization=True)
    comp = torch.cat([metrics.pop("_image_orig"), metrics.pop("_image_recon"),
                      metrics.pop("_video_frame_orig"), metrics.pop("_video_frame_recon")])
    save_grid(comp, run_dir / "reconstructions.png", nrow=16, scale=3)
    metrics.update(parameters=n_params, scaling_factor=1.0 / metrics["latent_std"], steps=cfg.steps,
                   train_seconds=time.time() - t0, device=str(device))
    write_json(run_dir / "metrics.json", metrics)
    log.info("PSNR image %.2f dB, video frame %.2f dB; scaling factor %.4f; saved to %s",
             metrics["psnr_image_mean"], metrics["psnr_video_frame_mean"], metrics["scaling_factor"], out)
    return out
