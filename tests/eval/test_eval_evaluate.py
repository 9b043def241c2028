"""evaluate() on tiny generators: table columns, values, CIs, KL vs a reference, Shapes data generator."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from eval.evaluate import EvalResult, evaluate, noise_seed, sample_noise


class Brightness:
    name, version, modality, differentiable = "brightness-test", "0", "image", False

    def __call__(self, pixels, prompts=None):
        assert prompts is None  # image modality: no prompts
        return pixels.flatten(1).mean(1)


class SaysRed:
    """Text-image test reward: 1 when the prompt says red and the image is bright, else 0."""
    name, modality = "says-red", "text-image"

    def __call__(self, pixels, prompts=None):
        bright = pixels.flatten(1).mean(1) > 0.5
        return torch.tensor([float(b and "red" in p) for b, p in zip(bright, prompts)])


def tiny_decode(z):  # (B, 4, 8, 8) -> (B, 3, 8, 8) in [0, 1]
    return torch.sigmoid(z[:, :3])


def tiny_text(prompts):
    tokens = torch.stack([torch.full((4, 6), float(len(p))) for p in prompts])
    return tokens, torch.ones(len(prompts), 4, dtype=torch.bool)


class ScaledNoise:
    """latents = scale * noise + text-length offset; reports 2 network evaluations per sample."""
    nfe = 2

    def __init__(self, scale=1.0, shift=0.0):
        self.scale, self.shift = scale, shift

    def __call__(self, noise, text_tokens, text_mask):
        return self.scale * noise + self.shift + 0.01 * text_tokens.mean((1, 2))[:, None, None, None]


PROMPTS = ["a red circle", "two blue squares on a white background", "a red triangle at the top"]


def _run(gen, **kw):
    args = dict(n_per_prompt=4, seeds=[10, 11, 12, 13], gold_rewards={"bright": Brightness()},
                proxy_rewards={"zmean": lambda z, t, m: z.flatten(1).mean(1)}, decode=tiny_decode,
                text_encoder=tiny_text, latent_shape=(4, 8, 8), batch_size=5, n_bootstrap=200, progress=False)
    args.update(kw)
    return evaluate(gen, PROMPTS, **args)


def test_evaluate_columns_and_values():
    res = _run(ScaledNoise(), accuracy_rewards={"color": SaysRed()}, reference=ScaledNoise(shift=0.5), kl_sigma=2.0)
    s = res.samples
    assert len(s) == 12
    for c in ["prompt_id", "prompt", "sample", "seed", "noise_seed", "gold/bright", "proxy/zmean", "acc/color",
              "acc/all", "kl", "nfe", "time_per_sample_s", "time_per_nfe_s"]:
        assert c in s.columns, c
    # values recomputed by hand for one sample
    row = s[(s.prompt_id == 1) & (s["sample"] == 2)].iloc[0]
    z = sample_noise((4, 8, 8), noise_seed(12, 1))[None] + 0.01 * len(PROMPTS[1])
    assert row["noise_seed"] == noise_seed(12, 1)
    assert row["gold/bright"] == pytest.approx(float(tiny_decode(z).mean()), abs=1e-6)
    assert row["proxy/zmean"] == pytest.approx(float(z.mean()), abs=1e-6)
    # KL vs a reference shifted by 0.5 under shared noise: 256 * 0.25 / (2 * 4) = 8
    assert np.allclose(s["kl"], 8.0)
    assert res.metric("d") == pytest.approx(math.sqrt(8.0))
    # accuracy: only prompts naming a color are scored; prompt 1 (blue) is never "red"
    assert (s[s.prompt_id == 1]["acc/color"] == 0).all()
    assert s["acc/all"].equals(s["acc/color"])
    assert (s["nfe"] == 2).all()
    # per-prompt view and summary
    pp = res.per_prompt
    assert list(pp["prompt_id"]) == [0, 1, 2] and (pp["n"] == 4).all()
    assert pp["gold/bright"].iloc[0] == pytest.approx(s[s.prompt_id == 0]["gold/bright"].mean())
    assert ((pp["diversity"] > 1) & (pp["diversity"] <= 4)).all()
    summ = res.summary.set_index("metric")
    assert summ.loc["gold/bright", "mean"] == pytest.approx(s["gold/bright"].mean())
    lo, hi = summ.loc["gold/bright", ["ci_low", "ci_high"]]
    assert lo <= summ.loc["gold/bright", "mean"] <= hi and lo < hi
    assert {"diversity", "time_per_sample_s", "time_per_nfe_s"} <= set(summ.index)
    assert res.meta["nfe"] == 2


def test_evaluate_reproducible_and_diversity_of_identical_samples(tmp_path):
    a = _run(ScaledNoise())
    b = _run(ScaledNoise())
    cols = ["gold/bright", "proxy/zmean"]
    pd.testing.assert_frame_equal(a.samples[cols], b.samples[cols])
    const = lambda noise, t, m: torch.zeros_like(noise) + t.mean((1, 2))[:, None, None, None] / 40
    c = _run(const)
    assert np.allclose(c.per_prompt["diversity"], 1.0)
    paths = c.save(tmp_path / "ev")
    for name in ("samples", "per_prompt", "summary"):
        assert (tmp_path / "ev" / f"{name}.parquet").exists()
        back = pd.read_csv(tmp_path / "ev" / f"{name}.csv")
        assert len(back) == len(getattr(c, name))
    assert paths["grid"].exists()
    assert isinstance(c, EvalResult)


def test_evaluate_errors():
    with pytest.raises(ValueError, match="seeds"):
        _run(ScaledNoise(), seeds=[1, 2])
    with pytest.raises(ValueError, match="accuracy_rewards keys"):
        _run(ScaledNoise(), accuracy_rewards={"colour": SaysRed()})
    with pytest.raises(TypeError, match="latents"):
        _run(lambda n, t, m: "oops")


def test_shapes_data_generator(shapes_vae):
    from eval.generators import ShapesDataGenerator, shapes_prompts

    prompts = shapes_prompts(3, seed=5)
    gen = ShapesDataGenerator(shapes_vae)
    res = evaluate(gen, prompts, n_per_prompt=3, seeds=0, gold_rewards={"bright": Brightness()},
                   decode=shapes_vae, latent_shape=(4, 8, 8), n_bootstrap=50, progress=False,
                   reference=ShapesDataGenerator(shapes_vae, pixel_noise=0.2))
    assert len(res.samples) == 9 and "nfe" not in res.samples.columns
    assert (res.samples["kl"] > 0).all()
    # rendered samples follow the prompt: decoded background matches the caption's background word
    from shapes.world import BACKGROUNDS, parse_caption

    pix = shapes_vae.decode(gen(torch.zeros(3, 4, 8, 8), prompts=prompts, seeds=[1, 2, 3]))
    for p, x in zip(prompts, pix):
        bg = parse_caption(p)["background"]
        assert torch.allclose(x[:, 0, 0], torch.tensor(BACKGROUNDS[bg], dtype=torch.float32), atol=0.08)
    assert (res.per_prompt["diversity"] > 1.0).all()


def test_shapes_accuracy_on_real_data(shapes_vae):
    from eval.evaluate import shapes_accuracy_rewards
    from eval.generators import ShapesDataGenerator, shapes_prompts
    from shapes.world import parse_caption

    prompts = shapes_prompts(4, seed=3)
    acc = shapes_accuracy_rewards()
    res = evaluate(ShapesDataGenerator(shapes_vae), prompts, n_per_prompt=2, seeds=0, decode=shapes_vae,
                   accuracy_rewards=acc, n_bootstrap=20, progress=False)
    s = res.samples
    assert s["acc/color"].eq(1.0).all()  # real data has the asked color
    named_pos = [parse_caption(p)["position"] is not None for p in prompts]
    assert s["acc/position"].notna().sum() == 2 * sum(named_pos)  # only prompts naming a position are scored
    # a generator that draws every prompt in the wrong color fails color accuracy
    data = ShapesDataGenerator(shapes_vae)

    def wrong_color(noise, tokens, mask, prompts, seeds):
        swap = [p.replace(parse_caption(p)["color"], "green" if parse_caption(p)["color"] != "green" else "red")
                for p in prompts]
        return data(noise, tokens, mask, prompts=swap, seeds=seeds)

    bad = evaluate(wrong_color, prompts, n_per_prompt=1, seeds=0, decode=shapes_vae,
                   accuracy_rewards={"color": acc["color"]}, n_bootstrap=20, progress=False)
    assert bad.samples["acc/color"].eq(0.0).all() and bad.samples["acc/all"].eq(0.0).all()
