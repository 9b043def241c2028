"""GPU: rewards computed on CUDA agree with CPU (tiny random models; weight-free and Shapes rewards)."""

import json

import pytest
import torch

from reward_adapters import create_reward

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


def test_weight_free_on_cuda_match_cpu():
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    v = torch.rand(2, 6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for name, inp in [("colorfulness", x), ("sharpness", x), ("brightness", x), ("jpeg-compressibility", x),
                      ("temporal-flickering", v)]:
        cpu = create_reward(name)(inp)
        gpu_r = create_reward(name, device="cuda")
        out = gpu_r(inp.cuda())
        assert out.device.type == "cuda" and out.dtype == torch.float32
        assert torch.allclose(out.cpu(), cpu, rtol=1e-4, atol=1e-4), name


def test_open_clip_reward_on_cuda_matches_cpu_and_moves(tmp_path):
    import open_clip

    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 64, "layers": 1, "width": 32, "head_width": 16,
                                           "patch_size": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "gpu-tiny.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "gpu-tiny.json")
    torch.manual_seed(0)
    model = open_clip.create_model("gpu-tiny", pretrained=None)
    tok = open_clip.get_tokenizer("gpu-tiny")
    x = torch.rand(4, 3, 96, 80, generator=torch.Generator().manual_seed(0))
    prompts = ["a", "b c", "d e f", "a"]
    r = create_reward("hpsv2", model=model, tokenizer=tok)
    cpu = r(x, prompts)
    r = r.to("cuda")
    assert r.device.type == "cuda"
    gpu = r(x.cuda(), prompts)
    assert torch.allclose(gpu.cpu(), cpu, rtol=1e-3, atol=1e-4)
    r16 = create_reward("hpsv2", model=model, tokenizer=tok, device="cuda", precision="bf16")
    assert torch.allclose(r16(x.cuda(), prompts).cpu(), cpu, atol=2e-2)
