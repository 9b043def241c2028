"""Head registry: every head builds, runs forward/backward, and behaves as documented."""

import pytest
import torch

from latent_rewards import create_lrm, list_lrms
from latent_rewards.heads.base import EnsembleLRM

TEXT_DIM = 16


def _inputs(name, B=3, T=4, C=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, C, 8, 8, generator=g) if "video" in name else torch.randn(B, C, 8, 8, generator=g)
    if not name.startswith("text"):
        return x, None, None
    tok = torch.randn(B, 5, TEXT_DIM, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]][:B], dtype=torch.bool)
    return x, tok, mask


def _small(name, **kw):
    kw = {"in_channels": 4, "width": 32, "patch": 2, **kw}
    if name.startswith("text"):
        kw.setdefault("text_dim", TEXT_DIM)
    return create_lrm(name, **kw)


def test_registry_lists_every_family():
    names = list_lrms()
    for n in ("image-cnn", "text-image-cnn", "text-image-cnn-paper", "video-frame-avg", "video-3d-cnn",
              "text-video-frame-avg", "text-video-3d-cnn"):
        assert n in names
    assert list_lrms("video-*") == ["video-3d-cnn", "video-frame-avg"]


def test_unknown_name_lists_available():
    with pytest.raises(KeyError, match="Available: .*image-cnn"):
        create_lrm("imag-cnn")


@pytest.mark.parametrize("ensemble", [1, 2])
@pytest.mark.parametrize("name", [n for n in list_lrms()])
def test_smoke_forward_backward_every_param_gets_grad(name, ensemble):
    torch.manual_seed(0)
    model = _small(name, ensemble=ensemble)
    assert isinstance(model, EnsembleLRM) == (ensemble > 1)
    x, tok, mask = _inputs(name)
    x.requires_grad_(True)
    y = model(x, tok, mask)
    assert y.shape == (3,) and torch.isfinite(y).all()
    (y * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {pname} got no gradient"
        if name != "text-image-cnn-paper":
            assert p.grad.abs().sum() > 0, f"{name}: {pname} got a zero gradient"
    if name != "text-image-cnn-paper":
        assert x.grad.abs().sum() > 0
    # A head built without timestep conditioning refuses t instead of ignoring it.
    with pytest.raises(ValueError, match="not noise-aware"):
        model(x, tok, mask, t=torch.full((3,), 500.0))


@pytest.mark.parametrize("name", [n for n in list_lrms()])
def test_timestep_conditioning_changes_output_with_t(name):
    torch.manual_seed(0)
    if name == "text-image-cnn-paper":  # its output ignores the latents: nothing to condition, so it refuses
        with pytest.raises(ValueError, match="cannot be timestep-conditioned.*use text-image-cnn"):
            _small(name, timestep_cond=True)
        assert _small(name, timestep_cond=False, timestep_emb_dim=64).timestep_cond is False
        return
    model = _small(name, timestep_cond=True, timestep_emb_dim=64)
    x, tok, mask = _inputs(name)
    # FiLM starts at zero: a fresh noise-aware head equals the clean head for every t.
    assert torch.allclose(model(x, tok, mask, t=torch.zeros(3)), model(x, tok, mask, t=torch.full((3,), 900.0)))
    torch.nn.init.normal_(model.film.out.weight, std=0.05)
    y0 = model(x, tok, mask, t=torch.zeros(3))
    y1 = model(x, tok, mask, t=torch.full((3,), 900.0))
    assert (y0 - y1).abs().max() > 1e-3
    assert torch.allclose(model(x, tok, mask), y0)  # t=None means clean (t = 0)
    y1.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_image_cnn_is_tab10_exactly():
    model = create_lrm("image-cnn", in_channels=12)
    assert sum(p.numel() for p in model.parameters()) == 189_441
    c1, c2 = model.trunk.blocks[0].conv, model.trunk.blocks[1].conv
    assert (c1.kernel_size, c1.stride, c1.padding, c1.out_channels) == ((4, 4), (4, 4), (1, 1), 128)
    assert (c2.kernel_size, c2.stride, c2.padding, c2.out_channels) == ((3, 3), (2, 2), (1, 1), 128)
    assert model(torch.randn(2, 12, 24, 40)).shape == (2,)


def test_text_image_paper_count_and_image_blindness():
    paper = create_lrm("text-image-cnn-paper", in_channels=12, text_dim=4096)
    assert sum(p.numel() for p in paper.parameters()) == 763_009  # Tab. 11 (Q/K/V without biases)
    torch.manual_seed(0)
    paper = _small("text-image-cnn-paper")
    x, tok, mask = _inputs("text-image-cnn-paper")
    y = paper(x, tok, mask)
    # The flaw of Tab. 11 as tabulated: softmax over one key is 1, so the image does not matter ...
    assert torch.allclose(y, paper(torch.randn_like(x) * 3, tok, mask), atol=1e-6)
    y.sum().backward()
    assert all(p.grad.abs().max() == 0 for p in paper.trunk.parameters())
    # ... while the text does.
    assert (y - paper(x, torch.randn_like(tok), mask)).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["text-image-cnn", "text-video-frame-avg", "text-video-3d-cnn"])
def test_text_heads_depend_on_both_image_and_text(name):
    torch.manual_seed(0)
    model = _small(name)
    x, tok, mask = _inputs(name)
    y = model(x, tok, mask)
    y_img = model(torch.randn_like(x), tok, mask)
    y_txt = model(x, torch.randn_like(tok), mask)
    assert (y - y_img).abs().min() > 1e-5
    assert (y - y_txt).abs().min() > 1e-5
    # padded text tokens are ignored
    tok2 = tok.clone()
    tok2[~mask] = 100.0
    assert torch.allclose(y, model(x, tok2, mask), atol=1e-5)


def test_frame_avg_is_order_blind_and_3d_is_not():
    torch.manual_seed(0)
    x, _, _ = _inputs("video-frame-avg", T=6)
    rev = x.flip(1)
    fa, v3 = _small("video-frame-avg"), _small("video-3d-cnn")
    assert torch.allclose(fa(x), fa(rev), atol=1e-5)
    assert (v3(x) - v3(rev)).abs().max() > 1e-4
    # frames are batched: one video's score does not depend on the other videos in the batch
    assert torch.allclose(fa(x)[:1], fa(x[:1]), atol=1e-5)


def test_ensemble_outputs():
    torch.manual_seed(0)
    x, _, _ = _inputs("image-cnn")
    mean = create_lrm("image-cnn", in_channels=4, width=16, patch=2, ensemble=3)
    assert isinstance(mean, EnsembleLRM) and len(mean.members) == 3
    members = torch.stack([m(x) for m in mean.members])  # (3, B)
    assert (members[0] - members[1]).abs().max() > 1e-4  # independent inits
    assert torch.allclose(mean(x), members.mean(0), atol=1e-6)
    mean.reduce = "std"
    assert torch.allclose(mean(x), members.std(0, unbiased=False), atol=1e-6)
    mean.reduce, mean.lam = "lcb", 2.0
    assert torch.allclose(mean(x), members.mean(0) - 2.0 * members.std(0, unbiased=False), atol=1e-6)
    with pytest.raises(ValueError, match="ensemble_reduce"):
        create_lrm("image-cnn", ensemble=2, ensemble_reduce="max")


def test_clear_input_errors():
    model = _small("image-cnn")
    with pytest.raises(ValueError, match="5 channels.*in_channels=4"):
        model(torch.randn(2, 5, 8, 8))
    with pytest.raises(ValueError, match="not text-conditioned"):
        model(torch.randn(2, 4, 8, 8), torch.randn(2, 3, TEXT_DIM))
    with pytest.raises(ValueError, match="pass text_emb"):
        _small("text-image-cnn")(torch.randn(2, 4, 8, 8))
    with pytest.raises(ValueError, match=r"\(B, T, C, H, W\) videos"):
        _small("video-3d-cnn")(torch.randn(2, 4, 8, 8))


def test_temporal_patch_and_coordinate_embedding():
    torch.manual_seed(0)
    model = _small("text-video-3d-cnn", temporal_patch=2)
    x, tok, mask = _inputs("text-video-3d-cnn", T=8)
    assert model.trunk.blocks[0].conv.kernel_size == (2, 2, 2)
    y = model(x, tok, mask)
    assert (y - model(x.flip(1), tok, mask)).abs().max() > 1e-4  # frame order matters
    plain = _small("text-image-cnn", pos_emb=False)
    assert plain.pos is None and _small("text-image-cnn").pos is not None


@pytest.mark.parametrize("name", [n for n in list_lrms()])
def test_heads_refuse_sizes_their_patch_does_not_divide(name):
    """Issue 17: 3x3 latents into a patch-2 head were scored on their top-left 2x2 (the patch conv drops the rest)."""
    from latent_rewards import LRMInputError

    model = _small(name, ensemble=2)
    x, tok, mask = _inputs(name)
    assert torch.isfinite(model(x, tok, mask)).all()  # 8x8: a multiple of the patch
    small = x[..., :3, :3]
    with pytest.raises(LRMInputError, match="3x3 do not fit its patch conv .* multiples of 2"):
        model(small, tok, mask)
    with pytest.raises(LRMInputError, match="1x1"):
        model(x[..., :1, :1], tok, mask)  # smaller than the patch: was a raw conv RuntimeError


def test_3d_heads_refuse_frame_counts_their_temporal_patch_does_not_divide():
    from latent_rewards import LRMInputError

    model = _small("video-3d-cnn", temporal_patch=2)
    x, _, _ = _inputs("video-3d-cnn", T=4)
    assert model(x).shape == (3,)
    with pytest.raises(LRMInputError, match="3 latent frames do not fit its temporal patch"):
        model(x[:, :3])
    _small("video-frame-avg")(x[:, :3])  # frame-averaging heads take any frame count


def test_bad_head_options_are_config_errors_that_name_the_fix():
    from lrm.config import ConfigError

    with pytest.raises(ConfigError, match=r"no option 'widht' \(did you mean 'width'\?\); its options: in_channels"):
        create_lrm("image-cnn", widht=8)
    with pytest.raises(ConfigError, match="no option 'widht'"):
        create_lrm("text-image-cnn-paper", widht=8, ensemble=2)
    with pytest.raises(ConfigError, match="head 'image-cnn': patch must be >= 1"):
        create_lrm("image-cnn", patch=0)
    with pytest.raises(ConfigError, match="ensemble must be >= 1"):
        create_lrm("image-cnn", ensemble=0)
