"""LoRA students (distill/lora.py): one frozen base, adapters for student / fake score / CD EMA target, teacher and
reference = the base with adapters off; adapter-only checkpoints with an exact resume; diffusers-format export."""

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from distill.finetune import FinetuneConfig, FinetuneTrainer
from distill.trainer import DistillConfig, DistillTrainer
from lrm.config import ConfigError, load_config
from tests.distill.test_finetune_trainer import _cfg as ft_cfg
from tests.distill.test_finetune_trainer import pool, tiny_denoiser
from tests.tiny_distill import tiny_data, tiny_teacher

LORA = dict(lora_rank=4)


def mean_lrm(latents, tokens, mask):
    return latents.mean(dim=(1, 2, 3))


def dcfg(run_dir, **kw):
    base = dict(run_dir=str(run_dir), device="cpu", steps=2, batch_size=2, fake_updates=1, cd_teacher_steps=1,
                ckpt_every=0, sample_every=0, progress=False, tensorboard=False, lr_student=1e-3, lr_fake=1e-3,
                use_lrm_ft=True, **LORA)
    base.update(kw)
    return DistillConfig(**base)


def snap(named):
    return {k: p.detach().clone() for k, p in named}


def probe(seed=3, text=8, n=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 8, 8, generator=g), torch.full((n,), 500), torch.randn(n, 5, text, generator=g)


def out(den, x, t, tok):
    with torch.no_grad():
        return den(x, t, tok)


def ckpt_keys(run_dir):
    with safe_open(str(run_dir / "checkpoint" / "state.safetensors"), "pt") as f:
        return list(f.keys())


def ckpt_bytes(run_dir):
    return (run_dir / "checkpoint" / "state.safetensors").stat().st_size


def test_config_keys_are_checked():
    with pytest.raises(ConfigError, match="lora_rank"):
        DistillConfig(lora_rank=-1)
    with pytest.raises(ConfigError, match="lora_dropout"):
        DistillConfig(lora_rank=4, lora_dropout=1.0)
    with pytest.raises(ConfigError, match="lora_target_modules"):
        DistillConfig(lora_rank=4, lora_target_modules=[])
    with pytest.raises(ConfigError, match="merge_lora"):
        FinetuneConfig(merge_lora=True)
    assert DistillConfig().lora_target_modules == ["to_q", "to_k", "to_v", "to_out.0"]
    shipped = load_config(DistillConfig, Path(__file__).resolve().parents[2] / "configs" / "sd15_distill_lora.yaml")
    assert shipped.lora_rank == 64 and shipped.gradient_checkpointing


def test_gradient_checkpointing_recomputes_with_the_forwards_adapter():
    """The student's backward runs after the fake score's and the teacher's calls: a checkpointed block must be
    recomputed with the student adapter, giving the gradient of the run without checkpointing."""
    from distill.lora import LoraBase, role

    x, t, tok = probe()
    grads = []
    for ckpt in (False, True):
        teacher = tiny_teacher()
        lora = LoraBase(teacher.model, 4, 4, dropout=0.1)
        student, fake = role(teacher, lora.add("student")), role(teacher, lora.add("fake"))
        with torch.no_grad():
            for name in ("student", "fake"):
                for _, p in lora.named(name):
                    p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
        if ckpt:
            student.model.enable_gradient_checkpointing()
            assert lora.model.is_gradient_checkpointing
        student.train()
        torch.manual_seed(0)
        loss = student(x, t, tok).square().mean()
        with torch.no_grad():  # other roles between forward and backward
            fake.eval()(x, t, tok)
            role(teacher, lora.view(None)).eval()(x, t, tok)
        loss.backward()
        grads.append({k: p.grad.clone() for k, p in lora.named("student")})
        assert all(p.grad is None for _, p in lora.named("fake"))
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-7)


def test_distill_vsd_cd_trains_only_adapters_teacher_is_the_base(tmp_path):
    tr = DistillTrainer(dcfg(tmp_path / "run"), tiny_teacher(), tiny_data(), lrm=mean_lrm)
    lora = tr.lora
    assert set(lora.adapters) == {"student", "fake", "ema"}
    base0 = snap(lora.named(None))
    s0, f0 = snap(lora.named("student")), snap(lora.named("fake"))
    # optimizers hold the adapters only
    ids = {id(p) for g in tr.opt_g.param_groups for p in g["params"]}
    assert ids == {id(p) for _, p in lora.named("student")}
    assert {id(p) for g in tr.opt_f.param_groups for p in g["params"]} == {id(p) for _, p in lora.named("fake")}
    e0 = snap(lora.named("ema"))
    assert all(torch.equal(e0[k], s0[k]) for k in s0)  # the EMA adapter starts as a copy of the student's
    tr.train(1)
    s_1, e_1 = snap(lora.named("student")), snap(lora.named("ema"))
    assert all(torch.equal(e_1[k], torch.lerp(e0[k], s_1[k], 0.05)) for k in e0)  # theta^- <- EMA_0.95(theta)
    hist = tr.train(2)
    assert len(hist) == 2 and {"loss_vsd", "loss_cd", "loss_fake"} <= set(hist[0])
    base1 = snap(lora.named(None))
    assert base0.keys() == base1.keys() and all(torch.equal(base0[k], base1[k]) for k in base0)
    s1, f1, e1 = snap(lora.named("student")), snap(lora.named("fake")), snap(lora.named("ema"))
    assert any(not torch.equal(s0[k], s1[k]) for k in s0) and any(not torch.equal(f0[k], f1[k]) for k in f0)
    # the EMA adapter: 0.95 * (copy of the initial student) + 0.05 * student, per step
    assert any(not torch.equal(s0[k], e1[k]) for k in s0) and any(not torch.equal(s1[k], e1[k]) for k in s1)
    # the teacher (adapters off) is exactly the untouched base network
    x, t, tok = probe()
    ref = out(tiny_teacher(), x, t, tok)
    assert torch.equal(out(tr.teacher, x, t, tok), ref)
    assert not torch.equal(out(tr.student, x, t, tok), ref)
    assert not torch.equal(out(tr.fake, x, t, tok), ref)
    # the bare base network (outside any role's call) is the teacher too
    assert torch.equal(out(tiny_teacher().__class__(tr.lora.model, tr.teacher.schedule, tr.teacher.parameterization),
                           x, t, tok), ref)
    keys = [k for k in ckpt_keys(tmp_path / "run") if k.startswith("module.")]
    assert keys and all("lora_" in k for k in keys if not k.startswith("module.lrm")), keys[:3]


def test_distill_resume_is_exact_and_checkpoint_is_small(tmp_path):
    kw = dict(ckpt_every=2, grad_accum=2)
    full_tr = DistillTrainer(dcfg(tmp_path / "a", steps=4, **kw), tiny_teacher(), tiny_data(), lrm=mean_lrm)
    full = full_tr.train()
    DistillTrainer(dcfg(tmp_path / "b", steps=2, **kw), tiny_teacher(), tiny_data(), lrm=mean_lrm).train()
    res_tr = DistillTrainer(dcfg(tmp_path / "b", steps=4, **kw), tiny_teacher(), tiny_data(), lrm=mean_lrm)
    resumed = res_tr.train()
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(full[2:], resumed, strict=True):
        for k in ("loss", "loss_vsd", "loss_cd", "loss_fake"):
            assert a[k] == b[k], (k, a[k], b[k])
    for name in ("student", "fake", "ema"):
        a, b = snap(full_tr.lora.named(name)), snap(res_tr.lora.named(name))
        assert all(torch.equal(a[k], b[k]) for k in a)
    # the same run with full fine-tuning: its checkpoint holds three networks + two AdamW states
    DistillTrainer(dcfg(tmp_path / "full", steps=1, lora_rank=0), tiny_teacher(), tiny_data(), lrm=mean_lrm).train()
    DistillTrainer(dcfg(tmp_path / "lora1", steps=1), tiny_teacher(), tiny_data(), lrm=mean_lrm).train()
    ratio = ckpt_bytes(tmp_path / "full") / ckpt_bytes(tmp_path / "lora1")
    print(f"checkpoint size full / LoRA rank 4: {ratio:.1f}x")
    assert ratio > 10


@pytest.fixture(scope="module")
def vae():
    from lrm.latent_space import VAE

    return VAE.shapes()


@pytest.mark.parametrize("method", ["lrm", "ddpo"])
def test_finetune_trains_only_adapters_reference_is_the_init(tmp_path, vae, method):
    from reward_adapters import create_reward

    init = tiny_denoiser()
    init0 = snap(init.model.named_parameters())
    lrm = (lambda z, tok, mask: z.flatten(1).mean(1)) if method == "lrm" else None
    kw = dict(distill_losses=["vsd", "cd"], fake_updates=1) if method == "ddpo" else {}
    tr = FinetuneTrainer(ft_cfg(tmp_path, method, beta_kl=0.1, eval_every=0, **LORA, **kw), init, pool(),
                         create_reward("brightness"), vae, lrm=lrm)
    assert set(tr.lora.adapters) == ({"student", "fake", "ema"} if method == "ddpo" else {"student"})
    base0, s0 = snap(tr.lora.named(None)), snap(tr.lora.named("student"))
    assert {id(p) for g in tr.opt.param_groups for p in g["params"]} == {id(p) for _, p in tr.lora.named("student")}
    tr.train()
    tr.close()
    base1, s1 = snap(tr.lora.named(None)), snap(tr.lora.named("student"))
    assert all(torch.equal(base0[k], base1[k]) for k in base0)
    assert any(not torch.equal(s0[k], s1[k]) for k in s0)
    assert all(torch.equal(init0[k], p) for k, p in init.model.named_parameters())  # the init is not modified
    x, t, tok = probe(text=24)
    ref = out(init, x, t, tok)
    assert torch.equal(out(tr.ref, x, t, tok), ref)  # pi_ref = the base with the student adapter off
    assert not torch.equal(out(tr.student, x, t, tok), ref)
    if method == "ddpo":
        assert torch.equal(out(tr.teacher, x, t, tok), ref)
    keys = [k for k in ckpt_keys(tmp_path / method) if k.startswith("module.")]
    assert keys and all("lora_" in k for k in keys)


def test_finetune_ddpo_resume_is_exact(tmp_path, vae):
    from reward_adapters import create_reward

    def make(run, steps):
        cfg = ft_cfg(tmp_path, "ddpo", run_dir=str(tmp_path / run), steps=steps, eval_every=0, beta_kl=0.1,
                     ckpt_every=1, **LORA)
        return FinetuneTrainer(cfg, tiny_denoiser(), pool(), create_reward("brightness"), vae)

    full = make("full", 2)
    full.train()
    full.close()
    part = make("part", 1)
    part.train()
    part.close()
    resumed = make("part", 2)
    resumed.train()
    resumed.close()
    assert resumed.step == 2
    a, b = snap(full.lora.named("student")), snap(resumed.lora.named("student"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _sd_trainer(tiny_sd_dir, run_dir, **kw):
    from distill.denoiser import Denoiser
    from distill.trainer import DistillData

    teacher = Denoiser.from_diffusers(tiny_sd_dir)
    L = teacher.null_tokens.shape[1]
    g = torch.Generator().manual_seed(1)
    data = DistillData(torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, L, 32, generator=g),
                       torch.ones(4, L, dtype=torch.bool), [f"p{i}" for i in range(4)])
    tr = DistillTrainer(dcfg(run_dir, use_lrm_ft=False, use_vsd=False, teacher=str(tiny_sd_dir), **kw), teacher, data)
    with torch.no_grad():  # a non-trivial adapter (lora_B starts at 0)
        for _, p in tr.lora.named("student"):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return tr


def assert_computes_the_student(unet, tr):
    """``unet`` (a loaded / exported student) computes what the trainer's LoRA student computes, not the base."""
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500, 300])
    enc = torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        ours = tr.student.model(x, t, encoder_hidden_states=enc).sample
        theirs = unet(x, t, encoder_hidden_states=enc).sample
        base = tr.teacher.model(x, t, encoder_hidden_states=enc).sample
    assert not torch.allclose(ours, base, atol=1e-4)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_student_lora_loads_into_the_diffusers_pipeline(tmp_path, tiny_sd_dir):
    from diffusers import StableDiffusionPipeline

    from lrm.io import read_json

    tr = _sd_trainer(tiny_sd_dir, tmp_path / "run")
    d = tr.save_student()
    assert (d / "pytorch_lora_weights.safetensors").exists() and not (d / "config.json").exists()
    meta = read_json(d / "student.json")
    assert meta["lora"]["rank"] == 4 and meta["timesteps"] == tr.timesteps
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    pipe.load_lora_weights(d)
    assert_computes_the_student(pipe.unet, tr)


def test_merge_lora_writes_a_full_denoiser(tmp_path, tiny_sd_dir):
    from distill.denoiser import Denoiser

    tr = _sd_trainer(tiny_sd_dir, tmp_path / "run", merge_lora=True)
    d = tr.save_student()
    merged = Denoiser.from_pretrained(d)
    assert "lora" not in "".join(k for k, _ in merged.model.named_parameters())
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500, 300])
    enc = torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(merged.model(x, t, encoder_hidden_states=enc).sample,
                                   tr.student.model(x, t, encoder_hidden_states=enc).sample, rtol=1e-5, atol=1e-5)
    # the trainer's own base is untouched by the export
    assert any("lora_" in k for k, _ in tr.lora.model.named_parameters())


def test_distill_tdm_with_checkpointing_and_heterogeneous_student(tmp_path):
    tr = DistillTrainer(dcfg(tmp_path / "run", use_vsd=False, use_tdm=True, use_cd=False, gradient_checkpointing=True,
                             parameterization="heterogeneous"), tiny_teacher(), tiny_data(), lrm=mean_lrm)
    assert set(tr.lora.adapters) == {"student", "fake"} and tr.student.parameterization == "x0"
    base0, s0 = snap(tr.lora.named(None)), snap(tr.lora.named("student"))
    hist = tr.train()
    assert all("loss_tdm" in h and "loss_fake" in h for h in hist)
    base1, s1 = snap(tr.lora.named(None)), snap(tr.lora.named("student"))
    assert all(torch.equal(base0[k], base1[k]) for k in base0)
    assert any(not torch.equal(s0[k], s1[k]) for k in s0)
    x, t, tok = probe()
    assert torch.equal(out(tr.teacher, x, t, tok), out(tiny_teacher(), x, t, tok))
    assert tr.teacher.parameterization == "conjugate_v"


def test_cli_finetune_with_lora_exports_the_adapter(tmp_path):
    """`lrm finetune --lora_rank 4` end to end on the shipped Shapes teacher: the student/ folder is the adapter."""
    from lrm.cli import main
    from lrm.io import read_json
    from tests.distill.test_finetune_cli import TINY

    run = tmp_path / "ddpo"
    assert main(["finetune", "--method", "ddpo", "--run_dir", str(run), "--lora_rank", "4", *TINY]) == 0
    student = run / "student"
    assert (student / "pytorch_lora_weights.safetensors").exists() and not (student / "config.json").exists()
    assert read_json(student / "student.json")["lora"]["rank"] == 4
    with safe_open(str(student / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("unet.") and "lora" in k for k in keys)


def test_lora_student_folder_loads_back_as_a_denoiser(tmp_path, tiny_sd_dir):
    """What `lrm finetune --teacher <LoRA student/>` starts from: student.json's base + the adapter, fused."""
    from distill.denoiser import Denoiser
    from distill.lora import is_lora_student, load_lora_student

    tr = _sd_trainer(tiny_sd_dir, tmp_path / "run", parameterization="heterogeneous")
    d = tr.save_student()
    assert is_lora_student(d) and not is_lora_student(tiny_sd_dir)
    init = load_lora_student(d, lambda base: Denoiser.from_diffusers(base))
    assert init.parameterization == "x0" and not any("lora" in k for k, _ in init.model.named_parameters())
    x, t, _ = probe()
    tok = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(out(init, x, t, tok), out(tr.student, x, t, tok), rtol=1e-5, atol=1e-5)


def test_cli_distill_then_finetune_chain_of_lora_students(tmp_path):
    """`lrm distill --lora_rank 4` -> student/ (adapter); `lrm finetune --teacher student/ --lora_rank 4` starts from
    the Shapes teacher + that adapter, fused, and writes its own adapter; the chain loads back."""
    from distill.builders import build_teacher
    from distill.lora import load_lora_student
    from lrm.cli import main
    from lrm.io import read_json

    d, f = tmp_path / "d", tmp_path / "f"
    common = ["--device", "cpu", "--steps", "2", "--ckpt_every", "0", "--sample_every", "0", "--progress", "false",
              "--lora_rank", "4", "--num_sample_prompts", "1", "--samples_per_prompt", "1"]
    assert main(["distill", "--run_dir", str(d), "--batch_size", "2", "--fake_updates", "1", "--cd_teacher_steps", "1",
                 "--num_data", "8", "--tensorboard", "false", *common]) == 0
    assert main(["finetune", "--method", "direct", "--teacher", str(d / "student"), "--run_dir", str(f),
                 "--batch_size", "2", "--num_prompts", "2", "--num_eval", "2", "--eval_every", "0", "--lr", "1e-2",
                 "--gold_reward", "brightness", *common]) == 0
    assert read_json(f / "student" / "student.json")["lora"]["base_path"] == str(d / "student")

    def build(base):
        return build_teacher(DistillConfig(teacher=base), "cpu")

    teacher, distilled = build("shapes-image"), load_lora_student(d / "student", build)
    tuned = load_lora_student(f / "student", build)
    x, t, tok = probe(text=teacher.null_tokens.shape[-1])
    y0, y1, y2 = out(teacher, x, t, tok), out(distilled, x, t, tok), out(tuned, x, t, tok)
    assert not torch.allclose(y0, y1) and not torch.allclose(y1, y2)


def test_lrm_export_fuses_a_lora_student_into_a_full_pipeline(tmp_path, tiny_sd_dir):
    """`lrm export` of a LoRA student folder: the adapter fused into the teacher's UNet, an LCM pipeline whose UNet
    computes what the trained student computes."""
    from diffusers import StableDiffusionPipeline

    from distill.export import export_diffusers

    tr = _sd_trainer(tiny_sd_dir, tmp_path / "run", parameterization="eps")
    d = tr.save_student()
    out = export_diffusers(d, tiny_sd_dir, tmp_path / "pipe")
    assert not (d / "denoiser.json").exists() and (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    assert_computes_the_student(pipe.unet, tr)


def test_a_lora_student_is_a_model_name_everywhere(tmp_path, tiny_sd_dir):
    """The one resolver (distill.builders.build_teacher) takes a LoRA student folder: `lrm eval --denoiser DIR`
    samples the trained student (the adapter fused into its base), not the base."""
    from eval.cli import EvalConfig, load_denoiser

    tr = _sd_trainer(tiny_sd_dir, tmp_path / "run")
    d = tr.save_student()
    cfg = EvalConfig(out_dir=str(tmp_path / "eval"), generator="denoiser", denoiser=str(d), vae=str(tiny_sd_dir),
                     vae_subfolder="vae", text_encoder=str(tiny_sd_dir), text_max_length=77)
    den = load_denoiser(cfg, cfg.denoiser, "cpu")
    assert_computes_the_student(den.model, tr)
    assert den.parameterization == tr.student.parameterization
