"""DDPO_SF pieces: Gaussian log-probs, REINFORCE sign, truncation, PPO on-policy ratio, per-prompt statistics."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from distill.ddpo import (
    PerPromptStatTracker,
    global_advantages,
    ppo_loss,
    reinforce_loss,
    sample_chain,
    trained_step_indices,
    transition_log_prob,
)
from distill.denoiser import Denoiser
from distill.samplers import step_mean, stochastic_sample
from lrm.schedules import DDPMSchedule

TS = [999, 749, 499, 249]


class ToyNet(nn.Module):
    """x0-predicting toy 'UNet': output = per-timestep bias (1000, C) + scale * x (diffusers call signature)."""

    def __init__(self, C=4, scale=0.1):
        super().__init__()
        self.config = SimpleNamespace(cross_attention_dim=8, in_channels=C, sample_size=4)
        self.bias = nn.Parameter(torch.zeros(1000, C))
        self.scale = scale

    def forward(self, sample, timestep, encoder_hidden_states=None, encoder_attention_mask=None):
        b = self.bias[timestep.long()][:, :, None, None]  # (B, C, 1, 1)
        return SimpleNamespace(sample=b + self.scale * sample)


def toy(seed=0):
    torch.manual_seed(seed)
    return Denoiser(ToyNet(), DDPMSchedule(), "x0")


def tiny_unet_denoiser(seed=0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    m = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                             layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
                             attention_head_dim=2, norm_num_groups=8)
    return Denoiser(m, DDPMSchedule(), "conjugate_v")


def text(B, L=5, D=8):
    return torch.randn(B, L, D), torch.ones(B, L, dtype=torch.bool)


def test_sampled_step_log_prob_matches_gaussian_formula():
    den = tiny_unet_denoiser()
    tok, mask = text(3, D=24)
    s = sample_chain(den, torch.randn(3, 4, 8, 8), tok, mask, ["a", "b", "c"], TS, eta=1.0, final_timestep=0)
    assert s.latents.shape == (3, 5, 4, 8, 8) and s.log_probs.shape == (3, 4)
    prevs = TS[1:] + [0]
    for k, (t, tp) in enumerate(zip(TS, prevs)):
        with torch.no_grad():
            mu, sigma, _ = step_mean(den, s.latents[:, k], t, tp, tok, mask, eta=1.0)
        # DDPM posterior std at eta = 1: sigma^2 = (1 - abar_s)/(1 - abar_t) (1 - abar_t / abar_s)
        ab_t, ab_s = float(den.schedule.abar(t)), float(den.schedule.abar(tp))
        assert sigma == pytest.approx(math.sqrt((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)), rel=1e-4)
        # DDPO's log-prob: the MEAN over the latent elements of the Gaussian log-density (ddpo-pytorch / TRL)
        ref = torch.distributions.Normal(mu.double(), sigma).log_prob(s.latents[:, k + 1].double()).flatten(1).mean(1)
        assert torch.allclose(s.log_probs[:, k].double(), ref, rtol=1e-5, atol=1e-4)
        # re-evaluation under the same weights gives the recorded log-prob (on-policy)
        with torch.no_grad():
            again = transition_log_prob(den, s, k, eta=1.0)
        assert torch.allclose(again, s.log_probs[:, k], rtol=1e-5, atol=1e-4)


def test_reinforce_moves_mean_toward_larger_latents():
    den = toy()
    # log-probs are element means (C*H*W = 64 elements here): lr 64 x 1e-4 makes the step of the exact-density sum
    opt = torch.optim.SGD(den.parameters(), lr=64 * 1e-4)
    tok, mask = text(64)
    before = den.model.bias.detach()[[499, 249]].mean().item()
    for it in range(5):
        s = sample_chain(den, torch.randn(64, 4, 4, 4), tok, mask, ["p"] * 64, TS, eta=1.0)
        reward = s.x0.flatten(1).mean(1)  # prefers larger latents
        adv = torch.as_tensor(global_advantages(reward.numpy()), dtype=torch.float32)
        opt.zero_grad()
        for k in trained_step_indices(4, 2):
            reinforce_loss(transition_log_prob(den, s, k), adv).backward()
        opt.step()
    after = den.model.bias.detach()[[499, 249]].mean().item()
    assert after > before + 1e-3, (before, after)
    # the x0 prediction (hence the chain's mean) moved up on the trained steps
    x = torch.zeros(2, 4, 4, 4)
    assert den.x0(x, 249, *text(2)).mean() > 0


def test_truncation_leaves_earlier_steps_gradient_free():
    den = toy()
    with torch.no_grad():
        den.model.bias.normal_()
    tok, mask = text(8)
    traj = stochastic_sample(den, torch.randn(8, 4, 4, 4), tok, mask, TS, eta=1.0, grad_steps=2)
    assert [m.requires_grad for m in traj.means] == [False, False, True, True]
    assert trained_step_indices(4, 2) == [2, 3]  # timesteps 499 and 249
    with pytest.raises(ValueError, match="grad_steps"):
        trained_step_indices(4, 5)
    # the DDPO loss over the truncated steps puts gradient only on the rows of t = 499 and 249
    s = sample_chain(den, torch.randn(8, 4, 4, 4), tok, mask, ["p"] * 8, TS)
    adv = torch.randn(8)
    for k in trained_step_indices(4, 2):
        loss, _ = ppo_loss(transition_log_prob(den, s, k), s.log_probs[:, k], adv)
        loss.backward()
    g = den.model.bias.grad
    assert g[999].abs().sum() == 0 and g[749].abs().sum() == 0
    assert g[499].abs().sum() > 0 and g[249].abs().sum() > 0


def test_ppo_ratio_is_one_on_policy_and_clipping_is_inactive():
    den = tiny_unet_denoiser()
    tok, mask = text(4, D=24)
    s = sample_chain(den, torch.randn(4, 4, 8, 8), tok, mask, list("abcd"), TS)
    adv = torch.tensor([1.0, -2.0, 0.5, 7.0])
    lp = transition_log_prob(den, s, 3)
    loss, info = ppo_loss(lp, s.log_probs[:, 3], adv, clip_range=1e-4, adv_clip=5.0)
    assert info["ratio"] == pytest.approx(1.0, abs=1e-4) and info["clipfrac"] == 0.0
    # the clipped objective equals the unclipped one, and its gradient is REINFORCE's
    ratio = torch.exp(lp - s.log_probs[:, 3])
    unclipped = (-adv.clamp(-5, 5) * ratio).mean()
    assert float(loss.detach()) == pytest.approx(float(unclipped.detach()), abs=1e-5)
    assert float(loss.detach()) == pytest.approx(float(-adv.clamp(-5, 5).mean()), abs=1e-3)
    g_ppo = torch.autograd.grad(loss, list(den.parameters()), retain_graph=True, allow_unused=True)
    g_rf = torch.autograd.grad(reinforce_loss(lp, adv), list(den.parameters()), allow_unused=True)
    for a, b in zip(g_ppo, g_rf):
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-3, atol=1e-6)
    # off-policy beyond the clip range: positive advantage with ratio > 1 + eps gets no gradient
    lp2 = torch.tensor([0.5], requires_grad=True)
    l2, info2 = ppo_loss(lp2, torch.tensor([0.0]), torch.tensor([1.0]), clip_range=1e-4)
    l2.backward()
    assert lp2.grad.abs().item() == 0.0 and info2["clipfrac"] == 1.0


def test_per_prompt_stat_tracker():
    tr = PerPromptStatTracker(buffer_size=4, min_count=3)
    r1 = np.array([1.0, 2.0, 3.0, 10.0])
    a1 = tr.update(["x", "x", "y", "y"], r1)
    # "x" has 2 < 3 rewards and "y" 2: batch-global statistics
    np.testing.assert_allclose(a1, (r1 - r1.mean()) / (r1.std() + 1e-6))
    a2 = tr.update(["x", "y"], [3.0, 4.0])
    # now each prompt has 3: its own buffer statistics
    bx, by = np.array([1.0, 2.0, 3.0]), np.array([3.0, 10.0, 4.0])
    np.testing.assert_allclose(a2, [(3 - bx.mean()) / (bx.std() + 1e-6), (4 - by.mean()) / (by.std() + 1e-6)])
    tr.update(["x", "x", "x"], [5.0, 6.0, 7.0])  # buffer keeps the last 4
    assert list(tr.stats["x"]) == [3.0, 5.0, 6.0, 7.0]
    st = tr.state_dict()
    tr2 = PerPromptStatTracker()
    tr2.load_state_dict(st)
    np.testing.assert_allclose(tr2.update(["x"], [1.0]), tr.update(["x"], [1.0]))
    with pytest.raises(ValueError, match="min_count"):
        PerPromptStatTracker(buffer_size=4, min_count=8)
    # without per-prompt tracking: batch statistics with ddpo-pytorch's / TRL's std + 1e-8
    np.testing.assert_allclose(global_advantages(r1), (r1 - r1.mean()) / (r1.std() + 1e-8), rtol=1e-12)
