"""Cost of one VSD + CD + reward-fine-tuning generator step at Stable Diffusion 1.5 size (GPU), side by side:

  latent   L_FT through a latent reward head (``text-image-cnn`` on the 4x64x64 latents): no decoder in the graph
  pixel    L_FT through the decoder (AutoencoderKL, SD config) and an open_clip ViT-H-14 reward (HPSv2's backbone:
           cosine(image, text) after 224-px resize and CLIP normalisation), both differentiable, random weights

Everything else is the same ``DistillTrainer.generator_step()``: student, teacher (CFG 3.5 real score, CFG 7.5 CD
teacher, m = 5 steps), fake score, EMA target, all ``UNet2DConditionModel`` SD-1.5 configs with random weights,
64x64x4 latents, 77 x 768 text tokens. Reports median step time and peak GPU memory (total and above the
static weights/optimizer), and the ratios pixel / latent.

    PYTHONPATH=. python3 bench/distill_step_cost.py [--batch_size 4] [--bf16 1] [--grad_ckpt 0] [--out runs/bench]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def sd15_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(  # SD-1.5 UNet config (860M parameters)
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8)


def sd_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(  # SD VAE config (83M parameters; the decoder is ~50M)
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


class PixelClipReward(nn.Module):
    """latents -> Dec -> [0, 1] pixels -> 224 px, CLIP-normalised -> ViT-H-14 -> cosine with the prompt (B,)."""

    def __init__(self, vae, clip, text_features: torch.Tensor, bf16: bool):
        super().__init__()
        self.vae, self.clip = vae, clip
        self.register_buffer("text_features", F.normalize(text_features.float(), dim=-1))
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1))
        self.bf16 = bf16

    def forward(self, latents, text_tokens=None, text_mask=None):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16):
            x = self.vae.decode(latents / 0.18215).sample  # (B, 3, 512, 512)
            x = ((x.float() + 1) / 2).clamp(0, 1)
            x = F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False)
            f = self.clip.encode_image((x - self.mean) / self.std)
        f = F.normalize(f.float(), dim=-1)
        return (f * self.text_features[: f.shape[0]]).sum(-1)


class HeadReward(nn.Module):
    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, latents, text_tokens=None, text_mask=None):
        return self.head(latents.float(), text_tokens.float(), text_mask)


def measure(variant: str, args, device) -> dict:
    from distill.denoiser import Denoiser
    from distill.trainer import DistillConfig, DistillData, DistillTrainer
    from lrm.schedules import DDPMSchedule

    torch.manual_seed(0)
    B = args.batch_size
    teacher = Denoiser(sd15_unet(), DDPMSchedule(), "conjugate_v").to(device)
    n = max(4 * B, 16)
    data = DistillData(torch.randn(n, 4, 64, 64), torch.randn(n, 77, 768), torch.ones(n, 77, dtype=torch.bool),
                       [f"a photo of object {i}" for i in range(n)])
    if variant == "latent":
        from latent_rewards import create_lrm

        reward = HeadReward(create_lrm("text-image-cnn", in_channels=4, text_dim=768))
    else:
        import open_clip

        clip = open_clip.create_model("ViT-H-14", pretrained=None).to(device)
        tok = open_clip.get_tokenizer("ViT-H-14")
        with torch.no_grad():
            text = clip.encode_text(tok(data.prompts[:B]).to(device))
        reward = PixelClipReward(sd_vae().to(device), clip, text, bf16=args.bf16)
    n_reward = sum(p.numel() for p in reward.parameters())
    cfg = DistillConfig(run_dir=str(Path(args.out) / f"step_cost_{variant}"), device=str(device), batch_size=B,
                        use_vsd=True, use_cd=True, use_lrm_ft=True, cd_teacher_steps=args.cd_teacher_steps,
                        bf16=args.bf16, gradient_checkpointing=args.grad_ckpt, progress=False, tensorboard=False)
    tr = DistillTrainer(cfg, teacher, data, lrm=reward)
    # fixed prompt batch so the text features of the pixel reward line up with the captions
    fixed = tr.data.batch(torch.arange(B))  # on the trainer's device
    tr.sample_batch = lambda: fixed
    torch.cuda.synchronize()
    static = torch.cuda.memory_allocated()
    times = []
    for i in range(args.warmup + args.repeats):
        if i == args.warmup:
            torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        tr.generator_step()
        torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated()
    # optimizer states appear after the first step: "static" = weights + grads-free optimizer state now
    gc.collect()
    torch.cuda.synchronize()
    static_after = torch.cuda.memory_allocated()
    res = {"variant": variant, "batch_size": B, "step_seconds_median": sorted(times)[len(times) // 2],
           "step_seconds_all": times, "peak_gib": peak / 2**30, "static_gib": static_after / 2**30,
           "static_before_first_step_gib": static / 2**30, "activation_peak_gib": (peak - static_after) / 2**30,
           "reward_params_m": n_reward / 1e6,
           "unet_params_m": sum(p.numel() for p in teacher.model.parameters()) / 1e6}
    del tr, teacher, reward, data
    gc.collect()
    torch.cuda.empty_cache()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--bf16", type=int, default=1, help="bf16 autocast for every network (1/0)")
    ap.add_argument("--grad_ckpt", type=int, default=0, help="gradient checkpointing in the student (1/0)")
    ap.add_argument("--cd_teacher_steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="runs/bench")
    args = ap.parse_args()
    args.bf16, args.grad_ckpt = bool(args.bf16), bool(args.grad_ckpt)
    if not torch.cuda.is_available():
        raise SystemExit("distill_step_cost.py needs a CUDA GPU")
    device = torch.device("cuda")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    results = {}
    for variant in ("latent", "pixel"):
        try:
            results[variant] = measure(variant, args, device)
        except torch.OutOfMemoryError as e:
            results[variant] = {"variant": variant, "error": f"out of memory: {str(e).splitlines()[0]}"}
            gc.collect()
            torch.cuda.empty_cache()
        print(json.dumps(results[variant]), flush=True)
    lat, pix = results["latent"], results["pixel"]
    summary = {"device": torch.cuda.get_device_name(), "args": vars(args), "results": results}
    if "error" not in lat and "error" not in pix:
        summary["pixel_over_latent"] = {"step_time": pix["step_seconds_median"] / lat["step_seconds_median"],
                                        "peak_memory": pix["peak_gib"] / lat["peak_gib"],
                                        "activation_memory": pix["activation_peak_gib"] / lat["activation_peak_gib"]}
    (Path(args.out) / "distill_step_cost.json").write_text(json.dumps(summary, indent=2))
    print(f"\nOne VSD+CD+reward generator step, SD-1.5-size UNets, batch {args.batch_size}, 64x64x4 latents, "
          f"bf16={args.bf16}, grad_ckpt={args.grad_ckpt}, {summary['device']}")
    print("| reward path | reward params (M) | step s (median) | peak GiB | activation peak GiB |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in (("latent reward head", lat), ("decoder + ViT-H-14", pix)):
        if "error" in r:
            print(f"| {name} | - | {r['error']} | - | - |")
        else:
            print(f"| {name} | {r['reward_params_m']:.1f} | {r['step_seconds_median']:.3f} | {r['peak_gib']:.1f} | "
                  f"{r['activation_peak_gib']:.1f} |")
    if "pixel_over_latent" in summary:
        print("pixel / latent: " + ", ".join(f"{k} {v:.2f}x" for k, v in summary["pixel_over_latent"].items()))


if __name__ == "__main__":
    main()
