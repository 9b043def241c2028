"""DOLLAR Alg. 1: distil a multi-step teacher into a k-step student with VSD + CD, plus latent reward fine-tuning.

One training iteration (``DistillTrainer.train``):
  1. ``generator_step()``  L_G = beta_VSD L_VSD + beta_CD L_CD + beta_FT L_FT, one optimizer step on theta
     (the FT term uses the current LRM; Alg. 1 takes it as a separate step after the LRM update, which
     costs a second student forward for the same gradient direction).
  2. ``fake_score_step()`` x ``fake_updates`` (5): the fake score learns the student's distribution with the
     teacher's objective; the first update reuses the generator step's samples, the others draw new ones.
  3. ``lrm_step()`` (concurrent LRM only): Eq. 10 on data latents + generated latents (Alg. 1 lines 15-16).
  4. EMA update of the CD target network theta^-; logs, checkpoints, sample grids.
The student's x0 map is the consistency function f(x, t) = c_skip x + c_out x0_theta(x, t) (``distill.cd``);
at the student's timesteps (>= 249) c_skip < 1e-6, so ``distill.samplers.student_sample`` gives the same samples.
With ``lora_rank`` > 0 (``distill.lora``) the teacher's network is the one frozen base: student, fake score and CD
target are adapters on it, the teacher is the base with adapters off (``DistillTrainer._build_lora``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn

from distill import fsdp as fsdp_util
from distill.cd import cd_distance, cd_inputs_and_target, consistency_output, ddim_grid
from distill.denoiser import Denoiser
from distill.ema import EMA
from distill.gan import Discriminator, discriminator_loss, generator_adv_loss
from distill.guard import NonFiniteGuard
from distill.lrm_ft import ConcurrentLRM, lrm_ft_loss
from distill.samplers import STUDENT_TIMESTEPS, k_step_sample
from distill.shell import SHELL_MUTABLE_KEYS, ShellConfig, StudentShell
from distill.tdm import fake_score_loss as tdm_fake_score_loss
from distill.tdm import renoise, tdm_generator_loss
from distill.vsd import fake_score_loss, vsd_loss
from lrm.checkpoint import find_checkpoint, load_training_state, save_training_state
from lrm.config import ConfigError, opt
from lrm.run import (
    fingerprint,
    get_logger,
    seed_everything,
)

# config keys a resumed run may change (how long, how often it reports; not what it trains)
MUTABLE_KEYS = SHELL_MUTABLE_KEYS + ("tensorboard",)
LOG_COLUMNS = ["step", "loss_g", "loss_vsd", "loss_tdm", "loss_cd", "loss_ft", "lrm_reward", "loss_gan", "loss_mixed",
               "loss_fake", "loss_disc", "loss_lrm",
               "grad_norm_g", "vsd_grad_norm", "lr", "sec_per_step"]


@dataclass
class DistillConfig(ShellConfig):
    """Everything ``DistillTrainer`` / ``lrm distill`` needs; per-process sizes, steps in generator steps.

    Multi-process (``accelerate launch`` / ``torchrun``): DDP by default (the student, fake score and concurrent
    LRM head replicated, gradients all-reduced); ``fsdp: true`` (or ``accelerate launch --use_fsdp``) shards the
    student, fake score and CD target with FSDP2 instead (``distill.fsdp``; the frozen teacher and the small LRM head
    stay replicated). Checkpoints have one format for all three. DeepSpeed is refused.
    """

    # ---- run -------------------------------------------------------------------------------------------
    run_dir: str = opt("runs/distill", "output directory: config.yaml, log.txt, log.csv, checkpoint/, samples/, "
                                      "student/")
    seed: int = opt(0, "random seed (per process: seed + process index)")
    device: str = opt("auto", "'auto' (cuda if available), 'cuda', 'cuda:N' (single process) or 'cpu'")
    # ---- models and data (used by `lrm distill`; the Python API takes objects) ---------------------------
    teacher: str = opt("shapes-image", "'shapes-image' / 'shapes-video' (the built-in world's teachers), a "
                                       "Denoiser directory written by Denoiser.save_pretrained, or a diffusers "
                                       "pipeline directory / hub id (Denoiser.from_diffusers)")
    data_cache: str | None = opt(None, "LatentCache directory with data latents + text; None: encode samples of the "
                                       "Shapes world")
    num_data: int = opt(2048, "Shapes world samples encoded as data latents (when data_cache is None)")
    data_seed: int = opt(0, "ShapesWorld seed for the data latents")
    num_frames: int = opt(16, "frames per video for the Shapes video world (teacher 'shapes-video')")
    # ---- student ---------------------------------------------------------------------------------------
    student_steps: int = opt(4, "student sampling steps k (1, 2 or 4 use DOLLAR's timesteps)")
    student_timesteps: list[int] | None = opt(None, "custom student timesteps (overrides student_steps), e.g. "
                                                    "[249, 499, 749, 999]")
    parameterization: Literal["homogeneous", "heterogeneous"] = opt(
        "homogeneous", "homogeneous: student predicts the teacher's quantity (conjugate v) and starts from it; "
                       "heterogeneous: student predicts x0 directly (weights still copied from the teacher)")
    # ---- which losses ------------------------------------------------------------------------------------
    use_vsd: bool = opt(True, "variational score distillation (DMD2) in the generator loss")
    use_cd: bool = opt(True, "consistency distillation (LCM, multi-step teacher) in the generator loss")
    use_lrm_ft: bool = opt(False, "latent reward fine-tuning L_FT = -R^l(x_hat, c) (needs an LRM)")
    beta_vsd: float = opt(1.0, "weight of L_VSD")
    beta_cd: float = opt(0.5, "weight of L_CD (DOLLAR beta_CD)")
    beta_ft: float = opt(1.0, "weight of L_FT (DOLLAR beta_FT), in 1 / reward units")
    # ---- TDM, adversarial term, mixed rewards (paper 004: distill/tdm.py, gan.py, reward.py) ----------------
    use_tdm: bool = opt(False, "trajectory distribution matching (paper 004 Eq. 2-10) instead of VSD: the fake score "
                               "learns the student's samples re-noised inside the graded step's stage (AdamW betas "
                               "(0, 0.95) for it, as the TDM code; set fake_updates 1 as there)")
    beta_tdm: float = opt(1.0, "weight of L_traj")
    tdm_guidance: float = opt(4.5, "CFG scale of the teacher's x0 in TDM's target (the TDM code's README: 4.5)")
    tdm_distance: Literal["paper", "code"] = opt("paper", "TDM distance: paper (pseudo-Huber of the per-sample "
                                                          "norm, c = 0.00054 sqrt(d)) or code (per element, c = 1e-3,"
                                                          " normalised by mean|x0 - x0_real,cfg|)")
    use_gan: bool = opt(False, "adversarial term (paper 004 Eq. 11-12): hinge loss of discriminator heads on the "
                               "frozen teacher's down/mid-block features; real samples are the data latents")
    beta_gan: float = opt(0.5, "weight of L_gen (paper 004 lambda_1)")
    lr_disc: float = opt(2e-5, "discriminator heads' learning rate (AdamW betas (0, 0.95)); one D step per G step")
    spatial_rewards: list[str] = opt([], "mixed rewards (paper 004 Eq. 13): up to two rewards (R_it, R_iq) on the "
                                         "first, middle and last frame, each a reward_adapters name (pixels, through "
                                         "the decoder) or a LatentReward directory (latents, no decoder)")
    temporal_reward: str | None = opt(None, "mixed rewards (Eq. 14): R_v on the whole sample, a reward name or a "
                                            "LatentReward directory")
    beta_spatial: float = opt(1.0, "weight of L_spatial (paper 004 lambda_2)")
    beta_temporal: float = opt(1.5, "weight of L_temporal (paper 004 lambda_3)")
    # ---- VSD -------------------------------------------------------------------------------------------
    real_guidance: float = opt(3.5, "CFG scale of the real score (teacher), Imagen form uncond + s (cond - uncond)")
    vsd_t_min: float = opt(0.02, "VSD/fake-score timesteps t ~ U[t_min T, t_max T]: lower end, fraction of T")
    vsd_t_max: float = opt(0.98, "upper end of the VSD/fake-score timestep range, fraction of T")
    fake_updates: int = opt(5, "fake-score optimizer steps per generator step (DMD2: 5)")
    vsd_grad_dtype: Literal["float32", "float64"] = opt("float32", "precision of the normalised VSD gradient")
    # ---- CD --------------------------------------------------------------------------------------------
    cd_ddim_steps: int = opt(50, "N of the DDIM skip grid (step T / N = 20 timesteps)")
    cd_teacher_steps: int = opt(5, "m teacher DDIM steps per CD target (1 = CD1, 5 = CD5)")
    cd_guidance: float = opt(7.5, "CFG scale of the CD teacher, Imagen form")
    cd_ema_decay: float = opt(0.95, "EMA decay of the CD target network theta^- (per generator step)")
    cd_distance: Literal["huber", "l2"] = opt("huber", "CD distance: pseudo-Huber or L2")
    huber_c: float = opt(1e-3, "pseudo-Huber constant c, latent units")
    sigma_data: float = opt(0.5, "sigma_d of the boundary scalings")
    timestep_scaling: float = opt(10.0, "LCM timestep scaling inside the boundary scalings")
    # ---- LRM -------------------------------------------------------------------------------------------
    lrm_mode: Literal["frozen", "concurrent"] = opt("frozen", "frozen: a pretrained LatentReward; concurrent: "
                                                             "train a head on data + generated latents (Eq. 10)")
    lrm_path: str | None = opt(None, "LatentReward directory (lrm_mode=frozen)")
    lrm_head: str = opt("text-image-cnn", "latent_rewards head name (lrm_mode=concurrent)")
    lrm_head_kwargs: dict = opt({}, "constructor overrides of the head, e.g. {patch: 2, width: 64}")
    pixel_reward: str = opt("colorfulness", "reward_adapters name of the gold pixel reward (lrm_mode=concurrent)")
    lr_lrm: float = opt(1e-4, "learning rate of the concurrent LRM head")
    # ---- optimisation ----------------------------------------------------------------------------------
    steps: int = opt(1000, "generator optimizer steps (iterations of Alg. 1)")
    batch_size: int = opt(32, "samples per micro-batch, per process")
    grad_accum: int = opt(1, "micro-batches per optimizer step (DOLLAR: 7)")
    lr_student: float = opt(5e-5, "generator learning rate (AdamW)")
    lr_fake: float = opt(5e-5, "fake-score learning rate (AdamW)")
    adam_beta1: float = opt(0.9, "AdamW beta1 (student and fake score)")
    adam_beta2: float = opt(0.999, "AdamW beta2 (student and fake score)")
    weight_decay: float = opt(0.0, "AdamW weight decay (student and fake score)")
    max_grad_norm: float = opt(10.0, "gradient clipping (L2 norm) for student and fake score; 0 = off")
    warmup_steps: int = opt(0, "linear learning-rate warm-up, in generator steps")
    bf16: bool = opt(False, "bf16 autocast for network calls (CUDA only; losses and VSD gradient stay fp32)")
    fsdp: bool = opt(False, "multi-process: shard student, fake score and CD target with FSDP2 (one unit per "
                            "UNet / transformer block) instead of DDP replicas; the teacher stays replicated")
    gradient_checkpointing: bool = opt(False, "activation checkpointing in the student and fake score")
    # ---- logging ---------------------------------------------------------------------------------------
    ckpt_every: int = opt(500, "save a resumable checkpoint every N steps (0 = only at the end, see "
                               "final_checkpoint)")
    sample_every: int = opt(500, "save a sample grid every N steps (0 = only at the end)")
    tensorboard: bool = opt(True, "also log to TensorBoard (run_dir/tb) when tensorboard is installed")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.use_vsd or self.use_cd or self.use_lrm_ft or self.use_tdm or self.use_gan or self.spatial_rewards
                or self.temporal_reward):
            raise ConfigError("all losses are off: set use_vsd / use_tdm, use_cd, use_gan, use_lrm_ft or the mixed "
                              "rewards (spatial_rewards, temporal_reward)")
        if self.use_vsd and self.use_tdm:
            raise ConfigError("use_vsd and use_tdm both train the fake score with their own objective: pick one")
        if len(self.spatial_rewards) > 2:
            raise ConfigError(f"spatial_rewards takes at most two rewards (R_it, R_iq), got {self.spatial_rewards}")
        if self.student_timesteps is None and self.student_steps not in STUDENT_TIMESTEPS:
            raise ConfigError(f"student_steps={self.student_steps} has no default timesteps "
                              f"({sorted(STUDENT_TIMESTEPS)}); pass student_timesteps explicitly")
        for name in ("steps", "batch_size", "grad_accum", "cd_ddim_steps", "cd_teacher_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.fake_updates < 1 and (self.use_vsd or self.use_tdm):
            raise ConfigError(f"fake_updates must be >= 1 with use_vsd / use_tdm, got {self.fake_updates}")
        if not 0.0 <= self.vsd_t_min < self.vsd_t_max <= 1.0:
            raise ConfigError(f"need 0 <= vsd_t_min < vsd_t_max <= 1, got {self.vsd_t_min}, {self.vsd_t_max}")
        if not 0.0 <= self.cd_ema_decay <= 1.0:
            raise ConfigError(f"cd_ema_decay must be in [0, 1], got {self.cd_ema_decay}")
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes"):
            raise ConfigError(f"ACCELERATE_USE_DEEPSPEED={os.environ['ACCELERATE_USE_DEEPSPEED']}: distillation "
                              "runs under DDP or FSDP, not DeepSpeed. Run `accelerate launch` with the multi-GPU "
                              "(DDP) or FSDP config, or torchrun (fsdp: true for FSDP)")

    @property
    def timesteps(self) -> list[int]:
        """Student timesteps in sampling order (descending)."""
        ts = self.student_timesteps if self.student_timesteps is not None else STUDENT_TIMESTEPS[self.student_steps]
        return sorted((int(t) for t in ts), reverse=True)


@dataclass
class DistillData:
    """Data latents + their captions: ``latents`` (N, C, h, w) or (N, T, C, h, w), ``text_tokens`` (N, L, D),
    ``text_mask`` (N, L) bool, ``prompts`` (N strings)."""

    latents: torch.Tensor
    text_tokens: torch.Tensor
    text_mask: torch.Tensor
    prompts: list[str]

    def __post_init__(self) -> None:
        n = self.latents.shape[0]
        if not (self.text_tokens.shape[0] == self.text_mask.shape[0] == len(self.prompts) == n):
            raise ValueError(f"DistillData sizes differ: latents {n}, text_tokens {self.text_tokens.shape[0]}, "
                             f"text_mask {self.text_mask.shape[0]}, prompts {len(self.prompts)}")
        if self.latents.dim() not in (4, 5):
            raise ValueError(f"latents must be (N, C, h, w) or (N, T, C, h, w), got {tuple(self.latents.shape)}")

    def __len__(self) -> int:
        return self.latents.shape[0]

    def to(self, device) -> "DistillData":
        return DistillData(self.latents.to(device), self.text_tokens.to(device), self.text_mask.to(device).bool(),
                           list(self.prompts))

    def batch(self, idx: torch.Tensor) -> "DistillData":
        idx_l = idx.tolist()
        dev = self.latents.device
        idx = idx.to(dev)
        return DistillData(self.latents[idx], self.text_tokens[idx], self.text_mask[idx],
                           [self.prompts[i] for i in idx_l])

    @classmethod
    def from_cache(cls, directory: str | Path, device: str | torch.device = "cpu") -> "DistillData":
        """Data latents and text of a ``data_cache.LatentCache``."""
        from data_cache import LatentCache

        cache = LatentCache.open(directory)
        t = cache.tensors(device=device)
        return cls(t["latents"].float(), t["text_tokens"].float(), t["text_mask"].bool(), list(cache.prompts))

    @classmethod
    @torch.no_grad()
    def from_shapes(cls, n: int, vae: Any, text_encoder: Any, num_frames: int | None = None, seed: int = 0,
                    batch_size: int = 256, progress: bool = True) -> "DistillData":
        """Encode ``n`` Shapes world samples (images, or videos with ``num_frames``) with the VAE."""
        from tqdm.auto import tqdm

        from shapes import ShapesWorld

        world = ShapesWorld(num_frames=num_frames, seed=seed)
        lat, toks, masks, prompts = [], [], [], []
        for s in tqdm(range(0, n, batch_size), desc="encode data", disable=not progress):
            pixels, captions, _ = world.batch(list(range(s, min(n, s + batch_size))))
            lat.append(vae.encode(pixels.to(vae.device)).float().cpu())
            emb = text_encoder(list(captions))
            toks.append(emb.tokens.cpu())
            masks.append(emb.mask.cpu())
            prompts += list(captions)
        return cls(torch.cat(lat), torch.cat(toks), torch.cat(masks), prompts)


def make_accelerator(cfg: DistillConfig):
    """The run's ``accelerate.Accelerator``: CPU processes when ``device`` is 'cpu', or 'auto' without CUDA (so
    that torchrun on a CPU host gives gloo DDP / FSDP, not N unrelated single-process runs in one run_dir)."""
    from accelerate import Accelerator

    cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    acc = Accelerator(cpu=cpu)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and acc.num_processes != world:
        raise ConfigError(f"WORLD_SIZE={world} but accelerate set up {acc.num_processes} process(es); launch with "
                          "`accelerate launch` or `torchrun` and leave device at 'auto' (or 'cuda' / 'cpu')")
    return acc


def _with_model(d: Denoiser, model: nn.Module) -> Denoiser:
    """A shallow copy of ``d`` (same schedule, null caption, parameterisation) around another ``model``."""
    view = copy.copy(d)
    view._modules = dict(d._modules)
    view._modules["model"] = model
    return view


def _student_from_teacher(teacher: Denoiser, parameterization: str) -> Denoiser:
    null = (teacher.null_tokens.detach().cpu(), teacher.null_mask.detach().cpu())
    kind = teacher.parameterization if parameterization == "homogeneous" else "x0"
    student = Denoiser(copy.deepcopy(teacher.model), teacher.schedule, kind, cfg_null=null,
                       use_text_mask=teacher.use_text_mask)
    return student.to(teacher.device).requires_grad_(True).train()


class DistillTrainer(StudentShell):
    """DOLLAR Alg. 1 on a ``Denoiser`` teacher.

    Args:
        config: ``DistillConfig``.
        teacher: the frozen teacher ``Denoiser`` (its params get ``requires_grad=False``).
        data: ``DistillData`` (data latents for CD and the concurrent LRM; captions for every loss).
        lrm: for L_FT, a frozen latent reward callable ``lrm(latents, text_tokens, text_mask) -> (B,)``
            (e.g. ``latent_rewards.LatentReward``) or a ``ConcurrentLRM`` (trained by ``lrm_step``).
        vae: ``lrm.latent_space.VAE`` used to decode sample grids (optional).
        accelerator: an ``accelerate.Accelerator``; one is made if None (single process, or DDP under
            ``accelerate launch``).
    """

    def __init__(self, config: DistillConfig, teacher: Denoiser, data: DistillData, lrm: Any = None,
                 vae: Any = None, accelerator: Any = None, mixed_reward: Any = None):
        self.config = cfg = config
        if accelerator is None:
            accelerator = make_accelerator(cfg)
        self.accelerator = acc = accelerator
        dist = str(getattr(acc.distributed_type, "value", acc.distributed_type))
        if dist not in ("NO", "FSDP") and not dist.startswith("MULTI_"):
            raise ConfigError(f"accelerate distributed_type={dist}: DistillTrainer runs in one process, under DDP "
                              "(MULTI_GPU / MULTI_CPU) or FSDP; DeepSpeed / XLA / Megatron are not supported. Use "
                              "the multi-GPU or FSDP `accelerate config`, or torchrun")
        self.fsdp = (cfg.fsdp or dist == "FSDP") and acc.num_processes > 1
        self.device = acc.device if cfg.device in ("auto", "cpu") else torch.device(cfg.device)
        if cfg.bf16 and self.device.type != "cuda":
            raise ConfigError(f"bf16=true needs a CUDA device (got {self.device}); set bf16: false on CPU")
        if cfg.use_lrm_ft and lrm is None:
            raise ConfigError("use_lrm_ft=true needs an LRM: pass lrm= (a LatentReward or ConcurrentLRM), or set "
                              "lrm_path / lrm_mode=concurrent for `lrm distill`")
        self.logger = get_logger("lrm.distill")
        self.guard = NonFiniteGuard(config.max_nonfinite_steps, self.logger, "lrm distill")
        seed_everything(cfg.seed + acc.process_index)

        # Teacher (frozen), student and fake score (both initialised from the teacher), CD target (EMA).
        self.teacher = teacher.to(self.device).eval().requires_grad_(False)
        self.lora = None
        if cfg.lora_rank > 0:  # one base (the teacher's network): student / fake / EMA adapters on it
            self._build_lora(acc)
        else:
            self.student = _student_from_teacher(self.teacher, cfg.parameterization)
            self.fake = (copy.deepcopy(self.teacher).requires_grad_(True).train() if (cfg.use_vsd or cfg.use_tdm)
                         else None)
            self.target = EMA(self.student, cfg.cd_ema_decay) if cfg.use_cd else None
        # FSDP: save_student writes the gathered weights through this unsharded copy (main process, CPU)
        self._plain_student = copy.deepcopy(self.student.model).cpu() if self.fsdp and acc.is_main_process else None
        if cfg.gradient_checkpointing:
            for m in (self.student, self.fake):
                if m is None:
                    continue
                if not hasattr(m.model, "enable_gradient_checkpointing"):
                    raise ConfigError(f"{type(m.model).__name__} has no enable_gradient_checkpointing(); "
                                      "set gradient_checkpointing: false")
                m.model.enable_gradient_checkpointing()
        self.data = data.to(self.device)
        self.latent_shape = tuple(self.data.latents.shape[1:])
        self.lrm = lrm
        self.concurrent = isinstance(lrm, ConcurrentLRM)
        if self.lrm is not None and isinstance(self.lrm, nn.Module) and not self.concurrent:
            self.lrm.to(self.device).eval().requires_grad_(False)
            if hasattr(self.lrm, "check_finite"):  # NaN latents: the guard skips the step (no host sync per call)
                self.lrm.check_finite = False
        if self.concurrent:
            self.lrm.head.to(self.device)
            self.lrm.stats.to(self.device)
        if not self.teacher.use_text_mask and self.teacher.null_tokens.shape[1] != self.data.text_tokens.shape[1]:
            raise ConfigError(
                f"the teacher attends to padding tokens (use_text_mask=False, as diffusers' SD pipelines do), so its "
                f"null caption ({self.teacher.null_tokens.shape[1]} tokens) and the data captions "
                f"({self.data.text_tokens.shape[1]} tokens) must have the same length; encode both with one "
                "text_max_length (77 for Stable Diffusion's CLIP)")
        self.vae = vae
        self.grid = ddim_grid(self.teacher.schedule.num_train_timesteps, cfg.cd_ddim_steps, device=self.device)
        self.timesteps = cfg.timesteps

        if self.fsdp:  # before the optimizers: they must hold the sharded parameters
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(self.device.type, (acc.num_processes,))
            for m in (self.student, self.fake, self.target.shadow if self.target is not None else None):
                if m is not None:
                    fsdp_util.shard(m.model, mesh)
        betas = (cfg.adam_beta1, cfg.adam_beta2)
        self.opt_g = torch.optim.AdamW(self.student.model.parameters(), lr=cfg.lr_student, betas=betas,
                                       weight_decay=cfg.weight_decay)
        self.opt_f = torch.optim.AdamW(self.fake.model.parameters(), lr=cfg.lr_fake,
                                       betas=(0.0, 0.95) if cfg.use_tdm else betas,  # TDM code's fake optimizer
                                       weight_decay=cfg.weight_decay) if self.fake is not None else None
        self.disc = self.opt_d = None
        if cfg.use_gan:
            if acc.num_processes > 1:
                raise ConfigError("use_gan runs in one process for now (the discriminator heads are not wrapped for "
                                  "DDP / FSDP); run without torchrun / accelerate launch")
            self.disc = Discriminator.for_teacher(self.teacher).to(self.device)
            self.opt_d = torch.optim.AdamW(self.disc.parameters(), lr=cfg.lr_disc, betas=(0.0, 0.95))
        if (cfg.spatial_rewards or cfg.temporal_reward) and mixed_reward is None:
            raise ConfigError("spatial_rewards / temporal_reward need mixed_reward= (a distill.reward.MixedReward; "
                              "`lrm distill` builds it from the names)")
        self.mixed_reward = mixed_reward
        if acc.num_processes > 1 and not self.fsdp:  # DDP: gradients of every trained network are all-reduced
            self.student.model = acc.prepare_model(self.student.model)
            if self.fake is not None:
                self.fake.model = acc.prepare_model(self.fake.model)
        if acc.num_processes > 1 and self.concurrent:  # else each rank's LRM would fit only its own samples
            if self.fsdp:  # a small head: replicated (torch DDP, whatever accelerate's plugin would do)
                ids = [self.device.index] if self.device.type == "cuda" else None
                self.lrm.head = nn.parallel.DistributedDataParallel(self.lrm.head, device_ids=ids)
            else:
                self.lrm.head = acc.prepare_model(self.lrm.head)
                self.lrm.optimizer = acc.prepare_optimizer(self.lrm.optimizer)
        self._draws = 0  # graded-step draws in this generator step (FSDP: the same on every rank)
        self.step = 0
        self.history: list[dict[str, float]] = []
        self._last: list[tuple[DistillData, torch.Tensor]] = []  # (batch, x_hat) of the last generator step
        self._last_r: list[Any] = []  # TDM: the re-noised points of those x_hat
        self._tb = None

    def _build_lora(self, acc: Any) -> None:
        """``distill.lora``: the teacher's network becomes the one frozen base; the teacher is the base with every
        adapter disabled, the student the base + "student", the fake score the base + "fake" (its own optimizer;
        the active adapter is switched per call), the CD target theta^- the base + "ema" (an EMA of the student
        adapter's weights only)."""
        from distill.lora import lora_base, role

        cfg = self.config
        if acc.num_processes > 1:
            raise ConfigError("lora_rank > 0 runs in one process for now (DDP / FSDP of the adapter views is not "
                              "wired); run without torchrun / accelerate launch, or set lora_rank: 0")
        if cfg.use_gan:
            raise ConfigError("use_gan with lora_rank > 0 is not supported (the discriminator's feature hooks on "
                              "the shared base would see every role's calls); set one of them off")
        teacher = self.teacher
        self.lora = lora = lora_base(cfg, teacher.model)
        kind = teacher.parameterization if cfg.parameterization == "homogeneous" else "x0"
        self.student = role(teacher, lora.add("student"), kind).train()
        self.fake = role(teacher, lora.add("fake")).train() if (cfg.use_vsd or cfg.use_tdm) else None
        self.target = (EMA(self.student, cfg.cd_ema_decay,
                           shadow=role(teacher, lora.add("ema", trainable=False, init_from="student")))
                       if cfg.use_cd else None)
        self.teacher = role(teacher, lora.view(None)).eval()

    # ---- small helpers ---------------------------------------------------------------------------------
    LOG_COLUMNS = LOG_COLUMNS
    TB_PREFIX = "distill"

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def autocast(self):
        if self.config.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def _unwrap(self, m: nn.Module) -> nn.Module:
        if isinstance(m, nn.parallel.DistributedDataParallel):
            return m.module
        return m if self.fsdp else self.accelerator.unwrap_model(m)

    def _no_sync(self, model: nn.Module, last: bool):
        """Gradient accumulation: no gradient communication before the last micro-batch."""
        if self.fsdp:
            fsdp_util.set_gradient_sync(model, last)
            return nullcontext()
        return nullcontext() if last else self.accelerator.no_sync(model)

    def _clip(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Clip the gradients of ``model`` to ``max_norm`` (0: measure only); returns the total norm."""
        params = model.parameters()
        if self.fsdp:
            return fsdp_util.full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf))
        if max_norm > 0:
            return self.accelerator.clip_grad_norm_(params, max_norm)
        return torch.nn.utils.clip_grad_norm_(params, float("inf"))

    def _set_lr(self) -> float:
        cfg = self.config
        scale = min(1.0, (self.step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
        for g in self.opt_g.param_groups:
            g["lr"] = cfg.lr_student * scale
        if self.opt_f is not None:
            for g in self.opt_f.param_groups:
                g["lr"] = cfg.lr_fake * scale
        return cfg.lr_student * scale

    def sample_batch(self) -> DistillData:
        idx = torch.randint(len(self.data), (self.config.batch_size,))
        return self.data.batch(idx)

    def student_x0(self, x_t: torch.Tensor, t: torch.Tensor, text_tokens: torch.Tensor,
                   text_mask: torch.Tensor | None) -> torch.Tensor:
        """The student's consistency function f_theta(x_t, t) (fp32 output)."""
        with self.autocast():
            x0 = self.student.x0(x_t, t, text_tokens, text_mask)
        return consistency_output(x_t, x0.float(), t, self.config.sigma_data, self.config.timestep_scaling)

    def _graded_input(self, batch: DistillData) -> tuple[torch.Tensor, torch.Tensor]:
        """Backward simulation: noise -> the input of the graded student step (a random step of k)."""
        B = batch.latents.shape[0]
        noise = torch.randn((B, *self.latent_shape), device=self.device)
        k = 0
        if len(self.timesteps) > 1 and self.fsdp:  # k student calls are collectives: every rank draws the same k
            self._draws += 1
            g = torch.Generator().manual_seed((self.config.seed * 1_000_003 + self.step) * 1009 + self._draws)
            k = int(torch.randint(len(self.timesteps), (1,), generator=g))
        elif len(self.timesteps) > 1:
            k = int(torch.randint(len(self.timesteps), (1,)))
        state = k_step_sample(lambda x, t: self.student_x0(x, t, batch.text_tokens, batch.text_mask), noise,
                              self.timesteps, self.teacher.schedule, grad_steps=0, stop_at=k)
        return state.x_t, state.t

    @torch.no_grad()
    def _tdm_point(self, x_hat: torch.Tensor, x_k: torch.Tensor, t_k: torch.Tensor):
        """TDM steps 1-2 for the graded step's stage [stage end e, t_k]: tau ~ U[max(20, e), t_k - 10), then x_hat
        re-noised along the student's own trajectory (``distill.tdm.renoise``)."""
        ts = self.timesteps
        i = ts.index(int(t_k.flatten()[0]))
        end = ts[i + 1] + 1 if i + 1 < len(ts) else 0
        lo, hi = max(20, end), int(t_k.flatten()[0]) - 10
        if hi <= lo:
            raise ConfigError(f"TDM: the stage [{end}, {ts[i]}] of student timesteps {ts} is too short for a tau in "
                              "[max(20, end), start - 10); use fewer, wider steps")
        tau = torch.randint(lo, hi, (x_hat.shape[0],), device=self.device)
        e = torch.full_like(tau, end)
        t_start = t_k.reshape(-1).expand(x_hat.shape[0]) if t_k.numel() == 1 else t_k
        return renoise(x_hat, x_k, t_start, e, tau, self.teacher.schedule)

    def disc_step(self) -> float:
        """One step of the discriminator heads (hinge L_D) on the data latents of the last generator step's batches
        (real) and its student samples (fake)."""
        self.disc.train()
        self.opt_d.zero_grad(set_to_none=True)
        total = 0.0
        for batch, x_hat in self._last:
            loss, _ = discriminator_loss(self.disc, self.teacher, batch.latents, batch.text_tokens, batch.text_mask,
                                         x_hat, batch.text_tokens, batch.text_mask, autocast=self.autocast)
            (loss / len(self._last)).backward()
            total += float(loss.detach()) / len(self._last)
        gn = torch.nn.utils.clip_grad_norm_(self.disc.parameters(), self.config.max_grad_norm or float("inf"))
        if self.guard.check(gn, "discriminator loss / gradient", self.step + 1, key="disc"):
            self.opt_d.step()
        self.opt_d.zero_grad(set_to_none=True)
        return total

    @torch.no_grad()
    def generate(self, batch: DistillData) -> torch.Tensor:
        """Student samples for ``batch``'s captions as the fake score sees them (backward simulation)."""
        x, t = self._graded_input(batch)
        return self.student_x0(x, t, batch.text_tokens, batch.text_mask)

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor | None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """k-step student sampling from ``noise`` (x0 latents)."""
        was = self.student.training
        self.student.eval()
        x0 = k_step_sample(lambda x, t: self.student_x0(x, t, text_tokens, text_mask), noise, self.timesteps,
                           self.teacher.schedule, generator=generator).x0
        self.student.train(was)
        return x0

    # ---- Alg. 1 steps ----------------------------------------------------------------------------------
    def generator_step(self) -> dict[str, float]:
        """Lines 8-10 (+18): one optimizer step of the student on beta_VSD L_VSD + beta_CD L_CD + beta_FT L_FT."""
        cfg, acc = self.config, self.accelerator
        self._set_lr()
        self.student.train()
        self.opt_g.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        self._last, self._last_r = [], []
        need_x_hat = (cfg.use_vsd or cfg.use_tdm or cfg.use_gan or cfg.use_lrm_ft or self.concurrent
                      or self.mixed_reward is not None)
        grad_dtype = torch.float64 if cfg.vsd_grad_dtype == "float64" else torch.float32
        for micro in range(cfg.grad_accum):
            batch = self.sample_batch()
            tok, mask = batch.text_tokens, batch.text_mask
            B, L = tok.shape[:2]
            null_t, null_m = self.teacher.null_text(B, L)
            xs, ts = [], []
            if need_x_hat:
                x_k, t_k = self._graded_input(batch)
                xs.append(x_k)
                ts.append(t_k)
            if cfg.use_cd:
                target_net = self.target.shadow
                x_s, t_s, cd_target = cd_inputs_and_target(
                    batch.latents, self.teacher, lambda x, t: target_net.x0(x, t, tok, mask), tok, mask, null_t,
                    null_m, self.grid, cfg.cd_teacher_steps, cfg.cd_guidance, cfg.sigma_data, cfg.timestep_scaling,
                    autocast=self.autocast)
                xs.append(x_s)
                ts.append(t_s)
            n = len(xs)
            # One graded student call for the VSD/FT sample and the CD prediction.
            with self._no_sync(self.student.model, micro == cfg.grad_accum - 1):
                f = self.student_x0(torch.cat(xs), torch.cat(ts), tok.repeat(n, *[1] * (tok.dim() - 1)),
                                    mask.repeat(n, 1))
                parts = f.split(B)
                loss = torch.zeros((), device=self.device)
                logs: dict[str, float] = {}
                if need_x_hat:
                    x_hat = parts[0]
                    self._last.append((batch, x_hat.detach()))
                if cfg.use_tdm:
                    r = self._tdm_point(x_hat, x_k, t_k)
                    self._last_r.append(r)
                    l_tdm, _ = tdm_generator_loss(x_hat, r, self.teacher, self.fake, tok, mask, null_t, null_m,
                                                  cfg.tdm_guidance, cfg.tdm_distance, autocast=self.autocast)
                    loss = loss + cfg.beta_tdm * l_tdm
                    logs["loss_tdm"] = float(l_tdm.detach())
                if cfg.use_gan:
                    l_gan, _ = generator_adv_loss(self.disc, self.teacher, x_hat, tok, mask, autocast=self.autocast)
                    loss = loss + cfg.beta_gan * l_gan
                    logs["loss_gan"] = float(l_gan.detach())
                if self.mixed_reward is not None:  # weights inside: beta_spatial, beta_temporal
                    l_mix, _ = self.mixed_reward.loss(x_hat, tok, mask, batch.prompts)
                    loss = loss + l_mix
                    logs["loss_mixed"] = float(l_mix.detach())
                if cfg.use_vsd:
                    l_vsd, info = vsd_loss(x_hat, self.teacher, self.fake, tok, mask, null_t, null_m,
                                           cfg.real_guidance, min_frac=cfg.vsd_t_min, max_frac=cfg.vsd_t_max,
                                           grad_dtype=grad_dtype, autocast=self.autocast)
                    loss = loss + cfg.beta_vsd * l_vsd
                    logs["loss_vsd"] = float(l_vsd.detach())
                    logs["vsd_grad_norm"] = info["vsd_grad_norm"]
                if cfg.use_cd:
                    l_cd = cd_distance(parts[-1], cd_target, cfg.cd_distance, cfg.huber_c)
                    loss = loss + cfg.beta_cd * l_cd
                    logs["loss_cd"] = float(l_cd.detach())
                if cfg.use_lrm_ft:
                    l_ft, r = lrm_ft_loss(self.lrm, x_hat, tok, mask)
                    loss = loss + cfg.beta_ft * l_ft
                    logs["loss_ft"] = float(l_ft.detach())
                    logs["lrm_reward"] = float(r.mean())
                logs["loss_g"] = float(loss.detach())
                acc.backward(loss / cfg.grad_accum)  # a non-finite loss gives a non-finite norm on every rank
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v / cfg.grad_accum
        gn = self._clip(self.student.model, cfg.max_grad_norm)
        sums["grad_norm_g"] = float(gn)
        if not self.guard.check(gn, "generator loss / gradient (lower lr_student, or vsd_grad_dtype=float64 / "
                                "bf16=false)", self.step + 1):
            self.opt_g.zero_grad(set_to_none=True)
            return sums
        self.opt_g.step()
        self.opt_g.zero_grad(set_to_none=True)
        if self.target is not None:
            if self.fsdp:  # the EMA pairs up shards: both networks sharded, none left gathered by a forward
                fsdp_util.reshard(self.target.shadow.model)
                fsdp_util.reshard(self.student.model)
            self.target.update(self._unwrap_denoiser(self.student))
        return sums

    def _unwrap_denoiser(self, d: Denoiser) -> Denoiser:
        if self.accelerator.num_processes == 1 or self.fsdp:
            return d
        return _with_model(d, self._unwrap(d.model))  # plain module: matches the EMA copy's names

    def fake_score_step(self, reuse_last: bool = True) -> float:
        """Lines 12-13: one optimizer step of the fake score on the teacher objective at sg(x_hat)."""
        cfg, acc = self.config, self.accelerator
        if self.fake is None:
            raise RuntimeError("fake_score_step needs use_vsd=true or use_tdm=true")
        self.fake.train()
        self.opt_f.zero_grad(set_to_none=True)
        pairs = list(self._last) if (reuse_last and self._last) else []
        total = 0.0
        for micro in range(cfg.grad_accum):
            r = None
            if micro < len(pairs):
                batch, x_hat = pairs[micro]
                r = self._last_r[micro] if cfg.use_tdm else None
            else:
                batch = self.sample_batch()
                if cfg.use_tdm:
                    with torch.no_grad():
                        x_k, t_k = self._graded_input(batch)
                        x_hat = self.student_x0(x_k, t_k, batch.text_tokens, batch.text_mask)
                        r = self._tdm_point(x_hat, x_k, t_k)
                else:
                    x_hat = self.generate(batch)
            with self._no_sync(self.fake.model, micro == cfg.grad_accum - 1):
                if cfg.use_tdm:  # TDM Eq. 8 / 10 at the re-noised point (x0 target, min(SNR, 5) weight)
                    loss = tdm_fake_score_loss(self.fake, x_hat, r, batch.text_tokens, batch.text_mask,
                                               autocast=self.autocast)
                else:
                    loss = fake_score_loss(self.fake, x_hat, batch.text_tokens, batch.text_mask,
                                           min_frac=cfg.vsd_t_min, max_frac=cfg.vsd_t_max, autocast=self.autocast)
                acc.backward(loss / cfg.grad_accum)
            total += float(loss.detach()) / cfg.grad_accum
        gn = self._clip(self.fake.model, cfg.max_grad_norm)
        if self.guard.check(gn, "fake-score loss / gradient", self.step + 1, key="fake"):
            self.opt_f.step()
        self.opt_f.zero_grad(set_to_none=True)
        return total

    def lrm_step(self) -> float:
        """Lines 15-16: one step of the concurrent LRM on data latents | generated latents (Eq. 10)."""
        if not self.concurrent:
            raise RuntimeError("lrm_step needs a ConcurrentLRM (lrm_mode=concurrent)")
        if not self._last:
            self._last = [(b, self.generate(b)) for b in [self.sample_batch()]]
        lat = torch.cat([torch.cat([b.latents, x]) for b, x in self._last])
        tok = torch.cat([torch.cat([b.text_tokens, b.text_tokens]) for b, _ in self._last])
        mask = torch.cat([torch.cat([b.text_mask, b.text_mask]) for b, _ in self._last])
        prompts = [p for b, _ in self._last for p in (b.prompts + b.prompts)]
        return self.lrm.step(lat, tok, mask, prompts)

    def train_step(self) -> dict[str, float]:
        """One iteration of Alg. 1 (generator, fake score x fake_updates, concurrent LRM)."""
        t0 = time.perf_counter()
        self._draws = 0
        row = self.generator_step()
        if self.fake is not None:
            fl = [self.fake_score_step(reuse_last=(i == 0)) for i in range(self.config.fake_updates)]
            row["loss_fake"] = sum(fl) / len(fl)
        if self.disc is not None:
            row["loss_disc"] = self.disc_step()
        if self.concurrent:
            row["loss_lrm"] = self.lrm_step()
        self.step += 1
        row["step"] = self.step
        row["lr"] = self.opt_g.param_groups[0]["lr"]
        row["sec_per_step"] = time.perf_counter() - t0
        self.history.append(row)
        return row

    # ---- checkpoints ------------------------------------------------------------------------------------
    def _state(self) -> tuple[dict[str, nn.Module], dict[str, torch.optim.Optimizer]]:
        modules: dict[str, nn.Module] = {"student": self._unwrap(self.student.model)}
        optims: dict[str, torch.optim.Optimizer] = {"student": self.opt_g}
        if self.fake is not None:
            modules["fake"] = self._unwrap(self.fake.model)
            optims["fake"] = self.opt_f
        if self.target is not None:
            modules["target"] = self.target.shadow.model
        if self.disc is not None:
            modules["disc"] = self.disc
            optims["disc"] = self.opt_d
        if self.concurrent:
            modules["lrm_head"] = self._unwrap(self.lrm.head)
            modules["lrm_target_stats"] = self.lrm.stats
            optims["lrm"] = self.lrm.optimizer
        return modules, optims

    def _sharded(self) -> dict[str, nn.Module]:
        """The FSDP-sharded networks by checkpoint name."""
        nets = {"student": self.student.model}
        if self.fake is not None:
            nets["fake"] = self.fake.model
        if self.target is not None:
            nets["target"] = self.target.shadow.model
        return nets

    def _fsdp_full(self, modules: dict, optims: dict) -> tuple[dict, dict]:
        """Collective: the sharded networks' and their optimizers' full states (rank 0 gets the tensors)."""
        nets = self._sharded()
        return ({k: fsdp_util.full_state(m) if k in nets else m for k, m in modules.items()},
                {k: fsdp_util.full_optim_state(nets[k], o) if k in nets else o for k, o in optims.items()})

    def _rng_path(self, directory: Path) -> Path:
        return Path(directory) / f"rng_rank{self.accelerator.process_index}.safetensors"

    def _rng_state(self) -> dict[str, torch.Tensor]:
        st = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            st["cuda"] = torch.cuda.get_rng_state(self.device)
        return st

    def save_checkpoint(self) -> Path | None:
        """Main process: models, optimizers, step, its RNG (``state.*``); every other rank adds its own torch RNG
        state as ``rng_rank{i}.safetensors`` so a resumed DDP run continues each rank's random stream."""
        from lrm.io import save_tensors

        acc = self.accelerator
        acc.wait_for_everyone()
        path = None
        modules, optims = self._state()
        if self.fsdp:  # collectives on every rank: the full tensors land on rank 0
            modules, optims = self._fsdp_full(modules, optims)
        if acc.is_main_process:
            path = save_training_state(self.checkpoint_dir, self.step, modules=modules, optimizers=optims,
                                       extra={"config": dataclasses.asdict(self.config),
                                              "num_processes": acc.num_processes})
        if acc.num_processes > 1:
            acc.wait_for_everyone()  # the new checkpoint directory is in place
            if not acc.is_main_process:
                save_tensors(self._rng_path(self.checkpoint_dir), self._rng_state())
            acc.wait_for_everyone()
        return path

    def load_checkpoint(self, directory: str | Path | None = None) -> int:
        """Restore models, optimizers, step and RNG; returns the step.

        Rank 0 gets the RNG of ``state.safetensors``; rank i > 0 its ``rng_rank{i}.safetensors``, or (checkpoint
        from another number of processes, or written before the rank files) a fresh seed from step and rank."""
        from lrm.io import load_tensors

        modules, optims = self._state()
        if self.fsdp:
            nets = self._sharded()
            optims = {k: fsdp_util.ShardedOptimLoad(nets[k], o) if k in nets else o for k, o in optims.items()}
            modules = {k: fsdp_util.ShardedLoad(m) if k in nets else m for k, m in modules.items()}
        directory = Path(directory or self.checkpoint_dir)
        st = load_training_state(directory, modules=modules, optimizers=optims, map_location=self.device)
        acc = self.accelerator
        if acc.num_processes > 1 and not acc.is_main_process:  # each process continues its own stream
            found = find_checkpoint(directory)
            rng = self._rng_path(found) if found is not None else None
            if rng is not None and rng.is_file() and st["extra"].get("num_processes") == acc.num_processes:
                t = load_tensors(rng)
                torch.set_rng_state(t["torch"])
                if "cuda" in t and self.device.type == "cuda":
                    torch.cuda.set_rng_state(t["cuda"], self.device)
            else:
                seed_everything(self.config.seed + acc.process_index + 1000003 * st["step"])
        self.step = int(st["step"])
        return self.step

    def input_fingerprint(self) -> dict[str, str | None]:
        """What a resumed run must find again: the teacher's weights, the VAE, the data, a frozen LRM."""
        lrm = self.lrm if isinstance(self.lrm, nn.Module) and not self.concurrent else None
        return {"teacher": fingerprint(self.teacher.model.state_dict().items()),
                "vae": None if self.vae is None else self.vae.latent_space.vae_hash,
                "data": fingerprint([("latents", self.data.latents), ("text", self.data.text_tokens)]),
                "lrm": None if lrm is None else fingerprint(lrm.state_dict().items())}

    # ---- logging and samples ----------------------------------------------------------------------------
    @torch.no_grad()
    def save_samples(self, tag: str | None = None) -> Path | None:
        """Grid of student samples (decoded with the VAE) for the first prompts; fixed noise per run."""
        cfg = self.config
        if self.vae is None or not (self.accelerator.is_main_process or self.fsdp):  # FSDP: every rank samples
            return None
        P, S = min(cfg.num_sample_prompts, len(self.data)), cfg.samples_per_prompt
        idx = torch.arange(P).repeat_interleave(S)
        batch = self.data.batch(idx)
        g = torch.Generator().manual_seed(cfg.seed)
        noise = torch.randn((len(idx), *self.latent_shape), generator=g).to(self.device)
        x0 = self.sample(noise, batch.text_tokens, batch.text_mask, generator=g)
        if not self.accelerator.is_main_process:
            return None
        return self.write_grid(self.vae.decode(x0.float()).cpu(), tag, S)

    def save_student(self, directory: str | Path | None = None) -> Path:
        """The student as a Denoiser directory + ``student.json`` (timesteps, boundary scalings, losses)."""
        directory = Path(directory or Path(self.config.run_dir) / "student")
        student = self._unwrap_denoiser(self.student)
        if self.fsdp:  # gather (every rank) into the unsharded copy the main process keeps
            full = fsdp_util.full_state(self.student.model).state_dict()
            if self.accelerator.is_main_process:
                self._plain_student.load_state_dict(full)
                student = _with_model(self.student, self._plain_student)
        if self.is_main:
            cfg = self.config
            self.export_student(student, directory, {"losses": {
                "vsd": cfg.use_vsd, "tdm": cfg.use_tdm, "cd": cfg.use_cd, "gan": cfg.use_gan, "lrm_ft": cfg.use_lrm_ft,
                "mixed_rewards": list(cfg.spatial_rewards) + ([cfg.temporal_reward] if cfg.temporal_reward else [])}})
        return directory

    # ---- the loop ---------------------------------------------------------------------------------------
    def train(self, steps: int | None = None) -> list[dict[str, float]]:
        """Run (or resume) until ``steps`` (default ``config.steps``) generator steps; returns the history."""
        from tqdm.auto import tqdm

        cfg, acc = self.config, self.accelerator
        total = steps if steps is not None else cfg.steps
        self._start_run(self.input_fingerprint(), MUTABLE_KEYS, "lrm.distill",
                        barrier=acc.wait_for_everyone if acc.num_processes > 1 else lambda: None)
        eff = cfg.batch_size * cfg.grad_accum * acc.num_processes
        self.logger.info(
            "distill: %d generator steps x effective batch %d (%d per process x %d accum x %d processes); "
            "student %d-step %s (%s); losses VSD=%s CD=%s (m=%d teacher steps, %d CFG calls each) FT=%s; %d fake "
            "updates per generator step; run dir %s", total, eff, cfg.batch_size, cfg.grad_accum, acc.num_processes,
            len(self.timesteps), self.timesteps, cfg.parameterization, cfg.use_vsd, cfg.use_cd, cfg.cd_teacher_steps,
            2, cfg.use_lrm_ft, cfg.fake_updates if cfg.use_vsd else 0, cfg.run_dir)
        bar = tqdm(total=total, initial=self.step, desc="distill", disable=not (cfg.progress and acc.is_main_process))
        while self.step < total:
            row = self.train_step()
            self._log_row(row)
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k.startswith("loss")})
            if self.step % max(cfg.log_every, 1) == 0:
                self.logger.info("step %d: %s", self.step,
                                 ", ".join(f"{k}={v:.5g}" for k, v in row.items() if k != "step"))
            if cfg.ckpt_every > 0 and self.step % cfg.ckpt_every == 0:
                self.save_checkpoint()
            if cfg.sample_every > 0 and self.step % cfg.sample_every == 0:
                self.save_samples()
        bar.close()
        if cfg.final_checkpoint and (cfg.ckpt_every == 0 or self.step % cfg.ckpt_every != 0):
            self.save_checkpoint()
        if cfg.sample_every == 0 or self.step % cfg.sample_every != 0:
            self.save_samples()
        if self._tb is not None:
            self._tb.flush()
        return self.history


__all__ = ["DistillConfig", "DistillData", "DistillTrainer", "LOG_COLUMNS"]
