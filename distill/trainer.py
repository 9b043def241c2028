"""``lrm distill``: DOLLAR Alg. 1 (VSD + CD, plus latent reward fine-tuning) and paper 004's TDM, adversarial and
mixed-reward terms, as a configuration of the one student trainer (``distill.generator.GeneratorTrainer``).

One trainer step with ``DistillConfig``'s terms:
  1. generator step: L_G = beta_VSD L_VSD (or beta_TDM L_traj) + beta_CD L_CD + beta_GAN L_gen + mixed rewards
     + beta_FT L_FT, one optimizer step on theta (the FT term uses the current LRM; Alg. 1 takes it as a separate
     step after the LRM update, which costs a second student forward for the same gradient direction), then the
     EMA update of the CD target network theta^-;
  2. the terms' own updates: the fake score x ``fake_updates`` (the first reuses the generator step's samples),
     the discriminator heads, the concurrent LRM (Eq. 10 on data latents + generated latents, Alg. 1 l. 15-16).
The student's x0 map is the consistency function f(x, t) = c_skip x + c_out x0_theta(x, t) (``distill.cd``); at the
student's timesteps (>= 249) c_skip < 1e-6. With ``lora_rank`` > 0 (``distill.lora``) the teacher's network is the one
frozen base: student, fake score and CD target are adapters on it, the teacher is the base with adapters off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from distill.cd import CDTerm
from distill.data import DistillData
from distill.denoiser import Denoiser
from distill.gan import GANTerm
from distill.generator import LOG_COLUMNS, GeneratorTrainer, make_accelerator
from distill.lrm_ft import LRMTerm
from distill.objective import ObjectiveTerm
from distill.reward import MixedRewardTerm
from distill.shell import ShellConfig
from distill.tdm import TDMTerm
from distill.vsd import VSDTerm
from lrm.config import ConfigError, opt

MUTABLE_KEYS = ShellConfig.mutable_keys


@dataclass
class DistillConfig(ShellConfig):
    """Everything ``lrm distill`` needs; per-process sizes, steps in generator steps.

    Multi-process (``accelerate launch`` / ``torchrun``): DDP by default (the student, fake score and concurrent
    LRM head replicated, gradients all-reduced); ``fsdp: true`` (or ``accelerate launch --use_fsdp``) shards the
    student, fake score and CD target with FSDP2 instead (``distill.fsdp``; the frozen teacher and the small LRM head
    stay replicated). Checkpoints have one format for all three. DeepSpeed is refused.
    """

    command = "distill"
    run_dir: str = opt("runs/distill", "output directory: config.yaml, log.txt, log.csv, checkpoint/, samples/, "
                                      "student/")
    num_data: int = opt(2048, "Shapes world samples encoded as data latents (when data_cache is None)")
    # ---- which losses ------------------------------------------------------------------------------------
    use_vsd: bool = opt(True, "variational score distillation (DMD2) in the generator loss")
    use_cd: bool = opt(True, "consistency distillation (LCM, multi-step teacher) in the generator loss")
    use_lrm_ft: bool = opt(False, "latent reward fine-tuning L_FT = -R^l(x_hat, c) (needs an LRM)")
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
    # ---- LRM -------------------------------------------------------------------------------------------
    lrm_mode: Literal["frozen", "concurrent"] = opt("frozen", "frozen: a pretrained LatentReward (lrm_path); "
                                                             "concurrent: train a head on data + generated latents "
                                                             "(Eq. 10)")
    lrm_head: str = opt("text-image-cnn", "latent_rewards head name (lrm_mode=concurrent)")
    lrm_head_kwargs: dict = opt({}, "constructor overrides of the head, e.g. {patch: 2, width: 64}")
    pixel_reward: str = opt("colorfulness", "reward_adapters name of the gold pixel reward (lrm_mode=concurrent)")
    lr_lrm: float = opt(1e-4, "learning rate of the concurrent LRM head")
    # ---- optimisation ----------------------------------------------------------------------------------
    lr_student: float = opt(5e-5, "generator learning rate (AdamW)")

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
        if self.fake_updates < 1 and (self.use_vsd or self.use_tdm):
            raise ConfigError(f"fake_updates must be >= 1 with use_vsd / use_tdm, got {self.fake_updates}")

    @property
    def student_lr(self) -> float:
        return self.lr_student

    @property
    def method_name(self) -> str:
        return "+".join(n for n, on in (("vsd", self.use_vsd), ("tdm", self.use_tdm), ("cd", self.use_cd),
                                        ("gan", self.use_gan), ("mixed", self.spatial_rewards or self.temporal_reward),
                                        ("ft", self.use_lrm_ft)) if on)


def distill_terms(cfg: DistillConfig, lrm: Any = None, mixed_reward: Any = None) -> list[ObjectiveTerm]:
    """The objective of ``cfg``, in the order the losses are computed."""
    if cfg.use_lrm_ft and lrm is None:
        raise ConfigError("use_lrm_ft=true needs an LRM: pass lrm= (a LatentReward or ConcurrentLRM), or set "
                          "lrm_path / lrm_mode=concurrent for `lrm distill`")
    if (cfg.spatial_rewards or cfg.temporal_reward) and mixed_reward is None:
        raise ConfigError("spatial_rewards / temporal_reward need mixed_reward= (a distill.reward.MixedReward; "
                          "`lrm distill` builds it from the names)")
    terms: list[ObjectiveTerm] = []
    if cfg.use_tdm:
        terms.append(TDMTerm(cfg.beta_tdm, cfg.tdm_guidance, cfg.tdm_distance, cfg.fake_updates, cfg.lr_fake))
    if cfg.use_gan:
        terms.append(GANTerm(cfg.beta_gan, cfg.lr_disc))
    if mixed_reward is not None:  # weights inside: beta_spatial, beta_temporal
        terms.append(MixedRewardTerm(mixed_reward))
    if cfg.use_vsd:
        terms.append(VSDTerm(cfg.beta_vsd, cfg.real_guidance, cfg.vsd_t_min, cfg.vsd_t_max, cfg.vsd_grad_dtype,
                             cfg.fake_updates, cfg.lr_fake))
    if cfg.use_cd:
        terms.append(CDTerm(cfg.beta_cd, cfg.cd_ddim_steps, cfg.cd_teacher_steps, cfg.cd_guidance, cfg.cd_ema_decay,
                            cfg.cd_distance, cfg.huber_c))
    if cfg.use_lrm_ft:
        terms.append(LRMTerm(lrm, cfg.beta_ft))
    return terms


def DistillTrainer(config: DistillConfig, teacher: Denoiser, data: DistillData, lrm: Any = None, vae: Any = None,
                   accelerator: Any = None, mixed_reward: Any = None, gold_reward: Any = None) -> GeneratorTrainer:
    """``GeneratorTrainer`` configured as ``lrm distill``: the student starts from the (frozen) ``teacher``.

    Args:
        config: ``DistillConfig``.
        teacher: the frozen teacher ``Denoiser`` (its params get ``requires_grad=False``).
        data: ``DistillData`` (data latents for CD, the GAN and the concurrent LRM; captions for every loss).
        lrm: for L_FT, a frozen latent reward callable ``lrm(latents, text_tokens, text_mask) -> (B,)``
            (e.g. ``latent_rewards.LatentReward``) or a ``ConcurrentLRM`` (trained by the term's update).
        vae: ``lrm.latent_space.VAE`` used to decode sample grids (optional).
        accelerator: an ``accelerate.Accelerator``; one is made if None (single process, or DDP under
            ``accelerate launch``).
        mixed_reward: a ``distill.reward.MixedReward`` for ``spatial_rewards`` / ``temporal_reward``.
        gold_reward: the eval hook's pixel reward (``gold_reward`` key), optional.
    """
    cfg = config
    return GeneratorTrainer(cfg, distill_terms(cfg, lrm, mixed_reward), data, teacher=teacher, vae=vae,
                            gold_reward=gold_reward, accelerator=accelerator, export_meta={"losses": {
                                "vsd": cfg.use_vsd, "tdm": cfg.use_tdm, "cd": cfg.use_cd, "gan": cfg.use_gan,
                                "lrm_ft": cfg.use_lrm_ft, "mixed_rewards": list(cfg.spatial_rewards) + (
                                    [cfg.temporal_reward] if cfg.temporal_reward else [])}})


__all__ = ["DistillConfig", "DistillData", "DistillTrainer", "GeneratorTrainer", "LOG_COLUMNS", "distill_terms",
           "make_accelerator"]
