"""TDM (paper 004 §3.2): stage / tau bounds, the re-noising kernel, pseudo-Huber and the losses against hand values,
and gradient routing on tiny UNets (DDPM and flow teachers)."""

import copy
import math

import pytest
import torch
import torch.nn as nn

from distill.denoiser import Denoiser
from distill.samplers import STUDENT_TIMESTEPS, ddim_step
from distill.tdm import (
    Renoised,
    fake_score_loss,
    generator_target,
    importance_weight,
    paper_huber_c,
    pick_stage_inputs,
    pseudo_huber,
    renoise,
    sample_stage,
    stage_bounds,
    student_timesteps,
    tdm_generator_loss,
    tdm_loss_from_x0,
    transition,
)
from lrm.schedules import DDPMSchedule, FlowSchedule
from tests.tiny_distill import tiny_unet


# ---- stages and tau ----------------------------------------------------------------------------------------
def test_stage_bounds_by_hand():
    assert stage_bounds(4, 1000) == ([249, 499, 749, 999], [0, 250, 500, 750])
    assert stage_bounds(4, 900) == ([224, 449, 674, 899], [0, 225, 450, 675])  # the public code's T = 900
    assert stage_bounds(2, 1000) == ([499, 999], [0, 500])
    assert stage_bounds(1, 1000) == ([999], [0])
    assert student_timesteps(4) == [999, 749, 499, 249] == sorted(STUDENT_TIMESTEPS[4], reverse=True)
    with pytest.raises(ValueError, match="num_stages"):
        stage_bounds(0)


@pytest.mark.parametrize("K,want", [(4, {1: (20, 238), 2: (250, 488), 3: (500, 738), 4: (750, 988)}),
                                    (2, {1: (20, 488), 2: (500, 988)}), (1, {1: (20, 988)})])
def test_sample_stage_tau_bounds(K, want):
    g = torch.Generator().manual_seed(0)
    k, t_start, t_end, tau = sample_stage(40000, K, 1000, generator=g)
    starts, ends = stage_bounds(K, 1000)
    assert set(k.tolist()) == set(range(1, K + 1))
    for j, (lo, hi) in want.items():
        sel = k == j
        assert (t_start[sel] == starts[j - 1]).all() and (t_end[sel] == ends[j - 1]).all()
        assert int(tau[sel].min()) == lo and int(tau[sel].max()) == hi  # [max(20, e_k), tau_k - 10)
    _, _, _, tau_all = sample_stage(40000, K, 1000, separate=False, generator=g)
    assert int(tau_all.max()) == 989  # README mode 2: up to T - 10 (exclusive)


def test_sample_stage_refuses_empty_ranges():
    with pytest.raises(ValueError, match="empty tau range"):
        sample_stage(4, 50, 1000)  # stage 1 starts at 19 < min_t


def test_pick_stage_inputs():
    points = [torch.full((3, 2), float(i + 1)) for i in range(4)]  # points[i] at tau_{i+1}
    out = pick_stage_inputs(points, torch.tensor([4, 1, 2]))
    assert out[:, 0].tolist() == [4.0, 1.0, 2.0]


# ---- the re-noising kernel ----------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", [DDPMSchedule(), FlowSchedule()], ids=["ddpm", "flow"])
def test_transition_keeps_the_marginal(schedule):
    g = torch.Generator().manual_seed(0)
    n = 400000
    mu, s = 0.7, 0.5
    x0 = mu + s * torch.randn(n, 1, generator=g, dtype=torch.float64)
    t_m, t = torch.full((n,), 250), torch.full((n,), 600)
    x_m = schedule.add_noise(x0, torch.randn(n, 1, generator=g, dtype=torch.float64), t_m)
    x_t = transition(x_m, t_m, t, schedule, torch.randn(n, 1, generator=g, dtype=torch.float64))
    a, b = float(schedule.a(600)), float(schedule.b(600))
    assert abs(float(x_t.mean()) - a * mu) < 5e-3
    assert abs(float(x_t.var()) - (a * a * s * s + b * b)) < 5e-3
    with pytest.raises(ValueError, match="less noisy"):
        transition(x_m[:2], t[:2], t_m[:2], schedule, torch.zeros(2, 1))


@pytest.mark.parametrize("schedule", [DDPMSchedule(), FlowSchedule()], ids=["ddpm", "flow"])
def test_renoise_by_hand(schedule):
    torch.manual_seed(0)
    x0, eps, xi = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t_start, t_end, tau = torch.tensor([999, 499, 249]), torch.tensor([750, 250, 0]), torch.tensor([800, 300, 20])
    x_start = schedule.add_noise(x0, eps, t_start)
    r = renoise(x0, x_start, t_start, t_end, tau, schedule, noise=xi)
    assert torch.allclose(r.x_end, schedule.add_noise(x0, eps, t_end), atol=1e-5)  # eps_hat recovered
    v = lambda f, t: f(t).view(-1, 1, 1, 1)  # noqa: E731
    a_e, b_e, a_t, b_t = v(schedule.a, t_end), v(schedule.b, t_end), v(schedule.a, tau), v(schedule.b, tau)
    beta = (b_t ** 2 - (a_t * b_e / a_e) ** 2).sqrt()
    assert torch.allclose(r.x_tau, a_t / a_e * r.x_end + beta * xi, atol=1e-5)
    mixed = (eps * a_t / a_e * b_e + beta * xi) / b_t  # the code's obtain_mixed_noise
    assert torch.allclose(r.noise_total, mixed, atol=1e-4)


# ---- distances and losses by hand ---------------------------------------------------------------------------
def test_pseudo_huber_by_hand():
    delta = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    assert torch.allclose(pseudo_huber(delta, c=1.0), torch.tensor([math.sqrt(26.0) - 1.0, 0.0]))
    assert math.isclose(paper_huber_c(4 * 16 * 64 * 64), 0.00054 * 512.0)
    c = 0.00054 * math.sqrt(2)
    assert math.isclose(float(pseudo_huber(delta)[0]), math.sqrt(25 + c * c) - c, rel_tol=1e-6)


def test_generator_target_split_cfg_equals_guided():
    x0, real, fake, unc = torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([0.5]), torch.tensor([3.0])
    y = generator_target(x0, real, fake, unc, guidance_scale=4.5)
    assert float(y) == pytest.approx(1.0 + 1.5 + 3.5 * (2.0 - 3.0))  # = x0 + (unc + s (real - unc)) - fake
    assert float(generator_target(x0, unc + 4.5 * (real - unc), fake)) == pytest.approx(float(y))
    with pytest.raises(ValueError, match="x0_uncond"):
        generator_target(x0, real, fake, guidance_scale=2.0)


def test_tdm_losses_by_hand():
    x0 = torch.tensor([[1.0, 2.0], [0.0, -1.0]], requires_grad=True)
    real = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    fake = torch.tensor([[0.5, 1.0], [2.0, 0.0]])
    delta = fake - real  # x0_hat - y
    c = 0.00054 * math.sqrt(2)
    norms = delta.norm(dim=1)
    want = float((torch.sqrt(norms ** 2 + c * c) - c).mean())
    loss = tdm_loss_from_x0(x0, real, fake, "paper")
    assert math.isclose(float(loss.detach()), want, rel_tol=1e-6)
    loss.backward()
    assert torch.allclose(x0.grad, delta / torch.sqrt(norms ** 2 + c * c)[:, None] / 2)
    # the code's variant: elementwise, c = 1e-3, over w = mean|x0_hat - x0_real,cfg| (1.5 for both samples)
    w = torch.tensor([[1.5], [1.5]])
    want_code = float(((torch.sqrt(delta ** 2 + 1e-6) - 1e-3) / w).mean())
    assert math.isclose(float(tdm_loss_from_x0(x0, real, fake, "code").detach()), want_code, rel_tol=1e-6)
    with pytest.raises(ValueError, match="distance"):
        tdm_loss_from_x0(x0, real, fake, "l1")


class ConstX0:
    def __init__(self, value, schedule):
        self.value, self.schedule, self.calls = value, schedule, []

    def x0(self, x_t, t, tokens, mask=None, guidance_scale=None, null_tokens=None, null_mask=None):
        self.calls.append(guidance_scale)
        return torch.full_like(x_t, self.value)


def test_tdm_generator_loss_calls_cfg_teacher_and_plain_fake():
    sch = DDPMSchedule()
    x0 = torch.zeros(2, 4, 2, 2, requires_grad=True)
    r = Renoised(torch.randn(2, 4, 2, 2), torch.tensor([300, 600]), None, None, None)
    teacher, fake = ConstX0(1.0, sch), ConstX0(0.0, sch)
    loss, info = tdm_generator_loss(x0, r, teacher, fake, torch.zeros(2, 1, 8), None, guidance_scale=4.5)
    c = paper_huber_c(16)
    assert math.isclose(float(loss.detach()), math.sqrt(16.0 + c * c) - c, rel_tol=1e-6)  # ||delta|| = sqrt(16 * 1^2)
    assert teacher.calls == [4.5] and fake.calls == [None] and info["tdm_real_fake_gap"] == 1.0


def test_fake_score_loss_by_hand():
    torch.manual_seed(0)

    class Zero(nn.Module):
        def __init__(self, schedule, parameterization):
            super().__init__()
            self.schedule, self.parameterization = schedule, parameterization

        def forward(self, x, t, tok, mask):
            return torch.zeros_like(x)

    x0 = torch.randn(2, 4, 2, 2)
    tau = torch.tensor([100, 900])
    n, xi = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    ddpm = DDPMSchedule()
    r = Renoised(ddpm.add_noise(x0, n, tau), tau, None, n, xi)
    isw = torch.exp(-0.5 * (n ** 2).flatten(1).mean(1)) / torch.exp(-0.5 * (xi ** 2).flatten(1).mean(1))
    assert torch.allclose(importance_weight(n, xi), isw)
    snr = (ddpm.a(tau) / ddpm.b(tau)) ** 2
    per = (x0 ** 2).flatten(1).mean(1)  # x0 parameterisation, output 0 -> ||0 - x0||^2
    tok = torch.zeros(2, 1, 8)
    want = float((per * snr.clamp_max(5) * isw).mean())
    assert math.isclose(float(fake_score_loss(Zero(ddpm, "x0"), x0, r, tok, None)), want, rel_tol=1e-5)
    assert math.isclose(float(fake_score_loss(Zero(ddpm, "x0"), x0, r, tok, None, snr_cap=None, importance=False)),
                        float(per.mean()), rel_tol=1e-5)
    flow = FlowSchedule()  # Eq. 10: target n - x0 (velocity), output 0
    rf = Renoised(flow.add_noise(x0, n, tau), tau, None, n, xi)
    per_v = ((n - x0) ** 2).flatten(1).mean(1)
    got = fake_score_loss(Zero(flow, "flow"), x0, rf, tok, None, target="native", importance=False)
    assert math.isclose(float(got), float((per_v * flow.snr(tau).clamp_max(5)).mean()), rel_tol=1e-5)


# ---- gradient routing on tiny UNets --------------------------------------------------------------------------
def _models(kind):
    torch.manual_seed(0)
    sch, par = (DDPMSchedule(), "eps") if kind == "ddpm" else (FlowSchedule(), "flow")
    teacher = Denoiser(tiny_unet(), sch, par).requires_grad_(False)
    return teacher, copy.deepcopy(teacher).requires_grad_(True), copy.deepcopy(teacher).requires_grad_(True)


def _step_inputs(student, K=4, B=2):
    g = torch.Generator().manual_seed(1)
    tok, mask = torch.randn(B, 3, 8, generator=g), torch.ones(B, 3, dtype=torch.bool)
    ts = student_timesteps(K)
    x, points = torch.randn(B, 4, 8, 8, generator=g), []
    with torch.no_grad():  # the student's own deterministic trajectory (DDIM eta = 0)
        for t, s in zip(ts, ts[1:] + [-1]):
            points.append(x)
            x = ddim_step(student, x, t, s, tok, mask)
    k, t_start, t_end, tau = sample_stage(B, K, generator=g)
    x_start = pick_stage_inputs(points[::-1], k)
    x0_hat = student.x0(x_start, t_start, tok, mask)
    return x0_hat, renoise(x0_hat, x_start, t_start, t_end, tau, student.schedule), tok, mask


@pytest.mark.parametrize("kind", ["ddpm", "flow"])
def test_gradients_reach_the_student_only_and_a_step_changes_it(kind):
    teacher, student, fake = _models(kind)
    x0_hat, r, tok, mask = _step_inputs(student)
    loss, _ = tdm_generator_loss(x0_hat, r, teacher, fake, tok, mask, guidance_scale=4.5)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters()) and all(p.grad is None for p in fake.parameters())
    assert sum(float(p.grad.abs().sum()) for p in student.parameters() if p.grad is not None) > 0
    before = [p.detach().clone() for p in student.parameters()]
    torch.optim.SGD(student.parameters(), lr=1e-2).step()
    assert any(not torch.equal(a, p) for a, p in zip(before, student.parameters()))
    student.zero_grad()
    fl = fake_score_loss(fake, x0_hat, r, tok, mask)  # the fake learns from its own loss only
    fl.backward()
    assert all(p.grad is None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert sum(float(p.grad.abs().sum()) for p in fake.parameters() if p.grad is not None) > 0
