"""``distill.export``: a student exported as a diffusers pipeline samples exactly as ``k_step_sample`` does."""

from __future__ import annotations

import json

import pytest
import torch

from distill.cd import consistency_output
from distill.denoiser import Denoiser
from distill.export import export_diffusers
from distill.samplers import k_step_sample
from lrm.config import ConfigError


def _student(tiny_sd_dir, root, parameterization="eps", timesteps=(999, 749, 499, 249), sigma_data=0.5,
             timestep_scaling=10.0):
    """A student folder as ``GeneratorTrainer.export_student`` writes it: the tiny pipeline's UNet, perturbed (so the
    export must ship the student's weights, not the teacher's), + student.json."""
    den = Denoiser.from_diffusers(tiny_sd_dir, parameterization=parameterization)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in den.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    d = root / f"student_{parameterization}"
    den.save_pretrained(d)
    (d / "student.json").write_text(json.dumps({
        "timesteps": list(timesteps), "parameterization": parameterization, "step": 3,
        "consistency_function": {"sigma_data": sigma_data, "timestep_scaling": timestep_scaling}}))
    return den, d


def _ours(den, noise, tokens, timesteps, seed, timestep_scaling=10.0):
    """The trainers' sampler: k_step_sample of the consistency function, no CFG."""
    g = torch.Generator().manual_seed(seed)

    def f(x, t):
        return consistency_output(x, den.x0(x, t, tokens, None).float(), t, 0.5, timestep_scaling)

    with torch.no_grad():
        return k_step_sample(f, noise, timesteps, den.schedule, generator=g).x0


@pytest.mark.parametrize("parameterization,timesteps,scaling", [
    ("eps", (999, 749, 499, 249), 10.0), ("x0", (999, 499), 10.0), ("v", (899, 599, 99), 5.0), ("eps", (999,), 10.0)])
def test_exported_pipeline_samples_equal_ours(tiny_sd_dir, tmp_path, parameterization, timesteps, scaling):
    from diffusers import DiffusionPipeline, LCMScheduler, StableDiffusionPipeline

    den, sdir = _student(tiny_sd_dir, tmp_path, parameterization, timesteps, timestep_scaling=scaling)
    out = export_diffusers(sdir, tiny_sd_dir, tmp_path / "pipe")
    pipe = DiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe, StableDiffusionPipeline) and isinstance(pipe.scheduler, LCMScheduler)
    assert pipe.scheduler.config.timestep_scaling == scaling
    meta = json.loads((out / "lrm_export.json").read_text())
    call = dict(meta["pipeline_call"])
    default = tuple(timesteps) in ((999, 749, 499, 249), (999, 499), (999,))
    assert ("num_inference_steps" in call) == default and call["guidance_scale"] == 1.0

    torch.manual_seed(0)
    B = 2
    noise = torch.randn(B, 4, 8, 8)
    tokens = torch.randn(B, 77, 32)
    ref = _ours(den, noise, tokens, list(timesteps), seed=7, timestep_scaling=scaling)
    got = pipe(prompt_embeds=tokens, latents=noise.clone(), generator=torch.Generator().manual_seed(7),
               output_type="latent", **call).images
    assert got.shape == ref.shape
    diff = (got - ref).abs().max().item()
    assert diff < 1e-4, diff
    assert ref.abs().max() > 0.1  # not a degenerate sample
    # the teacher's UNet (not exported) gives another sample: the test can fail
    teacher = Denoiser.from_diffusers(tiny_sd_dir, parameterization=parameterization)
    assert (_ours(teacher, noise, tokens, list(timesteps), seed=7, timestep_scaling=scaling) - ref).abs().max() > 1e-3
    # another generator seed changes the re-noising draws (k > 1): they are aligned, not ignored
    if len(timesteps) > 1:
        other = pipe(prompt_embeds=tokens, latents=noise.clone(), generator=torch.Generator().manual_seed(8),
                     output_type="latent", **call).images
        assert (other - ref).abs().max() > 1e-3


def test_export_refuses_what_lcm_cannot_reproduce(tiny_sd_dir, tmp_path):
    _, d = _student(tiny_sd_dir, tmp_path, "conjugate_v")
    with pytest.raises(ConfigError, match="conjugate_v.*LCMScheduler"):
        export_diffusers(d, tiny_sd_dir, tmp_path / "a")
    _, d = _student(tiny_sd_dir, tmp_path, "eps", sigma_data=0.25)
    with pytest.raises(ConfigError, match="sigma_data"):
        export_diffusers(d, tiny_sd_dir, tmp_path / "b")
    (tmp_path / "ok").mkdir()
    _, d = _student(tiny_sd_dir, tmp_path / "ok", "eps")
    # a non-SD teacher pipeline is refused with the supported list
    fake = tmp_path / "fake_teacher"
    fake.mkdir()
    (fake / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ConfigError, match="FluxPipeline.*StableDiffusionPipeline"):
        export_diffusers(d, fake, tmp_path / "c")
    with pytest.raises(ConfigError, match="student.json"):
        export_diffusers(tmp_path, tiny_sd_dir, tmp_path / "d")


def test_lrm_export_cli(tiny_sd_dir, tmp_path, capsys):
    from lrm.cli import main

    _, d = _student(tiny_sd_dir, tmp_path)
    out = tmp_path / "pipe"
    assert main(["export", "--student", str(d), "--teacher", str(tiny_sd_dir), "--out", str(out), "--link"]) in (0,
                                                                                                               None)
    assert "num_inference_steps=4" in capsys.readouterr().out
    assert (out / "vae").is_symlink() and not (out / "unet").is_symlink()
    assert json.loads((out / "model_index.json").read_text())["scheduler"] == ["diffusers", "LCMScheduler"]
    # exists -> one-line user error (exit 2) unless --overwrite
    assert main(["export", "--student", str(d), "--teacher", str(tiny_sd_dir), "--out", str(out)]) == 2
    assert main(["export", "--student", str(d), "--teacher", str(tiny_sd_dir), "--out", str(out),
                 "--overwrite"]) in (0, None)
