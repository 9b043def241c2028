import pytest
import torch
from conftest import MeanReward

from data_cache import LatentCache, build_cache, verify_cache

pytestmark = pytest.mark.gpu


class GPUMean(MeanReward):
    name = "gpu-mean"
    device = "cuda"

    def __call__(self, pixels, prompts=None):
        assert pixels.is_cuda
        return pixels.flatten(1).mean(1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_build_matches_cpu_build(small_cfg):
    """The CUDA path (pinned memory, async copies on a side stream, CPU rewards in a pool) writes what the CPU
    path writes."""
    from lrm.latent_space import VAE
    from lrm.text import TextEncoder

    out = {}
    for dev in ("cpu", "cuda"):
        cfg = small_cfg(n=50, shard_size=16, batch_size=8, name=f"c-{dev}")
        cfg.device = dev
        cfg.worker_type = "thread"
        rewards = [MeanReward()] + ([GPUMean()] if dev == "cuda" else [])
        build_cache(cfg, rewards=rewards, vae=VAE.shapes(device=dev), text_encoder=TextEncoder(device=dev))
        assert verify_cache(cfg.out_dir)["ok"]
        out[dev] = LatentCache.open(cfg.out_dir).tensors()
    a, b = out["cpu"], out["cuda"]
    for k in ("latents", "text_tokens", "text_pooled"):
        torch.testing.assert_close(b[k], a[k], rtol=1e-2, atol=1e-2)
    assert torch.equal(a["text_mask"], b["text_mask"]) and torch.equal(a["index"], b["index"])
    torch.testing.assert_close(b["reward/mean-brightness"], a["reward/mean-brightness"])
    torch.testing.assert_close(b["reward/gpu-mean"], a["reward/mean-brightness"])
    t = LatentCache.open(small_cfg(name="c-cuda").out_dir).tensors(device="cuda")
    assert t["latents"].is_cuda and t["latents"].dtype == torch.float32
