"""Interface, registry, video frames, composite, DDPO call, weight-free rewards vs hand-computed values."""

import io

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from reward_adapters import Reward, create_reward, list_rewards, register_reward, select_frames

WEIGHT_FREE = ["jpeg-compressibility", "jpeg-incompressibility", "colorfulness", "sharpness", "brightness"]


def _imgs(b=3, h=16, w=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g)


def test_registry_lists_and_unknown_name():
    names = list_rewards()
    for n in WEIGHT_FREE + ["temporal-flickering", "motion-magnitude", "composite"]:
        assert n in names
    with pytest.raises(KeyError, match="Available: .*colorfulness"):
        create_reward("no-such-reward")


def test_register_custom_reward():
    @register_reward("test-mean-red")
    class MeanRed(Reward):
        name = "test-mean-red"

        def score_images(self, pixels, prompts):
            return pixels[:, 0].mean(dim=(1, 2))

    r = create_reward("test-mean-red")
    x = _imgs()
    assert torch.allclose(r(x), x[:, 0].mean(dim=(1, 2)))
    assert "test-mean-red" in list_rewards("test-*")


def test_jpeg_matches_hand_computed():
    x = _imgs(2, 24, 20)
    u8 = (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    sizes = []
    for im in u8:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=95)
        sizes.append(buf.tell() / 1000)
    comp = create_reward("jpeg-compressibility", workers=2)(x)
    inc = create_reward("jpeg-incompressibility", executor="serial")(x)
    assert comp.dtype == torch.float32 and comp.shape == (2,)
    np.testing.assert_allclose(comp.numpy(), -np.array(sizes), rtol=1e-6)
    np.testing.assert_allclose(inc.numpy(), np.array(sizes), rtol=1e-6)
    # noise compresses worse than a flat image
    flat = torch.full((1, 3, 24, 20), 0.5)
    assert create_reward("jpeg-compressibility")(flat)[0] > comp.max()


def test_colorfulness_sharpness_brightness_hand_computed():
    x = _imgs(2, 12, 10, seed=1)
    X = x.double().numpy() * 255
    r, g, b = X[:, 0], X[:, 1], X[:, 2]
    rg, yb = (r - g).reshape(2, -1), (0.5 * (r + g) - b).reshape(2, -1)
    cf = np.sqrt(rg.std(1) ** 2 + yb.std(1) ** 2) + 0.3 * np.sqrt(rg.mean(1) ** 2 + yb.mean(1) ** 2)
    np.testing.assert_allclose(create_reward("colorfulness")(x).numpy(), cf, rtol=1e-4)
    gray = 0.299 * r + 0.587 * g + 0.114 * b
    lap = np.stack([cv2.Laplacian(gi.astype(np.float64), cv2.CV_64F).var() for gi in gray])
    np.testing.assert_allclose(create_reward("sharpness")(x).numpy(), lap, rtol=1e-4)
    np.testing.assert_allclose(create_reward("brightness")(x).numpy(), gray.reshape(2, -1).mean(1) / 255, rtol=1e-5)
    # a pure gray image has zero colorfulness; pure red is colorful
    gray_img = torch.full((1, 3, 8, 8), 0.4)
    red = torch.zeros(1, 3, 8, 8)
    red[:, 0] = 1
    assert create_reward("colorfulness")(gray_img).abs().item() < 1e-4
    assert create_reward("colorfulness")(red).item() == pytest.approx(0.3 * np.hypot(255, 127.5), rel=1e-5)


def test_differentiable_rewards_give_gradients():
    for name in ["colorfulness", "sharpness", "brightness"]:
        r = create_reward(name)
        assert r.differentiable
        x = _imgs(2).requires_grad_(True)
        r(x).sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0


def test_temporal_flickering_exact_formula():
    g = torch.Generator().manual_seed(0)
    v = torch.rand(2, 5, 3, 8, 8, generator=g)
    r = create_reward("temporal-flickering")
    u = (v * 255).round().double()
    mae = (u[:, 1:] - u[:, :-1]).abs().mean(dim=(1, 2, 3, 4))
    np.testing.assert_allclose(r(v).numpy(), ((255 - mae) / 255).numpy(), rtol=1e-6)
    still = v[:, :1].repeat(1, 5, 1, 1, 1)
    assert torch.allclose(r(still), torch.ones(2))
    with pytest.raises(ValueError, match=r"\(B, T, 3, H, W\)"):
        r(v[:, 0])


def test_motion_magnitude_orders_moving_above_still():
    H = 48
    frames = []
    for t in range(6):
        f = np.zeros((H, H, 3), np.float32)
        f[16:32, 4 + 3 * t:20 + 3 * t] = 1.0
        frames.append(f)
    moving = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)[None]
    still = moving[:, :1].repeat(1, 6, 1, 1, 1)
    r = create_reward("motion-magnitude", workers=2)
    s = r(torch.cat([moving, still]))
    assert s[0] > 1.0 and s[1].abs() < 1e-3
    dd = create_reward("motion-magnitude", mode="dynamic-degree")(torch.cat([moving, still]))
    assert dd.tolist() == [1.0, 0.0]


def test_select_frames():
    assert select_frames(16, "all") == list(range(16))
    assert select_frames(16, "first-middle-last") == [0, 7, 15]
    assert select_frames(16, 4) == [0, 5, 10, 15]
    assert select_frames(9, "middle") == [4]
    with pytest.raises(ValueError, match="valid"):
        select_frames(8, "some")
    with pytest.raises(ValueError, match="uniform"):
        select_frames(4, 5)
    with pytest.raises(ValueError, match="valid"):
        create_reward("brightness", frames="middle-ish")


def test_image_reward_on_video_uses_selected_frames_mean():
    g = torch.Generator().manual_seed(0)
    v = torch.rand(3, 8, 3, 8, 8, generator=g)
    r = create_reward("brightness", frames="first-middle-last")
    per = create_reward("brightness")(v.flatten(0, 1)).reshape(3, 8)
    assert torch.allclose(r(v), per[:, [0, 3, 7]].mean(1), atol=1e-6)
    assert torch.allclose(create_reward("brightness", frames="last")(v), per[:, 7], atol=1e-6)
    assert torch.allclose(create_reward("brightness")(v), per.mean(1), atol=1e-6)
    # batched across frames: one call of score_images with B*K images
    calls = []
    orig = r.score_images
    r.score_images = lambda p, q: (calls.append(p.shape[0]), orig(p, q))[1]
    r(v)
    assert calls == [9]


@pytest.mark.parametrize("name", WEIGHT_FREE)
def test_batch_invariance(name):
    x = _imgs(5, 16, 16, seed=3)
    r = create_reward(name)
    full = r(x)
    single = torch.cat([r(x[i:i + 1]) for i in range(5)])
    chunked = create_reward(name, max_batch=2)(x)
    assert torch.allclose(full, single, rtol=1e-5, atol=1e-5)
    assert torch.allclose(full, chunked, rtol=1e-5, atol=1e-5)


def test_composite_weights_and_ddpo():
    x = _imgs(4)
    comp = create_reward("composite", rewards={"brightness": 2.0, "jpeg-compressibility": 0.1})
    want = 2.0 * create_reward("brightness")(x) + 0.1 * create_reward("jpeg-compressibility")(x)
    assert torch.allclose(comp(x), want, atol=1e-5)
    assert comp.modality == "image" and not comp.differentiable
    r, info = comp.ddpo(x, ["p"] * 4, {"k": 1})
    assert torch.allclose(r, want, atol=1e-5)
    assert set(info["components"]) == {"brightness", "jpeg-compressibility"}
    assert info["metadata"] == {"k": 1}
    # options through a dict spec, and a video component makes it a video reward
    c2 = create_reward("composite", rewards={"temporal-flickering": 1.0,
                                             "brightness": {"weight": 0.5, "frames": "first"}})
    assert c2.modality == "video"
    v = torch.rand(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    want2 = create_reward("temporal-flickering")(v) + 0.5 * v[:, 0].mul(
        torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(1).mean((1, 2))
    assert torch.allclose(c2(v), want2, atol=1e-5)


def test_ddpo_accepts_uint8_channels_last():
    x = _imgs(2)
    u8 = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    r = create_reward("brightness")
    rewards, info = r.ddpo(u8, ["a", "b"], [{}, {}])
    assert rewards.shape == (2,) and rewards.dtype == torch.float32 and not rewards.requires_grad
    assert torch.allclose(rewards, r(torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255))
    assert info["reward"]["name"] == "brightness"


def test_bad_inputs_raise_clear_errors():
    r = create_reward("brightness")
    with pytest.raises(ValueError, match="channels-last"):
        r(torch.rand(2, 8, 8, 3))
    with pytest.raises(ValueError, match="divide by 255"):
        r(torch.rand(2, 3, 8, 8) * 255)
    with pytest.raises(ValueError, match="NaN"):
        r(torch.full((1, 3, 8, 8), float("nan")))
    with pytest.raises(ValueError, match="shape"):
        r(torch.rand(3, 8, 8))
    with pytest.raises(TypeError, match="float"):
        r(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="got 1 prompts for a batch of 2"):
        r(torch.rand(2, 3, 8, 8), ["only one"])


def test_process_pool_matches_serial():
    x = _imgs(6, 16, 16, seed=4)
    a = create_reward("jpeg-compressibility", workers=2, executor="process")(x)
    b = create_reward("jpeg-compressibility", executor="serial")(x)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="executor"):
        create_reward("jpeg-compressibility", executor="gpu")
