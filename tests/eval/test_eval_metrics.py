"""Vendi score, Gaussian-chain KL, Gao et al. curve fits, best-of-n estimator, early stopping."""

import itertools
import math

import numpy as np
import pytest
import torch

from eval.kl import gaussian_chain_kl, kl_to_distance, smoothed_output_kl
from eval.overopt import (
    best_of_n_curve,
    best_of_n_estimate,
    bon_distance,
    fit_overoptimization,
    recommend_early_stop,
)
from eval.vendi import keyframe_diversity, keyframe_indices, prompt_diversity, vendi_from_kernel, vendi_score


# ---- Vendi ---------------------------------------------------------------------------------------------
def test_vendi_identical_is_one():
    x = torch.rand(1, 3, 8, 8).repeat(5, 1, 1, 1)
    assert vendi_score(x) == pytest.approx(1.0, abs=1e-6)


def test_vendi_orthogonal_is_n():
    x = torch.eye(6).reshape(6, 6)  # 6 orthogonal feature vectors
    assert vendi_score(x) == pytest.approx(6.0, abs=1e-6)
    # orthogonal images: disjoint pixel supports
    imgs = torch.zeros(4, 3, 4, 4)
    for i in range(4):
        imgs[i, :, i] = 1.0
    assert vendi_score(imgs) == pytest.approx(4.0, abs=1e-6)


def test_vendi_two_by_two_by_hand():
    # features at 60 degrees: cosine 0.5; K/2 has eigenvalues 0.75 and 0.25
    x = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2]], dtype=torch.float64)
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))  # 1.7548
    assert vendi_score(x) == pytest.approx(expected, rel=1e-9)
    assert vendi_from_kernel(np.array([[1.0, 0.5], [0.5, 1.0]])) == pytest.approx(expected, rel=1e-9)


def test_vendi_embedding_and_errors():
    x = torch.randn(3, 5)
    emb = lambda t: torch.ones(t.shape[0], 4)  # collapses everything
    assert vendi_score(x, features=emb) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="diagonal"):
        vendi_from_kernel(np.eye(2) * 2)
    with pytest.raises(ValueError, match="all-zero"):
        vendi_score(torch.zeros(2, 3))


def test_keyframe_diversity_eq27():
    assert keyframe_indices(41, 20) == [0, 20, 40]
    assert keyframe_indices(16, 20) == [0]
    # 2 videos, 41 frames: keyframes 0 and 40 identical across videos (Vendi 1), keyframe 20 orthogonal (2)
    v = torch.zeros(2, 41, 3, 2, 2)
    v[:, 0, 0, 0, 0] = 1
    v[:, 40, 1, 0, 0] = 1
    v[0, 20, 0, 0, 0] = 1
    v[1, 20, 0, 1, 1] = 1
    assert keyframe_diversity(v, stride=20) == pytest.approx((1 + 2 + 1) / 3)
    imgs_same = torch.ones(3, 3, 2, 2)
    assert prompt_diversity([v, imgs_same], stride=20) == pytest.approx(((4 / 3) + 1) / 2)


# ---- KL --------------------------------------------------------------------------------------------------
def test_gaussian_chain_kl_matches_closed_form_and_monte_carlo():
    torch.manual_seed(0)
    S, B, D = 3, 4, 5
    mu_t = torch.randn(S, B, D)
    mu_r = torch.randn(S, B, D)
    sigma = torch.tensor([0.5, 1.0, 2.0])
    kl = gaussian_chain_kl(mu_t, mu_r, sigma)
    by_hand = sum(((mu_t[s] - mu_r[s]) ** 2).sum(-1) / (2 * sigma[s] ** 2) for s in range(S))
    assert torch.allclose(kl, by_hand.double())
    # Monte Carlo of E_p[log p - log q] for one step with the same std
    p = torch.distributions.Normal(mu_t[0, 0], sigma[0])
    q = torch.distributions.Normal(mu_r[0, 0], sigma[0])
    x = p.sample((200000,))
    mc = (p.log_prob(x) - q.log_prob(x)).sum(-1).mean()
    one = gaussian_chain_kl(mu_t[:1, :1], mu_r[:1, :1], sigma[:1])
    assert float(one) == pytest.approx(float(mc), rel=0.02)


def test_known_gaussian_chains_shifted_mean():
    # AR(1) chains x_{t-1} = 0.5 x_t + c + sigma z: the fine-tuned chain adds c = 0.3 to every mean.
    S, sig = 4, torch.tensor([1.0, 0.5, 0.5, 0.25])
    x = torch.zeros(1, 2)
    mus_t, mus_r = [], []
    for s in range(S):
        mus_t.append(0.5 * x + 0.3)
        mus_r.append(0.5 * x)
        x = mus_t[-1] + sig[s] * torch.randn_like(x)
    kl = gaussian_chain_kl(mus_t, mus_r, sig)
    expected = sum(2 * 0.09 / (2 * float(s) ** 2) for s in sig)
    assert float(kl) == pytest.approx(expected)
    assert kl_to_distance(kl) == pytest.approx(math.sqrt(expected))
    with pytest.raises(ValueError, match="sigma_t must be > 0"):
        gaussian_chain_kl(mus_t, mus_r, torch.tensor([1.0, 0.5, 0.5, 0.0]))


def test_smoothed_output_kl():
    a = torch.zeros(2, 4, 2, 2)
    b = a.clone()
    b[1] += 1.0  # 16 elements off by 1
    kl = smoothed_output_kl(a, b, sigma=2.0)
    assert kl.tolist() == pytest.approx([0.0, 16 / 8])
    assert kl_to_distance(kl) == pytest.approx(1.0)


# ---- curve fits ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form,alpha,beta", [("rl", 1.2, 0.6), ("bon", 0.8, 0.15)])
def test_fit_recovers_alpha_beta(form, alpha, beta):
    rng = np.random.default_rng(0)
    d = np.linspace(0.05, 6, 60)
    clean = d * (alpha - beta * (np.log(d) if form == "rl" else d))
    y = 0.3 + clean + rng.normal(0, 0.02, d.size)
    fit = fit_overoptimization(d, y, form=form)
    assert fit.alpha == pytest.approx(alpha, abs=0.05)
    assert fit.beta == pytest.approx(beta, abs=0.03)
    assert fit.r0 == pytest.approx(0.3, abs=0.03)
    fixed = fit_overoptimization(d, y, form=form, r0=0.3)
    assert fixed.alpha == pytest.approx(alpha, abs=0.05) and not fixed.r0_fitted
    true_peak = math.exp(alpha / beta - 1) if form == "rl" else alpha / (2 * beta)
    assert fit.peak_d == pytest.approx(true_peak, rel=0.1)
    assert fit.rmse < 0.03


def test_best_of_n_estimator_matches_brute_force():
    rng = np.random.default_rng(1)
    for N in (5, 7):
        proxy = rng.integers(0, 4, N).astype(float)  # with ties
        gold = rng.normal(size=N)
        for n in range(1, N + 1):
            brute = np.mean([gold[list(c)][int(np.argmax(proxy[list(c)]))]
                             for c in itertools.combinations(range(N), n)])
            assert best_of_n_estimate(proxy, gold, n) == pytest.approx(brute, abs=1e-10)
    assert bon_distance(1) == 0.0
    assert bon_distance(8) == pytest.approx(math.sqrt(math.log(8) - 7 / 8))
    curve = best_of_n_curve(rng.normal(size=16), rng.normal(size=16))
    assert list(curve["n"]) == [1, 2, 4, 8, 16]
    assert curve["proxy"].is_monotonic_increasing


def test_recommend_early_stop_rules():
    steps = [0, 100, 200, 300, 400]
    r = recommend_early_stop(steps, gold=[0.1, 0.3, 0.5, 0.4, 0.2])
    assert r["rule"] == "peak-gold" and r["step"] == 200
    r = recommend_early_stop(steps, proxy=[0, 1, 2, 3, 4], holdout=[0, 1, 2, 1.5, 0.5])
    assert r["rule"] == "divergence" and r["step"] == 200
    r = recommend_early_stop(steps, proxy=[0, 1, 2, 3, 4], holdout=[0, 1, 2, 2.95, 3])
    assert r["rule"] == "divergence" and r["step"] == 400
    r = recommend_early_stop(steps, d=[0, 0.5, 1.0, 1.5, 2.0], d_budget=1.2)
    assert r["rule"] == "kl-budget" and r["step"] == 200
    with pytest.raises(ValueError, match="proxy alone"):
        recommend_early_stop(steps, proxy=[0, 1, 2, 3, 4])
