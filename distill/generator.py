"""The one student (generator) trainer: ``lrm distill`` and ``lrm finetune --method ...`` are configurations of it.

``GeneratorTrainer`` owns the shell: accelerate set-up (one process, DDP, or FSDP2 via ``distill.fsdp``), LoRA roles
(``distill.lora``: student, fake score and CD target as adapters on one frozen base), exact resume with every rank's
RNG, log.csv / TensorBoard, checkpoints, sample grids, ``save_student`` and the gold-reward eval hook. The objective
is a list of ``distill.objective.ObjectiveTerm`` (VSD, TDM, CD, GAN, LRM, direct reward, mixed rewards, DDPO, KL).

One trainer step (``train_step``):
  1. the student update: a driver term's ``run`` (DDPO: sampling + PPO optimizer steps), else ``generator_step()``:
     per micro-batch one backward-simulated x_hat (DMD2) and ONE graded student call for it and every term's extra
     inputs (CD), L = sum_i w_i L_i, one optimizer step, then each term's ``after_generator_step`` (CD's EMA);
  2. each term's ``update`` (fake score x fake_updates, discriminator, concurrent LRM);
  3. timing (device-seconds, peak memory), the eval hook, the history row.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from distill import fsdp as fsdp_util
from distill.cd import consistency_output
from distill.denoiser import Denoiser
from distill.ema import EMA
from distill.guard import NonFiniteGuard
from distill.objective import ObjectiveTerm, StepContext
from distill.samplers import k_step_sample, pooled_kw
from lrm.checkpoint import find_checkpoint, load_training_state, save_training_state
from lrm.config import ConfigError
from lrm.run import (
    check_resume,
    clear_checkpoints,
    fingerprint,
    get_logger,
    prepare_run_dir,
    record_run,
    seed_everything,
)

LOG_COLUMNS = ["step", "method", "loss", "loss_vsd", "loss_tdm", "loss_cd", "loss_gan", "loss_mixed", "loss_ft",
               "loss_direct", "kl", "proxy_reward", "gold_reward", "eval_gold_reward", "loss_fake", "loss_disc",
               "loss_lrm", "approx_kl", "clipfrac", "adv_std", "grad_norm", "vsd_grad_norm", "optimizer_steps",
               "samples", "lr", "step_time_s", "gpu_seconds", "peak_mem_mb"]


def make_accelerator(cfg: Any):
    """The run's ``accelerate.Accelerator``: CPU processes when ``device`` is 'cpu', or 'auto' without CUDA (so
    that torchrun on a CPU host gives gloo DDP / FSDP, not N unrelated single-process runs in one run_dir)."""
    import os

    from accelerate import Accelerator

    cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    acc = Accelerator(cpu=cpu)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and acc.num_processes != world:
        raise ConfigError(f"WORLD_SIZE={world} but accelerate set up {acc.num_processes} process(es); launch with "
                          "`accelerate launch` or `torchrun` and leave device at 'auto' (or 'cuda' / 'cpu')")
    return acc


def with_model(d: Denoiser, model: nn.Module) -> Denoiser:
    """A shallow copy of ``d`` (same schedule, null caption, parameterisation) around another ``model``."""
    view = copy.copy(d)
    view._modules = dict(d._modules)
    view._modules["model"] = model
    return view


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class GeneratorTrainer:
    """A k-step student trained on a sum of objective terms.

    Args:
        config: a ``ShellConfig`` subclass (``DistillConfig`` / ``FinetuneConfig``): run control, optimiser, the
            student's timesteps; its ``command`` names the logger and its ``mutable_keys`` what a resume may change.
        terms: the ``ObjectiveTerm`` list, in the order their losses are computed.
        data: ``DistillData`` (captions + text embeddings; data latents, or None, for CD / GAN / grids).
        teacher: the frozen teacher ``Denoiser`` of the distillation terms (frozen in place); None: a frozen copy of
            ``init`` when a term needs one.
        init: the ``Denoiser`` the student starts from (default: the teacher); not modified.
        vae: ``lrm.latent_space.VAE`` (sample grids, gold rewards, pixel rewards).
        gold_reward: pixel reward ``reward(pixels, prompts) -> (B,)`` of the eval hook (and of ``log_gold_train``).
        accelerator: an ``accelerate.Accelerator`` (made from the config if None).
        latent_shape: per-sample latent shape; default: the data latents', else the model's square sample size.
        export_meta: extra keys of ``student/student.json``.
    """

    _tb: Any = None

    def __init__(self, config: Any, terms: list[ObjectiveTerm], data: Any, teacher: Denoiser | None = None,
                 init: Denoiser | None = None, vae: Any = None, gold_reward: Any = None, accelerator: Any = None,
                 latent_shape: tuple[int, ...] | None = None, export_meta: dict[str, Any] | None = None):
        self.config = cfg = config
        if teacher is None and init is None:
            raise ValueError("GeneratorTrainer needs a teacher or an init Denoiser")
        if accelerator is None:
            accelerator = make_accelerator(cfg)
        self.accelerator = acc = accelerator
        dist = str(getattr(acc.distributed_type, "value", acc.distributed_type))
        if dist not in ("NO", "FSDP") and not dist.startswith("MULTI_"):
            raise ConfigError(f"accelerate distributed_type={dist}: the trainer runs in one process, under DDP "
                              "(MULTI_GPU / MULTI_CPU) or FSDP; DeepSpeed / XLA / Megatron are not supported. Use "
                              "the multi-GPU or FSDP `accelerate config`, or torchrun")
        self.fsdp = (cfg.fsdp or dist == "FSDP") and acc.num_processes > 1
        self.device = acc.device if cfg.device in ("auto", "cpu") else torch.device(cfg.device)
        if cfg.bf16 and self.device.type != "cuda":
            raise ConfigError(f"bf16=true needs a CUDA device (got {self.device}); set bf16: false on CPU")
        self.logger = get_logger(f"lrm.{cfg.command}")
        self.guard = NonFiniteGuard(cfg.max_nonfinite_steps, self.logger, f"lrm {cfg.command}")
        seed_everything(cfg.seed + acc.process_index)
        self.terms = list(terms)
        names = [t.name for t in self.terms]
        if len(set(names)) != len(names):
            raise ConfigError(f"objective terms must have distinct names, got {names}")
        self.driver = next((t for t in self.terms if t.driver), None)
        if acc.num_processes > 1:
            bad = [t.name for t in self.terms if t.single_process] + (["lora"] if cfg.lora_rank > 0 else [])
            if bad:
                raise ConfigError(f"{bad} run in one process for now (not wired for DDP / FSDP); run without "
                                  "torchrun / accelerate launch")
        self.timesteps = cfg.timesteps
        self.export_meta = dict(export_meta or {})
        init = init if init is not None else teacher
        self.inputs = {"init": fingerprint(init.model.state_dict().items()),
                       "teacher": None if teacher is None or teacher is init else
                       fingerprint(teacher.model.state_dict().items()),
                       "data": fingerprint([("text", data.text_tokens)] + ([] if data.latents is None else
                                                                           [("latents", data.latents)])),
                       "vae": getattr(getattr(vae, "latent_space", None), "vae_hash", None)}
        self._build_networks(init, teacher, any(t.needs_teacher for t in self.terms))
        self.schedule = self.student.schedule
        self.data = self._pooled_text(data.to(self.device))
        if self.teacher is not None and not self.teacher.use_text_mask and \
                self.teacher.null_tokens.shape[1] != self.data.text_tokens.shape[1]:
            raise ConfigError(
                f"the teacher attends to padding tokens (use_text_mask=False, as diffusers' SD pipelines do), so its "
                f"null caption ({self.teacher.null_tokens.shape[1]} tokens) and the data captions "
                f"({self.data.text_tokens.shape[1]} tokens) must have the same length; encode both with one "
                "text_max_length (77 for Stable Diffusion's CLIP)")
        self.vae, self.gold_reward = vae, gold_reward
        self.latent_shape = tuple(latent_shape) if latent_shape is not None else self._latent_shape()
        for t in self.terms:
            t.setup(self)
        self.inputs["terms"] = {t.name: t.fingerprint() for t in self.terms if t.fingerprint() is not None}
        # FSDP: save_student writes the gathered weights through this unsharded copy (main process, CPU)
        self._plain_student = copy.deepcopy(self.student.model).cpu() if self.fsdp and acc.is_main_process else None
        if self.fsdp:  # before the optimizers: they must hold the sharded parameters
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(self.device.type, (acc.num_processes,))
            for m in self._sharded().values():
                fsdp_util.shard(m, mesh)
        self.opt = torch.optim.AdamW(self.student.model.parameters(), lr=cfg.student_lr,
                                     betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
        if acc.num_processes > 1 and not self.fsdp:  # DDP: gradients of every trained network are all-reduced
            self.student.model = acc.prepare_model(self.student.model)
        for t in self.terms:
            t.setup_optimizers(self)
        self._draws = 0  # graded-step draws in this generator step (FSDP: the same on every rank)
        self.step = self.optimizer_steps = 0
        self.gpu_seconds = self.peak_mem_mb = 0.0
        self._evals_by_time = 0
        self.history: list[dict[str, Any]] = []
        self.last: list[StepContext] = []  # the last generator step's micro-batches (x_hat detached)
        self._tb = None
        g = torch.Generator().manual_seed(cfg.seed + 12345)  # fixed evaluation set: noise + prompts
        self._eval_idx = torch.arange(cfg.num_eval) % len(self.data)
        self._eval_noise = torch.randn((cfg.num_eval, *self.latent_shape), generator=g)

    def _pooled_text(self, data: Any) -> Any:
        """The data's pooled text vectors go to every network call of a student that takes them (FLUX, SD3,
        HunyuanVideo: ``distill.data.takes_pooled``) and must then be there, of its width; other students get none."""
        from distill.data import takes_pooled

        if not takes_pooled(self.student):
            if data.text_pooled is not None:
                data = copy.copy(data)
                data.text_pooled = None
            return data
        want = self.student.family.cfg("pooled_projection_dim") or self.student.null_pooled.shape[-1]
        got = None if data.text_pooled is None else data.text_pooled.shape[-1]
        if got != int(want):
            raise ConfigError(
                f"{type(self.student.family).__name__} networks take {want}-d pooled text, but the data's captions "
                f"have "
                f"{'none' if got is None else f'{got}-d'}: encode them with the pipeline's own encoders (build the "
                "data cache with text_encoder = the pipeline directory, which gives lrm.text.PipelineText)")
        return data

    def _build_networks(self, init: Denoiser, teacher: Denoiser | None, needs_teacher: bool) -> None:
        """Student (a copy of ``init``, or a LoRA adapter on one frozen base), the frozen teacher."""
        cfg = self.config
        kind = init.parameterization if cfg.parameterization == "homogeneous" else "x0"
        self.lora = None
        self._init = init
        if teacher is not None:
            teacher = teacher.to(self.device).eval().requires_grad_(False)
        if cfg.lora_rank > 0:  # the base: the teacher's network (it is the init) or a copy of the init
            from distill.lora import lora_base, role

            self._base = teacher if init is teacher else self._copy(init, init.parameterization)
            self.lora = lora_base(cfg, self._base.model)
            self.student = role(self._base, self.lora.add("student"), kind)
            if teacher is init or (teacher is None and needs_teacher):
                teacher = role(self._base, self.lora.view(None)).eval()
        else:
            self.student = self._copy(init, kind)
            if teacher is None and needs_teacher:
                teacher = self.frozen_init()
        self.student = self.student.requires_grad_(True).train()
        self.teacher = teacher
        if cfg.gradient_checkpointing:
            self.enable_checkpointing(self.student)

    def _copy(self, init: Denoiser, kind: str) -> Denoiser:
        """A copy of ``init`` on the device with parameterisation ``kind`` (copy, then move: the caller's init stays
        where it is; it may be large and kept on the CPU)."""
        null = (init.null_tokens.detach().cpu(), init.null_mask.detach().cpu())
        d = Denoiser(copy.deepcopy(init.model).to(self.device), init.schedule, kind, cfg_null=null,
                     use_text_mask=init.use_text_mask, distilled_guidance=init.distilled_guidance,
                     cfg_null_pooled=None if init.null_pooled is None else init.null_pooled.detach().cpu())
        d.flow_shift = getattr(init, "flow_shift", None)
        return d.to(self.device)

    # ---- networks the terms ask for ----------------------------------------------------------------------
    def enable_checkpointing(self, d: Denoiser) -> None:
        """``distill.checkpointing``: diffusers' switch, else block-wise (UNet3D); LoRA views recompute under their
        adapter."""
        if hasattr(d.model, "_lora"):
            d.model.enable_gradient_checkpointing()
            return
        from distill.checkpointing import enable_gradient_checkpointing

        try:
            enable_gradient_checkpointing(d.model)
        except ValueError as e:  # a home-made network without blocks: the direct term still checkpoints calls
            self.logger.warning("%s", e)

    def frozen_init(self) -> Denoiser:
        """The frozen initial student (KL's pi_ref, the teacher when none is given): a copy of ``init``, or with
        LoRA the base with every adapter off."""
        if self.lora is not None:
            from distill.lora import role

            return role(self._base, self.lora.view(None)).eval()
        return self._copy(self._init, self._init.parameterization).eval().requires_grad_(False)

    def trainable_copy(self, name: str) -> Denoiser:
        """A trainable copy of the teacher (the fake score): a full copy, or with LoRA (shared base) the adapter
        ``name`` on it."""
        if self.lora is not None and self.teacher.model is not None and hasattr(self.teacher.model, "_lora"):
            from distill.lora import role

            net = role(self.teacher, self.lora.add(name), self.teacher.parameterization)
        else:
            net = copy.deepcopy(self.teacher)
        net = net.requires_grad_(True).train()
        if self.config.gradient_checkpointing:
            self.enable_checkpointing(net)
        return net

    def ema_target(self, decay: float) -> EMA:
        """The CD target theta^-: an EMA copy of the student (LoRA: the "ema" adapter, initialised from it)."""
        shadow = None
        if self.lora is not None:
            from distill.lora import role

            shadow = role(self._base, self.lora.add("ema", trainable=False, init_from="student"),
                          self.student.parameterization)
        return EMA(self.student, decay, shadow=shadow)

    def update_ema(self, target: EMA) -> None:
        if self.fsdp:  # the EMA pairs up shards: both networks sharded, none left gathered by a forward
            fsdp_util.reshard(target.shadow.model)
            fsdp_util.reshard(self.student.model)
        target.update(self.unwrap_denoiser(self.student))

    def prepare_ddp(self, model: nn.Module) -> nn.Module:
        """DDP: wrap a trained network of a term (FSDP: it was sharded before its optimizer was made)."""
        if self.accelerator.num_processes > 1 and not self.fsdp:
            return self.accelerator.prepare_model(model)
        return model

    def term(self, name: str) -> ObjectiveTerm | None:
        return next((t for t in self.terms if t.name == name), None)

    # the networks and optimizers tests and benchmarks look at, by their usual names
    def _attr(self, names: tuple[str, ...], attr: str) -> Any:
        for n in names:
            t = self.term(n)
            if t is not None and getattr(t, attr, None) is not None:
                return getattr(t, attr)
        return None

    fake = property(lambda self: self._attr(("vsd", "tdm"), "fake"))
    opt_f = property(lambda self: self._attr(("vsd", "tdm"), "opt"))
    target = property(lambda self: self._attr(("cd",), "target"))
    disc = property(lambda self: self._attr(("gan",), "disc"))
    opt_d = property(lambda self: self._attr(("gan",), "opt"))
    lrm = property(lambda self: self._attr(("ft",), "lrm"))
    ref = property(lambda self: self._attr(("kl",), "ref"))
    tracker = property(lambda self: self._attr(("ddpo",), "tracker"))
    opt_g = property(lambda self: self.opt)
    pool = property(lambda self: self.data)

    # ---- small helpers ---------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def autocast(self):
        if self.config.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def _latent_shape(self) -> tuple[int, ...]:
        """The data latents' shape; without data latents (a prompt file) the VAE's latents of ``image_size``
        pixels (default: the model's ``sample_size`` x the VAE's factor), ``num_frames`` frames for video."""
        if self.data.latents is not None:
            return tuple(self.data.latents.shape[1:])
        cfg, video = self.config, self.student.is_video
        ss = getattr(self.student.model.config, "sample_size", None)
        ss = ss[0] if isinstance(ss, (list, tuple)) else ss
        if getattr(self.vae, "latent_space", None) is None:  # no VAE to ask: the network's own square sample size
            C = int(self.student.model.config.in_channels)
            return (cfg.num_frames, C, int(ss), int(ss)) if video else (C, int(ss), int(ss))
        size = getattr(cfg, "image_size", None) or (int(ss) * self.vae.downsample if ss else None)
        if size is None:
            raise ConfigError(f"{type(self.student.model).__name__} has no sample_size in its config and the prompts "
                              "come without data latents: set image_size (pixels of the samples)")
        try:
            return tuple(self.vae.latent_space.latent_shape(size, size, cfg.num_frames if video else None))
        except ValueError as e:  # a size / frame count the VAE cannot take: the rule and the nearest valid values
            raise ConfigError(f"image_size / num_frames: {e}") from None

    def _unwrap(self, m: nn.Module) -> nn.Module:
        if isinstance(m, nn.parallel.DistributedDataParallel):
            return m.module
        return m if self.fsdp else self.accelerator.unwrap_model(m)

    def unwrap_denoiser(self, d: Denoiser) -> Denoiser:
        if self.accelerator.num_processes == 1 or self.fsdp:
            return d
        return with_model(d, self._unwrap(d.model))  # plain module: matches the EMA copy's names

    def no_sync(self, model: nn.Module, last: bool):
        """Gradient accumulation: no gradient communication before the last micro-batch."""
        if self.fsdp:
            fsdp_util.set_gradient_sync(model, last)
            return nullcontext()
        if self.accelerator.num_processes == 1:
            return nullcontext()
        return nullcontext() if last else self.accelerator.no_sync(model)

    def clip(self, model: nn.Module, max_norm: float | None = None) -> torch.Tensor:
        """Clip the gradients of ``model`` to ``max_norm`` (default the config's; 0: measure only); the norm."""
        max_norm = self.config.max_grad_norm if max_norm is None else max_norm
        params = model.parameters()
        if self.fsdp:
            return fsdp_util.full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf))
        if max_norm > 0 and self.accelerator.num_processes > 1:
            return self.accelerator.clip_grad_norm_(params, max_norm)
        return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))

    def _set_lr(self) -> float:
        cfg = self.config
        scale = min(1.0, (self.step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
        for g in self.opt.param_groups:
            g["lr"] = cfg.student_lr * scale
        for t in self.terms:
            t.set_lr(scale)
        return cfg.student_lr * scale

    def sample_batch(self, n: int | None = None) -> Any:
        idx = torch.randint(len(self.data), (self.config.batch_size if n is None else n,))
        return self.data.batch(idx)

    def noise(self, n: int) -> torch.Tensor:
        return torch.randn((n, *self.latent_shape), device=self.device)

    def student_x0(self, x_t: torch.Tensor, t: torch.Tensor, text_tokens: torch.Tensor,
                   text_mask: torch.Tensor | None, pooled: torch.Tensor | None = None) -> torch.Tensor:
        """The student's consistency function f_theta(x_t, t) (fp32 output; equals the raw x0 prediction at the
        student's timesteps >= 249 up to 1e-6). ``pooled``: the captions' pooled text (FLUX / SD3 / HunyuanVideo)."""
        with self.autocast():
            x0 = self.student.x0(x_t, t, text_tokens, text_mask, **pooled_kw(pooled))
        return consistency_output(x_t, x0.float(), t, self.config.sigma_data, self.config.timestep_scaling)

    def graded_input(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """DMD2 backward simulation: noise -> the input of the graded student step (a random step of k)."""
        noise = self.noise(batch.text_tokens.shape[0])
        k = 0
        if len(self.timesteps) > 1 and self.fsdp:  # k student calls are collectives: every rank draws the same k
            self._draws += 1
            g = torch.Generator().manual_seed((self.config.seed * 1_000_003 + self.step) * 1009 + self._draws)
            k = int(torch.randint(len(self.timesteps), (1,), generator=g))
        elif len(self.timesteps) > 1:
            k = int(torch.randint(len(self.timesteps), (1,)))
        state = k_step_sample(lambda x, t: self.student_x0(x, t, batch.text_tokens, batch.text_mask,
                                                           **pooled_kw(batch.text_pooled)), noise,
                              self.timesteps, self.schedule, grad_steps=0, stop_at=k)
        return state.x_t, state.t

    @torch.no_grad()
    def generate(self, batch: Any) -> torch.Tensor:
        """Student samples for ``batch``'s captions as the fake score sees them (backward simulation)."""
        x, t = self.graded_input(batch)
        return self.student_x0(x, t, batch.text_tokens, batch.text_mask, **pooled_kw(batch.text_pooled))

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor | None,
               generator: torch.Generator | None = None, pooled: torch.Tensor | None = None) -> torch.Tensor:
        """k-step student sampling from ``noise`` (x0 latents), as deployed."""
        was = self.student.training
        self.student.eval()
        x0 = k_step_sample(lambda x, t: self.student_x0(x, t, text_tokens, text_mask, **pooled_kw(pooled)),
                           noise.to(self.device),
                           self.timesteps, self.schedule, generator=generator).x0
        self.student.train(was)
        return x0

    # ---- the student update ------------------------------------------------------------------------------
    def objective(self, ctx: StepContext) -> tuple[torch.Tensor, dict[str, Any]]:
        """sum_i w_i L_i on one micro-batch: the graded state, every term's ``prepare``, ONE graded student call
        (x_hat and the terms' queries), then the terms' losses."""
        terms = [t for t in self.terms if not t.driver]
        if any(t.needs_x_hat for t in terms):
            ctx.x_k, ctx.t_k = self.graded_input(ctx.batch)
            ctx.query("x_hat", ctx.x_k, ctx.t_k)
        for t in terms:
            t.prepare(ctx)
        if ctx.queries:
            xs, ts = zip(*ctx.queries.values())
            n, tok, mask = len(xs), ctx.tok, ctx.mask
            pooled = ctx.batch.text_pooled
            f = self.student_x0(torch.cat(xs), torch.cat(ts), tok.repeat(n, *[1] * (tok.dim() - 1)),
                                mask.repeat(n, 1), **pooled_kw(None if pooled is None else pooled.repeat(n, 1)))
            ctx.outputs = dict(zip(ctx.queries, f.split(tok.shape[0])))
            ctx.x_hat = ctx.outputs.get("x_hat")
        loss = torch.zeros((), device=self.device)
        logs: dict[str, Any] = {}
        for t in terms:
            l_t, lg = t.generator_loss(ctx)
            if l_t is not None:
                loss = loss + t.weight * l_t
            logs.update(lg)
        logs["loss"] = float(loss.detach())
        return loss, logs

    def optimizer_step(self, what: str = "generator loss / gradient") -> float:
        """Clip, the non-finite guard, the student's optimizer step, the terms' ``after_generator_step``."""
        gn = self.clip(self.student.model)
        ok = self.guard.check(gn, what, self.step + 1)
        if ok:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if ok:
            for t in self.terms:
                t.after_generator_step(self)
            self.optimizer_steps += 1
        return float(gn)

    def generator_step(self) -> dict[str, Any]:
        """One optimizer step of the student on sum_i w_i L_i over ``grad_accum`` micro-batches."""
        cfg, acc = self.config, self.accelerator
        self._set_lr()
        self.student.train()
        self.opt.zero_grad(set_to_none=True)
        sums: dict[str, Any] = {}
        self.last = []
        for micro in range(cfg.grad_accum):
            ctx = StepContext(self, self.sample_batch())
            with self.no_sync(self.student.model, micro == cfg.grad_accum - 1):
                loss, logs = self.objective(ctx)
                acc.backward(loss / cfg.grad_accum)  # a non-finite loss gives a non-finite norm on every rank
            self.last.append(ctx.release())
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v / cfg.grad_accum
        sums["grad_norm"] = self.optimizer_step("generator loss / gradient (lower the learning rate, or "
                                                "vsd_grad_dtype=float64 / bf16=false)")
        sums["samples"] = cfg.batch_size * cfg.grad_accum
        return sums

    def train_step(self) -> dict[str, Any]:
        """The student update (a driver term's, else ``generator_step``), every term's own update, timed."""
        cfg = self.config
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        _sync(self.device)
        t0 = time.perf_counter()
        self._draws = 0
        row = self.driver.run(self) if self.driver is not None else self.generator_step()
        for t in self.terms:
            row.update(t.update(self))
        _sync(self.device)
        dt = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(self.device) / 2 ** 20 if self.device.type == "cuda" else 0.0
        self.gpu_seconds += dt
        self.peak_mem_mb = max(self.peak_mem_mb, peak)
        if (cfg.log_gold_train and self.gold_reward is not None and "gold_reward" not in row and self.last
                and self.last[-1].x_hat is not None):  # monitoring only, outside the timed region
            ctx = self.last[-1]
            row["gold_reward"] = float(self.gold(ctx.x_hat, ctx.batch.prompts).mean())
        self.step += 1
        row.update(step=self.step, method=cfg.method_name, step_time_s=dt, gpu_seconds=self.gpu_seconds,
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

    # ---- the eval hook -----------------------------------------------------------------------------------
    @torch.no_grad()
    def gold(self, latents: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Gold reward of latents: pixel reward of the clamped decoding, float32 (B,) on CPU."""
        pixels = self.vae.decode(latents.float(), clamp=True)
        return self.gold_reward(pixels, prompts).float().cpu()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean gold reward of the k-step sampler on the fixed evaluation set (same noise, same prompts)."""
        out = []
        g = torch.Generator().manual_seed(self.config.seed + 777)
        n = self.config.eval_batch_size
        for s in range(0, self.config.num_eval, n):
            b = self.data.batch(self._eval_idx[s:s + n])
            x0 = self.sample(self._eval_noise[s:s + n], b.text_tokens, b.text_mask, generator=g,
                             **pooled_kw(b.text_pooled))
            out.append(self.gold(x0, b.prompts))
        return float(torch.cat(out).mean())

    def _try_evaluate(self) -> float | None:
        """``evaluate()`` (None without a gold reward); a failure (e.g. out of memory at a large num_eval) is
        logged, not raised: training and its checkpoints never depend on an evaluation."""
        if self.gold_reward is None or self.vae is None:
            return None
        try:
            return self.evaluate()
        except (RuntimeError, ValueError) as e:  # torch.OutOfMemoryError is a RuntimeError
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.logger.error("evaluation at step %d failed, training goes on: %s: %s (lower eval_batch_size / "
                              "vae_chunk_size, or set vae_bf16)", self.step, type(e).__name__, str(e).splitlines()[0])
            return None

    # ---- checkpoints ------------------------------------------------------------------------------------
    def _state(self) -> tuple[dict[str, nn.Module], dict[str, torch.optim.Optimizer]]:
        modules: dict[str, nn.Module] = {"student": self._unwrap(self.student.model)}
        optims: dict[str, torch.optim.Optimizer] = {"student": self.opt}
        for t in self.terms:
            modules.update({k: self._unwrap(m) for k, m in t.modules().items()})
            optims.update(t.optimizers())
        return modules, optims

    def _sharded(self) -> dict[str, nn.Module]:
        """The FSDP-sharded networks by checkpoint name."""
        nets = {"student": self.student.model}
        for t in self.terms:
            nets.update(t.sharded())
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
        """Main process: models, optimizers, step, counters, the terms' state, its RNG (``state.*``); every other
        rank adds its own torch RNG state as ``rng_rank{i}.safetensors`` so a resumed DDP run continues each rank's
        random stream."""
        from lrm.io import save_tensors

        acc = self.accelerator
        acc.wait_for_everyone()
        path = None
        modules, optims = self._state()
        if self.fsdp:  # collectives on every rank: the full tensors land on rank 0
            modules, optims = self._fsdp_full(modules, optims)
        if acc.is_main_process:
            extra = {"config": dataclasses.asdict(self.config), "num_processes": acc.num_processes,
                     "terms": {t.name: t.state_dict() for t in self.terms}, "gpu_seconds": self.gpu_seconds,
                     "optimizer_steps": self.optimizer_steps, "peak_mem_mb": self.peak_mem_mb}
            path = save_training_state(self.checkpoint_dir, self.step, modules=modules, optimizers=optims,
                                       extra=extra)
        if acc.num_processes > 1:
            acc.wait_for_everyone()  # the new checkpoint directory is in place
            if not acc.is_main_process:
                save_tensors(self._rng_path(self.checkpoint_dir), self._rng_state())
            acc.wait_for_everyone()
        return path

    def load_checkpoint(self, directory: str | Path | None = None) -> int:
        """Restore models, optimizers, step, counters, the terms' state and RNG; returns the step.

        Rank 0 gets the RNG of ``state.safetensors``; rank i > 0 its ``rng_rank{i}.safetensors``, or (checkpoint
        from another number of processes) a fresh seed from step and rank."""
        from lrm.io import load_tensors

        modules, optims = self._state()
        if self.fsdp:
            nets = self._sharded()
            optims = {k: fsdp_util.ShardedOptimLoad(nets[k], o) if k in nets else o for k, o in optims.items()}
            modules = {k: fsdp_util.ShardedLoad(m) if k in nets else m for k, m in modules.items()}
        directory = Path(directory or self.checkpoint_dir)
        st = load_training_state(directory, modules=modules, optimizers=optims, map_location=self.device)
        ex = st["extra"]
        for t in self.terms:
            t.load_state_dict(ex.get("terms", {}).get(t.name, {}))
        self.gpu_seconds = float(ex.get("gpu_seconds", 0.0))
        self.optimizer_steps = int(ex.get("optimizer_steps", 0))
        self.peak_mem_mb = float(ex.get("peak_mem_mb", 0.0))
        if self.config.eval_every_gpu_s:
            self._evals_by_time = int(self.gpu_seconds // self.config.eval_every_gpu_s)
        acc = self.accelerator
        if acc.num_processes > 1 and not acc.is_main_process:  # each process continues its own stream
            found = find_checkpoint(directory)
            rng = self._rng_path(found) if found is not None else None
            if rng is not None and rng.is_file() and ex.get("num_processes") == acc.num_processes:
                t = load_tensors(rng)
                torch.set_rng_state(t["torch"])
                if "cuda" in t and self.device.type == "cuda":
                    torch.cuda.set_rng_state(t["cuda"], self.device)
            else:
                seed_everything(self.config.seed + acc.process_index + 1000003 * st["step"])
        self.step = int(st["step"])
        return self.step

    # ---- samples and the student export -------------------------------------------------------------------
    @torch.no_grad()
    def save_samples(self, tag: str | None = None) -> Path | None:
        """Grid of student samples (decoded with the VAE) for the first prompts; fixed noise per run."""
        cfg = self.config
        if self.vae is None or not (self.is_main or self.fsdp):  # FSDP: every rank samples
            return None
        P, S = min(cfg.num_sample_prompts, len(self.data)), cfg.samples_per_prompt
        batch = self.data.batch(torch.arange(P).repeat_interleave(S))
        g = torch.Generator().manual_seed(cfg.seed)
        noise = torch.randn((P * S, *self.latent_shape), generator=g)
        n = cfg.eval_batch_size
        pooled = batch.text_pooled
        x0 = torch.cat([self.sample(noise[s:s + n], batch.text_tokens[s:s + n], batch.text_mask[s:s + n],
                                    generator=g, **pooled_kw(None if pooled is None else pooled[s:s + n]))
                        for s in range(0, P * S, n)])
        if not self.is_main:
            return None
        return self.write_grid(self.vae.decode(x0.float()).cpu(), tag, S)

    def save_student(self, directory: str | Path | None = None) -> Path:
        """The student as a Denoiser directory (or LoRA adapter) + ``student.json`` (timesteps, boundary
        scalings, the objective's terms and weights)."""
        directory = Path(directory or Path(self.config.run_dir) / "student")
        student = self.unwrap_denoiser(self.student)
        if self.fsdp:  # gather (every rank) into the unsharded copy the main process keeps
            full = fsdp_util.full_state(self.student.model).state_dict()
            if self.is_main:
                self._plain_student.load_state_dict(full)
                student = with_model(self.student, self._plain_student)
        if self.is_main:
            self.export_student(student, directory, {"objective": {t.name: t.weight for t in self.terms},
                                                     **self.export_meta})
        return directory

    # ---- run directory, logs, grids, export --------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.config.run_dir) / "checkpoint"

    @property
    def _csv_path(self) -> Path:
        return Path(self.config.run_dir) / "log.csv"

    def _start_run(self, inputs: dict[str, Any], mutable: tuple[str, ...], logger_name: str,
                   barrier: Callable[[], None] = lambda: None) -> bool:
        """``--overwrite``; the resume check against run.json (before anything is written); config.yaml + run.json;
        the checkpoint (unless this trainer is already past step 0 in memory); log.csv. Returns whether it resumed."""
        cfg = self.config
        if cfg.overwrite and self.is_main:
            clear_checkpoints(cfg.run_dir, self.checkpoint_dir)
        barrier()
        on_disk = self.step == 0 and cfg.resume and find_checkpoint(self.checkpoint_dir) is not None
        if on_disk:  # every rank: all raise alike
            check_resume(cfg.run_dir, cfg, inputs, mutable)
        if self.is_main:
            prepare_run_dir(cfg.run_dir, cfg, logger_name=logger_name)
            record_run(cfg.run_dir, cfg, inputs)
        resumed = self.step > 0
        if on_disk:
            self.load_checkpoint()
            resumed = True
            self.logger.info("resumed from %s at step %d", self.checkpoint_dir, self.step)
        self._open_logs(resumed)
        return resumed

    def _open_logs(self, resumed: bool) -> None:
        """log.csv: a resumed run keeps its rows up to the checkpoint's step (later ones were not saved)."""
        if not self.is_main:
            return
        rows = []
        if resumed and self._csv_path.exists():
            with open(self._csv_path) as fh:
                rows = [r for r in csv.DictReader(fh) if r.get("step") and int(r["step"]) <= self.step]
        self._csv_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._csv_path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=LOG_COLUMNS)
            w.writeheader()
            w.writerows(rows)
        if self.config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(self.config.run_dir) / "tb"))
            except ImportError:
                self._tb = None

    def _log_row(self, row: dict[str, Any]) -> None:
        if not self.is_main:
            return
        with open(self._csv_path, "a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=LOG_COLUMNS).writerow({k: row.get(k, "") for k in LOG_COLUMNS})
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{self.config.command}/{k}", v, row["step"])

    def write_grid(self, pixels: torch.Tensor, tag: str | None, per_row: int) -> Path:
        """run_dir/samples/<tag or step_N>.png (+ .gif for videos): ``pixels`` (N, 3, H, W) or (N, T, 3, H, W)."""
        from shapes.grid import save_gif, save_grid, save_video_strip

        out = Path(self.config.run_dir) / "samples"
        name = tag or f"step_{self.step:06d}"
        if pixels.dim() == 5:
            save_gif(pixels, out / f"{name}.gif", nrow=per_row)
            return save_video_strip(pixels, out / f"{name}.png")
        return save_grid(pixels, out / f"{name}.png", nrow=per_row, scale=2)

    def export_student(self, student: Any, directory: str | Path | None, meta: dict[str, Any]) -> Path:
        """``student`` (a Denoiser) as a Denoiser directory (fp16 with ``student_fp16``) + ``student.json``
        (timesteps, parameterisation, boundary scalings, step, and ``meta``).

        LoRA (``lora_rank > 0``): the student adapter as ``pytorch_lora_weights.safetensors`` in diffusers' LoRA
        format (``pipeline.load_lora_weights(directory)`` on the teacher's pipeline loads it: the base weights stay
        the teacher's / init's and are not written); ``merge_lora: true`` writes the fused full Denoiser instead."""
        from distill.lora import AdapterView
        from lrm.io import write_json

        cfg = self.config
        directory = Path(directory or Path(cfg.run_dir) / "student")
        lora = None
        if isinstance(student.model, AdapterView):
            view = student.model
            if cfg.merge_lora:
                merged = copy.copy(student)
                merged._modules = dict(student._modules)
                merged._modules["model"] = view._lora.merged(view.adapter)
                merged.save_pretrained(directory, fp16=cfg.student_fp16)
            else:
                directory.mkdir(parents=True, exist_ok=True)
                view._lora.save_diffusers(view.adapter, directory, fp16=cfg.student_fp16)
                lora = {"format": "diffusers", "weights": "pytorch_lora_weights.safetensors", "rank": cfg.lora_rank,
                        "alpha": cfg.lora_alpha or cfg.lora_rank, "target_modules": list(cfg.lora_target_modules),
                        "base": "the teacher's network (lrm distill) / the init's (lrm finetune); not written here",
                        "base_path": str(cfg.teacher),
                        "denoiser": student.describe()}
        else:
            student.save_pretrained(directory, fp16=cfg.student_fp16)
        write_json(directory / "student.json", {
            "timesteps": self.timesteps, "parameterization": student.parameterization, "step": self.step,
            "consistency_function": {"sigma_data": cfg.sigma_data, "timestep_scaling": cfg.timestep_scaling},
            **({"lora": lora} if lora else {}), **meta})
        return directory

    # ---- the loop ---------------------------------------------------------------------------------------
    def _log_eval(self, r: float | None, always: bool = False) -> None:
        if r is not None or always:
            row = {"step": self.step, "method": self.config.method_name, "gpu_seconds": self.gpu_seconds,
                   "optimizer_steps": self.optimizer_steps}
            if r is not None:
                row["eval_gold_reward"] = r
            self._log_row(row)
            self.history.append(row)

    def train(self, steps: int | None = None) -> list[dict[str, Any]]:
        """Run (or resume) until ``steps`` (default ``config.steps``) trainer steps or ``max_gpu_seconds``;
        returns the history."""
        from tqdm.auto import tqdm

        cfg, acc = self.config, self.accelerator
        total = steps if steps is not None else cfg.steps
        resumed = self._start_run(self.inputs, cfg.mutable_keys, f"lrm.{cfg.command}",
                                  barrier=acc.wait_for_everyone if acc.num_processes > 1 else lambda: None)
        eff = cfg.batch_size * cfg.grad_accum * acc.num_processes
        self.logger.info(
            "%s: %d steps x effective batch %d (%d per process x %d accum x %d processes); student %d-step %s (%s); "
            "objective %s; run dir %s", cfg.command, total, eff, cfg.batch_size, cfg.grad_accum, acc.num_processes,
            len(self.timesteps), self.timesteps, cfg.parameterization,
            " + ".join(f"{t.weight:g} {t.name}" for t in self.terms), cfg.run_dir)
        if not resumed:
            self._log_eval(self._try_evaluate(), always=self.gold_reward is not None)
        bar = tqdm(total=total, initial=self.step, desc=f"{cfg.command}[{cfg.method_name}]",
                   disable=not (cfg.progress and self.is_main))
        while self.step < total:
            if cfg.max_gpu_seconds is not None and self.gpu_seconds >= cfg.max_gpu_seconds:
                self.logger.info("stopping at step %d: %.1f device-seconds >= max_gpu_seconds %.1f", self.step,
                                 self.gpu_seconds, cfg.max_gpu_seconds)
                break
            row = self.train_step()
            self._log_row(row)
            bar.update(1)
            bar.set_postfix({k: f"{row[k]:.4g}" for k in ("loss", "gold_reward", "proxy_reward") if k in row})
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
            self._log_eval(self._try_evaluate())
        if cfg.sample_every == 0 or self.step % cfg.sample_every != 0:
            try:
                self.save_samples()
            except (RuntimeError, ValueError) as e:
                self.logger.error("sample grid at step %d failed: %s: %s", self.step, type(e).__name__,
                                  str(e).splitlines()[0])
        if self._tb is not None:
            self._tb.flush()
        return self.history

    def close(self) -> None:
        for t in self.terms:
            t.close()


__all__ = ["GeneratorTrainer", "LOG_COLUMNS", "make_accelerator", "with_model"]
