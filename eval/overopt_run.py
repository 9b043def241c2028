"""``lrm overopt --config FILE``: a reward-overoptimization study end to end, with sweeps (issue 8, Gao et al. 2022).

One run (``run_overopt`` without ``sweep``):
  1. proxy: method=lrm without ``lrm_path`` -> ``data_cache`` (a LatentCache with a ``reward/<gold_reward>``
     column) or, in the Shapes world, a Shapes latent cache scored by the gold pixel reward
     (``data_cache.build_cache``, shared by every sub-run of a sweep); an LRM fitted on its first
     ``lrm_train_size`` records (``latent_rewards.fit``; head, width, patch, ensemble size K configurable);
  2. fine-tuning: ``distill.finetune`` (method lrm / ddpo / direct) with the same model keys (``distill.builders``)
     and prompt pool (``prompt_file``, else ``data_cache``, else Shapes captions); the student is saved every
     ``eval_every`` trainer steps (``FinetuneTrainer.save_student``; with ``finetune: {lora_rank: N}`` a LoRA
     folder, fused into its base when studied), step 0 being the initial model;
  3. study: every saved student is evaluated with ``eval.study.run_study`` on held-out prompts (``eval_prompt_file``
     or Shapes captions): gold
     (pixel) reward, proxy (the LRM as optimised, and its ensemble mean), Shapes accuracy, diversity, and the
     distance d = sqrt(KL) from the step-0 model (smoothed-output KL for the deployed k-step sampler under
     shared noise, or the exact chain KL with ``eval_sampler: stochastic``); Gao et al. RL fits, peak-gold
     checkpoint (``early_stop.json``: uses gold, which only a study knows), a gold-free early-stopping
     recommendation from d and the optimised proxy (``early_stop_proxy.json``: ``d_budget`` / ``stop_slope_frac``)
     and ``study/report.html`` with sample grids per checkpoint;
  4. best-of-n (``bon_n`` > 0): a pool of ``bon_n`` fixed-seed samples per evaluation prompt from the step-0 model,
     scored by proxy and gold; the unbiased best-of-n estimator per prompt for n = 1, 2, 4, ... <= bon_n, at
     d = sqrt(KL_bon) = sqrt(log n - (n - 1)/n) -> ``study/bon.csv``, the R_bon(d) = d(alpha - beta d) fits
     (``bon/gold``, ``bon/proxy`` in ``study/fits.json``) and a best-of-n plot in the report.

Layout of a run directory::

    RUN/config.yaml, log.txt, summary.json (written last: a finished run), report.html -> study/report.html
    RUN/shared/cache-*/        latent cache (gold reward)          RUN/shared/lrm-*/  fitted LRM(s)
    RUN/finetune/              trainer run dir (log.csv, checkpoint/, samples/), students/step_XXXXXX/
    RUN/study/                 study.csv, fits.json, peak.json, early_stop.json, early_stop_proxy.json, report.html,
                               plots/, checkpoints/, bon.csv + bon_pool/ (bon_n > 0)

A sweep (``sweep: {key: [v1, v2, ...]}``; several keys = their product) runs one sub-run per value in
``RUN/<key>=<value>/`` (same layout, the cache and LRMs shared through ``RUN/shared``: an LRM is fitted once per
distinct LRM setting), skips sub-runs that already have ``summary.json``, and writes ``RUN/sweep.csv`` (one row per
value), ``RUN/plots/sweep_*.png`` (gold and proxy vs d per value; alpha and beta vs proxy size when the swept key
is an LRM size) and ``RUN/report.html``.

Real models (a Stable-Diffusion-class pipeline; the keys of ``lrm finetune``)::

    lrm overopt --teacher /models/sd15 --vae /models/sd15 --vae_subfolder vae --text_encoder /models/sd15 \
        --text_max_length 77 --vae_bf16 true --data_cache runs/cache/sd15-aesthetic --gold_reward aesthetic \
        --eval_prompt_file prompts/heldout.csv --lrm_train_size 4096 --batch_size 8 --eval_batch_size 8

Outside the Shapes world (a diffusers teacher, or any VAE but 'shapes') there are no Shapes captions or Shapes cache:
``data_cache`` (or ``lrm_path`` + ``prompt_file``) and ``eval_prompt_file`` are required, and ``accuracy`` is off
unless the evaluation prompts are Shapes captions. The LRM's patch follows the latent size (``auto_patch``: 2 for
8x8, 4 for SD's 64x64, 8 for 128x128) unless ``lrm_patch`` is set.

Regularisers to sweep: ``beta_kl`` (the KL / reference penalty of ``distill.finetune.FinetuneConfig.beta_kl``
toward the frozen initial student: per-step Gaussian chain KL for ddpo, one-step x0-prediction distance for
lrm / direct), and the distillation losses toward the teacher (``finetune.distill_losses: [vsd]`` / ``[cd]`` with
``finetune.beta_vsd`` / ``finetune.beta_cd``, the pretraining-loss analogue) through the ``finetune.*`` keys.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from distill.builders import ModelSpec
from lrm.config import ConfigError, config_to_dict, opt

if TYPE_CHECKING:
    import pandas as pd

# keys whose change alters the fitted LRM (the rest, ensemble_lambda included, only change how it is used)
LRM_KEYS = ("gold_reward", "gold_reward_kwargs", "teacher", "num_frames", "seed", "lrm_head", "lrm_width",
            "lrm_depth", "lrm_patch", "lrm_head_kwargs", "lrm_ensemble", "lrm_train_size", "lrm_steps",
            "lrm_batch_size", "lrm_lr", "lrm_fit", "cache_size", "cache_seed")
# model / data keys that also alter the cache and the LRM; recorded in their tags only when not the default (so the
# tags of Shapes runs stay what they were)
MODEL_KEYS = {"vae": "shapes", "vae_subfolder": None, "text_encoder": "all-MiniLM-L6-v2", "text_max_length": 32,
              "data_cache": None}
# swept keys that are a "proxy size" (x axis of the alpha / beta plot)
LRM_SIZE_KEYS = ("lrm_width", "lrm_depth", "lrm_ensemble", "lrm_train_size", "lrm_steps")
NOT_SWEEPABLE = ("sweep", "run_dir", "report")


@dataclass
class OveroptConfig(ModelSpec):
    run_dir: str = opt("runs/overopt", "output directory (see eval.overopt_run's module doc for the layout)")
    seed: int = opt(0, "seed of the cache, the LRM fit, the fine-tuning and the evaluation noise")
    device: str = opt("auto", "'auto', 'cpu', 'cuda' or 'cuda:N'")
    # ---- fine-tuning (distill.finetune) --------------------------------------------------------------------
    method: Literal["lrm", "ddpo", "direct"] = opt("lrm", "lrm: optimise the proxy LRM (DOLLAR Eq. 11); ddpo / "
                                                          "direct: optimise the gold pixel reward itself")
    teacher: str = opt("shapes-image", "student init, any teacher spec of distill.builders: 'shapes-image' / "
                                       "'shapes-video', a Denoiser directory (RUN/student of `lrm distill` / `lrm "
                                       "finetune`) or a diffusers pipeline directory / hub id (then set vae, "
                                       "vae_subfolder, text_encoder, text_max_length and the prompt sources)")
    num_frames: int = opt(16, "frames per video (Shapes video teacher)")
    gold_reward: str = opt("jpeg-compressibility", "reward_adapters name of the gold pixel reward (cache target, "
                                                   "study gold; the training signal of ddpo / direct)")
    gold_reward_kwargs: dict = opt({}, "constructor options of the gold reward")
    extra_gold_rewards: list[str] = opt([], "more pixel rewards evaluated as gold/* columns (not optimised)")
    steps: int = opt(100, "fine-tuning trainer steps")
    eval_every: int = opt(10, "save + evaluate the student every N trainer steps (step 0 = the initial model)")
    lr: float = opt(1e-4, "student learning rate (AdamW)")
    batch_size: int = opt(16, "samples per optimizer step (lrm / direct); ddpo: see finetune.sample_batch_size")
    beta_ft: float = opt(1.0, "weight of L_FT = -R^l (method=lrm), in 1 / reward units")
    beta_kl: float = opt(0.0, "KL / reference penalty toward the frozen initial student (distill.finetune "
                              "FinetuneConfig.beta_kl; 0 = off); sweep it as beta_kl")
    max_grad_norm: float = opt(1.0, "gradient clipping of the student (0 = off)")
    num_prompts: int = opt(64, "Shapes captions in the fine-tuning prompt pool (Shapes world without data_cache / "
                               "prompt_file)")
    finetune: dict = opt({}, "any other distill.finetune.FinetuneConfig field, e.g. {distill_losses: [cd], "
                             "beta_cd: 0.5, sample_batch_size: 16}; sweep one as 'finetune.<field>'")
    # ---- models and prompt sources (distill.builders; the same keys as `lrm finetune`) ---------------------------
    data_cache: str | None = opt(None, "a LatentCache (`lrm cache build`, same VAE and text encoder) with a "
                                       "reward/<gold_reward> column: the proxy LRM is fitted on its first "
                                       "lrm_train_size scored records instead of a Shapes cache, and its captions "
                                       "are the fine-tuning prompt pool unless prompt_file is set")
    prompt_file: str | None = opt(None, "fine-tuning prompt pool: .txt (one per line), .csv or .jsonl (column / key "
                                        "prompt, caption or text)")
    eval_prompt_file: str | None = opt(None, "held-out evaluation prompts (same formats; its first num_eval_prompts, "
                                             "all if fewer); None: Shapes captions (Shapes world only)")
    # ---- proxy LRM -------------------------------------------------------------------------------------------
    lrm_path: str | None = opt(None, "use this LatentReward directory instead of fitting one (method=lrm)")
    lrm_head: str = opt("auto", "latent_rewards head; auto: image-cnn (image teacher) / video-3d-cnn (video)")
    lrm_width: int = opt(64, "LRM trunk width (the proxy size of Gao et al.'s alpha / beta vs size)")
    lrm_depth: int = opt(2, "LRM 3x3 conv blocks after the patch conv")
    lrm_patch: int | None = opt(None, "LRM first-conv patch (kernel = stride); None: from the latent size h, the "
                                      "smallest power of two >= 2 with h / patch <= 16: 2 for Shapes' 8x8 latents, 4 "
                                      "for SD's 64x64 (DOLLAR Tab. 10), 8 for 128x128 (SDXL)")
    lrm_head_kwargs: dict = opt({}, "more head kwargs; auto video head adds {temporal_patch: 4}, lowered to divide "
                                    "the latent frames (auto_temporal_patch)")
    lrm_ensemble: int = opt(1, "LRM ensemble members K (> 1: output mean - ensemble_lambda * std)")
    ensemble_lambda: float = opt(0.0, "ensemble penalty lambda of the optimised proxy (Coste et al. 2023); applied "
                                      "at fine-tuning time, so a lambda sweep reuses one fitted ensemble")
    lrm_train_size: int = opt(2048, "cache records the LRM is fitted on (first N; a by-prompt share held out "
                                    "for validation)")
    lrm_steps: int = opt(1500, "LRM optimizer steps (early stopping on validation Spearman)")
    lrm_batch_size: int = opt(256, "LRM mini-batch")
    lrm_lr: float = opt(1e-3, "LRM peak learning rate")
    lrm_fit: dict = opt({}, "any other latent_rewards.FitConfig field, e.g. {eval_every: 100, patience: 5}")
    cache_size: int | None = opt(None, "Shapes records in the cache (default: lrm_train_size, or its largest "
                                       "swept value); unused with data_cache")
    cache_seed: int = opt(0, "ShapesWorld seed of the cache")
    cache_workers: int = opt(4, "cache build: loader workers rendering Shapes records")
    cache_worker_type: Literal["thread", "process"] = opt(
        "thread", "cache build: thread or process workers (process: parallel Shapes rendering, which holds the GIL)")
    # ---- evaluation (eval.study) -----------------------------------------------------------------------------
    num_eval_prompts: int = opt(16, "held-out prompts evaluated at every checkpoint (Shapes captions, or the first "
                                    "of eval_prompt_file)")
    n_per_prompt: int = opt(4, "samples per prompt (fixed seeds, the same at every checkpoint)")
    prompt_seed: int = opt(1000, "ShapesWorld seed of the evaluation captions (differs from the training pool)")
    eval_sampler: Literal["student", "stochastic"] = opt(
        "student", "student: the deployed k-step sampler, d from the smoothed-output KL to the step-0 model under "
                   "shared noise (kl_sigma); stochastic: the DDIM(eta) chain, d from the exact chain KL")
    kl_sigma: float = opt(1.0, "smoothing std (scaled-latent units) of the smoothed-output KL")
    d_budget: float | None = opt(None, "gold-free early stopping: the last checkpoint with d <= d_budget (sqrt nats, "
                                       "the study's own d estimator); None = off")
    stop_slope_frac: float | None = opt(
        0.25, "gold-free early stopping: stop once the optimised proxy's gain per unit d falls below this fraction of "
              "its initial rate (eval.overopt.recommend_proxy_stop); None = off")
    bon_n: int = opt(0, "best-of-n pool: samples per evaluation prompt drawn from the step-0 model (seeds seed, "
                        "seed+1, ...), best-of-n for n = 1, 2, 4, ... <= bon_n; 0 = off, else >= 4 (needs a proxy)")
    stop_on: str | None = opt(None, "study column that decides the peak checkpoint and early stopping (default "
                                    "gold/<gold_reward>; e.g. acc/all or gold/temporal-flickering when the gold reward "
                                    "itself can be gamed)")
    accuracy: bool | None = opt(None, "Shapes attribute accuracy columns (acc/*); None: on when the evaluation "
                                      "prompts are Shapes captions, else off; true with other prompts is an error")
    eval_batch_size: int = opt(32, "samples per generator call in evaluation")
    n_bootstrap: int = opt(200, "bootstrap resamples for the 95% CIs")
    keyframe_stride: int = opt(4, "video diversity: every Nth frame is a keyframe")
    # ---- sweep and output -------------------------------------------------------------------------------------
    sweep: dict = opt({}, "config key -> list of values, one sub-run per value in RUN/<key>=<value>/ (several keys: "
                          "their product); keys: any field here but run_dir/sweep/report, or finetune.<field> / "
                          "lrm_fit.<field>")
    save_samples: bool = opt(False, "one lossless WebP per sample in samples/ (the input of `lrm human-eval "
                                    "prepare`)")
    report: bool = opt(True, "write report.html files")
    progress: bool = opt(True, "tqdm progress bars")

    def __post_init__(self) -> None:
        super().__post_init__()
        for k in ("steps", "eval_every", "batch_size", "num_prompts", "lrm_width", "lrm_ensemble", "lrm_train_size",
                  "lrm_steps", "lrm_batch_size", "num_eval_prompts", "n_per_prompt", "eval_batch_size"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.eval_every > self.steps:
            raise ConfigError(f"eval_every={self.eval_every} > steps={self.steps}: no checkpoint after step 0; "
                              f"set eval_every <= steps")
        if self.ensemble_lambda < 0:
            raise ConfigError(f"ensemble_lambda must be >= 0 (a penalty), got {self.ensemble_lambda}")
        if self.ensemble_lambda > 0 and self.lrm_ensemble < 2 and self.lrm_path is None:
            raise ConfigError(f"ensemble_lambda={self.ensemble_lambda} needs an ensemble: set lrm_ensemble >= 2")
        if self.cache_size is not None and self.cache_size < self.lrm_train_size:
            raise ConfigError(f"cache_size={self.cache_size} < lrm_train_size={self.lrm_train_size}; raise cache_size")
        if self.kl_sigma <= 0:
            raise ConfigError(f"kl_sigma must be > 0, got {self.kl_sigma}")
        if self.beta_kl < 0:
            raise ConfigError(f"beta_kl must be >= 0 (a penalty weight), got {self.beta_kl}")
        if self.d_budget is not None and not self.d_budget > 0:
            raise ConfigError(f"d_budget must be > 0 (or null for off), got {self.d_budget}")
        if self.stop_slope_frac is not None and not 0 < self.stop_slope_frac <= 1:
            raise ConfigError(f"stop_slope_frac must be in (0, 1] (or null for off), got {self.stop_slope_frac}")
        if self.bon_n != 0 and self.bon_n < 4:
            raise ConfigError(f"bon_n must be 0 (off) or >= 4 (n = 1, 2, 4: two points with d > 0 for the R_bon fit), "
                              f"got {self.bon_n}")
        if self.bon_n and self.method != "lrm" and self.lrm_path is None:
            raise ConfigError(f"bon_n={self.bon_n} selects by a proxy LRM: use method=lrm or set lrm_path (method="
                              f"{self.method} optimises the gold reward itself)")
        if not isinstance(self.sweep, dict):
            raise ConfigError(f"sweep must map config keys to lists of values, got {self.sweep!r}")
        if self.stop_on is not None and not self.stop_on.startswith(("gold/", "proxy/", "acc/")) \
                and self.stop_on != "diversity":
            raise ConfigError(f"stop_on must be a study column: gold/<reward>, proxy/lrm, acc/<attribute> or "
                              f"diversity, got {self.stop_on!r}")
        if self.lrm_patch is not None and self.lrm_patch < 1:
            raise ConfigError(f"lrm_patch must be >= 1 (or null for the rule by latent size), got {self.lrm_patch}")
        self.check_world()
        if self.stop_on is not None and self.stop_on.startswith("acc/") and self.accuracy is False:
            raise ConfigError(f"stop_on={self.stop_on!r} needs accuracy: true")
        if self.eval_prompt_file is not None and (self.accuracy or (self.stop_on or "").startswith("acc/")):
            self.resolve_accuracy(self.eval_prompts())
        for k, v in self.sweep.items():
            if not isinstance(v, list) or not v:
                raise ConfigError(f"sweep.{k} must be a non-empty list of values, got {v!r}")
        if self.sweep:
            sweep_key_check(self.sweep)  # unknown keys fail here, before anything runs
        self.finetune_config(Path(self.run_dir) / "finetune")  # bad finetune.* fields fail here too
        self.fit_config()

    # ---- derived configs ------------------------------------------------------------------------------------
    @property
    def is_video(self) -> bool:
        return teacher_is_video(self)

    @property
    def shapes_world(self) -> bool:
        """The teacher lives in the Shapes world (Shapes VAE, not a diffusers model): Shapes captions and a Shapes
        cache are its defaults."""
        from distill.builders import teacher_is_diffusers

        return self.vae == "shapes" and not teacher_is_diffusers(self)

    def check_world(self) -> None:
        """A diffusers teacher needs its own VAE; outside the Shapes world the prompt sources must be given."""
        from distill.builders import teacher_is_diffusers

        if self.vae == "shapes" and teacher_is_diffusers(self):
            raise ConfigError(f"teacher {self.teacher!r} is a diffusers model but vae is 'shapes' (the Shapes world's "
                              f"VAE): set vae: {self.teacher}, vae_subfolder: vae, text_encoder: {self.teacher} and "
                              "text_max_length (77 for Stable Diffusion's CLIP)")
        if self.shapes_world:
            return
        missing = []
        if self.method == "lrm" and self.lrm_path is None and self.data_cache is None:
            missing.append(f"data_cache (a LatentCache of this VAE and text encoder with a reward/{self.gold_reward} "
                           "column: the proxy LRM's training data and the fine-tuning prompts) or lrm_path")
        elif self.data_cache is None and self.prompt_file is None:
            missing.append("prompt_file or data_cache (the fine-tuning prompts)")
        if self.eval_prompt_file is None:
            missing.append("eval_prompt_file (held-out evaluation prompts)")
        if missing:
            raise ConfigError(f"teacher {self.teacher!r} with vae {self.vae!r} is not the Shapes world (no Shapes "
                              f"captions or Shapes cache): set {'; and '.join(missing)}")

    def eval_prompts(self) -> list[str]:
        """The held-out evaluation prompts: the first num_eval_prompts of eval_prompt_file, or Shapes captions."""
        if self.eval_prompt_file is not None:
            from distill.builders import load_prompt_file

            return load_prompt_file(self.eval_prompt_file)[:self.num_eval_prompts]
        from eval.generators import shapes_prompts

        return shapes_prompts(self.num_eval_prompts, num_frames=self.num_frames if self.is_video else None,
                              seed=self.prompt_seed)

    def resolve_accuracy(self, prompts: list[str]) -> bool:
        """``accuracy`` for these prompts: None means on exactly when they are Shapes captions."""
        from eval.generators import are_shapes_captions, is_shapes_caption

        shapes = are_shapes_captions(prompts)
        if not shapes and (self.accuracy or (self.stop_on or "").startswith("acc/")):
            bad = next(p for p in prompts if not is_shapes_caption(p))
            raise ConfigError(f"{'stop_on=' + repr(self.stop_on) if not self.accuracy else 'accuracy: true'} needs "
                              f"Shapes attribute accuracy, but the prompts of {self.eval_prompt_file} are not Shapes "
                              f"captions (e.g. {bad[:60]!r} does not name a Shapes shape, color and background); set "
                              "accuracy: false and stop_on to a gold/ or proxy/ column")
        return shapes if self.accuracy is None else bool(self.accuracy)

    def finetune_config(self, run_dir: Path):
        from distill.finetune import FinetuneConfig

        names = {f.name for f in dataclasses.fields(FinetuneConfig)}
        bad = sorted(set(self.finetune) - names)
        if bad:
            raise ConfigError(f"finetune: unknown FinetuneConfig field(s) {bad}; valid: {sorted(names)}")
        mine = dict(method=self.method, run_dir=str(run_dir), seed=self.seed, device=self.device,
                    teacher=self.teacher, teacher_subfolder=self.teacher_subfolder, vae=self.vae,
                    vae_subfolder=self.vae_subfolder, vae_bf16=self.vae_bf16, vae_chunk_size=self.vae_chunk_size,
                    text_encoder=self.text_encoder, text_max_length=self.text_max_length,
                    data_cache=self.data_cache if self.prompt_file is None else None, prompt_file=self.prompt_file,
                    eval_batch_size=self.eval_batch_size, gold_reward=self.gold_reward,
                    gold_reward_kwargs=dict(self.gold_reward_kwargs),
                    lrm_path=None, num_prompts=self.num_prompts, num_frames=self.num_frames, steps=self.steps,
                    lr=self.lr, batch_size=self.batch_size, beta_ft=self.beta_ft, beta_kl=self.beta_kl,
                    max_grad_norm=self.max_grad_norm,
                    eval_every=0, num_eval=min(32, self.num_eval_prompts * self.n_per_prompt), ckpt_every=0,
                    sample_every=0, resume=True, progress=self.progress)
        clash = sorted(set(self.finetune) & (set(mine) - {"num_eval", "eval_batch_size"}))
        if clash:
            raise ConfigError(f"finetune: {clash} are set by the overopt config itself (use the top-level keys)")
        try:
            return FinetuneConfig(**{**mine, **self.finetune})
        except TypeError as e:
            raise ConfigError(f"finetune: {e}") from None

    def lrm_head_name(self) -> str:
        if self.lrm_head != "auto":
            return self.lrm_head
        return "video-3d-cnn" if self.is_video else "image-cnn"

    def lrm_patch_for(self, latent_hw: tuple[int, int] | None = None) -> int:
        """``lrm_patch``, or the rule by latent size (``auto_patch``); 2 (Shapes) while the size is unknown."""
        if self.lrm_patch is not None:
            return int(self.lrm_patch)
        return auto_patch(*latent_hw) if latent_hw else 2

    def fit_config(self, latent_hw: tuple[int, int] | None = None, latent_frames: int | None = None):
        """The LRM's ``FitConfig``; ``latent_hw``: the latents' (height, width) (for ``lrm_patch: null``);
        ``latent_frames``: their frame count (the auto video head's ``temporal_patch``)."""
        from latent_rewards.train import FitConfig

        names = {f.name for f in dataclasses.fields(FitConfig)}
        bad = sorted(set(self.lrm_fit) - names)
        if bad:
            raise ConfigError(f"lrm_fit: unknown FitConfig field(s) {bad}; valid: {sorted(names)}")
        head_kwargs = {"width": self.lrm_width, "depth": self.lrm_depth, "patch": self.lrm_patch_for(latent_hw)}
        if self.lrm_head == "auto" and self.is_video:
            head_kwargs["temporal_patch"] = auto_temporal_patch(latent_frames)
        head_kwargs.update(self.lrm_head_kwargs)
        kw = dict(head=self.lrm_head_name(), head_kwargs=head_kwargs, ensemble=self.lrm_ensemble,
                  ensemble_reduce="mean", steps=self.lrm_steps, batch_size=self.lrm_batch_size, lr=self.lrm_lr,
                  seed=self.seed, device=self.device, progress=self.progress,
                  warmup_steps=min(100, max(1, self.lrm_steps // 10)),
                  eval_every=max(1, min(200, self.lrm_steps // 5)))
        kw.update(self.lrm_fit)
        try:
            return FitConfig(**kw)
        except TypeError as e:
            raise ConfigError(f"lrm_fit: {e}") from None


def auto_patch(height: int, width: int | None = None) -> int:
    """LRM first-conv patch for ``height x width`` latents: the smallest power of two >= 2 that leaves at most 16
    patches per side (8x8 Shapes latents: 2; SD's 64x64: 4, as DOLLAR Tab. 10; SDXL's 128x128: 8), lowered until it
    divides both sides (the heads refuse a patch that does not); at least 1."""
    width = height if width is None else width
    p = 2
    while max(height, width) / p > 16:
        p *= 2
    while p > 1 and (height % p or width % p):
        p //= 2
    return p


def auto_temporal_patch(frames: int | None) -> int:
    """Frames per patch of the auto video head: 4 (Shapes' 16 latent frames), halved until it divides ``frames``
    (a causal video VAE's 1 + k latent frames: Wan's 81 frames -> 21, HunyuanVideo's 129 -> 33: 1); 4 while unknown."""
    p = 4
    while frames and p > 1 and frames % p:
        p //= 2
    return p


def teacher_is_video(spec: Any) -> bool:
    """Whether ``spec.teacher`` is a video model, from its config alone (no weights): a Shapes teacher by name, a
    ``Denoiser`` directory by ``denoiser.json``'s model class, a diffusers pipeline by its model subfolder's
    ``config.json`` (local, or the hub cache). Video = "3D" in the class name, ``Denoiser.is_video``'s rule
    (UNet3DConditionModel, WanTransformer3DModel, CogVideoXTransformer3DModel, ...)."""
    import os

    from distill.builders import SHAPES_TEACHERS, teacher_is_diffusers
    from lrm.io import read_json

    if spec.teacher in SHAPES_TEACHERS:
        return spec.teacher.startswith("shapes-video")
    path = Path(spec.teacher)
    if not teacher_is_diffusers(spec):
        meta = path / "denoiser.json"
        if not meta.is_file():
            raise ConfigError(f"teacher {spec.teacher!r} is neither shapes-image / shapes-video, a Denoiser directory "
                              "(denoiser.json) nor a diffusers pipeline (model_index.json, unet/ or transformer/)")
        return "3D" in str(read_json(meta).get("model_class", ""))
    sub = getattr(spec, "teacher_subfolder", None)
    subs = [sub] if sub is not None else (["transformer", "unet"] if (path / "transformer").is_dir() else
                                          ["unet", "transformer"])
    for sub in subs:
        local = path / sub / "config.json" if sub else path / "config.json"
        if local.is_file():
            return "3D" in str(read_json(local).get("_class_name", ""))
    errors = []
    for sub in subs:
        try:
            from huggingface_hub import hf_hub_download

            found = hf_hub_download(spec.teacher, "config.json", subfolder=sub or None,
                                    cache_dir=os.environ.get("LRM_CACHE_DIR"))
            return "3D" in str(read_json(found).get("_class_name", ""))
        except (OSError, ValueError) as e:  # not cached offline, no such repo / file, invalid repo id
            errors.append(f"{sub or '.'}/config.json: {type(e).__name__}")
    raise ConfigError(f"teacher {spec.teacher!r}: no model config found ({', '.join(errors)}); give a local pipeline "
                      "directory (or set LRM_CACHE_DIR to a hub cache that holds it) and teacher_subfolder if the "
                      "model is not in unet/ or transformer/")


# ---- sweep keys ---------------------------------------------------------------------------------------------

def _sweepable() -> list[str]:
    return [f.name for f in dataclasses.fields(OveroptConfig) if f.name not in NOT_SWEEPABLE]


def sweep_key_check(sweep: dict) -> None:
    """Raise ConfigError for a key that is not a config field (nor finetune.<field> / lrm_fit.<field>)."""
    import difflib

    from distill.finetune import FinetuneConfig
    from latent_rewards.train import FitConfig

    valid = _sweepable()
    for key in sweep:
        if not isinstance(key, str):
            raise ConfigError(f"sweep key {key!r} must be a string")
        if key.startswith("finetune."):
            names = [f.name for f in dataclasses.fields(FinetuneConfig)]
            if key.split(".", 1)[1] not in names:
                raise ConfigError(f"sweep key {key!r}: {key.split('.', 1)[1]!r} is not a FinetuneConfig field; "
                                  f"valid: {', '.join(names)}")
            continue
        if key.startswith("lrm_fit."):
            names = [f.name for f in dataclasses.fields(FitConfig)]
            if key.split(".", 1)[1] not in names:
                raise ConfigError(f"sweep key {key!r}: {key.split('.', 1)[1]!r} is not a FitConfig field; "
                                  f"valid: {', '.join(names)}")
            continue
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            raise ConfigError(f"unknown sweep key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "") +
                              f"; valid: {', '.join(valid)}, finetune.<FinetuneConfig field>, "
                              "lrm_fit.<FitConfig field>. (The KL / reference penalty is beta_kl; "
                              "finetune.beta_cd / finetune.beta_vsd with distill_losses anchor to the teacher.)")


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(",", ":")).replace("/", "_")
    return str(v).replace("/", "_")


def sub_run_name(assign: dict[str, Any]) -> str:
    return ",".join(f"{k}={_fmt_value(v)}" for k, v in assign.items())


def apply_assignment(cfg: OveroptConfig, assign: dict[str, Any], run_dir: Path) -> OveroptConfig:
    """The sub-run config: ``cfg`` with the swept values (type-checked like the YAML) and no sweep."""
    from lrm.config import load_config

    data = config_to_dict(cfg)
    data.update(sweep={}, run_dir=str(run_dir))
    for k, v in assign.items():
        if k.startswith(("finetune.", "lrm_fit.")):
            group, field = k.split(".", 1)
            data[group] = {**data[group], field: v}
        else:
            data[k] = v
    return load_config(OveroptConfig, None, data)


def sweep_assignments(sweep: dict) -> list[dict[str, Any]]:
    keys = list(sweep)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(sweep[k] for k in keys))]


# ---- step 1: cache + LRM --------------------------------------------------------------------------------------

def _tag(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _model_tag(cfg: OveroptConfig) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k, default in MODEL_KEYS.items() if getattr(cfg, k) != default}


def gold_cache(cfg: OveroptConfig, shared: Path, vae=None, text=None, log=None) -> Path:
    """The LRM's training cache: ``data_cache`` (checked against the VAE, the text encoder and the gold reward), or a
    Shapes cache built by ``build_gold_cache``."""
    if cfg.data_cache is None:
        return build_gold_cache(cfg, shared, cfg.cache_size or cfg.lrm_train_size, vae, text, log)
    from data_cache import LatentCache
    from distill.builders import check_text_identity

    cache = LatentCache.open(cfg.data_cache)
    if vae is not None:
        vae.latent_space.check_compatible(cache.latent_space, f"latents of data_cache {cfg.data_cache}")
    if text is not None and hasattr(text, "identity"):
        check_text_identity(dict(cache.text_encoder), text.identity(), f"caption embeddings of {cfg.data_cache}")
    if cfg.gold_reward not in cache.reward_names:
        raise ConfigError(f"data_cache {cfg.data_cache} has no reward/{cfg.gold_reward} column (it holds "
                          f"{list(cache.reward_names)}): add it (`lrm cache add-reward --reward {cfg.gold_reward}`) "
                          "or set gold_reward to one of those")
    if log:
        log.info("proxy training data: %s (%d records, latents %s)", cfg.data_cache, len(cache),
                 tuple(cache.latent_shape))
    return Path(cfg.data_cache)


def build_gold_cache(cfg: OveroptConfig, shared: Path, size: int, vae=None, text=None, log=None) -> Path:
    """A Shapes latent cache of ``size`` records scored by the gold reward (reused when it already exists)."""
    from data_cache import BuildCacheConfig, LatentCache, SourceConfig, build_cache
    from data_cache.storage import CacheError

    nf = cfg.num_frames if cfg.is_video else 0
    spec = {"reward": cfg.gold_reward, "kwargs": cfg.gold_reward_kwargs, "frames": nf, "seed": cfg.cache_seed,
            **_model_tag(cfg)}
    out = shared / f"cache-{cfg.gold_reward}-{'v' if nf else 'i'}-{_tag(spec)}"
    if (out / "manifest.json").exists():
        try:
            c = LatentCache.open(out, check_complete=True)
            if len(c) >= size:
                return out
        except CacheError:
            pass
    from lrm.run import resolve_device
    from reward_adapters import create_reward

    reward = create_reward(cfg.gold_reward, **cfg.gold_reward_kwargs)
    if hasattr(reward, "to"):
        reward = reward.to(resolve_device(cfg.device))
    bcfg = BuildCacheConfig(out_dir=str(out), source=SourceConfig(type="shapes", num_samples=size, seed=cfg.cache_seed,
                                                                  num_frames=nf),
                            vae=cfg.vae, vae_subfolder=cfg.vae_subfolder or "", text_encoder=cfg.text_encoder,
                            text_max_length=cfg.text_max_length, vae_chunk_size=cfg.vae_chunk_size,
                            rewards=[cfg.gold_reward], latent_dtype="float32", batch_size=64 if nf else 256,
                            shard_size=max(1024, size), num_workers=cfg.cache_workers,
                            worker_type=cfg.cache_worker_type, device=cfg.device,
                            resume=(out / "manifest.json").exists(), progress=cfg.progress)
    if log:
        log.info("building the gold-reward cache %s (%d Shapes %s, reward %s)", out, size,
                 "videos" if nf else "images", cfg.gold_reward)
    build_cache(bcfg, rewards=[reward], vae=vae, text_encoder=text)
    return out


def fit_proxy(cfg: OveroptConfig, shared: Path, cache_dir: Path, log=None) -> Path:
    """Fit (or reuse) the proxy LRM on the first ``lrm_train_size`` cache records; returns its directory."""
    from data_cache import LatentCache
    from latent_rewards import LatentData, fit

    latent_shape = tuple(LatentCache.open(cache_dir).latent_shape)  # (C, h, w) / (T, C, h, w)
    fcfg = cfg.fit_config(tuple(latent_shape[-2:]), latent_shape[0] if len(latent_shape) == 4 else None)
    spec = {k: getattr(cfg, k) for k in LRM_KEYS if k not in ("cache_size",)}
    spec.update(lrm_patch=fcfg.head_kwargs.get("patch"), **_model_tag(cfg))
    spec["fit"] = config_to_dict(fcfg)
    spec["fit"].pop("progress", None)
    spec["fit"].pop("device", None)
    out = shared / f"lrm-w{cfg.lrm_width}-k{cfg.lrm_ensemble}-n{cfg.lrm_train_size}-{_tag(spec)}"
    if all((out / f).exists() for f in ("config.json", "model.safetensors", "metadata.json", "metrics.json")):
        return out
    data = LatentData.from_cache(cache_dir, cfg.gold_reward)
    if len(data) < cfg.lrm_train_size:
        raise ConfigError(f"cache {cache_dir} holds {len(data)} records scored by {cfg.gold_reward} < lrm_train_size="
                          f"{cfg.lrm_train_size}; lower lrm_train_size to at most {len(data)}")
    if len(data) > cfg.lrm_train_size:
        data = data.subset(np.arange(cfg.lrm_train_size))
    if log:
        log.info("fitting the proxy LRM %s (width %d, patch %s, K=%d) on %d records of latents %s -> %s", fcfg.head,
                 cfg.lrm_width, fcfg.head_kwargs.get("patch"), cfg.lrm_ensemble, len(data), latent_shape, out)
    fit(data, fcfg, out_dir=out)
    from lrm.io import write_json

    write_json(out / "overopt_spec.json", spec)
    return out


class ProxyView:
    """A LatentReward as the study and the trainer call it: ``fn(latents, tokens, mask) -> (B,)``; text dropped for
    text-free heads; ``reduce`` = "as-set" (the model's own reduce/lambda), "mean" or "std" of the members."""

    def __init__(self, lrm, reduce: str = "as-set"):
        self.lrm, self.reduce = lrm, reduce

    def __call__(self, latents, text_tokens=None, text_mask=None):
        if not self.lrm.needs_text:
            text_tokens = text_mask = None
        if self.reduce == "as-set":
            return self.lrm(latents, text_tokens, text_mask)
        m = self.lrm.members(latents, text_tokens, text_mask)  # (K, B)
        return m.mean(0) if self.reduce == "mean" else m.std(0, unbiased=False)


def load_proxy(path: Path | str, cfg: OveroptConfig, device):
    from latent_rewards import EnsembleLRM, LatentReward

    lrm = LatentReward.from_pretrained(path, device=device).eval().requires_grad_(False)
    if isinstance(lrm.model, EnsembleLRM):
        lrm.model.reduce, lrm.model.lam = "lcb", float(cfg.ensemble_lambda)
    elif cfg.ensemble_lambda > 0:
        raise ConfigError(f"ensemble_lambda={cfg.ensemble_lambda} but the LRM at {path} is not an ensemble")
    return lrm


# ---- step 2: fine-tuning with checkpoints ------------------------------------------------------------------------

def _student_dirs(root: Path) -> list[tuple[int, Path]]:
    out = []
    for d in sorted(root.glob("step_*")):
        if (d / "student.json").exists():
            out.append((int(d.name.split("_", 1)[1]), d))
    return out


def finetune_with_checkpoints(cfg: OveroptConfig, run_dir: Path, lrm=None, log=None) -> dict[str, Any]:
    """Fine-tune, saving the student at steps 0, eval_every, 2 eval_every, ..., steps (resumable)."""
    import torch

    from distill.finetune import build_finetune

    fcfg = cfg.finetune_config(run_dir / "finetune")
    students = run_dir / "finetune" / "students"
    have = {s for s, _ in _student_dirs(students)}
    targets = sorted(set(range(0, cfg.steps + 1, cfg.eval_every)) | {cfg.steps})
    trainer = build_finetune(fcfg, lrm=lrm, progress=cfg.progress)
    latent_shape = tuple(trainer.latent_shape)
    t0 = time.perf_counter()
    try:
        for s in targets:
            if s in have:
                continue
            trainer.train(steps=s)  # resumes from finetune/checkpoint; evaluates + checkpoints at its end
            if trainer.step > s:
                raise RuntimeError(f"the trainer checkpoint in {fcfg.run_dir} is at step {trainer.step} but the "
                                   f"student of step {s} was never saved; delete {run_dir} and run again")
            trainer.save_student(students / f"step_{trainer.step:06d}")
            if trainer.step < s:  # stopped early (max_gpu_seconds)
                if log:
                    log.info("fine-tuning stopped at step %d (< %d)", trainer.step, s)
                break
    finally:
        trainer.close()
    logged = _gpu_seconds_by_step(run_dir / "finetune" / "log.csv")  # the trainer's own count is 0 on a resume
    info = {"latent_shape": list(latent_shape), "timesteps": trainer.timesteps,
            "gpu_seconds": max([trainer.gpu_seconds, *logged.values()]),
            "finetune_wall_s": time.perf_counter() - t0, "steps": trainer.step,
            "peak_mem_mb": trainer.peak_mem_mb}
    del trainer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return info


# ---- step 3: evaluation -----------------------------------------------------------------------------------------

def _gpu_seconds_by_step(log_csv: Path) -> dict[int, float]:
    import pandas as pd

    if not log_csv.exists():
        return {}
    df = pd.read_csv(log_csv)
    df = df[pd.to_numeric(df["gpu_seconds"], errors="coerce").notna()]
    return {int(s): float(g) for s, g in zip(df["step"], df["gpu_seconds"])}


def load_student(cfg: OveroptConfig, path: Path, device, text_encoder=None):
    """A saved student through the one model-name resolver (``distill.builders.build_teacher``): a Denoiser
    directory, or a LoRA ``student/`` folder (``finetune.lora_rank`` > 0) fused into its base under the run's model
    keys (``text_encoder``: the null caption of a diffusers base)."""
    from types import SimpleNamespace

    from distill.builders import build_teacher

    spec = SimpleNamespace(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(ModelSpec)}, teacher=str(path))
    return build_teacher(spec, device, text_encoder=text_encoder).eval()


def study_checkpoints(cfg: OveroptConfig, run_dir: Path, device, timesteps: list[int], text_encoder=None):
    """(step, generator, extra) for every saved student, loaded one at a time; plus the step-0 reference.
    ``text_encoder`` gives pooled-text families (FLUX / SD3 / HunyuanVideo) the prompts' pooled vectors."""
    from eval.generators import DenoiserGenerator

    students = _student_dirs(run_dir / "finetune" / "students")
    if not students or students[0][0] != 0:
        raise RuntimeError(f"no step-0 student in {run_dir / 'finetune' / 'students'}; the fine-tuning did not run")
    ref_den = load_student(cfg, students[0][1], device, text_encoder)
    gpu_s = _gpu_seconds_by_step(run_dir / "finetune" / "log.csv")
    kw = dict(timesteps=timesteps, eta=float(cfg.finetune.get("eta", 1.0)), text_encoder=text_encoder)
    stochastic = cfg.eval_sampler == "stochastic"
    reference = None if stochastic else DenoiserGenerator(ref_den, sampler="student", **kw)

    def gen():
        for step, d in students:
            den = ref_den if step == 0 else load_student(cfg, d, device, text_encoder)
            g = (DenoiserGenerator(den, sampler="stochastic", reference=ref_den, **kw) if stochastic
                 else DenoiserGenerator(den, sampler="student", **kw))
            extra: dict[str, float] = {}
            if step == 0:
                extra["d"] = 0.0  # the reference itself (exactly 0; avoids GPU nondeterminism in the estimate)
            if step in gpu_s:
                extra["gpu_seconds"] = gpu_s[step]
            yield step, g, extra

    return gen(), reference


def step0_generator(cfg: OveroptConfig, run_dir: Path, device, timesteps: list[int], text_encoder=None):
    """The initial (step-0) student under the study's sampler, without a reference (best-of-n pool)."""
    from eval.generators import DenoiserGenerator

    students = _student_dirs(run_dir / "finetune" / "students")
    if not students or students[0][0] != 0:
        raise RuntimeError(f"no step-0 student in {run_dir / 'finetune' / 'students'}; the fine-tuning did not run")
    den = load_student(cfg, students[0][1], device, text_encoder)
    return DenoiserGenerator(den, sampler=cfg.eval_sampler, timesteps=timesteps,
                             eta=float(cfg.finetune.get("eta", 1.0)), text_encoder=text_encoder)


def best_of_n_sweep(cfg: OveroptConfig, generator, prompts: list[str], gold: dict, proxy, out_dir: Path, vae, text,
                    latent_shape, device, log=None) -> tuple[pd.DataFrame, dict]:
    """Step 4: pool of ``cfg.bon_n`` samples per prompt -> ``out_dir/bon.csv`` and the R_bon fits.

    The pool uses seeds ``cfg.seed, cfg.seed + 1, ...`` (its first ``n_per_prompt`` samples are the study's own
    step-0 samples); each prompt's pool is scored by the optimised proxy and the gold reward(s); best-of-n is
    estimated per prompt without bias (``eval.overopt.best_of_n_by_prompt``) and averaged over prompts.
    Returns ``(table, fits)`` with fits keyed ``bon/gold``, ``bon/proxy`` (and ``bon/gold/<extra>``).
    """
    from eval.evaluate import evaluate
    from eval.overopt import best_of_n_by_prompt, fit_best_of_n

    if log:
        log.info("best-of-n: %d prompts x %d samples from the step-0 model", len(prompts), cfg.bon_n)
    res = evaluate(generator, prompts, n_per_prompt=cfg.bon_n, seeds=cfg.seed, gold_rewards=gold,
                   proxy_rewards={"lrm": proxy}, decode=vae, text_encoder=text, latent_shape=latent_shape,
                   keyframe_stride=cfg.keyframe_stride, batch_size=cfg.eval_batch_size, device=device, n_bootstrap=0,
                   n_preview=0, progress=cfg.progress, name="best-of-n pool (step 0)")
    out_dir.mkdir(parents=True, exist_ok=True)
    res.save(out_dir / "bon_pool")
    gold_cols = [f"gold/{cfg.gold_reward}"] + [f"gold/{n}" for n in gold if n != cfg.gold_reward]
    table = best_of_n_by_prompt(res.samples, "proxy/lrm", gold_cols)
    table.to_csv(out_dir / "bon.csv", index=False)
    fits = fit_best_of_n(table)
    if log:
        f = fits.get("bon/gold")
        log.info("best-of-n: gold %.4g (n=1) -> %.4g (n=%d) at d_bon %.3g%s", table["gold"].iloc[0],
                 table["gold"].iloc[-1], int(table["n"].iloc[-1]), table["d"].iloc[-1],
                 "" if f is None else f"; R_bon fit alpha {f['alpha']:.3g}, beta {f['beta']:.3g}")
    return table, fits


def evaluate_run(cfg: OveroptConfig, run_dir: Path, lrm, latent_shape, timesteps, device, vae, text, log=None):
    from eval.evaluate import shapes_accuracy_rewards
    from eval.study import run_study
    from lrm.io import write_json
    from reward_adapters import create_reward

    video = cfg.is_video
    prompts = cfg.eval_prompts()
    accuracy = cfg.resolve_accuracy(prompts)
    if log:
        log.info("study prompts: %d %s (accuracy %s)", len(prompts), cfg.eval_prompt_file or "held-out Shapes captions",
                 accuracy)
    gold = {cfg.gold_reward: create_reward(cfg.gold_reward, **cfg.gold_reward_kwargs)}
    for n in cfg.extra_gold_rewards:
        gold[n] = create_reward(n)
    for r in gold.values():
        if hasattr(r, "to"):
            r.to(device)
    proxy = {}
    if lrm is not None:
        proxy["lrm"] = ProxyView(lrm)
        from latent_rewards import EnsembleLRM

        if isinstance(lrm.model, EnsembleLRM):  # comparable across ensemble_lambda values
            proxy["lrm-mean"] = ProxyView(lrm, "mean")
    bon_fits: dict = {}
    if cfg.bon_n:
        if lrm is None:
            raise ConfigError(f"bon_n={cfg.bon_n} needs a proxy LRM (method=lrm or lrm_path)")
        _, bon_fits = best_of_n_sweep(cfg, step0_generator(cfg, run_dir, device, timesteps, text), prompts, gold,
                                      proxy["lrm"], run_dir / "study", vae, text, latent_shape, device, log)
    checkpoints, reference = study_checkpoints(cfg, run_dir, device, timesteps, text)
    title = f"overoptimization: {cfg.method} on {'proxy LRM of ' if lrm is not None else ''}{cfg.gold_reward} " \
            f"({run_dir.name})"
    # gold-free rule: the optimised reward (the LRM; for ddpo / direct the gold reward is the training signal)
    stop_proxy = "proxy/lrm" if lrm is not None else f"gold/{cfg.gold_reward}"
    res = run_study(checkpoints, prompts, run_dir / "study", reference=reference, fit_form="rl",
                    gold=cfg.stop_on or f"gold/{cfg.gold_reward}", d_budget=cfg.d_budget, stop_proxy=stop_proxy,
                    min_slope_frac=cfg.stop_slope_frac, title=title, write_html=False,
                    n_per_prompt=cfg.n_per_prompt, seeds=cfg.seed, gold_rewards=gold, proxy_rewards=proxy,
                    decode=vae, text_encoder=text, latent_shape=latent_shape,
                    accuracy_rewards=shapes_accuracy_rewards(video) if accuracy else None,
                    keyframe_stride=cfg.keyframe_stride, kl_sigma=cfg.kl_sigma, batch_size=cfg.eval_batch_size,
                    save_samples=cfg.save_samples,
                    device=device, n_bootstrap=cfg.n_bootstrap, n_preview=min(cfg.num_eval_prompts, 6) *
                    cfg.n_per_prompt, progress=cfg.progress)
    if bon_fits:
        res.fits.update(bon_fits)
        write_json(run_dir / "study" / "fits.json", res.fits)
    if cfg.report:
        from eval.report import write_report

        res.report = write_report(run_dir / "study", title=title)
        if log:
            log.info("wrote %s", res.report)
    return res


# ---- one run --------------------------------------------------------------------------------------------------

def _detach_file_logs(run_dir: Path) -> None:
    """prepare_run_dir adds a log.txt handler per run dir; drop this run's so later sub-runs do not write into it."""
    root = str(run_dir.resolve())
    for name in ("lrm.overopt", "lrm.finetune", "lrm.eval", "lrm.latent_rewards"):
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if getattr(h, "baseFilename", "").startswith(root):
                lg.removeHandler(h)
                h.close()


def run_single(cfg: OveroptConfig, shared: Path | None = None) -> dict[str, Any]:
    """Steps 1-3 for one config; skipped (summary returned) when ``run_dir/summary.json`` exists."""
    from distill.builders import build_text_encoder, build_vae
    from lrm.io import read_json, write_json
    from lrm.run import get_logger, prepare_run_dir, resolve_device, seed_everything

    run_dir = Path(cfg.run_dir)
    if (run_dir / "summary.json").exists():
        summary = read_json(run_dir / "summary.json")
        summary["skipped"] = True
        return summary
    shared = Path(shared) if shared is not None else run_dir / "shared"
    prepare_run_dir(run_dir, cfg, logger_name="lrm.overopt")
    log = get_logger("lrm.overopt")
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    vae = build_vae(cfg, device)
    text = build_text_encoder(cfg, device)
    times: dict[str, float] = {}
    try:
        # 1. proxy
        lrm_dir, lrm = None, None
        if cfg.lrm_path is not None:
            lrm_dir = Path(cfg.lrm_path)
        elif cfg.method == "lrm":
            t0 = time.perf_counter()
            cache = gold_cache(cfg, shared, vae, text, log)
            times["cache_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            lrm_dir = fit_proxy(cfg, shared, cache, log)
            times["lrm_fit_s"] = time.perf_counter() - t0
        if lrm_dir is not None:
            lrm = load_proxy(lrm_dir, cfg, device)
            lrm.check_inputs(latent_space=vae.latent_space, text_encoder=text if lrm.needs_text else None)
        # 2. fine-tuning
        t0 = time.perf_counter()
        ft = finetune_with_checkpoints(cfg, run_dir, lrm=lrm, log=log)
        times["finetune_s"] = time.perf_counter() - t0
        # 3. study
        t0 = time.perf_counter()
        res = evaluate_run(cfg, run_dir, lrm, tuple(ft["latent_shape"]), ft["timesteps"], device, vae, text, log)
        times["study_s"] = time.perf_counter() - t0
    finally:
        _detach_file_logs(run_dir)
    lrm_metrics = None
    if lrm_dir is not None and (lrm_dir / "metrics.json").exists():
        lrm_metrics = read_json(lrm_dir / "metrics.json")
    n_params = None
    if lrm is not None:
        n_params = int(sum(p.numel() for p in lrm.model.parameters()))
    summary = {"run_dir": str(run_dir), "method": cfg.method, "gold_reward": cfg.gold_reward,
               "lrm_dir": None if lrm_dir is None else str(lrm_dir), "lrm_params": n_params,
               "lrm_val": None if lrm_metrics is None else lrm_metrics.get("val"),
               "n_checkpoints": int(len(res.table)), "peak": res.peak, "early_stop": res.early_stop,
               "early_stop_proxy": res.early_stop_proxy,
               "fits": res.fits, "finetune": ft, "times_s": times,
               "report": None if res.report is None else str(res.report)}
    write_json(run_dir / "summary.json", summary)
    if res.report is not None:
        (run_dir / "report.html").write_text(
            "<!doctype html><meta charset='utf-8'><meta http-equiv='refresh' content='0; url=study/report.html'>"
            "<a href='study/report.html'>study/report.html</a>\n")
    log.info("done %s: peak gold %s, early stop %s, proxy-only stop %s, times %s", run_dir, res.peak.get("observed"),
             None if res.early_stop is None else res.early_stop.get("step"),
             None if res.early_stop_proxy is None else res.early_stop_proxy.get("step"),
             {k: round(v, 1) for k, v in times.items()})
    return summary


# ---- sweeps ---------------------------------------------------------------------------------------------------

def _sweep_row(assign: dict, summary: dict, run_dir: Path, gold_col: str) -> dict[str, Any]:
    import pandas as pd

    row: dict[str, Any] = {**{f"{k}": (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in assign.items()},
                           "sub_run": run_dir.name}
    study = run_dir / "study" / "study.csv"
    t = pd.read_csv(study) if study.exists() else None
    row["n_checkpoints"] = summary.get("n_checkpoints")
    row["lrm_params"] = summary.get("lrm_params")
    val = summary.get("lrm_val") or {}
    row["lrm_val_spearman"] = val.get("spearman")
    if t is not None and gold_col in t:
        row["gold_step0"] = float(t[gold_col].iloc[0])
        row["gold_final"] = float(t[gold_col].iloc[-1])
        i = int(t[gold_col].idxmax())
        row["gold_peak"], row["peak_step"], row["peak_d"] = float(t[gold_col][i]), int(t["step"][i]), float(t["d"][i])
        row["d_final"] = float(t["d"].iloc[-1])
        if "proxy/lrm" in t:
            row["proxy_step0"] = float(t["proxy/lrm"].iloc[0])
            row["proxy_final"] = float(t["proxy/lrm"].iloc[-1])
        if "proxy/lrm-mean" in t:
            row["proxy_mean_step0"] = float(t["proxy/lrm-mean"].iloc[0])
            row["proxy_mean_final"] = float(t["proxy/lrm-mean"].iloc[-1])
        if "acc/all" in t:
            row["acc_final"] = float(t["acc/all"].iloc[-1])
    for name, col in (("gold", gold_col), ("proxy", "proxy/lrm")):
        f = (summary.get("fits") or {}).get(col)
        if f:
            row[f"{name}_alpha"], row[f"{name}_beta"] = f["alpha"], f["beta"]
            row[f"{name}_fit_peak_d"] = f["peak_d"]
    es = summary.get("early_stop") or {}
    row["early_stop_step"] = es.get("step")
    ep = summary.get("early_stop_proxy") or {}
    row["proxy_stop_step"], row["proxy_stop_d"] = ep.get("step"), ep.get("d")
    row["gold_at_proxy_stop"] = ep.get("gold_at_stop")
    for name in ("gold", "proxy"):
        f = (summary.get("fits") or {}).get(f"bon/{name}")
        if f:
            row[f"bon_{name}_alpha"], row[f"bon_{name}_beta"] = f["alpha"], f["beta"]
    return row


def plot_sweep(root: Path, key: str, rows: list[dict], gold_col: str) -> list[tuple[str, Path]]:
    """Gold and proxy vs d per value; alpha and beta vs proxy size for LRM-size keys."""
    import pandas as pd

    from eval.report import _plt

    plt = _plt()
    plots = []
    out_dir = root / "plots"
    out_dir.mkdir(exist_ok=True)
    cols = [(gold_col, f"gold reward: {gold_col.split('/', 1)[1]}"), ("proxy/lrm", "proxy reward: LRM (optimised)"),
            ("proxy/lrm-mean", "proxy reward: LRM ensemble mean")]
    tables = {r["sub_run"]: pd.read_csv(root / r["sub_run"] / "study" / "study.csv") for r in rows
              if (root / r["sub_run"] / "study" / "study.csv").exists()}
    present = [(c, lab) for c, lab in cols if any(c in t for t in tables.values())]
    if tables and present:
        for xcol, xlab, fname in (("d", "distance from the initial model d = sqrt(KL)", "sweep_vs_d.png"),
                                  ("step", "fine-tuning step (optimizer steps)", "sweep_vs_step.png")):
            fig, axes = plt.subplots(1, len(present), figsize=(5.2 * len(present), 3.9), squeeze=False)
            cmap = plt.get_cmap("viridis")
            for ax, (c, lab) in zip(axes[0], present):
                for j, r in enumerate(rows):
                    t = tables.get(r["sub_run"])
                    if t is None or c not in t:
                        continue
                    color = cmap(j / max(1, len(rows) - 1))
                    ax.plot(t[xcol], t[c], "o-", color=color, markersize=4, label=r["sub_run"])
                    if c == gold_col:
                        i = int(t[c].idxmax())
                        ax.plot([t[xcol][i]], [t[c][i]], "*", color=color, markersize=13)
                ax.set_xlabel(xlab)
                ax.set_ylabel(lab)
                ax.set_title(f"{lab} vs {'d' if xcol == 'd' else 'step'}")
                ax.legend(fontsize=8, title=key, title_fontsize=8)
            fig.text(0.5, 0.005, "stars: peak gold of each sub-run", ha="center", fontsize=9, color="#555")
            fig.tight_layout(rect=(0, 0.03, 1, 1))
            fig.savefig(out_dir / fname)
            plt.close(fig)
            plots.append((f"{'Gold and proxy reward vs d' if xcol == 'd' else 'Gold and proxy reward vs step'}, "
                          f"one line per {key}", out_dir / fname))
    if key in LRM_SIZE_KEYS:
        use_params = key in ("lrm_width", "lrm_depth", "lrm_ensemble") and all(r.get("lrm_params") for r in rows)
        x = np.array([r["lrm_params"] if use_params else float(r[key]) for r in rows], dtype=float)
        xlab = "proxy size: LRM parameters" if use_params else f"proxy size: {key}"
        fits = [(n, lab) for n, lab in (("gold", "gold-reward fit"), ("proxy", "proxy-reward fit"))
                if any(f"{n}_alpha" in r for r in rows)]
        if fits:
            fig, axes = plt.subplots(1, 2, figsize=(11, 3.9), squeeze=False)
            for ax, par in zip(axes[0], ("alpha", "beta")):
                for n, lab in fits:
                    y = np.array([r.get(f"{n}_{par}", np.nan) for r in rows], dtype=float)
                    ax.plot(x, y, "o-", label=lab, color="#b8860b" if n == "gold" else "#1f77b4")
                    for xi, yi, r in zip(x, y, rows):
                        if np.isfinite(yi):
                            ax.annotate(f"{key}={_fmt_value(r[key])}", (xi, yi), fontsize=7, xytext=(3, 3),
                                        textcoords="offset points")
                ax.set_xscale("log")
                from matplotlib.ticker import NullFormatter

                ax.xaxis.set_minor_formatter(NullFormatter())
                ax.set_xlabel(xlab + " (log scale)")
                ax.set_ylabel(f"{par} (R(d) = R0 + d(α − β log d))")
                ax.set_title(f"fitted {par} vs proxy size")
                ax.legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(out_dir / "sweep_alpha_beta.png")
            plt.close(fig)
            plots.append(("Fitted Gao et al. alpha and beta vs proxy size", out_dir / "sweep_alpha_beta.png"))
    return plots


def write_sweep_report(root: Path, key: str, table: pd.DataFrame, plots: list[tuple[str, Path]],
                       title: str | None = None) -> Path:
    import html
    from datetime import datetime, timezone

    from eval.report import CSS, _table_html
    from lrm.io import atomic_write_bytes

    title = title or f"overoptimization sweep over {key}: {root.name}"
    out = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
           f"<p class='meta'>run directory <code>{html.escape(str(root.resolve()))}</code> &middot; written "
           f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}</p>",
           "<div class='card'><p>One sub-run per value; each fine-tunes the same initial model and is evaluated at "
           "every checkpoint on the same held-out prompts and noise. <b>gold_peak</b>: highest gold reward over the "
           "checkpoints (at <b>peak_step</b>, distance <b>peak_d</b>); <b>alpha/beta</b>: Gao et al. RL fit "
           "R(d) = R0 + d(α − β log d) of the gold (proxy) reward vs d.</p></div>"]
    if plots:
        out.append("<h2>Plots</h2>")
        for cap, p in plots:
            out.append(f"<h3>{html.escape(cap)}</h3><img class='plot' src='{p.relative_to(root).as_posix()}' "
                       f"alt='{html.escape(cap)}'>")
    out.append("<h2>Sweep table</h2>" + _table_html(table))
    out.append("<h2>Sub-runs</h2><ul>")
    for name in table["sub_run"]:
        rep = root / name / "study" / "report.html"
        link = f"<a href='{name}/study/report.html'>{html.escape(name)}</a>" if rep.exists() else html.escape(name)
        out.append(f"<li>{link}</li>")
    out.append("</ul>")
    cfg = root / "config.yaml"
    if cfg.exists():
        out.append(f"<h2>Config</h2><pre style='font-size:12px'>{html.escape(cfg.read_text()[:8000])}</pre>")
    out.append("</body></html>")
    path = root / "report.html"
    atomic_write_bytes(path, "\n".join(out).encode())
    return path


def run_sweep(cfg: OveroptConfig) -> dict[str, Any]:
    import pandas as pd

    from lrm.io import write_json
    from lrm.run import get_logger, prepare_run_dir

    root = Path(cfg.run_dir)
    prepare_run_dir(root, cfg, logger_name="lrm.overopt")
    log = get_logger("lrm.overopt")
    sweep_key_check(cfg.sweep)
    base = cfg
    if cfg.cache_size is None:  # one cache for every sub-run: as large as the largest training set asked for
        sizes = [int(v) for v in cfg.sweep.get("lrm_train_size", [])] + [cfg.lrm_train_size]
        base = dataclasses.replace(cfg, cache_size=max(sizes), sweep={})
    assigns = sweep_assignments(cfg.sweep)
    subs = [(a, apply_assignment(base, a, root / sub_run_name(a))) for a in assigns]  # validates every value first
    log.info("sweep over %s: %d sub-runs", list(cfg.sweep), len(subs))
    rows, summaries = [], {}
    for a, sub in subs:
        name = sub_run_name(a)
        if (Path(sub.run_dir) / "summary.json").exists():
            log.info("sub-run %s is finished; skipping", name)
        else:
            log.info("sub-run %s", name)
        s = run_single(sub, shared=root / "shared")
        summaries[name] = s
        rows.append(_sweep_row(a, s, Path(sub.run_dir), f"gold/{sub.gold_reward}"))
    table = pd.DataFrame(rows)
    table.to_csv(root / "sweep.csv", index=False)
    key = ",".join(cfg.sweep)
    plots = plot_sweep(root, key if len(cfg.sweep) == 1 else key, rows, f"gold/{cfg.gold_reward}") \
        if len(cfg.sweep) >= 1 else []
    write_json(root / "sweep.json", {"sweep": cfg.sweep, "sub_runs": list(summaries),
                                     "skipped": [n for n, s in summaries.items() if s.get("skipped")]})
    report = write_sweep_report(root, key, table, plots) if cfg.report else None
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if report:
        print(f"wrote {report}")
    return {"table": table, "summaries": summaries, "report": report}


def run_overopt(cfg: OveroptConfig) -> dict[str, Any]:
    """``lrm overopt``: one run, or one sub-run per sweep value plus the combined table, plots and report."""
    if cfg.sweep:
        return run_sweep(cfg)
    s = run_single(cfg)
    if s.get("skipped"):
        print(f"{cfg.run_dir} is finished (summary.json exists); delete it to run again")
    else:
        print(json.dumps({k: s.get(k) for k in ("run_dir", "n_checkpoints", "peak", "early_stop", "early_stop_proxy",
                                                "times_s", "report")},
                         indent=1, default=str))
    return s


__all__ = ["OveroptConfig", "run_overopt", "run_single", "run_sweep", "sweep_key_check", "build_gold_cache",
           "gold_cache", "auto_patch", "auto_temporal_patch", "teacher_is_video", "MODEL_KEYS",
           "fit_proxy", "finetune_with_checkpoints", "best_of_n_sweep", "step0_generator", "load_student", "ProxyView",
           "LRM_KEYS", "LRM_SIZE_KEYS"]
