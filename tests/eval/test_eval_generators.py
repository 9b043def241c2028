"""DenoiserGenerator over a tiny random distill Denoiser: samplers, NFE, and the exact chain KL."""

import pytest
import torch

from eval.evaluate import evaluate
from eval.generators import DenoiserGenerator


def tiny_denoiser(seed=0):
    from diffusers import UNet2DConditionModel

    from distill.denoiser import Denoiser
    from lrm.schedules import DDPMSchedule

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                attention_head_dim=2, norm_num_groups=8).eval()
    return Denoiser(unet, DDPMSchedule(), "conjugate_v")


def text8(prompts):
    return torch.stack([torch.full((3, 8), len(p) / 40) for p in prompts]), torch.ones(len(prompts), 3, dtype=bool)


def test_samplers_nfe_and_reproducibility():
    d = tiny_denoiser()
    noise = torch.randn(2, 4, 8, 8)
    tok, mask = text8(["a", "bb"])
    ddim = DenoiserGenerator(d, "ddim", steps=3, guidance_scale=3.0)
    assert ddim.nfe == 6 and ddim.timesteps == sorted(ddim.timesteps, reverse=True)
    assert torch.equal(ddim(noise, tok, mask), ddim(noise, tok, mask))
    st = DenoiserGenerator(d, "student")
    assert st.timesteps == [999, 749, 499, 249] and st.nfe == 4
    a, b = st(noise, tok, mask, seeds=[1, 2]), st(noise, tok, mask, seeds=[1, 2])
    assert torch.equal(a, b) and not torch.equal(a, st(noise, tok, mask, seeds=[3, 4]))
    with pytest.raises(ValueError, match="sampler"):
        DenoiserGenerator(d, "euler")
    with pytest.raises(ValueError, match="stochastic"):
        DenoiserGenerator(d, "ddim", reference=d)


def test_stochastic_chain_kl_zero_for_itself_positive_for_another():
    d, other = tiny_denoiser(0), tiny_denoiser(1)
    noise = torch.randn(3, 4, 8, 8)
    tok, mask = text8(["a", "bb", "ccc"])
    same = DenoiserGenerator(d, "stochastic", steps=4, reference=d)(noise, tok, mask, seeds=[0, 1, 2])
    assert same["nfe"] == 4 and torch.equal(same["kl"], torch.zeros(3, dtype=torch.float64))
    diff = DenoiserGenerator(d, "stochastic", steps=4, reference=other)(noise, tok, mask, seeds=[0, 1, 2])
    assert (diff["kl"] > 0).all() and torch.isfinite(diff["kl"]).all()
    # evaluate() picks the chain KL up: d = sqrt(mean KL)
    res = evaluate(DenoiserGenerator(d, "stochastic", steps=4, reference=other), ["a red circle", "a blue square"],
                   n_per_prompt=2, decode=lambda z: torch.sigmoid(z[:, :3]), text_encoder=text8, n_bootstrap=10,
                   progress=False)
    assert (res.samples["kl"] > 0).all() and (res.samples["nfe"] == 4).all()
    assert res.metric("d") == pytest.approx(float(res.samples["kl"].mean()) ** 0.5)
