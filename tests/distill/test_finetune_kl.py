"""FinetuneConfig.beta_kl: the KL / reference penalty toward the frozen initial student, per method.

A toy x0-predicting network (per-timestep bias + scale * x) makes the student / reference gap analytic: shifting
the student's bias by delta shifts its x0 prediction by exactly delta at every state, so the penalty has a closed
form. With a zero reward the loss is the penalty alone and its gradient must pull the student back.
"""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from distill.denoiser import Denoiser
from distill.finetune import FinetuneConfig, FinetuneTrainer, PromptPool
from lrm.config import ConfigError
from lrm.schedules import DDPMSchedule

DELTA = torch.tensor([0.3, -0.2, 0.1, 0.0])  # per-channel bias shift of the student; channel 3 unshifted
HW = 16  # 4 x 4 latents
LR = 1e-2


class ToyNet(nn.Module):
    def __init__(self, C=4, scale=0.1):
        super().__init__()
        self.config = SimpleNamespace(cross_attention_dim=8, in_channels=C, sample_size=4)
        self.bias = nn.Parameter(0.1 * torch.randn(1000, C))
        self.scale = scale

    def forward(self, sample, timestep, encoder_hidden_states=None, encoder_attention_mask=None):
        b = self.bias[timestep.long()][:, :, None, None]  # (B, C, 1, 1)
        return SimpleNamespace(sample=b + self.scale * sample)


class FakeVAE:
    def decode(self, z, clamp=True):
        x = z[:, :3]
        return x.clamp(0, 1) if clamp else x


class MeanReward:
    name, modality, differentiable = "mean", "image", True

    def __init__(self, scale=1.0):
        self.scale = scale

    def __call__(self, pixels, prompts=None):
        return self.scale * pixels.flatten(1).mean(1)


def pool(n=4):
    g = torch.Generator().manual_seed(0)
    return PromptPool(torch.randn(n, 3, 8, generator=g), torch.ones(n, 3, dtype=torch.bool),
                      [f"p{i % 2}" for i in range(n)])


def trainer(tmp_path, method, beta_kl, reward_scale=0.0, student_steps=1, ddpo_grad_steps=1, **kw):
    torch.manual_seed(0)
    init = Denoiser(ToyNet(), DDPMSchedule(), "x0")
    cfg = FinetuneConfig(method=method, run_dir=str(tmp_path / method), device="cpu", student_steps=student_steps,
                         batch_size=4, sample_batch_size=4, num_sample_batches=1, train_batch_size=4, lr=LR,
                         max_grad_norm=0.0, eval_every=0, num_eval=2, ckpt_every=0, sample_every=0, progress=False,
                         async_reward=False, beta_kl=beta_kl, ddpo_grad_steps=ddpo_grad_steps, **kw)
    lrm = (lambda z, tok, mask: reward_scale * z.flatten(1).mean(1)) if method == "lrm" else None
    torch.manual_seed(1)
    return FinetuneTrainer(cfg, init, pool(), MeanReward(reward_scale), FakeVAE(), lrm=lrm)


def shift_student(tr):
    with torch.no_grad():
        tr.student.model.bias += DELTA


def c_out(t, sigma_data=0.5, scaling=10.0):
    ts = t * scaling
    return ts / math.sqrt(ts ** 2 + sigma_data ** 2)


@pytest.mark.parametrize("method", ["lrm", "direct"])
def test_x0_penalty_equals_hand_computed_and_pulls_back(tmp_path, method):
    tr = trainer(tmp_path, method, beta_kl=0.5)
    assert tr.ref is not None and not any(p.requires_grad for p in tr.ref.parameters())
    shift_student(tr)
    ref_bias = tr.ref.model.bias.detach().clone()
    row = tr.train_step()
    # one step at t = 999: x_hat - x_hat_ref = c_out(999) * delta everywhere; kl = ||.||^2 / 2 per sample
    kl = c_out(999) ** 2 * HW * float((DELTA ** 2).sum()) / 2
    assert row["kl"] == pytest.approx(kl, rel=1e-5)
    assert row["loss"] == pytest.approx(0.5 * kl, rel=1e-5)  # zero reward: the loss is the penalty
    gap = tr.student.model.bias.detach() - ref_bias
    # Adam's first step moves each shifted entry of row 999 by lr toward the reference; nothing else moves
    torch.testing.assert_close(gap[999], DELTA - LR * torch.sign(DELTA), atol=1e-6, rtol=0)
    torch.testing.assert_close(gap[:999], DELTA.expand(999, 4), atol=1e-7, rtol=0)
    tr.close()


def _step_kl(schedule, t, s, eta=1.0):
    """Closed-form per-step KL factor: mu_theta - mu_ref = (a_s - sqrt(b_s^2 - sigma^2) a_t / b_t) delta."""
    a_t, b_t, a_s, b_s = (float(schedule.a(t)), float(schedule.b(t)), float(schedule.a(s)), float(schedule.b(s)))
    var = eta ** 2 * (b_s ** 2 / b_t ** 2) * (b_t ** 2 - (a_t / a_s) ** 2 * b_s ** 2)
    c = a_s - math.sqrt(b_s ** 2 - var) * a_t / b_t
    return c ** 2 * HW * float((DELTA ** 2).sum()) / (2 * var)


def test_ddpo_chain_kl_equals_hand_computed_and_pulls_back(tmp_path):
    # 2-step student [999, 499] -> 0; gradients only on the last transition (499 -> 0)
    tr = trainer(tmp_path, "ddpo", beta_kl=1e-3, student_steps=2, ddpo_grad_steps=1)
    shift_student(tr)
    ref_bias = tr.ref.model.bias.detach().clone()
    row = tr.train_step()
    kl999, kl499 = _step_kl(tr.schedule, 999, 499), _step_kl(tr.schedule, 499, 0)
    assert row["kl"] == pytest.approx(kl999 + kl499, rel=1e-4)  # logged: the full chain's KL
    assert row["loss"] == pytest.approx(1e-3 * kl499, rel=1e-4)  # zero reward -> zero advantages; penalty only
    gap = tr.student.model.bias.detach() - ref_bias
    torch.testing.assert_close(gap[499], DELTA - LR * torch.sign(DELTA), atol=1e-6, rtol=0)
    torch.testing.assert_close(gap[999], DELTA, atol=1e-7, rtol=0)  # truncated: the first step gets no gradient
    tr.close()


@pytest.mark.parametrize("method", ["lrm", "direct", "ddpo"])
def test_beta_kl_zero_changes_nothing(tmp_path, method):
    off = trainer(tmp_path / "off", method, beta_kl=0.0, reward_scale=1.0, student_steps=2)
    assert off.ref is None
    r_off = off.train_step()
    assert "kl" not in r_off
    # beta_kl > 0 from the initial model: the penalty and its gradient are exactly 0 at the first step, so the
    # update (reward term, RNG stream, optimizer) must be bit-identical to beta_kl = 0
    on = trainer(tmp_path / "on", method, beta_kl=10.0, reward_scale=1.0, student_steps=2)
    r_on = on.train_step()
    assert r_on["kl"] == 0.0 and r_on["loss"] == r_off["loss"]
    assert torch.equal(on.student.model.bias, off.student.model.bias)
    assert not torch.equal(off.student.model.bias, on.ref.model.bias)  # the reward did move the student
    off.close()
    on.close()


def test_beta_kl_config_and_log_column(tmp_path):
    from distill.finetune import LOG_COLUMNS

    assert "kl" in LOG_COLUMNS
    with pytest.raises(ConfigError, match="beta_kl must be >= 0"):
        FinetuneConfig(beta_kl=-0.1)
