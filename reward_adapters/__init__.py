"""One batched interface for black-box pixel rewards: ``create_reward(name, **options)``.

A reward is called as ``reward(pixels, prompts=None) -> float32 (B,)`` with pixels in [0, 1],
``(B, 3, H, W)`` or ``(B, T, 3, H, W)``; ``reward.ddpo(images, prompts, metadata)`` is the DDPO-style call.
"""

from reward_adapters.base import (
    CompositeReward,
    NumpyReward,
    Reward,
    create_reward,
    describe_reward,
    list_rewards,
    register_reward,
    select_frames,
)

__all__ = ["Reward", "NumpyReward", "CompositeReward", "create_reward", "list_rewards", "register_reward",
           "describe_reward", "select_frames"]
