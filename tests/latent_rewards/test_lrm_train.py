"""fit / evaluate / save-load / LatentReward on small synthetic data (CPU, seconds)."""

import shutil

import numpy as np
import pytest
import torch

from latent_rewards import LatentData, LatentReward, TextEncoderMismatchError, evaluate, fit, split_by_prompt
from latent_rewards.metrics import pairwise_accuracy, regression_metrics
from lrm.latent_space import LatentSpace, LatentSpaceMismatchError

SPACE = LatentSpace(vae_id="toy-vae", vae_hash="a" * 64, latent_channels=4, downsample=4)
TEXT_ENC = {"name": "toy-text", "dim": 8, "max_length": 6, "pooling": "mean"}
SMALL = {"width": 32, "patch": 2}


def _image_data(n=600, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 8, 8, generator=g)
    w = torch.tensor([1.0, -0.5, 0.3, 0.8])
    y = 5.0 + 3.0 * (x.mean((2, 3)) * w).sum(1) + 0.5 * x[:, 0].std((1, 2))  # reward units: mean 5
    prompts = [f"prompt {i % 60}" for i in range(n)]
    return LatentData(x, y, prompts=prompts, reward_name="toy-linear",
                      reward_info={"version": "1", "modality": "image"}, latent_space=SPACE.to_dict())


def _text_data(n=800, seed=0):
    """Reward = +channel-0 mean if the prompt says 'a', -channel-0 mean if it says 'b' (needs image AND text)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 8, 8, generator=g)
    which = torch.randint(0, 2, (n,), generator=g)
    words = torch.randn(2, 8, generator=g)
    tok = torch.randn(n, 6, 8, generator=g) * 0.1
    tok[:, 0] = words[which]
    mask = torch.ones(n, 6, dtype=torch.bool)
    mask[:, 4:] = False
    y = torch.where(which == 0, 1.0, -1.0) * x[:, 0].mean((1, 2)) * 8
    prompts = [f"{'ab'[w]} {i % 40}" for i, w in enumerate(which.tolist())]
    return LatentData(x, y, text_tokens=tok, text_mask=mask, prompts=prompts, reward_name="toy-text",
                      reward_info={"version": "1", "modality": "text-image"}, latent_space=SPACE.to_dict(),
                      text_encoder=TEXT_ENC)


def test_split_by_prompt_has_no_shared_prompt():
    prompts = [f"p{i % 37}" for i in range(500)]
    tr, va = split_by_prompt(prompts, 500, 0.2, seed=1)
    assert len(tr) + len(va) == 500 and 0.15 * 500 < len(va) < 0.3 * 500
    assert not ({prompts[i] for i in tr} & {prompts[i] for i in va})


def test_metrics_values():
    y = np.array([1.0, 2.0, 3.0, 4.0])
    m = regression_metrics(y * 2, y)
    assert m["spearman"] == pytest.approx(1.0) and m["kendall_tau"] == pytest.approx(1.0)
    assert m["mse"] == pytest.approx(np.mean(y ** 2))
    assert pairwise_accuracy([4, 3, 2, 1], y) == 0.0
    assert pairwise_accuracy([1, 1, 2, 3], y) == pytest.approx(5.5 / 6)


def test_fit_learns_synthetic_target_and_beats_nothing(tmp_path):
    data = _image_data()
    res = fit(data, head="image-cnn", head_kwargs=SMALL, steps=300, batch_size=64, eval_every=50,
              progress=False, out_dir=tmp_path / "lrm")
    assert res.metrics["spearman"] > 0.9
    assert res.baseline_metrics["spearman"] > 0.9  # the target is nearly linear in pooled latents
    for f in ("config.json", "model.safetensors", "metadata.json", "metrics.json", "calibration.png", "train_log.csv"):
        assert (tmp_path / "lrm" / f).exists(), f
    # predictions are in reward units (target mean 5), not standardised
    lrm = LatentReward.from_pretrained(tmp_path / "lrm")
    pred = lrm.predict(data.latents[res.val_idx])
    assert abs(float(pred.mean()) - float(data.target[res.val_idx].mean())) < 1.0
    assert np.allclose(pred.numpy(), res.val_pred, atol=1e-4)
    assert lrm.metadata["target_normalization"]["mean"] == pytest.approx(float(data.target[res.train_idx].mean()))
    assert lrm.metadata["training_data"]["num_val"] == len(res.val_idx)
    ev = evaluate(lrm, data, out_dir=tmp_path / "eval", indices=res.val_idx)
    assert ev["metrics"]["spearman"] == pytest.approx(res.metrics["spearman"], abs=1e-4)
    assert (tmp_path / "eval" / "eval_calibration.png").exists()


def test_evaluate_reports_the_ridge_baseline(tmp_path, monkeypatch):
    import latent_rewards.train as train_mod

    data = _image_data(n=300)
    res = fit(data, head="image-cnn", head_kwargs=SMALL, steps=20, batch_size=32, eval_every=10, progress=False,
              out_dir=tmp_path / "lrm")
    lrm = LatentReward.from_pretrained(tmp_path / "lrm")
    plots = []
    real_plot = train_mod.calibration_plot
    monkeypatch.setattr(train_mod, "calibration_plot", lambda *a, **kw: plots.append(kw) or real_plot(*a, **kw))
    # 1. training data at hand: ridge refit on the same train split, scored on the same rows as the LRM.
    ev = evaluate(lrm, data, out_dir=tmp_path / "ev", indices=res.val_idx, baseline_train_indices=res.train_idx)
    rb = ev["ridge_baseline"]
    assert rb["source"].startswith("refit") and rb["num_train"] == len(res.train_idx)
    for k in ("spearman", "r2", "mse"):
        assert rb[k] == pytest.approx(res.baseline_metrics[k], rel=1e-6, abs=1e-9)
    assert rb["spearman"] == pytest.approx(regression_metrics(res.baseline_pred, data.target[res.val_idx])["spearman"])
    assert np.allclose(plots[-1]["baseline"], res.baseline_pred)  # grey points on the calibration plot
    assert f"ridge Spearman {rb['spearman']:.3f}" in plots[-1]["title"]
    saved = __import__("json").loads((tmp_path / "ev" / "eval_metrics.json").read_text())
    assert saved["ridge_baseline"]["spearman"] == pytest.approx(rb["spearman"])
    # 2. no training data: the checkpoint's baseline metrics are copied and named as such.
    ev2 = evaluate(lrm, data.subset(res.val_idx[:20]), out_dir=tmp_path / "ev2")
    stored = lrm.metadata["metrics"]["ridge_baseline"]
    assert ev2["ridge_baseline"]["spearman"] == stored["spearman"] and "checkpoint" in ev2["ridge_baseline"]["source"]
    assert plots[-1]["baseline"] is None and plots[-1]["baseline_metrics"]["spearman"] == stored["spearman"]
    assert f"ridge Spearman {stored['spearman']:.3f}" in plots[-1]["title"]


def test_calibration_figure_names_the_baseline():
    from latent_rewards.metrics import calibration_figure

    y = np.linspace(0, 1, 20)
    fig = calibration_figure(y + 0.01, y, title="t", baseline=y[::-1])
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels[0] == "ridge baseline (Spearman -1.000, R² -3.000)" and labels[1].startswith("LRM (Spearman 1.000")
    fig = calibration_figure(y, y, baseline_metrics={"spearman": 0.5, "r2": 0.25})
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels[0] == "ridge baseline, training run's split (Spearman 0.500, R² 0.250)"


def test_fit_text_reward_needs_both_inputs():
    data = _text_data()
    res = fit(data, head="text-image-cnn", head_kwargs=SMALL, steps=400, batch_size=64, eval_every=100,
              lr=2e-3, progress=False)
    assert res.metrics["spearman"] > 0.8
    # ridge on pooled latents + pooled text cannot express the product
    assert abs(res.baseline_metrics["spearman"]) < 0.3


def test_rank_loss_and_ensemble_noise_aware_train():
    data = _image_data(n=400)
    res = fit(data, head="image-cnn", head_kwargs={**SMALL, "timestep_cond": True}, ensemble=2, loss="mse+rank",
              steps=150, batch_size=64, eval_every=50, progress=False, noise_max_t=300)
    assert res.metrics["spearman"] > 0.8
    lrm = res.lrm
    x = data.latents[:4]
    members = lrm.members(x)
    assert members.shape == (2, 4)
    assert torch.allclose(lrm(x), members.mean(0), atol=1e-5)
    assert not torch.allclose(lrm(x, t=torch.full((4,), 250)), lrm(x), atol=1e-4)  # t is used after training
    assert lrm.metadata["noise_schedule"]["num_train_timesteps"] == 1000
    sched = lrm.noise_schedule
    assert float(sched.alphas_cumprod[0]) == pytest.approx(1 - 0.00085, rel=1e-6)  # SD's beta_1
    assert float(sched.alphas_cumprod[-1]) == pytest.approx(0.00466, abs=2e-4)  # SD's abar_T (scaled linear)


def test_ddpm_schedule_add_noise():
    from latent_rewards import DDPMSchedule

    s = DDPMSchedule()
    x0 = torch.ones(4096, 4)
    xt = s.add_noise(x0, torch.randn_like(x0), torch.full((4096,), 999))  # diffusers' order: (x0, noise, t)
    abar = float(s.alphas_cumprod[999])
    assert float(xt.mean()) == pytest.approx(abar ** 0.5, abs=0.02)
    assert float(xt.std()) == pytest.approx((1 - abar) ** 0.5, abs=0.02)
    custom = DDPMSchedule(alphas_cumprod=torch.linspace(0.99, 0.1, 50))
    assert custom.num_train_timesteps == 50
    with pytest.raises(ValueError, match="noise_max_t"):
        fit(_image_data(n=100), head="image-cnn", head_kwargs={**SMALL, "timestep_cond": True}, steps=2,
            noise_schedule=custom, progress=False)


def test_resume_gives_the_same_model(tmp_path):
    data = _image_data(n=300)
    kw = dict(head="image-cnn", head_kwargs={"width": 16, "patch": 2}, steps=60, batch_size=32, eval_every=20,
              checkpoint_every=30, progress=False, patience=0)
    a = fit(data, out_dir=tmp_path / "a", **kw)
    assert (tmp_path / "a" / "checkpoint" / "state.json").exists()  # left at step 30
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    (tmp_path / "b" / "model.safetensors").unlink()
    b = fit(data, out_dir=tmp_path / "b", **kw)  # resumes at step 30 and replays 30..60
    assert [r["step"] for r in b.history] == [20, 40, 60]
    for (k, va), (_, vb) in zip(a.lrm.model.state_dict().items(), b.lrm.model.state_dict().items()):
        assert torch.allclose(va, vb, atol=1e-6), k


def test_save_load_round_trip_and_mismatch_refusal(tmp_path):
    from latent_rewards import create_lrm

    torch.manual_seed(0)
    for name, kw in [("text-video-3d-cnn", {"text_dim": 8}), ("image-cnn", {"ensemble": 3, "ensemble_reduce": "lcb"})]:
        model = create_lrm(name, in_channels=4, width=16, patch=2, **kw)
        meta = {"reward": {"name": "r", "version": "2", "modality": model.modality},
                "latent_space": SPACE.to_dict(), "text_encoder": TEXT_ENC if "text" in name else None,
                "target_normalization": {"mean": 3.0, "std": 2.0}}
        lrm = LatentReward(model, meta)
        lrm.save_pretrained(tmp_path / name)
        back = LatentReward.from_pretrained(tmp_path / name)
        x = torch.randn(2, 5, 4, 8, 8) if "video" in name else torch.randn(2, 4, 8, 8)
        tok = torch.randn(2, 6, 8) if "text" in name else None
        assert torch.equal(lrm.eval()(x, tok), back(x, tok))
        assert torch.allclose(back(x.bfloat16(), tok), back(x, tok), atol=0.05)  # dtype cast outside autocast
        assert back.reward_name == "r" and back.reward_version == "2" and back.latent_space == SPACE
        # differentiable in the latents
        x.requires_grad_(True)
        back(x, tok).sum().backward()
        assert x.grad.abs().sum() > 0
    # wrong channel count / other VAE / other text encoder are refused with clear messages
    with pytest.raises(LatentSpaceMismatchError, match="3 channels"):
        back(torch.randn(2, 3, 8, 8))
    other = LatentSpace(vae_id="other-vae", vae_hash="b" * 64, latent_channels=4, downsample=4)
    with pytest.raises(LatentSpaceMismatchError, match="other-vae"):
        back.check_inputs(latent_space=other)
    back.check_inputs(latent_space=SPACE.to_dict())  # same space passes
    # the same VAE weights under another name (a local copy of a hub VAE) are the same space
    back.check_inputs(latent_space={**SPACE.to_dict(), "vae_id": "/local/copy/of/toy-vae", "vae_dtype": "float32"})
    with pytest.raises(LatentSpaceMismatchError, match="both VAEs are named 'toy-vae'"):
        back.check_inputs(latent_space={**SPACE.to_dict(), "vae_hash": "d" * 64})
    tv = LatentReward.from_pretrained(tmp_path / "text-video-3d-cnn")
    with pytest.raises(TextEncoderMismatchError, match="toy-text"):
        tv.check_inputs(text_encoder={**TEXT_ENC, "name": "clip-l"})
    with pytest.raises(TextEncoderMismatchError, match="width 16"):
        tv(torch.randn(1, 5, 4, 8, 8), torch.randn(1, 6, 16))
    with pytest.raises(ValueError, match="text-conditioned"):
        tv(torch.randn(1, 5, 4, 8, 8))
    with pytest.raises(FileNotFoundError, match="metadata.json"):
        (tmp_path / "image-cnn" / "metadata.json").unlink()
        LatentReward.from_pretrained(tmp_path / "image-cnn")


def test_evaluate_refuses_other_latent_space():
    data = _image_data(n=200)
    res = fit(data, head="image-cnn", head_kwargs={"width": 16, "patch": 2}, steps=20, batch_size=32, eval_every=10,
              progress=False)
    other = LatentData(data.latents, data.target, latent_space={**SPACE.to_dict(), "vae_hash": "c" * 64})
    with pytest.raises(LatentSpaceMismatchError, match="vae_hash"):
        evaluate(res.lrm, other)


def test_fit_and_evaluate_take_numpy_only_from_host_tensors():
    """`lrm evaluate` moves the data to the LRM's device (a GPU); numpy must come through .cpu() (issue 16)."""
    import dataclasses

    from _gpu_tensor_mock import OnGPU, on_gpu

    data = _image_data(n=200)
    with pytest.raises(TypeError, match="cpu"):  # the stand-in behaves like a CUDA tensor
        on_gpu(data.target).numpy()
    gpu = dataclasses.replace(data, latents=on_gpu(data.latents), target=on_gpu(data.target))
    assert isinstance(gpu.to("cpu").target, OnGPU)
    res = fit(gpu, head="image-cnn", head_kwargs={"width": 16, "patch": 2}, steps=20, batch_size=32, eval_every=10,
              progress=False)
    ref = fit(data, head="image-cnn", head_kwargs={"width": 16, "patch": 2}, steps=20, batch_size=32, eval_every=10,
              progress=False)
    assert res.metrics["spearman"] == pytest.approx(ref.metrics["spearman"], abs=1e-6)
    ev = evaluate(res.lrm, gpu, indices=res.val_idx, baseline_train_indices=res.train_idx)
    ev_ref = evaluate(res.lrm, data, indices=res.val_idx, baseline_train_indices=res.train_idx)
    assert ev["metrics"] == pytest.approx(ev_ref["metrics"])
    assert ev["ridge_baseline"]["spearman"] == pytest.approx(ev_ref["ridge_baseline"]["spearman"])
    assert ev["num_samples"] == len(res.val_idx)


def _toy_lrm(name="image-cnn", **meta):
    """A small LatentReward as fit records it: trained on 8x8 latents, 32-token text of width 8 for text heads."""
    from latent_rewards import create_lrm

    torch.manual_seed(0)
    text = name.startswith("text")
    model = create_lrm(name, in_channels=4, width=16, patch=2, **({"text_dim": 8} if text else {}))
    return LatentReward(model, {"reward": {"name": "r", "modality": model.modality}, "latent_space": SPACE.to_dict(),
                                "text_encoder": {**TEXT_ENC, "max_length": 32} if text else None,
                                "training_data": {"latent_shape": [4, 8, 8]}, **meta})


def test_lrm_refuses_latents_of_a_size_its_head_does_not_divide_and_warns_on_untrained_sizes(recwarn):
    """Issue 17: an LRM given 3x3 latents (patch-2 head trained on 8x8) returned a score."""
    from latent_rewards import LRMInputError

    lrm = _toy_lrm()
    with pytest.raises(LRMInputError, match=r"LRM for 'r' \(trained on 8x8 latents\): .*3x3 do not fit its patch "
                                            r"conv \(kernel = stride = 2\)"):
        lrm(torch.randn(2, 4, 3, 3))
    assert torch.isfinite(lrm(torch.randn(2, 4, 8, 8))).all() and not recwarn.list  # the trained size: silent
    with pytest.warns(UserWarning, match="trained on 8x8 latents and is given 16x16"):
        y = lrm(torch.randn(2, 4, 16, 16))  # another multiple of the patch: scored, with a warning
    assert torch.isfinite(y).all()
    lrm(torch.randn(2, 4, 16, 16))
    assert not recwarn.list  # once per size


def test_lrm_refuses_non_finite_inputs():
    """Issue 17: NaN latents returned a (NaN) score."""
    from latent_rewards import LRMInputError

    lrm = _toy_lrm()
    x = torch.randn(3, 4, 8, 8)
    for bad in (float("nan"), float("inf")):
        x_bad = x.clone()
        x_bad[1, 2, 3, 4] = bad
        with pytest.raises(LRMInputError, match=r"latents of 1 of 3 samples \(rows \[1\]\) hold NaN or inf"):
            lrm(x_bad)
        with pytest.raises(LRMInputError, match="rows \\[1\\]"):
            lrm.predict(x_bad)
    x_bad.requires_grad_(True)  # on the differentiable path too
    with pytest.raises(LRMInputError, match="hold NaN or inf"):
        lrm(x_bad)
    lrm.check_finite = False  # the documented opt-out: the caller guards its own loss
    assert torch.isnan(lrm(x_bad)[1])

    tl = _toy_lrm("text-image-cnn")
    tok, mask = torch.randn(3, 32, 8), torch.ones(3, 32, dtype=torch.bool)
    assert torch.isfinite(tl(x, tok, mask)).all()
    tok_bad = tok.clone()
    tok_bad[2, 0, 0] = float("nan")
    with pytest.raises(LRMInputError, match=r"text embeddings of 1 of 3 samples \(rows \[2\]\)"):
        tl(x, tok_bad, mask)
    mask_bad = mask.clone()
    mask_bad[0] = False
    with pytest.raises(LRMInputError, match=r"text_mask of 1 of 3 samples \(rows \[0\]\) has no real token"):
        tl(x, tok, mask_bad)


def test_lrm_refuses_text_of_another_length_or_form(tmp_path):
    """Issue 17: 16-token text to an LRM trained on 32-token captions returned a score."""
    from latent_rewards import LRMInputError

    tl = _toy_lrm("text-image-cnn")
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(TextEncoderMismatchError, match="16 tokens per prompt, but LRM for 'r' was trained on 32-token "
                                                       r"embeddings .*TextEncoder\('toy-text', max_length=32\)"):
        tl(x, torch.randn(2, 16, 8), torch.ones(2, 16, dtype=torch.bool))
    with pytest.raises(LRMInputError, match=r"text_tokens \(B, L, D\) token embeddings"):
        tl(x, torch.randn(2, 8))  # a pooled vector: the head would take it as one token
    # fit records the token count it trained on, and the saved LRM holds it
    data = _text_data(n=60)
    lrm = fit(data, head="text-image-cnn", head_kwargs={"width": 16, "patch": 2}, steps=2, batch_size=8,
              eval_every=2, progress=False, out_dir=tmp_path / "t").lrm
    assert lrm.metadata["training_data"]["text_length"] == 6 == lrm.text_length
    back = LatentReward.from_pretrained(tmp_path / "t", check_finite=False)
    assert back.text_length == 6 and back.check_finite is False
    with pytest.raises(TextEncoderMismatchError, match="4 tokens per prompt"):
        back(data.latents[:2], data.text_tokens[:2, :4], data.text_mask[:2, :4])


def test_fit_refuses_data_it_cannot_learn_from():
    """Issue 17: empty and one-record caches gave raw tracebacks; NaN rewards or latents gave NaN weights."""
    from latent_rewards import LRMInputError

    kw = dict(head="image-cnn", head_kwargs={"width": 8, "patch": 2}, steps=2, batch_size=8, progress=False)
    data = _image_data(n=40)
    for n in (0, 1, 4):
        with pytest.raises(LRMInputError, match=f"need at least 5 records with a finite 'toy-linear' reward .*got {n}"):
            fit(data.subset(np.arange(n)), **kw)
    y = data.target.clone()
    y[3] = float("nan")
    with pytest.raises(LRMInputError, match="target of 1 of 40 records is NaN or inf"):
        fit(LatentData(data.latents, y, prompts=data.prompts), **kw)
    x = data.latents.clone()
    x[5, 0, 0, 0] = float("inf")
    with pytest.raises(LRMInputError, match="latents of 1 of 40 records hold NaN or inf"):
        fit(LatentData(x, data.target, prompts=data.prompts), **kw)
    with pytest.raises(LRMInputError, match=r"cannot take .* latents of shape \(4, 8, 8\): .*multiples of 3"):
        fit(data, **{**kw, "head_kwargs": {"width": 8, "patch": 3}})
    with pytest.raises(LRMInputError, match="at least 2 distinct prompts"):
        fit(LatentData(data.latents, data.target, prompts=["one prompt"] * 40), **kw)


@pytest.mark.parametrize("override, match", [
    ({"lr": -1.0}, "lr must be a positive learning rate"),
    ({"val_fraction": 1.5}, r"val_fraction must be in \(0, 1\)"),
    ({"head_kwargs": {"widht": 8}}, "no option 'widht' .did you mean 'width'"),
    ({"head_kwargs": {"patch": 0}}, "patch must be >= 1"),
    ({"device": "gpu"}, "device='gpu' is not a device .did you mean cuda.*auto, cpu, cuda, cuda:N"),
    ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
    ({"min_lr_ratio": 2.0}, r"min_lr_ratio must be in \[0, 1\]"),
    ({"warmup_steps": -1}, "warmup_steps must be >= 0"),
    ({"beta_start": 0.5, "beta_end": 0.1}, "beta_start <= beta_end"),
    ({"loss": "l1"}, "loss must be mse, mse\\+rank or rank"),
])
def test_fit_config_validation_names_the_fix(override, match):
    from latent_rewards import FitConfig
    from lrm.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        FitConfig(**override)
    with pytest.raises(ConfigError, match=match):  # fit(**overrides) goes through the same check, before any data
        fit(_image_data(n=10), **override)


def test_evaluate_refuses_fewer_than_three_records():
    """A one-record cache gave a raw ValueError from the metrics (`lrm evaluate`)."""
    from latent_rewards import LRMInputError

    lrm = _toy_lrm()
    data = LatentData(torch.randn(6, 4, 8, 8), torch.randn(6), reward_name="r", latent_space=SPACE.to_dict())
    assert evaluate(lrm, data)["num_samples"] == 6
    with pytest.raises(LRMInputError, match="need at least 3 records .* the data holds 1. Evaluate on a larger cache"):
        evaluate(lrm, data.subset([0]))
    with pytest.raises(LRMInputError, match=r"the held-out split holds 2. .*--split all"):
        evaluate(lrm, data, indices=np.array([0, 1]))
