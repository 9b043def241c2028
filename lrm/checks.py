"""Input checks shared by every package: clear errors for the common ways pixels go wrong."""

from __future__ import annotations

import torch


def check_pixels(x: torch.Tensor, name: str = "pixels", allow_video: bool = True, allow_image: bool = True) -> None:
    """Pixels must be float ``(B, 3, H, W)`` or ``(B, T, 3, H, W)`` in [0, 1] with no NaN/inf."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{name} must be a float tensor in [0, 1], got dtype {x.dtype}; convert uint8 with x.float() / 255."
        )
    ranks = ([4] if allow_image else []) + ([5] if allow_video else [])
    if x.dim() not in ranks:
        want = " or ".join({4: "(B, 3, H, W)", 5: "(B, T, 3, H, W)"}[r] for r in ranks)
        raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
    if x.shape[-3] != 3:
        if x.shape[-1] == 3:
            raise ValueError(
                f"{name} looks channels-last {tuple(x.shape)}; expected channels-first. "
                "Use x.permute(0, 3, 1, 2) for images or x.permute(0, 1, 4, 2, 3) for videos."
            )
        raise ValueError(f"{name} must have 3 (RGB) channels at dim -3, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(x.shape)}")
    with torch.no_grad():
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} contains NaN or inf values")
        lo, hi = float(x.min()), float(x.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        hint = " It looks like [0, 255]: divide by 255." if hi > 2 else (
            " It looks like [-1, 1]: use (x + 1) / 2." if lo < -0.01 else "")
        raise ValueError(f"{name} must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}].{hint}")


def check_prompts(prompts, batch_size: int, required: bool, name: str = "prompts") -> list[str] | None:
    if prompts is None:
        if required:
            raise ValueError(f"{name} are required for this text-conditioned reward: pass a list of {batch_size} "
                             "strings")
        return None
    if isinstance(prompts, str):
        raise TypeError(f"{name} must be a list of strings, not one string")
    prompts = list(prompts)
    if len(prompts) != batch_size:
        raise ValueError(f"got {len(prompts)} {name} for a batch of {batch_size}")
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"{name} must all be strings")
    return prompts
