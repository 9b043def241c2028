"""`lrm cache build` settings found at real size (issue 16): the VAE chunk per call, and a speed that does not
count model loading."""

import time

import pytest
import torch
from conftest import MeanReward

from data_cache import BuildCacheConfig, LatentCache, build_cache
from lrm.config import ConfigError


@pytest.fixture
def encode_calls(monkeypatch):
    """Frames per AutoencoderKL.encode call (the shipped Shapes VAE is one)."""
    from diffusers import AutoencoderKL

    calls, real = [], AutoencoderKL.encode
    monkeypatch.setattr(AutoencoderKL, "encode", lambda self, x, *a, **k: (calls.append(x.shape[0]),
                                                                            real(self, x, *a, **k))[1])
    return calls


def test_vae_chunk_size_key_and_its_auto_default(small_cfg, text_encoder, encode_calls, monkeypatch):
    import lrm.latent_space as ls

    assert BuildCacheConfig().vae_chunk_size == 0  # auto
    cfg = small_cfg(n=8, shard_size=8, batch_size=5, vae_chunk_size=2)  # the VAE is loaded from the config
    build_cache(cfg, rewards=[MeanReward()], text_encoder=text_encoder)
    assert encode_calls == [2, 2, 1, 2, 1]  # batches of 5 and 3 records
    ref = LatentCache.open(cfg.out_dir).tensors()["latents"]

    # auto: frames per call from the pixel size, max(1, CHUNK_PIXELS // (H*W)); here 3 frames of 32x32 per call
    encode_calls.clear()
    monkeypatch.setattr(ls, "CHUNK_PIXELS", 3 * 32 * 32)
    cfg = small_cfg(n=8, shard_size=8, batch_size=5, name="auto")
    build_cache(cfg, rewards=[MeanReward()], text_encoder=text_encoder)
    assert encode_calls == [3, 2, 3]
    torch.testing.assert_close(LatentCache.open(cfg.out_dir).tensors()["latents"], ref, rtol=2e-3, atol=2e-3)

    with pytest.raises(ConfigError, match="vae_chunk_size"):
        BuildCacheConfig(vae_chunk_size=-1)


def test_vae_chunk_size_is_in_the_help(capsys):
    from lrm.cli import main

    with pytest.raises(SystemExit):
        main(["cache", "build", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--vae_chunk_size" in out and "16 at 512x512" in out and "--vae_bf16" in out


def test_records_per_s_excludes_model_loading(small_cfg, vae, text_encoder, monkeypatch):
    import data_cache.build as build

    def slow_load(*a, **k):
        time.sleep(1.5)  # a large VAE coming from disk
        return vae

    monkeypatch.setattr(build, "load_vae", slow_load)
    cfg = small_cfg(n=8, shard_size=4, batch_size=4)
    out = build_cache(cfg, rewards=[MeanReward()], text_encoder=text_encoder)
    n = out["records_written"]
    assert n == 8 and out["setup_s"] >= 1.5 and out["pipeline_s"] <= out["seconds"] - 1.5
    assert out["records_per_s"] == pytest.approx(n / out["pipeline_s"])
    assert out["records_per_s_total"] == pytest.approx(n / out["seconds"])
    assert out["records_per_s"] > n / (out["seconds"] - 1.5)  # the loading time is not in the rate


def test_cli_build_prints_both_speeds(tmp_path, capsys):
    from lrm.cli import main

    d = str(tmp_path / "c")
    assert main(["cache", "build", "--out_dir", d, "--source.num_samples", "4", "--shard_size", "4", "--device", "cpu",
                 "--progress", "false", "--num_workers", "1", "--vae_chunk_size", "3"]) == 0
    out = capsys.readouterr().out
    assert "records/s after" in out and "s of model loading" in out and "records/s overall" in out
    assert "vae_chunk_size: 3" in (tmp_path / "c" / "config.yaml").read_text()
