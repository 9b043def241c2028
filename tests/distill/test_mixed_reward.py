"""Mixed rewards (paper 004 §3.4-3.5): first/middle/last frame choice, latent vs pixel forms, Eq. 13-15 weights
against hand values, and each term alone moving a tiny student."""

import copy
import math

import pytest
import torch

from distill.denoiser import Denoiser
from distill.reward import (
    DEFAULT_WEIGHTS,
    LatentRewardTerm,
    MixedReward,
    PixelReward,
    as_term,
    frames_as_images,
    spatial_frames,
    spatial_loss,
    temporal_loss,
    total_loss,
)
from lrm.schedules import DDPMSchedule
from reward_adapters.base import Reward, select_frames
from tests.tiny_distill import tiny_unet


class SliceVAE:
    """Decoder stub: the first 3 latent channels are the pixels (works for images and videos)."""

    def decode(self, z, clamp=True):
        return z[..., :3, :, :]


def pixel_mean(pixels, prompts=None):  # a differentiable "pixel reward"
    return pixels.flatten(1).mean(1)


def latent_mean(z, tokens=None, mask=None):  # the same function on the latents
    return z[..., :3, :, :].flatten(1).mean(1)


def frame_video(B, T):
    """Latents whose frame t is the constant (t + 1) / 100: a frame's reward names the frame."""
    return (torch.arange(T, dtype=torch.float32)[None, :, None, None, None] + 1).expand(B, T, 4, 2, 2) / 100


@pytest.mark.parametrize("T,want", [(1, [0, 0, 0]), (2, [0, 0, 1]), (3, [0, 1, 2]), (16, [0, 7, 15])])
def test_frame_choice(T, want):
    assert spatial_frames(T) == want == select_frames(T, "first-middle-last")
    seen = {}

    def recorder(key, fn):
        def call(x, *a):
            r = fn(x)
            seen[key] = [round(float(v) * 100) - 1 for v in r]
            return r
        return call

    x0 = frame_video(2, T)
    spatial_loss(x0, r_it=PixelReward(recorder("pixel", pixel_mean), SliceVAE()), prompts=["a", "b"])
    spatial_loss(x0, r_it=recorder("latent", latent_mean))
    assert seen["pixel"] == seen["latent"] == want * 2  # sample-major, both forms score the same frames


def test_frames_as_images_repeats_captions_sample_major():
    x0 = torch.randn(2, 16, 4, 2, 2)
    tok, mask = torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool)
    frames, t2, m2, ps = frames_as_images(x0, tok, mask, ["a", "b"])
    assert frames.shape == (6, 4, 2, 2) and torch.equal(frames[3], x0[1, 0]) and torch.equal(frames[5], x0[1, 15])
    assert torch.equal(t2[3], tok[1]) and m2.shape == (6, 5) and ps == ["a", "a", "a", "b", "b", "b"]
    img = torch.randn(2, 4, 2, 2)
    assert frames_as_images(img, tok, mask, None)[0] is img


def test_spatial_and_temporal_by_hand_and_latent_equals_pixel():
    x0 = frame_video(2, 2).clone().requires_grad_(True)  # frames 0.01, 0.02 ; Eq. 13: (2 * 0.01 + 0.02) / 3
    pix = PixelReward(pixel_mean, SliceVAE())
    l_pix, info = spatial_loss(x0, r_it=pix, r_iq=pix, prompts=["a", "b"])
    assert math.isclose(float(l_pix.detach()), -2 * 0.04 / 3, rel_tol=1e-5) and info["r_it"] == pytest.approx(0.04 / 3)
    (g_pix,) = torch.autograd.grad(l_pix, x0)
    l_lat, _ = spatial_loss(x0, r_it=latent_mean, r_iq=LatentRewardTerm(latent_mean))
    (g_lat,) = torch.autograd.grad(l_lat, x0)
    assert torch.allclose(l_pix, l_lat) and torch.allclose(g_pix, g_lat)
    # d/dz of one pixel of frame 0: 2 rewards x 2 copies of frame 0 / (6 frame rewards x 12 elements each)
    assert torch.allclose(g_lat[:, 0, :3], torch.full((2, 3, 2, 2), -2 * 2 / (6 * 12)))
    assert float(g_lat[:, :, 3].abs().sum()) == 0.0
    l_v, info_v = temporal_loss(x0, PixelReward(pixel_mean, SliceVAE()))
    assert math.isclose(float(l_v.detach()), -0.015, rel_tol=1e-5) and info_v["r_v"] == pytest.approx(0.015)
    assert torch.allclose(l_v, temporal_loss(x0, latent_mean)[0])
    with pytest.raises(ValueError, match="videos"):
        temporal_loss(x0[:, 0], latent_mean)


def test_weights_by_hand():
    one = torch.tensor(1.0)
    assert DEFAULT_WEIGHTS == (0.5, 1.0, 1.5)
    assert float(total_loss(one, 2 * one, 3 * one, 4 * one)) == pytest.approx(1 + 0.5 * 2 + 1 * 3 + 1.5 * 4)
    assert float(total_loss(one, None, 3 * one, None, weights=(9.0, 2.0, 9.0))) == pytest.approx(7.0)
    x0 = frame_video(1, 16)  # frames 0.01 .. 0.16 ; spatial: (0.01 + 0.08 + 0.16) / 3 per reward ; clip mean 0.085
    loss, info = MixedReward(r_it=latent_mean, r_iq=latent_mean, r_v=latent_mean).loss(x0)
    want = 1.0 * (-2 * 0.25 / 3) + 1.5 * (-0.085)
    assert float(loss) == pytest.approx(want, rel=1e-5) and info["l_temporal"] == pytest.approx(-0.085, rel=1e-5)
    with pytest.raises(ValueError, match="weights"):
        total_loss(one, weights=(1.0, 2.0))


def test_pixel_rewards_must_be_wrapped():
    class Bright(Reward):
        differentiable = True

        def score_images(self, pixels, prompts=None):
            return pixels.mean(dim=(1, 2, 3))

    with pytest.raises(TypeError, match="PixelReward"):
        as_term(Bright())
    assert isinstance(as_term(PixelReward(Bright(), SliceVAE())), PixelReward)
    assert isinstance(as_term(latent_mean), LatentRewardTerm)
    with pytest.raises(ValueError, match="r_it or r_iq"):
        spatial_loss(torch.zeros(1, 4, 2, 2))


def tiny_unet3d():
    from diffusers import UNet3DConditionModel

    return UNet3DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                                up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), cross_attention_dim=8,
                                attention_head_dim=2, norm_num_groups=8)


@pytest.mark.parametrize("term", ["spatial-pixel", "spatial-latent", "temporal-pixel", "temporal-latent"])
def test_each_term_alone_moves_a_tiny_student(term):
    torch.manual_seed(0)
    teacher = Denoiser(tiny_unet3d(), DDPMSchedule(), "eps").requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    x, tok, mask = torch.randn(2, 3, 4, 8, 8, generator=g), torch.randn(2, 3, 8, generator=g), torch.ones(2, 3).bool()
    x0 = student.x0(x, 999, tok, mask)
    r = PixelReward(pixel_mean, SliceVAE()) if term.endswith("pixel") else latent_mean
    mixed = MixedReward(r_it=r) if term.startswith("spatial") else MixedReward(r_v=r)
    loss, _ = mixed.loss(x0, tok, mask, ["a", "b"])
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    before = [p.detach().clone() for p in student.parameters()]
    torch.optim.SGD(student.parameters(), lr=1e-2).step()
    assert any(not torch.equal(a, p) for a, p in zip(before, student.parameters()))


def test_image_student_spatial_term():
    torch.manual_seed(0)
    student = Denoiser(tiny_unet(), DDPMSchedule(), "eps")
    tok, mask = torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.bool)
    x0 = student.x0(torch.randn(2, 4, 8, 8), 999, tok, mask)
    loss, info = spatial_loss(x0, r_it=latent_mean, text_tokens=tok, text_mask=mask)
    assert float(loss) == pytest.approx(-info["r_it"])  # an image is its own single frame
