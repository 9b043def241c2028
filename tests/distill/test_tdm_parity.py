"""TDM parity with the public code on identical inputs: stages and tau ranges, the re-noising of the student's x0_hat,
the importance weight, the generator loss (``distance="code"``) and the fake-score loss.

The reference below is a rewrite of Luo-Yihong/TDM at 81b019f, ``train_tdm_demo.py`` (same operations in the same
order): ``extract_into_tensor``, ``predicted_origin`` (epsilon), ``compute_snr``, ``Predictor.add_noise`` /
``obtain_mixed_noise``, and the generator / fake-score updates of the main loop (``--use_separate``, ``--use_huber``,
no ``--use_randmid``). It runs on the code's own DDPM schedule (diffusers ``DDPMScheduler``, linear betas 1e-4..0.02,
1000 steps) in fp32 (the code casts some tensors to fp16; the formulas are what is compared here).
"""

import pytest
import torch
from torch import nn

from distill.tdm import fake_score_loss, importance_weight, renoise, sample_stage, stage_bounds, tdm_loss_from_x0
from lrm.schedules import DDPMSchedule

B, SHAPE = 6, (6, 4, 8, 8)
CFG, HUBER_C = 4.5, 1e-3  # the code's --cfg in the README's command; args.huber_c is set to 1e-3 before use


# ---- the reference (rewritten; same operations in the same order) ----------------------------------------------
def ref_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", steps_offset=1,
                         trained_betas=None, clip_sample=False, rescale_betas_zero_snr=False)


def extract_into_tensor(a, t, x_shape):
    b, *_ = t.shape
    out = a.gather(-1, t)
    return out.reshape(b, *((1,) * (len(x_shape) - 1)))


def predicted_origin_eps(model_output, timesteps, sample, alphas, sigmas):
    sigmas = extract_into_tensor(sigmas, timesteps, sample.shape)
    alphas = extract_into_tensor(alphas, timesteps, sample.shape)
    return (sample - sigmas * model_output) / alphas


def compute_snr(alphas_cumprod, timesteps):
    alpha = (alphas_cumprod ** 0.5)[timesteps].float()
    sigma = ((1.0 - alphas_cumprod) ** 0.5)[timesteps].float()
    return (alpha / sigma) ** 2


def ref_add_noise(alpha_schedule, sigma_schedule, samples, noise, t1, t2):  # Predictor.add_noise
    sigmas = extract_into_tensor(sigma_schedule, t1, samples.shape)
    alphas = extract_into_tensor(alpha_schedule, t1, samples.shape)
    sigmas_new = extract_into_tensor(sigma_schedule, t2, samples.shape)
    alphas_new = extract_into_tensor(alpha_schedule, t2, samples.shape)
    samples = samples / alphas * alphas_new
    beta = (sigmas_new ** 2 - (alphas_new / alphas * sigmas) ** 2) ** 0.5
    return samples + beta * noise


def ref_mixed_noise(alpha_schedule, sigma_schedule, model_noise, noise, t1, t2):  # Predictor.obtain_mixed_noise
    sigmas = extract_into_tensor(sigma_schedule, t1, model_noise.shape)
    alphas = extract_into_tensor(alpha_schedule, t1, model_noise.shape)
    sigmas_new = extract_into_tensor(sigma_schedule, t2, model_noise.shape)
    alphas_new = extract_into_tensor(alpha_schedule, t2, model_noise.shape)
    beta = (sigmas_new ** 2 - (alphas_new / alphas * sigmas) ** 2) ** 0.5
    mixed_noise = model_noise / alphas * alphas_new * sigmas + beta * noise
    return mixed_noise / sigmas_new


def ref_stage_draw(ind_t, total_steps, gen):
    """The main loop's timesteps_g / timesteps_mid / timesteps (use_separate, no use_randmid)."""
    timesteps_g = ind_t * total_steps // 4 - 1
    timesteps_mid = timesteps_g - total_steps // 4 + 1
    timesteps = timesteps_g * 0
    for i in range(len(ind_t)):
        lowt = max(20, timesteps_mid[i])
        upt = timesteps_g[i] - 10
        timesteps[i] = torch.randint(lowt, upt, (1,), generator=gen)[0].long()
    return timesteps_g, timesteps_mid, timesteps


# ---- ours vs the reference ----------------------------------------------------------------------------------------
def _schedules():
    ref = ref_scheduler()
    ours = DDPMSchedule(1000, "linear", beta_start=0.0001, beta_end=0.02)
    assert torch.equal(ours.alphas_cumprod.float(), ref.alphas_cumprod)  # the same schedule, bit for bit
    return ref, ours, torch.sqrt(ref.alphas_cumprod), torch.sqrt(1 - ref.alphas_cumprod)


@pytest.mark.parametrize("total_steps", [1000, 900])  # 900: the code's --total_steps in its README
def test_stage_starts_ends_and_tau_ranges_match_the_code(total_steps):
    starts, ends = stage_bounds(4, total_steps)
    ind = torch.arange(1, 5)
    g, mid, _ = ref_stage_draw(ind, total_steps, torch.Generator().manual_seed(0))
    assert starts == g.tolist() and ends == mid.tolist()
    # the same support: every tau of the code's draw is in ours and both cover [max(20, end), start - 10)
    gen = torch.Generator().manual_seed(0)
    k, s, e, tau = sample_stage(20000, 4, total_steps, generator=gen)
    ref_ind = torch.randint(1, 5, (4000,), generator=gen)
    _, _, ref_tau = ref_stage_draw(ref_ind, total_steps, gen)
    for stage in range(1, 5):
        lo, hi = max(20, ends[stage - 1]), starts[stage - 1] - 10
        ours_k, ref_k = tau[k == stage], ref_tau[ref_ind == stage]
        assert (s[k == stage] == starts[stage - 1]).all() and (e[k == stage] == ends[stage - 1]).all()
        assert int(ours_k.min()) == lo and int(ours_k.max()) == hi - 1
        assert int(ref_k.min()) >= lo and int(ref_k.max()) <= hi - 1


def test_renoising_and_importance_weight_match_the_code():
    ref, ours, alpha_s, sigma_s = _schedules()
    g = torch.Generator().manual_seed(1)
    model_latents, model_eps, rand_noise = (torch.randn(SHAPE, generator=g) for _ in range(3))
    ind_t = torch.tensor([1, 2, 3, 4, 2, 3])
    timesteps_g, timesteps_mid, timesteps = ref_stage_draw(ind_t, 1000, g)
    # reference: x_mid = add_noise(x0_hat, eps_hat, mid), then the kernel to tau with fresh noise
    x_mid = ref.add_noise(model_latents, model_eps, timesteps_mid)
    x_tau = ref_add_noise(alpha_s, sigma_s, x_mid, rand_noise, timesteps_mid, timesteps)
    mixed = ref_mixed_noise(alpha_s, sigma_s, model_eps, rand_noise, timesteps_mid, timesteps)
    is_weight = torch.exp(-0.5 * (mixed ** 2).view(B, -1).mean(dim=1)) / torch.exp(
        -0.5 * (rand_noise ** 2).view(B, -1).mean(dim=1))
    # ours: the student's trajectory point at tau_k whose eps is the code's model_eps
    x_start = ours.add_noise(model_latents, model_eps, timesteps_g)
    r = renoise(model_latents, x_start, timesteps_g, timesteps_mid, timesteps, ours, noise=rand_noise)
    torch.testing.assert_close(r.x_end, x_mid, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r.x_tau, x_tau, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r.noise_total, mixed, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(importance_weight(r.noise_total, r.noise), is_weight, rtol=1e-4, atol=1e-6)


def test_generator_loss_matches_the_code_huber_form():
    g = torch.Generator().manual_seed(2)
    model_latents = torch.randn(SHAPE, generator=g, requires_grad=True)
    sd_latents, sd_latents_uncond, fake_latents = (torch.randn(SHAPE, generator=g) for _ in range(3))
    # reference (main loop, --use_huber)
    coop_samples = model_latents.detach().clone() + 1 * (sd_latents - fake_latents) + (CFG - 1) * (
        sd_latents - sd_latents_uncond)
    sd_latents_cfg = sd_latents + (CFG - 1) * (sd_latents - sd_latents_uncond)
    weighting_factor = torch.abs(model_latents.double() - sd_latents_cfg.double()).mean(dim=[1, 2, 3],
                                                                                          keepdim=True).detach()
    ref_loss = torch.mean((torch.sqrt((model_latents.float() - coop_samples.detach().float()) ** 2 + HUBER_C ** 2)
                           - HUBER_C) / weighting_factor)
    (ref_grad,) = torch.autograd.grad(ref_loss, model_latents)
    loss = tdm_loss_from_x0(model_latents, sd_latents_cfg, fake_latents, distance="code")
    (grad,) = torch.autograd.grad(loss, model_latents)
    torch.testing.assert_close(loss, ref_loss.float(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad.float(), rtol=1e-4, atol=1e-9)


class _EpsNet(nn.Module):
    """A fixed eps-predicting stand-in for the fake score (the code's unet_fake with prediction_type epsilon)."""

    parameterization = "eps"

    def __init__(self, schedule):
        super().__init__()
        self.schedule = schedule
        self.w = nn.Parameter(torch.tensor(0.7))

    def forward(self, x, t, tokens=None, mask=None):
        return self.w * x + torch.sin(t.float() / 100).view(-1, *([1] * (x.dim() - 1)))


def test_fake_score_loss_matches_the_code():
    ref, ours, alpha_s, sigma_s = _schedules()
    g = torch.Generator().manual_seed(3)
    model_latents, model_eps, rand_noise = (torch.randn(SHAPE, generator=g) for _ in range(3))
    timesteps_g, timesteps_mid, timesteps = ref_stage_draw(torch.tensor([1, 2, 3, 4, 1, 4]), 1000, g)
    r = renoise(model_latents, ours.add_noise(model_latents, model_eps, timesteps_g), timesteps_g, timesteps_mid,
                timesteps, ours, noise=rand_noise)
    fake = _EpsNet(ours)
    # reference: x0 of the fake at tau, per-sample MSE to x0_hat, x min(SNR, 5) x the importance weight, mean
    noisy_model_latents = ref_add_noise(alpha_s, sigma_s, ref.add_noise(model_latents, model_eps, timesteps_mid),
                                        rand_noise, timesteps_mid, timesteps)
    mixed_noise = ref_mixed_noise(alpha_s, sigma_s, model_eps, rand_noise, timesteps_mid, timesteps)
    fake_latents = predicted_origin_eps(fake(noisy_model_latents, timesteps), timesteps, noisy_model_latents,
                                        alpha_s, sigma_s)
    is_weight = torch.exp(-0.5 * (mixed_noise ** 2).view(B, -1).mean(dim=1)) / torch.exp(
        -0.5 * (rand_noise ** 2).view(B, -1).mean(dim=1))
    loss_score = nn.functional.mse_loss(fake_latents.float(), model_latents.float(), reduction="none")
    snr = compute_snr(ref.alphas_cumprod, timesteps)
    snr = torch.stack([snr, 5 * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    ref_loss = (loss_score.mean(dim=list(range(1, len(loss_score.shape)))) * snr * is_weight).mean()
    (ref_grad,) = torch.autograd.grad(ref_loss, fake.w)
    loss = fake_score_loss(fake, model_latents, r, None, None)
    (grad,) = torch.autograd.grad(loss, fake.w)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)
