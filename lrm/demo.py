"""``lrm demo``: the main job on the built-in Shapes world, end to end, on CPU in minutes.

Stages (each logs progress, adds its numbers to ``summary.json`` and skips work the run directory already holds):

1. ``encode_decode``: Shapes images and videos through the shipped VAE and back (grids, PSNR).
2. ``rewards``: a few Shapes images scored by registered pixel rewards (``rewards.csv``, ``rewards_images.png``).
3. ``cache``: a latent cache of Shapes images (latent, text embedding, pixel rewards) in ``cache/``; resumable.
4. ``lrm``: latent reward models trained on the cache (held-out Spearman / R² beside the ridge baseline on the same
   split), saved as ``LatentReward`` directories with their calibration plots.
5. ``finetune``: the shipped Shapes image teacher's 4-step student path fine-tuned against the LRM (DOLLAR's latent
   reward loss), gold (pixel) and proxy (LRM) reward logged; students saved at a few checkpoints.
6. ``eval``: every checkpoint evaluated on held-out prompts (gold / proxy rewards, attribute accuracy, diversity,
   distance from the start), an overoptimization study, and one ``report.html`` for the whole run.
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from lrm.cli import add_config_command
from lrm.config import ConfigError, opt
from lrm.io import read_json, write_json
from lrm.run import get_logger, prepare_run_dir, resolve_device, seed_everything

log = get_logger("lrm.demo")

STAGES = ("encode_decode", "rewards", "cache", "lrm", "finetune", "eval")


@dataclass
class DemoConfig:
    out_dir: str = opt("runs/demo", "run directory for the demo's outputs (a re-run reuses what it holds)")
    seed: int = opt(0, "world / training seed")
    device: str = opt("auto", "auto (cuda if available), cpu, cuda or cuda:N")
    progress: bool = opt(True, "tqdm progress bars")
    # ---- 1-2. VAE round trip and reward scoring ----------------------------------------------------------
    roundtrip_images: int = opt(32, "Shapes images round-tripped through the VAE")
    roundtrip_videos: int = opt(4, "Shapes videos (16 frames) round-tripped through the VAE")
    score_rewards: list[str] = opt(["jpeg-compressibility", "colorfulness", "shapes-color"],
                                   "reward_adapters rewards shown on a few Shapes images (stage 2)")
    num_scored: int = opt(8, "Shapes images scored in stage 2")
    # ---- 3. latent cache ---------------------------------------------------------------------------------
    num_images: int = opt(6000, "Shapes images in the latent cache (scale up on a GPU, e.g. 20000)")
    cache_batch_size: int = opt(256, "records per cache-build batch")
    cache_workers: int = opt(2, "cache loader threads rendering Shapes images")
    # ---- 4. latent reward models ---------------------------------------------------------------------------
    lrm_reward: str = opt("jpeg-compressibility", "pixel reward the image LRM imitates (also the fine-tune's gold)")
    lrm_head: str = opt("image-cnn", "LRM head for lrm_reward (lrm lrms list)")
    text_lrm_reward: str = opt("shapes-color", "prompt-adherence reward for a text-conditioned LRM ('' = none)")
    text_lrm_head: str = opt("text-image-cnn", "text-conditioned LRM head for text_lrm_reward")
    lrm_width: int = opt(64, "channel width of the LRM heads")
    lrm_steps: int = opt(1000, "LRM optimizer steps (early stopping on held-out Spearman)")
    lrm_batch_size: int = opt(128, "LRM samples per optimizer step")
    lrm_eval_every: int = opt(100, "LRM validation interval in steps")
    # ---- 5. fine-tuning ------------------------------------------------------------------------------------
    finetune_steps: int = opt(90, "LRM fine-tuning steps of the 4-step student (one optimizer step each)")
    finetune_batch_size: int = opt(16, "student samples per fine-tuning step")
    finetune_lr: float = opt(3e-5, "student learning rate")
    num_prompts: int = opt(64, "Shapes captions in the fine-tuning prompt pool")
    study_checkpoints: int = opt(6, "students saved (and evaluated) at evenly spaced steps, besides step 0")
    # ---- 6. evaluation -------------------------------------------------------------------------------------
    eval_prompts: int = opt(32, "held-out Shapes captions for the evaluation of every checkpoint")
    eval_samples_per_prompt: int = opt(2, "samples per evaluation prompt (fixed seeds, same for every checkpoint)")
    eval_batch_size: int = opt(64, "samples per generator call in the evaluation")
    n_bootstrap: int = opt(200, "bootstrap resamples (over prompts) for the evaluation's 95% confidence intervals")

    def __post_init__(self):
        for k in ("num_images", "cache_batch_size", "cache_workers", "lrm_steps", "lrm_batch_size", "lrm_eval_every",
                  "finetune_steps", "finetune_batch_size", "num_prompts", "study_checkpoints", "eval_prompts",
                  "eval_samples_per_prompt", "eval_batch_size", "n_bootstrap", "lrm_width"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k} must be >= 1, got {getattr(self, k)}")
        for k in ("roundtrip_images", "roundtrip_videos", "num_scored"):
            if getattr(self, k) < 0:
                raise ConfigError(f"{k} must be >= 0, got {getattr(self, k)}")
        if self.num_images < 32:
            raise ConfigError(f"num_images must be >= 32 (the LRM holds out whole prompts for validation), got "
                              f"{self.num_images}")
        if self.study_checkpoints > self.finetune_steps:
            raise ConfigError(f"study_checkpoints ({self.study_checkpoints}) must be <= finetune_steps "
                              f"({self.finetune_steps})")
        if self.text_lrm_reward and self.text_lrm_reward == self.lrm_reward:
            raise ConfigError(f"text_lrm_reward and lrm_reward are both {self.lrm_reward!r}; pick another "
                              "text_lrm_reward or '' for none")

    @property
    def cache_rewards(self) -> list[str]:
        return [self.lrm_reward] + ([self.text_lrm_reward] if self.text_lrm_reward else [])

    @property
    def checkpoint_steps(self) -> list[int]:
        k = self.study_checkpoints
        return sorted({max(1, round(self.finetune_steps * (i + 1) / k)) for i in range(k)})


# ---- resumable stages ------------------------------------------------------------------------------------
def _stage(marker: Path, key: dict, run: Callable[[], dict], fresh: Callable[[], None] | None = None) -> dict:
    """Run a stage unless ``marker`` records a finished run with the same ``key``; returns the stage summary.

    A marker with another key means the settings changed: ``fresh`` clears the stage's outputs first. A missing or
    unfinished marker lets the stage resume from what the packages checkpointed (cache shards, training states).
    """
    if marker.exists():
        m = read_json(marker)
        if m.get("key") == key and m.get("complete"):
            log.info("%s: reusing the finished stage in %s (same settings)", marker.parent.name or marker.stem,
                     marker.parent)
            return {**m["summary"], "reused": True}
        if m.get("key") != key and fresh is not None:
            log.info("%s: settings changed since the last run; starting this stage afresh", marker.parent.name)
            fresh()
    marker.parent.mkdir(parents=True, exist_ok=True)
    write_json(marker, {"key": key, "complete": False})
    summary = run()
    write_json(marker, {"key": key, "complete": True, "summary": summary})
    return summary


def _fmt(x: Any) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def _finite(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


# ---- 1. VAE round trip ---------------------------------------------------------------------------------
def encode_decode_stage(cfg: DemoConfig, run_dir: Path) -> dict:
    """Generate Shapes images/videos, encode with the shipped VAE and decode; grid PNGs + PSNR."""
    from lrm.latent_space import VAE
    from shapes import ShapesWorld
    from shapes.grid import save_grid, save_video_strip
    from shapes.train_vae import psnr

    vae = VAE.shapes()
    t0 = time.time()
    summary: dict[str, Any] = {"latent_space": vae.latent_space.to_dict()}
    if cfg.roundtrip_images:
        imgs, captions, _ = ShapesWorld(seed=cfg.seed).batch(range(cfg.roundtrip_images))
        z = vae.encode(imgs)
        rec = vae.decode(z)
        n = min(8, cfg.roundtrip_images)
        save_grid(torch.cat([imgs[:n], rec[:n]]), run_dir / "vae_roundtrip.png", nrow=n, scale=4)
        summary.update(image_latent_shape=list(z.shape[1:]), psnr_image_db=float(psnr(rec, imgs).mean()),
                       captions=captions[:n])
        log.info("VAE round trip: %d images %.2f dB (latents %s)", cfg.roundtrip_images, summary["psnr_image_db"],
                 tuple(z.shape[1:]))
    if cfg.roundtrip_videos:
        vids, vcaps, _ = ShapesWorld(num_frames=16, seed=cfg.seed).batch(range(cfg.roundtrip_videos))
        vrec = vae.decode(vae.encode(vids))
        save_video_strip(torch.stack([vids, vrec], 1).flatten(0, 1), run_dir / "vae_roundtrip_video.png", scale=3)
        summary.update(psnr_video_frame_db=float(psnr(vrec.flatten(0, 1), vids.flatten(0, 1)).mean()),
                       video_captions=vcaps)
        log.info("VAE round trip: %d videos %.2f dB per frame", cfg.roundtrip_videos, summary["psnr_video_frame_db"])
    summary["seconds"] = time.time() - t0
    return summary


# ---- 2. pixel rewards ------------------------------------------------------------------------------------
def rewards_stage(cfg: DemoConfig, run_dir: Path) -> dict:
    """Score a few Shapes images with registered pixel rewards: ``rewards.csv`` (one row per image)."""
    import pandas as pd

    from reward_adapters import create_reward
    from shapes import ShapesWorld
    from shapes.grid import save_grid

    t0 = time.time()
    if not cfg.num_scored or not cfg.score_rewards:
        return {"seconds": 0.0, "rewards": {}}
    # indices past the round-trip images: other pictures than stage 1's
    imgs, captions, _ = ShapesWorld(seed=cfg.seed).batch(range(1000, 1000 + cfg.num_scored))
    table = {"image": list(range(cfg.num_scored)), "caption": captions}
    means = {}
    for name in cfg.score_rewards:
        r = create_reward(name)
        with torch.no_grad():
            v = torch.as_tensor(r(imgs, captions)).float().reshape(-1)
        table[name] = v.tolist()
        means[name] = {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max()),
                       "modality": str(r.modality), "version": str(r.version)}
        log.info("reward %-22s (%s): mean %.4g, range [%.4g, %.4g] on %d images", name, r.modality,
                 means[name]["mean"], means[name]["min"], means[name]["max"], cfg.num_scored)
    pd.DataFrame(table).to_csv(run_dir / "rewards.csv", index=False)
    save_grid(imgs, run_dir / "rewards_images.png", nrow=cfg.num_scored, scale=4)
    return {"seconds": time.time() - t0, "num_images": cfg.num_scored, "rewards": means}


# ---- 3. latent cache -------------------------------------------------------------------------------------
def cache_stage(cfg: DemoConfig, run_dir: Path, text_encoder) -> dict:
    """Build (or resume / extend) the Shapes image cache in ``cache/`` with the LRM rewards."""
    from data_cache import BuildCacheConfig, LatentCache, SourceConfig, build_cache
    from data_cache.storage import CacheError

    root = run_dir / "cache"
    t0 = time.time()
    exists = (root / "manifest.json").exists()
    overwrite = False
    if exists:
        man = read_json(root / "manifest.json")
        src = man.get("source_config") or {}
        if sorted(man.get("rewards", {})) != sorted(cfg.cache_rewards) or src.get("seed") != cfg.seed:
            log.info("cache %s holds rewards %s (seed %s); this run needs %s (seed %d): rebuilding it", root,
                     sorted(man.get("rewards", {})), src.get("seed"), cfg.cache_rewards, cfg.seed)
            overwrite = True
    bcfg = BuildCacheConfig(
        out_dir=str(root), source=SourceConfig(type="shapes", num_samples=cfg.num_images, seed=cfg.seed),
        rewards=cfg.cache_rewards, batch_size=cfg.cache_batch_size, shard_size=max(512, cfg.cache_batch_size),
        num_workers=cfg.cache_workers, device=cfg.device, latent_dtype="float32",
        resume=exists and not overwrite, overwrite=overwrite, progress=cfg.progress)
    try:
        res = build_cache(bcfg, text_encoder=text_encoder)
    except CacheError as e:  # e.g. the cache was built with other batch / shard settings
        log.info("cannot extend %s (%s): rebuilding it", root, e)
        bcfg.resume, bcfg.overwrite = False, True
        res = build_cache(bcfg, text_encoder=text_encoder)
    cache = LatentCache.open(root)
    t = cache.tensors()
    stats = {}
    for name in cache.reward_names:
        v = t[f"reward/{name}"]
        v = v[torch.isfinite(v)]
        stats[name] = {"mean": float(v.mean()), "std": float(v.std()), "num_finite": int(v.numel())}
    summary = {"records": len(cache), "new_records": int(res["records_written"]), "build_seconds": res["seconds"],
               "records_per_s": res["records_per_s"] if res["records_written"] else None,
               "num_prompts": len(set(cache.prompts)), "latent_shape": list(t["latents"].shape[1:]),
               "rewards": stats, "seconds": time.time() - t0}
    log.info("cache: %d records (%d new, %.1f rec/s), %d distinct prompts, rewards %s", len(cache),
             res["records_written"], res["records_per_s"], summary["num_prompts"], cache.reward_names)
    return summary


# ---- 4. latent reward models -----------------------------------------------------------------------------
def lrm_stage(cfg: DemoConfig, run_dir: Path, reward: str, head: str) -> dict:
    """``fit`` an LRM on the cache; held-out metrics beside the ridge baseline on the same split."""
    from data_cache import LatentCache
    from latent_rewards import FitConfig, fit
    from lrm.config import config_to_dict

    out = run_dir / f"lrm_{reward}"
    cache = LatentCache.open(run_dir / "cache")
    fcfg = FitConfig(head=head, head_kwargs={"width": cfg.lrm_width, "patch": 2, "depth": 2}, steps=cfg.lrm_steps,
                     batch_size=cfg.lrm_batch_size, eval_every=cfg.lrm_eval_every, patience=5,
                     warmup_steps=min(100, max(1, cfg.lrm_steps // 10)), seed=cfg.seed, device=cfg.device,
                     checkpoint_every=500, progress=cfg.progress)
    key = {"fit": config_to_dict(fcfg), "records": len(cache), "reward": reward}

    def run() -> dict:
        t0 = time.time()
        res = fit(cache, fcfg, reward_name=reward, out_dir=out)
        m, b = res.metrics, res.baseline_metrics
        return {"reward": reward, "head": head, "dir": out.name, "num_train": int(len(res.train_idx)),
                "num_val": int(len(res.val_idx)), "spearman": m["spearman"], "r2": m["r2"],
                "pearson": m["pearson"], "ridge_spearman": b["spearman"], "ridge_r2": b["r2"],
                "best_step": int(res.best_step), "train_seconds": res.train_time_s, "seconds": time.time() - t0}

    return _stage(out / "demo_stage.json", key, run, fresh=lambda: shutil.rmtree(out, ignore_errors=True))


# ---- 5. LRM fine-tuning ----------------------------------------------------------------------------------
def _log_rows(path: Path) -> list[dict]:
    import csv

    if not path.exists():
        return []
    with open(path) as fh:
        return list(csv.DictReader(fh))


def _num(row: dict, k: str) -> float | None:
    v = row.get(k, "")
    return float(v) if v not in ("", None) else None


def finetune_stage(cfg: DemoConfig, run_dir: Path, lrm) -> dict:
    """Fine-tune the shipped Shapes image teacher's 4-step student against the LRM; students at checkpoints."""
    from distill.finetune import FinetuneConfig, build_finetune
    from lrm.config import config_to_dict

    out = run_dir / "finetune"
    steps = cfg.checkpoint_steps
    fcfg = FinetuneConfig(
        method="lrm", run_dir=str(out), seed=cfg.seed, device=cfg.device, teacher="shapes-image",
        gold_reward=cfg.lrm_reward, lrm_path=str(run_dir / f"lrm_{cfg.lrm_reward}"), num_prompts=cfg.num_prompts,
        student_steps=4, steps=cfg.finetune_steps, batch_size=cfg.finetune_batch_size, lr=cfg.finetune_lr,
        eval_every=0, num_eval=64, log_every=max(1, cfg.finetune_steps // 6), ckpt_every=0, sample_every=0,
        num_sample_prompts=8, samples_per_prompt=4, resume=True, progress=cfg.progress)
    lrm_meta = read_json(run_dir / f"lrm_{cfg.lrm_reward}" / "metadata.json")
    key = {"finetune": config_to_dict(fcfg), "checkpoints": steps, "lrm": lrm_meta.get("training")}

    def run() -> dict:
        t0 = time.time()
        trainer = None
        try:
            for s in steps:
                sdir = out / "students" / f"step_{s:06d}"
                if (sdir / "student.json").exists():
                    continue
                if trainer is None:
                    trainer = build_finetune(fcfg, lrm=lrm, progress=cfg.progress)
                trainer.train(steps=s)  # resumes from finetune/checkpoint (saved at the end of each segment)
                trainer.save_student(sdir)
        finally:
            if trainer is not None:
                trainer.close()
        rows = _log_rows(out / "log.csv")
        train = [r for r in rows if _num(r, "proxy_reward") is not None]
        evals = [(int(r["step"]), _num(r, "eval_gold_reward")) for r in rows if _num(r, "eval_gold_reward") is not None]
        k = max(1, min(5, len(train) // 2))
        mean = lambda rs, c: sum(_num(r, c) for r in rs) / len(rs) if rs else None  # noqa: E731
        return {"method": "lrm", "teacher": "shapes-image", "student_steps": 4, "steps": cfg.finetune_steps,
                "lr": cfg.finetune_lr, "batch_size": cfg.finetune_batch_size, "gold_reward": cfg.lrm_reward,
                "checkpoints": steps, "eval_gold_start": evals[0][1] if evals else None,
                "eval_gold_final": evals[-1][1] if evals else None, "eval_gold_curve": evals,
                "train_proxy_first": mean(train[:k], "proxy_reward"),
                "train_proxy_last": mean(train[-k:], "proxy_reward"),
                "train_gold_first": mean(train[:k], "gold_reward"), "train_gold_last": mean(train[-k:], "gold_reward"),
                "step_seconds": sum(_num(r, "step_time_s") or 0.0 for r in train), "seconds": time.time() - t0}

    return _stage(out / "demo_stage.json", key, run, fresh=lambda: shutil.rmtree(out, ignore_errors=True))


# ---- 6. evaluation, study and report ------------------------------------------------------------------------
class _Proxy:
    """An LRM as an ``eval.evaluate`` proxy reward: image LRMs get no text."""

    def __init__(self, lrm):
        self.lrm = lrm

    def __call__(self, latents, text_tokens=None, text_mask=None):
        if self.lrm.needs_text:
            return self.lrm(latents, text_tokens, text_mask)
        return self.lrm(latents)


def eval_stage(cfg: DemoConfig, run_dir: Path, lrms: dict, text_encoder) -> dict:
    """Evaluate step 0 (the teacher's 4-step student path) and every saved student on held-out prompts with
    ``eval.study.run_study`` (d = distance from step 0 under shared noise); writes study files into the run dir."""
    import pandas as pd

    from distill.denoiser import Denoiser
    from distill.models import load_shapes_teacher
    from eval.evaluate import shapes_accuracy_rewards
    from eval.generators import DenoiserGenerator, shapes_prompts
    from eval.study import run_study
    from lrm.latent_space import VAE
    from reward_adapters import create_reward

    t0 = time.time()
    device = resolve_device(cfg.device)
    vae = VAE.shapes(device=device)
    teacher = load_shapes_teacher("image", device=device)
    ts = [999, 749, 499, 249]
    reference = DenoiserGenerator(teacher, sampler="student", timesteps=ts)
    students = [(s, run_dir / "finetune" / "students" / f"step_{s:06d}") for s in cfg.checkpoint_steps]

    def checkpoints():
        yield 0, reference, {}
        for s, d in students:
            yield s, DenoiserGenerator(Denoiser.from_pretrained(d, device=device), sampler="student", timesteps=ts), {}

    prompts = shapes_prompts(cfg.eval_prompts, seed=1000 + cfg.seed)  # not the training world's seed
    gold_names = list(dict.fromkeys(cfg.cache_rewards))
    gold = {n: create_reward(n) for n in gold_names}
    proxy = {f"lrm-{name}": _Proxy(m.to(device).eval()) for name, m in lrms.items()}
    n = cfg.eval_samples_per_prompt
    res = run_study(checkpoints(), prompts, run_dir, reference=reference, gold=f"gold/{cfg.lrm_reward}",
                    write_html=False, n_per_prompt=n, seeds=cfg.seed, gold_rewards=gold, proxy_rewards=proxy,
                    decode=vae, text_encoder=text_encoder, latent_shape=vae.latent_space.latent_shape(32, 32),
                    accuracy_rewards=shapes_accuracy_rewards(), batch_size=cfg.eval_batch_size, device=device,
                    n_bootstrap=cfg.n_bootstrap, n_preview=min(8, len(prompts)) * n, progress=cfg.progress)
    table: pd.DataFrame = res.table
    cols = [c for c in table.columns if c.startswith(("gold/", "proxy/", "acc/")) or c in ("diversity", "d")]
    cols = [c for c in cols if not c.endswith(("_ci_low", "_ci_high"))]
    per_step = {int(r["step"]): {c: _finite(r[c]) for c in cols if c in r} for _, r in table.iterrows()}
    first, last = per_step[min(per_step)], per_step[max(per_step)]
    return {"prompts": len(prompts), "samples_per_prompt": n, "checkpoints": sorted(per_step),
            "before": first, "after": last, "per_step": per_step, "peak": res.peak, "early_stop": res.early_stop,
            "seconds": time.time() - t0}


def _stage_table(summary: dict, run_dir: Path) -> None:
    """``stages.csv`` and ``lrm_metrics.csv``: the report's first tables."""
    import pandas as pd

    rows = []
    for name in STAGES:
        s = summary.get(name)
        if s is not None:
            rows.append({"stage": name, "seconds": round(float(s.get("seconds", 0.0)), 1),
                         "reused": bool(s.get("reused", False))})
    pd.DataFrame(rows).to_csv(run_dir / "stages.csv", index=False)
    lrm_rows = [{k: v for k, v in s.items() if k not in ("dir", "reused")} for s in summary.get("lrm", {}).values()
                if isinstance(s, dict)]
    if lrm_rows:
        pd.DataFrame(lrm_rows).to_csv(run_dir / "lrm_metrics.csv", index=False)


def run_demo(cfg: DemoConfig) -> dict:
    from lrm.text import TextEncoder

    t_start = time.time()
    run_dir = prepare_run_dir(cfg.out_dir, cfg, "lrm.demo")
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    log.info("lrm demo in %s on %s: cache %d images, LRM %s on %s%s, fine-tune %d steps, eval %d prompts x %d",
             run_dir, device, cfg.num_images, cfg.lrm_head, cfg.lrm_reward,
             f" + {cfg.text_lrm_head} on {cfg.text_lrm_reward}" if cfg.text_lrm_reward else "", cfg.finetune_steps,
             cfg.eval_prompts, cfg.eval_samples_per_prompt)
    summary: dict[str, Any] = {}

    def done(name: str, s: dict) -> None:
        summary[name] = s
        summary["total_seconds"] = time.time() - t_start
        write_json(run_dir / "summary.json", summary)

    log.info("[1/6] VAE round trip")
    done("encode_decode", encode_decode_stage(cfg, run_dir))
    log.info("[2/6] pixel rewards on Shapes images")
    done("rewards", rewards_stage(cfg, run_dir))
    text_encoder = TextEncoder(device=device)
    log.info("[3/6] latent cache (%d Shapes images, rewards %s)", cfg.num_images, cfg.cache_rewards)
    done("cache", cache_stage(cfg, run_dir, text_encoder))

    log.info("[4/6] latent reward models")
    from latent_rewards import LatentReward

    lrm_summary, lrms = {}, {}
    pairs = [(cfg.lrm_reward, cfg.lrm_head)] + ([(cfg.text_lrm_reward, cfg.text_lrm_head)]
                                                 if cfg.text_lrm_reward else [])
    for reward, head in pairs:
        s = lrm_stage(cfg, run_dir, reward, head)
        lrm_summary[reward] = s
        lrms[reward] = LatentReward.from_pretrained(run_dir / s["dir"])
        log.info("LRM %s on %s: held-out Spearman %.4f (ridge %.4f), R2 %.4f (ridge %.4f)", head, reward,
                 s["spearman"], s["ridge_spearman"], s["r2"], s["ridge_r2"])
    lrm_summary["seconds"] = sum(s["seconds"] for s in lrm_summary.values() if isinstance(s, dict))
    done("lrm", lrm_summary)

    log.info("[5/6] LRM fine-tuning of the 4-step student (%d steps)", cfg.finetune_steps)
    ft = finetune_stage(cfg, run_dir, lrms[cfg.lrm_reward])
    log.info("fine-tune: gold %s on the trainer's fixed eval set %s -> %s; proxy (LRM) on training batches %s -> %s",
             cfg.lrm_reward, *(_fmt(ft[k]) for k in ("eval_gold_start", "eval_gold_final", "train_proxy_first",
                                                     "train_proxy_last")))
    done("finetune", ft)

    log.info("[6/6] evaluation of %d checkpoints, study and report", 1 + len(cfg.checkpoint_steps))
    key = {"eval": {k: getattr(cfg, k) for k in ("eval_prompts", "eval_samples_per_prompt", "eval_batch_size",
                                                 "n_bootstrap", "seed")},
           "checkpoints": ft["checkpoints"], "finetune_curve": ft["eval_gold_curve"],
           "lrm": {r: s["spearman"] for r, s in lrm_summary.items() if isinstance(s, dict)}}
    ev = _stage(run_dir / "checkpoints" / "demo_stage.json", key,
                lambda: eval_stage(cfg, run_dir, lrms, text_encoder))
    g = f"gold/{cfg.lrm_reward}"
    p = f"proxy/lrm-{cfg.lrm_reward}"
    peak = (ev.get("peak") or {}).get("observed") or {}
    early = ev.get("early_stop") or {}
    log.info("eval on %d held-out prompts: %s %s (step 0) -> %s (step %d), peak %s at step %s; %s %s -> %s; "
             "early-stopping recommendation: step %s", ev["prompts"], g, _fmt(ev["before"].get(g)),
             _fmt(ev["after"].get(g)), ev["checkpoints"][-1], _fmt(peak.get("value")), peak.get("step"), p,
             _fmt(ev["before"].get(p)), _fmt(ev["after"].get(p)), early.get("step"))
    done("eval", ev)
    _stage_table(summary, run_dir)

    from eval.report import write_report

    summary["report"] = "report.html"
    write_json(run_dir / "summary.json", summary)
    report = write_report(run_dir, title="lrm demo: Shapes world, end to end")
    files = ["report.html", "summary.json", "vae_roundtrip.png", "rewards.csv", "cache/",
             *[f"lrm_{r}/ (LatentReward, calibration.png)" for r, _ in pairs],
             "finetune/ (log.csv, samples/, students/)", "study.csv", "checkpoints/ (per-checkpoint evaluations)"]
    lines = [f"LRM {s['head']} on {r}: held-out Spearman {s['spearman']:.3f} (ridge {s['ridge_spearman']:.3f}), "
             f"R2 {s['r2']:.3f} (ridge {s['ridge_r2']:.3f})" for r, s in lrm_summary.items() if isinstance(s, dict)]
    lines.append(f"fine-tune ({cfg.finetune_steps} steps): {g} {_fmt(ev['before'].get(g))} -> "
                 f"{_fmt(ev['after'].get(g))}, peak {_fmt(peak.get('value'))} at step {peak.get('step')}; "
                 f"{p} {_fmt(ev['before'].get(p))} -> {_fmt(ev['after'].get(p))}")
    print(f"\ndemo finished in {summary['total_seconds']:.0f}s\n  " + "\n  ".join(lines)
          + f"\noutputs in {run_dir}/:\n  " + "\n  ".join(files) + f"\nopen {report}")
    return summary


def register(sub: argparse._SubParsersAction) -> None:
    add_config_command(sub, "demo", DemoConfig, run_demo, "run the main job on the built-in Shapes world")
