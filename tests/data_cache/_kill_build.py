"""Subprocess for the SIGKILL and concurrency tests: builds (or resumes) a small Shapes cache slowly enough to be
killed mid-way, or (``add-reward``) scores one with one more reward, starting at a given wall-clock time so that
several processes race.

It uses tiny stand-ins for the VAE and the text encoder (torch only) so that each killed process starts in a
couple of seconds instead of importing diffusers and transformers; the real encoders are covered in-process.

    python _kill_build.py OUT_DIR N                        build / resume N records
    python _kill_build.py add-reward OUT_DIR NAME START     add reward NAME (scale = len(NAME)) at time START
"""

import os
import sys
import time
from types import SimpleNamespace

import torch

from data_cache import BuildCacheConfig, SourceConfig, build_cache
from lrm.latent_space import VAE
from lrm.text import TextEmbedding


class SlowReward:
    name = "slow-mean"
    version = "1"
    modality = "image"
    device = "cpu"

    def __call__(self, pixels, prompts=None):
        time.sleep(float(os.environ.get("KILL_BUILD_SLEEP", "0.02")))  # seconds per batch
        return pixels.flatten(1).mean(1)


class ScaledMean(SlowReward):
    """Mean brightness times ``scale``: one reward per name for the concurrent add-reward test."""

    def __init__(self, name: str, scale: float):
        self.name, self.scale = name, scale

    def __call__(self, pixels, prompts=None):
        time.sleep(0.01)
        return pixels.flatten(1).mean(1) * self.scale


class _TinyAE(torch.nn.Module):
    """The slice of diffusers' AutoencoderKL interface that ``lrm.latent_space.VAE`` uses; /4, 4 channels."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.enc = torch.nn.Conv2d(3, 8, 4, stride=4)
        self.dec = torch.nn.ConvTranspose2d(4, 3, 4, stride=4)
        self.config = SimpleNamespace(scaling_factor=1.0, shift_factor=None, latent_channels=4,
                                      block_out_channels=(8, 8, 8))

    def encode(self, x):
        mean, _ = self.enc(x).chunk(2, dim=1)
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean, sample=lambda g=None: mean))

    def decode(self, z):
        return SimpleNamespace(sample=torch.tanh(self.dec(z)))


class TinyText(torch.nn.Module):
    """Deterministic character-hash text embedding (L=8, D=16)."""

    max_length, dim = 8, 16

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Embedding(128, self.dim)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(0))

    def identity(self):
        return {"name": "tiny-char-text", "dim": self.dim, "max_length": self.max_length, "pooling": "mean"}

    def forward(self, prompts):
        ids = torch.zeros(len(prompts), self.max_length, dtype=torch.long)
        mask = torch.zeros(len(prompts), self.max_length, dtype=torch.bool)
        for i, p in enumerate(prompts):
            words = p.split()[: self.max_length]
            for j, w in enumerate(words):
                ids[i, j] = sum(map(ord, w)) % 128
                mask[i, j] = True
        tokens = self.proj(ids) * mask.unsqueeze(-1)
        pooled = tokens.sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        return TextEmbedding(tokens.detach(), mask, pooled.detach())


def tiny_vae() -> VAE:
    return VAE(_TinyAE(), vae_id="tiny-test-ae")


def config(out_dir: str, n: int) -> BuildCacheConfig:
    return BuildCacheConfig(out_dir=out_dir, source=SourceConfig(num_samples=n), batch_size=2, shard_size=3,
                            num_workers=1, progress=False, device="cpu", resume=True)


def add_reward_at(out_dir: str, name: str, start: float) -> None:
    from data_cache import AddRewardConfig, add_reward

    time.sleep(max(0.0, start - time.time()))
    add_reward(AddRewardConfig(cache_dir=out_dir, pixels_from="source", batch_size=2, progress=False, device="cpu"),
               reward=ScaledMean(name, float(len(name))))


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "add-reward":
        add_reward_at(sys.argv[2], sys.argv[3], float(sys.argv[4]))
    else:
        out_dir, n = sys.argv[1], int(sys.argv[2])
        build_cache(config(out_dir, n), rewards=[SlowReward()], vae=tiny_vae(), text_encoder=TinyText())
    print("DONE", flush=True)
