"""latent_rewards: latent reward models (LRMs) — head registry, training, metrics, checkpoints.

    from latent_rewards import create_lrm, list_lrms, fit, LatentData, LatentReward
    head = create_lrm("image-cnn", in_channels=4, patch=2)
    result = fit(LatentData(latents, target, prompts=prompts), head="image-cnn", steps=2000, out_dir="runs/lrm")
    lrm = LatentReward.from_pretrained("runs/lrm")   # differentiable, reward units
"""

from latent_rewards.data import LatentData, split_by_prompt
from latent_rewards.heads import ConvLRM, EnsembleLRM, LRMInputError
from latent_rewards.metrics import calibration_plot, regression_metrics, ridge_baseline
from latent_rewards.pretrained import LatentReward, TextEncoderMismatchError
from latent_rewards.registry import create_lrm, describe_lrm, list_lrms, register_lrm
from latent_rewards.train import FitConfig, FitResult, evaluate, fit
from lrm.schedules import DDPMSchedule

__all__ = [
    "ConvLRM", "DDPMSchedule", "EnsembleLRM", "FitConfig", "FitResult", "LRMInputError", "LatentData", "LatentReward",
    "TextEncoderMismatchError", "calibration_plot", "create_lrm", "describe_lrm", "evaluate", "fit", "list_lrms",
    "regression_metrics", "register_lrm", "ridge_baseline", "split_by_prompt",
]
