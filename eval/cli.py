"""``lrm eval --config FILE`` (evaluate one generator) and ``lrm report RUN_DIR`` (HTML page of a run directory).

The generator is the Shapes data, or any teacher spec of ``distill.builders`` (a Shapes teacher, a Denoiser
directory, a diffusers pipeline) with the same model keys as ``lrm finetune``. A Stable-Diffusion-class pipeline::

    lrm eval --generator denoiser --denoiser /models/sd15 --vae /models/sd15 --vae_subfolder vae \
        --text_encoder /models/sd15 --text_max_length 77 --prompts_file prompts.csv --sampler ddim --steps 25 \
        --guidance_scale 7.5 --batch_size 16 --vae_bf16 true --vae_chunk_size 8

(image_size defaults to the UNet's sample_size x the VAE's factor: 512 px; the default gold rewards and accuracy
follow the prompts: the Shapes ones only for Shapes captions.)
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

from distill.builders import ModelSpec
from lrm.config import ConfigError, opt

# default gold rewards: the Shapes attribute reward only where the prompts are Shapes captions (it scores what a
# Shapes caption names); any other prompts get rewards that read pixels alone
IMAGE_GOLD = ["shapes-adherence", "jpeg-compressibility", "colorfulness", "sharpness"]
VIDEO_GOLD = ["shapes-adherence", "temporal-flickering", "motion-magnitude", "jpeg-compressibility"]
PLAIN_IMAGE_GOLD = ["colorfulness", "sharpness", "jpeg-compressibility"]
PLAIN_VIDEO_GOLD = ["temporal-flickering", "motion-magnitude", "jpeg-compressibility"]
SHAPES_SIZES = (32, 64)


@dataclass
class EvalConfig(ModelSpec):
    out_dir: str = opt("runs/eval", "output directory: samples/per_prompt/summary (.parquet + .csv), eval.json, "
                                    "samples.png (.gif for video), report.html")
    # ---- generator ---------------------------------------------------------------------------------------
    generator: Literal["shapes-data", "denoiser"] = opt(
        "shapes-data", "shapes-data: real Shapes samples rendered for each prompt (the data distribution as a "
                       "reference generator); denoiser: sample a distill Denoiser (see `denoiser`, `sampler`)")
    denoiser: str = opt("shapes-image", "generator=denoiser: any teacher spec of distill.builders: 'shapes-image' / "
                                        "'shapes-video' (shipped teachers), a Denoiser directory (e.g. RUN/student "
                                        "of `lrm distill` / `lrm finetune`) or a diffusers pipeline directory / hub "
                                        "id (then set vae, vae_subfolder, text_encoder, text_max_length to its own)")
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
    video: bool = opt(False, "evaluate videos (num_frames frames)")
    num_frames: int = opt(16, "frames per video (video: true)")
    image_size: int | None = opt(None, "pixel size of the samples. The Shapes world (generator or reference "
                                       "shapes-data, or vae 'shapes'): 32 or 64, default 32. Other VAEs: any "
                                       "multiple of the VAE's downsampling factor, default the denoiser's "
                                       "sample_size x that factor (SD-1.5: 64 x 8 = 512)")
    prompts_file: str | None = opt(None, "prompts: .txt (one per line), .csv or .jsonl (column / key prompt, "
                                         "caption or text); None: num_prompts Shapes captions")
    num_prompts: int = opt(32, "number of Shapes captions (prompts_file: None)")
    prompt_seed: int = opt(1000, "ShapesWorld seed of the captions (differs from training seeds: held-out prompts)")
    n_per_prompt: int = opt(4, "samples per prompt (DOLLAR's diversity uses 5)")
    seed: int = opt(0, "base seed: sample j of every prompt uses seed + j")
    # ---- metrics ----------------------------------------------------------------------------------------------
    gold_rewards: list[str] | None = opt(
        None, "reward_adapters names. None: for Shapes captions " + ", ".join(IMAGE_GOLD) + " (images) / " +
              ", ".join(VIDEO_GOLD) + " (videos); for other prompts (a prompts_file that is not Shapes captions) " +
              ", ".join(PLAIN_IMAGE_GOLD) + " / " + ", ".join(PLAIN_VIDEO_GOLD) + ". shapes-* rewards need Shapes "
              "captions")
    proxy_rewards: list[str] = opt([], "LatentReward directories (from `lrm train`) scored on the latents; each is "
                                       "checked against the VAE's latent space and the text encoder")
    accuracy: bool | None = opt(None, "Shapes attribute accuracy (acc/*) from the shapes-* rewards; None: on when "
                                      "every prompt is a Shapes caption (names a Shapes shape, color and background), "
                                      "else off; true with other prompts is an error")
    keyframe_stride: int = opt(20, "diversity keyframes: every Nth frame (DOLLAR Eq. 27)")
    diversity_features: Literal["pixels", "pooled", "vae"] = opt(
        "pixels", "features of the Vendi diversity (cosine kernel): pixels (raw, DOLLAR Eq. 27), pooled (pixels "
                  "average-pooled to diversity_pool x diversity_pool: insensitive to pixel noise) or vae (the VAE "
                  "encoder's latents of the decoded pixels)")
    diversity_pool: int = opt(8, "diversity_features=pooled: pooled size in pixels per side")
    n_bootstrap: int = opt(1000, "bootstrap resamples (over prompts) for the 95% confidence intervals")
    # ---- models and runtime --------------------------------------------------------------------------------
    batch_size: int = opt(32, "samples per generator call (the samples of one call are decoded in vae_chunk_size "
                              "chunks, then scored)")
    device: str = opt("auto", "'auto', 'cpu', 'cuda' or 'cuda:N'")
    compile: Literal["none", "default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"] = opt(
        "none", "torch.compile mode of the sampled networks and the VAE decoder (distill.inference): "
                "reduce-overhead adds CUDA graphs (best at small batch); the first batches pay the compilation")
    channels_last: bool = opt(False, "2-D convolution networks (UNet2D, the image VAE) in channels_last memory "
                                     "format (faster bf16 convolutions on GPU)")
    fuse_qkv: bool = opt(False, "fuse the q, k, v projections into one matmul (diffusers fuse_qkv_projections; "
                                "full or merged networks only)")
    save_samples: bool = opt(False, "one lossless WebP per sample in samples/ (the input of `lrm human-eval "
                                    "prepare`)")
    report: bool = opt(True, "write report.html")

    def __post_init__(self):
        super().__post_init__()
        for k in ("n_per_prompt", "num_prompts", "batch_size", "diversity_pool"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.kl_sigma <= 0:
            raise ConfigError(f"kl_sigma must be > 0, got {self.kl_sigma}")
        if self.pixel_noise < 0:
            raise ConfigError(f"pixel_noise must be >= 0, got {self.pixel_noise}")
        if self.image_size is not None:
            if self.shapes_world and self.image_size not in SHAPES_SIZES:
                raise ConfigError(f"image_size must be 32 or 64 in the Shapes world (generator / reference "
                                  f"shapes-data or vae 'shapes'), got {self.image_size}; a real-size evaluation "
                                  "needs a denoiser with its own vae")
            if self.image_size < 1:
                raise ConfigError(f"image_size must be >= 1, got {self.image_size}")
        if self.generator == "shapes-data" and self.reference not in (None, "shapes-data"):
            raise ConfigError(f"generator=shapes-data takes reference None or 'shapes-data', got {self.reference!r}: "
                              "rendered data shares no noise with a denoiser, so a paired distance is meaningless")
        if self.vae == "shapes":
            from distill.builders import teacher_is_diffusers

            specs = ([self.denoiser] if self.generator == "denoiser" else []) + \
                ([self.reference] if self.reference not in (None, "shapes-data") else [])
            for s in specs:
                if teacher_is_diffusers(self._spec(s)):
                    raise ConfigError(f"{s!r} is a diffusers model but vae is 'shapes' (the Shapes world's VAE): set "
                                      f"vae: {s}, vae_subfolder: vae, text_encoder: {s} and text_max_length (77 for "
                                      "Stable Diffusion's CLIP)")

    @property
    def shapes_world(self) -> bool:
        """Samples live in the Shapes world: rendered Shapes data, or the Shapes VAE's latent space."""
        return "shapes-data" in (self.generator, self.reference) or self.vae == "shapes"

    def _spec(self, teacher: str) -> SimpleNamespace:
        """The model keys of ``distill.builders`` for one denoiser spec (``denoiser`` or ``reference``)."""
        return SimpleNamespace(teacher=teacher, teacher_subfolder=self.teacher_subfolder, vae=self.vae,
                               vae_subfolder=self.vae_subfolder, vae_bf16=self.vae_bf16,
                               vae_chunk_size=self.vae_chunk_size, text_encoder=self.text_encoder,
                               text_max_length=self.text_max_length)


def load_prompts(cfg: EvalConfig) -> tuple[list[str], bool]:
    """(prompts, whether they are all Shapes captions): ``prompts_file`` (distill.builders.load_prompt_file) or
    ``num_prompts`` held-out Shapes captions."""
    from eval.generators import are_shapes_captions, shapes_prompts

    if cfg.prompts_file:
        from distill.builders import load_prompt_file

        prompts = load_prompt_file(cfg.prompts_file)
        return prompts, are_shapes_captions(prompts)
    return shapes_prompts(cfg.num_prompts, num_frames=cfg.num_frames if cfg.video else None,
                          seed=cfg.prompt_seed), True


def resolve_metrics(cfg: EvalConfig, prompts: list[str], shapes_captions: bool) -> tuple[list[str], bool]:
    """(gold reward names, accuracy on/off) for these prompts: the Shapes rewards only for Shapes captions."""
    source = cfg.prompts_file or "the Shapes captions"
    if cfg.gold_rewards is not None:
        gold = list(cfg.gold_rewards)
    elif shapes_captions:
        gold = VIDEO_GOLD if cfg.video else IMAGE_GOLD
    else:
        gold = PLAIN_VIDEO_GOLD if cfg.video else PLAIN_IMAGE_GOLD
    accuracy = shapes_captions if cfg.accuracy is None else cfg.accuracy
    if not shapes_captions:
        from eval.generators import is_shapes_caption

        bad = next(p for p in prompts if not is_shapes_caption(p))
        why = (f"the prompts of {source} are not Shapes captions (e.g. {bad[:60]!r} does not name a Shapes shape, "
               "color and background)")
        if accuracy:
            raise ConfigError(f"accuracy: true needs Shapes captions, but {why}; set accuracy: false")
        shapes_gold = [g for g in gold if g.startswith("shapes-")]
        if shapes_gold:
            raise ConfigError(f"gold_rewards {shapes_gold} score Shapes attributes, but {why}; drop them (e.g. "
                              f"gold_rewards: {PLAIN_VIDEO_GOLD if cfg.video else PLAIN_IMAGE_GOLD})")
    return gold, accuracy


def load_denoiser(cfg: EvalConfig, spec: str, device, vae=None, text_encoder=None):
    """The ``Denoiser`` of one spec (``distill.builders.build_teacher``), checked against the VAE's latent channels
    and the text encoder's width."""
    from distill.builders import build_teacher, check_text_width

    den = build_teacher(cfg._spec(spec), device, text_encoder=text_encoder)
    if den.is_video != cfg.video:
        raise ConfigError(f"denoiser {spec!r} is a {'video' if den.is_video else 'image'} model but video="
                          f"{cfg.video}; set --video {str(den.is_video).lower()}")
    want = den.family.latent_channels()
    if vae is not None and want is not None and int(want) != int(vae.vae.config.latent_channels):
        raise ConfigError(f"denoiser {spec!r} takes {want}-channel latents but vae {cfg.vae!r} makes "
                          f"{vae.vae.config.latent_channels}: set vae / vae_subfolder to the model's own VAE")
    if text_encoder is not None and getattr(text_encoder, "dim", None) is not None:
        check_text_width(den, text_encoder.dim, f"caption embeddings of text_encoder {cfg.text_encoder!r}")
    if cfg.compile != "none" or cfg.channels_last or cfg.fuse_qkv:
        from lrm.run import get_logger

        applied = den.prepare_for_sampling(cfg.compile, cfg.channels_last, cfg.fuse_qkv)
        get_logger("lrm.eval").info("denoiser %s prepared for sampling: %s", spec, applied)
    return den


def resolve_image_size(cfg: EvalConfig, vae, denoiser=None) -> int:
    """``image_size``, or its default: 32 in the Shapes world, else the denoiser's sample_size x the VAE's
    downsampling factor; refused unless divisible by that factor."""
    ds = int(vae.downsample)
    if cfg.image_size is not None:
        size = int(cfg.image_size)
    elif cfg.shapes_world or denoiser is None:
        size = SHAPES_SIZES[0]
    else:
        ss = getattr(getattr(denoiser.model, "config", None), "sample_size", None)
        ss = ss[0] if isinstance(ss, (list, tuple)) else ss
        if not ss:
            raise ConfigError(f"denoiser {cfg.denoiser!r} has no sample_size in its config: set image_size (pixels, "
                              f"a multiple of the VAE's downsampling factor {ds})")
        size = int(ss) * ds
    if size % ds or size < ds:
        raise ConfigError(f"image_size {size} is not a positive multiple of vae {cfg.vae!r}'s downsampling factor "
                          f"{ds}: the latents would not tile the image; use e.g. {max(1, round(size / ds)) * ds}")
    return size


def build_generators(cfg: EvalConfig, vae, device, text_encoder=None):
    """(generator, reference generator or None) from the config; ``text_encoder`` gives a diffusers denoiser its
    null caption (built from the config when None)."""
    from eval.generators import DenoiserGenerator, ShapesDataGenerator

    nf = cfg.num_frames if cfg.video else None

    def data(noise_std, den=None):
        return ShapesDataGenerator(vae, num_frames=nf, image_size=resolve_image_size(cfg, vae, den),
                                   pixel_noise=noise_std)

    if cfg.generator == "shapes-data":
        gen = data(cfg.pixel_noise)
        return gen, (data(0.0) if cfg.reference == "shapes-data" else None)
    den = load_denoiser(cfg, cfg.denoiser, device, vae, text_encoder)
    kw = dict(sampler=cfg.sampler, steps=cfg.steps, timesteps=cfg.timesteps, guidance_scale=cfg.guidance_scale,
              eta=cfg.eta, text_encoder=text_encoder)  # the pooled text of FLUX / SD3 / HunyuanVideo prompts
    if cfg.reference is None:
        return DenoiserGenerator(den, **kw), None
    if cfg.reference == "shapes-data":
        return DenoiserGenerator(den, **kw), data(0.0, den)
    ref_den = load_denoiser(cfg, cfg.reference, device, vae, text_encoder)
    if cfg.sampler == "stochastic":  # exact chain KL inside the generator
        return DenoiserGenerator(den, reference=ref_den, **kw), None
    return DenoiserGenerator(den, **kw), DenoiserGenerator(ref_den, **kw)


def run_eval(cfg: EvalConfig):
    """Build everything from the config, evaluate, save tables + preview, write the report.

    Memory at real size: the generator is called on ``batch_size`` samples at a time and their latents are decoded
    in ``vae_chunk_size`` chunks; only pixels of the diversity keyframes and the preview stay (on the CPU, fp16)."""
    from distill.builders import build_text_encoder, build_vae
    from eval.evaluate import diversity_embedding, evaluate, shapes_accuracy_rewards
    from lrm.run import get_logger, prepare_run_dir, resolve_device, seed_everything
    from reward_adapters import create_reward

    prompts, shapes_captions = load_prompts(cfg)
    gold_names, accuracy = resolve_metrics(cfg, prompts, shapes_captions)  # config errors before any model loads
    out = prepare_run_dir(cfg.out_dir, cfg, logger_name="lrm.eval")
    log = get_logger("lrm.eval")
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    vae = build_vae(cfg, device)
    if cfg.compile != "none" or cfg.channels_last:  # the decode side of the fast path (BENCHMARKS: its main gain)
        from distill.inference import prepare_vae_for_sampling

        log.info("vae prepared for sampling: %s", prepare_vae_for_sampling(vae, cfg.compile, cfg.channels_last))
    text = build_text_encoder(cfg, device)
    gold = {n: create_reward(n) for n in gold_names}
    proxy = {}
    for d in cfg.proxy_rewards:
        from distill.builders import load_latent_reward
        from eval.overopt_run import ProxyView

        lrm = load_latent_reward(d, vae, text, device).eval()
        proxy[f"{lrm.reward_name}@{Path(d).name}"] = ProxyView(lrm)  # drops the caption for text-free heads
    generator, reference = build_generators(cfg, vae, device, text)
    size = resolve_image_size(cfg, vae, getattr(generator, "denoiser", None))
    ds = vae.downsample
    C = int(vae.vae.config.latent_channels)
    latent_shape = (C, size // ds, size // ds)
    if cfg.video:
        latent_shape = (cfg.num_frames,) + latent_shape
    log.info("evaluating %s on %d %s x %d samples (%d px, latents %s, batch %d, gold %s, proxy %s, accuracy %s, "
             "diversity on %s)", generator, len(prompts), "Shapes captions" if shapes_captions else "prompts",
             cfg.n_per_prompt, size, latent_shape, cfg.batch_size, gold_names, list(proxy), accuracy,
             cfg.diversity_features)
    res = evaluate(generator, prompts, n_per_prompt=cfg.n_per_prompt, seeds=cfg.seed, gold_rewards=gold,
                   proxy_rewards=proxy, decode=vae, text_encoder=text, latent_shape=latent_shape,
                   accuracy_rewards=shapes_accuracy_rewards(cfg.video) if accuracy else None,
                   keyframe_stride=cfg.keyframe_stride, reference=reference, kl_sigma=cfg.kl_sigma,
                   diversity_features=diversity_embedding(cfg.diversity_features, vae, cfg.diversity_pool),
                   batch_size=cfg.batch_size, device=device, n_bootstrap=cfg.n_bootstrap,
                   n_preview=min(len(prompts), 8) * cfg.n_per_prompt, name=str(generator),
                   save_samples=cfg.save_samples)
    res.meta.update(generator=repr(generator), image_size=size, shapes_captions=shapes_captions)
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

    from eval.human_eval.cli import register as register_human_eval

    register_human_eval(sub)
