"""Fit an LRM to cached rewards (DOLLAR Eq. 10): MSE on standardised targets, optional Bradley-Terry ranking loss.

0. refuse what cannot be learnt from, before anything runs: fewer than ``MIN_RECORDS`` records with a finite
   reward, non-finite latents, latents the head cannot take (``check_trainable``); bad settings fail in
   ``FitConfig.__post_init__``;
1. split by prompt (no prompt in both train and val); standardise the target with train mean/std;
2. AdamW, linear warm-up then cosine decay; random mini-batches drawn from device-resident tensors;
   noise-aware heads see x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with t ~ U[0, noise_max_t];
3. every ``eval_every`` steps: validation Spearman (clean latents); keep the best weights; stop early after
   ``patience`` evaluations without improvement; resumable from ``out_dir/checkpoint``;
4. final metrics in reward units beside a ridge baseline on the same split; calibration PNG; save_pretrained.
"""

from __future__ import annotations

import csv
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from latent_rewards.data import LatentData, split_by_prompt
from latent_rewards.heads.base import LRMInputError, member_outputs
from latent_rewards.metrics import calibration_plot, regression_metrics, ridge_baseline, spearman
from latent_rewards.pretrained import LatentReward
from latent_rewards.registry import create_lrm, list_lrms
from lrm.config import ConfigError, config_to_dict, opt
from lrm.run import get_logger, resolve_device, seed_everything
from lrm.schedules import DDPMSchedule

log = get_logger("lrm.latent_rewards")


@dataclass
class FitConfig:
    """Hyper-parameters of ``fit`` (also the ``lrm train`` config, with the data fields)."""

    head: str = opt("image-cnn", "registered head name (lrm lrms list)")
    head_kwargs: dict = opt({}, "constructor overrides of the head, e.g. {width: 64, patch: 2, timestep_cond: true}")
    ensemble: int = opt(1, "number of independently initialised members (>1: ensemble)")
    ensemble_reduce: str = opt("mean", "ensemble output: mean | std | lcb (mean - lambda * std)")
    ensemble_lambda: float = opt(1.0, "lambda of the lcb ensemble output")
    steps: int = opt(3000, "maximum optimizer steps")
    batch_size: int = opt(256, "samples per optimizer step (per process)")
    lr: float = opt(1e-3, "peak AdamW learning rate")
    weight_decay: float = opt(1e-2, "AdamW weight decay")
    warmup_steps: int = opt(100, "linear warm-up, in optimizer steps")
    min_lr_ratio: float = opt(0.05, "cosine decays to lr * min_lr_ratio at the last step")
    grad_clip: float = opt(1.0, "max gradient norm (0 = off)")
    loss: Literal["mse", "mse+rank", "rank"] = opt("mse", "mse (Eq. 10), rank (pairwise Bradley-Terry) or both")
    rank_weight: float = opt(1.0, "weight of the ranking loss in mse+rank")
    val_fraction: float = opt(0.1, "fraction of samples (whole prompts) held out for validation")
    seed: int = opt(0, "seed of the split, the init and the batches")
    eval_every: int = opt(200, "validate every N optimizer steps")
    patience: int = opt(5, "stop after N validations without a better Spearman (0 = never stop early)")
    noise_max_t: int = opt(999, "noise-aware heads: train on t ~ U[0, noise_max_t]")
    clean_fraction: float = opt(0.25, "noise-aware heads: fraction of each batch kept clean (t = 0)")
    num_train_timesteps: int = opt(1000, "DDPM schedule length T")
    beta_start: float = opt(0.00085, "DDPM beta_1 (SD: 0.00085)")
    beta_end: float = opt(0.012, "DDPM beta_T (SD: 0.012)")
    beta_schedule: str = opt("scaled_linear", "scaled_linear (SD) or linear")
    mixed_precision: Literal["auto", "no", "bf16"] = opt("auto", "auto: bf16 autocast on CUDA, fp32 on CPU")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    checkpoint_every: int = opt(1000, "save a resumable checkpoint every N steps (needs out_dir; 0 = off)")
    resume: bool = opt(True, "resume from out_dir/checkpoint when it exists")
    progress: bool = opt(True, "show a tqdm progress bar")

    def __post_init__(self):
        if self.head not in list_lrms():
            raise ConfigError(f"unknown head {self.head!r}; available: {', '.join(list_lrms())}")
        for k in ("steps", "batch_size", "eval_every", "ensemble", "num_train_timesteps"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k} must be >= 1, got {getattr(self, k)}")
        for k in ("warmup_steps", "patience", "checkpoint_every"):
            if getattr(self, k) < 0:
                raise ConfigError(f"{k} must be >= 0 (0 = off), got {getattr(self, k)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a positive learning rate (the AdamW peak, e.g. 1e-3), got {self.lr}")
        for k in ("weight_decay", "grad_clip", "rank_weight"):
            v = getattr(self, k)
            if not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"{k} must be >= 0, got {v}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1] (the final lr as a fraction of lr), got "
                              f"{self.min_lr_ratio}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in (0, 1) (the fraction of samples held out for validation, e.g. "
                              f"0.1), got {self.val_fraction}")
        if not 0 <= self.clean_fraction <= 1:
            raise ConfigError(f"clean_fraction must be in [0, 1], got {self.clean_fraction}")
        if not 0 <= self.noise_max_t < self.num_train_timesteps:
            raise ConfigError(f"noise_max_t must be in [0, {self.num_train_timesteps - 1}], got {self.noise_max_t}")
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise ConfigError(f"need 0 < beta_start <= beta_end < 1, got beta_start={self.beta_start}, "
                              f"beta_end={self.beta_end} (SD: 0.00085, 0.012)")
        if self.beta_schedule not in ("scaled_linear", "linear"):
            raise ConfigError(f"beta_schedule must be scaled_linear or linear, got {self.beta_schedule!r}")
        if self.ensemble_reduce not in ("mean", "std", "lcb"):
            raise ConfigError(f"ensemble_reduce must be mean, std or lcb, got {self.ensemble_reduce!r}")
        if not math.isfinite(self.ensemble_lambda):
            raise ConfigError(f"ensemble_lambda must be a finite number, got {self.ensemble_lambda}")
        if self.loss not in ("mse", "mse+rank", "rank"):
            raise ConfigError(f"loss must be mse, mse+rank or rank, got {self.loss!r}")
        if self.mixed_precision not in ("auto", "no", "bf16"):
            raise ConfigError(f"mixed_precision must be auto, no or bf16, got {self.mixed_precision!r}")
        if not isinstance(self.head_kwargs, dict):
            raise ConfigError(f"head_kwargs must be a mapping of head options, e.g. {{width: 64, patch: 2}}, got "
                              f"{self.head_kwargs!r}")
        with torch.device("meta"):  # unknown / bad head options fail here, before any data is read (no memory used)
            create_lrm(self.head, ensemble=self.ensemble, ensemble_reduce=self.ensemble_reduce,
                       ensemble_lambda=self.ensemble_lambda, **self.head_kwargs)
        resolve_device(self.device, check_available=False)  # the form only: the config may be written elsewhere


# The smallest data fit accepts: a split of 2 training records and 3 validation records (a Spearman needs 3).
MIN_RECORDS = 5


def check_trainable(config: FitConfig, latent_shape: tuple[int, ...], num_records: int, reward_name: str,
                    num_total: int | None = None) -> None:
    """Refuse, before anything runs or is written, data that ``fit`` cannot learn from: fewer than ``MIN_RECORDS``
    records with a finite reward (``num_records`` of ``num_total``), or latents of shape ``latent_shape`` (one
    sample: ``(C, h, w)`` / ``(T, C, h, w)``) that the configured head cannot take (form, channels, a size its
    patch does not divide). The head is built on the meta device (no memory, no random numbers)."""
    if num_records < MIN_RECORDS:
        why = ""
        if num_total is not None and num_total > num_records:
            why = f" ({num_total - num_records} of {num_total} records have no finite value of it)"
        raise LRMInputError(
            f"need at least {MIN_RECORDS} records with a finite {reward_name!r} reward to fit an LRM "
            f"({MIN_RECORDS - 3} to train, 3 to validate), got {num_records}{why}. Use a larger cache (lrm cache build "
            "--source.num_samples N; hundreds of records or more for a useful LRM), or add the reward where it "
            "failed")
    kwargs = dict(config.head_kwargs)
    kwargs.setdefault("in_channels", int(latent_shape[-3]))
    with torch.device("meta"):
        head = create_lrm(config.head, ensemble=config.ensemble, ensemble_reduce=config.ensemble_reduce,
                          ensemble_lambda=config.ensemble_lambda, **kwargs)
    check = getattr(head, "check_latents", None)
    if check is not None:
        try:
            check((1, *latent_shape))
        except LRMInputError as e:
            raise LRMInputError(f"head {config.head!r} with head_kwargs {config.head_kwargs} cannot take the "
                                f"{reward_name!r} data's latents of shape {tuple(latent_shape)}: {e}") from None


@dataclass
class FitResult:
    lrm: LatentReward
    metrics: dict[str, float]  # held-out, reward units
    baseline_metrics: dict[str, float]
    history: list[dict[str, Any]]
    train_idx: np.ndarray
    val_idx: np.ndarray
    best_step: int
    train_time_s: float
    val_pred: np.ndarray
    baseline_pred: np.ndarray


def train_val_split(data: LatentData, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The split ``fit`` uses: the cache's own ``split_by_prompt`` when ``data`` is a whole cache, else ours."""
    cache = getattr(data, "_cache", None)
    if cache is not None and len(data) == len(cache):
        tr, va = cache.split_by_prompt(val_fraction=val_fraction, seed=seed)
    else:
        tr, va = split_by_prompt(data.prompts, len(data), val_fraction, seed)
    return np.asarray(tr, dtype=np.int64), np.asarray(va, dtype=np.int64)


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1 then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p))


def bradley_terry_loss(scores: torch.Tensor, target: torch.Tensor, generator: torch.Generator | None = None):
    """Pairwise ranking loss -log sigmoid(s_i - s_j) for pairs with y_i > y_j (i, j = batch and a permutation).

    scores: (K, B) member outputs; target: (B,).
    """
    perm = torch.randperm(target.shape[0], device=target.device, generator=generator)
    dy = target - target[perm]  # (B,)
    keep = dy != 0
    if not keep.any():
        return scores.sum() * 0.0
    ds = (scores - scores[:, perm])[:, keep] * torch.sign(dy[keep])  # (K, P)
    return F.softplus(-ds).mean()


def _device_generator(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


@torch.no_grad()
def predict_standardised(model, data: LatentData, idx: torch.Tensor, batch_size: int, amp: bool) -> torch.Tensor:
    """Mean member output (standardised units) on clean latents, (len(idx),) float32 CPU."""
    was = model.training
    model.eval()
    outs = []
    for i in range(0, len(idx), batch_size):
        b = idx[i:i + batch_size]
        with torch.autocast(data.latents.device.type, dtype=torch.bfloat16, enabled=amp):
            o = member_outputs(model, data.latents[b], None if data.text_tokens is None else data.text_tokens[b],
                               None if data.text_mask is None else data.text_mask[b])
        outs.append(o.float().mean(0).cpu())
    model.train(was)
    return torch.cat(outs)


def fit(data: LatentData | Any, config: FitConfig | None = None, reward_name: str | None = None,
        out_dir: str | Path | None = None, noise_schedule: DDPMSchedule | None = None, **overrides) -> FitResult:
    """Train an LRM on ``data`` (a ``LatentData``, or a ``data_cache.LatentCache`` plus ``reward_name``).

    ``overrides`` replace fields of ``config`` (``fit(data, steps=500, head="text-image-cnn")``).
    ``noise_schedule``: the schedule noise-aware heads are trained on (default: from the config's beta fields);
    pass the fine-tuned model's own (``DDPMSchedule(alphas_cumprod=...)``) to match it exactly.
    With ``out_dir`` the LRM is saved there (``save_pretrained``) with ``metrics.json``, ``train_log.csv``,
    ``calibration.png`` and a resumable ``checkpoint/``.
    """
    import dataclasses

    config = dataclasses.replace(config or FitConfig(), **overrides)
    if not isinstance(data, LatentData):
        if reward_name is None:
            raise ValueError("fit on a cache needs reward_name= (one of cache.reward_names)")
        data = LatentData.from_cache(data, reward_name)
    n_bad = int((~torch.isfinite(data.target)).sum())
    if n_bad:
        raise LRMInputError(f"the target of {n_bad} of {len(data)} records is NaN or inf (a reward that failed on "
                            "them); drop those rows (data.subset(torch.isfinite(data.target).nonzero().flatten())) "
                            "or read the cache with LatentData.from_cache(..., drop_missing=True)")
    cache = getattr(data, "_cache", None)  # from_cache: the records before those without a finite reward were dropped
    check_trainable(config, tuple(data.latents.shape[1:]), len(data), data.reward_name,
                    num_total=None if cache is None else len(cache))
    for name in ("latents", "text_tokens"):
        v = getattr(data, name)
        bad = 0 if v is None else sum(  # once per fit, in chunks: bounded memory on a large cache
            int((~torch.isfinite(v[i:i + 4096]).flatten(1).all(1)).sum()) for i in range(0, len(v), 4096))
        if bad:
            raise LRMInputError(f"the {name} of {bad} of {len(data)} records hold NaN or inf; an LRM fit on them "
                                "would learn NaN weights. Rebuild those records (a failed VAE or text encode) or drop "
                                "them (data.subset)")
    seed_everything(config.seed)
    device = resolve_device(config.device)
    accelerator = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # `accelerate launch` / torchrun: DDP, one process per device
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=device.type == "cpu")
        if accelerator.num_processes == 1:
            raise RuntimeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but accelerate found one process; launch with "
                               "`accelerate launch` or `torchrun`")
        device = accelerator.device
    amp = config.mixed_precision == "bf16" or (config.mixed_precision == "auto" and device.type == "cuda")
    out_dir = Path(out_dir) if out_dir is not None else None

    # 1. split by prompt and standardise
    try:
        tr, va = train_val_split(data, config.val_fraction, config.seed)
    except ValueError as e:  # one prompt only: no split by prompt
        raise LRMInputError(f"{e}. fit validates on held-out prompts, so the data needs at least 2 distinct prompts "
                            "(for data without meaningful prompts, pass a LatentData with prompts=None: a random "
                            "split)") from None
    if len(tr) < 2 or len(va) < 3:
        raise LRMInputError(f"the split by prompt gave {len(tr)} train / {len(va)} validation records of "
                            f"{len(data)}; fit needs at least 2 / 3. Use more records or prompts, or change "
                            f"val_fraction (now {config.val_fraction})")
    y_tr = data.target[torch.as_tensor(tr)]
    mu, sigma = float(y_tr.mean()), float(y_tr.std())
    if not sigma > 0:
        raise LRMInputError(f"reward {data.reward_name!r} is constant on the training split ({mu}); nothing to "
                            "learn. Check the reward on these samples (lrm cache stats) or use more varied data")

    # 2. model, data on device, optimizer
    head_kwargs = dict(config.head_kwargs)
    head_kwargs.setdefault("in_channels", int(data.latents.shape[-3]))
    if data.has_text:
        head_kwargs.setdefault("text_dim", int(data.text_tokens.shape[-1]))
    model = create_lrm(config.head, ensemble=config.ensemble, ensemble_reduce=config.ensemble_reduce,
                       ensemble_lambda=config.ensemble_lambda, **head_kwargs)
    if getattr(model, "needs_text", False) and not data.has_text:
        raise LRMInputError(f"head {config.head!r} is text-conditioned but the data has no text embeddings "
                            f"(reward {data.reward_name!r} modality {data.reward_info.get('modality')}); use a "
                            "head without text or a text-* reward")
    if not getattr(model, "needs_text", False) and data.has_text:
        data = dataclasses.replace(data, text_tokens=None, text_mask=None, text_pooled=None)
    lrm_config = model.lrm_config
    model = model.to(device)
    ddata = LatentData(latents=data.latents.to(device), target=((data.target - mu) / sigma).to(device),
                       text_tokens=None if data.text_tokens is None else data.text_tokens.to(device),
                       text_mask=None if data.text_mask is None else data.text_mask.to(device),
                       text_pooled=torch.zeros(len(data), 1, device=device) if data.has_text else None)
    tr_t, va_t = torch.as_tensor(tr, device=device), torch.as_tensor(va, device=device)
    opt_ = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt_, lambda s: lr_lambda(s, config.warmup_steps, config.steps, config.min_lr_ratio))
    schedule = noise_schedule or DDPMSchedule(config.num_train_timesteps, config.beta_schedule,
                                              config.beta_start, config.beta_end)
    if schedule.num_train_timesteps <= config.noise_max_t:
        raise ConfigError(f"noise_max_t={config.noise_max_t} is outside the schedule's {schedule.num_train_timesteps} "
                          "timesteps; lower noise_max_t")
    noise_aware = bool(getattr(model, "timestep_cond", False))

    if accelerator is not None:
        model, opt_ = accelerator.prepare(model, opt_)
    rank = 0 if accelerator is None else accelerator.process_index
    is_main = rank == 0
    gen = _device_generator(device, config.seed * 1000 + rank + 1)

    start_step, best = 0, {"spearman": -float("inf"), "step": 0, "bad_evals": 0}
    history: list[dict[str, Any]] = []
    raw = model if accelerator is None else accelerator.unwrap_model(model)
    best_state = {k: v.detach().clone() for k, v in raw.state_dict().items()}
    ckpt_dir = out_dir / "checkpoint" if out_dir is not None else None
    if ckpt_dir is not None and config.resume:
        from lrm.checkpoint import find_checkpoint, load_training_state

        if find_checkpoint(ckpt_dir) is not None:
            st = load_training_state(ckpt_dir, modules={"model": raw}, optimizers={"opt": opt_},
                                     schedulers={"sched": sched}, map_location=device)
            start_step = st["step"]
            best = st["extra"]["best"]
            history = st["extra"]["history"]
            from lrm.io import load_tensors

            best_state = {k: v.to(device) for k, v in load_tensors(ckpt_dir.parent / "best.safetensors").items()}
            gen.set_state(torch.tensor(st["extra"]["generator_state"], dtype=torch.uint8))
            log.info("resumed from %s at step %d (best val Spearman %.4f)", ckpt_dir, start_step, best["spearman"])

    n_params = sum(p.numel() for p in raw.parameters())
    log.info("LRM %s (%s params) on %s | reward %r | train %d / val %d (split by prompt) | steps %d x batch %d%s%s",
             config.head, f"{n_params:,}", device, data.reward_name, len(tr), len(va), config.steps,
             config.batch_size, " | bf16" if amp else "", " | noise-aware" if noise_aware else "")
    log_rows = history
    t0 = time.perf_counter()
    stopped = False
    model.train()
    step = start_step
    pbar = tqdm(total=config.steps, initial=start_step, desc=f"fit {config.head}", disable=not (config.progress
                                                                                                 and is_main))
    loss_acc, n_acc = 0.0, 0
    while step < config.steps and not stopped:
        # one optimizer step on a random mini-batch drawn on the device
        b = tr_t[torch.randint(0, len(tr_t), (config.batch_size,), device=device, generator=gen)]
        x = ddata.latents[b]
        y = ddata.target[b]
        t = None
        if noise_aware:
            t = torch.randint(0, config.noise_max_t + 1, (len(b),), device=device, generator=gen)
            t = torch.where(torch.rand(len(b), device=device, generator=gen) < config.clean_fraction,
                            torch.zeros_like(t), t)
            noise = torch.randn(x.shape, device=device, generator=gen, dtype=x.dtype)
            x = schedule.add_noise(x, noise, t, check=False)  # t <= noise_max_t < T: no range check (sync)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = member_outputs(model, x, None if ddata.text_tokens is None else ddata.text_tokens[b],
                                 None if ddata.text_mask is None else ddata.text_mask[b], t)  # (K, B)
        out = out.float()
        loss = out.new_zeros(())
        if config.loss in ("mse", "mse+rank"):
            loss = loss + F.mse_loss(out, y.expand_as(out))  # Eq. 10 on standardised targets
        if config.loss in ("rank", "mse+rank"):
            loss = loss + (config.rank_weight if config.loss == "mse+rank" else 1.0) * bradley_terry_loss(out, y, gen)
        opt_.zero_grad(set_to_none=True)
        if accelerator is not None:
            accelerator.backward(loss)
        else:
            loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt_.step()
        sched.step()
        step += 1
        loss_acc = loss_acc + loss.detach()  # stays on the device: no sync per step
        n_acc += 1
        pbar.update(1)

        if step % config.eval_every == 0 or step == config.steps:
            vp = predict_standardised(raw, ddata, va_t, 4096, amp)
            sp = spearman(vp, ddata.target[va_t].float().cpu())
            elapsed = time.perf_counter() - t0
            row = {"step": step, "train_loss": float(loss_acc) / max(1, n_acc), "lr": sched.get_last_lr()[0],
                   "val_spearman": sp, "val_mse_std": float(((vp - ddata.target[va_t].cpu()) ** 2).mean()),
                   "elapsed_s": elapsed, "samples_per_s": (step - start_step) * config.batch_size / max(elapsed, 1e-9)}
            log_rows.append(row)
            loss_acc, n_acc = 0.0, 0
            pbar.set_postfix(val_spearman=f"{sp:.4f}", loss=f"{row['train_loss']:.4f}")
            if sp > best["spearman"] + 1e-4:
                best = {"spearman": sp, "step": step, "bad_evals": 0}
                best_state = {k: v.detach().clone() for k, v in raw.state_dict().items()}
                if out_dir is not None and is_main:
                    from lrm.io import save_tensors

                    save_tensors(out_dir / "best.safetensors", best_state)
            else:
                best["bad_evals"] += 1
                if config.patience and best["bad_evals"] >= config.patience:
                    log.info("early stop at step %d: no better val Spearman for %d evals (best %.4f at %d)", step,
                             config.patience, best["spearman"], best["step"])
                    stopped = True
            if accelerator is not None:  # every rank must stop at the same step
                flag = accelerator.reduce(torch.tensor([float(stopped)], device=device), reduction="sum")
                stopped = bool(flag.item() > 0)
            if out_dir is not None and is_main:
                _write_log(out_dir / "train_log.csv", log_rows)
        if (ckpt_dir is not None and is_main and config.checkpoint_every and step % config.checkpoint_every == 0
                and step < config.steps and not stopped):
            from lrm.checkpoint import save_training_state
            from lrm.io import save_tensors

            save_tensors(out_dir / "best.safetensors", best_state)
            save_training_state(ckpt_dir, step, modules={"model": raw}, optimizers={"opt": opt_},
                                schedulers={"sched": sched}, extra={"best": best, "history": log_rows,
                                       "generator_state": gen.get_state().tolist()})
    pbar.close()
    train_time = time.perf_counter() - t0

    # 4. best weights, metrics in reward units, ridge baseline on the same split
    raw.load_state_dict(best_state)
    raw.eval()
    raw.lrm_config = lrm_config
    vp = predict_standardised(raw, ddata, va_t, 4096, amp).numpy() * sigma + mu
    y_va = data.target[torch.as_tensor(va, device=data.target.device)].detach().cpu().numpy()
    metrics = regression_metrics(vp, y_va)
    bp, binfo = ridge_baseline(data.latents[torch.as_tensor(tr)], data.target[torch.as_tensor(tr)],
                               data.latents[torch.as_tensor(va)],
                               None if not data.has_text else data.text_pooled[torch.as_tensor(tr)],
                               None if not data.has_text else data.text_pooled[torch.as_tensor(va)])
    baseline = {**regression_metrics(bp, y_va), **binfo}
    log.info("held-out: LRM Spearman %.4f R2 %.4f | ridge baseline Spearman %.4f R2 %.4f | %.1fs",
             metrics["spearman"], metrics["r2"], baseline["spearman"], baseline["r2"], train_time)
    metadata = {
        "reward": {"name": data.reward_name, "version": data.reward_info.get("version"),
                   "modality": data.reward_info.get("modality", getattr(raw, "modality", None))},
        "latent_space": data.latent_space,
        "text_encoder": data.text_encoder if getattr(raw, "needs_text", False) else None,
        "target_normalization": {"mean": mu, "std": sigma},
        "training_data": {**data.summary(), "num_train": int(len(tr)), "num_val": int(len(va)),
                          "split": "by prompt" if data.prompts is not None else "random"},
        "training": {**config_to_dict(config), "best_step": best["step"], "steps_run": step,
                     "train_time_s": train_time, "num_parameters": n_params},
        "noise_schedule": schedule.to_dict(with_alphas_cumprod=True) if noise_aware else None,
        "metrics": {"val": metrics, "ridge_baseline": baseline},
    }
    lrm = LatentReward(raw.cpu(), metadata)
    if out_dir is not None and is_main:
        lrm.save_pretrained(out_dir)
        from lrm.io import write_json

        write_json(out_dir / "metrics.json", {"reward": data.reward_name, "head": config.head, "val": metrics,
                                              "ridge_baseline": baseline, "best_step": best["step"],
                                              "train_time_s": train_time})
        calibration_plot(vp, y_va, out_dir / "calibration.png", title=f"LRM {config.head} vs {data.reward_name}",
                         units=data.reward_name, baseline=bp)
    return FitResult(lrm=lrm, metrics=metrics, baseline_metrics=baseline, history=log_rows, train_idx=tr,
                     val_idx=va, best_step=best["step"], train_time_s=train_time, val_pred=vp, baseline_pred=bp)


def _write_log(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def evaluate(lrm: LatentReward, data: LatentData, out_dir: str | Path | None = None,
             indices: np.ndarray | None = None, batch_size: int = 1024,
             baseline_train_indices: np.ndarray | None = None) -> dict[str, Any]:
    """Metrics of a trained LRM on ``data`` (all rows, or ``indices``), in reward units, beside the ridge baseline;
    writes eval_metrics.json + eval_calibration.png to ``out_dir``. Checks the data's latent space and text
    encoder first.

    The ridge baseline is refit on ``baseline_train_indices`` (rows of ``data``: the LRM's training split) and
    scored on the same rows as the LRM. Without them the training data is not at hand, so the baseline's metrics
    are copied from the checkpoint (``metadata["metrics"]["ridge_baseline"]``: its training run's held-out split,
    not these rows); ``ridge_baseline["source"]`` says which.
    """
    lrm.check_inputs(latent_space=data.latent_space, text_encoder=data.text_encoder if lrm.needs_text else None)
    if data.reward_name != lrm.reward_name:
        log.warning("evaluating LRM for %r on reward %r", lrm.reward_name, data.reward_name)
    full = data
    if indices is not None:
        data = data.subset(indices)
    if len(data) < 3:  # Spearman and R² need 3
        which, fix = ("the data holds", "a larger cache")
        if indices is not None:
            which, fix = ("the held-out split holds", "all records (--split all) or a larger cache")
        raise LRMInputError(f"need at least 3 records with a finite {data.reward_name!r} reward to evaluate an LRM, "
                            f"{which} {len(data)}. Evaluate on {fix}")
    pred = lrm.predict(data.latents, data.text_tokens if lrm.needs_text else None,
                       data.text_mask if lrm.needs_text else None, batch_size=batch_size).detach().cpu().numpy()
    y = data.target.detach().cpu().numpy()  # the data may sit on the LRM's GPU (lrm evaluate moves it there)
    metrics = regression_metrics(pred, y)
    baseline_pred = None
    if baseline_train_indices is not None:
        tr = torch.as_tensor(np.asarray(baseline_train_indices), dtype=torch.long)
        text = full.has_text  # as in fit: pooled text joins the features of text-conditioned rewards
        baseline_pred, info = ridge_baseline(full.latents[tr.to(full.latents.device)],
                                             full.target[tr.to(full.target.device)], data.latents,
                                             full.text_pooled[tr.to(full.text_pooled.device)] if text else None,
                                             data.text_pooled if text else None)
        baseline = {**regression_metrics(baseline_pred, y), **info, "num_train": int(len(tr)),
                    "source": "refit on the training split, scored on the same rows as the LRM"}
    else:
        stored = lrm.metadata.get("metrics", {}).get("ridge_baseline")
        baseline = None if stored is None else {
            **stored, "source": "checkpoint metadata (the training run's held-out split, not these rows)"}
        if baseline is None:
            log.warning("no ridge baseline: the training data is not given and the checkpoint records none")
    res = {"reward": data.reward_name, "lrm_reward": lrm.reward_name, "num_samples": len(y),
           "metrics": metrics, "ridge_baseline": baseline}
    if baseline is not None:
        log.info("LRM Spearman %.4f R2 %.4f | ridge baseline (%s) Spearman %.4f R2 %.4f", metrics["spearman"],
                 metrics["r2"], "refit" if baseline_pred is not None else "from checkpoint", baseline["spearman"],
                 baseline["r2"])
    if out_dir is not None:
        from lrm.io import write_json

        out_dir = Path(out_dir)
        write_json(out_dir / "eval_metrics.json", res)
        title = f"LRM vs {data.reward_name}"
        if baseline is not None:
            title += f"; ridge Spearman {baseline['spearman']:.3f}"
        calibration_plot(pred, y, out_dir / "eval_calibration.png", title=title, units=data.reward_name,
                         baseline=baseline_pred, baseline_metrics=None if baseline_pred is not None else baseline)
    return res
