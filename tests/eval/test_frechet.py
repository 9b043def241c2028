"""eval.frechet: the FID formula against closed forms and pytorch-fid, and the fixed Shapes video features."""

import warnings

import numpy as np
import pytest
import torch

from eval.frechet import (
    bootstrap_frechet,
    frechet_distance,
    frechet_from_features,
    gaussian_stats,
    latent_features,
    paired_interval,
    real_shapes,
    shapes_video_features,
)


def pytorch_fid_calculate_frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """pytorch-fid 0.3.0 ``fid_score.calculate_frechet_distance``, line for line (only ``disp=False`` guarded for
    SciPy >= 1.18, which drops it)."""
    from scipy import linalg

    mu1 = np.atleast_1d(mu1)
    mu2 = np.atleast_1d(mu2)
    sigma1 = np.atleast_2d(sigma1)
    sigma2 = np.atleast_2d(sigma2)
    assert mu1.shape == mu2.shape, "Training and test mean vectors have different lengths"
    assert sigma1.shape == sigma2.shape, "Training and test covariances have different dimensions"
    diff = mu1 - mu2

    def sqrtm(a):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                return linalg.sqrtm(a, disp=False)
            except TypeError:
                return linalg.sqrtm(a), None
    # Product might be almost singular
    covmean, _ = sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean, _ = sqrtm((sigma1 + offset).dot(sigma2 + offset))
    # Numerical error might give slight imaginary component
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            m = np.max(np.abs(covmean.imag))
            raise ValueError("Imaginary component {}".format(m))
        covmean = covmean.real
    tr_covmean = np.trace(covmean)
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean


def _spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.1 * np.eye(d)


def test_closed_forms():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)
    # diagonal covariances commute: ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 16.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    want = 1.0 + 4.0 + (1 - 2) ** 2 + (2 - 1) ** 2 + (3 - 4) ** 2
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want)
    # identical Gaussians: 0; a pure shift: the squared shift
    rng = np.random.default_rng(0)
    s = _spd(rng, 5)
    assert frechet_distance(mu1[:1].repeat(5), s, mu1[:1].repeat(5), s) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(np.zeros(5), s, np.full(5, 2.0), s) == pytest.approx(20.0, abs=1e-7)
    # scaled covariance: Tr(S + c^2 S - 2 c S) = (1 - c)^2 Tr(S)
    assert frechet_distance(np.zeros(5), s, np.zeros(5), 9 * s) == pytest.approx(4 * np.trace(s), rel=1e-8)


def test_matches_pytorch_fid_on_identical_inputs():
    rng = np.random.default_rng(1)
    for d in (2, 8, 40):
        mu1, mu2, s1, s2 = rng.normal(size=d), rng.normal(size=d), _spd(rng, d), _spd(rng, d)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(
            pytorch_fid_calculate_frechet_distance(mu1, s1, mu2, s2), rel=1e-9)
    # statistics of samples, fewer samples than dimensions: singular covariances (the eps-offset branch)
    x, y = rng.normal(size=(10, 40)), rng.normal(loc=0.5, size=(12, 40))
    (m1, c1), (m2, c2) = gaussian_stats(x), gaussian_stats(y)
    assert np.allclose(c1, np.cov(x, rowvar=False)) and np.linalg.matrix_rank(c1) < 40
    got = frechet_from_features(x, y)
    assert np.isfinite(got) and got == pytest.approx(pytorch_fid_calculate_frechet_distance(m1, c1, m2, c2), rel=1e-6)
    with pytest.raises(ValueError, match="N >= 2"):
        gaussian_stats(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_bootstrap_replicates_are_paired_across_rows():
    rng = np.random.default_rng(2)
    real, a = rng.normal(size=(64, 3)), rng.normal(loc=0.3, size=(64, 3))
    b = a + 0.5  # row b = row a shifted: every paired replicate differs by a positive amount
    ra, rb = bootstrap_frechet(real, a, 50), bootstrap_frechet(real, b, 50)
    assert ra == bootstrap_frechet(real, a, 50)  # deterministic
    lo, hi = paired_interval(rb, ra)
    assert 0 < lo <= hi
    lo1, hi1 = paired_interval(ra)
    assert lo1 < frechet_from_features(real, a) * 1.5 and lo1 <= hi1


def test_shapes_features_are_fixed_and_separate_real_from_degraded():
    n, frames = 96, 4
    real, _ = real_shapes(n, seed=1, num_frames=frames)
    other, _ = real_shapes(n, seed=3, num_frames=frames)
    f_real = shapes_video_features(real)
    assert f_real.shape == (n, 40) and f_real.dtype == torch.float64
    assert torch.equal(f_real, shapes_video_features(real))  # deterministic (the posterior mean)
    g = torch.Generator().manual_seed(0)
    blurred = torch.nn.functional.avg_pool2d(real.flatten(0, 1), 5, 1, 2).unflatten(0, (n, frames))
    noisy = (blurred + 0.15 * torch.randn(real.shape, generator=g)).clamp(0, 1)
    frozen = real[:, :1].expand_as(real)  # no motion: the motion features collapse
    fd_real = frechet_from_features(f_real, shapes_video_features(other))
    fd_noisy = frechet_from_features(f_real, shapes_video_features(noisy))
    fd_frozen = frechet_from_features(f_real, shapes_video_features(frozen))
    assert fd_noisy > 5 * fd_real and fd_frozen > 2 * fd_real, (fd_real, fd_noisy, fd_frozen)
    # images: the 20 appearance features
    img = real[:, 0]
    assert shapes_video_features(img).shape == (n, 20)
    assert latent_features(torch.randn(3, 1, 4, 8, 8)).shape == (3, 20)


def test_bias_corrected_interval_covers_the_full_sample_distance():
    """Resamples with replacement inflate FD (repeated samples shrink the spread): at 64 samples the plain percentile
    interval lies above the full-sample FD; shifted by the bootstrap bias it is centred on it."""
    rng = np.random.default_rng(3)
    real, gen = rng.normal(size=(64, 8)), rng.normal(loc=0.2, size=(64, 8))
    fd, reps = frechet_from_features(real, gen), bootstrap_frechet(real, gen, 200)
    lo, hi = paired_interval(reps)
    assert fd < lo <= hi  # the plain interval misses its own estimate
    blo, bhi = paired_interval(reps, estimate=fd)
    assert blo < fd < bhi and np.isclose(bhi - blo, hi - lo)  # same width, moved by mean(reps) - fd
    assert np.isclose(np.mean(reps) - fd, lo - blo)
