"""LRM head families; importing this package registers every head."""

from latent_rewards.heads import image, text_image, text_video, video  # noqa: F401
from latent_rewards.heads.base import ConvLRM, EnsembleLRM, LRMInputError, member_outputs

__all__ = ["ConvLRM", "EnsembleLRM", "LRMInputError", "member_outputs"]
