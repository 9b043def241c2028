"""Adversarial term (paper 004 §3.3): hinge losses against hand values, teacher-feature hooks on tiny UNet2D/3D
teachers, and gradient routing (heads learn from L_D, the student from L_G, the teacher never)."""

import copy

import pytest
import torch

from distill.denoiser import Denoiser
from distill.gan import (
    Discriminator,
    block_order,
    default_blocks,
    discriminator_loss,
    generator_adv_loss,
    hinge_d_loss,
    hinge_g_loss,
    teacher_features,
)
from lrm.schedules import DDPMSchedule, FlowSchedule
from tests.tiny_distill import tiny_unet


def tiny_unet3d():
    from diffusers import UNet3DConditionModel

    return UNet3DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                                up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), cross_attention_dim=8,
                                attention_head_dim=2, norm_num_groups=8)


def make_teacher(video=False, schedule=None):
    torch.manual_seed(0)
    model = tiny_unet3d() if video else tiny_unet()
    return Denoiser(model, schedule or DDPMSchedule(), "eps").requires_grad_(False)


def inputs(B=2, video=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (B, 3, 4, 8, 8) if video else (B, 4, 8, 8)
    return torch.randn(*shape, generator=g), torch.randn(B, 3, 8, generator=g), torch.ones(B, 3, dtype=torch.bool)


def test_hinge_losses_by_hand():
    real = [torch.tensor([[2.0, 0.5]]), torch.tensor([[-1.0]])]
    fake = [torch.tensor([[-2.0, 0.0]]), torch.tensor([[0.5]])]
    # head 1: real relu(1-2)=0, relu(1-0.5)=0.5 -> 0.25; fake relu(1-2)=0, relu(1+0)=1 -> 0.5 ; sum 0.75
    # head 2: real relu(1+1)=2; fake relu(1+0.5)=1.5 ; sum 3.5 ; mean over heads 2.125
    assert float(hinge_d_loss(real, fake)) == pytest.approx(2.125)
    # G: -(mean(-2, 0) + mean(0.5)) / 2 = -(-1 + 0.5) / 2 = 0.25
    assert float(hinge_g_loss(fake)) == pytest.approx(0.25)


def test_block_names_and_early_stop():
    teacher = make_teacher()
    x, tok, mask = inputs()
    assert default_blocks(teacher) == ["down.0", "down.1", "mid"]
    assert block_order(teacher.model)[-2:] == ["up.0", "up.1"]
    calls = []
    h = teacher.model.up_blocks[0].register_forward_hook(lambda *a: calls.append(1))
    t = torch.tensor([100, 700])
    feats = teacher_features(teacher, x, t, tok, mask, default_blocks(teacher))
    assert calls == []  # the forward stopped after the mid block
    assert {n: tuple(f.shape) for n, f in feats.items()} == {"down.0": (2, 16, 4, 4), "down.1": (2, 32, 4, 4),
                                                             "mid": (2, 32, 4, 4)}
    ref = {}
    h2 = teacher.model.mid_block.register_forward_hook(lambda m, i, o: ref.setdefault("mid", o))
    teacher(x, t, tok, mask)  # a full forward gives the same mid features
    h.remove()
    h2.remove()
    assert torch.allclose(ref["mid"], feats["mid"]) and len(calls) == 1
    up = teacher_features(teacher, x, t, tok, mask, ["up.0"])
    assert up["up.0"].shape[1] == 32
    assert Discriminator.for_teacher(teacher, ["up.0"]).heads["up_0"].conv.in_channels == 32
    with pytest.raises(ValueError, match="unknown block"):
        teacher_features(teacher, x, t, tok, mask, ["down.7"])


def test_video_features_and_3d_heads():
    teacher = make_teacher(video=True)
    x, tok, mask = inputs(video=True)
    t = torch.tensor([100, 700])
    feats = teacher_features(teacher, x, t, tok, mask, default_blocks(teacher))
    assert tuple(feats["mid"].shape) == (2, 32, 3, 4, 4)  # (B, C, T, h, w)
    disc = Discriminator.for_teacher(teacher, hidden=16)
    assert isinstance(disc.heads["mid"].conv, torch.nn.Conv3d)
    logits = disc(feats, t, tok, mask)
    assert [tuple(v.shape) for v in logits] == [(2, 48)] * 3  # T * h * w positions per head


@pytest.mark.parametrize("video", [False, True], ids=["unet2d", "unet3d"])
def test_discriminator_loss_trains_the_heads_only(video):
    teacher = make_teacher(video=video)
    disc = Discriminator.for_teacher(teacher, hidden=16)
    assert not any(n.startswith("model") for n, _ in disc.named_parameters())  # the teacher is not held
    x_real, tok, mask = inputs(video=video)
    x_fake = inputs(video=video, seed=2)[0].requires_grad_(True)
    loss, info = discriminator_loss(disc, teacher, x_real, tok, mask, x_fake, tok, mask)
    loss.backward()
    assert all(p.grad is not None for p in disc.parameters())
    assert all(p.grad is None for p in teacher.parameters()) and x_fake.grad is None
    before = [p.detach().clone() for p in disc.parameters()]
    torch.optim.SGD(disc.parameters(), lr=0.1).step()
    assert all(not torch.equal(a, p) for a, p in zip(before, disc.parameters()) if a.dim() > 1)
    assert set(info) == {"d_real", "d_fake"}


@pytest.mark.parametrize("schedule", [DDPMSchedule(), FlowSchedule()], ids=["ddpm", "flow"])
def test_generator_adv_loss_trains_the_student_only(schedule):
    teacher = make_teacher(schedule=schedule)
    student = copy.deepcopy(teacher).requires_grad_(True)
    disc = Discriminator.for_teacher(teacher, hidden=16)
    x, tok, mask = inputs()
    x0_hat = student.x0(x, torch.tensor([999, 999]), tok, mask)
    loss, _ = generator_adv_loss(disc, teacher, x0_hat, tok, mask)
    loss.backward()
    assert all(p.grad is None for p in disc.parameters()) and all(p.requires_grad for p in disc.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert sum(float(p.grad.abs().sum()) for p in student.parameters() if p.grad is not None) > 0
    before = [p.detach().clone() for p in student.parameters()]
    torch.optim.SGD(student.parameters(), lr=1e-2).step()
    assert any(not torch.equal(a, p) for a, p in zip(before, student.parameters()))


def test_generator_adv_loss_refuses_a_trainable_teacher():
    teacher = make_teacher().requires_grad_(True)
    x, tok, mask = inputs()
    with pytest.raises(ValueError, match="frozen"):
        generator_adv_loss(Discriminator.for_teacher(teacher, hidden=16), teacher, x, tok, mask)
