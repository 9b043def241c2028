"""distill/inference.py: the one sampling call (``sample`` / ``Denoiser.sample``) and the fast path
(``prepare_for_sampling``), on tiny random UNets on CPU."""

from __future__ import annotations

import pytest
import torch

from distill.inference import prepare_for_sampling, sample, sampler_timesteps
from distill.samplers import ddim_sample, stochastic_sample, student_sample
from tests.tiny_distill import tiny_teacher


def _inputs(B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 4, 8, 8, generator=g), torch.randn(B, 5, 8, generator=g), torch.ones(B, 5, dtype=bool)


def test_timesteps_of_each_sampler():
    den = tiny_teacher()
    assert sampler_timesteps(den, "student") == [999, 749, 499, 249]
    assert sampler_timesteps(den, "student", steps=2) == [999, 499]
    assert sampler_timesteps(den, "student", steps=1) == [999]
    assert sampler_timesteps(den, "ddim", steps=4) == [999, 749, 499, 249]
    assert sampler_timesteps(den, "ddim", timesteps=[10, 500, 3]) == [500, 10, 3]
    assert len(sampler_timesteps(den, "stochastic")) == 50
    with pytest.raises(ValueError, match="pass timesteps"):
        sampler_timesteps(den, "student", steps=3)
    with pytest.raises(ValueError, match="sampler must be one of"):
        sampler_timesteps(den, "euler")


def test_sample_is_the_toolkit_samplers():
    den = tiny_teacher().eval()
    x, tok, mask = _inputs()
    with torch.no_grad():
        ref_ddim = ddim_sample(den, x, tok, mask, num_steps=5, guidance_scale=3.0)
        ref_student = student_sample(den, x, tok, mask, timesteps=[999, 499],
                                     generator=torch.Generator().manual_seed(1))
        ref_sto = stochastic_sample(den, x, tok, mask, sampler_timesteps(den, "stochastic", 5), eta=1.0,
                                    generator=torch.Generator().manual_seed(2), grad_steps=0).x0
    torch.testing.assert_close(den.sample(x, tok, mask, sampler="ddim", steps=5, guidance_scale=3.0), ref_ddim,
                               rtol=0, atol=0)
    torch.testing.assert_close(sample(den, x, tok, mask, steps=2, generator=torch.Generator().manual_seed(1)),
                               ref_student, rtol=0, atol=0)
    torch.testing.assert_close(sample(den, x, tok, mask, sampler="stochastic", steps=5,
                                      generator=torch.Generator().manual_seed(2)), ref_sto, rtol=0, atol=0)
    # another re-noising generator gives another 2-step sample: the generator is used
    other = sample(den, x, tok, mask, steps=2, generator=torch.Generator().manual_seed(9))
    assert (other - ref_student).abs().max() > 1e-3


@pytest.mark.parametrize("fuse", [False, True])
def test_prepare_for_sampling_keeps_the_outputs(fuse):
    den = tiny_teacher()
    x, tok, mask = _inputs(seed=3)
    t = torch.tensor([999, 400])
    with torch.no_grad():
        before = den(x, t, tok, mask)
    applied = prepare_for_sampling(den, compile="none", channels_last=True, fuse_qkv=fuse)
    assert applied["channels_last"] is True and applied["fuse_qkv"] is fuse and applied["compile"] == "none"
    assert "AttnProcessor2_0" in applied["attention"] or "FusedAttnProcessor2_0" in applied["attention"]
    conv = den.model.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert not any(p.requires_grad for p in den.model.parameters()) and not den.model.training
    with torch.no_grad():
        after = den(x, t, tok, mask)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_prepare_for_sampling_refuses_bad_input():
    den = tiny_teacher()
    with pytest.raises(ValueError, match="compile must be one of"):
        prepare_for_sampling(den, compile="fast")
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_q"]), den.model)
    with pytest.raises(ValueError, match="LoRA adapters: merge them first"):
        prepare_for_sampling(den, fuse_qkv=True)


def test_video_unet_is_not_made_channels_last():
    from distill.models import load_shapes_teacher

    den = load_shapes_teacher("video")
    applied = prepare_for_sampling(den, channels_last=True)
    assert applied["channels_last"].startswith("skipped")


def test_eval_prepares_the_denoiser_from_its_config(tiny_sd_dir, tmp_path):
    from eval.cli import EvalConfig, load_denoiser

    cfg = EvalConfig(out_dir=str(tmp_path), generator="denoiser", denoiser=str(tiny_sd_dir), vae=str(tiny_sd_dir),
                     vae_subfolder="vae", text_encoder=str(tiny_sd_dir), text_max_length=77, channels_last=True,
                     fuse_qkv=True, prompts_file=None)
    den = load_denoiser(cfg, cfg.denoiser, "cpu")
    assert den.model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert any("Fused" in type(p).__name__ for p in den.model.attn_processors.values())


def test_prepared_vae_decodes_the_same(tiny_sd_dir):
    from distill.inference import prepare_vae_for_sampling
    from lrm.io import state_dict_sha256
    from lrm.latent_space import VAE

    vae = VAE.from_pretrained(str(tiny_sd_dir), subfolder="vae")
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    before = vae.decode(z)
    sha = state_dict_sha256(vae.vae.state_dict())
    assert prepare_vae_for_sampling(vae, channels_last=True)["channels_last"] is True
    assert vae.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(vae.decode(z), before, rtol=1e-4, atol=1e-5)
    assert state_dict_sha256(vae.vae.state_dict()) == sha  # the memory format is not part of the VAE's identity
    with pytest.raises(ValueError, match="compile must be one of"):
        prepare_vae_for_sampling(vae, compile="turbo")
