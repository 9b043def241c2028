"""`lrm finetune` on a diffusers pipeline (issue 16): prompt sources, text-encoder checks, evaluation that can fail
without losing the run. Uses the tiny random pipeline of bench/device/make_sd15_pipeline.py (the GPU bench builds the
same layout at SD-1.5 size)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.device.make_sd15_pipeline import build
from distill.builders import load_prompt_file
from distill.finetune import FinetuneConfig, build_finetune
from lrm.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["a red circle on a white background", "two blue squares on the left", "a green triangle moving up"]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    out = tmp_path_factory.mktemp("sd_tiny")
    build(out, tiny=True, device="cpu", verbose=False)
    return out


def _cfg(pipe, tmp_path, **kw):
    base = dict(method="direct", teacher=str(pipe), vae=str(pipe), vae_subfolder="vae", text_encoder=str(pipe),
                text_max_length=77, gold_reward="colorfulness", run_dir=str(tmp_path / "run"), device="cpu",
                batch_size=2, num_eval=4, eval_batch_size=2, steps=1, eval_every=0, ckpt_every=0, sample_every=0,
                num_sample_prompts=2, samples_per_prompt=1, progress=False, async_reward=False)
    base.update(kw)
    return FinetuneConfig(**base)


def test_prompt_files_txt_csv_jsonl(tmp_path):
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS[:2]) + "\n\n" + PROMPTS[2] + "\n")
    (tmp_path / "p.csv").write_text("id,caption\n" + "".join(f'{i},"{p}"\n' for i, p in enumerate(PROMPTS)))
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p, "seed": i}) + "\n"
                                              for i, p in enumerate(PROMPTS)))
    for name in ("p.txt", "p.csv", "p.jsonl"):
        assert load_prompt_file(tmp_path / name) == PROMPTS
    (tmp_path / "bad.csv").write_text("file,label\na.png,x\n")
    with pytest.raises(ConfigError, match="no column among"):
        load_prompt_file(tmp_path / "bad.csv")
    (tmp_path / "empty.jsonl").write_text('{"prompt": "a"}\n{"prompt": "  "}\n')
    with pytest.raises(ConfigError, match="empty prompt"):
        load_prompt_file(tmp_path / "empty.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a"\n')
    with pytest.raises(ConfigError, match="broken.jsonl:1 is not valid JSON"):
        load_prompt_file(tmp_path / "broken.jsonl")
    with pytest.raises(ConfigError, match="does not exist"):
        load_prompt_file(tmp_path / "missing.txt")


def test_diffusers_teacher_with_prompt_file(pipe, tmp_path):
    (tmp_path / "p.csv").write_text("prompt\n" + "\n".join(PROMPTS) + "\n")
    trainer = build_finetune(_cfg(pipe, tmp_path, prompt_file=str(tmp_path / "p.csv")), progress=False)
    assert trainer.pool.prompts == PROMPTS and trainer.pool.latents is None
    # the pipeline's CLIP at 77 tokens; latents of the pipeline's own size (UNet sample_size)
    assert tuple(trainer.pool.text_tokens.shape) == (3, 77, trainer.student.model.config.cross_attention_dim)
    assert trainer.latent_shape == (4, 16, 16)
    hist = trainer.train()
    assert trainer.step == 1 and torch.isfinite(torch.tensor(hist[-1]["eval_gold_reward"]))
    # student_fp16: the exported weights are fp16 on disk, fp32 (the fp16 values) when loaded back
    from safetensors.torch import load_file

    from distill.denoiser import Denoiser

    trainer.config.student_fp16 = True
    out = trainer.save_student(tmp_path / "student16")
    assert {v.dtype for v in load_file(out / "diffusion_pytorch_model.safetensors").values()} == {torch.float16}
    back = Denoiser.from_pretrained(out)
    for a, b in zip(trainer.student.model.parameters(), back.model.parameters()):
        assert b.dtype == torch.float32 and torch.equal(a.detach().half().float(), b)


def test_text_encoder_of_another_width_is_one_line_error(pipe, tmp_path):
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS))
    cmd = [sys.executable, "-m", "lrm.cli", "finetune", "--method", "direct", "--teacher", str(pipe), "--vae",
           str(pipe), "--vae_subfolder", "vae", "--prompt_file", str(tmp_path / "p.txt"), "--device", "cpu",
           "--run_dir", str(tmp_path / "run")]  # text_encoder left at MiniLM (384 wide); the UNet takes 32
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                            "PYTHONPATH": str(ROOT), "HOME": str(tmp_path)})
    assert r.returncode == 2, r.stderr[-2000:]
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("lrm finetune:")]  # (weight-loading bars aside)
    assert len(err) == 1 and "384" in err[0] and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_shapes_prompts_refused_for_a_real_teacher(pipe, tmp_path):
    with pytest.raises(ConfigError, match="set data_cache .* or prompt_file"):
        build_finetune(_cfg(pipe, tmp_path), progress=False)
    with pytest.raises(ConfigError, match="one prompt source"):
        _cfg(pipe, tmp_path, prompt_file="a.txt", data_cache="cache")


def test_cache_from_another_text_encoder_is_refused(pipe, tmp_path):
    from PIL import Image

    from data_cache import build_cache
    from data_cache.config import BuildCacheConfig, SourceConfig
    from shapes import ShapesWorld

    folder = tmp_path / "images"
    folder.mkdir()

    pixels, captions, _ = ShapesWorld(image_size=32).batch(list(range(4)))
    rows = []
    for i, (img, cap) in enumerate(zip(pixels, captions)):
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(folder / f"{i}.png")
        rows.append(f'{i}.png,"{cap}"')
    (folder / "captions.csv").write_text("file,caption\n" + "\n".join(rows) + "\n")
    cache = tmp_path / "cache"
    source = SourceConfig(type="folder", path=str(folder), num_samples=0)
    build_cache(BuildCacheConfig(out_dir=str(cache), source=source, vae=str(pipe), vae_subfolder="vae",
                                 text_encoder=str(pipe), text_max_length=20, rewards=["colorfulness"], device="cpu",
                                 progress=False, num_workers=1))
    # the cache's captions are 20 tokens long; the config asks for the 77-token null caption of the teacher
    with pytest.raises(ConfigError, match="max_length"):
        build_finetune(_cfg(pipe, tmp_path, data_cache=str(cache)), progress=False)
    trainer = build_finetune(_cfg(pipe, tmp_path, data_cache=str(cache), text_max_length=20), progress=False)
    assert trainer.pool.latents.shape == (4, 4, 8, 8) and trainer.pool.prompts == list(captions)


def test_failed_evaluation_keeps_the_checkpoint(pipe, tmp_path, caplog):
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS))
    trainer = build_finetune(_cfg(pipe, tmp_path, prompt_file=str(tmp_path / "p.txt"), steps=2), progress=False)
    calls = []

    def oom():
        calls.append(trainer.step)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 30.00 GiB")

    trainer.evaluate = oom
    trainer.train()
    assert calls == [0, 2]  # start and end were attempted
    assert trainer.step == 2 and (tmp_path / "run" / "checkpoint" / "state.safetensors").is_file()
    assert "evaluation at step 2 failed, training goes on" in caplog.text
    trainer2 = build_finetune(_cfg(pipe, tmp_path, prompt_file=str(tmp_path / "p.txt"), steps=2), progress=False)
    trainer2.load_checkpoint()
    for a, b in zip(trainer.student.model.parameters(), trainer2.student.model.parameters()):
        assert torch.equal(a, b)
