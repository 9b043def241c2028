"""Shapes adherence rewards rank correct samples above wrong-color / wrong-count / wrong-direction ones."""

import math

import numpy as np
import pytest
import torch

from reward_adapters import create_reward
from shapes import COLORS, ShapesWorld

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def _other_color(c):
    names = list(COLORS)
    return names[(names.index(c) + 1) % len(names)]


def test_wrong_color_scores_lower_same_geometry():
    w = ShapesWorld(32, seed=3)
    good, bad, caps = [], [], []
    for i in range(24):
        s = w.sample(i)
        good.append(s.pixels)
        bad.append(w.render(s.shape, _other_color(s.color), s.background, s.centers, s.size))
        caps.append(s.caption)
    good, bad = torch.from_numpy(np.stack(good)), torch.from_numpy(np.stack(bad))
    r = create_reward("shapes-color", workers=2)
    a, b = r(good, caps), r(bad, caps)
    assert (a > b).all(), (a, b)
    assert a.mean() > 0.8 and b.mean() < 0.2
    adh = create_reward("shapes-adherence")
    assert (adh(good, caps) > adh(bad, caps)).all()
    assert ((a >= 0) & (a <= 1)).all()


def test_wrong_count_and_shape_and_position_rank_lower():
    w = ShapesWorld(32, seed=5)
    px, caps, attrs = w.batch(range(60))
    wrong = caps[1:] + caps[:1]
    wattrs = attrs[1:] + attrs[:1]
    for name, key in [("shapes-count", "count"), ("shapes-shape", "shape"), ("shapes-position", "position")]:
        r = create_reward(name)
        a, b = r(px, caps).numpy(), r(px, wrong).numpy()
        differ = np.array([x[key] != y[key] and x[key] is not None and y[key] is not None
                           for x, y in zip(attrs, wattrs)])
        assert differ.sum() >= 5
        frac = (a[differ] > b[differ]).mean()
        assert frac >= 0.9, (name, frac)
    # attributes a caption does not name are NaN (cache "missing"); adherence averages what is named
    r = create_reward("shapes-position")
    no_pos = [i for i, a in enumerate(attrs) if a["position"] is None]
    assert torch.isnan(r(px[no_pos], [caps[i] for i in no_pos])).all()


def test_wrong_direction_video_scores_lower():
    w = ShapesWorld(32, num_frames=8, seed=2)
    good, bad, caps = [], [], []
    for i in range(12):
        s = w.sample(i)
        good.append(s.pixels)
        # same first frame, opposite motion
        bad.append(w.render(s.shape, s.color, s.background, s.centers, s.size, OPPOSITE[s.direction], s.speed))
        caps.append(s.caption)
    good, bad = torch.from_numpy(np.stack(good)), torch.from_numpy(np.stack(bad))
    r = create_reward("shapes-direction")
    assert r.modality == "text-video"
    a, b = r(good, caps), r(bad, caps)
    assert (a > 0.9).all() and (b < 0.1).all()
    adh = create_reward("shapes-adherence")
    assert (adh(good, caps) > adh(bad, caps)).all()
    # a still video (first frame repeated) is neutral: 0.5
    still = good[:, :1].repeat(1, 8, 1, 1, 1)
    assert torch.allclose(r(still, caps), torch.full((12,), 0.5))


def test_shapes_rewards_need_prompts_and_are_batch_invariant():
    w = ShapesWorld(32, seed=0)
    px, caps, _ = w.batch(range(6))
    r = create_reward("shapes-adherence", workers=2)
    with pytest.raises(ValueError, match="prompts are required"):
        r(px)
    full = r(px, caps)
    single = torch.cat([r(px[i:i + 1], caps[i:i + 1]) for i in range(6)])
    assert torch.equal(full, single)
    serial = create_reward("shapes-adherence", executor="serial")(px, caps)
    assert torch.equal(full, serial)
    assert not math.isnan(float(full.sum()))


def test_rendered_wrong_count_scores_lower():
    w = ShapesWorld(32, seed=7)
    good, bad, caps = [], [], []
    i = 0
    while len(caps) < 10:
        s = w.sample(i)
        i += 1
        if s.count < 2:
            continue
        good.append(s.pixels)
        bad.append(w.render(s.shape, s.color, s.background, s.centers[:-1], s.size))  # one shape missing
        caps.append(s.caption)
    good, bad = torch.from_numpy(np.stack(good)), torch.from_numpy(np.stack(bad))
    r = create_reward("shapes-count")
    a, b = r(good, caps), r(bad, caps)
    assert (a > b).all(), (a, b)
    assert torch.allclose(a, torch.ones(10))
    assert (create_reward("shapes-adherence")(good, caps) > create_reward("shapes-adherence")(bad, caps)).all()
