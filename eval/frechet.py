"""Fréchet distance between two sample sets (FID's formula) and a fixed, download-free feature extractor for Shapes
videos; the real reference is rendered by ``shapes.ShapesWorld``.

    FD = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))        (Dowson & Landau 1982; Heusel et al. 2017)

with (mu, S) the mean and unbiased covariance of each feature set. The numerics follow pytorch-fid's
``calculate_frechet_distance`` (also clean-fid's ``frechet_distance``): float64, ``scipy.linalg.sqrtm`` of the product,
``eps * I`` added to both covariances when the product is singular (non-finite root), the real part kept when the
imaginary part is round-off (|Im| <= 1e-3 on the diagonal), else an error.

Feature extractor (``shapes_video_features``): the shipped Shapes VAE encoder (``VAE.shapes()``, deterministic: the
posterior mean), no download and nothing trained on generated samples, so it is fixed across runs and rows. Per video,
from the latents z (T, 4, h, w):
  layout   2x2 average-pooled latents, mean over frames           (16)  what and where: colour, shape, position
  detail   per-channel spatial std of z, mean over frames         (4)   contrast / sharpness (blur lowers it)
  motion   2x2-pooled net change, last frame - first frame        (16)  direction (mass moving between quadrants)
  speed    per-channel sum over t of the spatial mean |z_t+1 - z_t| (4) path length: speed and flicker
All four in latent units, not rescaled: on 16-frame real Shapes videos their per-dimension spreads are alike (std
0.33, 0.26, 0.22, 0.86), so no block dominates the distance; motion over fewer frames is smaller, as it should be.
40 dimensions: small enough that a few hundred samples fit a full-rank covariance (Inception's 2048 needs >= 2048),
which matters at bench sizes. Images (or T = 1) get the first 20. The statistic is biased in the number of samples, as
FID is: compare distances only at equal sample counts.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

FEATURE_DIM = {"image": 20, "video": 40}


def gaussian_stats(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` (``np.cov(rowvar=False)``, as pytorch-fid) of ``(N, D)``."""
    f = np.asarray(torch.as_tensor(features).detach().cpu().double() if isinstance(features, torch.Tensor)
                   else features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError("features hold NaN or inf: a generator produced non-finite samples")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2); pytorch-fid's numerics (module docstring)."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shapes do not match: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():  # singular product (pytorch-fid: "fid calculation produces singular product")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag)):.3g} in sqrtm(S1 S2): the "
                             "covariances are not positive semi-definite; check the features")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def frechet_from_features(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Fréchet distance between Gaussians fit to two ``(N, D)`` feature sets."""
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


def bootstrap_frechet(real: torch.Tensor | np.ndarray, gen: torch.Tensor | np.ndarray, n: int = 200,
                      seed: int = 0) -> list[float]:
    """Fréchet distances of ``n`` bootstrap resamples (real and generated sets each resampled with replacement).

    The resample indices depend only on ``(seed, len(real), len(gen))``: rows of one table scored against the same
    real features share them, so replicate i of two rows is a paired comparison (``paired_interval``)."""
    real, gen = np.asarray(torch.as_tensor(real).double()), np.asarray(torch.as_tensor(gen).double())
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ir, ig = rng.integers(0, len(real), len(real)), rng.integers(0, len(gen), len(gen))
        out.append(frechet_from_features(real[ir], gen[ig]))
    return out


def paired_interval(a: Sequence[float], b: Sequence[float] | None = None, level: float = 0.9,
                    estimate: float | None = None) -> list[float]:
    """Percentile interval of replicates ``a`` (or of ``a_i - b_i`` for paired replicates ``b``).

    ``estimate`` (the full-sample value, FD or a difference of FDs): the replicates are first shifted by their bias
    against it, mean(replicates) - estimate (Efron & Tibshirani 1993, 10.2). Resampling with replacement repeats
    samples, which shrinks the generated set's spread and raises FD: at a few hundred samples the plain percentile
    interval can lie wholly above the distance it is for."""
    x = np.asarray(a, np.float64) - (0.0 if b is None else np.asarray(b, np.float64))
    if estimate is not None:
        x = x - (x.mean() - float(estimate))
    return [float(v) for v in np.quantile(x, [(1 - level) / 2, (1 + level) / 2])]


@torch.no_grad()
def shapes_video_features(pixels: torch.Tensor, vae=None, batch_size: int = 256) -> torch.Tensor:
    """The fixed Shapes feature (module docstring): pixels ``(N, T, 3, H, W)`` or ``(N, 3, H, W)`` in [0, 1] ->
    ``(N, 40)`` (videos) or ``(N, 20)`` (images), float64 on CPU. ``vae``: the Shapes ``lrm.latent_space.VAE``
    (default ``VAE.shapes()`` on the pixels' device)."""
    if vae is None:
        from lrm.latent_space import VAE

        vae = VAE.shapes(device=pixels.device)
    out = []
    for chunk in pixels.split(batch_size):
        z = vae.encode(chunk.clamp(0, 1)).float()  # (n, [T,] 4, h, w), the posterior mean
        out.append(latent_features(z).cpu())
    return torch.cat(out).double()


def latent_features(z: torch.Tensor) -> torch.Tensor:
    """``shapes_video_features`` on latents already encoded: ``(N, T, C, h, w)`` -> ``(N, 10 C)``;
    ``(N, C, h, w)`` or T = 1 -> ``(N, 5 C)``."""
    if z.dim() == 4:
        z = z[:, None]
    if z.dim() != 5:
        raise ValueError(f"latents must be (N, C, h, w) or (N, T, C, h, w), got shape {tuple(z.shape)}")
    pool = F.adaptive_avg_pool2d(z.flatten(0, 1), 2).unflatten(0, z.shape[:2])  # (N, T, C, 2, 2)
    layout = pool.mean(1).flatten(1)  # (N, 4C)
    detail = z.flatten(3).std(-1).mean(1)  # (N, C)
    if z.shape[1] == 1:
        return torch.cat([layout, detail], 1)
    motion = (pool[:, -1] - pool[:, 0]).flatten(1)  # (N, 4C)
    speed = (z[:, 1:] - z[:, :-1]).abs().mean((3, 4)).sum(1)  # (N, C)
    return torch.cat([layout, detail, motion, speed], 1)


def real_shapes(n: int, seed: int, num_frames: int | None) -> tuple[torch.Tensor, list[str]]:
    """The real reference: samples ``0..n-1`` of ``ShapesWorld(seed, num_frames)``, pixels and captions."""
    from shapes import ShapesWorld

    pixels, captions, _ = ShapesWorld(seed=seed, num_frames=num_frames).batch(range(n))
    return pixels, captions


__all__ = ["FEATURE_DIM", "gaussian_stats", "frechet_distance", "frechet_from_features", "bootstrap_frechet",
           "paired_interval", "shapes_video_features", "latent_features", "real_shapes"]
