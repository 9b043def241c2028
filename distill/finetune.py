"""``lrm finetune``: reward fine-tuning of a k-step student, LRM (DOLLAR Eq. 11), DDPO_SF (Alg. 2) or direct reward
gradient (ReFL / DRaFT-K), optionally combined with the distillation losses, as a configuration of the one student
trainer (``distill.generator.GeneratorTrainer``; each method is a term: ``lrm_ft.LRMTerm``, ``ddpo.DDPOTerm``,
``direct.DirectRewardTerm``, the penalty ``kl.KLTerm``).

One trainer step:
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

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from distill.cd import CDTerm
from distill.data import PromptPool
from distill.ddpo import DDPOTerm
from distill.denoiser import Denoiser
from distill.direct import FRAME_SUBSAMPLING, PIXEL_CLAMPS, DirectRewardTerm
from distill.generator import LOG_COLUMNS, GeneratorTrainer
from distill.kl import KLTerm
from distill.lrm_ft import LRMTerm
from distill.objective import ObjectiveTerm
from distill.samplers import LOG_PROB_REDUCTIONS
from distill.shell import ShellConfig
from distill.vsd import VSDTerm
from lrm.config import ConfigError, opt
from lrm.run import resolve_device

METHODS = ("lrm", "ddpo", "direct")
DISTILL_LOSSES = ("vsd", "cd")
MUTABLE_KEYS = ShellConfig.mutable_keys + ("async_reward",)


@dataclass
class FinetuneConfig(ShellConfig):
    """Everything ``lrm finetune`` needs (the shared keys in ``ShellConfig``); sizes per process."""

    command = "finetune"
    mutable_keys = ShellConfig.mutable_keys + ("async_reward",)
    # ---- run -------------------------------------------------------------------------------------------
    method: Literal["lrm", "ddpo", "direct"] = opt("lrm", "lrm: latent reward gradient (DOLLAR Eq. 11); ddpo: "
                                                          "DDPO_SF / PPO on the pixel reward (Alg. 2); direct: "
                                                          "pixel reward gradient through the decoder (DRaFT-K)")
    run_dir: str = opt("runs/finetune", "output directory: config.yaml, log.txt, log.csv, checkpoint/, samples/, "
                                        "student/")
    gold_reward: str = opt("colorfulness", "reward_adapters name of the gold pixel reward (the DDPO / direct "
                                           "training signal; logged for every method)")
    prompt_file: str | None = opt(None, "prompt pool from a file: .txt (one per line), .csv or .jsonl (column / key "
                                        "prompt, caption or text), encoded by text_encoder; no data latents")
    num_prompts: int = opt(64, "Shapes world captions used as the prompt pool when neither data_cache nor "
                               "prompt_file is set (Shapes teachers only)")
    # ---- optimisation ----------------------------------------------------------------------------------
    steps: int = opt(200, "trainer steps (ddpo: one step = sampling + inner epochs of PPO updates)")
    batch_size: int = opt(16, "samples per optimizer step for lrm / direct, per process")
    lr: float = opt(1e-5, "student learning rate (AdamW)")
    max_grad_norm: float = opt(1.0, "gradient clipping (L2 norm) of the student and fake score; 0 = off")
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
    final_timestep: int | None = opt(
        None, "ddpo: where the stochastic chain ends; None = 0 on a DDPM schedule (a proper Gaussian last step), 1 on "
              "a flow schedule (t = 0 has no noise, a zero-variance step); -1 is deterministic. A flow student's chain "
              "is DDIM(eta) of its variance-preserving form (abar = a^2 / (a^2 + b^2)), not Flow-GRPO's SDE")
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
    ckpt_every: int = opt(100, "save a resumable checkpoint every N steps (0 = only at the end, see "
                               "final_checkpoint)")
    sample_every: int = opt(100, "save a sample grid every N steps (0 = only at the end)")
    tensorboard: bool = opt(False, "also log to TensorBoard (run_dir/tb) when tensorboard is installed")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in METHODS:
            raise ConfigError(f"method {self.method!r} is not one of {METHODS}")
        for name in ("sample_batch_size", "num_sample_batches", "train_batch_size", "inner_epochs", "num_prompts"):
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
        if self.final_timestep is not None and self.final_timestep >= min(self.timesteps):
            raise ConfigError(f"final_timestep {self.final_timestep} must be below the last student timestep "
                              f"{min(self.timesteps)}")
        if self.method == "ddpo" and self.grad_accum != 1:
            raise ConfigError(f"method=ddpo sets its own batches (sample_batch_size, train_batch_size): grad_accum "
                              f"must be 1, got {self.grad_accum}")
        if self.method == "ddpo" and (self.eta <= 0 or (self.final_timestep or 0) < 0):
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
    def student_lr(self) -> float:
        return self.lr

    @property
    def method_name(self) -> str:
        return self.method



def finetune_terms(cfg: FinetuneConfig, gold_reward: Any, lrm: Any = None) -> list[ObjectiveTerm]:
    """The objective of ``cfg``: the method's term, the distillation terms, the KL penalty last."""
    if cfg.method == "lrm" and lrm is None:
        raise ConfigError("method=lrm needs a latent reward: pass lrm= (a LatentReward) or set lrm_path")
    terms: list[ObjectiveTerm] = []
    if cfg.method == "lrm":
        terms.append(LRMTerm(lrm, cfg.beta_ft))
    elif cfg.method == "direct":
        terms.append(DirectRewardTerm(gold_reward, cfg.direct_grad_steps, cfg.frames, cfg.num_random_frames,
                                      cfg.pixel_clamp, cfg.gradient_checkpointing))
    else:
        terms.append(DDPOTerm(gold_reward, cfg.sample_batch_size, cfg.num_sample_batches, cfg.train_batch_size,
                              cfg.inner_epochs, cfg.ddpo_grad_steps, cfg.eta, cfg.final_timestep,
                              cfg.per_prompt_stats, cfg.stat_buffer_size, cfg.stat_min_count, cfg.adv_clip,
                              cfg.clip_range, cfg.log_prob_reduction, cfg.async_reward))
    if "vsd" in cfg.distill_losses:
        terms.append(VSDTerm(cfg.beta_vsd, cfg.real_guidance, cfg.vsd_t_min, cfg.vsd_t_max, cfg.vsd_grad_dtype,
                             cfg.fake_updates, cfg.lr_fake))
    if "cd" in cfg.distill_losses:
        terms.append(CDTerm(cfg.beta_cd, cfg.cd_ddim_steps, cfg.cd_teacher_steps, cfg.cd_guidance, cfg.cd_ema_decay,
                            cfg.cd_distance, cfg.huber_c))
    if cfg.beta_kl > 0:  # pi_ref costs a model copy (LoRA: none, the base with the student adapter off)
        terms.append(KLTerm(cfg.beta_kl))
    return terms


def FinetuneTrainer(config: FinetuneConfig, init: Denoiser, pool: PromptPool, gold_reward: Any, vae: Any,
                    lrm: Any = None, teacher: Denoiser | None = None, latent_shape: tuple[int, ...] | None = None,
                    accelerator: Any = None) -> GeneratorTrainer:
    """``GeneratorTrainer`` configured as ``lrm finetune``.

    Args:
        config: ``FinetuneConfig``.
        init: the ``Denoiser`` the student starts from (the shipped teacher, or a distilled student); not modified.
        pool: ``PromptPool`` (captions + text embeddings; data latents for CD).
        gold_reward: pixel reward ``reward(pixels [0, 1], prompts) -> (B,)`` (a ``reward_adapters`` reward): the
            DDPO / direct training signal and the eval hook's reward.
        vae: ``lrm.latent_space.VAE`` (decoding for the gold reward, the direct gradient and the grids).
        lrm: latent reward for method=lrm (``latent_rewards.LatentReward`` or ``lrm(latents, tokens, mask)``).
        teacher: frozen teacher ``Denoiser`` for the distillation losses (default: a frozen copy of ``init``).
        latent_shape: per-sample latent shape, e.g. ``(T, C, h, w)``; default: the pool's data latents, else the
            model's square ``sample_size``.
    """
    cfg = config
    return GeneratorTrainer(cfg, finetune_terms(cfg, gold_reward, lrm), pool, teacher=teacher, init=init, vae=vae,
                            gold_reward=gold_reward, accelerator=accelerator, latent_shape=latent_shape,
                            export_meta={"finetune_method": cfg.method, "gold_reward": cfg.gold_reward})


# ---- building everything from a config (CLI, benchmarks) ----------------------------------------------------
def build_finetune(cfg: FinetuneConfig, lrm: Any = None, progress: bool = True) -> FinetuneTrainer:
    """Load the student init, VAE, text encoder, prompt pool, gold reward and LRM named in ``cfg`` (the model keys
    mean what they mean in ``lrm distill``: ``distill.builders``), checking that they fit together."""
    from distill.builders import (
        build_prompt_pool,
        build_teacher,
        build_text_encoder,
        build_vae,
        check_text_identity,
        check_text_width,
        load_latent_reward,
        teacher_is_diffusers,
        text_identity,
    )
    from reward_adapters import create_reward

    device = resolve_device(cfg.device)
    needs_text = teacher_is_diffusers(cfg) or cfg.data_cache is None
    text = build_text_encoder(cfg, device) if needs_text else None
    vae = build_vae(cfg, device)
    text_id = text_identity(cfg, text)
    if cfg.data_cache is not None and text is not None:  # the pool's embeddings are the cache's: so must the null be
        check_text_identity(text_id, text.identity(), f"caption embeddings of cache {cfg.data_cache}")
    if lrm is None and cfg.method == "lrm":  # checked before the large models load
        if cfg.lrm_path is None:
            raise ConfigError("method=lrm needs lrm_path: a LatentReward directory (train one with `lrm train`)")
        lrm = load_latent_reward(cfg.lrm_path, vae, text_id, device)
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


__all__ = ["FinetuneConfig", "FinetuneTrainer", "PromptPool", "build_finetune", "run_finetune",
           "finetune_terms", "LOG_COLUMNS", "METHODS", "DISTILL_LOSSES"]
