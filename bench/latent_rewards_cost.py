"""Cost of LRMs on a GPU: (a) training throughput and time to Spearman 0.9 on 100k samples; (b) one
reward-gradient step w.r.t. video latents through the LRM vs through VAE decoder + ViT-H-14 CLIP reward.

(a) runs on each of ``--train_data``: ``shapes-cache`` = a 100k-record ``data_cache`` cache of Shapes images with
their JPEG compressibility, built with ``build_cache`` (Shapes VAE) into ``--cache_dir`` (reused / resumed when it
exists) and read back with ``LatentData.from_cache``; ``synthetic`` = in-memory 4x32x32 latents with a known
nonlinear target (a larger latent than the Shapes world's 4x8x8).

    PYTHONPATH=. python3 bench/latent_rewards_cost.py --out runs/bench/lrm_cost.json
    PYTHONPATH=. python3 bench/latent_rewards_cost.py --part grad --frames 12,24 --channels 4   # a quick subset

(b) uses random weights at real size: diffusers ``AutoencoderKL`` with Stable Diffusion's config (decoder only in
the graph) and open_clip ``ViT-H-14`` (HPSv2's backbone): pixels 192x320 -> resize 224 -> CLIP normalisation ->
image embedding -> cosine with a fixed text embedding. Latents are 24x40 with 4 or 16 channels; the whole clip is
decoded at once, no gradient checkpointing (as in the paper's reference numbers). Out-of-memory is caught and
reported. Both paths run in the same process with the same dtype (default bf16 weights).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from latent_rewards import FitConfig, LatentData, create_lrm, fit  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------
# (a) training throughput and time to Spearman 0.9


def synthetic_cache(n: int, shape: tuple[int, int, int], seed: int = 0) -> LatentData:
    """Smooth random latents and a known nonlinear reward of them (learnable by a conv head, not by ridge)."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = shape
    low = torch.randn(n, c, max(1, h // 8), max(1, w // 8), generator=g)
    x = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False) + 0.5 * torch.randn(n, c, h, w,
                                                                                                    generator=g)
    # local nonlinear statistics averaged over space (what a conv trunk + pooling can represent); the cross-channel
    # terms are not linear in pooled per-channel statistics, so the ridge baseline cannot fit them
    corr = (x[:, 0] * x[:, 1 % c]).mean((1, 2))
    gate = (F.relu(x[:, 2 % c]) * torch.tanh(2 * x[:, 3 % c])).mean((1, 2))
    y = 2 * corr + 3 * gate + x[:, 0].mean((1, 2))
    prompts = [f"p{i % 5000}" for i in range(n)]
    return LatentData(x, y, prompts=prompts, reward_name="synthetic", source=f"synthetic {n} x {shape}")


def shapes_cache(args, device) -> LatentData:
    """``args.n_train`` Shapes images with ``jpeg-compressibility`` in a data_cache cache at ``args.cache_dir``."""
    from data_cache import BuildCacheConfig, LatentCache, SourceConfig, build_cache

    root = Path(args.cache_dir)
    cfg = BuildCacheConfig(out_dir=str(root), source=SourceConfig(type="shapes", num_samples=args.n_train),
                           rewards=["jpeg-compressibility"], batch_size=1024, shard_size=8192,
                           num_workers=args.cache_workers, device=str(device), resume=root.exists(), progress=False,
                           latent_dtype="float32")
    build_cache(cfg)
    return LatentData.from_cache(LatentCache.open(root), "jpeg-compressibility")


def bench_train(args, device, source: str) -> dict:
    t0 = time.perf_counter()
    if source == "shapes-cache":
        data = shapes_cache(args, device)
    else:
        data = synthetic_cache(args.n_train, tuple(int(v) for v in args.latent_shape.split(",")))
    shape = tuple(data.latents.shape[1:])
    print(f"[train] {source}: {len(data.target)} x {shape} ready in {time.perf_counter() - t0:.1f}s", flush=True)
    patch = 4 if shape[-1] >= 16 else 2
    head_kwargs = {"patch": patch, "width": 128}

    # pure step throughput: GPU-resident data, bf16 autocast, AdamW
    model = create_lrm("image-cnn", in_channels=shape[0], **head_kwargs).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x_all, y_all = data.latents.to(device), data.target.to(device)
    amp = device.type == "cuda"
    through = {}
    for bs in args.train_batch_sizes:
        def step():
            idx = torch.randint(0, len(x_all), (bs,), device=device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = F.mse_loss(model(x_all[idx]).float(), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        for _ in range(10):
            step()
        _sync(device)
        t = time.perf_counter()
        n = args.throughput_steps
        for _ in range(n):
            step()
        _sync(device)
        dt = time.perf_counter() - t
        through[bs] = n * bs / dt
        print(f"[train] batch {bs}: {through[bs]:,.0f} latents/s ({dt / n * 1e3:.2f} ms/step)", flush=True)
    model = opt = x_all = y_all = None  # free GPU memory before fit

    # time to val Spearman 0.9 with the real trainer
    cfg = FitConfig(head="image-cnn", head_kwargs=head_kwargs, steps=args.fit_steps, batch_size=args.fit_batch,
                    eval_every=args.fit_eval_every, patience=0, lr=1e-3, warmup_steps=100, device=str(device),
                    progress=False, checkpoint_every=0)
    res = fit(data, cfg)
    hit = next((r for r in res.history if r["val_spearman"] >= 0.9), None)
    out = {"data": source, "n": len(data.target), "latent_shape": list(shape), "source": data.source,
           "head": "image-cnn", "head_kwargs": head_kwargs,
           "throughput_latents_per_s": {str(k): v for k, v in through.items()},
           "fit_batch": args.fit_batch, "time_to_spearman_0.9_s": None if hit is None else hit["elapsed_s"],
           "steps_to_spearman_0.9": None if hit is None else hit["step"],
           "final_val_spearman": res.metrics["spearman"], "ridge_val_spearman": res.baseline_metrics["spearman"],
           "fit_time_s": res.train_time_s, "history": res.history}
    print(f"[train] time to val Spearman 0.9: {out['time_to_spearman_0.9_s']}s (step {out['steps_to_spearman_0.9']});"
          f" final {res.metrics['spearman']:.4f} vs ridge {res.baseline_metrics['spearman']:.4f}", flush=True)
    return out


# ---------------------------------------------------------------------------------------------------------------
# (b) reward-gradient step w.r.t. video latents


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sd_vae(latent_channels: int, dtype, device):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(  # Stable Diffusion's VAE config, random weights
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32, sample_size=512,
        scaling_factor=0.18215)
    vae.encoder = None  # only the decoder is in the reward graph
    return vae.to(device, dtype).eval().requires_grad_(False)


def clip_reward(dtype, device, name: str = "ViT-H-14"):
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None, device=device)
    model = model.to(dtype).eval().requires_grad_(False)
    text = F.normalize(torch.randn(1, model.visual.output_dim, device=device, dtype=dtype), dim=-1)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN, device=device, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD, device=device, dtype=dtype).view(1, 3, 1, 1)

    def reward(pixels):  # (N, 3, H, W) in [0, 1] -> (N,)
        x = F.interpolate(pixels, size=(224, 224), mode="bicubic", align_corners=False)
        emb = F.normalize(model.encode_image((x - mean) / std), dim=-1)
        return (emb * text).sum(-1)

    n_params = sum(p.numel() for p in model.visual.parameters())
    return reward, n_params


def measure(fn, device, reps: int) -> dict:
    """Run ``fn`` (one forward + backward) after a warm-up; median time and peak memory, or OOM."""
    try:
        fn()
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t)
        peak = torch.cuda.max_memory_allocated(device)
        return {"ok": True, "time_ms": float(np.median(times) * 1e3), "peak_gb": peak / 2**30,
                "peak_above_weights_gb": (peak - base) / 2**30}
    except torch.cuda.OutOfMemoryError as e:
        return {"ok": False, "error": "OOM", "message": str(e).splitlines()[0][:200]}
    finally:
        torch.cuda.empty_cache()


def bench_grad(args, device) -> list[dict]:
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    t0 = time.perf_counter()
    clip, clip_params = clip_reward(dtype, device, args.clip_model)
    print(f"[grad] {args.clip_model} image tower: {clip_params / 1e6:.0f}M params ({time.perf_counter() - t0:.0f}s)",
          flush=True)
    rows = []
    for c in args.channels:
        vae = sd_vae(c, dtype, device)
        heads = {name: create_lrm(name, in_channels=c).to(device, dtype).eval().requires_grad_(False)
                 for name in args.lrm_heads}  # frozen, as during fine-tuning: gradients w.r.t. latents only
        for T in args.frames:
            row = {"channels": c, "frames": T, "latent": [T, c, 24, 40], "pixels": [T, 3, 192, 320]}
            z0 = torch.randn(1, T, c, 24, 40, device=device, dtype=dtype)

            for name, head in heads.items():
                def lrm_step(head=head):
                    z = z0.clone().requires_grad_(True)
                    (-head(z).sum()).backward()
                    assert z.grad is not None
                row[f"lrm:{name}"] = measure(lrm_step, device, args.reps)

            def pixel_step():
                z = z0.clone().requires_grad_(True)
                pix = vae.decode(z[0] / vae.config.scaling_factor).sample  # (T, 3, 192, 320)
                pix = ((pix.float() + 1) / 2).clamp(0, 1).to(dtype)
                (-clip(pix).mean()).backward()
                assert z.grad is not None
            row["pixel:vae+vit-h-14"] = measure(pixel_step, device, args.reps)
            rows.append(row)
            print(_grad_line(row), flush=True)
        vae = heads = None  # free GPU memory before the next channel count
        torch.cuda.empty_cache()
    return rows


def _fmt(m: dict) -> str:
    return f"{m['time_ms']:9.1f} ms {m['peak_gb']:7.2f} GB" if m["ok"] else f"{'OOM':>22s}"


def _grad_line(row: dict) -> str:
    parts = [f"C={row['channels']:2d} T={row['frames']:3d}"]
    for k, m in row.items():
        if isinstance(m, dict):
            parts.append(f"{k}: {_fmt(m)}")
    pix = row["pixel:vae+vit-h-14"]
    lrm = next(m for k, m in row.items() if k.startswith("lrm:"))
    if pix["ok"] and lrm["ok"]:
        parts.append(f"pixel/LRM time x{pix['time_ms'] / lrm['time_ms']:.0f}, memory x"
                     f"{pix['peak_gb'] / max(lrm['peak_gb'], 1e-9):.0f}")
    return " | ".join(parts)


def main(argv=None) -> int:
    ints = lambda s: [int(v) for v in s.split(",")]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["all", "train", "grad"], default="all")
    p.add_argument("--out", default="runs/bench/lrm_cost.json")
    p.add_argument("--train_data", type=lambda s: s.split(","), default=["shapes-cache", "synthetic"],
                   help="(a) data sets, comma list: shapes-cache, synthetic")
    p.add_argument("--n_train", type=int, default=100_000, help="(a) samples per data set")
    p.add_argument("--cache_dir", default="/tmp/lrm_cost_shapes_cache", help="(a) where the Shapes cache is built")
    p.add_argument("--cache_workers", type=int, default=8, help="(a) rendering processes of the cache build")
    p.add_argument("--latent_shape", default="4,32,32", help="(a) C,h,w of the synthetic latents")
    p.add_argument("--train_batch_sizes", type=ints, default=[256, 1024, 4096])
    p.add_argument("--throughput_steps", type=int, default=200)
    p.add_argument("--fit_steps", type=int, default=3000)
    p.add_argument("--fit_batch", type=int, default=512)
    p.add_argument("--fit_eval_every", type=int, default=50)
    p.add_argument("--frames", type=ints, default=[12, 24, 64, 128])
    p.add_argument("--channels", type=ints, default=[4, 16])
    p.add_argument("--lrm_heads", type=lambda s: s.split(","), default=["video-frame-avg", "video-3d-cnn"])
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--clip_model", default="ViT-H-14", help="open_clip architecture of the pixel reward (random init)")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU", file=sys.stderr)
        return 1
    device = torch.device("cuda")
    result = {"device": torch.cuda.get_device_name(0), "args": vars(args)}
    if args.part in ("all", "train"):
        result["train"] = {}
        for source in args.train_data:
            result["train"][source] = bench_train(args, device, source)
            torch.cuda.empty_cache()
    if args.part in ("all", "grad"):
        result["grad"] = bench_grad(args, device)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))

    print(f"\n== {result['device']} ==")
    for tr in result.get("train", {}).values():
        print(f"(a) image-cnn on {tr['data']}, {tr['n']} x {tr['latent_shape']} latents: throughput "
              + ", ".join(f"batch {k}: {v:,.0f}/s" for k, v in tr["throughput_latents_per_s"].items())
              + f"; time to val Spearman 0.9: {tr['time_to_spearman_0.9_s']} s (step {tr['steps_to_spearman_0.9']}),"
              f" final {tr['final_val_spearman']:.4f} (ridge {tr['ridge_val_spearman']:.4f})")
    if "grad" in result:
        print(f"(b) one reward-gradient step w.r.t. video latents (192x320 -> 24x40), {args.dtype}:")
        for row in result["grad"]:
            print("   " + _grad_line(row))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
