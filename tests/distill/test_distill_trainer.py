"""DistillTrainer on tiny random UNets (CPU): the student learns, the teacher stays frozen, resume is exact."""

import csv
import math
from pathlib import Path

import pytest
import torch

from distill.denoiser import Denoiser
from distill.lrm_ft import ConcurrentLRM
from distill.trainer import DistillConfig, DistillData, DistillTrainer
from lrm.config import ConfigError, load_config
from lrm.schedules import DDPMSchedule
from tests.tiny_distill import tiny_data, tiny_teacher

ROOT = Path(__file__).resolve().parents[2]


def mean_lrm(latents, tokens, mask):
    return latents.mean(dim=(1, 2, 3))


def cfg(tmp_path, **kw):
    base = dict(run_dir=str(tmp_path / "run"), device="cpu", steps=2, batch_size=4, fake_updates=2,
                cd_teacher_steps=2, ckpt_every=0, sample_every=0, progress=False, tensorboard=False, lr_student=1e-3,
                lr_fake=1e-3)
    base.update(kw)
    return DistillConfig(**base)


def params(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_steps_change_student_and_keep_teacher_frozen(tmp_path):
    teacher = tiny_teacher()
    before = params(teacher.model)
    tr = DistillTrainer(cfg(tmp_path, use_lrm_ft=True), teacher, tiny_data(), lrm=mean_lrm)
    s0, f0 = params(tr.student.model), params(tr.fake.model)
    hist = tr.train()
    assert len(hist) == 2 and all(math.isfinite(h["loss"]) for h in hist)
    assert {"loss_vsd", "loss_cd", "loss_ft", "loss_fake"} <= set(hist[0])
    after = params(teacher.model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in teacher.model.parameters())
    s1, f1 = params(tr.student.model), params(tr.fake.model)
    assert any(not torch.equal(s0[k], s1[k]) for k in s0)
    assert any(not torch.equal(f0[k], f1[k]) for k in f0)
    # the CD target is an EMA(0.95) of the student: moved, but not equal to it
    t1 = params(tr.target.shadow.model)
    assert any(not torch.equal(s0[k], t1[k]) for k in s0) and any(not torch.equal(s1[k], t1[k]) for k in s1)
    rows = list(csv.DictReader(open(tmp_path / "run" / "log.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert (tmp_path / "run" / "checkpoint" / "state.safetensors").exists()


def test_lrm_ft_raises_reward(tmp_path):
    """FT only, 4 steps with a large lr: the mean latent (the 'reward') goes up."""
    tr = DistillTrainer(cfg(tmp_path, use_vsd=False, use_cd=False, use_lrm_ft=True, steps=4, beta_ft=1.0,
                            lr_student=3e-3, student_steps=1), tiny_teacher(), tiny_data(), lrm=mean_lrm)
    batch = tr.data.batch(torch.arange(8))
    noise = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    r0 = float(mean_lrm(tr.sample(noise, batch.text_tokens, batch.text_mask), None, None).mean())
    tr.train()
    r1 = float(mean_lrm(tr.sample(noise, batch.text_tokens, batch.text_mask), None, None).mean())
    assert r1 > r0 + 0.05


def test_resume_gives_the_same_loss_curve(tmp_path):
    """4 uninterrupted steps vs 2 steps, "killed", then resumed from the step-2 checkpoint to 4: same losses."""
    kw = dict(use_lrm_ft=True, ckpt_every=2, grad_accum=2, batch_size=2, fake_updates=1, cd_teacher_steps=1)
    full = DistillTrainer(cfg(tmp_path / "a", steps=4, **kw), tiny_teacher(), tiny_data(), lrm=mean_lrm).train()
    DistillTrainer(cfg(tmp_path / "b", steps=2, **kw), tiny_teacher(), tiny_data(), lrm=mean_lrm).train()  # "killed"
    resumed_tr = DistillTrainer(cfg(tmp_path / "b", steps=4, **kw), tiny_teacher(), tiny_data(), lrm=mean_lrm)
    resumed = resumed_tr.train()
    assert [r["step"] for r in resumed] == [3, 4]
    assert len(full) == 4
    for a, b in zip(full[2:], resumed, strict=True):
        for k in ("loss", "loss_vsd", "loss_cd", "loss_ft", "loss_fake"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), (k, a["step"])
    rows = list(csv.DictReader(open(tmp_path / "b" / "run" / "log.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]


def test_heterogeneous_student_predicts_x0(tmp_path):
    tr = DistillTrainer(cfg(tmp_path, parameterization="heterogeneous", use_vsd=False, steps=1, student_steps=2),
                        tiny_teacher(), tiny_data())
    assert tr.student.parameterization == "x0" and tr.teacher.parameterization == "conjugate_v"
    assert tr.fake is None and tr.timesteps == [999, 499]
    assert math.isfinite(tr.train()[0]["loss_cd"])


def test_concurrent_lrm_and_sample_grid(tmp_path):
    from lrm.latent_space import VAE

    vae = VAE.shapes()
    head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 1), torch.nn.Flatten(0))
    brightness = lambda pixels, prompts: pixels.mean(dim=(1, 2, 3))
    lrm = ConcurrentLRM(head, torch.optim.Adam(head.parameters(), lr=1e-3), brightness, vae, text_conditioned=False)
    w0 = head[1].weight.detach().clone()
    tr = DistillTrainer(cfg(tmp_path, use_lrm_ft=True, steps=1, num_sample_prompts=2, samples_per_prompt=2),
                        tiny_teacher(), tiny_data(), lrm=lrm, vae=vae)
    row = tr.train()[0]
    assert math.isfinite(row["loss_lrm"]) and not torch.equal(w0, head[1].weight)
    assert (tmp_path / "run" / "samples" / "step_000001.png").exists()
    out = tr.save_student()
    assert (out / "denoiser.json").exists() and (out / "student.json").exists()


def test_config_errors_and_shipped_configs(tmp_path):
    with pytest.raises(ConfigError, match="all losses are off"):
        DistillConfig(use_vsd=False, use_cd=False)
    with pytest.raises(ConfigError, match="student_steps"):
        DistillConfig(student_steps=3)
    with pytest.raises(ConfigError, match="needs an LRM"):
        DistillTrainer(cfg(tmp_path, use_lrm_ft=True), tiny_teacher(), tiny_data())
    files = sorted((ROOT / "configs").glob("distill_*.yaml"))
    assert len(files) >= 8
    for f in files:
        c = load_config(DistillConfig, f)
        assert c.use_vsd or c.use_cd or c.use_tdm  # a distribution-matching or consistency term


def test_image_only_latent_reward_drives_the_ft_term(tmp_path):
    """A LatentReward with an image-only head (takes no text) works as the frozen LRM of L_FT: the trainer calls it
    without text (it would raise "takes no text" otherwise), the loss is finite and the student moves."""
    from latent_rewards import LatentReward, create_lrm

    torch.manual_seed(3)
    head = create_lrm("image-cnn", in_channels=4, width=16, patch=2, norm_groups=4)
    LatentReward(head, {"reward": {"name": "brightness", "modality": "image"}}).save_pretrained(tmp_path / "lrm")
    lrm = LatentReward.from_pretrained(tmp_path / "lrm")
    assert not lrm.needs_text
    with pytest.raises(ValueError, match="takes no text"):
        lrm(torch.randn(2, 4, 8, 8), torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool))
    tr = DistillTrainer(cfg(tmp_path, use_vsd=False, use_cd=False, use_lrm_ft=True, steps=1, student_steps=1),
                        tiny_teacher(), tiny_data(), lrm=lrm)
    s0 = params(tr.student.model)
    row = tr.train()[0]
    assert math.isfinite(row["loss_ft"]) and math.isfinite(row["loss"])
    assert row["loss_ft"] == pytest.approx(-row["proxy_reward"])
    s1 = params(tr.student.model)
    assert any(not torch.equal(s0[k], s1[k]) for k in s0)


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "checkpointed"])
def test_video_unet3d_student_learns_teacher_frozen(tmp_path, ckpt):
    """A tiny UNet3DConditionModel video teacher, (B, T, C, h, w) latents, 2 steps of VSD + CD + FT; with
    gradient_checkpointing the student's and fake score's blocks are checkpointed (distill.checkpointing: UNet3D has
    no diffusers switch) and the run is the same."""
    from diffusers import UNet3DConditionModel

    torch.manual_seed(0)
    unet = UNet3DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=8, attention_head_dim=4, norm_num_groups=8)
    teacher = Denoiser(unet, DDPMSchedule(), "conjugate_v")
    g = torch.Generator().manual_seed(1)
    data = DistillData(torch.randn(6, 3, 4, 8, 8, generator=g), torch.randn(6, 5, 8, generator=g),
                       torch.ones(6, 5, dtype=torch.bool), [f"video {i}" for i in range(6)])
    video_lrm = lambda x, tok, mask: x.mean(dim=(1, 2, 3, 4))  # noqa: E731
    before = params(teacher.model)
    tr = DistillTrainer(cfg(tmp_path, use_lrm_ft=True, batch_size=2, fake_updates=1, cd_teacher_steps=1,
                            gradient_checkpointing=ckpt), teacher, data, lrm=video_lrm)
    assert tr.student.is_video and tr.latent_shape == (3, 4, 8, 8)
    assert all(getattr(b, "_lrm_checkpointed", False) == ckpt for b in tr.student.model.down_blocks)
    s0 = params(tr.student.model)
    hist = tr.train()
    assert [h["step"] for h in hist] == [1, 2]
    assert all(math.isfinite(h[k]) for h in hist for k in ("loss_vsd", "loss_cd", "loss_ft", "loss_fake"))
    assert all(torch.equal(before[k], v) for k, v in params(teacher.model).items())
    s1 = params(tr.student.model)
    assert any(not torch.equal(s0[k], s1[k]) for k in s0)
    x = tr.sample(torch.randn(2, 3, 4, 8, 8), data.text_tokens[:2], data.text_mask[:2])
    assert x.shape == (2, 3, 4, 8, 8) and torch.isfinite(x).all()


def test_build_trainer_seeds_before_building_the_concurrent_lrm(tmp_path):
    """Issue 17: the concurrent LRM head was built before seeding, so two runs with one seed differed at step 1."""
    from distill.cli import build_trainer

    heads = []
    for i in range(2):
        torch.manual_seed(1000 + i)  # whatever ran before in the process must not matter
        tr = build_trainer(cfg(tmp_path / str(i), use_lrm_ft=True, lrm_mode="concurrent", num_data=8,
                               lrm_head="image-cnn", lrm_head_kwargs={"patch": 2}))
        heads.append(params(tr.lrm.head))
    assert heads[0].keys() == heads[1].keys() and all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])


def test_non_finite_generator_loss_is_skipped_not_applied(tmp_path):
    from distill.guard import NonFiniteError

    nan_lrm = lambda latents, tokens, mask: latents.mean(dim=(1, 2, 3)) * float("nan")
    tr = DistillTrainer(cfg(tmp_path, use_lrm_ft=True, max_nonfinite_steps=1, steps=3), tiny_teacher(), tiny_data(),
                        lrm=nan_lrm)
    before = params(tr.student.model)
    tr.train_step()
    assert tr.guard.skipped == 1 and all(torch.equal(v, tr.student.model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(NonFiniteError, match="max_nonfinite_steps=1"):
        tr.train()


def test_resume_with_another_config_is_refused(tmp_path):
    DistillTrainer(cfg(tmp_path, steps=1), tiny_teacher(), tiny_data()).train()
    with pytest.raises(ConfigError, match=r"beta_cd: 0.5 -> 1.0"):
        DistillTrainer(cfg(tmp_path, steps=2, beta_cd=1.0), tiny_teacher(), tiny_data()).train()
    other = tiny_data()
    other.latents = other.latents + 1
    with pytest.raises(ConfigError, match="input data"):
        DistillTrainer(cfg(tmp_path, steps=2), tiny_teacher(), other).train()
    tr = DistillTrainer(cfg(tmp_path, steps=2), tiny_teacher(), tiny_data())
    tr.train()
    assert tr.step == 2


def _mixed(weights=(0.5, 1.0, 1.5)):
    from distill.reward import LatentRewardTerm, MixedReward

    return MixedReward(LatentRewardTerm(mean_lrm), None, None, weights=weights)


@pytest.mark.parametrize("term", ["tdm", "gan", "mixed"])
def test_each_paper_004_term_alone_trains_the_student_and_keeps_the_teacher(tmp_path, term):
    """Issue 18: TDM, the adversarial term and the mixed rewards as DistillTrainer terms (each alone)."""
    kw = {"tdm": dict(use_tdm=True, fake_updates=1), "gan": dict(use_gan=True),
          "mixed": dict(spatial_rewards=["mean"])}[term]
    teacher = tiny_teacher()
    t0 = params(teacher.model)
    tr = DistillTrainer(cfg(tmp_path, use_vsd=False, use_cd=False, steps=2, **kw), teacher, tiny_data(),
                        mixed_reward=_mixed() if term == "mixed" else None)
    s0 = params(tr.student.model)
    d0 = params(tr.disc) if term == "gan" else None
    rows = tr.train()
    col = {"tdm": "loss_tdm", "gan": "loss_gan", "mixed": "loss_mixed"}[term]
    assert all(math.isfinite(r[col]) for r in rows)
    assert any(not torch.equal(v, tr.student.model.state_dict()[k]) for k, v in s0.items())
    assert all(torch.equal(v, teacher.model.state_dict()[k]) for k, v in t0.items())
    if term == "tdm":
        assert tr.fake is not None and tr.opt_f.param_groups[0]["betas"] == (0.0, 0.95)
        assert all(math.isfinite(r["loss_fake"]) for r in rows)
    if term == "gan":
        assert any(not torch.equal(v, tr.disc.state_dict()[k]) for k, v in d0.items())
        assert all(math.isfinite(r["loss_disc"]) for r in rows)


def test_resume_is_exact_with_tdm_gan_and_mixed_rewards(tmp_path):
    kw = dict(use_vsd=False, use_tdm=True, use_gan=True, spatial_rewards=["mean"], ckpt_every=2, fake_updates=1,
              cd_teacher_steps=1, batch_size=2)
    full = DistillTrainer(cfg(tmp_path / "a", steps=4, **kw), tiny_teacher(), tiny_data(),
                          mixed_reward=_mixed()).train()
    DistillTrainer(cfg(tmp_path / "b", steps=2, **kw), tiny_teacher(), tiny_data(), mixed_reward=_mixed()).train()
    resumed = DistillTrainer(cfg(tmp_path / "b", steps=4, **kw), tiny_teacher(), tiny_data(),
                             mixed_reward=_mixed()).train()
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(full[2:], resumed, strict=True):
        for k in ("loss", "loss_tdm", "loss_cd", "loss_gan", "loss_mixed", "loss_fake", "loss_disc"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), (k, a["step"])


def test_tdm_and_vsd_are_exclusive_and_mixed_needs_its_reward():
    with pytest.raises(ConfigError, match="pick one"):
        DistillConfig(use_vsd=True, use_tdm=True)
    with pytest.raises(ConfigError, match="mixed_reward="):
        DistillTrainer(cfg(Path("/tmp/unused"), spatial_rewards=["x"]), tiny_teacher(), tiny_data())
