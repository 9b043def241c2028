"""On-policy generator sources named by import path (DOLLAR Alg. 1), reward_options, and the config.yaml / log.txt
that `lrm cache build` and `lrm cache add-reward` write."""

import logging
from pathlib import Path

import pytest
import torch
import yaml
from conftest import MeanReward

from data_cache import AddRewardConfig, BuildCacheConfig, CacheError, LatentCache, SourceConfig, add_reward, build_cache
from data_cache.ops import verify_cache
from lrm.config import ConfigError, load_config
from reward_adapters import create_reward
from shapes import ShapesWorld

FACTORY_CALLS = []
CRASH = {"from": None}  # a module switch, not a kwarg: kwargs are part of the recorded source


def make_sampler(channels=4, size=8, scale=1.0, prefix="sample", device=None):
    """Like a distill teacher/student sampler: built once (the model would load here), then fn(n, seed)."""
    FACTORY_CALLS.append({"channels": channels, "scale": scale, "prefix": prefix, "device": device})

    def sample(n, seed):
        if CRASH["from"] is not None and seed >= CRASH["from"]:
            raise RuntimeError("sampler crashed")
        g = torch.Generator().manual_seed(seed)
        z = scale * torch.randn(n, channels, size, size, generator=g)  # (n, C, h, w) latents of the shapes VAE
        return z, [f"{prefix} {seed} {i}" for i in range(n)]

    return sample


def sample_latents(n, seed, scale=1.0, prefix="fn"):
    """The plain form: called per batch with the generator kwargs."""
    return make_sampler(scale=scale, prefix=prefix)(n, seed)


def _gen_cfg(small_cfg, name, n=8, **src):
    source = SourceConfig(type="generator", num_samples=n, generator=f"{__name__}:make_sampler", generator_factory=True,
                          generator_kwargs={"scale": 0.8, "prefix": "gen"}, **src)
    return small_cfg(source=source, name=name, shard_size=4, batch_size=2, rewards=["brightness"])


def test_generator_by_import_path_decodes_latents_and_resumes(vae, text_encoder, small_cfg):
    FACTORY_CALLS.clear()
    cfg = _gen_cfg(small_cfg, "gen")
    # 1. the sampler dies while drawing records [4, 6): the shard [0, 4) is committed, nothing else
    CRASH["from"] = 4
    with pytest.raises(RuntimeError, match="sampler crashed"):
        build_cache(cfg, vae=vae, text_encoder=text_encoder)
    CRASH["from"] = None
    m = LatentCache.open(cfg.out_dir).manifest
    assert m["counts"]["records"] == 4 and not m["complete"]
    # the factory was built once, with the kwargs and the build's device (it takes a `device` parameter)
    assert FACTORY_CALLS == [{"channels": 4, "scale": 0.8, "prefix": "gen", "device": "cpu"}]
    # 2. resume: records 4..7 are drawn again with the same seeds
    cfg.resume = True
    build_cache(cfg, vae=vae, text_encoder=text_encoder)
    cache = LatentCache.open(cfg.out_dir)
    assert cache.manifest["complete"] and len(cache) == 8
    t = cache.tensors()
    assert cache.indices.tolist() == list(range(8))  # every record exactly once
    assert cache.column("source_id") == [f"generator:0:{i}" for i in range(8)]
    sampler = make_sampler(scale=0.8, prefix="gen")
    brightness = create_reward("brightness")
    for start in range(0, 8, 2):  # batches aligned to batch_size 2; batch seed = 0 * 1_000_003 + start
        z, prompts = sampler(2, start)
        torch.testing.assert_close(t["latents"][start:start + 2], z.half().float(), rtol=0, atol=0)
        assert cache.prompts[start:start + 2] == prompts == [f"gen {start} 0", f"gen {start} 1"]
        # the reward scored the pixels decoded from the generator's latents
        with torch.no_grad():
            want = brightness(vae.decode(z, clamp=True))
        torch.testing.assert_close(t["reward/brightness"][start:start + 2], want, rtol=0, atol=1e-5)
    assert cache.manifest["rewards"]["brightness"]["pixels_from"] == "decoded"
    assert cache.manifest["source"] == {"type": "generator", "callable": f"{__name__}:make_sampler", "seed": 0,
                                        "kwargs": {"scale": 0.8, "prefix": "gen"}, "factory": True}
    # 3. the resumed cache equals one built in one go
    fresh = _gen_cfg(small_cfg, "fresh")
    build_cache(fresh, vae=vae, text_encoder=text_encoder)
    f = LatentCache.open(fresh.out_dir)
    assert f.prompts == cache.prompts
    for k in ("latents", "reward/brightness", "text_tokens"):
        torch.testing.assert_close(f.tensors()[k], t[k], rtol=0, atol=0)
    assert verify_cache(cfg.out_dir)["ok"]
    # 4. other generator kwargs are another source: refused on resume
    other = _gen_cfg(small_cfg, "gen")
    other.source.generator_kwargs = {"scale": 0.5, "prefix": "gen"}
    other.resume = True
    with pytest.raises(CacheError, match="source"):
        build_cache(other, vae=vae, text_encoder=text_encoder)


def test_generator_config_errors():
    with pytest.raises(ConfigError, match="module:callable"):
        SourceConfig(type="generator", num_samples=4, generator="no_colon")
    with pytest.raises(ConfigError, match="source.type"):
        SourceConfig(type="shapes", generator_kwargs={"steps": 2})
    with pytest.raises(ConfigError, match="JSON"):
        SourceConfig(type="generator", num_samples=4, generator="m:f", generator_kwargs={"model": object()})
    # kwargs from YAML / the command line are typed
    cfg = load_config(BuildCacheConfig, overrides=["--source.type", "generator", "--source.generator", "a.b:c",
                                                   "--source.generator_kwargs", "{steps: 2, eta: 0.5, name: x}"])
    assert cfg.source.generator_kwargs == {"steps": 2, "eta": 0.5, "name": "x"}


def test_cli_build_from_generator_writes_config_and_log(tmp_path, capsys):
    from lrm.cli import main

    d = tmp_path / "cli-gen"
    rc = main(["cache", "build", "--out_dir", str(d), "--source.type", "generator", "--source.num_samples", "4",
               "--source.generator", f"{__name__}:sample_latents", "--source.generator_kwargs",
               "{scale: 0.5, prefix: cli}", "--shard_size", "2", "--batch_size", "2", "--device", "cpu",
               "--progress", "false", "--num_workers", "1", "--rewards", "[brightness]"])
    assert rc == 0
    cache = LatentCache.open(d)
    z, prompts = sample_latents(2, 2, scale=0.5, prefix="cli")
    torch.testing.assert_close(cache.tensors()["latents"][2:4], z.half().float(), rtol=0, atol=0)
    assert cache.prompts[2:4] == prompts
    # config.yaml reloads to the same config; log.txt holds the build's log lines
    cfg = load_config(BuildCacheConfig, d / "config.yaml")
    assert cfg.source.generator == f"{__name__}:sample_latents"
    assert cfg.source.generator_kwargs == {"scale": 0.5, "prefix": "cli"} and cfg.rewards == ["brightness"]
    text = (d / "log.txt").read_text()
    assert "4 records planned" in text and "4 records (4 written now" in text
    # the file handler is gone once the command returns
    assert not any(str(d) in getattr(h, "baseFilename", "") for h in logging.getLogger("lrm.data_cache").handlers)
    assert "complete=True" in capsys.readouterr().out


def test_reward_options_build_and_add_reward(vae, text_encoder, small_cfg):
    src = SourceConfig(num_samples=4, num_frames=4)
    cfg = small_cfg(source=src, rewards=["brightness"], reward_options={"brightness": {"frames": "first"}})
    build_cache(cfg, vae=vae, text_encoder=text_encoder)
    pixels, captions, _ = ShapesWorld(32, 4, 0).batch(range(4))  # (4, 4, 3, 32, 32)
    cache = LatentCache.open(cfg.out_dir)
    first = create_reward("brightness", frames="first")(pixels)
    assert not torch.allclose(first, create_reward("brightness")(pixels), atol=1e-4)  # the option matters
    torch.testing.assert_close(torch.from_numpy(cache.rewards("brightness")), first, rtol=1e-6, atol=1e-6)
    assert cache.manifest["rewards"]["brightness"]["options"] == {"frames": "first"}
    # a resume with other options is refused
    cfg2 = small_cfg(source=src, rewards=["brightness"], reward_options={"brightness": {"frames": "last"}},
                     resume=True)
    with pytest.raises(CacheError, match="options"):
        build_cache(cfg2, vae=vae, text_encoder=text_encoder)
    # add-reward: a composite whose components come from the options
    spec = {"rewards": {"brightness": 2.0, "temporal-flickering": 1.0}}
    res = add_reward(AddRewardConfig(cache_dir=cfg.out_dir, reward="composite", reward_options={"composite": spec},
                                     pixels_from="source", progress=False, device="cpu"))
    name = "composite(2*brightness,1*temporal-flickering)"
    assert res["reward"] == name
    want = 2.0 * create_reward("brightness")(pixels) + create_reward("temporal-flickering")(pixels)
    torch.testing.assert_close(torch.from_numpy(LatentCache.open(cfg.out_dir).rewards(name)), want, rtol=1e-6,
                               atol=1e-6)
    assert LatentCache.open(cfg.out_dir).manifest["rewards"][name]["options"] == spec


def test_reward_options_config_errors():
    with pytest.raises(ConfigError, match="not a reward of this command"):
        BuildCacheConfig(rewards=["brightness"], reward_options={"colorfulness": {}})
    with pytest.raises(ConfigError, match="mapping"):
        BuildCacheConfig(rewards=["brightness"], reward_options={"brightness": 3})
    with pytest.raises(ConfigError, match="not a reward of this command"):
        AddRewardConfig(reward="brightness", reward_options={"brightnes": {"frames": "first"}})
    cfg = load_config(AddRewardConfig, overrides=["--reward", "clip-score", "--reward_options",
                                                  "{clip-score: {arch: ViT-B-32, scale: 2.5}}"])
    assert cfg.reward_options == {"clip-score": {"arch": "ViT-B-32", "scale": 2.5}}


def test_cli_add_reward_on_tiny_cache(vae, text_encoder, small_cfg, capsys):
    from lrm.cli import main

    cfg = small_cfg(n=4, shard_size=2)
    build_cache(cfg, rewards=[MeanReward()], vae=vae, text_encoder=text_encoder)
    pixels, captions, _ = ShapesWorld(32, None, 0).batch(range(4))
    d = cfg.out_dir
    rc = main(["cache", "add-reward", "--cache_dir", d, "--reward", "composite", "--reward_options",
               "{composite: {rewards: {colorfulness: 0.01, brightness: 2.0}}}", "--pixels_from", "source",
               "--device", "cpu", "--progress", "false", "--batch_size", "3"])
    assert rc == 0
    name = "composite(0.01*colorfulness,2*brightness)"
    assert f'"reward": "{name}"' in capsys.readouterr().out
    cache = LatentCache.open(d)
    want = 0.01 * create_reward("colorfulness")(pixels) + 2.0 * create_reward("brightness")(pixels)
    torch.testing.assert_close(torch.from_numpy(cache.rewards(name)), want, rtol=1e-5, atol=1e-5)
    assert cache.manifest["rewards"][name]["pixels_from"] == "source" and verify_cache(d)["ok"]
    run = Path(d) / "add-reward" / "composite"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["reward"] == "composite" and saved["reward_options"]["composite"]["rewards"]["brightness"] == 2.0
    log = (run / "log.txt").read_text()
    assert f"add-reward {name}: 2 shards scored (4 from the source, 0 decoded), 0 missing" in log
    # a directory that is not a cache: one-line error, nothing created there
    assert main(["cache", "add-reward", "--cache_dir", str(Path(d) / "nope"), "--reward", "brightness"]) == 2
    assert not (Path(d) / "nope").exists()
