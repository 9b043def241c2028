import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class MeanReward:
    """A tiny local reward: mean brightness (image or video)."""

    name = "mean-brightness"
    version = "1"
    modality = "image"
    device = "cpu"

    def __call__(self, pixels, prompts=None):
        return pixels.flatten(1).mean(1)


class PromptLengthReward:
    """Text-image reward: red channel mean times the prompt length (uses prompts)."""

    name = "red-x-len"
    version = "2"
    modality = "text-image"
    device = "cpu"

    def __call__(self, pixels, prompts=None):
        import torch

        return pixels[:, 0].flatten(1).mean(1) * torch.tensor([float(len(p)) for p in prompts])


@pytest.fixture(scope="session")
def vae():
    from lrm.latent_space import VAE

    return VAE.shapes()


@pytest.fixture(scope="session")
def text_encoder():
    from lrm.text import TextEncoder

    return TextEncoder()


@pytest.fixture
def small_cfg(tmp_path):
    from data_cache import BuildCacheConfig, SourceConfig

    def make(n=12, **kw):
        src = kw.pop("source", None) or SourceConfig(num_samples=n)
        return BuildCacheConfig(out_dir=str(tmp_path / kw.pop("name", "cache")), source=src, batch_size=kw.pop(
            "batch_size", 4), shard_size=kw.pop("shard_size", 8), num_workers=1, progress=False, device="cpu", **kw)

    return make
