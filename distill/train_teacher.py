"""Recipe: train the Shapes world's image or video teacher with DOLLAR's conjugate-v objective.

``lrm shapes train-teacher --kind image|video --out_dir DIR``

1. Data, once, up front: a pool of Shapes samples rendered by a process pool, encoded by the shipped
   Shapes VAE on the training device (scaled latents ``(4, 8, 8)`` per image/frame), captions encoded once
   by MiniLM (``lrm.text.TextEncoder``) into a table of unique captions.
2. Training: ``x_t = a_t x0 + b_t eps`` (scaled-linear DDPM, T = 1000, t ~ U{0..999}), loss
   ``|| v_theta(x_t, t, c) - (x0 - eps) ||^2`` (Eq. 13); 10% of captions replaced by the null caption (the
   MiniLM embedding of ``""``) so CFG works; AdamW with linear warm-up, constant LR after; EMA weights.
   Resumable from ``OUT_DIR/checkpoint`` (``lrm.checkpoint``).
3. Output: ``OUT_DIR/teacher`` (EMA weights as fp16 safetensors + ``config.json`` + ``denoiser.json`` +
   ``null_text.safetensors``), then 50-step DDIM samples with Imagen-form CFG (1 = none, 3.5 and 7.5) for held-out
   samples' captions, decoded, in ``OUT_DIR/samples.png``, and their caption adherence measured with the
   Shapes rewards of ``reward_adapters`` in ``OUT_DIR/metrics.json`` (next to the same rewards on real
   Shapes data as the reference).
"""

from __future__ import annotations

import copy
import json
import math
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lrm.config import opt
from lrm.run import get_logger

log = get_logger("lrm.distill")

DEFAULTS = {  # per kind: steps, batch size, pool size, width
    "image": {"steps": 4000, "batch_size": 256, "num_samples": 100_000, "width": 48},
    "video": {"steps": 2500, "batch_size": 32, "num_samples": 10_000, "width": 40},
}


@dataclass
class TrainTeacherConfig:
    kind: str = opt("image", "image or video (16 frames)")
    out_dir: str = opt("runs/shapes-teacher", "run directory; the teacher is saved to OUT_DIR/teacher")
    steps: int = opt(0, "optimizer steps; 0 = the kind's default (image 4000, video 2500)")
    batch_size: int = opt(0, "samples per step (a video counts once); 0 = default (image 256, video 32)")
    max_minutes: float = opt(6.0, "stop the training loop after this many minutes of this process (0 = no limit); "
                                  "the run then saves and evaluates as if it had finished")
    lr: float = opt(5e-4, "AdamW learning rate after warm-up")
    warmup: int = opt(200, "linear warm-up, in optimizer steps")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    ema_decay: float = opt(0.999, "EMA decay of the shipped weights (ramped up as (1 + step) / (10 + step))")
    caption_dropout: float = opt(0.1, "probability that a caption is replaced by the null caption (for CFG)")
    parameterization: str = opt("conjugate_v", "training target: conjugate_v (DOLLAR Eq. 13), eps, v, x0 (DDPM), or "
                                               "flow: rectified flow as SD3 / Wan (x_t = (1 - s) x0 + s eps, "
                                               "s = t / 1000, target the velocity eps - x0; paper 004's teachers)")
    beta_schedule: str = opt("scaled_linear", "DDPM beta schedule: scaled_linear, linear, cosine (not used by flow)")
    width: int = opt(0, "UNet base width; 0 = default (image 48, video 40)")
    num_samples: int = opt(0, "training pool size (images or videos); 0 = default (image 100000, video 10000)")
    num_frames: int = opt(16, "frames per video (video teacher)")
    temporal_pos_embed: bool = opt(False, "video: sinusoidal frame-index embeddings in the temporal attention "
                                          "(diffusers' UNet3DConditionModel has none; distill.models."
                                          "add_temporal_pos_embed), recorded in denoiser.json")
    eval_samples: int = opt(32, "held-out captions sampled for the metrics (one sample each per guidance scale)")
    eval_steps: int = opt(50, "DDIM steps of the evaluation samples")
    guidance_scales: list[float] = opt([1.0, 3.5, 7.5], "Imagen-form CFG scales evaluated (1 = no guidance)")
    save_every: int = opt(500, "steps between resumable checkpoints")
    fp16_weights: bool = opt(True, "store the shipped teacher weights in fp16 (half the size)")
    bf16: bool = opt(True, "bf16 autocast for the network on CUDA (ignored on CPU)")
    workers: int = opt(8, "processes rendering Shapes data")
    text_encoder: str = opt("all-MiniLM-L6-v2", "text encoder (name or path) for captions")
    seed: int = opt(0, "random seed (training data world seed; evaluation uses seed + 1000)")
    device: str = opt("auto", "auto, cpu or cuda")
    resume: bool = opt(True, "resume from OUT_DIR/checkpoint if it exists")
    init_from: str | None = opt(None, "start from a saved teacher's weights (a Denoiser directory, e.g. "
                                      "distill/weights/teacher-video or an earlier OUT_DIR/teacher) instead of a "
                                      "random init: train a shipped teacher further; a checkpoint in OUT_DIR wins")

    def __post_init__(self):
        if self.kind not in DEFAULTS:
            raise ValueError(f"kind must be 'image' or 'video', got {self.kind!r}")
        from distill.parameterization import PARAMETERIZATIONS

        if self.parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization {self.parameterization!r} is not one of {PARAMETERIZATIONS}")
        for k, v in DEFAULTS[self.kind].items():
            if getattr(self, k) == 0:
                setattr(self, k, v)
            elif getattr(self, k) < 0:
                raise ValueError(f"{k} must be positive, got {getattr(self, k)}")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


# ---- data ---------------------------------------------------------------------------------------------------
def _render(args):
    seed, start, n, frames = args
    from shapes.world import ShapesWorld

    w = ShapesWorld(image_size=32, num_frames=frames or None, seed=seed)
    samples = [w.sample(i) for i in range(start, start + n)]
    return np.stack([s.pixels for s in samples]), [s.caption for s in samples]


def render_chunks(seed: int, n: int, frames: int | None, workers: int, chunk: int):
    """Yield ``(pixels, captions)`` chunks of Shapes samples ``0..n-1`` in order, rendered in parallel."""
    jobs = [(seed, s, min(chunk, n - s), frames or 0) for s in range(0, n, chunk)]
    if workers <= 1:
        yield from map(_render, jobs)
        return
    with ProcessPoolExecutor(max_workers=workers) as ex:
        yield from ex.map(_render, jobs)


@torch.no_grad()
def build_pool(cfg: TrainTeacherConfig, vae, text, device) -> dict:
    """Latents (N, ...) and caption indices on ``device``, plus the unique captions' tokens / masks."""
    frames = cfg.num_frames if cfg.kind == "video" else None
    chunk = 500 if frames is None else 40
    lat, caps = [], []
    bar = tqdm(total=cfg.num_samples, desc=f"render+encode {cfg.kind}s")
    for pix, c in render_chunks(cfg.seed, cfg.num_samples, frames, cfg.workers, chunk):
        lat.append(vae.encode(torch.from_numpy(pix).to(device)).to(torch.float32))  # (n, [T,] 4, 8, 8)
        caps += c
        bar.update(len(c))
    bar.close()
    uniq = sorted(set(caps))
    where = {c: i for i, c in enumerate(uniq)}
    toks, masks = [], []
    for i in range(0, len(uniq), 512):
        e = text(uniq[i:i + 512])
        toks.append(e.tokens.to(device))
        masks.append(e.mask.to(device))
    return {"latents": torch.cat(lat), "caption_index": torch.tensor([where[c] for c in caps], device=device),
            "tokens": torch.cat(toks), "mask": torch.cat(masks), "captions": uniq}


# ---- evaluation ---------------------------------------------------------------------------------------------
def _reward_names(kind: str) -> list[str]:
    names = ["shapes-adherence", "shapes-color", "shapes-shape", "shapes-count", "shapes-position"]
    return names + (["shapes-direction"] if kind == "video" else [])


def score_adherence(pixels: torch.Tensor, captions: list[str], kind: str) -> dict[str, float]:
    """Mean Shapes reward per name (NaN-aware: attributes a caption does not name are skipped)."""
    from reward_adapters import create_reward, list_rewards

    out = {}
    available = set(list_rewards())
    for name in _reward_names(kind):
        if name not in available:
            continue
        r = create_reward(name)(pixels.float().cpu(), captions).float()
        ok = ~torch.isnan(r)
        out[name] = float(r[ok].mean()) if ok.any() else float("nan")
    if not out:
        raise RuntimeError(f"none of the Shapes rewards {_reward_names(kind)} is registered in reward_adapters")
    return out


@torch.no_grad()
def evaluate_teacher(denoiser, vae, text, cfg: TrainTeacherConfig, device) -> tuple[dict, torch.Tensor]:
    """50-step CFG DDIM samples for held-out captions, their Shapes rewards, and the real-data reference."""
    from distill.samplers import ddim_sample
    from shapes.world import ShapesWorld

    world = ShapesWorld(image_size=32, num_frames=cfg.num_frames if cfg.kind == "video" else None,
                        seed=cfg.seed + 1000)
    real, captions, _ = world.batch(range(cfg.eval_samples))
    emb = text(captions)
    tok, mask = emb.tokens.to(device), emb.mask.to(device)
    shape = (cfg.eval_samples,) + tuple(vae.encode(real[:1].to(device)).shape[1:])
    g = torch.Generator(device="cpu").manual_seed(cfg.seed + 2000)
    noise = torch.randn(shape, generator=g).to(device)
    metrics = {"real_data": score_adherence(real, captions, cfg.kind), "captions": captions[:8]}
    panels = [real]
    for s in cfg.guidance_scales:
        t0 = time.time()
        x0 = ddim_sample(denoiser, noise, tok, mask, num_steps=cfg.eval_steps, guidance_scale=s, progress=True)
        secs = time.time() - t0
        pix = vae.decode(x0).cpu()
        metrics[f"cfg_{s:g}"] = {**score_adherence(pix, captions, cfg.kind), "sample_seconds": secs,
                                 "latent_std": float(x0.std())}
        panels.append(pix)
    return metrics, torch.stack([p[:8] for p in panels], 1).flatten(0, 1)  # rows: real, s1, s2 per caption


# ---- training -----------------------------------------------------------------------------------------------
def build_teacher_unet(cfg: TrainTeacherConfig, latent_channels: int = 4, text_dim: int = 384):
    from distill.models import shapes_image_unet, shapes_video_unet

    if cfg.kind == "image":
        return shapes_image_unet(latent_channels, 8, text_dim, width=cfg.width,
                                 heads=4 if cfg.width % 4 == 0 else 1, norm_num_groups=math.gcd(cfg.width, 16))
    return shapes_video_unet(latent_channels, 8, text_dim, width=cfg.width, heads=8 if cfg.width % 8 == 0 else 1,
                             norm_num_groups=math.gcd(cfg.width, 8),
                             temporal_pos_embed=max(64, cfg.num_frames) if cfg.temporal_pos_embed else 0)


def teacher_loss(denoiser, batch_x0: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                 generator: torch.Generator | None = None, bf16: bool = False) -> torch.Tensor:
    """The teacher objective (Eq. 13 for conjugate v; the velocity ``eps - x0`` for flow): MSE between the output
    and the parameterisation's target at uniformly sampled integer timesteps (flow: s = t / T uniform on the grid)."""
    from distill.parameterization import target

    B = batch_x0.shape[0]
    dev = batch_x0.device
    T = denoiser.schedule.num_train_timesteps
    gd = generator.device if generator is not None else dev
    t = torch.randint(0, T, (B,), generator=generator, device=gd).to(dev)
    eps = torch.randn(batch_x0.shape, generator=generator, device=gd).to(dev)
    x_t = denoiser.schedule.add_noise(batch_x0, eps, t)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16 and dev.type == "cuda"):
        out = denoiser(x_t, t, tokens, mask)
    return F.mse_loss(out.float(), target(batch_x0, eps, t, denoiser.schedule, denoiser.parameterization))


def init_weights(unet: torch.nn.Module, ema: torch.nn.Module, path: str | Path, device) -> None:
    """Copy a saved teacher's weights (``Denoiser.save_pretrained`` layout) into ``unet`` and its EMA copy;
    the architecture must match (same kind, width and temporal_pos_embed)."""
    from distill.denoiser import Denoiser
    from distill.models import temporal_pos_embed

    init = Denoiser.from_pretrained(path, device=device).model
    a, b = ({k: json.loads(json.dumps(v)) for k, v in m.config.items() if not k.startswith("_")}
            | {"temporal_pos_embed": temporal_pos_embed(m)} for m in (init, unet))
    if type(init) is not type(unet) or a != b:
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        raise ValueError(f"init_from={str(path)!r} holds a {type(init).__name__} whose config differs from the one "
                         f"this run builds ({type(unet).__name__}) in {diff}; use the same kind, width and "
                         "temporal_pos_embed")
    state = {k: v.float() for k, v in init.state_dict().items()}
    unet.load_state_dict(state)
    ema.load_state_dict(state)
    log.info("initialised from the teacher in %s", path)


def train_teacher(cfg: TrainTeacherConfig) -> Path:
    from distill.denoiser import Denoiser
    from lrm.checkpoint import find_checkpoint, load_training_state, save_training_state
    from lrm.io import write_json
    from lrm.latent_space import VAE
    from lrm.run import prepare_run_dir, resolve_device, seed_everything
    from lrm.schedules import DDPMSchedule, FlowSchedule
    from lrm.text import TextEncoder
    from shapes.grid import save_grid, save_video_strip

    t_start = time.time()
    run_dir = prepare_run_dir(cfg.out_dir, cfg, "lrm.distill")
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    vae = VAE.shapes(device=device)
    text = TextEncoder(cfg.text_encoder, device=device)
    null = text([""])
    null_tokens, null_mask = null.tokens.to(device), null.mask.to(device)  # (1, L, D), (1, L)

    schedule = FlowSchedule(1000) if cfg.parameterization == "flow" else DDPMSchedule(1000, cfg.beta_schedule)
    unet = build_teacher_unet(cfg, vae.latent_space.latent_channels, text.dim).to(device)
    denoiser = Denoiser(unet, schedule, cfg.parameterization, cfg_null=(null_tokens, null_mask)).to(device)
    ema = copy.deepcopy(unet).requires_grad_(False).eval()
    n_params = sum(p.numel() for p in unet.parameters())
    optim = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup)))
    ckpt_dir = run_dir / "checkpoint"
    start = 0
    if cfg.resume and find_checkpoint(ckpt_dir) is not None:
        start = load_training_state(ckpt_dir, {"unet": unet, "ema": ema}, {"unet": optim}, {"unet": sched})["step"]
        log.info("resumed from %s at step %d", ckpt_dir, start)
    elif cfg.init_from:
        init_weights(unet, ema, cfg.init_from, device)
    log.info("%s teacher: %s, %d parameters (%.1f MB as %s), %s objective, %s DDPM; %d steps x %d %ss on %s",
             cfg.kind, type(unet).__name__, n_params, n_params * (2 if cfg.fp16_weights else 4) / 1e6,
             "fp16" if cfg.fp16_weights else "fp32", cfg.parameterization, cfg.beta_schedule, cfg.steps,
             cfg.batch_size, cfg.kind, device)

    t0 = time.time()
    pool = build_pool(cfg, vae, text, device)
    N = len(pool["latents"])
    data_seconds = time.time() - t0
    log.info("data pool: %d %ss, %d unique captions, latent std %.3f (%.1fs)", N, cfg.kind, len(pool["captions"]),
             float(pool["latents"].std()), data_seconds)

    gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + start)
    unet.train()
    losses: list[float] = []
    stopped_early = None
    t_train = time.time()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"train-teacher-{cfg.kind}")
    step = start
    for step in bar:
        idx = torch.randint(0, N, (cfg.batch_size,), generator=gen, device=device)
        x0 = pool["latents"][idx]  # (B, 4, 8, 8) or (B, T, 4, 8, 8)
        ci = pool["caption_index"][idx]
        tok, mask = pool["tokens"][ci], pool["mask"][ci]  # (B, L, D), (B, L)
        drop = torch.rand(cfg.batch_size, generator=gen, device=device) < cfg.caption_dropout
        tok = torch.where(drop[:, None, None], null_tokens.expand_as(tok), tok)
        mask = torch.where(drop[:, None], null_mask.expand_as(mask), mask)
        loss = teacher_loss(denoiser, x0, tok, mask, gen, cfg.bf16)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optim.step()
        sched.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        if step % 50 == 0 or step + 1 == cfg.steps:
            losses.append(loss.item())
            done = step + 1 - start
            bar.set_postfix(loss=f"{losses[-1]:.4f}", its=f"{done / max(time.time() - t_train, 1e-9):.1f}")
        if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            save_training_state(ckpt_dir, step + 1, {"unet": unet, "ema": ema}, {"unet": optim}, {"unet": sched})
        if cfg.max_minutes > 0 and time.time() - t_start > cfg.max_minutes * 60 and step + 1 < cfg.steps:
            stopped_early = step + 1
            log.warning("max_minutes=%.1f reached: stopping at step %d of %d (resume to continue)",
                        cfg.max_minutes, step + 1, cfg.steps)
            save_training_state(ckpt_dir, step + 1, {"unet": unet, "ema": ema}, {"unet": optim}, {"unet": sched})
            break
    steps_done = (step + 1 - start) if cfg.steps > start else 0
    train_seconds = time.time() - t_train
    its = steps_done / max(train_seconds, 1e-9)
    log.info("trained %d steps in %.1fs: %.2f it/s (%.0f %ss/s)", steps_done, train_seconds, its,
             its * cfg.batch_size, cfg.kind)
    if stopped_early is None and cfg.steps > start:
        save_training_state(ckpt_dir, cfg.steps, {"unet": unet, "ema": ema}, {"unet": optim}, {"unet": sched})

    # Ship the EMA weights, then evaluate exactly what was shipped (fp16 round trip included).
    out = run_dir / "teacher"
    Denoiser(ema, schedule, cfg.parameterization, cfg_null=(null_tokens, null_mask)).save_pretrained(
        out, fp16=cfg.fp16_weights)
    shipped = Denoiser.from_pretrained(out, device=device).eval()
    metrics, panel = evaluate_teacher(shipped, vae, text, cfg, device)
    if cfg.kind == "image":
        save_grid(panel, run_dir / "samples.png", nrow=1 + len(cfg.guidance_scales), scale=3)
    else:
        save_video_strip(panel, run_dir / "samples.png", frames=8, scale=3)
    size = sum(f.stat().st_size for f in out.iterdir())
    metrics.update(
        kind=cfg.kind, parameters=n_params, teacher_bytes=size, steps=step + 1 if cfg.steps > start else start,
        target_steps=cfg.steps, stopped_early_at=stopped_early, init_from=cfg.init_from, batch_size=cfg.batch_size,
        its_per_second=its,
        train_seconds=train_seconds, data_seconds=data_seconds, pool_size=N,
        unique_captions=len(pool["captions"]), loss_curve_every_50=losses, device=str(device),
        guidance_form="imagen: uncond + s * (cond - uncond)", parameterization=cfg.parameterization,
        samples_png="rows: real | " + " | ".join(f"cfg {s:g}" for s in cfg.guidance_scales),
        total_seconds=time.time() - t_start)
    write_json(run_dir / "metrics.json", metrics)
    summary = "  ".join(f"{k}: {metrics[k]['shapes-adherence']:.3f}" for k in metrics
                        if isinstance(metrics[k], dict) and "shapes-adherence" in metrics[k])
    log.info("shapes-adherence  %s", summary)
    log.info("teacher saved to %s (%.2f MB); samples in %s", out, size / 1e6, run_dir / "samples.png")
    return out
