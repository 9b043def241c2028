import json

import numpy as np
import pytest
import torch
from conftest import MeanReward
from PIL import Image

from data_cache import (
    AddRewardConfig,
    CacheError,
    LatentCache,
    LatentSpaceMismatchError,
    SourceConfig,
    TextEncoderMismatchError,
    add_reward,
    build_cache,
    verify_cache,
)
from data_cache import storage as st
from shapes.world import ShapesWorld


def test_verify_catches_damaged_shard(vae, text_encoder, small_cfg):
    from lrm.cli import main

    cfg = small_cfg(n=8, shard_size=4)
    build_cache(cfg, rewards=[MeanReward()], vae=vae, text_encoder=text_encoder)
    assert verify_cache(cfg.out_dir)["ok"]
    m = st.read_manifest(cfg.out_dir)
    path = st.Path(cfg.out_dir) / st.SHARD_DIR / m["shards"][1]["file"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of the records
    path.write_bytes(bytes(data))
    res = verify_cache(cfg.out_dir)
    assert not res["ok"]
    assert any(m["shards"][1]["file"] in p and "sha256" in p for p in res["problems"])
    assert not any(m["shards"][0]["file"] in p for p in res["problems"])
    with pytest.raises(SystemExit) as e:
        main(["cache", "verify", "--cache_dir", cfg.out_dir])
    assert e.value.code == 1
    path.unlink()
    assert any("missing" in p for p in verify_cache(cfg.out_dir)["problems"])


def _other_vae():
    from diffusers import AutoencoderKL

    from lrm.latent_space import VAE

    torch.manual_seed(0)
    ae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                       up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 16, 16), latent_channels=4,
                       norm_num_groups=8, layers_per_block=1)
    return VAE(ae, vae_id="tiny-random-vae")


def test_mixed_latent_spaces_and_text_encoders_refused(vae, text_encoder, small_cfg):
    from lrm.text import TextEncoder

    cfg = small_cfg(n=4, shard_size=2)
    build_cache(cfg, rewards=[], vae=vae, text_encoder=text_encoder)
    cfg.resume = True
    cfg.source.num_samples = 8
    with pytest.raises(LatentSpaceMismatchError, match="tiny-random-vae"):
        build_cache(cfg, rewards=[], vae=_other_vae(), text_encoder=text_encoder)
    with pytest.raises(TextEncoderMismatchError, match="max_length"):
        build_cache(cfg, rewards=[], vae=vae, text_encoder=TextEncoder(max_length=16))
    with pytest.raises(CacheError, match="add-reward"):
        build_cache(cfg, rewards=[MeanReward()], vae=vae, text_encoder=text_encoder)
    assert st.read_manifest(cfg.out_dir)["counts"]["records"] == 4  # nothing was mixed in
    # add-reward refuses a decoding VAE from another space too
    with pytest.raises(LatentSpaceMismatchError):
        add_reward(AddRewardConfig(cache_dir=cfg.out_dir, pixels_from="decode", progress=False, device="cpu"),
                   reward=MeanReward(), vae=_other_vae())
    # generator latents with the wrong channel count
    gen = lambda n, seed: (torch.zeros(n, 3, 8, 8), ["x"] * n)  # noqa: E731
    g = small_cfg(source=SourceConfig(type="generator", num_samples=2), name="gen")
    with pytest.raises(LatentSpaceMismatchError, match="3 channels"):
        build_cache(g, source=gen, rewards=[], vae=vae, text_encoder=text_encoder)


def test_a_copy_of_the_vae_under_another_name_is_the_same_space(vae, text_encoder, small_cfg):
    """Latent spaces are matched by the VAE's weights, not its name: resume and add-reward with the shipped Shapes
    VAE loaded from its directory (vae_id = the path) on a cache built with `shapes` (vae_id 'shapes-vae')."""
    from lrm.latent_space import _shapes_vae_dir

    cfg = small_cfg(n=4, shard_size=2)
    build_cache(cfg, rewards=[], vae=vae, text_encoder=text_encoder)
    cfg.resume, cfg.source.num_samples, cfg.vae = True, 6, str(_shapes_vae_dir())
    build_cache(cfg, rewards=[], text_encoder=text_encoder)  # the VAE is loaded from cfg.vae
    m = st.read_manifest(cfg.out_dir)
    assert m["counts"]["records"] == 6 and m["latent_space"]["vae_id"] == "shapes-vae"
    out = add_reward(AddRewardConfig(cache_dir=cfg.out_dir, reward="mean-brightness", pixels_from="decode",
                                     vae=str(_shapes_vae_dir()), progress=False, device="cpu"), reward=MeanReward())
    assert np.isfinite(LatentCache.open(cfg.out_dir).rewards("mean-brightness")).all(), out


class FlakyReward:
    """Raises on very bright images, returns NaN on very dark ones."""

    name = "flaky"
    version = "0"
    modality = "image"
    device = "cpu"

    def __call__(self, pixels, prompts=None):
        m = pixels.flatten(1).mean(1)
        if (m > 0.9).any():
            raise RuntimeError("too bright")
        return torch.where(m < 0.05, torch.full_like(m, float("nan")), m)


def _write_folder(root, n_good=6):
    root.mkdir()
    pixels, captions, _ = ShapesWorld(32, None, 0).batch(range(n_good))
    rows = []
    for i in range(n_good):
        arr = (pixels[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr).save(root / f"img{i}.png")
        rows.append({"file": f"img{i}.png", "caption": captions[i]})
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "gray.png")
    rows += [{"file": "broken.png", "caption": "a broken file"}, {"file": "gray.png", "caption": "a gray image"},
             {"file": "missing.png", "caption": "not there"}, {"file": "img0.png", "caption": ""},
             {"file": "img1.png", "caption": "wrong size"}]
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "small.png")
    rows[-1]["file"] = "small.png"
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return pixels, captions


def test_bad_records_are_counted_not_fatal(vae, text_encoder, small_cfg, tmp_path):
    pixels, captions = _write_folder(tmp_path / "imgs")
    src = SourceConfig(type="folder", path=str(tmp_path / "imgs"), captions_file="captions.jsonl", num_samples=0)
    cfg = small_cfg(source=src, shard_size=4, batch_size=3)
    out = build_cache(cfg, rewards=[FlakyReward(), MeanReward()], vae=vae, text_encoder=text_encoder)
    m = out["manifest"]
    assert m["complete"] and m["counts"]["records"] == 6
    bright = pixels.flatten(1).mean(1) > 0.9
    dark = pixels.flatten(1).mean(1) < 0.05
    assert bright.any() and dark.any(), "fixture must exercise both failure modes"
    rej = m["counts"]["rejects"]
    assert rej["unreadable"] == 2 and rej["wrong_channels"] == 1 and rej["bad_prompt"] == 1
    assert rej["wrong_size"] == 1
    assert rej["reward_error:flaky"] == int(bright.sum()) and rej["reward_nan:flaky"] == int(dark.sum())
    assert m["counts"]["missing_rewards"]["flaky"] == int((bright | dark).sum())
    log = [json.loads(line) for line in (st.Path(cfg.out_dir) / st.REJECTS).read_text().splitlines()]
    assert len(log) == sum(rej.values())
    assert {r["source_id"] for r in log if r["reason"] == "unreadable"} == {"folder:broken.png", "folder:missing.png"}
    cache = LatentCache.open(cfg.out_dir)
    f = cache.rewards("flaky")
    np.testing.assert_array_equal(np.isnan(f), (bright | dark).numpy())
    png = (pixels * 255).round() / 255  # what the PNG files hold
    torch.testing.assert_close(torch.from_numpy(cache.rewards("mean-brightness")), png.flatten(1).mean(1),
                               rtol=1e-5, atol=1e-5)
    assert cache.stats()["flaky"]["missing"] == int((bright | dark).sum())
    # skip policy: the failing records are left out instead
    cfg2 = small_cfg(source=src, shard_size=4, on_reward_error="skip", name="skip")
    m2 = build_cache(cfg2, rewards=[FlakyReward()], vae=vae, text_encoder=text_encoder)["manifest"]
    assert m2["counts"]["records"] == 6 - int((bright | dark).sum())


def test_add_reward_decode_and_source(vae, text_encoder, small_cfg):
    cfg = small_cfg(n=6, shard_size=4)
    build_cache(cfg, rewards=[MeanReward()], vae=vae, text_encoder=text_encoder)
    pixels, captions, _ = ShapesWorld(32, None, 0).batch(range(6))

    class Red(MeanReward):
        name = "red"

        def __call__(self, px, prompts=None):
            return px[:, 0].flatten(1).mean(1)

    class RedDecoded(Red):
        name = "red-decoded"

    res = add_reward(AddRewardConfig(cache_dir=cfg.out_dir, pixels_from="source", progress=False, device="cpu"),
                     reward=Red())
    assert res["pixels"]["source"] == 6
    add_reward(AddRewardConfig(cache_dir=cfg.out_dir, pixels_from="decode", progress=False, device="cpu"),
               reward=RedDecoded(), vae=vae)
    cache = LatentCache.open(cfg.out_dir)
    assert set(cache.reward_names) == {"mean-brightness", "red", "red-decoded"}
    torch.testing.assert_close(torch.from_numpy(cache.rewards("red")), pixels[:, 0].flatten(1).mean(1))
    latents = cache.tensors()["latents"]
    expect = vae.decode(latents)[:, 0].flatten(1).mean(1)
    torch.testing.assert_close(torch.from_numpy(cache.rewards("red-decoded")), expect, rtol=1e-4, atol=1e-4)
    assert cache.manifest["rewards"]["red-decoded"]["pixels_from"] == "decode"
    assert cache[3]["reward/red"].item() == pytest.approx(float(pixels[3, 0].mean()), rel=1e-5)
    assert verify_cache(cfg.out_dir)["ok"]
    with pytest.raises(CacheError, match="already has reward"):
        add_reward(AddRewardConfig(cache_dir=cfg.out_dir, progress=False, device="cpu"), reward=MeanReward())


def test_split_by_prompt_and_filters(vae, text_encoder, small_cfg):
    cfg = small_cfg(n=40, shard_size=16, batch_size=8)
    build_cache(cfg, rewards=[MeanReward()], vae=vae, text_encoder=text_encoder)
    cache = LatentCache.open(cfg.out_dir)
    prompts = cache.prompts
    # make some prompts repeat so leakage is possible: the Shapes captions already repeat a few times
    for seed in (0, 1, 2):
        tr, va = cache.split_by_prompt(0.25, seed=seed)
        assert len(tr) + len(va) == 40 and not set(tr) & set(va)
        assert not {prompts[i] for i in tr} & {prompts[i] for i in va}
        assert 5 <= len(va) <= 20
    a, b = cache.split_by_prompt(0.25, seed=0)
    np.testing.assert_array_equal(a, cache.split_by_prompt(0.25, seed=0)[0])
    # forced repeats: a view with duplicated records keeps both copies on the same side
    dup = cache.subset(np.r_[np.arange(40), np.arange(10)])
    tr, va = dup.split_by_prompt(0.3, seed=1)
    p = dup.prompts
    assert not {p[i] for i in tr} & {p[i] for i in va}
    v = cache.rewards("mean-brightness")
    bright = cache.filter(reward="mean-brightness", min=0.5)
    assert len(bright) == int((v >= 0.5).sum()) > 0
    assert (bright.tensors()["reward/mean-brightness"] >= 0.5).all()
    np.testing.assert_array_equal(bright.indices, np.flatnonzero(v >= 0.5))
    tr_cache = cache.subset(tr[tr < 40])
    assert len(tr_cache.tensors()["latents"]) == len(tr_cache)
