"""The fast sampling path on a GPU (run on the device: `pytest -m gpu`): CUDA graphs through torch.compile
(reduce-overhead), channels_last and fused QKV keep a bf16 UNet's 2-step student samples and a compiled bf16 VAE
decode equal to the eager ones within bf16 tolerance (relative L2 error)."""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = pytest.mark.gpu


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_compiled_sampling_equals_eager_within_bf16_tolerance(tiny_sd_dir):
    from distill.denoiser import Denoiser
    from distill.inference import prepare_vae_for_sampling
    from lrm.latent_space import VAE

    dev = torch.device("cuda")
    eager = Denoiser.from_diffusers(tiny_sd_dir, device=dev, dtype=torch.bfloat16).eval()
    fast = Denoiser(copy.deepcopy(eager.model), eager.schedule, eager.parameterization,
                    cfg_null=(eager.null_tokens, eager.null_mask), use_text_mask=eager.use_text_mask)
    applied = fast.prepare_for_sampling("reduce-overhead", channels_last=True, fuse_qkv=True)
    assert applied["channels_last"] is True and applied["fuse_qkv"] is True
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(4, 4, 8, 8, generator=g).to(dev)
    tok = torch.randn(4, 77, 32, generator=g).to(dev)
    ref = eager.sample(x, tok, None, sampler="student", steps=2, generator=torch.Generator(dev).manual_seed(1))
    for _ in range(3):  # compile, record the CUDA graph, replay
        got = fast.sample(x, tok, None, sampler="student", steps=2, generator=torch.Generator(dev).manual_seed(1))
    assert torch.isfinite(got).all() and _rel(got, ref) < 2e-2
    vae = VAE.from_pretrained(str(tiny_sd_dir), subfolder="vae", device=dev, autocast_bf16=True)
    pixels = vae.decode(ref)
    prepare_vae_for_sampling(vae, compile="default", channels_last=True)
    assert _rel(vae.decode(ref), pixels) < 2e-2
