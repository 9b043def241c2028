"""Pretrained-reward adapters on tiny random models of the same classes: parity of our batched torch
preprocessing + scoring with each original per-image (PIL) path, batch invariance, gradients, offline errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from reward_adapters import create_reward
from reward_adapters.preprocess import OPENAI_MEAN, OPENAI_STD
from reward_adapters.weights import WeightsNotFoundError

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 64, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
PROMPTS = ["a red circle on the left", "two blue squares", "a photo of a cat", "a red circle on the left"]


def rel_close(a, b, rtol=1e-3):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.all(np.abs(a - b) <= rtol * np.maximum(np.abs(b), 1e-2 * np.abs(b).max()))


def quantized_images(n=4, h=80, w=96, seed=0):
    """Pixels that are exact multiples of 1/255, so the uint8 PIL path sees the same image."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, h // 8, w // 8, generator=g)
    x = torch.nn.functional.interpolate(base, size=(h, w), mode="bilinear", align_corners=False)
    return (x * 255).round() / 255


def to_pil(x):
    return Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def assert_image_spread(reward, x, ours, ref, tol):
    """The image matters for this random model, and ours vs ref differ by <= tol of the image-driven spread."""
    spread = float(np.ptp(reward(x, [PROMPTS[0]] * len(x)).numpy()))
    assert spread > 1e-3 * float(np.abs(ref).max()), spread
    diff = float(np.abs(ours.numpy() - np.asarray(ref)).max())
    assert diff <= tol * spread, (diff, spread)


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    import open_clip

    d = tmp_path_factory.mktemp("oc")
    (d / "lrm-tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(d / "lrm-tiny-clip.json")
    torch.manual_seed(0)
    model = open_clip.create_model("lrm-tiny-clip", pretrained=None).eval()
    return model, open_clip.get_tokenizer("lrm-tiny-clip")


# ---- HPSv2 --------------------------------------------------------------------------------------
def test_hpsv2_parity_with_package_path(tiny_open_clip, tmp_path):
    """hpsv2's own model factory + its val transform + its per-image loop vs our batched reward."""
    hps_oc = pytest.importorskip("hpsv2.src.open_clip", reason="hpsv2 not installed: run `make extras`")
    (tmp_path / "hps-tiny.json").write_text(json.dumps(TINY_CLIP))
    hps_oc.add_model_config(tmp_path / "hps-tiny.json")
    torch.manual_seed(1)
    ref_model, _, preprocess_val = hps_oc.create_model_and_transforms(
        "hps-tiny", None, precision="fp32", device="cpu", light_augmentation=True, output_dict=True)
    ref_model.eval()
    # The hpsv2 checkpoint layout loads into today's open_clip model (what weights=HPS_v2_compressed.pt does).
    ours_model = tiny_open_clip[0]
    missing, unexpected = ours_model.load_state_dict(ref_model.state_dict(), strict=False)
    assert [k for k in missing if k != "logit_bias"] == [] and unexpected == []
    tokenizer = hps_oc.get_tokenizer("hps-tiny")
    x = quantized_images(4, 80, 96)  # non-square: exercises resize-longest + zero pad
    ref = []
    with torch.no_grad():  # hpsv2.img_score.score, one image at a time (without its CUDA autocast)
        for img, p in zip(x, PROMPTS):
            out = ref_model(preprocess_val(to_pil(img)).unsqueeze(0), tokenizer([p]))
            ref.append(float((out["image_features"] @ out["text_features"].T).diagonal()[0]))
    reward = create_reward("hpsv2", model=ours_model, tokenizer=tokenizer)
    ours = reward(x, PROMPTS)
    assert rel_close(ours.numpy(), ref), (ours, ref)
    assert_image_spread(reward, x, ours, ref, 1e-2)
    assert reward.name == "hpsv2" and create_reward("hpsv2.1", model=ours_model).name == "hpsv2.1"


def test_hpsv2_pad_to_square_matches_definition(tiny_open_clip):
    r = create_reward("hpsv2", model=tiny_open_clip[0], tokenizer=tiny_open_clip[1])
    x = torch.rand(2, 3, 32, 64, generator=torch.Generator().manual_seed(0))
    # longest side already 64 -> untouched, not padded (hpsv2's ResizeMaxSize does the same)
    assert r.preprocess(x).shape == (2, 3, 32, 64)
    black = (torch.zeros(3) - torch.tensor(OPENAI_MEAN)) / torch.tensor(OPENAI_STD)
    # 48x96 -> resized to 32x64, then zero-padded with 16 rows each side
    pre2 = r.preprocess(torch.nn.functional.interpolate(x, size=(48, 96), mode="bilinear"))
    assert pre2.shape == (2, 3, 64, 64)
    assert torch.allclose(pre2[:, :, :16], black[None, :, None, None].expand(2, 3, 16, 64))
    assert torch.allclose(pre2[:, :, -16:], black[None, :, None, None].expand(2, 3, 16, 64))
    assert not torch.allclose(pre2[:, :, 16:17], black[None, :, None, None].expand(2, 3, 1, 64))


# ---- CLIP score / aesthetic (open_clip's own transform as the reference) ---------------------------
# PIL resamples uint8 images and rounds its output to uint8 (fixed-point): +-1/255 per pixel versus the
# float torch resize. Parity is exact where PIL does not resample (short side already at the model size:
# crop only) and within PIL's rounding where it does.
# "resampled": each score within 1% of the batch's score scale (random tiny models amplify the +-1/255 noise).
CASES = [((64, 90), "exact"), ((77, 90), "resampled")]


def parity(ours, ref, case):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if case == "exact":
        return rel_close(ours, ref, 1e-4)
    return np.all(np.abs(ours - ref) <= 1e-2 * np.abs(ref).max())


def test_resize_matches_pil_within_uint8_rounding():
    from reward_adapters.preprocess import resize_shortest_center_crop

    x = quantized_images(4, 72, 100, seed=2)
    ref = torch.stack([T.Compose([T.Resize(64, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(64),
                                  T.ToTensor()])(to_pil(i)) for i in x])
    d = (resize_shortest_center_crop(x, 64) - ref).abs() * 255
    assert d.max() < 1.1 and d.mean() < 0.4
    d_q = ((resize_shortest_center_crop(x, 64) * 255).round() - ref * 255).abs()
    assert d_q.max() <= 1.0 + 1e-4  # after rounding, at most one uint8 level (PIL's fixed-point)


@pytest.mark.parametrize("size,case", CASES)
def test_clip_score_parity_with_open_clip_transform(tiny_open_clip, size, case):
    import open_clip

    model, tok = tiny_open_clip
    _, _, preprocess = open_clip.create_model_and_transforms("lrm-tiny-clip", pretrained=None)
    x = quantized_images(4, *size, seed=2)
    with torch.no_grad():
        ref = []
        for img, p in zip(x, PROMPTS):
            f = torch.nn.functional.normalize(model.encode_image(preprocess(to_pil(img))[None]), dim=-1)
            t = torch.nn.functional.normalize(model.encode_text(tok([p])), dim=-1)
            ref.append(100 * float((f * t).sum()))
    r = create_reward("clip-score", model=model, tokenizer=tok)
    ours = r(x, PROMPTS)
    assert parity(ours.numpy(), ref, case), (ours, ref)
    assert_image_spread(r, x, ours, ref, 1e-3 if case == "exact" else 5e-2)
    clipped = create_reward("clip-score", model=model, tokenizer=tok, clip_negative=True)(x, PROMPTS)
    assert torch.equal(clipped, ours.clamp_min(0))


@pytest.mark.parametrize("size,case", CASES)
def test_aesthetic_parity_and_heads(tiny_open_clip, size, case):
    import open_clip

    from reward_adapters.aesthetic import AestheticMLP

    model, _ = tiny_open_clip
    _, _, preprocess = open_clip.create_model_and_transforms("lrm-tiny-clip", pretrained=None)
    torch.manual_seed(0)
    mlp, lin = AestheticMLP(16).eval(), torch.nn.Linear(16, 1)
    torch.nn.init.constant_(lin.bias, 5.0)  # scores around 5, as the real 1-10 scale
    torch.nn.init.constant_(mlp.layers[7].bias, 5.0)
    x = quantized_images(3, *size, seed=3)
    with torch.no_grad():
        emb = torch.cat([torch.nn.functional.normalize(model.encode_image(preprocess(to_pil(i))[None]), dim=-1)
                         for i in x])
        ref_mlp, ref_lin = mlp(emb).squeeze(-1), lin(emb).squeeze(-1)
    a = create_reward("aesthetic", model=model, head_module=mlp)
    a1 = create_reward("aesthetic-v1", model=model, head_module=lin, scale=0.1)
    assert parity(a(x).numpy(), ref_mlp.numpy(), case)
    assert parity(a1(x).numpy(), 0.1 * ref_lin.numpy(), case)
    assert a.modality == "image" and a1.name == "aesthetic-v1"
    assert set(dict(mlp.state_dict())) == {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}


# ---- PickScore (transformers' CLIP processor as the reference) --------------------------------------
@pytest.fixture(scope="module")
def tiny_hf_clip():
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, eos_token_id=49407),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=64, patch_size=16),
        projection_dim=16)
    return CLIPModel(cfg).eval()


@pytest.mark.parametrize("size,case", [((64, 91), "exact"), ((77, 90), "resampled")])
def test_pickscore_parity_with_hf_processor(tiny_hf_clip, tiny_open_clip, size, case):
    from transformers import CLIPImageProcessor

    tok = tiny_open_clip[1]  # the CLIP BPE vocabulary (same ids as the HF CLIP tokenizer)
    proc = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64},
                              image_mean=list(OPENAI_MEAN), image_std=list(OPENAI_STD))
    x = quantized_images(4, *size, seed=4)  # 91: odd crop margin, HF floors the offset
    m = tiny_hf_clip
    with torch.no_grad():
        pv = proc(images=[to_pil(i) for i in x], return_tensors="pt")["pixel_values"]
        img = m.get_image_features(pixel_values=pv)
        img = img if isinstance(img, torch.Tensor) else img.pooler_output
        txt = m.get_text_features(input_ids=tok(PROMPTS))
        txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
        ref = m.logit_scale.exp() * (torch.nn.functional.normalize(img, dim=-1)
                                     * torch.nn.functional.normalize(txt, dim=-1)).sum(-1)
    r = create_reward("pickscore", model=m, tokenizer=tok)
    ours = r(x, PROMPTS)
    assert parity(ours.numpy(), ref.numpy(), case), (ours, ref)
    assert_image_spread(r, x, ours, ref.numpy(), 1e-3 if case == "exact" else 5e-2)


# ---- ImageReward (the package's torchvision transform as the reference) -----------------------------
@pytest.fixture(scope="module")
def tiny_imagereward(tmp_path_factory):
    from transformers import BertTokenizer, BlipTextConfig, BlipVisionConfig

    from reward_adapters.imagereward import ImageRewardModel

    words = "a red circle on the left two blue squares photo of cat".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(words))
    d = tmp_path_factory.mktemp("bert")
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizer(str(d / "vocab.txt"))
    torch.manual_seed(0)
    vc = BlipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          image_size=64, patch_size=16, layer_norm_eps=1e-6, initializer_range=0.02)
    tc = BlipTextConfig(vocab_size=len(vocab), hidden_size=32, encoder_hidden_size=32, intermediate_size=64,
                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64)
    model = ImageRewardModel(vc, tc).eval()
    for p in model.mlp.parameters():  # the released head's init scale makes random outputs ~0; widen them
        torch.nn.init.normal_(p, std=0.3)
    return model, tok


@pytest.mark.parametrize("size,case", CASES)
def test_imagereward_parity_with_package_transform(tiny_imagereward, size, case):
    model, tok = tiny_imagereward
    # image-reward 1.5 ImageReward._transform(n_px) and .score(): one PIL image at a time.
    transform = T.Compose([T.Resize(64, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(64),
                           lambda im: im.convert("RGB"), T.ToTensor(), T.Normalize(OPENAI_MEAN, OPENAI_STD)])
    x = quantized_images(4, *size, seed=5)
    ref = []
    with torch.no_grad():
        for img, p in zip(x, PROMPTS):
            t = tok(p, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
            raw = model(transform(to_pil(img))[None], t.input_ids, t.attention_mask)
            ref.append(float((raw - 0.16717362830052426) / 1.0333394966054072))
    r = create_reward("imagereward", model=model, tokenizer=tok)
    ours = r(x, PROMPTS)
    # The image matters (cross-attention is live), and the agreement is tight against the image-driven spread
    # too, not only against the large image-independent offset of a random model.
    spread = float(np.ptp(r(x, [PROMPTS[0]] * 4).numpy()))
    assert spread > 1e-3 * float(ours.abs().max())
    diff = float(np.abs(ours.numpy() - np.array(ref)).max())
    assert diff <= (1e-3 if case == "exact" else 1e-2) * spread, (diff, spread)
    assert parity(ours.numpy(), ref, case), (ours, ref)
    assert r.tokens(["a red circle"])[0].shape == (1, 35)


def test_imagereward_checkpoint_conversion(tiny_imagereward):
    from reward_adapters.imagereward import ImageRewardModel, convert_imagereward_state_dict

    model, _ = tiny_imagereward
    # Rebuild the original BLIP key names from ours, convert back, and load strictly.
    inv = {}
    for k, v in model.state_dict().items():
        o = (k.replace("visual.embeddings.class_embedding", "blip.visual_encoder.cls_token")
             .replace("visual.embeddings.position_embedding", "blip.visual_encoder.pos_embed")
             .replace("visual.embeddings.patch_embedding.", "blip.visual_encoder.patch_embed.proj.")
             .replace("visual.post_layernorm.", "blip.visual_encoder.norm.")
             .replace("visual.encoder.layers.", "blip.visual_encoder.blocks.")
             .replace(".layer_norm1.", ".norm1.").replace(".layer_norm2.", ".norm2.")
             .replace(".self_attn.qkv.", ".attn.qkv.").replace(".self_attn.projection.", ".attn.proj."))
        if o.startswith("text."):
            o = "blip.text_encoder." + o[5:]
        inv[o] = v
    inv["blip.vision_proj.weight"] = torch.zeros(1)  # unused BLIP heads are dropped
    conv = convert_imagereward_state_dict(inv)
    fresh = ImageRewardModel(model.visual.config, model.text.config).eval()
    fresh.load_state_dict(conv, strict=True)
    x = quantized_images(2, 64, 64)
    ids = torch.ones(2, 35, dtype=torch.long)
    assert torch.allclose(fresh(x, ids, torch.ones_like(ids)), model(x, ids, torch.ones_like(ids)))


# ---- common behaviour -------------------------------------------------------------------------------
def _all_tiny(tiny_open_clip, tiny_hf_clip, tiny_imagereward):
    from reward_adapters.aesthetic import AestheticMLP

    oc, tok = tiny_open_clip
    return {
        "hpsv2": create_reward("hpsv2", model=oc, tokenizer=tok),
        "clip-score": create_reward("clip-score", model=oc, tokenizer=tok),
        "aesthetic": create_reward("aesthetic", model=oc, head_module=AestheticMLP(16)),
        "pickscore": create_reward("pickscore", model=tiny_hf_clip, tokenizer=tok),
        "imagereward": create_reward("imagereward", model=tiny_imagereward[0], tokenizer=tiny_imagereward[1]),
    }


def test_batch_invariance_gradients_and_prompts(tiny_open_clip, tiny_hf_clip, tiny_imagereward):
    x = torch.rand(4, 3, 48, 48, generator=torch.Generator().manual_seed(7))
    for name, r in _all_tiny(tiny_open_clip, tiny_hf_clip, tiny_imagereward).items():
        assert r.differentiable
        full = r(x, PROMPTS)
        single = torch.cat([r(x[i:i + 1], PROMPTS[i:i + 1]) for i in range(4)])
        assert torch.allclose(full, single, rtol=1e-4, atol=1e-5), name
        xg = x.clone().requires_grad_(True)
        r(xg, PROMPTS).sum().backward()
        assert xg.grad is not None and xg.grad.abs().sum() > 0, name
        if r.needs_prompts:
            with pytest.raises(ValueError, match="prompts are required"):
                r(x)
        # videos: frames scored in one batch and averaged
        v = torch.stack([x, x.flip(0)], dim=1)  # (4, 2, 3, H, W)
        assert torch.allclose(r(v, PROMPTS), (full + r(x.flip(0), PROMPTS)) / 2, rtol=1e-4, atol=1e-5), name


def test_missing_weights_error_names_file_and_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("LRM_CACHE_DIR", str(tmp_path))
    with pytest.raises(WeightsNotFoundError) as e:
        create_reward("hpsv2")
    msg = str(e.value)
    assert "HPS_v2_compressed.pt" in msg and str(tmp_path) in msg and "xswu/HPSv2" in msg and "weights=" in msg
    with pytest.raises(WeightsNotFoundError, match="sac\\+logos\\+ava1-l14-linearMSE.pth"):
        from reward_adapters.aesthetic import AestheticReward

        AestheticReward(model=torch.nn.Identity())
    with pytest.raises(WeightsNotFoundError, match="ImageReward.pt"):
        create_reward("imagereward")


def test_weights_resolve_from_cache_dir_and_path(monkeypatch, tmp_path):
    from safetensors.torch import save_file

    from reward_adapters.aesthetic import AestheticReward

    monkeypatch.setenv("LRM_CACHE_DIR", str(tmp_path))
    (tmp_path / "aesthetic").mkdir()
    torch.manual_seed(0)
    head = torch.nn.Linear(768, 1)
    # the released file name and format (a torch state dict, read with weights_only=True)
    torch.save(head.state_dict(), tmp_path / "aesthetic" / "sa_0_4_vit_l_14_linear.pth")
    r = AestheticReward(head="v1", model=torch.nn.Identity())
    assert torch.equal(r.head.weight, head.weight)
    head2 = torch.nn.Linear(768, 1)
    save_file(head2.state_dict(), str(tmp_path / "head.safetensors"))
    r2 = AestheticReward(head="v1", head_weights=str(tmp_path / "head.safetensors"), model=torch.nn.Identity())
    assert torch.equal(r2.head.weight, head2.weight)
