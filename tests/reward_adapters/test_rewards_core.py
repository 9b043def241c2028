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


def test_composite_mixes_text_image_image_and_text_video_on_shapes_videos():
    """shapes-color (text-image) + brightness (image, 3 frames) + shapes-direction (text-video) on Shapes videos:
    the composite is the hand-weighted sum of the components called alone, and prompts reach only text parts."""
    from shapes import ShapesWorld

    px, caps, _ = ShapesWorld(32, num_frames=6, seed=1).batch(range(4))  # (4, 6, 3, 32, 32)
    spec = {"shapes-color": 1.0, "brightness": {"weight": -0.5, "frames": "first-middle-last"},
            "shapes-direction": 2.0}
    comp = create_reward("composite", rewards=spec)
    assert comp.modality == "text-video" and not comp.differentiable
    color = create_reward("shapes-color")(px, caps)
    bright = create_reward("brightness", frames="first-middle-last")(px)
    direction = create_reward("shapes-direction")(px, caps)
    # the components carry signal: correct colors and directions on the world's own videos
    assert (color > 0.5).all() and (direction > 0.9).all() and (bright > 0).all()
    want = 1.0 * color - 0.5 * bright + 2.0 * direction
    torch.testing.assert_close(comp(px, caps), want, rtol=0, atol=1e-6)
    # swapping prompts moves only the text components
    wrong = caps[1:] + caps[:1]
    delta = (create_reward("shapes-color")(px, wrong) - color) + 2.0 * (
        create_reward("shapes-direction")(px, wrong) - direction)
    torch.testing.assert_close(comp(px, wrong) - comp(px, caps), delta, rtol=0, atol=1e-5)
    # which prompts and pixels each component receives
    seen = {}
    for key, r in zip(comp.keys, comp.components):
        for meth in ("score_images", "score_videos"):
            def spy(pixels, prompts, _orig=getattr(r, meth), _key=key):
                seen[_key] = (tuple(pixels.shape), prompts)
                return _orig(pixels, prompts)

            setattr(r, meth, spy)
    rewards, info = comp.ddpo(px, caps, {"step": 3})
    torch.testing.assert_close(rewards, want, rtol=0, atol=1e-6)
    assert seen["brightness"] == ((4 * 3, 3, 32, 32), None)  # 3 frames per video, batched; no prompts
    assert seen["shapes-color"] == ((4, 6, 3, 32, 32), caps)  # reads videos whole
    assert seen["shapes-direction"] == ((4, 6, 3, 32, 32), caps)
    torch.testing.assert_close(info["components"]["brightness"], bright)
    with pytest.raises(ValueError, match="prompts are required"):
        comp(px)


def test_motion_magnitude_matches_direct_farneback_on_known_shift():
    """A smooth texture shifted by (dx, dy) = (2, 1) px per frame: the reward equals cv2.calcOpticalFlowFarneback
    with the adapter's parameters + mean of the top 5% magnitudes, averaged over pairs, at a 256-px short side."""
    from reward_adapters.video_metrics import FARNEBACK_PARAMS, TOP_FRACTION

    params = {"pyr_scale": 0.5, "levels": 3, "winsize": 15, "iterations": 3, "poly_n": 5, "poly_sigma": 1.2, "flags": 0}
    assert FARNEBACK_PARAMS == params and TOP_FRACTION == 0.05
    H, W, T, dx, dy, pad = 64, 80, 4, 2, 1, 12
    rng = np.random.default_rng(0)
    big = cv2.GaussianBlur(rng.random((H + 2 * pad, W + 2 * pad, 3)).astype(np.float32), (0, 0), 2.0)
    big = ((big - big.min()) / (big.max() - big.min()) * 255).round().astype(np.uint8)
    # frame t shows the texture moved by t * (dx, dy): content at x in frame 0 is at x + t*dx in frame t
    video = np.stack([big[pad - t * dy:pad - t * dy + H, pad - t * dx:pad - t * dx + W] for t in range(T)])
    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in video]
    pair_scores = []
    for a, b in zip(gray[:-1], gray[1:]):
        flow = cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)
        mag = np.hypot(flow[..., 0].astype(np.float64), flow[..., 1].astype(np.float64)).ravel()
        k = int(0.05 * H * W)  # 256 of 5120
        pair_scores.append(np.sort(mag)[::-1][:k].mean())
        # the flow recovers the shift in the interior
        assert np.median(flow[pad:-pad, pad:-pad, 0]) == pytest.approx(dx, abs=0.1)
        assert np.median(flow[pad:-pad, pad:-pad, 1]) == pytest.approx(dy, abs=0.1)
    scale = min(H, W) / 256.0
    expect = float(np.mean(pair_scores)) / scale
    assert expect == pytest.approx(np.hypot(dx, dy) / scale, rel=0.25)  # near the true 2.24 px per frame
    pixels = torch.from_numpy(video).permute(0, 3, 1, 2).float().div(255)[None]  # (1, T, 3, H, W)
    r = create_reward("motion-magnitude", executor="serial")
    assert r(pixels).item() == pytest.approx(expect, rel=1e-6)
    # dynamic degree: moving when >= round(4 T / 16) pairs exceed 6 px at 256 px (1.5 px here)
    moving = float(sum(s > 6.0 * scale for s in pair_scores) >= max(1, round(4 * T / 16)))
    assert moving == 1.0
    assert create_reward("motion-magnitude", mode="dynamic-degree")(pixels).item() == moving
