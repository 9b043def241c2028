"""DDPO parity with ddpo-pytorch / TRL 0.11: transition log-probs, PPO ratio, clipped loss, approx_kl, clipfrac.

The reference below is a rewrite of ddpo-pytorch's ``ddim_step_with_logprob``
(kvablack/ddpo-pytorch ``ddpo_pytorch/diffusers_patch/ddim_with_logprob.py``, identical to TRL 0.11
``trl/models/modeling_sd_base.py`` ``scheduler_step``) and of the PPO loss of ddpo-pytorch ``scripts/train.py`` /
TRL 0.11 ``DDPOTrainer.calculate_loss`` + ``loss``. It runs on a diffusers ``DDIMScheduler`` configured like our
``DDPMSchedule()`` (SD's scaled_linear betas 0.00085..0.012, 1000 steps; SD's ``clip_sample=False``) with 4
trailing steps, i.e. the student's timesteps [999, 749, 499, 249] with prev = t - 250 (the last one clamped to 0).
"""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from distill.ddpo import DDPOSamples, ppo_loss, transition_log_prob
from distill.denoiser import Denoiser
from distill.parameterization import to_eps
from distill.samplers import ddim_step, gaussian_log_prob, step_log_prob, stochastic_sample
from lrm.schedules import DDPMSchedule

TS = [999, 749, 499, 249]
SHAPE = (3, 4, 16, 16)  # B, C, H, W: the 4x16x16 latents
PAIRS = [(999, 749), (749, 499), (499, 249), (249, 0)]
CLIP_RANGE, ADV_CLIP = 1e-4, 5.0  # ddpo-pytorch config/base.py train.clip_range, train.adv_clip_max


# ---- the reference (rewritten; same operations in the same order) ----------------------------------------------
def ref_scheduler(prediction_type="epsilon"):
    from diffusers import DDIMScheduler

    s = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing",
                      prediction_type=prediction_type)
    s.set_timesteps(4)
    assert s.timesteps.tolist() == TS
    return s


def _left_broadcast(t, shape):
    return t.reshape(t.shape + (1,) * (len(shape) - t.ndim)).broadcast_to(shape)


def _ref_variance(sched, timestep, prev_timestep):
    ab_t = torch.gather(sched.alphas_cumprod, 0, timestep.cpu()).to(timestep.device)
    ab_prev = torch.where(prev_timestep.cpu() >= 0, sched.alphas_cumprod.gather(0, prev_timestep.cpu()),
                          sched.final_alpha_cumprod).to(timestep.device)
    return ((1 - ab_prev) / (1 - ab_t)) * (1 - ab_t / ab_prev)


def ref_ddim_step_with_logprob(sched, model_output, timestep, sample, eta=0.0, generator=None, prev_sample=None):
    """-> (prev_sample, log_prob (B,)); ``timestep`` is a (B,) long tensor."""
    from diffusers.utils.torch_utils import randn_tensor

    # 1. previous timestep: uniform spacing, clamped to 0
    prev_timestep = timestep - sched.config.num_train_timesteps // sched.num_inference_steps
    prev_timestep = torch.clamp(prev_timestep, 0, sched.config.num_train_timesteps - 1)
    # 2. alphas
    ab_t = sched.alphas_cumprod.gather(0, timestep.cpu())
    ab_prev = torch.where(prev_timestep.cpu() >= 0, sched.alphas_cumprod.gather(0, prev_timestep.cpu()),
                          sched.final_alpha_cumprod)
    ab_t = _left_broadcast(ab_t, sample.shape).to(sample.device)
    ab_prev = _left_broadcast(ab_prev, sample.shape).to(sample.device)
    beta_t = 1 - ab_t
    # 3. x0 and eps from the model output
    if sched.config.prediction_type == "epsilon":
        x0 = (sample - beta_t ** 0.5 * model_output) / ab_t ** 0.5
        eps = model_output
    elif sched.config.prediction_type == "v_prediction":
        x0 = ab_t ** 0.5 * sample - beta_t ** 0.5 * model_output
        eps = ab_t ** 0.5 * model_output + beta_t ** 0.5 * sample
    else:
        raise ValueError(sched.config.prediction_type)
    # 4. clip x0 (off for SD)
    if sched.config.clip_sample:
        x0 = x0.clamp(-sched.config.clip_sample_range, sched.config.clip_sample_range)
    # 5. sigma_t(eta)
    std = eta * _ref_variance(sched, timestep, prev_timestep) ** 0.5
    std = _left_broadcast(std, sample.shape).to(sample.device)
    # 6-7. mean of x_{t-1}
    mean = ab_prev ** 0.5 * x0 + (1 - ab_prev - std ** 2) ** 0.5 * eps
    if prev_sample is None:
        noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                             dtype=model_output.dtype)
        prev_sample = mean + std * noise
    log_prob = (-((prev_sample.detach() - mean) ** 2) / (2 * std ** 2) - torch.log(std)
                - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi))))
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))  # mean over all but the batch dimension
    return prev_sample.type(sample.dtype), log_prob


def ref_ppo(log_prob, old_log_prob, advantages, clip_range=CLIP_RANGE, adv_clip_max=ADV_CLIP):
    """ddpo-pytorch train.py / TRL calculate_loss: -> (loss, approx_kl, clipfrac, ratio)."""
    advantages = torch.clamp(advantages, -adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.mean(torch.maximum(unclipped, clipped))
    approx_kl = 0.5 * torch.mean((log_prob - old_log_prob) ** 2)
    clipfrac = torch.mean((torch.abs(ratio - 1.0) > clip_range).float())
    return loss, approx_kl, clipfrac, ratio


# ---- our side: a Denoiser whose network returns a fixed output per timestep -------------------------------------
class FixedNet(nn.Module):
    """Network output = a stored tensor per timestep (a parameter, so gradients can be compared)."""

    def __init__(self, outputs: dict[int, torch.Tensor]):
        super().__init__()
        self.config = SimpleNamespace(cross_attention_dim=8, in_channels=SHAPE[1], sample_size=SHAPE[2])
        self.out = nn.ParameterDict({str(t): nn.Parameter(o.clone()) for t, o in outputs.items()})

    def forward(self, sample, timestep, encoder_hidden_states=None, encoder_attention_mask=None):
        return SimpleNamespace(sample=self.out[str(int(timestep[0]))] + 0 * sample)


def setup(kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    outputs = {t: torch.randn(SHAPE, generator=g) for t in TS}
    den = Denoiser(FixedNet(outputs), DDPMSchedule(), kind)
    tok, mask = torch.randn(SHAPE[0], 2, 8, generator=g), torch.ones(SHAPE[0], 2, dtype=torch.bool)
    return den, tok, mask, g


def ref_for(kind):
    """Our parameterisation -> the reference scheduler and the model output it takes."""
    if kind == "v":
        return ref_scheduler("v_prediction"), lambda out, x, t, sch: out
    # eps directly, or our conjugate-v student's eps (same x0 and eps, so the same transition)
    return ref_scheduler("epsilon"), lambda out, x, t, sch: out if kind == "eps" else to_eps(out, x, t, sch, kind)


@pytest.mark.parametrize("kind", ["eps", "v", "conjugate_v"])
def test_step_log_prob_equals_ddim_step_with_logprob(kind):
    den, tok, mask, g = setup(kind)
    sched, ref_out = ref_for(kind)
    B = SHAPE[0]
    for t, s in PAIRS:
        x_t = torch.randn(SHAPE, generator=g)
        out = den.model.out[str(t)].detach()
        tt = torch.full((B,), t, dtype=torch.long)
        # the reference samples x_{t-1} from its generator; our ddim_step with the same noise lands on it
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(t))
        prev, lp_ref = ref_ddim_step_with_logprob(sched, ref_out(out, x_t, t, den.schedule), tt, x_t, eta=1.0,
                                                  generator=torch.Generator().manual_seed(t))
        with torch.no_grad():
            ours_prev = ddim_step(den, x_t, t, s, tok, mask, eta=1.0, noise=noise)
            lp = step_log_prob(den, x_t, prev, t, s, tok, mask, eta=1.0)
            lp_sum = step_log_prob(den, x_t, prev, t, s, tok, mask, eta=1.0, reduction="sum")
        torch.testing.assert_close(ours_prev, prev, atol=2e-5, rtol=1e-5)
        assert lp.shape == (B,) and lp.dtype == torch.float32
        torch.testing.assert_close(lp, lp_ref, atol=2e-5, rtol=1e-6)
        # "sum" is the exact density: C*H*W times the mean, and torch's Normal agrees
        torch.testing.assert_close(lp_sum, lp * math.prod(SHAPE[1:]), atol=0.0, rtol=1e-5)
        with torch.no_grad():
            mu = ddim_step(den, x_t, t, s, tok, mask, eta=1.0, noise=torch.zeros(SHAPE))
        sd = math.sqrt(float(_ref_variance(sched, tt[:1], torch.tensor([s]))))
        exact = torch.distributions.Normal(mu.double(), sd).log_prob(prev.double()).flatten(1).sum(1)
        torch.testing.assert_close(lp_sum.double(), exact, atol=0.0, rtol=1e-5)


@pytest.mark.parametrize("kind", ["eps", "conjugate_v"])
def test_sampler_chain_log_probs_equal_reference(kind):
    den, tok, mask, g = setup(kind, seed=1)
    sched, ref_out = ref_for(kind)
    with torch.no_grad():
        tr = stochastic_sample(den, torch.randn(SHAPE, generator=g), tok, mask, TS, eta=1.0,
                               generator=torch.Generator().manual_seed(3))
    assert tr.prev_timesteps.tolist() == [749, 499, 249, 0] and tr.log_prob_reduction == "mean"
    for k, t in enumerate(TS):
        tt = torch.full((SHAPE[0],), t, dtype=torch.long)
        x_t = tr.latents[k]
        _, lp_ref = ref_ddim_step_with_logprob(sched, ref_out(den.model.out[str(t)].detach(), x_t, t, den.schedule),
                                               tt, x_t, eta=1.0, prev_sample=tr.latents[k + 1])
        torch.testing.assert_close(tr.log_probs[:, k], lp_ref, atol=2e-5, rtol=1e-6)


def test_ppo_ratio_and_loss_equal_reference_for_a_1e3_output_change():
    """The issue's case: the network output changes by 1e-3 at t = 249 on 4x16x16 latents after sampling."""
    den, tok, mask, g = setup("eps", seed=2)
    sched = ref_scheduler("epsilon")
    prompts = ["a", "b", "c"]
    with torch.no_grad():
        tr = stochastic_sample(den, torch.randn(SHAPE, generator=g), tok, mask, TS, eta=1.0,
                               generator=torch.Generator().manual_seed(5), grad_steps=0)
    samples = DDPOSamples.from_trajectory(tr, tok, mask, prompts)
    k, t = 3, 249
    with torch.no_grad():
        den.model.out[str(t)] += 1e-3
    adv = torch.tensor([1.0, -2.0, 7.0])  # 7 is clipped to adv_clip = 5
    lp = transition_log_prob(den, samples, k, eta=1.0)
    loss, info = ppo_loss(lp, samples.log_probs[:, k], adv, clip_range=CLIP_RANGE, adv_clip=ADV_CLIP)

    out_ref = den.model.out[str(t)].detach().clone().requires_grad_(True)
    tt = torch.full((SHAPE[0],), t, dtype=torch.long)
    _, lp_ref = ref_ddim_step_with_logprob(sched, out_ref, tt, samples.latents[:, k], eta=1.0,
                                           prev_sample=samples.latents[:, k + 1])
    _, old_ref = ref_ddim_step_with_logprob(sched, out_ref.detach() - 1e-3, tt, samples.latents[:, k], eta=1.0,
                                            prev_sample=samples.latents[:, k + 1])
    loss_ref, kl_ref, clipfrac_ref, ratio_ref = ref_ppo(lp_ref, old_ref, adv)

    torch.testing.assert_close(samples.log_probs[:, k], old_ref, atol=2e-5, rtol=1e-6)
    ratio = torch.exp(lp - samples.log_probs[:, k]).detach()
    # |r - 1| ~ 1e-3 (the reference's scale; with the exact-density sum it would be ~0.5-1)
    dev = (ratio - 1).abs()
    assert float(dev.max()) < 1e-2 and float(dev.max()) > 1e-5, ratio
    torch.testing.assert_close(ratio, ratio_ref.detach(), atol=2e-5, rtol=0)
    assert float(loss.detach()) == pytest.approx(float(loss_ref.detach()), abs=2e-5)
    assert info["approx_kl"] == pytest.approx(float(kl_ref.detach()), rel=1e-2, abs=1e-9)
    assert info["clipfrac"] == pytest.approx(float(clipfrac_ref)) == 1.0  # |r - 1| > 1e-4: all clipped, as there
    assert info["ratio"] == pytest.approx(float(ratio_ref.detach().mean()), abs=2e-5)
    # the same gradient on the network output
    g = torch.autograd.grad(loss, den.model.out[str(t)])[0]
    g_ref = torch.autograd.grad(loss_ref, out_ref)[0]
    assert g_ref.abs().max() > 0
    torch.testing.assert_close(g, g_ref, atol=1e-3 * float(g_ref.abs().max()), rtol=1e-3)

    # the exact-density sum multiplies the log-ratio by C*H*W = 1024: far outside any ratio the reference sees
    lp_sum = gaussian_log_prob(samples.latents[:, k + 1], *_mean_std(den, samples, k, tok, mask), reduction="sum")
    old_sum = samples.log_probs[:, k] * math.prod(SHAPE[1:])
    torch.testing.assert_close(lp_sum - old_sum, (lp - samples.log_probs[:, k]).detach() * 1024, atol=5e-3, rtol=1e-3)


def _mean_std(den, samples, k, tok, mask):
    from distill.samplers import step_mean

    t, s = int(samples.timesteps[k]), int(samples.prev_timesteps[k])
    with torch.no_grad():
        mu, sigma, _ = step_mean(den, samples.latents[:, k], t, s, tok, mask, eta=1.0)
    return mu, sigma


def test_reduction_is_checked_and_kept_with_the_samples():
    den, tok, mask, g = setup("eps")
    x = torch.randn(SHAPE, generator=g)
    with pytest.raises(ValueError, match="reduction must be one of"):
        gaussian_log_prob(x, x, 1.0, reduction="none")
    with torch.no_grad():
        tr = stochastic_sample(den, x, tok, mask, TS, reduction="sum")
    s = DDPOSamples.from_trajectory(tr, tok, mask, ["a", "b", "c"])
    assert s.log_prob_reduction == "sum" and s.subset(torch.tensor([0, 2])).log_prob_reduction == "sum"
    with torch.no_grad():
        torch.testing.assert_close(transition_log_prob(den, s, 1), s.log_probs[:, 1], atol=1e-3, rtol=1e-5)
    with pytest.raises(ValueError, match="differs from"):
        transition_log_prob(den, s, 1, reduction="mean")
