"""One k-step sampler (``distill.samplers.k_step_sample``) and one schedule module (``lrm.schedules``).

The ``ref_*`` functions are verbatim copies of the loops and the LRM schedule that issue 18 replaced (at commit
0ffd4a7): ``samplers.student_sample``, ``direct.sample_with_grad``, ``vsd.backward_simulation``,
``DistillTrainer.sample``, ``FinetuneTrainer.sample`` and ``latent_rewards.layers.DDPMSchedule``. The new code must
give the same tensors, to the bit, for the same inputs and seeds.
"""

from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from distill.cd import consistency_output
from distill.denoiser import Denoiser
from distill.direct import sample_with_grad
from distill.generator import GeneratorTrainer
from distill.samplers import _descending, _randn_like, k_step_sample, student_sample
from distill.vsd import backward_simulation
from lrm.schedules import DDPMSchedule, FlowSchedule, schedule_from_dict

TS = [999, 749, 499, 249]


# ---- today's loops, copied as they were -------------------------------------------------------------------------
def ref_student_sample(denoiser, noise, text_tokens, text_mask=None, timesteps=(999, 749, 499, 249), generator=None,
                       guidance_scale=None):
    ts = _descending(timesteps, denoiser.schedule.num_train_timesteps)
    x = noise
    x0 = noise
    for k, t in enumerate(ts):
        x0 = denoiser.x0(x, t, text_tokens, text_mask, guidance_scale)
        if k + 1 < len(ts):
            x = denoiser.schedule.add_noise(x0, _randn_like(x0, generator), ts[k + 1])
    return x0


def ref_sample_with_grad(student_x0, noise, timesteps, schedule, grad_steps=1, checkpointing=False, generator=None):
    ts = [int(t) for t in timesteps]
    K = len(ts)
    if not 1 <= grad_steps <= K:
        raise ValueError(f"grad_steps must be in [1, {K}] for a {K}-step student, got {grad_steps}")
    B = noise.shape[0]
    x = noise
    x0 = noise
    for i, t in enumerate(ts):
        tt = torch.full((B,), t, device=noise.device, dtype=torch.long)
        graded = i >= K - grad_steps
        with (nullcontext() if graded else torch.no_grad()):
            if graded and checkpointing:
                x0 = checkpoint(student_x0, x, tt, use_reentrant=False)
            else:
                x0 = student_x0(x, tt)
            if i + 1 < K:
                eps = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device) \
                    if generator is not None else torch.randn_like(x0)
                x = schedule.add_noise(x0, eps, ts[i + 1])
    return x0


def ref_backward_simulation(student_x0, noise, timesteps, schedule, num_steps):
    if not 0 <= num_steps < len(timesteps):
        raise ValueError(f"num_steps must be in [0, {len(timesteps)}), got {num_steps}")
    B = noise.shape[0]
    x = noise
    with torch.no_grad():
        for i in range(num_steps):
            t = torch.full((B,), timesteps[i], device=noise.device, dtype=torch.long)
            x0 = student_x0(x, t)
            t_next = torch.full((B,), timesteps[i + 1], device=noise.device, dtype=torch.long)
            x = schedule.add_noise(x0.to(noise.dtype), torch.randn_like(noise), t_next)
    t = torch.full((B,), timesteps[num_steps], device=noise.device, dtype=torch.long)
    return x, t


@torch.no_grad()
def ref_distill_trainer_sample(self, noise, text_tokens, text_mask, generator=None):
    was = self.student.training
    self.student.eval()
    x = noise
    x0 = noise
    for i, t in enumerate(self.timesteps):
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        x0 = self.student_x0(x, tt, text_tokens, text_mask)
        if i + 1 < len(self.timesteps):
            eps = torch.randn(x0.shape, device=x0.device) if generator is None else \
                torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device)
            x = self.teacher.schedule.add_noise(x0, eps, self.timesteps[i + 1])
    self.student.train(was)
    return x0


@torch.no_grad()
def ref_finetune_trainer_sample(self, noise, tok, mask, generator=None):
    was = self.student.training
    self.student.eval()
    x0 = ref_sample_with_grad(lambda x, t: self.student_x0(x, t, tok, mask), noise.to(self.device), self.timesteps,
                              self.schedule, grad_steps=1, generator=generator)
    self.student.train(was)
    return x0


class RefLRMSchedule:
    """``latent_rewards.layers.DDPMSchedule`` as it was (its ``add_noise`` took ``(x0, t, noise)``)."""

    def __init__(self, num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 alphas_cumprod=None):
        if alphas_cumprod is not None:
            ac = torch.as_tensor(alphas_cumprod, dtype=torch.float32).reshape(-1)
            self.num_train_timesteps = len(ac)
            self.alphas_cumprod = ac
            self.beta_schedule = "custom"
            return
        self.beta_schedule = beta_schedule
        if beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float64) ** 2
        else:
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        self.num_train_timesteps = num_train_timesteps
        self.alphas_cumprod = torch.cumprod(1 - betas, 0).float()

    def to_dict(self):
        return {"num_train_timesteps": self.num_train_timesteps, "beta_schedule": self.beta_schedule,
                "alphas_cumprod": [round(float(a), 8) for a in self.alphas_cumprod]}

    def add_noise(self, x0, t, noise=None):
        abar = self.alphas_cumprod.to(x0.device)[t.long()]
        shape = (x0.shape[0],) + (1,) * (x0.dim() - 1)
        noise = torch.randn_like(x0) if noise is None else noise
        return abar.sqrt().view(shape).to(x0.dtype) * x0 + (1 - abar).sqrt().view(shape).to(x0.dtype) * noise


# ---- fixtures --------------------------------------------------------------------------------------------------
def tiny_denoiser(kind="conjugate_v", schedule=None, seed=0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    m = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                             layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
                             attention_head_dim=2, norm_num_groups=8)
    return Denoiser(m, schedule or DDPMSchedule(), kind)


@pytest.fixture(scope="module")
def den():
    return tiny_denoiser()


def inputs(B=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    tok = torch.randn(B, 5, 24, generator=g)
    mask = torch.ones(B, 5, dtype=torch.bool)
    mask[:, 3:] = False
    return torch.randn(B, 4, 8, 8, generator=g), tok, mask


def student_fn(den, tok, mask):
    """The trainers' consistency function f(x_t, t), fp32."""
    return lambda x, t: consistency_output(x, den.x0(x, t, tok, mask).float(), t)


def run_twice(new, ref, seed=11, gen_seed=None):
    """``(new(), ref())`` from the same global RNG state (and the same generator seed when given)."""
    outs = []
    for fn in (new, ref):
        torch.manual_seed(seed)
        g = None if gen_seed is None else torch.Generator().manual_seed(gen_seed)
        outs.append(fn(g))
    return outs


def grads(module):
    return [None if p.grad is None else p.grad.clone() for p in module.parameters()]


def assert_same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a, b), float((a - b).abs().max())


# ---- equality with today's loops -------------------------------------------------------------------------------
@pytest.mark.parametrize("gen_seed", [None, 5])
@pytest.mark.parametrize("guidance", [None, 3.0])
@pytest.mark.parametrize("timesteps", [TS, [249, 999, 499], [999]])
def test_student_sample_equals_todays_loop_with_its_graph(den, gen_seed, guidance, timesteps):
    noise, tok, mask = inputs()
    outs = []
    for fn in (student_sample, ref_student_sample):
        den.zero_grad()
        torch.manual_seed(11)
        g = None if gen_seed is None else torch.Generator().manual_seed(gen_seed)
        x0 = fn(den, noise, tok, mask, timesteps, generator=g, guidance_scale=guidance)
        (x0 ** 2).mean().backward()  # keeps autograd through every step
        outs.append((x0.detach(), grads(den.model), torch.randn(1)))
    assert_same_runs(*outs)



def assert_same_runs(a, b) -> None:
    """Two runs' ``(x0, gradients, the next random number)`` are identical (the RNG is left in the same state)."""
    assert_same(a[0], b[0])
    assert_same(a[2], b[2])
    for ga, gb in zip(a[1], b[1]):
        assert (ga is None) == (gb is None)
        if ga is not None:
            assert_same(ga, gb)

@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("grad_steps", [1, 2, 4])
@pytest.mark.parametrize("gen_seed", [None, 7])
def test_sample_with_grad_equals_todays_loop_and_its_gradients(den, checkpointing, grad_steps, gen_seed):
    noise, tok, mask = inputs()
    f = student_fn(den, tok, mask)
    outs = []
    for fn in (sample_with_grad, ref_sample_with_grad):
        den.zero_grad()
        torch.manual_seed(11)
        g = None if gen_seed is None else torch.Generator().manual_seed(gen_seed)
        x0 = fn(f, noise, TS, den.schedule, grad_steps, checkpointing, g)
        (x0 ** 2).mean().backward()
        outs.append((x0.detach(), grads(den.model), torch.randn(1)))  # the RNG is left in the same state too
    assert_same_runs(*outs)
    with pytest.raises(ValueError, match="grad_steps must be in"):
        sample_with_grad(f, noise, TS, den.schedule, grad_steps=0)


@pytest.mark.parametrize("num_steps", [0, 1, 2, 3])
def test_backward_simulation_equals_todays_loop(den, num_steps):
    noise, tok, mask = inputs()
    f = student_fn(den, tok, mask)
    (x, t), (rx, rt) = run_twice(lambda g: backward_simulation(f, noise, TS, den.schedule, num_steps),
                                 lambda g: ref_backward_simulation(f, noise, TS, den.schedule, num_steps))
    assert_same(x, rx)
    assert_same(t, rt)
    assert not x.requires_grad
    with pytest.raises(ValueError, match="num_steps must be in"):
        backward_simulation(f, noise, TS, den.schedule, 4)


def trainer_stub(den, timesteps=TS):
    """The attributes ``GeneratorTrainer.sample`` (``lrm distill`` and ``lrm finetune``) reads."""
    def student_x0(x, t, tok, mask):
        return consistency_output(x, den.x0(x, t, tok, mask).float(), t)

    return SimpleNamespace(student=den, timesteps=list(timesteps), teacher=SimpleNamespace(schedule=den.schedule),
                           schedule=den.schedule, device=torch.device("cpu"), student_x0=student_x0)


@pytest.mark.parametrize("gen_seed", [None, 9])
@pytest.mark.parametrize("timesteps", [TS, [999, 499]])
def test_trainer_sample_methods_equal_todays_loops(den, gen_seed, timesteps):
    noise, tok, mask = inputs()
    stub = trainer_stub(den, timesteps)
    den.train()
    for new, ref in ((GeneratorTrainer.sample, ref_distill_trainer_sample),
                     (GeneratorTrainer.sample, ref_finetune_trainer_sample)):
        a, b = run_twice(lambda g: new(stub, noise, tok, mask, g), lambda g: ref(stub, noise, tok, mask, g),
                         gen_seed=gen_seed)
        assert_same(a, b)
        assert den.training  # restored
    den.eval()


@pytest.mark.parametrize("schedule", [DDPMSchedule(), FlowSchedule()], ids=["ddpm", "flow"])
def test_one_loop_states_and_options(schedule):
    """``stop_at`` returns the input of step k; a full run's state is the last step's input; flow schedules too."""
    den = tiny_denoiser("flow" if isinstance(schedule, FlowSchedule) else "conjugate_v", schedule)
    noise, tok, mask = inputs()
    f = student_fn(den, tok, mask)
    calls = []

    def g(x, t):
        calls.append((x, t))
        return f(x, t)

    torch.manual_seed(2)
    full = k_step_sample(g, noise, TS, schedule)
    assert len(calls) == 4 and full.x_t is calls[-1][0] and full.t.tolist() == [249, 249]
    for k in range(4):
        calls.clear()
        torch.manual_seed(2)
        st = k_step_sample(g, noise, TS, schedule, stop_at=k, grad_steps=0)
        assert len(calls) == k and st.t.tolist() == [TS[k]] * 2
        if k:  # the state is the re-noised prediction of step k - 1, the same as in the full run
            torch.manual_seed(2)
            x_ref, _ = ref_backward_simulation(f, noise, TS, schedule, k)
            assert_same(st.x_t, x_ref)
        else:
            assert st.x_t is noise and st.x0 is noise
    with pytest.raises(ValueError, match="stop_at must be in"):
        k_step_sample(g, noise, TS, schedule, stop_at=4)
    with pytest.raises(ValueError, match="grad_steps must be in"):
        k_step_sample(g, noise, TS, schedule, stop_at=1, grad_steps=2)
    with pytest.raises(ValueError, match="must not be empty"):
        k_step_sample(g, noise, [], schedule)


# ---- one schedule ---------------------------------------------------------------------------------------------
def test_old_lrm_schedule_records_load_the_same():
    """A noise-aware LRM saved before issue 18 recorded ``RefLRMSchedule.to_dict()``; it loads to the same abar."""
    for old in (RefLRMSchedule(), RefLRMSchedule(beta_schedule="linear"),
                RefLRMSchedule(alphas_cumprod=torch.linspace(0.99, 0.1, 50))):
        rec = old.to_dict()
        old_loaded = RefLRMSchedule(alphas_cumprod=torch.tensor(rec["alphas_cumprod"]))  # LatentReward.noise_schedule
        for new in (DDPMSchedule(alphas_cumprod=torch.tensor(rec["alphas_cumprod"])), schedule_from_dict(rec)):
            assert new.num_train_timesteps == old.num_train_timesteps and new.beta_schedule == "custom"
            assert torch.equal(new.alphas_cumprod.float(), old_loaded.alphas_cumprod)
            x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
            t = torch.tensor([0, old.num_train_timesteps // 2, old.num_train_timesteps - 1])
            # a and b: sqrt in float64 rounded once (here) vs in float32 (before): at most 1 ulp apart
            assert torch.allclose(new.add_noise(x0, noise, t), old_loaded.add_noise(x0, t, noise), atol=2e-6, rtol=0)
            assert schedule_from_dict(new.to_dict()).alphas_cumprod.equal(new.alphas_cumprod)


def test_lrm_default_schedule_is_the_teachers():
    """``fit``'s default (the config's beta fields) is now diffusers' float32 betas, like the teacher's: within
    5e-7 of the float64 betas the LRM schedule used before."""
    new, old = DDPMSchedule(1000, "scaled_linear", 0.00085, 0.012), RefLRMSchedule()
    assert torch.allclose(new.alphas_cumprod.float(), old.alphas_cumprod, atol=5e-7, rtol=0)
    rec = new.to_dict(with_alphas_cumprod=True)
    assert rec["num_train_timesteps"] == 1000 and len(rec["alphas_cumprod"]) == 1000
    assert repr(schedule_from_dict(rec)) == repr(new)  # a named schedule comes back from its betas
