"""`lrm eval` and `lrm overopt` on a Stable-Diffusion-class diffusers pipeline (a tiny random one, tests/tiny_sd.py:
CLIP with 77 tokens, an AutoencoderKL, a UNet2DConditionModel), with prompt files and a data cache instead of the
Shapes world; the Shapes-only parts (image sizes, accuracy, shapes-adherence, Shapes captions) are refused or switched
off with one-line errors."""

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from eval.cli import PLAIN_IMAGE_GOLD, EvalConfig, load_prompts, resolve_image_size, resolve_metrics, run_eval
from eval.generators import are_shapes_captions, shapes_prompts
from eval.overopt_run import OveroptConfig, auto_patch, auto_temporal_patch, run_overopt, teacher_is_video
from lrm.config import ConfigError, load_config

PROMPTS = ["a photo of a cat on a sofa", "a watercolor landscape at dusk", "a red car parked by the sea"]
NOUNS = ["cat", "dog", "boat", "house", "tree", "car"]
ADJS = ["small", "large", "old", "new"]


def sd_keys(sd: Path) -> dict:
    """The model keys of an SD-class pipeline directory, as a user writes them."""
    return dict(vae=str(sd), vae_subfolder="vae", text_encoder=str(sd), text_max_length=77)


@pytest.fixture(scope="module")
def prompt_csv(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "prompt"])
        w.writerows(enumerate(PROMPTS))
    return path


@pytest.fixture(scope="module")
def sd_cache(tiny_sd_dir, tmp_path_factory) -> Path:
    """24 random 16 px images with captions, encoded by the pipeline's VAE and CLIP, scored by colorfulness."""
    from PIL import Image

    from data_cache import BuildCacheConfig, SourceConfig, build_cache

    root = tmp_path_factory.mktemp("sd_cache")
    imgs = root / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i, (adj, noun) in enumerate((a, n) for a in ADJS for n in NOUNS):
        base = rng.uniform(0, 1, 3) * rng.uniform(0.2, 1.0)  # one tint per image: colorfulness varies
        arr = np.clip(base + 0.15 * rng.standard_normal((16, 16, 3)), 0, 1)
        Image.fromarray((arr * 255).round().astype(np.uint8)).save(imgs / f"{i}.png")
        rows.append({"file": f"{i}.png", "caption": f"a {adj} {noun}"})
    pd.DataFrame(rows).to_csv(imgs / "captions.csv", index=False)
    cfg = BuildCacheConfig(out_dir=str(root / "cache"),
                           source=SourceConfig(type="folder", path=str(imgs), num_samples=0),
                           vae=str(tiny_sd_dir), vae_subfolder="vae", text_encoder=str(tiny_sd_dir),
                           text_max_length=77, rewards=["colorfulness"], latent_dtype="float32", batch_size=8,
                           shard_size=64, num_workers=1, device="cpu", progress=False)
    build_cache(cfg)
    return root / "cache"


@pytest.fixture(scope="module")
def sd_lrm(sd_cache, tmp_path_factory) -> Path:
    """A tiny image LRM of colorfulness fitted on the pipeline's latents."""
    from latent_rewards import LatentData, fit
    from latent_rewards.train import FitConfig

    out = tmp_path_factory.mktemp("sd_lrm") / "lrm"
    fit(LatentData.from_cache(sd_cache, "colorfulness"), FitConfig(
        head="image-cnn", head_kwargs={"width": 8, "depth": 1, "patch": 2}, steps=3, batch_size=8, device="cpu",
        progress=False, eval_every=3), out_dir=out)
    return out


# ---- lrm eval ----------------------------------------------------------------------------------------------------

def test_eval_samples_a_diffusers_pipeline_on_a_prompt_csv(tiny_sd_dir, prompt_csv, sd_lrm, tmp_path):
    sd = str(tiny_sd_dir)
    cfg = load_config(EvalConfig, None, dict(proxy_rewards=[str(sd_lrm)],
        out_dir=str(tmp_path / "eval"), generator="denoiser", denoiser=sd, reference=sd, sampler="ddim", steps=2,
        guidance_scale=2.0, prompts_file=str(prompt_csv), image_size=16, n_per_prompt=2,
        gold_rewards=["colorfulness"], accuracy=False, batch_size=4, vae_chunk_size=3, n_bootstrap=10, report=False,
        device="cpu", **sd_keys(tiny_sd_dir)))
    res = run_eval(cfg)
    s = res.samples
    assert len(s) == len(PROMPTS) * 2 and s["prompt"].tolist() == [p for p in PROMPTS for _ in range(2)]
    assert np.isfinite(s["gold/colorfulness"]).all() and s["gold/colorfulness"].std() > 0
    assert np.isfinite(s["proxy/colorfulness@lrm"]).all()  # an image LRM of the pipeline's latent space
    assert not any(c.startswith("acc/") for c in s.columns)
    assert (s["kl"] == 0).all() and res.metric("d") == 0.0  # the reference is the same pipeline, same noise
    assert res.meta["latent_shape"] == [4, 8, 8] and res.meta["image_size"] == 16
    assert res.meta["shapes_captions"] is False and res.meta["nfe"] == 4  # 2 steps x CFG
    assert res.preview.shape == (6, 3, 16, 16)
    assert np.isfinite(res.per_prompt["diversity"]).all()
    meta = json.loads((tmp_path / "eval" / "eval.json").read_text())["meta"]
    assert meta["gold_rewards"] == ["colorfulness"] and meta["accuracy_attributes"] == []


def test_eval_defaults_and_refusals_follow_the_prompts(tiny_sd_dir, prompt_csv, tmp_path):
    txt = tmp_path / "shapes.txt"
    txt.write_text("\n".join(shapes_prompts(3, seed=2)) + "\n\n")
    shapes_cfg = EvalConfig(prompts_file=str(txt))
    prompts, shapes = load_prompts(shapes_cfg)
    assert len(prompts) == 3 and shapes and are_shapes_captions(prompts)
    assert resolve_metrics(shapes_cfg, prompts, shapes) == (["shapes-adherence", "jpeg-compressibility",
                                                              "colorfulness", "sharpness"], True)
    sd = dict(generator="denoiser", denoiser=str(tiny_sd_dir), prompts_file=str(prompt_csv), **sd_keys(tiny_sd_dir))
    plain = EvalConfig(**sd)
    prompts, shapes = load_prompts(plain)
    assert prompts == PROMPTS and not shapes
    assert resolve_metrics(plain, prompts, shapes) == (PLAIN_IMAGE_GOLD, False)  # no Shapes metric by default
    with pytest.raises(ConfigError, match="accuracy: true needs Shapes captions.*set accuracy: false"):
        resolve_metrics(EvalConfig(**sd, accuracy=True), prompts, shapes)
    with pytest.raises(ConfigError, match=r"\['shapes-adherence'\] score Shapes attributes"):
        resolve_metrics(EvalConfig(**sd, gold_rewards=["shapes-adherence", "sharpness"]), prompts, shapes)
    # image sizes: 32 / 64 only in the Shapes world; elsewhere a multiple of the VAE's factor, default from the model
    with pytest.raises(ConfigError, match="32 or 64 in the Shapes world"):
        EvalConfig(image_size=48)
    with pytest.raises(ConfigError, match="32 or 64 in the Shapes world"):
        EvalConfig(**{**sd, "image_size": 512, "reference": "shapes-data"})
    assert EvalConfig(**sd, image_size=512).image_size == 512
    sd15 = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(sample_size=64)))
    assert resolve_image_size(EvalConfig(**sd), SimpleNamespace(downsample=8), sd15) == 512
    with pytest.raises(ConfigError, match="not a positive multiple of .* downsampling factor 8"):
        resolve_image_size(EvalConfig(**sd, image_size=500), SimpleNamespace(downsample=8), sd15)
    assert resolve_image_size(EvalConfig(), SimpleNamespace(downsample=4)) == 32  # Shapes default
    with pytest.raises(ConfigError, match="diffusers model but vae is 'shapes'.*vae_subfolder: vae") as e:
        EvalConfig(generator="denoiser", denoiser=str(tiny_sd_dir))
    assert "\n" not in str(e.value)


def test_eval_refuses_a_mismatched_text_encoder_and_proxy(tiny_sd_dir, prompt_csv, sd_lrm, tmp_path):
    from lrm.latent_space import LatentSpaceMismatchError

    cfg = EvalConfig(out_dir=str(tmp_path / "e"), generator="denoiser", denoiser=str(tiny_sd_dir),
                     prompts_file=str(prompt_csv), image_size=16, n_per_prompt=1, gold_rewards=["colorfulness"],
                     report=False, device="cpu", vae=str(tiny_sd_dir), vae_subfolder="vae")  # MiniLM: 384 wide
    with pytest.raises(ConfigError, match="384-d tokens but .* takes 32-d"):
        run_eval(cfg)
    shapes = EvalConfig(out_dir=str(tmp_path / "s"), num_prompts=2, n_per_prompt=1, proxy_rewards=[str(sd_lrm)],
                        report=False, device="cpu")  # Shapes data in the Shapes VAE's latents: not the LRM's
    with pytest.raises(LatentSpaceMismatchError, match="the latents given to this LRM"):
        run_eval(shapes)


# ---- lrm overopt -------------------------------------------------------------------------------------------------

def overopt_cfg(sd: Path, run_dir: Path, **kw) -> OveroptConfig:
    base = dict(run_dir=str(run_dir), device="cpu", teacher=str(sd), method="lrm", gold_reward="colorfulness",
                lrm_train_size=24, lrm_steps=6, lrm_batch_size=8, lrm_width=16, lrm_depth=1, steps=2, eval_every=1,
                lr=1e-3, batch_size=2, num_eval_prompts=2, n_per_prompt=2, n_bootstrap=5, eval_batch_size=4,
                progress=False, finetune={"student_steps": 1, "ddpo_grad_steps": 1}, **sd_keys(sd))
    return load_config(OveroptConfig, None, {**base, **kw})


def test_overopt_with_a_diffusers_teacher_and_a_data_cache(tiny_sd_dir, sd_cache, prompt_csv, tmp_path):
    cfg = overopt_cfg(tiny_sd_dir, tmp_path / "run", data_cache=str(sd_cache), eval_prompt_file=str(prompt_csv))
    assert not cfg.is_video and not cfg.shapes_world
    ft = cfg.finetune_config(tmp_path / "ft")
    assert (ft.teacher, ft.vae, ft.vae_subfolder, ft.text_encoder, ft.text_max_length, ft.data_cache) == \
        (str(tiny_sd_dir), str(tiny_sd_dir), "vae", str(tiny_sd_dir), 77, str(sd_cache))
    s = run_overopt(cfg)
    t = pd.read_csv(tmp_path / "run" / "study" / "study.csv")
    assert list(t["step"]) == [0, 1, 2] and s["n_checkpoints"] == 3
    for c in ("gold/colorfulness", "proxy/lrm", "d"):
        assert np.isfinite(t[c]).all(), c
    assert t["d"].iloc[0] == 0.0 and (t["d"].iloc[1:] > 0).all()
    assert not any(c.startswith("acc/") for c in t.columns)  # the evaluation prompts are not Shapes captions
    samples = pd.read_csv(tmp_path / "run" / "study" / "checkpoints" / "step_000002" / "samples.csv")
    assert samples["prompt"].tolist() == [p for p in PROMPTS[:2] for _ in range(2)]
    # the proxy was fitted on the data cache (no Shapes cache built), with the patch of 8x8 latents
    lrm_dir = Path(s["lrm_dir"])
    assert not list((tmp_path / "run" / "shared").glob("cache-*"))
    assert json.loads((lrm_dir / "config.json").read_text())["kwargs"]["patch"] == 2
    space = json.loads((lrm_dir / "metadata.json").read_text())["latent_space"]
    assert (space["downsample"], space["latent_channels"]) == (2, 4)  # the pipeline's VAE, not the Shapes one (/4)


def test_overopt_needs_prompt_sources_outside_the_shapes_world(tiny_sd_dir, sd_cache, prompt_csv, tmp_path):
    with pytest.raises(ConfigError) as e:
        overopt_cfg(tiny_sd_dir, tmp_path / "a")
    msg = str(e.value)
    assert "\n" not in msg and "is not the Shapes world" in msg
    assert "set data_cache" in msg and "eval_prompt_file" in msg
    with pytest.raises(ConfigError, match=r"set prompt_file or data_cache \(the fine-tuning prompts\); and "
                                          r"eval_prompt_file"):
        overopt_cfg(tiny_sd_dir, tmp_path / "b", method="ddpo")
    with pytest.raises(ConfigError, match=r"set eval_prompt_file \(held-out evaluation prompts\)$"):
        overopt_cfg(tiny_sd_dir, tmp_path / "c", data_cache=str(sd_cache))
    with pytest.raises(ConfigError, match="diffusers model but vae is 'shapes'"):
        overopt_cfg(tiny_sd_dir, tmp_path / "d", vae="shapes", data_cache=str(sd_cache),
                    eval_prompt_file=str(prompt_csv))
    # accuracy is for Shapes captions only
    kw = dict(data_cache=str(sd_cache), eval_prompt_file=str(prompt_csv))
    with pytest.raises(ConfigError, match="accuracy: true needs Shapes attribute accuracy.*not Shapes captions"):
        overopt_cfg(tiny_sd_dir, tmp_path / "e", accuracy=True, **kw)
    with pytest.raises(ConfigError, match="stop_on='acc/all' needs Shapes attribute accuracy"):
        overopt_cfg(tiny_sd_dir, tmp_path / "f", stop_on="acc/all", **kw)
    cfg = overopt_cfg(tiny_sd_dir, tmp_path / "g", prompt_file=str(prompt_csv), **kw)
    assert cfg.resolve_accuracy(cfg.eval_prompts()) is False
    ft = cfg.finetune_config(tmp_path / "ft")
    assert ft.prompt_file == str(prompt_csv) and ft.data_cache is None  # prompt_file for fine-tuning, cache for the LRM
    # the Shapes world keeps its defaults
    shapes = OveroptConfig(run_dir=str(tmp_path / "h"))
    assert shapes.shapes_world and shapes.resolve_accuracy(shapes.eval_prompts()) is True


def test_auto_temporal_patch_divides_the_latent_frames(tmp_path):
    """The auto video head's temporal patch: 4 for Shapes' 16 latent frames, lowered until it divides a causal video
    VAE's 1 + k latent frames (a patch that does not divide them is refused by the head, so overopt could not fit)."""
    assert [auto_temporal_patch(t) for t in (16, 8, 2, 6, 21, 33, None)] == [4, 4, 2, 2, 1, 1, 4]
    video = OveroptConfig(run_dir=str(tmp_path), teacher="shapes-video")
    assert video.fit_config((8, 8), 16).head_kwargs["temporal_patch"] == 4
    assert video.fit_config((8, 8), 21).head_kwargs["temporal_patch"] == 1
    assert video.fit_config((8, 8), 2).head_kwargs["temporal_patch"] == 2
    assert OveroptConfig(run_dir=str(tmp_path), teacher="shapes-video", lrm_head_kwargs={"temporal_patch": 3}) \
        .fit_config((8, 8), 21).head_kwargs["temporal_patch"] == 3  # an explicit head kwarg wins
    assert "temporal_patch" not in OveroptConfig(run_dir=str(tmp_path)).fit_config((8, 8)).head_kwargs


def test_auto_patch_and_video_teachers(tmp_path):
    assert [auto_patch(h) for h in (8, 16, 32, 64, 96, 128)] == [2, 2, 2, 4, 8, 8]
    assert auto_patch(60, 104) == 4 and auto_patch(100, 100) == 4 and auto_patch(9, 9) == 1  # divides both sides
    assert OveroptConfig(run_dir=str(tmp_path)).fit_config().head_kwargs["patch"] == 2
    assert OveroptConfig(run_dir=str(tmp_path)).fit_config((64, 64)).head_kwargs["patch"] == 4
    assert OveroptConfig(run_dir=str(tmp_path), lrm_patch=1).fit_config((64, 64)).head_kwargs["patch"] == 1
    # a diffusers video pipeline is recognised from its model config, without loading weights
    for sub, cls in (("unet", "UNet3DConditionModel"), ("transformer", "WanTransformer3DModel")):
        d = tmp_path / cls
        (d / sub).mkdir(parents=True)
        (d / "model_index.json").write_text("{}")
        (d / sub / "config.json").write_text(json.dumps({"_class_name": cls}))
        assert teacher_is_video(SimpleNamespace(teacher=str(d))) is True
    (tmp_path / "img" / "unet").mkdir(parents=True)
    (tmp_path / "img" / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    assert teacher_is_video(SimpleNamespace(teacher=str(tmp_path / "img"))) is False
    assert teacher_is_video(SimpleNamespace(teacher="shapes-video")) is True
    with pytest.raises(ConfigError, match="no model config found"):
        teacher_is_video(SimpleNamespace(teacher=str(tmp_path / "nowhere")))
