"""The Shapes teacher recipe: objective, a few CPU steps end to end, loadable shipped weights."""

import pytest
import torch

from distill.denoiser import Denoiser
from distill.models import load_shapes_teacher, shapes_image_unet, shapes_video_unet
from distill.parameterization import to_x0
from distill.train_teacher import TrainTeacherConfig, teacher_loss, train_teacher
from lrm.schedules import DDPMSchedule


def test_teacher_loss_is_conjugate_v_mse_and_decreases_on_fixed_batch():
    torch.manual_seed(0)
    d = Denoiser(shapes_image_unet(width=16, heads=4, norm_num_groups=16, text_dim=24), DDPMSchedule(),
                 "conjugate_v")
    x0 = torch.randn(8, 4, 8, 8)
    tok, mask = torch.randn(8, 5, 24), torch.ones(8, 5, dtype=torch.bool)
    # hand-computed: same generator draws t then eps
    g = torch.Generator().manual_seed(7)
    t = torch.randint(0, 1000, (8,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    a, b = d.schedule.a(t).view(-1, 1, 1, 1), d.schedule.b(t).view(-1, 1, 1, 1)
    x_t = a * x0 + b * eps
    with torch.no_grad():
        ref = ((d(x_t, t, tok, mask) - (x0 - eps)) ** 2).mean()
        got = teacher_loss(d, x0, tok, mask, torch.Generator().manual_seed(7))
    assert torch.allclose(got, ref, rtol=1e-5)
    # a perfect prediction has zero loss and recovers x0 exactly (Eq. 15)
    assert torch.allclose(to_x0(x0 - eps, x_t, t, d.schedule, "conjugate_v"), x0, atol=1e-5)
    opt = torch.optim.Adam(d.parameters(), lr=2e-3)
    losses = []
    for _ in range(8):
        loss = teacher_loss(d, x0, tok, mask, torch.Generator().manual_seed(7))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0], losses


def test_teacher_unets_fit_the_shipping_budget():
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    total_fp16_mb = 2 * (n(shapes_image_unet()) + n(shapes_video_unet())) / 1e6
    assert total_fp16_mb <= 12.0, total_fp16_mb


@pytest.mark.parametrize("kind", ["image", "video"])
def test_train_teacher_recipe_tiny_cpu(tmp_path, monkeypatch, kind):
    import distill.models

    cfg = TrainTeacherConfig(kind=kind, out_dir=str(tmp_path / "run"), width=8 if kind == "video" else 16,
                             num_samples=8, num_frames=4, steps=3, batch_size=4, eval_samples=2, eval_steps=2,
                             guidance_scales=[3.5], workers=1, device="cpu", save_every=2)
    out = train_teacher(cfg)
    run = tmp_path / "run"
    for f in ("config.json", "diffusion_pytorch_model.safetensors", "denoiser.json", "null_text.safetensors"):
        assert (out / f).exists(), f
    assert (run / "samples.png").exists() and (run / "checkpoint" / "state.json").exists()
    from lrm.io import read_json

    m = read_json(run / "metrics.json")
    assert m["steps"] == 3 and m["kind"] == kind and len(m["loss_curve_every_50"]) >= 1
    assert 0 <= m["cfg_3.5"]["shapes-adherence"] <= 1 and m["real_data"]["shapes-adherence"] > 0.7
    if kind == "video":
        assert "shapes-direction" in m["cfg_3.5"]
    # the shipped weights load through load_shapes_teacher (fp16 on disk, fp32 in memory)
    monkeypatch.setattr(distill.models, "WEIGHTS_DIR", tmp_path / "weights")
    with pytest.raises(FileNotFoundError, match="train-teacher"):
        load_shapes_teacher(kind)
    (tmp_path / "weights").mkdir()
    out.rename(tmp_path / "weights" / f"teacher-{kind}")
    d = load_shapes_teacher(kind)
    assert d.parameterization == "conjugate_v" and d.is_video == (kind == "video") and d.dtype == torch.float32
    assert d.null_mask.sum() == 2  # MiniLM's "" = [CLS] [SEP]
    x = torch.randn((1, 4, 4, 8, 8) if kind == "video" else (1, 4, 8, 8))
    with torch.no_grad():
        assert torch.isfinite(d.x0(x, 500, torch.randn(1, 32, 384), guidance_scale=3.5)).all()


def test_train_teacher_init_from_a_saved_teacher(tmp_path):
    from safetensors.torch import load_file

    kw = dict(kind="image", num_samples=8, steps=2, batch_size=4, eval_samples=2, eval_steps=2,
              guidance_scales=[1.0], workers=1, device="cpu")
    first = train_teacher(TrainTeacherConfig(out_dir=str(tmp_path / "a"), width=16, **kw))
    # lr 0: the run's weights stay those it started from, so the saved teacher equals the one it was given
    again = train_teacher(TrainTeacherConfig(out_dir=str(tmp_path / "b"), width=16, lr=0.0, init_from=str(first),
                                             **kw))
    w0 = load_file(first / "diffusion_pytorch_model.safetensors")
    w1 = load_file(again / "diffusion_pytorch_model.safetensors")
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    fresh = train_teacher(TrainTeacherConfig(out_dir=str(tmp_path / "c"), width=16, lr=0.0, **kw))
    w2 = load_file(fresh / "diffusion_pytorch_model.safetensors")
    assert not all(torch.equal(w0[k], w2[k]) for k in w0)  # without init_from the start is a new random init
    with pytest.raises(ValueError, match="config differs"):
        train_teacher(TrainTeacherConfig(out_dir=str(tmp_path / "d"), width=8, init_from=str(first), **kw))


def test_temporal_pos_embed_changes_the_video_unet_and_survives_save_load(tmp_path):
    import json

    from distill.models import add_temporal_pos_embed, temporal_pos_embed
    from distill.train_teacher import init_weights

    torch.manual_seed(0)
    plain = shapes_video_unet(width=8, heads=8, norm_num_groups=8, text_dim=16)
    with_pe = shapes_video_unet(width=8, heads=8, norm_num_groups=8, text_dim=16, temporal_pos_embed=32)
    assert temporal_pos_embed(plain) == 0 and temporal_pos_embed(with_pe) == 32
    assert plain.state_dict().keys() == with_pe.state_dict().keys()  # fixed embeddings, not in the weights
    with_pe.load_state_dict(plain.state_dict())
    x, tok = torch.randn(2, 4, 6, 8, 8), torch.randn(2, 3, 16)  # (B, C, T, h, w) as diffusers takes it
    with torch.no_grad():
        a = plain(x, 500, encoder_hidden_states=tok).sample
        b = with_pe(x, 500, encoder_hidden_states=tok).sample
    assert not torch.allclose(a, b, atol=1e-4)  # the frame index now reaches the temporal attention

    d = Denoiser(with_pe, DDPMSchedule(), "conjugate_v")
    d.save_pretrained(tmp_path / "t")
    meta = json.loads((tmp_path / "t" / "denoiser.json").read_text())
    assert meta["temporal_pos_embed"] == 32
    xv, m = torch.randn(2, 6, 4, 8, 8), torch.ones(2, 3, dtype=torch.bool)  # Denoiser layout (B, T, C, h, w)
    loaded = Denoiser.from_pretrained(tmp_path / "t")
    assert temporal_pos_embed(loaded.model) == 32
    with torch.no_grad():
        assert torch.equal(d(xv, torch.tensor([500, 500]), tok, m), loaded(xv, torch.tensor([500, 500]), tok, m))
    # an init_from teacher must have the same temporal embeddings as the run's network
    with pytest.raises(ValueError, match="temporal_pos_embed"):
        init_weights(plain, shapes_video_unet(width=8, heads=8, norm_num_groups=8, text_dim=16), tmp_path / "t",
                     "cpu")
    with pytest.raises(ValueError, match="no temporal transformer"):
        add_temporal_pos_embed(shapes_image_unet(width=16, heads=4, norm_num_groups=16, text_dim=16), 16)
    # the recipe's option builds and ships it
    cfg = TrainTeacherConfig(kind="video", out_dir=str(tmp_path / "run"), width=8, num_samples=4, num_frames=4,
                             steps=1, batch_size=2, eval_samples=2, eval_steps=2, guidance_scales=[1.0], workers=1,
                             device="cpu", temporal_pos_embed=True)
    out = train_teacher(cfg)
    assert json.loads((out / "denoiser.json").read_text())["temporal_pos_embed"] == 64
    assert temporal_pos_embed(Denoiser.from_pretrained(out).model) == 64


def test_flow_teacher_loss_is_the_rectified_flow_velocity_mse():
    from lrm.schedules import FlowSchedule

    torch.manual_seed(0)
    d = Denoiser(shapes_image_unet(width=16, heads=4, norm_num_groups=16, text_dim=24), FlowSchedule(), "flow")
    x0 = torch.randn(8, 4, 8, 8)
    tok, mask = torch.randn(8, 5, 24), torch.ones(8, 5, dtype=torch.bool)
    g = torch.Generator().manual_seed(7)
    t = torch.randint(0, 1000, (8,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    s = (t.float() / 1000).view(-1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * eps  # rectified flow (SD3 / Wan), by hand
    with torch.no_grad():
        ref = ((d(x_t, t, tok, mask) - (eps - x0)) ** 2).mean()
        got = teacher_loss(d, x0, tok, mask, torch.Generator().manual_seed(7))
    assert torch.allclose(got, ref, rtol=1e-5)


def test_train_a_flow_teacher_tiny_cpu(tmp_path):
    """`lrm shapes train-teacher --parameterization flow`: a rectified-flow teacher that saves, loads with its flow
    schedule, and samples (the evaluation's DDIM on the flow schedule)."""
    from lrm.io import read_json

    cfg = TrainTeacherConfig(kind="video", parameterization="flow", out_dir=str(tmp_path / "run"), width=8,
                             num_samples=8, num_frames=4, steps=3, batch_size=4, eval_samples=2, eval_steps=2,
                             guidance_scales=[3.5], workers=1, device="cpu")
    out = train_teacher(cfg)
    d = Denoiser.from_pretrained(out)
    assert d.parameterization == "flow" and d.schedule.kind == "flow" and d.is_video
    m = read_json(tmp_path / "run" / "metrics.json")
    assert m["steps"] == 3 and all(torch.isfinite(torch.tensor(m["loss_curve_every_50"])))
    assert 0 <= m["cfg_3.5"]["shapes-adherence"] <= 1
    with pytest.raises(ValueError, match="not one of"):
        TrainTeacherConfig(parameterization="velocity")


def test_shipped_flow_video_teacher_is_a_rectified_flow_denoiser():
    """``teacher: shapes-video-flow`` (issue 18): the shipped rectified-flow Shapes video teacher, same network as the
    DDPM one, velocity target on the flow schedule; its null caption is MiniLM's "" (re-encoded off the device)."""
    from types import SimpleNamespace

    from distill.builders import build_teacher
    from lrm.schedules import FlowSchedule
    from lrm.text import TextEncoder

    d = build_teacher(SimpleNamespace(teacher="shapes-video-flow"), "cpu")
    ddpm = load_shapes_teacher("video")
    assert d.parameterization == "flow" and isinstance(d.schedule, FlowSchedule) and d.is_video
    arch = [{k: v for k, v in t.model.config.items() if not k.startswith("_")} for t in (d, ddpm)]
    assert type(d.model) is type(ddpm.model) and arch[0] == arch[1]
    assert torch.equal(d.null_tokens, TextEncoder("all-MiniLM-L6-v2")([""]).tokens)
    x = torch.randn(1, 16, 4, 8, 8)
    with torch.no_grad():
        assert torch.isfinite(d.x0(x, 500, torch.randn(1, 32, 384), guidance_scale=3.5)).all()
    with pytest.raises(ValueError, match="video-flow"):
        load_shapes_teacher("flow")
