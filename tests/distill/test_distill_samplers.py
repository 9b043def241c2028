"""DDIM against diffusers' DDIMScheduler, the student sampler, and the stochastic sampler's log-probs."""

import math

import pytest
import torch

from distill.denoiser import Denoiser
from distill.samplers import (
    STUDENT_TIMESTEPS,
    ddim_sample,
    ddim_step,
    ddim_timesteps,
    step_log_prob,
    step_sigma,
    stochastic_sample,
    student_sample,
)
from lrm.schedules import DDPMSchedule


def tiny_unet2d(seed=0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
                                attention_head_dim=2, norm_num_groups=8).eval()


def text(B=2, L=6, D=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    tok = torch.randn(B, L, D, generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[:, 4:] = False
    return tok, mask


def test_timestep_spacing_is_dollar_and_diffusers_trailing():
    from diffusers import DDIMScheduler

    ts = ddim_timesteps(50)
    assert ts == list(range(999, 0, -20)) and ts[-1] == 19  # DOLLAR: t_n in [19, 39, ..., 999]
    sch = DDIMScheduler(timestep_spacing="trailing")
    for n in (1, 4, 10, 50):
        sch.set_timesteps(n)
        assert ddim_timesteps(n) == sch.timesteps.tolist()
    assert STUDENT_TIMESTEPS[4] == [249, 499, 749, 999]


@pytest.mark.parametrize("kind,prediction_type,guidance", [("eps", "epsilon", None), ("v", "v_prediction", None),
                                                           ("eps", "epsilon", 3.5)])
def test_ddim_matches_diffusers_trajectory(kind, prediction_type, guidance):
    from diffusers import DDIMScheduler

    unet = tiny_unet2d()
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=True, timestep_spacing="trailing", prediction_type=prediction_type)
    d = Denoiser(unet, DDPMSchedule.from_diffusers(sched), kind)
    tok, mask = text()
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    n = 10
    sched.set_timesteps(n)
    ours = noise
    ref = noise
    ntok, nmask = d.null_text(2, tok.shape[1])
    with torch.no_grad():
        ts = ddim_timesteps(n)
        for i, t in enumerate(ts):
            ours = ddim_step(d, ours, t, ts[i + 1] if i + 1 < n else -1, tok, mask, guidance_scale=guidance)
            if guidance is None:
                out = unet(ref, t, encoder_hidden_states=tok, encoder_attention_mask=mask).sample
            else:
                c = unet(ref, t, encoder_hidden_states=tok, encoder_attention_mask=mask).sample
                u = unet(ref, t, encoder_hidden_states=ntok, encoder_attention_mask=nmask).sample
                out = u + guidance * (c - u)
            ref = sched.step(out, t, ref, eta=0.0).prev_sample
            scale = ref.abs().max()
            assert torch.allclose(ours, ref, atol=1e-5 * max(1.0, float(scale))), (i, (ours - ref).abs().max())
        full = ddim_sample(d, noise, tok, mask, num_steps=n, guidance_scale=guidance)
    assert torch.allclose(full, ref, atol=1e-5 * max(1.0, float(ref.abs().max())))


def test_ddim_eta_one_matches_diffusers_with_same_noise():
    from diffusers import DDIMScheduler

    unet = tiny_unet2d()
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=True, timestep_spacing="trailing")
    d = Denoiser(unet, DDPMSchedule.from_diffusers(sched), "eps")
    tok, mask = text()
    sched.set_timesteps(5)
    ts = ddim_timesteps(5)
    g = torch.Generator().manual_seed(0)
    x = ref = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        for i, t in enumerate(ts):
            z = torch.randn(2, 4, 8, 8, generator=g)
            x = ddim_step(d, x, t, ts[i + 1] if i + 1 < 5 else -1, tok, mask, eta=1.0, noise=z)
            out = unet(ref, t, encoder_hidden_states=tok, encoder_attention_mask=mask).sample
            ref = sched.step(out, t, ref, eta=1.0, variance_noise=z).prev_sample
            assert torch.allclose(x, ref, atol=1e-5 * max(1.0, float(ref.abs().max())))


def test_student_sampler_predicts_and_renoises():
    d = Denoiser(tiny_unet2d(), DDPMSchedule(), "conjugate_v")
    tok, mask = text()
    noise = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        one = student_sample(d, noise, tok, mask, timesteps=STUDENT_TIMESTEPS[1])
        assert torch.allclose(one, d.x0(noise, 999, tok, mask), atol=1e-6)
        two = student_sample(d, noise, tok, mask, timesteps=STUDENT_TIMESTEPS[2],
                             generator=torch.Generator().manual_seed(5))
        x0 = d.x0(noise, 999, tok, mask)
        z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
        ref = d.x0(d.schedule.add_noise(x0, z, 499), 499, tok, mask)
        assert torch.allclose(two, ref, atol=1e-6)


def test_posterior_sigma_is_ddpm_variance_at_eta_one():
    s = DDPMSchedule()
    ac = s.alphas_cumprod
    for t in (999, 500, 20):
        alpha_t = ac[t] / ac[t - 1]
        var = (1 - alpha_t) * (1 - ac[t - 1]) / (1 - ac[t])
        assert math.isclose(step_sigma(s, t, t - 1, 1.0) ** 2, float(var), rel_tol=1e-4)
    # skip step (DDIM sigma): eta^2 (1 - abar_s)/(1 - abar_t) (1 - abar_t / abar_s)
    var = 0.25 * (1 - ac[249]) / (1 - ac[499]) * (1 - ac[499] / ac[249])
    assert math.isclose(step_sigma(s, 499, 249, 0.5) ** 2, float(var), rel_tol=1e-4)
    assert step_sigma(s, 499, 249, 0.0) == 0.0


def test_stochastic_sampler_log_probs_match_gaussian_formula():
    d = Denoiser(tiny_unet2d(), DDPMSchedule(), "conjugate_v")
    tok, mask = text()
    noise = torch.randn(2, 4, 8, 8)
    ts = [999, 749, 499, 249]
    with torch.no_grad():
        tr = stochastic_sample(d, noise, tok, mask, ts, eta=1.0, guidance_scale=2.0,
                               generator=torch.Generator().manual_seed(0))
    assert tr.log_probs.shape == (2, 4) and len(tr.latents) == 5 and len(tr.means) == 4
    assert tr.timesteps.tolist() == ts and tr.prev_timesteps.tolist() == [749, 499, 249, 0]
    assert torch.equal(tr.x0, tr.latents[-1])
    assert tr.log_prob_reduction == "mean"
    for k in range(4):
        mu, sd, x = tr.means[k].double(), float(tr.stds[k]), tr.latents[k + 1].double()
        # default reduction: the mean over the latent elements (ddpo-pytorch / TRL); "sum" is the exact density
        ref = torch.distributions.Normal(mu, sd).log_prob(x).flatten(1)
        assert torch.allclose(tr.log_probs[:, k].double(), ref.mean(1), rtol=1e-5)
        manual = (-0.5 * ((x - mu) ** 2 / sd ** 2 + math.log(2 * math.pi * sd ** 2))).flatten(1).mean(1)
        assert torch.allclose(tr.log_probs[:, k].double(), manual, rtol=1e-5)
        # re-evaluating the transition gives the same log-prob
        with torch.no_grad():
            lp = step_log_prob(d, tr.latents[k], tr.latents[k + 1], ts[k], int(tr.prev_timesteps[k]), tok, mask,
                               eta=1.0, guidance_scale=2.0)
            lp_sum = step_log_prob(d, tr.latents[k], tr.latents[k + 1], ts[k], int(tr.prev_timesteps[k]), tok, mask,
                                   eta=1.0, guidance_scale=2.0, reduction="sum")
        assert torch.allclose(lp, tr.log_probs[:, k], rtol=1e-5)
        assert torch.allclose(lp_sum.double(), ref.sum(1), rtol=1e-5)
    # the mean is the Eq. 25 posterior mean: sqrt(abar_s) x0 + sqrt(1 - abar_s - sigma^2) eps
    with torch.no_grad():
        x0, eps = d.x0_eps(tr.latents[1], 749, tok, mask, 2.0)
    s = d.schedule
    sig = float(tr.stds[1])
    mu = float(s.a(499)) * x0 + math.sqrt(1 - float(s.abar(499)) - sig ** 2) * eps
    assert torch.allclose(mu, tr.means[1], atol=1e-5)


def test_truncated_gradients_only_in_last_steps():
    d = Denoiser(tiny_unet2d(), DDPMSchedule(), "conjugate_v")
    tok, mask = text()
    noise = torch.randn(2, 4, 8, 8)
    tr = stochastic_sample(d, noise, tok, mask, [999, 749, 499, 249], eta=1.0,
                           generator=torch.Generator().manual_seed(0), grad_steps=2)
    params = [p for p in d.parameters()]
    early = torch.autograd.grad(tr.log_probs[:, :2].sum(), params, allow_unused=True, retain_graph=True)
    assert all(g is None or g.abs().max() == 0 for g in early)
    late = torch.autograd.grad(tr.log_probs[:, 2:].sum(), params, allow_unused=True, retain_graph=True)
    assert any(g is not None and g.abs().max() > 0 for g in late)
    assert not tr.means[0].requires_grad and not tr.means[1].requires_grad
    assert tr.means[2].requires_grad and tr.means[3].requires_grad
    assert all(not x.requires_grad for x in tr.latents)
    tr.log_probs.sum().backward()
    g = {n: p.grad.clone() for n, p in d.named_parameters() if p.grad is not None}
    assert g and any(v.abs().sum() > 0 for v in g.values())
    # the gradient equals re-evaluating only the last two transitions
    d.zero_grad()
    lp = sum(step_log_prob(d, tr.latents[k], tr.latents[k + 1], int(tr.timesteps[k]), int(tr.prev_timesteps[k]),
                           tok, mask, eta=1.0) for k in (2, 3))
    lp.sum().backward()
    for n, p in d.named_parameters():
        if n in g:
            assert torch.allclose(p.grad, g[n], atol=1e-4, rtol=1e-3), n
    # grad_steps=0: nothing is differentiable
    tr0 = stochastic_sample(d, noise, tok, mask, [999, 499], grad_steps=0)
    assert not tr0.log_probs.requires_grad
    with pytest.raises(ValueError, match="grad_steps"):
        stochastic_sample(d, noise, tok, mask, [999, 499], grad_steps=3)
    with pytest.raises(ValueError, match="zero variance"):
        stochastic_sample(d, noise, tok, mask, [999, 499], eta=0.0)
