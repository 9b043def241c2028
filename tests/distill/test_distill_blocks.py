"""Schedules, parameterisation conversions, and the Denoiser wrapper (CFG, masks, video layout, save/load)."""

import math

import pytest
import torch

from distill.denoiser import Denoiser
from distill.parameterization import PARAMETERIZATIONS, convert, target, to_eps, to_x0
from lrm.schedules import DDPMSchedule, FlowSchedule, schedule_from_dict

SCHEDULES = [DDPMSchedule(beta_schedule="scaled_linear"), DDPMSchedule(beta_schedule="linear", beta_start=1e-4,
             beta_end=0.02), DDPMSchedule(beta_schedule="cosine"), FlowSchedule()]


def tiny_unet2d(seed=0, text_dim=24):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=text_dim,
                                attention_head_dim=2, norm_num_groups=8).eval()


def tiny_unet3d(seed=0, text_dim=24):
    from diffusers import UNet3DConditionModel

    torch.manual_seed(seed)
    return UNet3DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                                up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), cross_attention_dim=text_dim,
                                attention_head_dim=2, norm_num_groups=8).eval()


def text(B=2, L=6, D=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    tok = torch.randn(B, L, D, generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[:, 4:] = False
    return tok, mask


# ---- schedules ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,ours", [("scaled_linear", "scaled_linear"), ("linear", "linear"),
                                       ("squaredcos_cap_v2", "cosine")])
def test_ddpm_schedule_matches_diffusers(name, ours):
    from diffusers import DDIMScheduler

    sch = DDIMScheduler(beta_schedule=name, beta_start=0.00085, beta_end=0.012)
    s = DDPMSchedule.from_diffusers(sch)
    assert s.beta_schedule == ours
    assert torch.allclose(s.alphas_cumprod.float(), sch.alphas_cumprod, atol=0, rtol=0)
    t = torch.tensor([0, 10, 500, 999])
    assert torch.allclose(s.a(t), sch.alphas_cumprod[t].sqrt(), atol=1e-7)
    assert torch.allclose(s.b(t), (1 - sch.alphas_cumprod[t]).sqrt(), atol=1e-7)
    assert torch.allclose(s.a(t) ** 2 + s.b(t) ** 2, torch.ones(4), atol=1e-6)
    assert float(s.a(-1)) == 1.0 and float(s.b(-1)) == 0.0
    assert repr(schedule_from_dict(s.to_dict())) == repr(s)


def test_add_noise_broadcasts_and_flow_is_linear():
    s, f = DDPMSchedule(), FlowSchedule()
    x0, eps = torch.randn(3, 16, 4, 8, 8), torch.randn(3, 16, 4, 8, 8)  # video latents
    t = torch.tensor([0, 400, 999])
    xt = s.add_noise(x0, eps, t)
    for i in range(3):
        ab = s.alphas_cumprod[t[i]].float()
        assert torch.allclose(xt[i], ab.sqrt() * x0[i] + (1 - ab).sqrt() * eps[i], atol=1e-6)
    xf = f.add_noise(x0, eps, t)
    assert torch.allclose(xf[1], 0.6 * x0[1] + 0.4 * eps[1], atol=1e-6)
    with pytest.raises(ValueError, match="timesteps must lie"):
        s.a(torch.tensor([1000]))
    with pytest.raises(ValueError, match="beta_schedule"):
        DDPMSchedule(beta_schedule="sigmoid")


# ---- parameterisations ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("sched", SCHEDULES, ids=lambda s: repr(s)[:30])
@pytest.mark.parametrize("kind", PARAMETERIZATIONS)
def test_target_makes_to_x0_and_to_eps_exact(sched, kind):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(4, 4, 8, 8, generator=g,
                                                                                       dtype=torch.float64)
    t = torch.tensor([1, 250, 700, 998])
    xt = sched.add_noise(x0, eps, t)
    out = target(x0, eps, t, sched, kind)
    assert torch.allclose(to_x0(out, xt, t, sched, kind), x0, atol=1e-9)
    assert torch.allclose(to_eps(out, xt, t, sched, kind), eps, atol=1e-9)


@pytest.mark.parametrize("sched", SCHEDULES, ids=lambda s: repr(s)[:30])
def test_convert_round_trips_between_all_kinds(sched):
    g = torch.Generator().manual_seed(1)
    xt = torch.randn(3, 2, 4, 4, 4, generator=g, dtype=torch.float64)  # video-shaped
    t = torch.tensor([5, 480, 990])
    for src in PARAMETERIZATIONS:
        out = torch.randn(xt.shape, generator=g, dtype=torch.float64)
        for dst in PARAMETERIZATIONS:
            o2 = convert(out, xt, t, sched, src, dst)
            # same (x0, eps) after conversion ...
            assert torch.allclose(to_x0(o2, xt, t, sched, dst), to_x0(out, xt, t, sched, src), atol=1e-9)
            # ... and back to the original output
            assert torch.allclose(convert(o2, xt, t, sched, dst, src), out, atol=1e-8), (src, dst)


def test_conjugate_v_matches_dollar_equations():
    s = DDPMSchedule()
    x0, eps = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, 4, 8, 8, dtype=torch.float64)
    t = torch.tensor([300, 900])
    a, b = s.a(t).double().view(-1, 1, 1, 1), s.b(t).double().view(-1, 1, 1, 1)
    xt = a * x0 + b * eps
    v = target(x0, eps, t, s, "conjugate_v")
    assert torch.allclose(v, x0 - eps)  # Eq. 13
    assert torch.allclose(to_x0(v, xt, t, s, "conjugate_v"), (xt + b * v) / (a + b))  # Eq. 15
    gamma = a / (a + b)  # Eq. 20-21: the RF conjugate point
    assert torch.allclose(xt / (a + b), gamma * x0 + (1 - gamma) * eps)
    # diffusers' v (Eq. 3) and DDPM's x0 = a x_t - b v
    vv = target(x0, eps, t, s, "v")
    assert torch.allclose(vv, a * eps - b * x0)
    assert torch.allclose(a * xt - b * vv, x0, atol=1e-6)
    with pytest.raises(ValueError, match="unknown parameterization"):
        target(x0, eps, t, s, "score")


# ---- Denoiser -----------------------------------------------------------------------------------------------
def test_cfg_imagen_form_and_limits():
    d = Denoiser(tiny_unet2d(), DDPMSchedule(), "conjugate_v")
    tok, mask = text()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([700, 200])
    with torch.no_grad():
        cond_x0, cond_eps = d.x0_eps(x, t, tok, mask)
        ntok, nmask = d.null_text(2, tok.shape[1])
        unc_x0, unc_eps = d.x0_eps(x, t, ntok, nmask)
        assert not torch.allclose(cond_x0, unc_x0, atol=1e-4)
        assert torch.allclose(d.x0(x, t, tok, mask, guidance_scale=1.0), cond_x0, atol=1e-5)
        assert torch.allclose(d.x0(x, t, tok, mask, guidance_scale=0.0), unc_x0, atol=1e-5)
        for s in (3.5, 7.5):
            x0s, epss = d.x0_eps(x, t, tok, mask, guidance_scale=s)
            assert torch.allclose(x0s, unc_x0 + s * (cond_x0 - unc_x0), atol=1e-4)  # same on x0 ...
            assert torch.allclose(epss, unc_eps + s * (cond_eps - unc_eps), atol=1e-4)  # ... and on eps
    # the null caption: one zero token padded with masked zeros
    assert ntok.shape == (2, 6, 24) and nmask[:, 0].all() and not nmask[:, 1:].any() and ntok.abs().sum() == 0


def test_text_mask_hides_padding_tokens_2d_and_3d():
    tok, mask = text()
    tok2 = tok.clone()
    tok2[:, 4:] += 5.0  # change only padded tokens
    x = torch.randn(2, 4, 8, 8)
    d = Denoiser(tiny_unet2d(), DDPMSchedule(), "eps")
    dv = Denoiser(tiny_unet3d(), DDPMSchedule(), "eps")
    xv = torch.randn(2, 3, 4, 8, 8)
    with torch.no_grad():
        assert torch.allclose(d(x, 500, tok, mask), d(x, 500, tok2, mask), atol=1e-5)
        assert not torch.allclose(d(x, 500, tok, None), d(x, 500, tok2, None), atol=1e-3)
        assert torch.allclose(dv(xv, 500, tok, mask), dv(xv, 500, tok2, mask), atol=1e-5)


def test_video_layout_through_unet3d():
    unet = tiny_unet3d()
    d = Denoiser(unet, DDPMSchedule(), "conjugate_v")
    assert d.is_video
    tok, mask = text()
    x = torch.randn(2, 5, 4, 8, 8)  # (B, T, C, h, w)
    with torch.no_grad():
        out = d(x, torch.tensor([10, 900]), tok, mask)
        ref = unet(x.permute(0, 2, 1, 3, 4), torch.tensor([10, 900]),
                   encoder_hidden_states=tok * mask.unsqueeze(-1)).sample.permute(0, 2, 1, 3, 4)
        assert out.shape == x.shape
        assert torch.allclose(out, ref, atol=1e-6)
        # frames interact (temporal layers): changing frame 0 changes frame 4's output
        x2 = x.clone()
        x2[:, 0] += 1
        assert not torch.allclose(d(x2, 500, tok, mask)[:, 4], d(x, 500, tok, mask)[:, 4], atol=1e-5)
        x0 = d.x0(x, 500, tok, mask, guidance_scale=3.5)
        assert x0.shape == x.shape and torch.isfinite(x0).all()
    with pytest.raises(ValueError, match=r"\(B, T, C, h, w\)"):
        d(torch.randn(2, 4, 8, 8), 500, tok, mask)


def test_flow_transformer_denoiser():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    tr = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                               attention_head_dim=8, num_attention_heads=2, joint_attention_dim=24,
                               caption_projection_dim=16, pooled_projection_dim=24, pos_embed_max_size=8)
    d = Denoiser(tr, FlowSchedule(), "flow")
    tok, mask = text()
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        out = d(x, torch.tensor([250.0, 750.0]), tok, mask)
        x0 = d.x0(x, torch.tensor([250.0, 750.0]), tok, mask, guidance_scale=2.0)
    assert out.shape == x.shape and torch.isfinite(x0).all()
    s = torch.tensor([0.25, 0.75]).view(-1, 1, 1, 1)
    assert torch.allclose(d.x0(x, torch.tensor([250.0, 750.0]), tok, mask).detach(), x - s * out, atol=1e-5)


def test_denoiser_save_load_round_trip(tmp_path):
    null = (torch.randn(1, 3, 24), torch.tensor([[True, True, False]]))
    d = Denoiser(tiny_unet2d(), DDPMSchedule(beta_schedule="linear", beta_start=1e-4, beta_end=0.02), "conjugate_v",
                 cfg_null=null)
    d.save_pretrained(tmp_path / "den")
    d2 = Denoiser.from_pretrained(tmp_path / "den")
    assert d2.parameterization == "conjugate_v" and d2.schedule.beta_schedule == "linear"
    assert torch.equal(d2.null_tokens, null[0]) and torch.equal(d2.null_mask, null[1])
    tok, mask = text()
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert torch.allclose(d.x0(x, 300, tok, mask, 3.5), d2.x0(x, 300, tok, mask, 3.5), atol=1e-6)
    with pytest.raises(FileNotFoundError, match="denoiser.json"):
        Denoiser.from_pretrained(tmp_path)
    assert math.isfinite(float(d2.schedule.a(999)))
