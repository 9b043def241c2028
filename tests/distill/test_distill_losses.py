"""Hand-computed values for the distillation losses (VSD, CD, LRM-FT), the EMA and backward simulation."""

import math

import pytest
import torch
import torch.nn as nn

from distill.cd import (
    boundary_scalings,
    cd_distance,
    cd_inputs_and_target,
    consistency_output,
    ddim_grid,
    teacher_multistep,
)
from distill.ema import EMA, ema_update
from distill.lrm_ft import ConcurrentLRM, lrm_ft_loss
from distill.vsd import (
    backward_simulation,
    fake_score_loss,
    normalized_vsd_grad,
    sample_timesteps,
    vsd_loss,
    vsd_loss_from_grad,
)
from lrm.schedules import DDPMSchedule


class ConstDenoiser:
    """x0 prediction = a constant tensor, whatever the input (records the guidance scale it was asked for)."""

    def __init__(self, value, schedule=None, parameterization="conjugate_v"):
        self.value = value
        self.schedule = schedule or DDPMSchedule()
        self.parameterization = parameterization
        self.calls = []

    def x0(self, x_t, t, tokens, mask=None, guidance_scale=None, null_tokens=None, null_mask=None):
        self.calls.append((t.clone(), guidance_scale))
        return self.value.expand_as(x_t).clone() if torch.is_tensor(self.value) else torch.full_like(x_t, self.value)


def test_vsd_gradient_normalisation_by_hand():
    x_hat = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    real = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    fake = torch.tensor([[0.5, 1.0], [2.0, 0.0]])
    # sample 0: mean|x - real| = (1 + 2)/2 = 1.5 ; sample 1: (1 + 2)/2 = 1.5
    want = torch.tensor([[0.5 / 1.5, 1.0 / 1.5], [1.0 / 1.5, -1.0 / 1.5]])
    g = normalized_vsd_grad(x_hat, real, fake)
    assert torch.allclose(g, want)
    g64 = normalized_vsd_grad(x_hat, real, fake, dtype=torch.float64)
    assert g64.dtype == torch.float64 and torch.allclose(g64.float(), want)
    x = x_hat.clone().requires_grad_(True)
    loss = vsd_loss_from_grad(x, g)
    assert math.isclose(float(loss.detach()), 0.5 * float((want ** 2).mean()), rel_tol=1e-6)
    loss.backward()
    assert torch.allclose(x.grad, want / want.numel())  # d/dx 0.5 mean((x - sg(x - g))^2) = g / numel


def test_vsd_loss_uses_cfg_teacher_and_plain_fake():
    torch.manual_seed(0)
    x_hat = torch.randn(3, 4, 2, 2, requires_grad=True)
    teacher, fake = ConstDenoiser(0.0), ConstDenoiser(1.0)
    tok, mask = torch.zeros(3, 2, 8), torch.ones(3, 2, dtype=torch.bool)
    loss, info = vsd_loss(x_hat, teacher, fake, tok, mask, None, None, guidance_scale=3.5)
    w = x_hat.detach().abs().mean(dim=(1, 2, 3), keepdim=True)
    grad = (1.0 - 0.0) / w.expand_as(x_hat)
    assert math.isclose(float(loss), 0.5 * float((grad ** 2).mean()), rel_tol=1e-5)
    assert teacher.calls[0][1] == 3.5 and fake.calls[0][1] is None
    t = teacher.calls[0][0]
    assert ((t >= 20) & (t <= 980)).all()


def test_vsd_timestep_range():
    torch.manual_seed(0)
    t = sample_timesteps(20000)
    assert int(t.min()) == 20 and int(t.max()) == 980


def test_fake_score_loss_is_teacher_objective():
    torch.manual_seed(0)
    sched = DDPMSchedule()
    x0 = torch.randn(2, 4, 2, 2)
    noise = torch.randn_like(x0)
    t = torch.tensor([100, 700])

    class Zero(nn.Module):
        schedule, parameterization = sched, "conjugate_v"

        def forward(self, x, t, tok, mask):
            return torch.zeros_like(x)

    loss = fake_score_loss(Zero(), x0, torch.zeros(2, 1, 8), None, t=t, noise=noise)
    assert math.isclose(float(loss), float(((x0 - noise) ** 2).mean()), rel_tol=1e-6)  # target x0 - eps (Eq. 13)


def test_boundary_scalings_by_hand():
    t = torch.tensor([-1, 0, 19, 999])
    c_skip, c_out = boundary_scalings(t)
    assert torch.allclose(c_skip[:2], torch.ones(2)) and torch.allclose(c_out[:2], torch.zeros(2))
    assert math.isclose(float(c_skip[2]), 0.25 / (190.0 ** 2 + 0.25), rel_tol=1e-5)
    assert math.isclose(float(c_out[2]), 190.0 / math.sqrt(190.0 ** 2 + 0.25), rel_tol=1e-6)
    assert math.isclose(float(c_skip[3]), 0.25 / (9990.0 ** 2 + 0.25), rel_tol=1e-5)
    x, x0 = torch.full((4, 1), 2.0), torch.full((4, 1), 3.0)
    f = consistency_output(x, x0, t)
    assert torch.allclose(f[:, 0], 2.0 * c_skip + 3.0 * c_out)


def test_ddim_grid():
    g = ddim_grid(1000, 50)
    assert g.tolist() == list(range(19, 1000, 20)) and g.numel() == 50


def test_cd_target_by_hand_one_teacher_step():
    sched = DDPMSchedule()
    grid = ddim_grid()
    teacher, target_net = ConstDenoiser(0.0, sched), ConstDenoiser(0.0, sched)
    x0 = torch.randn(2, 4, 2, 2)
    noise = torch.randn_like(x0)
    index = torch.tensor([10, 0])  # t_{n+1} = 219 -> t_n = 199 ; 19 -> clean end point (-1)
    tok = torch.zeros(2, 1, 8)
    x_s, t_s, target = cd_inputs_and_target(x0, teacher, lambda x, t: target_net.x0(x, t, tok), tok, None, None,
                                            None, grid, num_teacher_steps=1, guidance_scale=7.5, index=index,
                                            noise=noise)
    assert t_s.tolist() == [219, 19]
    a, b = sched.a(t_s), sched.b(t_s)
    assert torch.allclose(x_s, a.view(2, 1, 1, 1) * x0 + b.view(2, 1, 1, 1) * noise)
    # teacher x0 = 0 -> eps_hat = x / b_t, DDIM: x_prev = b_prev x / b_t; target = c_skip(t_n) x_prev (+ c_out * 0)
    x_prev0 = x_s[0] * sched.b(torch.tensor([199]))[0] / b[0]
    c_skip, _ = boundary_scalings(torch.tensor([199]))
    assert torch.allclose(target[0], c_skip[0] * x_prev0, atol=1e-7)
    assert torch.allclose(target[1], torch.zeros_like(target[1]))  # clean end point: x_prev = x0_hat = 0, c_skip=1
    assert all(g == 7.5 for _, g in teacher.calls)


def test_cd_multistep_teacher_walks_the_grid():
    sched = DDPMSchedule()
    grid = ddim_grid()
    teacher = ConstDenoiser(0.0, sched)
    x = torch.ones(3, 1, 1, 1)
    index = torch.tensor([49, 7, 2])
    x_hat, t_n = teacher_multistep(teacher, x, index, grid, 5, torch.zeros(3, 1, 8), None, None, None)
    assert t_n.tolist() == [899, 59, -1]
    ratio = sched.b(torch.tensor([899]))[0] / sched.b(torch.tensor([999]))[0]  # telescoping b_prev / b_t
    assert torch.allclose(x_hat[0], x[0] * ratio, atol=1e-6)
    assert float(x_hat[2].abs().max()) == 0.0


def test_cd_distances_by_hand():
    pred = torch.tensor([3e-3, 0.0, -4e-3, 1.0])
    tgt = torch.zeros(4)
    c = 1e-3
    want = sum(math.sqrt(d * d + c * c) - c for d in pred.tolist()) / 4
    assert math.isclose(float(cd_distance(pred, tgt, "huber", c)), want, rel_tol=1e-5)
    assert math.isclose(float(cd_distance(pred, tgt, "l2")), float((pred ** 2).mean()), rel_tol=1e-6)
    with pytest.raises(ValueError, match="huber"):
        cd_distance(pred, tgt, "l1")


def test_lrm_ft_is_minus_mean_reward():
    x = torch.tensor([[1.0, 2.0], [3.0, 5.0]], requires_grad=True)
    lrm = lambda lat, tok, mask: lat.sum(dim=1)  # rewards 3, 8
    loss, r = lrm_ft_loss(lrm, x, None, None)
    assert math.isclose(float(loss), -5.5) and r.tolist() == [3.0, 8.0]
    loss.backward()
    assert torch.allclose(x.grad, torch.full_like(x, -0.5))
    with pytest.raises(ValueError, match=r"\(B,\)"):
        lrm_ft_loss(lambda lat, tok, mask: lat, x, None, None)


def test_concurrent_lrm_regresses_pixel_reward():
    torch.manual_seed(0)

    class Head(nn.Module):
        needs_text = False

        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 1)

        def forward(self, x):
            return self.lin(x.flatten(1)).squeeze(-1)

    class IdVAE:
        def decode(self, z, clamp=True):
            return z

    head = Head()
    reward = lambda pixels, prompts: pixels.sum(dim=1)
    c = ConcurrentLRM(head, torch.optim.Adam(head.parameters(), lr=0.05), reward, IdVAE())
    x = torch.randn(16, 4)
    want = float(((head(x) - x.sum(1)) ** 2).mean())
    assert math.isclose(float(c.loss(x, None, None, [""] * 16)), want, rel_tol=1e-5)
    first = c.step(x, None, None, [""] * 16)
    for _ in range(100):
        last = c.step(x, None, None, [""] * 16)
    assert last < 0.05 * first


def test_concurrent_lrm_standardises_targets_and_answers_in_reward_units():
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(4, 1), nn.Flatten(0))
    head.needs_text = False

    class IdVAE:
        def decode(self, z, clamp=True):
            return z

    reward = lambda pixels, prompts: 1000.0 + 50.0 * pixels.sum(dim=1)  # far from unit scale
    c = ConcurrentLRM(head, torch.optim.Adam(head.parameters(), lr=0.05), reward, IdVAE())
    x = torch.randn(64, 4)
    y = reward(x, None)
    for _ in range(300):
        c.step(x, None, None, [""] * 64)
    mean, std = c.stats.mean_std()
    assert math.isclose(mean, float(y.double().mean()), rel_tol=1e-9)
    assert math.isclose(std, float(y.double().std(unbiased=False)), rel_tol=1e-6)
    # the head regresses (y - mean) / std; calling the LRM gives rewards in the reward's units
    assert float((head(x) - (y - mean) / std).abs().max()) < 0.05
    assert float((c(x) - y).abs().max()) < 0.05 * std
    x.requires_grad_(True)
    c(x).sum().backward()  # d(reward)/dx = 50 per input in reward units
    assert torch.allclose(x.grad, torch.full_like(x, 50.0), rtol=0.05)
    raw = ConcurrentLRM(head, torch.optim.Adam(head.parameters(), lr=0.05), reward, IdVAE(), standardize=False)
    raw.step(x, None, None, [""] * 64)
    assert torch.allclose(raw(x), head(x))  # no rescaling when standardize=False


def test_ema_update_by_hand():
    a, b = nn.Linear(2, 1), nn.Linear(2, 1)
    with torch.no_grad():
        a.weight.fill_(1.0)
        b.weight.fill_(3.0)
    ema_update(a, b, 0.95)
    assert torch.allclose(a.weight, torch.full_like(a.weight, 0.95 * 1 + 0.05 * 3))
    e = EMA(b, 0.5)
    with torch.no_grad():
        b.weight.fill_(5.0)
    e.update(b)
    assert torch.allclose(e.shadow.weight, torch.full_like(b.weight, 4.0))
    assert not any(p.requires_grad for p in e.shadow.parameters())


def test_backward_simulation_renoises_student_prediction():
    torch.manual_seed(0)
    sched = DDPMSchedule()
    noise = torch.randn(2, 1, 2, 2)
    x, t = backward_simulation(lambda x, t: torch.zeros_like(x), noise, [999, 749, 499, 249], sched, 0)
    assert torch.equal(x, noise) and t.tolist() == [999, 999]
    torch.manual_seed(1)
    x, t = backward_simulation(lambda x, t: torch.zeros_like(x), noise, [999, 749, 499, 249], sched, 2)
    torch.manual_seed(1)
    _ = torch.randn_like(noise)
    want = sched.b(torch.tensor([499]))[0] * torch.randn_like(noise)  # x0 = 0 re-noised to 499
    assert t.tolist() == [499, 499] and torch.allclose(x, want)
