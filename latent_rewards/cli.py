"""``lrm train`` / ``lrm evaluate`` / ``lrm lrms list``: a thin layer over ``latent_rewards``'s Python API."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from latent_rewards.train import FitConfig
from lrm.cli import add_command, add_config_command
from lrm.config import ConfigError, opt


@dataclass
class TrainConfig(FitConfig):
    """``lrm train``: fit an LRM on one reward of a latent cache."""

    cache_dir: str = opt("", "latent cache directory (lrm cache build)")
    reward: str = opt("", "reward name in the cache to imitate (see lrm cache stats)")
    out_dir: str = opt("runs/lrm", "LRM directory: config.json, model.safetensors, metadata.json, metrics, logs")
    overwrite: bool = opt(False, "start over in out_dir: delete its checkpoint first (a resume must otherwise repeat "
                                 "the run's settings and cache)")

    def __post_init__(self):
        super().__post_init__()
        if not self.cache_dir:
            raise ConfigError("cache_dir is required: --cache_dir DIR (a cache built by `lrm cache build`)")
        if not self.reward:
            raise ConfigError("reward is required: --reward NAME (one of the cache's rewards)")


@dataclass
class EvaluateConfig:
    """``lrm evaluate``: metrics of a trained LRM on a cache."""

    lrm_dir: str = opt("", "trained LRM directory (lrm train --out_dir)")
    cache_dir: str = opt("", "latent cache directory")
    reward: str = opt("", "reward column to compare with (default: the reward the LRM imitates)")
    split: Literal["all", "val"] = opt("all", "all records, or the held-out split of training (same prompts/seed; "
                                              "only meaningful on the training cache)")
    out_dir: str = opt("", "where to write eval_metrics.json + eval_calibration.png (default: LRM_DIR/eval)")
    batch_size: int = opt(1024, "latents per forward pass")
    device: str = opt("auto", "auto | cpu | cuda")

    def __post_init__(self):
        if not self.lrm_dir or not self.cache_dir:
            raise ConfigError("lrm_dir and cache_dir are required: --lrm_dir DIR --cache_dir DIR")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1 (latents per forward pass), got {self.batch_size}")
        from lrm.run import resolve_device

        resolve_device(self.device, check_available=False)


def _train(cfg: TrainConfig) -> None:
    import dataclasses

    import numpy as np

    from data_cache import LatentCache
    from latent_rewards.train import check_trainable, fit
    from lrm.checkpoint import find_checkpoint
    from lrm.registry import UnknownNameError
    from lrm.run import check_resume, clear_checkpoints, prepare_run_dir, record_run, resolve_device

    # Everything that can be checked is checked before out_dir is touched (--overwrite included): the cache, that
    # a resume continues the same run, the reward, the device, the usable records, the head against the latents.
    cache = LatentCache.open(cfg.cache_dir)
    inputs = {"cache_latent_space": cache.latent_space.vae_hash, "cache_records": len(cache),
              "cache_text_encoder": dict(cache.text_encoder)}
    ckpt = Path(cfg.out_dir) / "checkpoint"
    if not cfg.overwrite and cfg.resume and find_checkpoint(ckpt) is not None:
        check_resume(cfg.out_dir, cfg, inputs, ("steps", "resume", "overwrite", "progress", "eval_every",
                                                "checkpoint_every", "device"))
    if cfg.reward not in cache.reward_names:
        raise UnknownNameError(f"reward {cfg.reward!r} is not in the cache {cfg.cache_dir}; it holds "
                               f"{list(cache.reward_names)}. Pick one of those or add it (lrm cache add-reward)")
    resolve_device(cfg.device)
    finite = int(np.isfinite(np.asarray(cache.rewards(cfg.reward), dtype=np.float64)).sum())
    check_trainable(cfg, tuple(cache.latent_shape), finite, cfg.reward, num_total=len(cache))
    if cfg.overwrite:
        clear_checkpoints(cfg.out_dir, ckpt)
    out = prepare_run_dir(cfg.out_dir, cfg, logger_name="lrm.latent_rewards")
    record_run(out, cfg, inputs)
    fit_cfg = FitConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(FitConfig)})
    res = fit(cache, fit_cfg, reward_name=cfg.reward, out_dir=out)
    print(json.dumps({"out_dir": str(out), "val": res.metrics, "ridge_baseline": res.baseline_metrics}, indent=2))


def _is_training_data(lrm, data) -> bool:
    """Whether ``data`` is the data the LRM was trained on (same cache directory, same number of records)."""
    td = lrm.metadata.get("training_data", {})
    src, here = str(td.get("source", "")), str(data.source)
    if not (src.startswith("cache:") and here.startswith("cache:")) or td.get("num_samples") != len(data):
        return False
    return Path(src[len("cache:"):]).resolve() == Path(here[len("cache:"):]).resolve()


def _evaluate(cfg: EvaluateConfig) -> None:
    from data_cache import LatentCache
    from latent_rewards.data import LatentData
    from latent_rewards.pretrained import LatentReward
    from latent_rewards.train import evaluate, train_val_split
    from lrm.run import resolve_device

    lrm = LatentReward.from_pretrained(cfg.lrm_dir, device=resolve_device(cfg.device))
    cache = LatentCache.open(cfg.cache_dir)
    data = LatentData.from_cache(cache, cfg.reward or lrm.reward_name)
    # The ridge baseline is refit on the LRM's training split whenever that split can be rebuilt from this data
    # (split=val, or the training cache itself); otherwise evaluate() copies the checkpoint's baseline metrics.
    idx = train_idx = None
    if cfg.split == "val" or _is_training_data(lrm, data):
        tr_cfg = lrm.metadata.get("training", {})
        train_idx, val_idx = train_val_split(data, tr_cfg.get("val_fraction", 0.1), tr_cfg.get("seed", 0))
        idx = val_idx if cfg.split == "val" else None
    data = data.to(lrm.target_mean.device)
    res = evaluate(lrm, data, out_dir=cfg.out_dir or Path(cfg.lrm_dir) / "eval", indices=idx,
                   batch_size=cfg.batch_size, baseline_train_indices=train_idx)
    print(json.dumps(res, indent=2))


def _list(ns: argparse.Namespace) -> None:
    from latent_rewards.registry import describe_lrm, list_lrms

    for name in list_lrms(ns.pattern):
        print(f"{name:24s} {describe_lrm(name)}")


def register(sub: argparse._SubParsersAction) -> None:
    add_config_command(sub, "train", TrainConfig, _train, "train a latent reward model on a cached reward")
    add_config_command(sub, "evaluate", EvaluateConfig, _evaluate,
                       "evaluate a trained LRM on a cache (metrics JSON + calibration PNG)")
    p = sub.add_parser("lrms", help="latent reward model heads", description="latent reward model heads")
    s = p.add_subparsers(dest="lrms_command", metavar="SUBCOMMAND")
    add_command(s, "list", _list, "list registered LRM heads",
                args=lambda a: a.add_argument("pattern", nargs="?", default="*", help="glob, e.g. 'text-*'"))
