"""`lrm eval` config: diversity_features picks what the Vendi diversity is computed on, and run_eval passes it."""

import json

import pytest
import torch

from eval.cli import EvalConfig, run_eval
from eval.evaluate import PooledPixels, VAEFeatures, diversity_embedding, evaluate
from eval.vendi import vendi_score
from lrm.config import ConfigError, load_config


class FakeText:
    """Stands in for lrm.text.TextEncoder (the Shapes data generator ignores the text)."""

    def __init__(self, *a, **kw):
        pass

    def __call__(self, prompts):
        return torch.zeros(len(prompts), 2, 4), torch.ones(len(prompts), 2, dtype=torch.bool)


def test_pooled_features_ignore_pixel_noise_that_raw_pixels_count():
    torch.manual_seed(0)
    base = torch.rand(1, 3, 1, 1).expand(4, 3, 16, 16).clone()  # four identical flat images
    checker = (torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2 * 2.0 - 1.0  # +-1, mean 0 per 2x2 block
    signs = torch.tensor([1.0, -1.0, 0.5, 0.0])[:, None, None, None]
    noisy = base + 0.2 * signs * checker  # differ only in zero-mean high-frequency noise
    assert vendi_score(noisy) > 1.05  # raw pixels: the noise makes them look diverse
    f = PooledPixels(8)
    assert f(noisy).shape == (4, 3 * 64) and f.name == "pooled8"
    assert vendi_score(noisy, features=f) == pytest.approx(1.0, abs=1e-6)  # pooled: all the same image
    assert diversity_embedding("pixels") is None
    assert isinstance(diversity_embedding("pooled", pool_size=4), PooledPixels)
    with pytest.raises(ValueError, match="needs the VAE"):
        diversity_embedding("vae")
    with pytest.raises(ValueError, match="must be one of"):
        diversity_embedding("clip")


def test_evaluate_records_the_diversity_source():
    gen = lambda noise, tok, mask: noise  # noqa: E731
    kw = dict(n_per_prompt=3, decode=lambda z: torch.sigmoid(z[:, :3]), latent_shape=(4, 8, 8), n_bootstrap=0,
              progress=False)
    a = evaluate(gen, ["a", "b"], **kw)
    b = evaluate(gen, ["a", "b"], diversity_features=PooledPixels(2), **kw)
    assert a.meta["diversity_features"] == "pixels" and b.meta["diversity_features"] == "pooled2"
    assert not (a.per_prompt["diversity"] == b.per_prompt["diversity"]).any()


def test_lrm_eval_diversity_features_option(tmp_path, monkeypatch, shapes_vae):
    import lrm.latent_space
    import lrm.text

    monkeypatch.setattr(lrm.text, "TextEncoder", FakeText)
    monkeypatch.setattr(lrm.latent_space.VAE, "shapes", classmethod(lambda cls, device="cpu", **kw: shapes_vae))
    base = dict(generator="shapes-data", pixel_noise=0.2, num_prompts=2, n_per_prompt=3, gold_rewards=["colorfulness"],
                accuracy=False, n_bootstrap=0, report=False, device="cpu", batch_size=6)
    div, feats = {}, {}
    for name in ("pixels", "pooled", "vae"):
        cfg = load_config(EvalConfig, None, {**base, "out_dir": str(tmp_path / name), "diversity_features": name})
        res = run_eval(cfg)
        div[name] = res.per_prompt["diversity"].tolist()
        feats[name] = json.loads((tmp_path / name / "eval.json").read_text())["meta"]["diversity_features"]
        # the rewards do not depend on the option: same samples, only the diversity source changes
        assert res.metric("gold/colorfulness") == pytest.approx(
            json.loads((tmp_path / "pixels" / "eval.json").read_text())["summary"][0]["mean"])
    assert feats == {"pixels": "pixels", "pooled": "pooled8", "vae": "vae"}
    assert div["pixels"] != div["pooled"] and div["pixels"] != div["vae"] and div["pooled"] != div["vae"]
    # pixel noise inflates raw-pixel diversity; the 8x8-pooled view discounts it
    assert all(p > q for p, q in zip(div["pixels"], div["pooled"]))
    assert isinstance(diversity_embedding("vae", shapes_vae), VAEFeatures)
    with pytest.raises(ConfigError):
        load_config(EvalConfig, None, {"diversity_features": "clip"})
    with pytest.raises(ConfigError, match="diversity_pool"):
        EvalConfig(diversity_pool=0)
