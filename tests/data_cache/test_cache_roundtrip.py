import numpy as np
import pytest
import torch
from conftest import MeanReward, PromptLengthReward

from data_cache import LatentCache, build_cache, verify_cache
from shapes.world import ShapesWorld


def test_round_trip_matches_direct_computation(vae, text_encoder, small_cfg):
    cfg = small_cfg(n=10, shard_size=4, batch_size=3)
    out = build_cache(cfg, rewards=[MeanReward(), PromptLengthReward()], vae=vae, text_encoder=text_encoder)
    assert out["manifest"]["complete"] and out["manifest"]["counts"]["records"] == 10
    cache = LatentCache.open(cfg.out_dir)
    assert len(cache) == 10
    pixels, captions, _ = ShapesWorld(32, None, 0).batch(range(10))
    z = vae.encode(pixels)
    emb = text_encoder(captions)
    t = cache.tensors()
    np.testing.assert_array_equal(t["index"].numpy(), np.arange(10))
    assert cache.prompts == captions
    assert t["latents"].dtype == torch.float32 and t["latents"].shape == (10, 4, 8, 8)
    # fp16 storage: equal up to one fp16 ulp (batching changes the last fp32 bits)
    F16 = dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(t["latents"], z.half().float(), **F16)
    torch.testing.assert_close(t["text_tokens"], emb.tokens.half().float(), **F16)
    assert torch.equal(t["text_mask"], emb.mask)
    torch.testing.assert_close(t["text_pooled"], emb.pooled.half().float(), **F16)
    torch.testing.assert_close(t["reward/mean-brightness"], pixels.flatten(1).mean(1))
    torch.testing.assert_close(t["reward/red-x-len"], PromptLengthReward()(pixels, captions))
    # the Dataset view returns the same values
    item = cache[7]
    for k in ("latents", "text_tokens", "text_mask", "text_pooled", "reward/mean-brightness"):
        assert torch.equal(item[k], t[k][7]), k
    assert cache.latent_space == vae.latent_space
    assert cache.manifest["text_encoder"] == text_encoder.identity()
    assert cache.manifest["rewards"]["red-x-len"]["version"] == "2"
    assert len(set(cache.column("content_hash"))) == 10
    s = cache.stats()["mean-brightness"]
    assert s["count"] == 10 and s["missing"] == 0
    assert s["mean"] == pytest.approx(float(pixels.flatten(1).mean(1).mean()), rel=1e-5)
    assert verify_cache(cfg.out_dir)["ok"]


def test_video_and_float32_storage(vae, text_encoder, small_cfg):
    from data_cache import SourceConfig

    cfg = small_cfg(source=SourceConfig(num_samples=3, num_frames=4), latent_dtype="float32", shard_size=2)
    vid = MeanReward()
    vid.modality = "video"
    build_cache(cfg, rewards=[vid], vae=vae, text_encoder=text_encoder)
    cache = LatentCache.open(cfg.out_dir)
    pixels, _, _ = ShapesWorld(32, 4, 0).batch(range(3))
    assert cache.is_video and cache.latent_shape == (4, 4, 8, 8)
    torch.testing.assert_close(cache.tensors()["latents"], vae.encode(pixels), rtol=1e-5, atol=1e-5)


def test_image_reward_on_video_source_is_refused(vae, text_encoder, small_cfg):
    from data_cache import SourceConfig

    cfg = small_cfg(source=SourceConfig(num_samples=2, num_frames=4))
    with pytest.raises(ValueError, match="scores images"):
        build_cache(cfg, rewards=[MeanReward()], vae=vae, text_encoder=text_encoder)


def test_generator_source_decodes_latents(vae, text_encoder, small_cfg):
    from data_cache import SourceConfig

    def gen(n, seed):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(n, 4, 8, 8, generator=g), [f"sample {seed} {i}" for i in range(n)]

    cfg = small_cfg(source=SourceConfig(type="generator", num_samples=6), shard_size=4, batch_size=2)
    build_cache(cfg, source=gen, rewards=[MeanReward()], vae=vae, text_encoder=text_encoder)
    cache = LatentCache.open(cfg.out_dir)
    t = cache.tensors()
    # batch [2, 4) was drawn with seed 0 * 1_000_003 + 2
    z, prompts = gen(2, 2)
    torch.testing.assert_close(t["latents"][2:4], z.half().float(), rtol=0, atol=0)
    assert cache.prompts[2:4] == prompts
    expect = vae.decode(t["latents"][2:4]).flatten(1).mean(1)
    torch.testing.assert_close(t["reward/mean-brightness"][2:4], expect, rtol=2e-3, atol=2e-3)
    assert cache.manifest["rewards"]["mean-brightness"]["pixels_from"] == "decoded"


def test_dataset_source_matches_shapes_source(vae, text_encoder, small_cfg, tmp_path):
    from data_cache import SourceConfig

    ds = ShapesWorld(32, None, 0).to_dataset(5)
    ds.save_to_disk(str(tmp_path / "ds"))
    cfg = small_cfg(source=SourceConfig(type="dataset", path=str(tmp_path / "ds"), image_column="pixels",
                                        num_samples=0), name="from-ds")
    build_cache(cfg, vae=vae, text_encoder=text_encoder, rewards=[])
    a = LatentCache.open(cfg.out_dir)
    pixels, captions, _ = ShapesWorld(32, None, 0).batch(range(5))
    assert len(a) == 5 and a.prompts == captions
    torch.testing.assert_close(a.tensors()["latents"], vae.encode(pixels).half().float(), rtol=2e-3, atol=2e-3)


def test_cli_stats_and_build(tmp_path, capsys):
    from lrm.cli import main

    d = str(tmp_path / "cli-cache")
    rc = main(["cache", "build", "--out_dir", d, "--source.num_samples", "4", "--shard_size", "2", "--device", "cpu",
               "--progress", "false", "--num_workers", "1", "--rewards", "[colorfulness]"])
    assert rc == 0
    from reward_adapters import create_reward

    pixels, captions, _ = ShapesWorld(32, None, 0).batch(range(4))
    cache = LatentCache.open(d)
    torch.testing.assert_close(torch.from_numpy(cache.rewards("colorfulness")),
                               create_reward("colorfulness")(pixels, captions).float(), rtol=1e-5, atol=1e-5)
    assert main(["cache", "stats", "--cache_dir", d]) == 0
    assert '"records": 4' in capsys.readouterr().out
    # an existing cache is not silently rebuilt: a one-line error, exit 2, its config.yaml left alone
    before = (tmp_path / "cli-cache" / "config.yaml").read_text()
    assert main(["cache", "build", "--out_dir", d, "--source.num_samples", "5", "--device", "cpu", "--progress",
                 "false"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (tmp_path / "cli-cache" / "config.yaml").read_text() == before


def test_dataset_source_with_image_feature(vae, text_encoder, small_cfg, tmp_path):
    """The common hub layout: a datasets.Image column (PIL images) plus a caption column; bad rows are rejected."""
    import datasets
    from PIL import Image

    from data_cache import SourceConfig

    pixels, captions, _ = ShapesWorld(32, None, 0).batch(range(4))
    imgs = [Image.fromarray((p.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for p in pixels]
    imgs.append(Image.fromarray(np.zeros((32, 32, 4), np.uint8), mode="RGBA"))  # wrong channel count
    ds = datasets.Dataset.from_dict({"image": imgs, "text": captions + ["rgba"]},
                                   features=datasets.Features({"image": datasets.Image(),
                                                               "text": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "hf"))
    cfg = small_cfg(source=SourceConfig(type="dataset", path=str(tmp_path / "hf"), caption_column="text",
                                        num_samples=0), name="hf-cache")
    m = build_cache(cfg, vae=vae, text_encoder=text_encoder, rewards=[MeanReward()])["manifest"]
    assert m["counts"]["records"] == 4 and m["counts"]["rejects"] == {"wrong_channels": 1}
    cache = LatentCache.open(cfg.out_dir)
    png = (pixels * 255).round() / 255
    torch.testing.assert_close(torch.from_numpy(cache.rewards("mean-brightness")), png.flatten(1).mean(1))
    assert cache.prompts == captions
