"""The configuration and run shell of the one student trainer (``distill.generator.GeneratorTrainer``):
``ShellConfig``, the keys every configuration of it has (``lrm distill``'s ``DistillConfig``, ``lrm finetune``'s
``FinetuneConfig``: models, run control, optimiser, the student's timesteps, the shared terms' settings, the eval
hook) and which of them a resumed run may change."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar, Literal

from distill.builders import ModelSpec
from distill.samplers import STUDENT_TIMESTEPS
from lrm.config import ConfigError, opt

# run-control keys a resumed run may change (how long, how often it reports and evaluates; not what it trains)
SHELL_MUTABLE_KEYS = ("steps", "resume", "overwrite", "progress", "log_every", "ckpt_every", "sample_every",
                      "final_checkpoint", "student_fp16", "max_nonfinite_steps", "num_sample_prompts",
                      "samples_per_prompt", "vae_chunk_size", "device", "merge_lora", "tensorboard", "max_gpu_seconds",
                      "eval_every", "eval_every_gpu_s", "eval_batch_size", "log_gold_train")


@dataclass
class ShellConfig(ModelSpec):
    """Model keys (``ModelSpec``) + what every configuration of the student trainer has; per-process sizes."""

    command: ClassVar[str] = "train"  # logger lrm.<command>, TensorBoard prefix
    mutable_keys: ClassVar[tuple[str, ...]] = SHELL_MUTABLE_KEYS

    # ---- run -------------------------------------------------------------------------------------------
    run_dir: str = opt("runs/train", "output directory: config.yaml, log.txt, log.csv, checkpoint/, samples/, "
                                    "student/")
    seed: int = opt(0, "random seed (per process: seed + process index)")
    device: str = opt("auto", "'auto' (cuda if available), 'cuda', 'cuda:N' (single process) or 'cpu'")
    # ---- models and data (used by the CLI builders; the Python API takes objects) ------------------------
    teacher: str = opt("shapes-image", "'shapes-image' / 'shapes-video' / 'shapes-video-flow' (the built-in world's "
                                       "teachers), a Denoiser directory (Denoiser.save_pretrained, or RUN/student of "
                                       "`lrm distill`), or a diffusers pipeline directory / hub id")
    data_cache: str | None = opt(None, "LatentCache directory with data latents + text; None: encode samples of the "
                                       "Shapes world")
    data_seed: int = opt(0, "ShapesWorld seed of the data / prompt pool")
    num_frames: int = opt(16, "frames per video: of the Shapes video world (teacher 'shapes-video'), and of the "
                              "samples when the prompts come without data latents (prompt_file)")
    image_size: int | None = opt(None, "pixel size of the samples when the prompts come without data latents "
                                       "(prompt_file); None: the model's sample_size x the VAE's factor (required for "
                                       "models without sample_size, e.g. FLUX)")
    # ---- student ---------------------------------------------------------------------------------------
    student_steps: int = opt(4, "student sampling steps k (1, 2 or 4 use DOLLAR's timesteps)")
    student_timesteps: list[int] | None = opt(None, "custom student timesteps (overrides student_steps), e.g. "
                                                    "[249, 499, 749, 999]")
    parameterization: Literal["homogeneous", "heterogeneous"] = opt(
        "homogeneous", "homogeneous: student predicts the teacher's (init's) quantity and starts from it; "
                       "heterogeneous: student predicts x0 directly (weights still copied)")
    sigma_data: float = opt(0.5, "sigma_d of the consistency boundary scalings")
    timestep_scaling: float = opt(10.0, "LCM timestep scaling inside the boundary scalings")
    # ---- terms shared by both commands: VSD, CD, LRM ----------------------------------------------------
    beta_vsd: float = opt(1.0, "weight of L_VSD")
    beta_cd: float = opt(0.5, "weight of L_CD (DOLLAR beta_CD)")
    beta_ft: float = opt(1.0, "weight of L_FT = -R^l(x_hat, c) (DOLLAR beta_FT), in 1 / reward units")
    real_guidance: float = opt(3.5, "CFG scale of the real score (teacher), Imagen form uncond + s (cond - uncond)")
    vsd_t_min: float = opt(0.02, "VSD/fake-score timesteps t ~ U[t_min T, t_max T]: lower end, fraction of T")
    vsd_t_max: float = opt(0.98, "upper end of the VSD/fake-score timestep range, fraction of T")
    vsd_grad_dtype: Literal["float32", "float64"] = opt("float32", "precision of the normalised VSD gradient")
    fake_updates: int = opt(5, "fake-score optimizer steps per trainer step (DMD2: 5)")
    lr_fake: float = opt(5e-5, "fake-score learning rate (AdamW)")
    cd_ddim_steps: int = opt(50, "N of the DDIM skip grid (step T / N = 20 timesteps)")
    cd_teacher_steps: int = opt(5, "m teacher DDIM steps per CD target (1 = CD1, 5 = CD5)")
    cd_guidance: float = opt(7.5, "CFG scale of the CD teacher, Imagen form")
    cd_ema_decay: float = opt(0.95, "EMA decay of the CD target network theta^- (per student optimizer step)")
    cd_distance: Literal["huber", "l2"] = opt("huber", "CD distance: pseudo-Huber or L2")
    huber_c: float = opt(1e-3, "pseudo-Huber constant c, latent units")
    lrm_path: str | None = opt(None, "LatentReward directory (a frozen LRM for L_FT), e.g. from `lrm train`")
    # ---- optimisation ----------------------------------------------------------------------------------
    steps: int = opt(1000, "trainer steps")
    batch_size: int = opt(32, "samples per micro-batch, per process")
    grad_accum: int = opt(1, "micro-batches per optimizer step (DOLLAR: 7)")
    adam_beta1: float = opt(0.9, "AdamW beta1 (student and fake score)")
    adam_beta2: float = opt(0.999, "AdamW beta2 (student and fake score)")
    weight_decay: float = opt(0.0, "AdamW weight decay (student and fake score)")
    max_grad_norm: float = opt(10.0, "gradient clipping (L2 norm) for student and fake score; 0 = off")
    warmup_steps: int = opt(0, "linear learning-rate warm-up, in trainer steps")
    bf16: bool = opt(False, "bf16 autocast for network calls (CUDA only; losses and VSD gradient stay fp32)")
    fsdp: bool = opt(False, "multi-process: shard student, fake score and CD target with FSDP2 (one unit per "
                            "UNet / transformer block) instead of DDP replicas; the teacher stays replicated")
    gradient_checkpointing: bool = opt(False, "activation checkpointing in the student and fake score (and, for "
                                              "the direct term, each student call and the decoder)")
    max_gpu_seconds: float | None = opt(None, "stop once the cumulative step time (device-seconds) exceeds this; "
                                              "None = run all steps")
    # ---- eval hook: the gold reward of the k-step sampler ------------------------------------------------
    gold_reward: str | None = opt(None, "reward_adapters name of the gold pixel reward (None: no evaluation)")
    gold_reward_kwargs: dict = opt({}, "constructor options of the gold reward, e.g. {frames: first-middle-last}")
    eval_every: int = opt(10, "gold reward of the k-step sampler on the fixed evaluation set every N steps "
                              "(0 = only at start and end); not counted in step time")
    eval_every_gpu_s: float | None = opt(None, "also evaluate each time the cumulative step time passes a multiple "
                                               "of this many device-seconds (even curves across methods)")
    num_eval: int = opt(64, "evaluation samples (prompts cycle through the pool)")
    eval_batch_size: int = opt(16, "samples per sampling call in evaluation and sample grids (decoding is chunked "
                                   "by vae_chunk_size)")
    log_gold_train: bool = opt(True, "also score the training samples x_hat with the gold reward (not counted in "
                                     "step time)")
    # ---- logging ---------------------------------------------------------------------------------------
    ckpt_every: int = opt(500, "save a resumable checkpoint every N steps (0 = only at the end, see "
                               "final_checkpoint)")
    sample_every: int = opt(500, "save a sample grid every N steps (0 = only at the end)")
    tensorboard: bool = opt(True, "also log to TensorBoard (run_dir/tb) when tensorboard is installed")

    log_every: int = opt(10, "log to log.txt every N steps (log.csv gets every step)")
    final_checkpoint: bool = opt(True, "save a resumable checkpoint at the end of the run (before a final "
                                       "evaluation); the student/ folder is written either way")
    max_nonfinite_steps: int = opt(10, "steps with a non-finite reward batch, loss or gradient are skipped (logged, "
                                       "never applied); more than this many in a row stop the run")
    student_fp16: bool = opt(False, "write the student/ folder's weights in fp16 (half the size; loaded back as "
                                    "fp32); checkpoints keep the training precision for an exact resume")
    num_sample_prompts: int = opt(8, "prompts in the sample grid")
    samples_per_prompt: int = opt(4, "samples per prompt in the grid")
    resume: bool = opt(True, "continue from run_dir/checkpoint when it exists (the same run only: a changed config "
                             "or input is refused, see overwrite)")
    overwrite: bool = opt(False, "start over in run_dir: delete its checkpoint first")
    progress: bool = opt(True, "tqdm progress bar")
    # ---- LoRA (distill/lora.py) ----------------------------------------------------------------------------
    lora_rank: int = opt(0, "LoRA rank of the student (and fake score / CD target) adapters on one frozen base "
                            "network; 0 = full fine-tuning")
    lora_alpha: int = opt(0, "LoRA alpha (the adapter's output is scaled by alpha / rank); 0 = lora_rank (scale 1, "
                             "as diffusers' LoRA training scripts)")
    lora_dropout: float = opt(0.0, "dropout on the LoRA adapters' input, in [0, 1)")
    lora_target_modules: list[str] = opt(["to_q", "to_k", "to_v", "to_out.0"],
                                         "module names (suffixes) that get adapters; default: the attention "
                                         "projections diffusers' LoRA training scripts target")
    merge_lora: bool = opt(False, "lora_rank > 0: the student/ export is a full Denoiser directory with the adapter "
                                  "fused into the base weights, instead of pytorch_lora_weights.safetensors (the "
                                  "diffusers LoRA format, loaded onto the teacher's pipeline)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.student_timesteps is None and self.student_steps not in STUDENT_TIMESTEPS:
            raise ConfigError(f"student_steps={self.student_steps} has no default timesteps "
                              f"({sorted(STUDENT_TIMESTEPS)}); pass student_timesteps explicitly")
        for name in ("steps", "batch_size", "grad_accum", "cd_ddim_steps", "cd_teacher_steps", "num_eval",
                     "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.vsd_t_min < self.vsd_t_max <= 1.0:
            raise ConfigError(f"need 0 <= vsd_t_min < vsd_t_max <= 1, got {self.vsd_t_min}, {self.vsd_t_max}")
        if not 0.0 <= self.cd_ema_decay <= 1.0:
            raise ConfigError(f"cd_ema_decay must be in [0, 1], got {self.cd_ema_decay}")
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes"):
            raise ConfigError(f"ACCELERATE_USE_DEEPSPEED={os.environ['ACCELERATE_USE_DEEPSPEED']}: the trainer "
                              "runs under DDP or FSDP, not DeepSpeed. Run `accelerate launch` with the multi-GPU "
                              "(DDP) or FSDP config, or torchrun (fsdp: true for FSDP)")
        if self.max_nonfinite_steps < 0:
            raise ConfigError(f"max_nonfinite_steps must be >= 0, got {self.max_nonfinite_steps}")
        if self.lora_rank < 0:
            raise ConfigError(f"lora_rank must be >= 0 (0 = full fine-tuning), got {self.lora_rank}")
        if self.lora_alpha < 0:
            raise ConfigError(f"lora_alpha must be >= 0 (0 = lora_rank), got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_rank > 0 and not self.lora_target_modules:
            raise ConfigError("lora_target_modules is empty: name the layers that get adapters, e.g. "
                              "[to_q, to_k, to_v, to_out.0]")
        if self.merge_lora and self.lora_rank == 0:
            raise ConfigError("merge_lora: true needs lora_rank > 0 (a full fine-tuning run exports full weights)")

    @property
    def timesteps(self) -> list[int]:
        """Student timesteps in sampling order (descending)."""
        ts = self.student_timesteps if self.student_timesteps is not None else STUDENT_TIMESTEPS[self.student_steps]
        return sorted((int(t) for t in ts), reverse=True)

    @property
    def student_lr(self) -> float:
        """The student's learning rate (``lr_student`` / ``lr``: each configuration names its own key)."""
        raise AttributeError(f"{type(self).__name__} must define student_lr")

    @property
    def method_name(self) -> str:
        """The ``method`` column of log.csv."""
        return self.command


__all__ = ["ShellConfig", "SHELL_MUTABLE_KEYS"]
