"""``lrm eval --config FILE`` (evaluate one generator) and ``lrm report RUN_DIR`` (HTML page of a run directory)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lrm.config import ConfigError, opt

IMAGE_GOLD = ["shapes-adherence", "jpeg-compressibility", "colorfulness", "sharpness"]
VIDEO_GOLD = ["shapes-adherence", "temporal-flickering", "motion-magnitude", "jpeg-compressibility"]


@dataclass
class EvalConfig:
    out_dir: str = opt("runs/eval", "output directory: samples/per_prompt/summary (.parquet + .csv), eval.json, "
                                    "samples.png (.gif for video), report.html")
    # ---- generator ---------------------------------------------------------------------------------------
    generator: Literal["shapes-data", "denoiser"] = opt(
        "shapes-data", "shapes-data: real Shapes samples rendered for each prompt (the data distribution as a "
                       "reference generator); denoiser: sample a distill Denoiser (see `denoiser`, `sampler`)")
    denoiser: str = opt("shapes-image", "generator=denoiser: 'shapes-image' / 'shapes-video' (shipped teachers) or a "
                                        "Denoiser directory (e.g. RUN/student from `lrm distill` / `lrm finetune`)")
    sampler: Literal["ddim", "student", "stochastic"] = opt(
        "ddim", "ddim (deterministic, `steps`), student (k-step consistency sampler at `timesteps`, default "
                "999,749,499,249) or stochastic (DDIM(eta) posterior chain, the DDPO sampler)")
    steps: int = opt(50, "sampling steps for ddim / stochastic (trailing spacing)")
    timesteps: list[int] | None = opt(None, "explicit timesteps, e.g. [999, 749, 499, 249] (overrides steps)")
    guidance_scale: float | None = opt(None, "Imagen-form CFG scale s (None = conditional only; s != 1 doubles NFE)")
    eta: float = opt(1.0, "DDIM eta of the stochastic sampler (1 = DDPM posterior)")
    pixel_noise: float = opt(0.0, "generator=shapes-data: std of pixel noise added before encoding (0 = real data)")
    # ---- distance from a reference -------------------------------------------------------------------------
    reference: str | None = opt(None, "reference for d = sqrt(KL): None (no distance), 'shapes-data', or a "
                                      "denoiser spec like `denoiser` (same sampler). stochastic sampler + denoiser "
                                      "reference: exact chain KL; otherwise smoothed-output KL at kl_sigma")
    kl_sigma: float = opt(1.0, "std (scaled-latent units) of the Gaussian smoothing of the smoothed-output KL")
    # ---- world and prompts ----------------------------------------------------------------------------------
    video: bool = opt(False, "evaluate videos (Shapes video world, num_frames frames)")
    num_frames: int = opt(16, "frames per video (video: true)")
    image_size: int = opt(32, "pixel size of the Shapes world (32 or 64)")
    prompts_file: str | None = opt(None, "text file with one prompt per line; None: Shapes captions")
    num_prompts: int = opt(32, "number of Shapes captions (prompts_file: None)")
    prompt_seed: int = opt(1000, "ShapesWorld seed of the captions (differs from training seeds: held-out prompts)")
    n_per_prompt: int = opt(4, "samples per prompt (DOLLAR's diversity uses 5)")
    seed: int = opt(0, "base seed: sample j of every prompt uses seed + j")
    # ---- metrics ----------------------------------------------------------------------------------------------
    gold_rewards: list[str] | None = opt(None, "reward_adapters names; None: " + ", ".join(IMAGE_GOLD) +
                                         " (images) / " + ", ".join(VIDEO_GOLD) + " (videos)")
    proxy_rewards: list[str] = opt([], "LatentReward directories (from `lrm train`) scored on the latents")
    accuracy: bool = opt(True, "Shapes attribute accuracy from the shapes-* rewards (prompts must be Shapes captions)")
    keyframe_stride: int = opt(20, "diversity keyframes: every Nth frame (DOLLAR Eq. 27)")
    diversity_features: Literal["pixels", "pooled", "vae"] = opt(
        "pixels", "features of the Vendi diversity (cosine kernel): pixels (raw, DOLLAR Eq. 27), pooled (pixels "
                  "average-pooled to diversity_pool x diversity_pool: insensitive to pixel noise) or vae (the VAE "
                  "encoder's latents of the decoded pixels)")
    diversity_pool: int = opt(8, "diversity_features=pooled: pooled size in pixels per side")
    n_bootstrap: int = opt(1000, "bootstrap resamples (over prompts) for the 95% confidence intervals")
    # ---- models and runtime --------------------------------------------------------------------------------
    vae: str = opt("shapes", "'shapes' (shipped Shapes VAE) or a diffusers AutoencoderKL path / hub id")
    vae_subfolder: str | None = opt(None, "VAE subfolder inside a pipeline repo (e.g. 'vae')")
    text_encoder: str = opt("all-MiniLM-L6-v2", "text encoder name or path (lrm.text.TextEncoder)")
    batch_size: int = opt(32, "samples per generator call")
    device: str = opt("auto", "'auto', 'cpu', 'cuda' or 'cuda:N'")
    report: bool = opt(True, "write report.html")

    def __post_init__(self):
        if self.n_per_prompt < 1:
            raise ConfigError(f"n_per_prompt must be >= 1, got {self.n_per_prompt}")
        if self.num_prompts < 1:
            raise ConfigError(f"num_prompts must be >= 1, got {self.num_prompts}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.kl_sigma <= 0:
            raise ConfigError(f"kl_sigma must be > 0, got {self.kl_sigma}")
        if self.pixel_noise < 0:
            raise ConfigError(f"pixel_noise must be >= 0, got {self.pixel_noise}")
        if self.diversity_pool < 1:
            raise ConfigError(f"diversity_pool must be >= 1, got {self.diversity_pool}")
        if self.image_size not in (32, 64):
            raise ConfigError(f"image_size must be 32 or 64 (the Shapes world), got {self.image_size}")
        if self.generator == "shapes-data" and self.reference not in (None, "shapes-data"):
            raise ConfigError(f"generator=shapes-data takes reference None or 'shapes-data', got {self.reference!r}: "
                              "rendered data shares no noise with a denoiser, so a paired distance is meaningless")


def _load_denoiser(spec: str, device):
    if spec in ("shapes-image", "shapes-video"):
        from distill.models import load_shapes_teacher

        return load_shapes_teacher(spec.split("-", 1)[1], device=device)
    if not Path(spec).is_dir():
        raise ConfigError(f"denoiser {spec!r} is neither 'shapes-image' / 'shapes-video' nor a Denoiser directory")
    from distill.denoiser import Denoiser

    return Denoiser.from_pretrained(spec, device=device)


def build_generators(cfg: EvalConfig, vae, device):
    """(generator, reference generator or None) from the config."""
    from eval.generators import DenoiserGenerator, ShapesDataGenerator

    nf = cfg.num_frames if cfg.video else None

    def data(noise_std):
        return ShapesDataGenerator(vae, num_frames=nf, image_size=cfg.image_size, pixel_noise=noise_std)

    if cfg.generator == "shapes-data":
        gen = data(cfg.pixel_noise)
        return gen, (data(0.0) if cfg.reference == "shapes-data" else None)
    den = _load_denoiser(cfg.denoiser, device)
    if den.is_video != cfg.video:
        raise ConfigError(f"denoiser {cfg.denoiser!r} is a {'video' if den.is_video else 'image'} model but video="
                          f"{cfg.video}; set --video {str(den.is_video).lower()}")
    kw = dict(sampler=cfg.sampler, steps=cfg.steps, timesteps=cfg.timesteps, guidance_scale=cfg.guidance_scale,
              eta=cfg.eta)
    if cfg.reference is None:
        return DenoiserGenerator(den, **kw), None
    if cfg.reference == "shapes-data":
        return DenoiserGenerator(den, **kw), data(0.0)
    ref_den = _load_denoiser(cfg.reference, device)
    if cfg.sampler == "stochastic":  # exact chain KL inside the generator
        return DenoiserGenerator(den, reference=ref_den, **kw), None
    return DenoiserGenerator(den, **kw), DenoiserGenerator(ref_den, **kw)


def run_eval(cfg: EvalConfig):
    """Build everything from the config, evaluate, save tables + preview, write the report."""
    from eval.evaluate import diversity_embedding, evaluate, shapes_accuracy_rewards
    from eval.generators import shapes_prompts
    from lrm.latent_space import VAE
    from lrm.run import get_logger, prepare_run_dir, resolve_device, seed_everything
    from lrm.text import TextEncoder

    out = prepare_run_dir(cfg.out_dir, cfg, logger_name="lrm.eval")
    log = get_logger("lrm.eval")
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    vae = VAE.shapes(device=device) if cfg.vae == "shapes" else VAE.from_pretrained(
        cfg.vae, subfolder=cfg.vae_subfolder, device=device)
    text = TextEncoder(cfg.text_encoder, device=device)
    nf = cfg.num_frames if cfg.video else None
    if cfg.prompts_file:
        p = Path(cfg.prompts_file)
        if not p.exists():
            raise ConfigError(f"prompts_file {p} does not exist")
        prompts = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
        if not prompts:
            raise ConfigError(f"prompts_file {p} holds no prompts (one per line)")
    else:
        prompts = shapes_prompts(cfg.num_prompts, num_frames=nf, seed=cfg.prompt_seed)
    from reward_adapters import create_reward

    gold_names = cfg.gold_rewards if cfg.gold_rewards is not None else (VIDEO_GOLD if cfg.video else IMAGE_GOLD)
    gold = {n: create_reward(n) for n in gold_names}
    proxy = {}
    for d in cfg.proxy_rewards:
        from latent_rewards import LatentReward

        lrm = LatentReward.from_pretrained(d).to(device).eval()
        lrm.check_inputs(latent_space=vae.latent_space, text_encoder=text)
        proxy[f"{lrm.reward_name}@{Path(d).name}"] = lrm
    generator, reference = build_generators(cfg, vae, device)
    ds = vae.downsample
    C = int(vae.vae.config.latent_channels)
    latent_shape = (C, cfg.image_size // ds, cfg.image_size // ds)
    if cfg.video:
        latent_shape = (cfg.num_frames,) + latent_shape
    log.info("evaluating %s on %d prompts x %d samples (latents %s, gold %s, proxy %s, diversity on %s)", generator,
             len(prompts), cfg.n_per_prompt, latent_shape, gold_names, list(proxy), cfg.diversity_features)
    res = evaluate(generator, prompts, n_per_prompt=cfg.n_per_prompt, seeds=cfg.seed, gold_rewards=gold,
                   proxy_rewards=proxy, decode=vae, text_encoder=text, latent_shape=latent_shape,
                   accuracy_rewards=shapes_accuracy_rewards(cfg.video) if cfg.accuracy else None,
                   keyframe_stride=cfg.keyframe_stride, reference=reference, kl_sigma=cfg.kl_sigma,
                   diversity_features=diversity_embedding(cfg.diversity_features, vae, cfg.diversity_pool),
                   batch_size=cfg.batch_size, device=device, n_bootstrap=cfg.n_bootstrap,
                   n_preview=min(len(prompts), 8) * cfg.n_per_prompt, name=str(generator))
    res.meta["generator"] = repr(generator)
    res.save(out)
    print(res.summary.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if cfg.report:
        from eval.report import write_report

        path = write_report(out, title=f"evaluation: {generator}")
        print(f"wrote {path}")
    return res


def _report(ns: argparse.Namespace) -> None:
    from eval.report import write_report

    print(f"wrote {write_report(ns.run_dir, title=ns.title)}")


def register(sub: argparse._SubParsersAction) -> None:
    from lrm.cli import add_command, add_config_command

    add_config_command(sub, "eval", EvalConfig, run_eval,
                       help="evaluate a generator: gold/proxy rewards, Shapes accuracy, diversity (Vendi), speed, "
                            "distance from a reference; tables + report.html")

    def args(p: argparse.ArgumentParser) -> None:
        p.add_argument("run_dir", help="run directory (an `lrm eval` output, a study, or any folder of CSV/PNG)")
        p.add_argument("--title", default=None, help="page title (default: the directory name)")

    add_command(sub, "report", _report, help="write RUN_DIR/report.html: tables, plots and samples, viewable offline",
                args=args)

    from eval.overopt_run import OveroptConfig, run_overopt

    add_config_command(sub, "overopt", OveroptConfig, run_overopt,
                       help="reward-overoptimization study: fit a proxy LRM on a gold reward, fine-tune (lrm / ddpo / "
                            "direct) with checkpoints, evaluate gold and proxy vs d = sqrt(KL), Gao fits, peak gold, "
                            "early stopping; sweeps over any config key; report.html")
