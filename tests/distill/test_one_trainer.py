"""Issue 18 part 1: one student trainer (GeneratorTrainer), each objective a term behind one interface.

Every term alone trains a tiny student and leaves the teacher frozen; `lrm distill` and `lrm finetune` build the
same class; a run mixing many terms (and the DDPO driver with distillation terms and KL) resumes exactly."""

import math

import pytest
import torch

from distill.cd import CDTerm
from distill.data import DistillData, PromptPool
from distill.ddpo import DDPOTerm
from distill.direct import DirectRewardTerm
from distill.finetune import FinetuneConfig, FinetuneTrainer
from distill.gan import GANTerm
from distill.generator import GeneratorTrainer
from distill.kl import KLTerm
from distill.lrm_ft import ConcurrentLRM, LRMTerm
from distill.objective import ObjectiveTerm
from distill.reward import LatentRewardTerm, MixedReward, MixedRewardTerm, PixelReward
from distill.tdm import TDMTerm
from distill.trainer import DistillConfig, DistillTrainer
from distill.vsd import VSDTerm
from tests.tiny_distill import tiny_data, tiny_teacher


class FakeVAE:
    def decode(self, z, clamp=True):
        x = torch.sigmoid(z[:, :3])
        return x.clamp(0, 1) if clamp else x


class MeanReward:
    name, modality, differentiable = "mean", "image", True

    def __call__(self, pixels, prompts=None):
        return pixels.flatten(1).mean(1)


def mean_lrm(latents, tokens, mask):
    return latents.flatten(1).mean(1)


def concurrent_lrm():
    torch.manual_seed(3)
    head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 1), torch.nn.Flatten(0))
    return ConcurrentLRM(head, torch.optim.Adam(head.parameters(), lr=1e-2), lambda px, p: px.mean(dim=(1, 2, 3)),
                         FakeVAE(), text_conditioned=False)


def make_term(name):
    return {"vsd": lambda: VSDTerm(fake_updates=1, lr=1e-3),
            "tdm": lambda: TDMTerm(fake_updates=1, lr=1e-3),
            "cd": lambda: CDTerm(1.0, teacher_steps=1),
            "gan": lambda: GANTerm(1.0, lr=1e-3),
            "ft": lambda: LRMTerm(mean_lrm),
            "ft-concurrent": lambda: LRMTerm(concurrent_lrm()),
            "mixed-latent": lambda: MixedRewardTerm(MixedReward(LatentRewardTerm(mean_lrm), None, None)),
            "mixed-pixel": lambda: MixedRewardTerm(MixedReward(PixelReward(MeanReward(), FakeVAE()), None, None)),
            "direct": lambda: DirectRewardTerm(MeanReward(), grad_steps=1),
            "ddpo": lambda: DDPOTerm(MeanReward(), sample_batch_size=4, num_sample_batches=1, train_batch_size=4,
                                     grad_steps=1, per_prompt_stats=False, clip_range=1e3, async_reward=False),
            "kl": lambda: KLTerm(1.0)}[name]()


def cfg(tmp_path, **kw):
    base = dict(run_dir=str(tmp_path / "run"), device="cpu", steps=2, batch_size=4, student_steps=2,
                cd_teacher_steps=1, ckpt_every=0, sample_every=0, progress=False, tensorboard=False, lr_student=1e-3)
    base.update(kw)
    return DistillConfig(**base)


def params(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def changed(before, m):
    return any(not torch.equal(v, m.state_dict()[k]) for k, v in before.items())


TERMS = ["vsd", "tdm", "cd", "gan", "ft", "ft-concurrent", "mixed-latent", "mixed-pixel", "direct", "ddpo", "kl"]


@pytest.mark.parametrize("name", TERMS)
def test_every_term_alone_trains_the_student_and_keeps_the_teacher_frozen(tmp_path, name):
    teacher = tiny_teacher()
    t0 = params(teacher.model)
    term = make_term(name)
    assert isinstance(term, ObjectiveTerm)
    tr = GeneratorTrainer(cfg(tmp_path), [term], tiny_data(), teacher=teacher, vae=FakeVAE())
    if name == "kl":  # at the init the penalty is 0: move the student away from pi_ref first
        with torch.no_grad():
            for p in tr.student.model.parameters():
                p.add_(0.01 * torch.randn_like(p))
    s0 = params(tr.student.model)
    rows = tr.train()
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    assert changed(s0, tr.student.model), name
    assert all(torch.equal(v, teacher.model.state_dict()[k]) for k, v in t0.items())
    assert not any(p.requires_grad for p in teacher.model.parameters())
    if name in ("vsd", "tdm"):
        assert all(math.isfinite(r["loss_fake"]) for r in rows)
    if name == "kl":
        assert rows[0]["kl"] > 0 and tr.ref is not None
    tr.close()


def test_both_commands_are_configurations_of_one_class(tmp_path):
    teacher = tiny_teacher()
    d = DistillTrainer(cfg(tmp_path / "d"), teacher, tiny_data())
    data = tiny_data()
    pool = PromptPool(data.text_tokens, data.text_mask, data.prompts, data.latents)
    f = FinetuneTrainer(FinetuneConfig(method="direct", run_dir=str(tmp_path / "f"), device="cpu", progress=False,
                                       distill_losses=["vsd", "cd"], beta_kl=0.1, student_steps=2),
                        teacher, pool, MeanReward(), FakeVAE())
    assert type(d) is type(f) is GeneratorTrainer and not GeneratorTrainer.__subclasses__()
    assert [t.name for t in d.terms] == ["vsd", "cd"]
    assert [t.name for t in f.terms] == ["direct", "vsd", "cd", "kl"]
    assert isinstance(d.data, DistillData) and isinstance(f.data, DistillData)
    f.close()


def test_resume_is_exact_with_many_terms(tmp_path):
    names = ["tdm", "gan", "mixed-latent", "cd", "ft-concurrent", "direct", "kl"]

    def run(d, steps):
        c = cfg(tmp_path / d, steps=steps, ckpt_every=2, batch_size=2)
        return GeneratorTrainer(c, [make_term(n) for n in names], tiny_data(), teacher=tiny_teacher(),
                                vae=FakeVAE()).train()

    full = run("a", 4)
    run("b", 2)
    resumed = run("b", 4)
    assert [r["step"] for r in resumed] == [3, 4]
    keys = ("loss", "loss_tdm", "loss_gan", "loss_mixed", "loss_cd", "loss_ft", "loss_direct", "kl", "loss_fake",
            "loss_disc", "loss_lrm", "grad_norm")
    for a, b in zip(full[2:], resumed, strict=True):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}


def test_ddpo_driver_with_distillation_terms_and_kl_resumes_exactly(tmp_path):
    def run(d, steps):
        c = FinetuneConfig(method="ddpo", run_dir=str(tmp_path / d), device="cpu", steps=steps, ckpt_every=2,
                           student_steps=2, batch_size=2, sample_batch_size=2, num_sample_batches=2,
                           train_batch_size=2, ddpo_grad_steps=1, distill_losses=["vsd", "cd"], fake_updates=1,
                           cd_teacher_steps=1, beta_kl=0.1, eval_every=0, num_eval=2, progress=False,
                           async_reward=False, stat_min_count=2, stat_buffer_size=4, lr=1e-3)
        data = tiny_data()
        return FinetuneTrainer(c, tiny_teacher(), PromptPool(data.text_tokens, data.text_mask, data.prompts,
                                                             data.latents), MeanReward(), FakeVAE())

    tr = run("a", 4)
    full = [r for r in tr.train() if "loss" in r]
    tr.close()
    run("b", 2).train()
    tr = run("b", 4)
    resumed = [r for r in tr.train() if "loss" in r]
    tr.close()
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(full[2:], resumed, strict=True):
        for k in ("loss", "loss_vsd", "loss_cd", "kl", "loss_fake", "gold_reward", "grad_norm", "approx_kl"):
            assert a[k] == b[k], (k, a["step"])
