"""Direct reward gradient through the decoder, FinetuneConfig checks, and the FinetuneTrainer for all three methods."""

import csv

import pytest
import torch

from distill.denoiser import Denoiser
from distill.direct import direct_reward_loss, sample_with_grad, subsample_frames
from distill.finetune import FinetuneConfig, FinetuneTrainer, PromptPool
from lrm.config import ConfigError
from lrm.schedules import DDPMSchedule

TS = [999, 749, 499, 249]


def tiny_denoiser(seed=0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    m = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                             layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
                             attention_head_dim=2, norm_num_groups=8)
    return Denoiser(m, DDPMSchedule(), "conjugate_v")


@pytest.fixture(scope="module")
def vae():
    from lrm.latent_space import VAE

    return VAE.shapes()


def pool(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return PromptPool(torch.randn(n, 5, 24, generator=g), torch.ones(n, 5, dtype=torch.bool),
                      [f"prompt {i % 3}" for i in range(n)], torch.randn(n, 4, 8, 8, generator=g))


def test_direct_gradient_reaches_student_through_decoder(vae):
    from reward_adapters import create_reward

    den = tiny_denoiser()
    reward = create_reward("colorfulness")
    tok, mask = torch.randn(2, 5, 24), torch.ones(2, 5, dtype=torch.bool)
    noise = torch.randn(2, 4, 8, 8)
    dec_params = [p for p in vae.parameters()]
    for p in dec_params:
        p.requires_grad_(True)
    grads = []
    for ckpt in (False, True):
        den.zero_grad()
        vae.zero_grad()
        torch.manual_seed(1)
        x0 = sample_with_grad(lambda x, t: den.x0(x, t, tok, mask), noise, TS, den.schedule, grad_steps=1,
                              checkpointing=ckpt)
        loss, r = direct_reward_loss(x0, vae, reward, ["a", "b"], checkpointing=ckpt)
        assert torch.allclose(loss.detach(), -r.mean())
        loss.backward()
        g = [p.grad.clone() for p in den.parameters() if p.grad is not None]
        assert g and sum(float(x.abs().sum()) for x in g) > 0  # student got gradient
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in vae.vae.decoder.parameters())
        grads.append(g)
    # gradient checkpointing recomputes, it does not change the gradient
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    for p in dec_params:
        p.requires_grad_(False)
        p.grad = None
    # a non-differentiable reward is refused
    with pytest.raises(ValueError, match="not differentiable"):
        direct_reward_loss(x0.detach(), vae, create_reward("jpeg-compressibility"), None)


def test_direct_truncation_and_frame_subsampling():
    den = tiny_denoiser()
    calls = []

    def f(x, t):
        calls.append(torch.is_grad_enabled())
        return den.x0(x, t, torch.zeros(x.shape[0], 2, 24), None)

    sample_with_grad(f, torch.randn(1, 4, 8, 8), TS, den.schedule, grad_steps=2)
    assert calls == [False, False, True, True]
    assert subsample_frames(16, "first-middle-last") == [0, 7, 15]
    assert subsample_frames(16, "last") == [15]
    r = subsample_frames(16, "random", 3, torch.Generator().manual_seed(0))
    assert len(set(r)) == 3 and all(0 <= i < 16 for i in r)
    with pytest.raises(ValueError):
        subsample_frames(4, "random", 5)


def test_config_divisibility_and_checks():
    with pytest.raises(ConfigError, match="not divisible by train_batch_size"):
        FinetuneConfig(sample_batch_size=6, num_sample_batches=1, train_batch_size=4)
    FinetuneConfig(sample_batch_size=6, num_sample_batches=2, train_batch_size=4)  # 12 % 4 == 0
    with pytest.raises(ConfigError, match="ddpo_grad_steps"):
        FinetuneConfig(ddpo_grad_steps=5)
    with pytest.raises(ConfigError, match="distill_losses"):
        FinetuneConfig(distill_losses=["gan"])
    with pytest.raises(ConfigError, match="stochastic"):
        FinetuneConfig(method="ddpo", eta=0.0)


def _cfg(tmp_path, method, **kw):
    base = dict(method=method, run_dir=str(tmp_path / method), device="cpu", steps=2, batch_size=4,
                sample_batch_size=4, num_sample_batches=2, train_batch_size=4, lr=1e-3, num_eval=4,
                eval_every=1, ckpt_every=0, sample_every=0, progress=False, num_prompts=6, stat_min_count=2,
                stat_buffer_size=4)
    base.update(kw)
    return FinetuneConfig(**base)


@pytest.mark.parametrize("method", ["lrm", "ddpo", "direct"])
def test_trainer_methods_log_and_update(tmp_path, vae, method):
    from reward_adapters import create_reward

    init = tiny_denoiser()
    lrm = (lambda z, tok, mask: z.flatten(1).mean(1)) if method == "lrm" else None
    kw = {"distill_losses": ["vsd"], "fake_updates": 1} if method == "ddpo" else {}
    tr = FinetuneTrainer(_cfg(tmp_path, method, **kw), init, pool(), create_reward("brightness"), vae, lrm=lrm)
    before = [p.detach().clone() for p in tr.student.parameters()]
    tr.train()
    tr.close()
    assert tr.step == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.student.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(before, init.parameters()))  # the init is not modified
    rows = list(csv.DictReader(open(tmp_path / method / "log.csv")))
    assert [r["step"] for r in rows] == ["0", "1", "2"]
    for r in rows[1:]:
        assert float(r["gold_reward"]) > 0 and float(r["step_time_s"]) > 0 and r["eval_gold_reward"] != ""
        assert float(r["peak_mem_mb"]) == 0.0  # CPU
        assert (r["proxy_reward"] != "") == (method == "lrm")
    assert float(rows[2]["gpu_seconds"]) >= float(rows[1]["gpu_seconds"]) > 0
    if method == "ddpo":
        assert int(rows[2]["optimizer_steps"]) == 4 and rows[1]["loss_vsd"] != "" and rows[1]["loss_fake"] != ""
    assert (tmp_path / method / "samples").exists() and (tmp_path / method / "checkpoint").exists()


def test_ddpo_resume_is_exact(tmp_path, vae):
    from reward_adapters import create_reward

    def make(run):
        cfg = _cfg(tmp_path, "ddpo", run_dir=str(tmp_path / run), steps=2, eval_every=0, async_reward=True)
        return FinetuneTrainer(cfg, tiny_denoiser(), pool(), create_reward("brightness"), vae)

    full = make("full")
    full.train(2)
    full.close()
    part = make("part")
    part.train(1)
    part.close()
    resumed = make("part")
    resumed.train(2)
    resumed.close()
    assert resumed.step == 2
    for a, b in zip(full.student.parameters(), resumed.student.parameters()):
        assert torch.equal(a, b)
    assert resumed.tracker.state_dict() == full.tracker.state_dict()


def test_method_lrm_with_an_image_only_latent_reward(tmp_path, vae):
    """method=lrm with a LatentReward that takes no text: the shared lrm_ft_loss path drops the text."""
    from latent_rewards import LatentReward, create_lrm
    from reward_adapters import create_reward

    torch.manual_seed(3)
    lrm = LatentReward(create_lrm("image-cnn", in_channels=4, width=16, patch=2),
                       {"reward": {"name": "brightness", "modality": "image"}})
    tr = FinetuneTrainer(_cfg(tmp_path, "lrm", steps=1, eval_every=0), tiny_denoiser(), pool(),
                         create_reward("brightness"), vae, lrm=lrm)
    before = [p.detach().clone() for p in tr.student.parameters()]
    tr.train()
    tr.close()
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.student.parameters()))
    rows = list(csv.DictReader(open(tmp_path / "lrm" / "log.csv")))
    train_rows = [r for r in rows if r["loss_ft"] != ""]
    assert len(train_rows) == 1 and train_rows[0]["step"] == "1"
    assert float(train_rows[0]["loss_ft"]) == pytest.approx(-float(train_rows[0]["proxy_reward"]))
    assert abs(float(train_rows[0]["loss"])) < float("inf")


def test_student_and_reference_keep_the_init_text_mask_convention(tmp_path, vae):
    """A diffusers-loaded teacher attends to caption padding (use_text_mask=False): its students must too."""
    from reward_adapters import create_reward

    init = tiny_denoiser()
    init.use_text_mask = False
    tr = FinetuneTrainer(_cfg(tmp_path, "direct", steps=1, eval_every=0, beta_kl=0.1), init, pool(),
                         create_reward("brightness"), vae)
    assert tr.student.use_text_mask is False and tr.ref.use_text_mask is False
    x = torch.randn(2, 4, 8, 8)
    tok, mask = torch.randn(2, 5, 24), torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    t = torch.tensor([999, 999])
    with torch.no_grad():  # padding is attended to: the output equals the all-ones-mask output
        torch.testing.assert_close(tr.student(x, t, tok, mask), tr.student(x, t, tok, torch.ones_like(mask)))
    tr.close()


def test_nan_reward_never_reaches_the_weights_and_stops_the_run(tmp_path, vae):
    """Issue 17: one NaN reward used to turn every student tensor into NaN and overwrite the good checkpoint."""
    from distill.guard import NonFiniteError
    from lrm.checkpoint import load_training_state

    calls = []

    def flaky(pixels, prompts):  # a reward that fails (NaN) on the 2nd trainer step's batches, then always
        calls.append(len(pixels))
        r = pixels.mean(dim=(1, 2, 3))
        return r if len(calls) <= 2 else torch.full_like(r, float("nan"))

    cfg = _cfg(tmp_path, "ddpo", steps=6, eval_every=0, ckpt_every=1, async_reward=False, max_nonfinite_steps=2)
    tr = FinetuneTrainer(cfg, tiny_denoiser(), pool(), flaky, vae)
    tr.evaluate = lambda: 0.0  # evaluation is not under test (and would call the reward too)
    with pytest.raises(NonFiniteError, match="3 steps in a row had a non-finite"):
        tr.train()
    assert tr.step == 3 and tr.guard.skipped == 3  # step 1 trained; steps 2-3 skipped and logged, the 4th stops
    assert all(torch.isfinite(p).all() for p in tr.student.parameters())
    after_step1 = FinetuneTrainer(cfg, tiny_denoiser(), pool(), flaky, vae)
    st = load_training_state(tmp_path / "ddpo" / "checkpoint", modules={"student": after_step1.student.model})
    assert st["step"] == 3  # written after the skipped steps, from the same finite weights as after step 1
    for a, b in zip(tr.student.parameters(), after_step1.student.parameters()):
        assert torch.equal(a, b)
    rows = list(csv.DictReader(open(tmp_path / "ddpo" / "log.csv")))
    assert [r["gold_reward"] for r in rows[2:]] == ["nan", "nan"]


def test_nan_gradient_skips_the_update(tmp_path, vae):
    from reward_adapters import create_reward

    bad = lambda z, tok, mask: z.flatten(1).mean(1) * float("nan")
    tr = FinetuneTrainer(_cfg(tmp_path, "lrm", steps=1, eval_every=0), tiny_denoiser(), pool(),
                         create_reward("brightness"), vae, lrm=bad)
    before = [p.detach().clone() for p in tr.student.parameters()]
    tr.train_step()
    assert all(torch.equal(a, b) for a, b in zip(before, tr.student.parameters()))
    assert tr.opt.state_dict()["state"] == {} and tr.guard.skipped == 1  # AdamW's moments untouched too


def test_resume_refuses_another_config_or_input_and_writes_nothing(tmp_path, vae):
    """Issue 17: a run resumed with another reward / lr / init silently continued the old one under the new name."""
    from reward_adapters import create_reward

    def make(**kw):
        kw = {"steps": 1, **kw}
        return FinetuneTrainer(_cfg(tmp_path, "direct", eval_every=0, **kw), tiny_denoiser(), pool(),
                               create_reward("brightness"), vae)

    make().train()
    run = tmp_path / "direct"
    config_before = (run / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"lr: 0.001 -> 0.002.*--overwrite true"):
        make(lr=2e-3, steps=2).train()
    other_init = FinetuneTrainer(_cfg(tmp_path, "direct", steps=2, eval_every=0), tiny_denoiser(1), pool(),
                                 create_reward("brightness"), vae)
    with pytest.raises(ConfigError, match="input init"):
        other_init.train()
    assert (run / "config.yaml").read_text() == config_before  # the refused starts wrote nothing
    tr = make(steps=2)  # more steps (a mutable key) resume the same run
    tr.train()
    assert tr.step == 2
    fresh = make(lr=2e-3, steps=1, overwrite=True)
    fresh.train()
    assert fresh.step == 1 and "lr: 0.002" in (run / "config.yaml").read_text()
