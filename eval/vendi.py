"""Vendi score and DOLLAR's keyframe diversity (supp. Eq. 27).

Vendi (Friedman & Dieng 2023): VS(x_1..x_n) = exp(-sum_i lambda_i log lambda_i), lambda = eigenvalues of
K / n for a similarity kernel K with K_ii = 1. It is 1 when all samples are identical and n when they
are mutually orthogonal ("effective number of distinct samples").
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

Features = Callable[[torch.Tensor], torch.Tensor]


def vendi_from_kernel(K: torch.Tensor | np.ndarray) -> float:
    """Vendi score of an ``(n, n)`` symmetric PSD similarity matrix with unit diagonal."""
    K = torch.as_tensor(K, dtype=torch.float64)
    if K.dim() != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(f"kernel must be a square (n, n) matrix, got shape {tuple(K.shape)}")
    n = K.shape[0]
    if n == 0:
        raise ValueError("kernel is empty: Vendi needs at least one sample")
    diag = torch.diagonal(K)
    if not torch.allclose(diag, torch.ones_like(diag), atol=1e-5):
        raise ValueError(
            f"kernel diagonal must be 1 (a normalised similarity), got values in [{float(diag.min()):.4g}, "
            f"{float(diag.max()):.4g}]; normalise features to unit norm before K = X X^T"
        )
    lam = torch.linalg.eigvalsh((K + K.T) / 2 / n).clamp_min(0.0)  # (n,) eigenvalues of K/n, sum to 1
    lam = lam[lam > 1e-12]
    return float(torch.exp(-(lam * lam.log()).sum()))


def _features(x: torch.Tensor | np.ndarray, features: Features | None) -> torch.Tensor:
    x = torch.as_tensor(x)
    if features is not None:
        with torch.no_grad():
            x = features(x)
    return x.reshape(x.shape[0], -1).to(torch.float64)  # (n, D)


def vendi_score(x: torch.Tensor | np.ndarray, features: Features | None = None) -> float:
    """Vendi score of ``n`` samples ``x`` (``(n, ...)``) under the cosine kernel on their features.

    Args:
        x: ``(n, ...)`` samples (e.g. pixels ``(n, 3, H, W)`` in [0, 1]).
        features: ``None`` for raw (flattened) values, or a callable ``(n, ...) -> (n, D)`` embedding
            (e.g. a frozen image encoder).
    """
    f = _features(x, features)
    norms = f.norm(dim=1, keepdim=True)
    if (norms == 0).any():
        bad = int((norms.squeeze(1) == 0).nonzero()[0])
        raise ValueError(f"sample {bad} has an all-zero feature vector; the cosine kernel is undefined for it")
    f = f / norms
    return vendi_from_kernel(f @ f.T)  # cosine kernel, K_ii = 1


def keyframe_indices(num_frames: int, stride: int = 20) -> list[int]:
    """Frames 0, stride, 2*stride, ... (DOLLAR: every 20th frame). A 16-frame video has one keyframe."""
    if stride < 1:
        raise ValueError(f"keyframe stride must be >= 1, got {stride}")
    return list(range(0, num_frames, stride))


def keyframe_diversity(samples: torch.Tensor | np.ndarray, stride: int = 20, features: Features | None = None) -> float:
    """Diversity of ``n`` samples for ONE prompt (DOLLAR Eq. 27 inner part).

    Videos ``(n, T, 3, H, W)``: mean over keyframes k of Vendi([f_1^k ... f_n^k]). Images ``(n, 3, H, W)``:
    plain Vendi over the n images.
    """
    x = torch.as_tensor(samples)
    if x.dim() == 5:
        idx = keyframe_indices(x.shape[1], stride)
        return float(np.mean([vendi_score(x[:, k], features) for k in idx]))
    if x.dim() == 4:
        return vendi_score(x, features)
    raise ValueError(f"samples must be (n, 3, H, W) images or (n, T, 3, H, W) videos, got shape {tuple(x.shape)}")


def prompt_diversity(samples_by_prompt: list[torch.Tensor] | dict, stride: int = 20,
                     features: Features | None = None) -> float:
    """DOLLAR Eq. 27: keyframe diversity per prompt, averaged over prompts."""
    groups = list(samples_by_prompt.values()) if isinstance(samples_by_prompt, dict) else list(samples_by_prompt)
    if not groups:
        raise ValueError("no prompts given")
    return float(np.mean([keyframe_diversity(g, stride, features) for g in groups]))
