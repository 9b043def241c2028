"""Reward fine-tuning of a k-step student: LRM (DOLLAR Eq. 11), DDPO_SF (Alg. 2) or direct reward gradient
(ReFL / DRaFT-K), behind one config and one trainer, optionally combined with the distillation losses.

One trainer step (``FinetuneTrainer.train_step``):
  method=lrm     x_hat = student x0 prediction at a backward-simulated step; L = beta_ft * -R^l(x_hat, c)
                 (+ distillation losses on the same x_hat); one optimizer step.
  method=direct  k-step sample with autograd on the last K steps; L = -R(Dec(x0), c) through the decoder
                 (+ distillation losses on a backward-simulated x_hat); one optimizer step.
  method=ddpo    ``num_sample_batches`` stochastic chains (rewards computed in a worker thread while the next batch
                 samples), advantages, then ``inner_epochs`` x (samples / train_batch_size) PPO optimizer steps on
                 the last ``ddpo_grad_steps`` transitions (+ distillation losses per optimizer step).
  then, with ``distill_losses: [vsd]``, ``fake_updates`` fake-score steps (DMD2).

LoRA (``lora_rank`` > 0, ``distill.lora``): one frozen copy of ``init`` is the base; the student is its "student"
adapter, pi_ref and the distillation teacher are the base with adapters off, the fake score and CD target are
"fake" / "ema" adapters on it (a separate ``teacher=`` stays a separate frozen network, its fake score a full copy).

KL / reference regularisation (``beta_kl`` > 0) toward the frozen initial student pi_ref (a copy of ``init``);
the logged ``kl`` column is the estimate below, the loss adds ``beta_kl * kl``:
  method=ddpo    the per-step Gaussian KL of the two chains at the sampled states (both transitions have the same
                 std sigma_t): KL_t = ||mu_theta(x_t, t) - mu_ref(x_t, t)||^2 / (2 sigma_t^2), summed over elements.
                 Penalty: sum of KL_t over the trained (last ``ddpo_grad_steps``) transitions, re-evaluated with the
                 current weights at every PPO step and differentiated through mu_theta only (the pathwise part of
                 the chain-rule KL, as DPOK's KL regulariser; Fan et al. 2023). Logged ``kl``: the full-chain
                 sum_t KL_t of the sampling policy, mean over samples (``eval.kl.gaussian_chain_kl``'s estimator).
  method=lrm     ||x_hat_theta - x_hat_ref||^2 / 2, summed over elements, mean over the batch, with x_hat_ref the
                 frozen initial student's x0 prediction at the SAME backward-simulated state x_t (same noise, same
                 t): the smoothed-output KL of ``eval.kl.smoothed_output_kl`` at sigma = 1 (one scaled-latent unit)
                 for the one-step prediction. An upper bound on the smoothed KL of the one-step outputs; it is not
                 the KL of the deployed k-step sampler.
  method=direct  the same on the last student step of the k-step sample: x_hat_ref is the initial student's x0
                 prediction at the last step's input state (detached), x_hat_theta the student's (with graph).
Logged per step (log.csv): gold reward (pixel reward of decoded samples), proxy reward (LRM, method=lrm), step
time, peak GPU memory of the step, cumulative device-seconds; every ``eval_every`` steps the gold reward of the
k-step sampler on a fixed evaluation set (same noise, same prompts, for every method).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn

from distill.cd import cd_loss, consistency_output, ddim_grid
from distill.ddpo import (
    DDPOSamples,
    PerPromptStatTracker,
    global_advantages,
    ppo_loss,
    trained_step_indices,
    transition_mean_log_prob,
)
from distill.denoiser import Denoiser
from distill.direct import FRAME_SUBSAMPLING, PIXEL_CLAMPS, direct_reward_loss
from distill.ema import EMA
from distill.guard import NonFiniteGuard
from distill.lrm_ft import lrm_ft_loss
from distill.samplers import LOG_PROB_REDUCTIONS, STUDENT_TIMESTEPS, k_step_sample, step_mean, stochastic_sample
from distill.shell import SHELL_MUTABLE_KEYS, ShellConfig, StudentShell
from distill.vsd import fake_score_loss, vsd_loss
from lrm.checkpoint import load_training_state, save_training_state
from lrm.config import ConfigError, opt
from lrm.run import (
    fingerprint,
    get_logger,
    resolve_device,
    seed_everything,
)

METHODS = ("lrm", "ddpo", "direct")
DISTILL_LOSSES = ("vsd", "cd")
# config keys a resumed run may change (how long, how often it reports and evaluates; not what it trains)
MUTABLE_KEYS = SHELL_MUTABLE_KEYS + ("max_gpu_seconds", "eval_every", "eval_every_gpu_s", "eval_batch_size",
                                    "log_gold_train", "async_reward")
LOG_COLUMNS = ["step", "method", "gold_reward", "proxy_reward", "eval_gold_reward", "loss", "loss_ft", "loss_vsd",
               "loss_cd", "loss_fake", "kl", "approx_kl", "clipfrac", "adv_std", "grad_norm", "optimizer_steps",
               "samples", "step_time_s", "gpu_seconds", "peak_mem_mb", "lr"]


@dataclass
class FinetuneConfig(ShellConfig):
    # ---- run -------------------------------------------------------------------------------------------
    method: Literal["lrm", "ddpo", "direct"] = opt("lrm", "lrm: latent reward gradient (DOLLAR Eq. 11); ddpo: "
                                                          "DDPO_SF / PPO on the pixel reward (Alg. 2); direct: "
                                                          "pixel reward gradient through the decoder (DRaFT-K)")
    run_dir: str = opt("runs/finetune", "output directory: config.yaml, log.txt, log.csv, checkpoint/, samples/, "
                                        "student/")
    seed: int = opt(0, "random seed")
    device: str = opt("auto", "'auto' (cuda if available), 'cuda', 'cuda:N' or 'cpu'")
    # ---- models and data (used by build_finetune / `lrm finetune`; the Python API takes objects) ---------
    teacher: str = opt("shapes-image", "student initialisation (and teacher of distill_losses): 'shapes-image' / "
                                       "'shapes-video' (shipped Shapes teachers), a Denoiser directory (e.g. "
                                       "RUN/student of `lrm distill`), or a diffusers pipeline directory / hub id")
    gold_reward: str = opt("colorfulness", "reward_adapters name of the gold pixel reward (the DDPO / direct "
                                           "training signal; logged for every method)")
    gold_reward_kwargs: dict = opt({}, "constructor options of the gold reward, e.g. {frames: first-middle-last}")
    lrm_path: str | None = opt(None, "LatentReward directory (method=lrm), e.g. from `lrm train`")
    data_cache: str | None = opt(None, "prompt pool from a LatentCache (`lrm cache build`): its captions, text "
                                       "embeddings and latents (CD's data latents)")
    prompt_file: str | None = opt(None, "prompt pool from a file: .txt (one per line), .csv or .jsonl (column / key "
                                        "prompt, caption or text), encoded by text_encoder; no data latents")
    num_prompts: int = opt(64, "Shapes world captions used as the prompt pool when neither data_cache nor "
                               "prompt_file is set (Shapes teachers only)")
    data_seed: int = opt(0, "ShapesWorld seed of the prompt pool")
    num_frames: int = opt(16, "frames per video for the Shapes video world (teacher 'shapes-video')")
    # ---- student ---------------------------------------------------------------------------------------
    student_steps: int = opt(4, "student sampling steps k (1, 2 or 4 use DOLLAR's timesteps)")
    student_timesteps: list[int] | None = opt(None, "custom student timesteps (overrides student_steps)")
    sigma_data: float = opt(0.5, "sigma_d of the consistency boundary scalings (as in distillation)")
    timestep_scaling: float = opt(10.0, "timestep scaling of the boundary scalings")
    # ---- optimisation ----------------------------------------------------------------------------------
    steps: int = opt(200, "trainer steps (ddpo: one step = sampling + inner epochs of PPO updates)")
    max_gpu_seconds: float | None = opt(None, "stop once the cumulative step time (device-seconds) exceeds this; "
                                              "None = run all steps")
    batch_size: int = opt(16, "samples per optimizer step for lrm / direct, per process")
    lr: float = opt(1e-5, "student learning rate (AdamW)")
    adam_beta1: float = opt(0.9, "AdamW beta1")
    adam_beta2: float = opt(0.999, "AdamW beta2")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "gradient clipping (L2 norm) of the student; 0 = off")
    bf16: bool = opt(False, "bf16 autocast for network calls (CUDA only)")
    gradient_checkpointing: bool = opt(False, "activation checkpointing: student UNet blocks and (direct) each "
                                              "student call and the decoder; needed by direct at real size (SD-1.5 "
                                              "at 512 px: the decoder's graph alone is ~10 GB per sample in fp32)")
    # ---- LRM -------------------------------------------------------------------------------------------
    beta_ft: float = opt(1.0, "weight of L_FT = -R^l(x_hat, c) (DOLLAR beta_FT), in 1 / reward units")
    # ---- regularisation toward the initial model ---------------------------------------------------------
    beta_kl: float = opt(0.0, "weight of the KL / reference penalty toward the frozen initial student (0 = off; "
                              "ddpo: per-step Gaussian chain KL, lrm / direct: ||x_hat - x_hat_ref||^2 / 2 of the "
                              "one-step x0 prediction; see the module doc), in reward units per nat")
    # ---- DDPO ------------------------------------------------------------------------------------------
    sample_batch_size: int = opt(16, "ddpo: chains per sample batch")
    num_sample_batches: int = opt(2, "ddpo: sample batches per trainer step (rewards of batch i are computed "
                                     "while batch i + 1 samples)")
    train_batch_size: int = opt(16, "ddpo: samples per PPO optimizer step; must divide sample_batch_size * "
                                    "num_sample_batches")
    inner_epochs: int = opt(1, "ddpo: passes over the samples per trainer step (PPO inner epochs)")
    ddpo_grad_steps: int = opt(2, "ddpo: truncation, gradients only on the last N transitions (DOLLAR: 2)")
    eta: float = opt(1.0, "ddpo: DDIM eta of the stochastic posterior (1 = DDPM posterior sigma)")
    final_timestep: int = opt(0, "ddpo: where the chain ends (0: a proper Gaussian last step; -1 is deterministic)")
    per_prompt_stats: bool = opt(True, "ddpo: normalise advantages per prompt (else over the whole batch)")
    stat_buffer_size: int = opt(16, "ddpo: per-prompt reward buffer length")
    stat_min_count: int = opt(16, "ddpo: rewards a prompt needs before its own statistics are used")
    adv_clip: float = opt(5.0, "ddpo: advantages clipped to [-adv_clip, adv_clip]")
    clip_range: float = opt(1e-4, "ddpo: PPO ratio clip range (ddpo-pytorch's default, tuned for "
                                  "log_prob_reduction='mean')")
    log_prob_reduction: Literal["mean", "sum"] = opt(
        "mean", "ddpo: reduction of each transition's Gaussian log-prob over the latent elements: 'mean' (ddpo-pytorch"
                " / TRL 0.11) or 'sum' (the exact density; log-ratios C*H*W times larger)")
    async_reward: bool = opt(True, "ddpo: compute rewards in a worker thread, overlapping the next sample batch")
    # ---- direct ----------------------------------------------------------------------------------------
    direct_grad_steps: int = opt(1, "direct: backprop through the last K student steps (DRaFT-K)")
    frames: str = opt("first-middle-last", f"direct, video: frames decoded and scored, one of {FRAME_SUBSAMPLING}")
    num_random_frames: int = opt(2, "direct, video: frames drawn with frames=random")
    pixel_clamp: str = opt("straight-through", f"direct: decoder output to [0, 1], one of {PIXEL_CLAMPS}")
    # ---- distillation losses combined with fine-tuning (DOLLAR Tab. 17/18: VSD + DDPO) ------------------
    distill_losses: list[str] = opt([], f"distillation losses added to each optimizer step, subset of "
                                        f"{list(DISTILL_LOSSES)} (needs the teacher; cd also data latents)")
    beta_vsd: float = opt(1.0, "weight of L_VSD")
    beta_cd: float = opt(0.5, "weight of L_CD")
    real_guidance: float = opt(3.5, "CFG scale of VSD's real score (Imagen form)")
    fake_updates: int = opt(5, "fake-score optimizer steps per trainer step (vsd)")
    lr_fake: float = opt(5e-5, "fake-score learning rate")
    cd_teacher_steps: int = opt(5, "m teacher DDIM steps per CD target")
    cd_guidance: float = opt(7.5, "CFG scale of the CD teacher (Imagen form)")
    cd_ema_decay: float = opt(0.95, "EMA decay of the CD target network")
    # ---- logging ---------------------------------------------------------------------------------------
    eval_every: int = opt(10, "gold reward of the k-step sampler on the fixed evaluation set every N steps "
                              "(0 = only at start and end); not counted in step time")
    eval_every_gpu_s: float | None = opt(None, "also evaluate each time the cumulative step time passes a multiple "
                                               "of this many device-seconds (even curves across methods)")
    num_eval: int = opt(64, "evaluation samples (prompts cycle through the pool)")
    eval_batch_size: int = opt(16, "samples per sampling call in evaluation and sample grids (decoding is chunked "
                                   "by vae_chunk_size)")
    log_gold_train: bool = opt(True, "method=lrm: also score the training samples with the gold reward (not "
                                     "counted in step time)")
    ckpt_every: int = opt(100, "save a resumable checkpoint every N steps (0 = only at the end, see "
                               "final_checkpoint)")
    sample_every: int = opt(100, "save a sample grid every N steps (0 = only at the end)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in METHODS:
            raise ConfigError(f"method {self.method!r} is not one of {METHODS}")
        if self.student_timesteps is None and self.student_steps not in STUDENT_TIMESTEPS:
            raise ConfigError(f"student_steps={self.student_steps} has no default timesteps "
                              f"({sorted(STUDENT_TIMESTEPS)}); pass student_timesteps explicitly")
        for name in ("steps", "batch_size", "sample_batch_size", "num_sample_batches", "train_batch_size",
                     "inner_epochs", "num_prompts", "num_eval", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        total = self.sample_batch_size * self.num_sample_batches
        if total % self.train_batch_size != 0:
            raise ConfigError(
                f"sample_batch_size * num_sample_batches = {self.sample_batch_size} * {self.num_sample_batches} = "
                f"{total} samples per step is not divisible by train_batch_size = {self.train_batch_size}; pick "
                f"a train_batch_size that divides {total} (e.g. "
                f"{max(d for d in range(1, self.train_batch_size + 1) if total % d == 0)})")
        k = len(self.timesteps)
        if not 1 <= self.ddpo_grad_steps <= k:
            raise ConfigError(f"ddpo_grad_steps must be in [1, {k}] for a {k}-step student, got {self.ddpo_grad_steps}")
        if not 1 <= self.direct_grad_steps <= k:
            raise ConfigError(f"direct_grad_steps must be in [1, {k}] for a {k}-step student, got "
                              f"{self.direct_grad_steps}")
        if self.final_timestep >= min(self.timesteps):
            raise ConfigError(f"final_timestep {self.final_timestep} must be below the last student timestep "
                              f"{min(self.timesteps)}")
        if self.method == "ddpo" and (self.eta <= 0 or self.final_timestep < 0):
            raise ConfigError("ddpo needs a stochastic chain: eta > 0 and final_timestep >= 0 (got eta="
                              f"{self.eta}, final_timestep={self.final_timestep})")
        if self.stat_min_count > self.stat_buffer_size:
            raise ConfigError(f"stat_min_count {self.stat_min_count} > stat_buffer_size {self.stat_buffer_size}: "
                              "a prompt could never use its own statistics")
        if self.frames not in FRAME_SUBSAMPLING:
            raise ConfigError(f"frames {self.frames!r} is not one of {FRAME_SUBSAMPLING}")
        if self.pixel_clamp not in PIXEL_CLAMPS:
            raise ConfigError(f"pixel_clamp {self.pixel_clamp!r} is not one of {PIXEL_CLAMPS}")
        bad = [x for x in self.distill_losses if x not in DISTILL_LOSSES]
        if bad:
            raise ConfigError(f"distill_losses {bad} unknown; valid: {list(DISTILL_LOSSES)}")
        if "vsd" in self.distill_losses and self.fake_updates < 1:
            raise ConfigError(f"fake_updates must be >= 1 with vsd, got {self.fake_updates}")
        if self.beta_kl < 0:
            raise ConfigError(f"beta_kl must be >= 0 (a penalty weight; 0 = off), got {self.beta_kl}")
        if self.data_cache is not None and self.prompt_file is not None:
            raise ConfigError("set one prompt source: data_cache or prompt_file, not both")
        if self.log_prob_reduction not in LOG_PROB_REDUCTIONS:
            raise ConfigError(f"log_prob_reduction must be one of {LOG_PROB_REDUCTIONS}, got "
                              f"{self.log_prob_reduction!r}")
        if self.adv_clip <= 0 or self.clip_range <= 0:
            raise ConfigError(f"adv_clip and clip_range must be > 0, got {self.adv_clip}, {self.clip_range}")

    @property
    def timesteps(self) -> list[int]:
        ts = self.student_timesteps if self.student_timesteps is not None else STUDENT_TIMESTEPS[self.student_steps]
        return sorted((int(t) for t in ts), reverse=True)


@dataclass
class PromptPool:
    """Captions with their text embeddings (and optional data latents for CD): ``text_tokens`` (N, L, D),
    ``text_mask`` (N, L) bool, ``prompts`` N strings, ``latents`` (N, ...) or None."""

    text_tokens: torch.Tensor
    text_mask: torch.Tensor
    prompts: list[str]
    latents: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n = len(self.prompts)
        if self.text_tokens.shape[0] != n or self.text_mask.shape[0] != n:
            raise ValueError(f"PromptPool sizes differ: {n} prompts, text_tokens {self.text_tokens.shape[0]}, "
                             f"text_mask {self.text_mask.shape[0]}")
        if self.latents is not None and self.latents.shape[0] != n:
            raise ValueError(f"PromptPool has {n} prompts but {self.latents.shape[0]} latents")

    def __len__(self) -> int:
        return len(self.prompts)

    def to(self, device) -> "PromptPool":
        return PromptPool(self.text_tokens.to(device), self.text_mask.to(device).bool(), list(self.prompts),
                          None if self.latents is None else self.latents.to(device))

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor | None]:
        i = idx.to(self.text_tokens.device)
        lat = None if self.latents is None else self.latents[i]
        return self.text_tokens[i], self.text_mask[i], [self.prompts[j] for j in idx.tolist()], lat

    @classmethod
    def from_distill_data(cls, data: Any) -> "PromptPool":
        return cls(data.text_tokens, data.text_mask.bool(), list(data.prompts), data.latents)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class FinetuneTrainer(StudentShell):
    """Reward fine-tuning of a student (one of ``METHODS``), logging the same quantities for each.

    Args:
        config: ``FinetuneConfig``.
        init: the ``Denoiser`` the student starts from (the shipped teacher, or a distilled student); not modified.
        pool: ``PromptPool`` (captions + text embeddings; data latents for CD).
        gold_reward: pixel reward ``reward(pixels [0, 1], prompts) -> (B,)`` (a ``reward_adapters`` reward).
        vae: ``lrm.latent_space.VAE`` (decoding for the gold reward, the direct gradient and the grids).
        lrm: latent reward for method=lrm (``latent_rewards.LatentReward`` or ``lrm(latents, tokens, mask)``).
        teacher: frozen teacher ``Denoiser`` for the distillation losses (default: a frozen copy of ``init``).
        latent_shape: per-sample latent shape, e.g. ``(T, C, h, w)``; default: the pool's data latents, else the
            model's square ``sample_size``.
    """

    def __init__(self, config: FinetuneConfig, init: Denoiser, pool: PromptPool, gold_reward: Any, vae: Any,
                 lrm: Any = None, teacher: Denoiser | None = None, latent_shape: tuple[int, ...] | None = None):
        self.config = cfg = config
        self.device = resolve_device(cfg.device)
        if cfg.bf16 and self.device.type != "cuda":
            raise ConfigError(f"bf16=true needs a CUDA device (got {self.device}); set bf16: false on CPU")
        if cfg.method == "lrm" and lrm is None:
            raise ConfigError("method=lrm needs a latent reward: pass lrm= (a LatentReward) or set lrm_path")
        if cfg.method == "direct" and not getattr(gold_reward, "differentiable", False):
            raise ConfigError(f"method=direct needs a differentiable gold reward; {getattr(gold_reward, 'name', '?')!r}"
                              " is not (try colorfulness, sharpness or brightness, or use method=ddpo)")
        self.logger = get_logger("lrm.finetune")
        self.guard = NonFiniteGuard(cfg.max_nonfinite_steps, self.logger, f"lrm finetune ({cfg.method})")
        seed_everything(cfg.seed)
        self.timesteps = cfg.timesteps
        # what a resumed run must find again (init / teacher weights, prompts, VAE, LRM)
        self.inputs = {"init": fingerprint(init.model.state_dict().items()),
                       "teacher": None if teacher is None else fingerprint(teacher.model.state_dict().items()),
                       "prompts": fingerprint([("text", pool.text_tokens)] + ([] if pool.latents is None else
                                                                              [("latents", pool.latents)])),
                       "vae": getattr(getattr(vae, "latent_space", None), "vae_hash", None),
                       "lrm": fingerprint(lrm.state_dict().items()) if isinstance(lrm, nn.Module) else None}
        null = (init.null_tokens.detach().cpu(), init.null_mask.detach().cpu())
        # copy, then move: the caller's init stays where it is (it may be large and kept on the CPU)
        self.student = Denoiser(copy.deepcopy(init.model).to(self.device), init.schedule, init.parameterization,
                                cfg_null=null, use_text_mask=init.use_text_mask)
        self.student = self.student.to(self.device)
        self.lora = self._base = None
        if cfg.lora_rank > 0:  # distill.lora: the copy of init is the one frozen base, the student an adapter on it
            from distill.lora import lora_base, role

            self._base = self.student
            self.lora = lora_base(cfg, self._base.model)
            self.student = role(self._base, self.lora.add("student"))
        self.student = self.student.requires_grad_(True).train()
        self.schedule = self.student.schedule
        # frozen initial student pi_ref of the KL / reference penalty (beta_kl > 0 only: it costs a model copy;
        # LoRA: none, pi_ref is the base with the student adapter disabled)
        self.ref: Denoiser | None = None
        if cfg.beta_kl > 0 and self.lora is not None:
            self.ref = role(self._base, self.lora.view(None)).eval()
        elif cfg.beta_kl > 0:
            self.ref = Denoiser(copy.deepcopy(init.model).to(self.device), init.schedule, init.parameterization,
                                cfg_null=null, use_text_mask=init.use_text_mask).to(self.device).eval()
            self.ref.requires_grad_(False)
        if cfg.gradient_checkpointing:
            if getattr(self.student.model, "_supports_gradient_checkpointing", False):
                self.student.model.enable_gradient_checkpointing()
            else:  # e.g. diffusers' UNet3DConditionModel; the direct method still checkpoints calls + decoder
                self.logger.warning("%s has no block-level gradient checkpointing; only the direct method's "
                                    "per-call / decoder checkpointing applies", type(self.student.model).__name__)
        self.pool = pool.to(self.device)
        self.gold_reward = gold_reward
        self.vae = vae
        self.lrm = None
        if lrm is not None:
            if isinstance(lrm, nn.Module):
                lrm.to(self.device).eval().requires_grad_(False)
            if hasattr(lrm, "check_finite"):  # NaN latents: the guard skips the step (no host sync per call)
                lrm.check_finite = False
            self.lrm = lrm  # lrm_ft_loss passes text only to text-conditioned LRMs
        # distillation losses
        self.teacher = self.fake = self.target = self.opt_f = None
        if cfg.distill_losses:
            base = teacher if teacher is not None else init
            shared = self.lora is not None and teacher is None  # LoRA: teacher = init = the base, adapters off
            if shared:
                self.teacher = role(self._base, self.lora.view(None)).eval()
            else:  # a separate teacher network stays a separate frozen copy (its fake score a full copy of it)
                self.teacher = copy.deepcopy(base).to(self.device).eval().requires_grad_(False)
            if "vsd" in cfg.distill_losses:
                self.fake = (role(self._base, self.lora.add("fake")) if shared
                             else copy.deepcopy(self.teacher)).requires_grad_(True).train()
                self.opt_f = torch.optim.AdamW(self.fake.model.parameters(), lr=cfg.lr_fake,
                                               betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
            if "cd" in cfg.distill_losses:
                if self.pool.latents is None:
                    raise ConfigError("distill_losses [cd] needs data latents in the prompt pool (PromptPool.latents)")
                self.target = EMA(self.student, cfg.cd_ema_decay, shadow=None if self.lora is None else role(
                    self._base, self.lora.add("ema", trainable=False, init_from="student")))
                self.grid = ddim_grid(self.schedule.num_train_timesteps, 50, device=self.device)
        self.opt = torch.optim.AdamW(self.student.model.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                     weight_decay=cfg.weight_decay)
        self.tracker = PerPromptStatTracker(cfg.stat_buffer_size, cfg.stat_min_count)
        self._pool_exec = ThreadPoolExecutor(max_workers=1) if cfg.async_reward else None
        self.step = 0
        self.optimizer_steps = 0
        self.gpu_seconds = 0.0
        self.peak_mem_mb = 0.0
        self._evals_by_time = 0
        self.history: list[dict[str, Any]] = []
        # fixed evaluation set: noise + prompts (same for every method with the same seed)
        g = torch.Generator().manual_seed(cfg.seed + 12345)
        self.latent_shape = tuple(latent_shape) if latent_shape is not None else self._latent_shape()
        self._eval_idx = torch.arange(cfg.num_eval) % len(self.pool)
        self._eval_noise = torch.randn((cfg.num_eval, *self.latent_shape), generator=g)

    # ---- helpers -----------------------------------------------------------------------------------------
    LOG_COLUMNS = LOG_COLUMNS
    is_main = True  # one process
    def _latent_shape(self) -> tuple[int, ...]:
        if self.pool.latents is not None:
            return tuple(self.pool.latents.shape[1:])
        m = self.student.model.config
        C, s = int(m.in_channels), int(m.sample_size)
        return (self.config.num_frames, C, s, s) if self.student.is_video else (C, s, s)

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.config.bf16 else nullcontext()

    def student_x0(self, x_t: torch.Tensor, t: torch.Tensor, tok: torch.Tensor, mask: torch.Tensor | None):
        """The student's x0 map (consistency function; equals the raw x0 prediction at t >= 249 up to 1e-6)."""
        with self.autocast():
            x0 = self.student.x0(x_t, t, tok, mask)
        return consistency_output(x_t, x0.float(), t, self.config.sigma_data, self.config.timestep_scaling)

    def _batch(self, n: int):
        idx = torch.randint(len(self.pool), (n,))
        return self.pool.take(idx)

    def _noise(self, n: int) -> torch.Tensor:
        return torch.randn((n, *self.latent_shape), device=self.device)

    @torch.no_grad()
    def gold(self, latents: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Gold reward of latents: pixel reward of the clamped decoding, float32 (B,) on CPU."""
        pixels = self.vae.decode(latents.float(), clamp=True)
        return self.gold_reward(pixels, prompts).float().cpu()

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, tok: torch.Tensor, mask: torch.Tensor | None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """k-step student sampling (x0 latents), as deployed."""
        was = self.student.training
        self.student.eval()
        x0 = k_step_sample(lambda x, t: self.student_x0(x, t, tok, mask), noise.to(self.device), self.timesteps,
                           self.schedule, generator=generator).x0
        self.student.train(was)
        return x0

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean gold reward of the k-step sampler on the fixed evaluation set."""
        out = []
        g = torch.Generator().manual_seed(self.config.seed + 777)
        n = self.config.eval_batch_size
        for s in range(0, self.config.num_eval, n):
            idx = self._eval_idx[s:s + n]
            tok, mask, prompts, _ = self.pool.take(idx)
            x0 = self.sample(self._eval_noise[s:s + n], tok, mask, generator=g)
            out.append(self.gold(x0, prompts))
        return float(torch.cat(out).mean())

    def _try_evaluate(self) -> float | None:
        """``evaluate()``, but a failure (e.g. out of memory at a large num_eval) is logged, not raised: training
        and its checkpoints never depend on an evaluation."""
        try:
            return self.evaluate()
        except (RuntimeError, ValueError) as e:  # torch.OutOfMemoryError is a RuntimeError
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.logger.error("evaluation at step %d failed, training goes on: %s: %s (lower eval_batch_size / "
                              "vae_chunk_size, or set vae_bf16)", self.step, type(e).__name__, str(e).splitlines()[0])
            return None

    def _distill_terms(self, x_hat: torch.Tensor | None, tok, mask, lat) -> tuple[torch.Tensor, dict[str, float],
                                                                                 torch.Tensor | None]:
        """beta_vsd L_VSD (on x_hat, drawn by backward simulation when None) + beta_cd L_CD."""
        cfg = self.config
        loss = torch.zeros((), device=self.device)
        logs: dict[str, float] = {}
        if not cfg.distill_losses:
            return loss, logs, x_hat
        B, L = tok.shape[:2]
        null_t, null_m = self.teacher.null_text(B, L)
        if "vsd" in cfg.distill_losses:
            if x_hat is None:
                x_hat = self._graded_state(tok, mask)[2]
            l_vsd, _ = vsd_loss(x_hat, self.teacher, self.fake, tok, mask, null_t, null_m, cfg.real_guidance,
                                autocast=self.autocast)
            loss = loss + cfg.beta_vsd * l_vsd
            logs["loss_vsd"] = float(l_vsd.detach())
        if "cd" in cfg.distill_losses:
            tgt = self.target.shadow
            l_cd = cd_loss(lambda x, t: self.student.x0(x, t, tok, mask), lat, self.teacher,
                           lambda x, t: tgt.x0(x, t, tok, mask), tok, mask, null_t, null_m, self.grid,
                           cfg.cd_teacher_steps, cfg.cd_guidance, sigma_data=cfg.sigma_data,
                           timestep_scaling=cfg.timestep_scaling, autocast=self.autocast)
            loss = loss + cfg.beta_cd * l_cd
            logs["loss_cd"] = float(l_cd.detach())
        return loss, logs, x_hat

    def _graded_state(self, tok, mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """DMD2 backward simulation: ``(x_t, t, x_hat)``, the student's x0 at a random one of its k steps (with a
        graph) and the state it was predicted from."""
        B = tok.shape[0]
        k = int(torch.randint(len(self.timesteps), (1,))) if len(self.timesteps) > 1 else 0
        state = k_step_sample(lambda x, t: self.student_x0(x, t, tok, mask), self._noise(B), self.timesteps,
                              self.schedule, grad_steps=0, stop_at=k)
        return state.x_t, state.t, self.student_x0(state.x_t, state.t, tok, mask)

    # ---- KL / reference penalty (beta_kl) -------------------------------------------------------------------
    @torch.no_grad()
    def ref_x0(self, x_t: torch.Tensor, t: torch.Tensor, tok: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The frozen initial student's x0 map at ``(x_t, t)`` (same consistency function as ``student_x0``)."""
        if self.ref is None:
            raise RuntimeError("no reference model: set beta_kl > 0")
        with self.autocast():
            x0 = self.ref.x0(x_t, t, tok, mask)
        return consistency_output(x_t, x0.float(), t, self.config.sigma_data, self.config.timestep_scaling)

    @staticmethod
    def x0_kl(x_hat: torch.Tensor, x_ref: torch.Tensor) -> torch.Tensor:
        """Per-sample ``||x_hat - x_ref||^2 / 2`` (summed over elements), ``(B,)``: the smoothed-output KL at
        sigma = 1 of the one-step prediction (module doc); differentiable in ``x_hat``."""
        return (x_hat.float() - x_ref.detach().float()).pow(2).flatten(1).sum(1) / 2

    @staticmethod
    def chain_step_kl(mu: torch.Tensor, mu_ref: torch.Tensor, sigma: float) -> torch.Tensor:
        """Per-sample ``||mu - mu_ref||^2 / (2 sigma^2)`` of one Gaussian transition, ``(B,)``."""
        return (mu.float() - mu_ref.detach().float()).pow(2).flatten(1).sum(1) / (2 * sigma ** 2)

    @torch.no_grad()
    def _sample_ddpo(self, noise, tok, mask, prompts) -> tuple[DDPOSamples, torch.Tensor | None, torch.Tensor | None]:
        """One DDPO sample batch; with a reference also its means at every sampled state ``(B, K, ...)`` and the
        per-sample full-chain KL ``(B,)`` of the sampling policy."""
        cfg = self.config
        with self.autocast():  # the stochastic chain (ddpo.sample_chain), keeping the trajectory's per-step means
            traj = stochastic_sample(self.student, noise, tok, mask, list(self.timesteps), eta=cfg.eta, grad_steps=0,
                                     final_timestep=cfg.final_timestep, reduction=cfg.log_prob_reduction)
        s = DDPOSamples.from_trajectory(traj, tok, mask, prompts)
        if self.ref is None:
            return s, None, None
        with self.autocast():
            ref_means = [step_mean(self.ref, x, int(t), int(sp), tok, mask, cfg.eta)[0].float()
                         for x, t, sp in zip(traj.latents[:-1], traj.timesteps, traj.prev_timesteps)]
        kl = sum(self.chain_step_kl(m, r, float(sd)) for m, r, sd in zip(traj.means, ref_means, traj.stds))
        return s, torch.stack(ref_means, 1), kl

    def _optimizer_step(self) -> float:
        cfg = self.config
        params = self.student.model.parameters()
        gn = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        if not self.guard.check(gn, "loss / gradient", self.step + 1):
            self.opt.zero_grad(set_to_none=True)
            return float(gn)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.target is not None:
            self.target.update(self.student)
        self.optimizer_steps += 1
        return float(gn)

    # ---- the three methods --------------------------------------------------------------------------------
    def lrm_step(self) -> dict[str, Any]:
        """L = beta_ft * -R^l(x_hat, c) (+ distillation losses on the same x_hat); one optimizer step."""
        cfg = self.config
        tok, mask, prompts, lat = self._batch(cfg.batch_size)
        x_t, t, x_hat = self._graded_state(tok, mask)
        l_ft, r = lrm_ft_loss(self.lrm, x_hat, tok, mask)
        l_d, logs, _ = self._distill_terms(x_hat, tok, mask, lat)
        loss = cfg.beta_ft * l_ft + l_d
        if self.ref is not None:  # KL / reference penalty on the one-step prediction, same state x_t
            kl = self.x0_kl(x_hat, self.ref_x0(x_t.detach(), t, tok, mask)).mean()
            loss = loss + cfg.beta_kl * kl
            logs["kl"] = float(kl.detach())
        loss.backward()
        logs.update(loss=float(loss.detach()), loss_ft=float(l_ft.detach()), proxy_reward=float(r.mean()),
                    grad_norm=self._optimizer_step(), samples=cfg.batch_size)
        self._last = (x_hat.detach(), prompts, tok, mask)
        return logs

    def direct_step(self) -> dict[str, Any]:
        """L = -R(Dec(x0), c) with x0 from the k-step sampler, graph on the last K steps; one optimizer step."""
        cfg = self.config
        tok, mask, prompts, lat = self._batch(cfg.batch_size)
        state = k_step_sample(lambda x, t: self.student_x0(x, t, tok, mask), self._noise(cfg.batch_size),
                              self.timesteps, self.schedule, cfg.direct_grad_steps, cfg.gradient_checkpointing)
        x0, x_last, t_last = state.x0, state.x_t.detach(), state.t  # (x_last, t_last): the final step's input
        l_r, r = direct_reward_loss(x0, self.vae, self.gold_reward, prompts, cfg.frames, cfg.num_random_frames,
                                    cfg.gradient_checkpointing, cfg.pixel_clamp)
        l_d, logs, _ = self._distill_terms(None, tok, mask, lat)
        loss = l_r + l_d
        if self.ref is not None:  # KL / reference penalty on the last step's x0 prediction
            kl = self.x0_kl(x0, self.ref_x0(x_last, t_last, tok, mask)).mean()
            loss = loss + cfg.beta_kl * kl
            logs["kl"] = float(kl.detach())
        loss.backward()
        logs.update(loss=float(loss.detach()), gold_reward=float(r.mean()), grad_norm=self._optimizer_step(),
                    samples=cfg.batch_size)
        self._last = (x0.detach(), prompts, tok, mask)
        return logs

    def _reward_job(self, latents: torch.Tensor, prompts: list[str]):
        pixels = self.vae.decode(latents.float(), clamp=True)  # decode on the main thread (GPU stream order)

        def job():
            with torch.no_grad():
                return self.gold_reward(pixels, prompts).float().cpu()

        if self._pool_exec is not None:
            return self._pool_exec.submit(job)
        return job()

    def ddpo_step(self) -> dict[str, Any]:
        """DOLLAR Alg. 2 with ddpo-pytorch's options: sample, reward, advantages, PPO inner epochs."""
        cfg = self.config
        # 1-2. sample batches; each batch's reward runs in the worker while the next one samples
        self.student.eval()
        batches, ref_means, chain_kl = [], [], []
        for _ in range(cfg.num_sample_batches):
            tok, mask, prompts, _ = self._batch(cfg.sample_batch_size)
            s, rm, kl = self._sample_ddpo(self._noise(cfg.sample_batch_size), tok, mask, prompts)
            if rm is not None:
                ref_means.append(rm)
                chain_kl.append(kl)
            s.latents, s.log_probs = s.latents.float(), s.log_probs.float()
            with torch.no_grad():
                s.rewards = self._reward_job(s.x0, prompts)
            batches.append(s)
        self.student.train()
        rewards = torch.cat([b.resolve_rewards() for b in batches])  # (N,)
        if not self.guard.check(rewards, f"{cfg.gold_reward} reward ({int((~torch.isfinite(rewards)).sum())} of "
                                f"{len(rewards)} samples)", self.step + 1):
            return {"gold_reward": float("nan"), "samples": len(rewards)}  # nothing reaches the tracker or weights
        prompts_all = [p for b in batches for p in b.prompts]
        # 3. advantages
        if cfg.per_prompt_stats:
            adv = self.tracker.update(prompts_all, rewards.numpy())
        else:
            adv = global_advantages(rewards.numpy())
        adv = torch.as_tensor(adv, dtype=torch.float32, device=self.device)
        samples = _concat_samples(batches)
        N = len(samples)
        ref_all = torch.cat(ref_means) if ref_means else None  # (N, K, ...) reference means at the sampled states
        # 4. inner epochs of PPO on the last ddpo_grad_steps transitions
        steps_idx = trained_step_indices(len(self.timesteps), cfg.ddpo_grad_steps)
        infos: dict[str, list[float]] = {"approx_kl": [], "clipfrac": [], "loss": [], "grad_norm": []}
        logs: dict[str, float] = {}
        for _ in range(cfg.inner_epochs):
            perm = torch.randperm(N)
            for s0 in range(0, N, cfg.train_batch_size):
                idx = perm[s0:s0 + cfg.train_batch_size]
                sub = samples.subset(idx)
                a = adv[idx.to(self.device)]
                total = 0.0
                for k in steps_idx:
                    with self.autocast():
                        lp, mu, sigma = transition_mean_log_prob(self.student, sub, k, cfg.eta)
                    loss, info = ppo_loss(lp, sub.log_probs[:, k], a, cfg.clip_range, cfg.adv_clip)
                    loss = loss / len(steps_idx)
                    if ref_all is not None:  # per-step KL to the reference chain at the sampled state
                        loss = loss + cfg.beta_kl * self.chain_step_kl(mu, ref_all[idx.to(self.device), k],
                                                                       sigma).mean()
                    loss.backward()
                    total += float(loss.detach())
                    infos["approx_kl"].append(info["approx_kl"])
                    infos["clipfrac"].append(info["clipfrac"])
                l_d, dlogs, _ = self._distill_terms(None, sub.text_tokens, sub.text_mask,
                                                    None if self.pool.latents is None else
                                                    self.pool.latents[torch.randint(len(self.pool), (len(idx),))])
                if cfg.distill_losses:
                    l_d.backward()
                    total += float(l_d.detach())
                    for kk, v in dlogs.items():
                        logs[kk] = v
                infos["loss"].append(total)
                infos["grad_norm"].append(self._optimizer_step())
        self._last = (samples.x0, samples.prompts, samples.text_tokens, samples.text_mask)
        logs.update({k: float(np.mean(v)) for k, v in infos.items() if v})
        logs.update(gold_reward=float(rewards.mean()), adv_std=float(adv.std()), samples=N)
        if chain_kl:
            logs["kl"] = float(torch.cat(chain_kl).mean())
        return logs

    def fake_score_step(self) -> float:
        """DMD2: the fake score learns the current student's samples with the teacher objective."""
        tok, mask, _, _ = self._batch(self.config.batch_size)
        with torch.no_grad():
            x_hat = self._graded_state(tok, mask)[2]
        self.fake.train()
        loss = fake_score_loss(self.fake, x_hat, tok, mask, autocast=self.autocast)
        loss.backward()
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm > 0 else float("inf")
        gn = torch.nn.utils.clip_grad_norm_(self.fake.model.parameters(), max_norm)
        if self.guard.check(gn, "fake-score loss / gradient", self.step + 1, key="fake"):
            self.opt_f.step()
        self.opt_f.zero_grad(set_to_none=True)
        return float(loss.detach())

    def train_step(self) -> dict[str, Any]:
        """One trainer step of the configured method, timed (device-seconds) and with its peak memory."""
        cfg = self.config
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        _sync(self.device)
        t0 = time.perf_counter()
        row = {"lrm": self.lrm_step, "direct": self.direct_step, "ddpo": self.ddpo_step}[cfg.method]()
        if self.fake is not None:
            row["loss_fake"] = float(np.mean([self.fake_score_step() for _ in range(cfg.fake_updates)]))
        _sync(self.device)
        dt = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(self.device) / 2 ** 20 if self.device.type == "cuda" else 0.0
        self.gpu_seconds += dt
        self.peak_mem_mb = max(self.peak_mem_mb, peak)
        if cfg.method == "lrm" and cfg.log_gold_train:  # monitoring only, outside the timed region
            x, prompts, _, _ = self._last
            row["gold_reward"] = float(self.gold(x, prompts).mean())
        self.step += 1
        row.update(step=self.step, method=cfg.method, step_time_s=dt, gpu_seconds=self.gpu_seconds,
                   peak_mem_mb=peak, optimizer_steps=self.optimizer_steps, lr=self.opt.param_groups[0]["lr"])
        due = cfg.eval_every > 0 and self.step % cfg.eval_every == 0
        if cfg.eval_every_gpu_s:
            k = int(self.gpu_seconds // cfg.eval_every_gpu_s)
            due = due or k > self._evals_by_time
            self._evals_by_time = max(self._evals_by_time, k)
        if due:
            r = self._try_evaluate()
            if r is not None:
                row["eval_gold_reward"] = r
        self.history.append(row)
        return row

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def _state(self) -> tuple[dict[str, nn.Module], dict[str, torch.optim.Optimizer]]:
        modules: dict[str, nn.Module] = {"student": self.student.model}
        optims: dict[str, torch.optim.Optimizer] = {"student": self.opt}
        if self.fake is not None:
            modules["fake"] = self.fake.model
            optims["fake"] = self.opt_f
        if self.target is not None:
            modules["target"] = self.target.shadow.model
        return modules, optims

    def save_checkpoint(self) -> Path:
        modules, optims = self._state()
        extra = {"config": dataclasses.asdict(self.config), "tracker": self.tracker.state_dict(),
                 "gpu_seconds": self.gpu_seconds, "optimizer_steps": self.optimizer_steps,
                 "peak_mem_mb": self.peak_mem_mb}
        return save_training_state(self.checkpoint_dir, self.step, modules=modules, optimizers=optims, extra=extra)

    def load_checkpoint(self, directory: str | Path | None = None) -> int:
        modules, optims = self._state()
        st = load_training_state(directory or self.checkpoint_dir, modules=modules, optimizers=optims,
                                 map_location=self.device)
        ex = st["extra"]
        self.tracker.load_state_dict(ex["tracker"])
        self.gpu_seconds = float(ex["gpu_seconds"])
        self.optimizer_steps = int(ex["optimizer_steps"])
        self.peak_mem_mb = float(ex["peak_mem_mb"])
        if self.config.eval_every_gpu_s:
            self._evals_by_time = int(self.gpu_seconds // self.config.eval_every_gpu_s)
        self.step = int(st["step"])
        return self.step

    # ---- logs and samples ---------------------------------------------------------------------------------
    @torch.no_grad()
    def save_samples(self, tag: str | None = None) -> Path | None:
        cfg = self.config
        P, S = min(cfg.num_sample_prompts, len(self.pool)), cfg.samples_per_prompt
        idx = torch.arange(P).repeat_interleave(S)
        tok, mask, _, _ = self.pool.take(idx)
        g = torch.Generator().manual_seed(cfg.seed)
        noise = torch.randn((len(idx), *self.latent_shape), generator=g)
        n = cfg.eval_batch_size
        pixels = torch.cat([self.vae.decode(self.sample(noise[s:s + n], tok[s:s + n], mask[s:s + n],
                                                        generator=g).float()).cpu()
                            for s in range(0, len(idx), n)])
        return self.write_grid(pixels, tag, S)

    def save_student(self, directory: str | Path | None = None) -> Path:
        return self.export_student(self.student, directory, {"finetune_method": self.config.method,
                                                             "gold_reward": self.config.gold_reward})

    # ---- the loop -------------------------------------------------------------------------------------------
    def train(self, steps: int | None = None) -> list[dict[str, Any]]:
        """Run (or resume) until ``steps`` trainer steps or ``max_gpu_seconds``; returns the history."""
        from tqdm.auto import tqdm

        cfg = self.config
        total = steps if steps is not None else cfg.steps
        resumed = self._start_run(self.inputs, MUTABLE_KEYS, "lrm.finetune")
        per_step = (cfg.sample_batch_size * cfg.num_sample_batches if cfg.method == "ddpo" else cfg.batch_size)
        opt_per_step = (per_step // cfg.train_batch_size * cfg.inner_epochs if cfg.method == "ddpo" else 1)
        self.logger.info(
            "finetune method=%s: %d steps x %d samples (%d optimizer steps each); student %d-step %s; gold reward "
            "%s; distill losses %s; beta_kl %g; device %s; run dir %s", cfg.method, total, per_step, opt_per_step,
            len(self.timesteps), self.timesteps, cfg.gold_reward, cfg.distill_losses or "none", cfg.beta_kl,
            self.device, cfg.run_dir)
        if not resumed:
            r0 = self._try_evaluate()
            row0 = {"step": 0, "method": cfg.method, "gpu_seconds": 0.0, "optimizer_steps": 0}
            if r0 is not None:
                row0["eval_gold_reward"] = r0
            self._log_row(row0)
            self.history.append(row0)
        bar = tqdm(total=total, initial=self.step, desc=f"finetune[{cfg.method}]", disable=not cfg.progress)
        while self.step < total:
            if cfg.max_gpu_seconds is not None and self.gpu_seconds >= cfg.max_gpu_seconds:
                self.logger.info("stopping at step %d: %.1f device-seconds >= max_gpu_seconds %.1f", self.step,
                                 self.gpu_seconds, cfg.max_gpu_seconds)
                break
            row = self.train_step()
            self._log_row(row)
            bar.update(1)
            bar.set_postfix({k: f"{row[k]:.4g}" for k in ("gold_reward", "proxy_reward", "loss") if k in row})
            if self.step % max(cfg.log_every, 1) == 0:
                self.logger.info("step %d: %s", self.step, ", ".join(
                    f"{k}={v:.5g}" for k, v in row.items() if isinstance(v, float)))
            if cfg.ckpt_every > 0 and self.step % cfg.ckpt_every == 0:
                self.save_checkpoint()
            if cfg.sample_every > 0 and self.step % cfg.sample_every == 0:
                self.save_samples()
        bar.close()
        # checkpoint first: the final evaluation and grid may fail (memory) without losing the run
        if cfg.final_checkpoint and (cfg.ckpt_every == 0 or self.step % cfg.ckpt_every != 0):
            self.save_checkpoint()
        if not self.history or "eval_gold_reward" not in self.history[-1]:
            r = self._try_evaluate()
            if r is not None:
                row = {"step": self.step, "method": cfg.method, "eval_gold_reward": r,
                       "gpu_seconds": self.gpu_seconds, "optimizer_steps": self.optimizer_steps}
                self._log_row(row)
                self.history.append(row)
        try:
            self.save_samples()
        except (RuntimeError, ValueError) as e:
            self.logger.error("sample grid at step %d failed: %s: %s", self.step, type(e).__name__,
                              str(e).splitlines()[0])
        return self.history

    def close(self) -> None:
        if self._pool_exec is not None:
            self._pool_exec.shutdown(wait=True)


def _concat_samples(batches: list) -> Any:
    from distill.ddpo import DDPOSamples

    b0 = batches[0]
    L = max(b.text_tokens.shape[1] for b in batches)

    def pad(t, L):
        if t.shape[1] == L:
            return t
        return torch.cat([t, t.new_zeros(t.shape[0], L - t.shape[1], *t.shape[2:])], 1)

    return DDPOSamples(torch.cat([b.latents for b in batches]), torch.cat([b.log_probs for b in batches]),
                       b0.timesteps, b0.prev_timesteps, torch.cat([pad(b.text_tokens, L) for b in batches]),
                       None if b0.text_mask is None else torch.cat([pad(b.text_mask, L) for b in batches]),
                       [p for b in batches for p in b.prompts], torch.cat([b.resolve_rewards() for b in batches]),
                       log_prob_reduction=b0.log_prob_reduction)


# ---- building everything from a config (CLI, benchmarks) ----------------------------------------------------
def build_prompt_pool(cfg: FinetuneConfig, vae: Any, text_encoder: Any, video: bool = False,
                      progress: bool = True) -> PromptPool:
    """The prompt pool of ``cfg``: a data cache (captions, embeddings, latents), a prompt file (encoded by
    ``text_encoder``; no latents) or, for the Shapes teachers, ``num_prompts`` encoded Shapes world samples."""
    from distill.builders import load_prompt_file, teacher_is_diffusers
    from distill.trainer import DistillData

    if cfg.data_cache is not None:
        from data_cache import LatentCache

        cache = LatentCache.open(cfg.data_cache)
        vae.latent_space.check_compatible(cache.latent_space, f"latents of cache {cfg.data_cache}")
        return PromptPool.from_distill_data(DistillData.from_cache(cfg.data_cache))
    if cfg.prompt_file is not None:
        prompts = load_prompt_file(cfg.prompt_file)
        toks, masks = [], []
        for s in range(0, len(prompts), 256):
            emb = text_encoder(prompts[s:s + 256])
            toks.append(emb.tokens.float().cpu())
            masks.append(emb.mask.cpu())
        return PromptPool(torch.cat(toks), torch.cat(masks), prompts)
    if teacher_is_diffusers(cfg) or cfg.vae != "shapes":
        raise ConfigError(f"teacher {cfg.teacher!r} / vae {cfg.vae!r}: Shapes world prompts fit only the Shapes "
                          "teachers and VAE; set data_cache (a LatentCache from `lrm cache build`) or prompt_file")
    nf = cfg.num_frames if video else None
    data = DistillData.from_shapes(cfg.num_prompts, vae, text_encoder, num_frames=nf, seed=cfg.data_seed,
                                   progress=progress)
    return PromptPool.from_distill_data(data)


def build_finetune(cfg: FinetuneConfig, lrm: Any = None, progress: bool = True) -> FinetuneTrainer:
    """Load the student init, VAE, text encoder, prompt pool, gold reward and LRM named in ``cfg`` (the model keys
    mean what they mean in ``lrm distill``: ``distill.builders``), checking that they fit together."""
    from distill.builders import (
        build_teacher,
        build_text_encoder,
        build_vae,
        check_text_identity,
        check_text_width,
        teacher_is_diffusers,
    )
    from reward_adapters import create_reward

    device = resolve_device(cfg.device)
    needs_text = teacher_is_diffusers(cfg) or cfg.data_cache is None
    text = build_text_encoder(cfg, device) if needs_text else None
    vae = build_vae(cfg, device)
    if cfg.data_cache is not None:  # the pool's embeddings are the cache's: the null caption must match them
        from data_cache import LatentCache

        text_id = dict(LatentCache.open(cfg.data_cache).text_encoder)
        if text is not None:
            check_text_identity(text_id, text.identity(), f"caption embeddings of cache {cfg.data_cache}")
    else:
        text_id = text.identity()
    if lrm is None and cfg.method == "lrm":  # checked before the large models load
        if cfg.lrm_path is None:
            raise ConfigError("method=lrm needs lrm_path: a LatentReward directory (train one with `lrm train`)")
        from latent_rewards import LatentReward

        lrm = LatentReward.from_pretrained(cfg.lrm_path, device=device)
        lrm.check_inputs(latent_space=vae.latent_space, text_encoder=text_id if lrm.needs_text else None)
    from distill.lora import is_lora_student, load_lora_student

    if is_lora_student(cfg.teacher):  # a LoRA student/ folder: its base network + the adapter, fused
        init = load_lora_student(cfg.teacher, lambda base: build_teacher(
            dataclasses.replace(cfg, teacher=base), device, text_encoder=text))
    else:
        init = build_teacher(cfg, device, text_encoder=text)
    pool = build_prompt_pool(cfg, vae, text, video=init.is_video, progress=progress)
    check_text_width(init, pool.text_tokens.shape[-1],
                     f"caption embeddings of {cfg.data_cache or cfg.prompt_file or 'the Shapes prompt pool'}")
    gold = create_reward(cfg.gold_reward, **cfg.gold_reward_kwargs)
    if hasattr(gold, "to"):
        gold = gold.to(device)
    return FinetuneTrainer(cfg, init, pool, gold, vae, lrm=lrm)


def run_finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """``lrm finetune``: build, train, save the student; returns a summary (also run_dir/summary.json)."""
    from lrm.io import write_json

    trainer = build_finetune(cfg, progress=cfg.progress)
    try:
        trainer.train()
    finally:
        trainer.close()
    trainer.save_student()
    # from log.csv, which a resumed run keeps whole (the history holds only this process's steps)
    with open(trainer._csv_path) as fh:
        evals = [(float(r["gpu_seconds"]), float(r["eval_gold_reward"])) for r in csv.DictReader(fh)
                 if r.get("eval_gold_reward")]
    summary = {"method": cfg.method, "steps": trainer.step, "optimizer_steps": trainer.optimizer_steps,
               "gpu_seconds": trainer.gpu_seconds, "peak_mem_mb": trainer.peak_mem_mb,
               "gold_reward": cfg.gold_reward, "eval_gold_start": evals[0][1] if evals else None,
               "eval_gold_final": evals[-1][1] if evals else None, "eval_curve": evals}
    write_json(Path(cfg.run_dir) / "summary.json", summary)
    trainer.logger.info("done: %s", {k: v for k, v in summary.items() if k != "eval_curve"})
    return summary


__all__ = ["FinetuneConfig", "FinetuneTrainer", "PromptPool", "build_finetune", "build_prompt_pool", "run_finetune",
           "LOG_COLUMNS", "METHODS", "DISTILL_LOSSES"]
