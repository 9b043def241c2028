"""bench/device/make_sd15_pipeline.py --tiny: the random-weight SD-1.5-shaped pipeline loads with diffusers and with
the toolkit's own loaders, and its offline CLIP tokenizer gives open_clip's token ids."""

import json

import pytest
import torch

from bench.device.make_sd15_pipeline import build, clip_vocab_and_merges, default_bpe_path

SENTENCES = [
    "a photo of an astronaut riding a horse on mars",
    "A RED cube, left of 3 blue spheres!!",
    "don't panic: 42 cats & dogs' cafe, 1024x768 pixels",
]


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sd15_tiny")
    counts = build(out, tiny=True, device="cpu", verbose=False)
    assert counts["unet"] > 0 and counts["vae"] > 0 and counts["text_encoder"] > 0
    return out


def test_layout_and_configs(pipe_dir):
    index = json.loads((pipe_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] in (None, [None, None]) and index["feature_extractor"] in (None, [None, None])
    for sub in ("unet", "vae"):
        assert (pipe_dir / sub / "diffusion_pytorch_model.safetensors").is_file()
    assert (pipe_dir / "text_encoder" / "model.safetensors").is_file()
    sched = json.loads((pipe_dir / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "DDPMScheduler"
    assert (sched["num_train_timesteps"], sched["beta_schedule"], sched["beta_start"], sched["beta_end"]) == \
        (1000, "scaled_linear", 0.00085, 0.012)
    assert (sched["prediction_type"], sched["steps_offset"], sched["clip_sample"], sched["set_alpha_to_one"]) == \
        ("epsilon", 1, False, False)
    te = json.loads((pipe_dir / "text_encoder" / "config.json").read_text())
    assert (te["vocab_size"], te["max_position_embeddings"], te["hidden_act"]) == (49408, 77, "quick_gelu")
    assert (te["bos_token_id"], te["eos_token_id"]) == (49406, 49407)
    assert json.loads((pipe_dir / "vae" / "config.json").read_text())["scaling_factor"] == 0.18215


def test_diffusers_loads_it(pipe_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(pipe_dir))
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    ids = pipe.tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids.shape == (1, 77)
    assert pipe.text_encoder(ids).last_hidden_state.shape == (1, 77, pipe.text_encoder.config.hidden_size)


def test_toolkit_loaders(pipe_dir):
    from distill.denoiser import Denoiser
    from lrm.latent_space import VAE
    from lrm.text import TextEncoder

    text = TextEncoder(str(pipe_dir), max_length=77)
    emb = text(["a red circle", "two blue squares"])
    assert emb.tokens.shape == (2, 77, 32) and emb.pooled.shape == (2, 32)

    vae = VAE.from_pretrained(str(pipe_dir), subfolder="vae")
    lat = vae.encode(torch.rand(2, 3, 32, 32))
    assert lat.shape == (2, 4, 32 // vae.downsample, 32 // vae.downsample)
    assert vae.decode(lat).shape == (2, 3, 32, 32)

    den = Denoiser.from_diffusers(str(pipe_dir), subfolder="unet", text_encoder=text)
    out = den(lat, torch.tensor([10, 500]), emb.tokens, emb.mask)
    assert out.shape == lat.shape and torch.isfinite(out).all()


def test_tokenizer_matches_open_clip(pipe_dir):
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import AutoTokenizer

    vocab, merges = clip_vocab_and_merges(default_bpe_path())
    assert len(vocab) == 49408 and vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407

    ref = SimpleTokenizer()
    tok = AutoTokenizer.from_pretrained(str(pipe_dir / "tokenizer"))
    assert len(tok) == 49408
    for s in SENTENCES:
        assert tok(s).input_ids == [49406] + ref.encode(s) + [49407], s


def test_seeded_build_is_deterministic(pipe_dir, tmp_path):
    build(tmp_path, tiny=True, device="cpu", verbose=False)
    for f in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
              "text_encoder/model.safetensors"):
        assert (tmp_path / f).read_bytes() == (pipe_dir / f).read_bytes(), f
