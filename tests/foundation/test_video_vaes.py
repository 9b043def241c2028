"""Video VAEs (issue 19): Wan, CogVideoX, HunyuanVideo whole-clip encode/decode with 1 + 4k frames, Wan's
per-channel normalisation, FLUX's shift + scale, tiling/slicing switches."""

from __future__ import annotations

import pytest
import torch

from lrm.latent_space import VAE, LatentSpace

diffusers = pytest.importorskip("diffusers")


def tiny_wan():
    torch.manual_seed(0)
    return diffusers.AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                      temperal_downsample=[False, True, True],
                                      latents_mean=[0.5, -0.25, 0.1, 0.0], latents_std=[2.0, 0.5, 1.0, 4.0])


def tiny_cogvideox():
    torch.manual_seed(0)
    return diffusers.AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=2, temporal_compression_ratio=4,
        down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4)


def tiny_hunyuan():
    torch.manual_seed(0)
    return diffusers.AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=4, spatial_compression_ratio=8, temporal_compression_ratio=4)


VIDEO = {"wan": tiny_wan, "cogvideox": tiny_cogvideox, "hunyuan_video": tiny_hunyuan}


@pytest.mark.parametrize("name", sorted(VIDEO))
def test_video_vae_round_trip_shapes_and_frame_rule(name, tmp_path):
    VIDEO[name]().save_pretrained(tmp_path / "vae")
    vae = VAE.from_pretrained(str(tmp_path), subfolder="vae")
    assert vae.is_video and vae.kind == type(vae.vae).__name__
    space = vae.latent_space
    assert space.temporal_downsample == 4 and space.downsample == 8 and space.latent_channels == 4
    torch.manual_seed(0)
    lengths = ((9, 3), (17, 5)) if name == "cogvideox" else ((5, 2), (9, 3))
    with torch.no_grad():
        for T, T2 in lengths:
            x = torch.rand(2, T, 3, 16, 16)
            z = vae.encode(x)
            assert z.shape == (2, T2, 4, 2, 2) == (2,) + space.latent_shape(16, 16, T)
            y = vae.decode(z)
            assert y.shape == (2, T, 3, 16, 16) and torch.isfinite(y).all()
        assert vae.encode(torch.rand(1, 3, 16, 16)).shape == (1, 4, 2, 2)  # an image is a 1-frame clip
    rule = (r"6 frames.*1 \+ 8k.*nearest valid: 1, 9" if name == "cogvideox"
            else r"6 frames.*1 \+ 4k.*nearest valid: 5, 9")
    with pytest.raises(ValueError, match=rule):
        vae.encode(torch.rand(1, 6, 3, 16, 16))
    if name == "cogvideox":  # 5 frames -> 2 latent frames, which its decoder turns into 8: refused too
        with pytest.raises(ValueError, match="nearest valid: 1, 9"):
            space.latent_shape(16, 16, 5)
    with pytest.raises(ValueError, match="nearest valid: 16x16"):
        space.latent_shape(18, 16, 5)
    assert LatentSpace.from_dict(space.to_dict()) == space


def test_video_vae_is_one_call_per_clip_not_per_frame():
    vae = VAE(tiny_cogvideox(), "tiny-cog")
    calls = []
    orig = vae.vae.encode
    vae.vae.encode = lambda x, *a, **k: (calls.append(tuple(x.shape)), orig(x, *a, **k))[1]
    with torch.no_grad():
        vae.encode(torch.rand(2, 9, 3, 16, 16))
    assert calls == [(2, 3, 9, 16, 16)]  # (B, 3, T, H, W): whole clips, batch in one call


def test_wan_per_channel_normalisation_applied_and_inverted():
    raw_vae = tiny_wan()
    vae = VAE(raw_vae, "tiny-wan")
    assert vae.latents_mean == (0.5, -0.25, 0.1, 0.0) and vae.scaling_factor == 1.0
    assert vae.latent_space.latents_std == (2.0, 0.5, 1.0, 4.0)
    torch.manual_seed(0)
    x = torch.rand(1, 5, 3, 16, 16)
    with torch.no_grad():
        raw = raw_vae.encode(x.permute(0, 2, 1, 3, 4) * 2 - 1).latent_dist.mode()  # (1, C, T', h, w)
        mean = torch.tensor([0.5, -0.25, 0.1, 0.0]).view(1, 4, 1, 1, 1)
        std = torch.tensor([2.0, 0.5, 1.0, 4.0]).view(1, 4, 1, 1, 1)
        z = vae.encode(x)
        assert torch.allclose(z, ((raw - mean) / std).permute(0, 2, 1, 3, 4), atol=1e-5)
        # decode inverts it: what WanPipeline feeds its VAE is z * std + mean
        ref = raw_vae.decode(z.permute(0, 2, 1, 3, 4) * std + mean).sample
        assert torch.allclose(vae.decode(z, clamp=False), ((ref + 1) / 2).permute(0, 2, 1, 3, 4), atol=1e-5)
    other = VAE(tiny_wan(), "tiny-wan")
    assert other.latent_space == vae.latent_space  # same weights, same stats


def test_flux_vae_shift_and_scale():
    torch.manual_seed(0)
    ae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                 norm_num_groups=4, scaling_factor=0.3611, shift_factor=0.1159)
    vae = VAE(ae, "tiny-flux-vae")
    assert (vae.scaling_factor, vae.shift_factor, vae.is_video) == (0.3611, 0.1159, False)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        raw = ae.encode(x * 2 - 1).latent_dist.mean
        z = vae.encode(x)
        assert torch.allclose(z, (raw - 0.1159) * 0.3611, atol=1e-6)
        ref = (ae.decode(z / 0.3611 + 0.1159).sample + 1) / 2  # FluxPipeline's decode
        assert torch.allclose(vae.decode(z, clamp=False), ref, atol=1e-6)
        assert vae.encode(torch.rand(1, 3, 3, 16, 16)).shape == (1, 3, 4, 8, 8)  # frame by frame: T kept


def test_tiling_and_slicing_switches():
    vae = VAE(tiny_hunyuan(), "tiny-hy", tiling=True, slicing=True)
    assert vae.vae.use_tiling and vae.vae.use_slicing and vae.tiling and vae.slicing
    assert not VAE(tiny_hunyuan(), "tiny-hy").vae.use_tiling


def test_reward_decode_of_a_video_vae_is_whole_clips_then_frames():
    """distill.direct on a causal video VAE: checkpointed decode = plain decode (clips, not frames), and the scored
    frames are picked from the decoded clip (frame 0, the middle and the last of 1 + 4k frames)."""
    from distill.direct import decode_for_reward, direct_reward_loss

    vae = VAE(tiny_wan(), "tiny-wan")
    z = torch.randn(2, 3, 4, 4, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)  # 9 frames
    with torch.no_grad():
        full = decode_for_reward(vae, z)
        torch.testing.assert_close(decode_for_reward(vae, z, checkpointing=True), full)
    assert full.shape == (2, 9, 3, 32, 32)
    seen = []

    def reward(pixels, prompts):
        seen.append(pixels.detach())
        return pixels.mean(dim=(1, 2, 3, 4))

    loss, r = direct_reward_loss(z, vae, reward, None, frames="first-middle-last", checkpointing=True)
    torch.testing.assert_close(seen[0], full[:, [0, 4, 8]])
    loss.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0 and torch.isfinite(z.grad).all()
