"""Peak GPU memory and step time of LRM vs DDPO vs direct reward-gradient fine-tuning at real model sizes (issue 7).

Random weights, one run, side by side, each method through ``FinetuneTrainer.train_step`` (the real code path):
- image: SD-1.5-sized ``UNet2DConditionModel`` (860M), 64x64x4 latents, SD ``AutoencoderKL`` decoder (512x512),
  pixel reward = a ViT-H-14 image tower (open_clip architecture, random weights: the HPSv2 backbone, PAPER_NOTES
  Tab. 1) scored as cosine to a fixed text feature; LRM = ``image-cnn`` head on the latents.
- video: ``UNet3DConditionModel`` (ModelScope-sized), latents (T, 4, 24, 40) = 192x320 pixels, T = 16 / 64 / 128;
  same decoder and reward per frame; LRM = ``video-frame-avg`` head. Direct gradient with all frames and with
  first/middle/last frame subsampling. Gradient checkpointing on for every video method.
Student weights fp32 + AdamW, bf16 autocast for the networks. A step that runs out of memory is reported as OOM.
``peak`` is torch.cuda.max_memory_allocated during the timed step; ``act`` = peak - memory held before the step
(weights, optimizer state, frozen models), i.e. what the method itself adds.

    PYTHONPATH=. python3 bench/finetune_memory.py                       # everything (~5-8 min on an H100)
    PYTHONPATH=. python3 bench/finetune_memory.py --only image --steps 2
"""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

import torch
import torch.nn.functional as F


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="image,video", help="comma list of image, video")
    p.add_argument("--frames", default="16,64,128", help="video frame counts")
    p.add_argument("--batch", type=int, default=1, help="samples per step (image and video)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per method (after one warm-up step)")
    p.add_argument("--out", default="runs/bench-finetune-memory")
    return p.parse_args()


def make_reward(device):
    """A differentiable ViT-H-14 image reward with random weights (HPSv2's architecture and preprocessing)."""
    import open_clip

    from reward_adapters import Reward

    class RandomViTH14(Reward):
        name = "random-vit-h-14"
        version = "random-weights"
        modality = "image"
        differentiable = True

        def __init__(self, device):
            super().__init__(device=device)
            torch.manual_seed(0)
            model = open_clip.create_model("ViT-H-14", pretrained=None)
            self.visual = model.visual.to(device, torch.bfloat16).eval().requires_grad_(False)
            del model
            self.register_buffer("text", F.normalize(torch.randn(1, self.visual.output_dim), dim=-1).to(device))
            mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]  # OpenAI CLIP
            self.register_buffer("mean", torch.tensor(mean, device=device)[:, None, None])
            self.register_buffer("std", torch.tensor(std, device=device)[:, None, None])

        def score_images(self, pixels, prompts):
            x = F.interpolate(pixels.to(self.device).float(), size=(224, 224), mode="bicubic", align_corners=False)
            x = ((x - self.mean) / self.std).to(torch.bfloat16)
            f = F.normalize(self.visual(x).float(), dim=-1)
            return (f * self.text).sum(-1)

    return RandomViTH14(device)


def make_vae(device):
    from diffusers import AutoencoderKL

    from lrm.latent_space import VAE

    torch.manual_seed(0)
    ae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                       down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                       layers_per_block=2, sample_size=512)
    return VAE(ae.to(device), vae_id="random-sd-vae", scaling_factor=0.18215, chunk_size=16, autocast_bf16=True)


def make_unet(kind: str):
    from diffusers import UNet2DConditionModel, UNet3DConditionModel

    torch.manual_seed(0)
    if kind == "image":  # SD-1.5 config
        return UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                                    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                                    attention_head_dim=8), 768
    # ModelScope text-to-video (diffusers' UNet3DConditionModel defaults)
    return UNet3DConditionModel(sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
                                block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=1024,
                                attention_head_dim=64), 1024


def run_one(kind, method, variant, init, dim, latent_shape, vae, reward, lrm, args, device) -> dict:
    from distill.finetune import FinetuneConfig, FinetuneTrainer, PromptPool

    B = args.batch
    g = torch.Generator().manual_seed(0)
    pool = PromptPool(torch.randn(4, 77, dim, generator=g), torch.ones(4, 77, dtype=torch.bool),
                      [f"prompt {i}" for i in range(4)])
    ckpt = variant.get("checkpointing", kind == "video")
    cfg = FinetuneConfig(method=method, run_dir=str(Path(args.out) / "unused"), device=str(device), bf16=True,
                         batch_size=B, sample_batch_size=B, num_sample_batches=1, train_batch_size=B,
                         gradient_checkpointing=ckpt, frames=variant.get("frames", "all"), num_eval=1,
                         log_gold_train=False, eval_every=0, async_reward=True, lr=1e-6, progress=False)
    row = {"world": kind, "frames": latent_shape[0] if kind == "video" else None, "method": method,
           "variant": variant["name"], "checkpointing": ckpt}
    tr = None
    try:
        tr = FinetuneTrainer(cfg, init, pool, reward, vae, lrm=lrm if method == "lrm" else None,
                             latent_shape=latent_shape)
        tr.train_step()  # warm-up (allocates the optimizer state)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        times, peaks = [], []
        for _ in range(args.steps):
            r = tr.train_step()
            times.append(r["step_time_s"])
            peaks.append(r["peak_mem_mb"])
        row.update(status="ok", step_time_s=sum(times) / len(times), peak_mb=max(peaks),
                   act_mb=max(peaks) - base / 2 ** 20, held_mb=base / 2 ** 20)
    except torch.cuda.OutOfMemoryError as e:
        row.update(status="OOM", error=str(e).splitlines()[0][:200])
    finally:
        if tr is not None:
            tr.close()
        del tr
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    args = parse()
    if not torch.cuda.is_available():
        raise SystemExit("finetune_memory.py measures GPU memory: run it on a CUDA machine")
    from distill.denoiser import Denoiser
    from latent_rewards import create_lrm
    from lrm.schedules import DDPMSchedule

    device = torch.device("cuda")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    vae = make_vae(device)
    _ = vae.latent_space  # hash the weights once, outside the timings
    reward = make_reward(device)
    rows = []
    kinds = [k.strip() for k in args.only.split(",") if k.strip()]
    for kind in kinds:
        unet, dim = make_unet(kind)
        init = Denoiser(unet, DDPMSchedule(), "eps")  # stays on the CPU; the trainer copies it to the GPU
        nparams = sum(p.numel() for p in unet.parameters())
        lrm = create_lrm("video-frame-avg" if kind == "video" else "image-cnn", in_channels=4).to(device)
        shapes = [(4, 64, 64)] if kind == "image" else [(int(T), 4, 24, 40) for T in args.frames.split(",")]
        variants = {"lrm": [{"name": "lrm"}], "ddpo": [{"name": "ddpo"}],
                    "direct": ([{"name": "direct", "checkpointing": False},
                                {"name": "direct+ckpt", "checkpointing": True}] if kind == "image" else
                               [{"name": "direct (all frames)", "frames": "all"},
                                {"name": "direct (first/middle/last)", "frames": "first-middle-last"}])}
        for shape in shapes:
            for method in ("lrm", "ddpo", "direct"):
                for v in variants[method]:
                    r = run_one(kind, method, v, init, dim, shape, vae, reward, lrm, args, device)
                    r["unet_params_m"] = nparams / 1e6
                    rows.append(r)
                    (out / "memory.json").write_text(json.dumps(rows, indent=2))
        del init, unet, lrm
        gc.collect()
        torch.cuda.empty_cache()
    lines = [f"GPU: {torch.cuda.get_device_name()}; batch {args.batch}; bf16 autocast; AdamW fp32", "",
             "| world | frames | method | ckpt | status | step s | peak GB | added by the step GB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ok = r["status"] == "ok"
        head = f"| {r['world']} | {r['frames'] or '-'} | {r['variant']} | {r['checkpointing']} | {r['status']} | "
        lines.append(head + (f"{r['step_time_s']:.3f} | {r['peak_mb'] / 1024:.2f} | {r['act_mb'] / 1024:.2f} |"
                             if ok else "- | - | - |"))
    md = "\n".join(lines) + "\n"
    (out / "memory.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
