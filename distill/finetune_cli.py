"""``lrm finetune --method {lrm,ddpo,direct} --config configs/finetune_shapes_image.yaml [--key value ...]``."""

from __future__ import annotations

from typing import Any


def _run(cfg: Any) -> Any:
    from distill.finetune import run_finetune

    return run_finetune(cfg)


def register(subparsers: Any) -> None:
    from distill.finetune import FinetuneConfig
    from lrm.cli import add_config_command

    # `--method` is the config field `method` (any field can be overridden as --key value).
    add_config_command(subparsers, "finetune", FinetuneConfig, _run,
                       help="reward fine-tuning of a k-step student: --method lrm (latent reward, DOLLAR Eq. 11), "
                            "ddpo (DDPO_SF / PPO on the pixel reward) or direct (reward gradient through the decoder)")
