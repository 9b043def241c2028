"""Cache-build throughput against the device floor measured in the same run (GPU).

Two workloads:
  * shapes-video: Shapes videos (16 x 3 x 32 x 32) with the shipped Shapes VAE, MiniLM text encoder and a
    CLIP score (open_clip ViT-B-32, random weights) averaged over frames;
  * sd-image: synthetic 192 x 320 images with an SD-sized AutoencoderKL (SD 1.x config, random weights),
    the same text encoder and a CLIP score (ViT-B-32 by default, ``--clip ViT-H-14`` for the big one).
End-to-end = ``build_cache`` records/s (loading, encoding, scoring, writing shards, manifest commits).
Floor = the same VAE-encode + text-encode + reward calls on GPU-resident tensors, no I/O.
Prints a table with the ratio end-to-end / floor; ``--out`` writes JSON.

    PYTHONPATH=. python3 bench/data_cache_throughput.py --out runs/bench/data_cache_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_cache import BuildCacheConfig, SourceConfig, build_cache  # noqa: E402
from data_cache.build import encode_pixels  # noqa: E402
from data_cache.sources import Item, PixelSource  # noqa: E402

WORDS = ["a", "photo", "of", "red", "blue", "cat", "dog", "city", "at", "night", "painting", "sunset", "forest",
         "river", "portrait", "old", "man", "woman", "car", "mountain", "bright", "dark", "cinematic", "style"]


class SyntheticImages(PixelSource):
    """Deterministic 192 x 320 images, cheap to produce so the benchmark measures the cache pipeline rather than
    an image generator: record i is one of 64 smooth random base images, rolled by an index-dependent offset,
    with a random-words caption."""

    def __init__(self, height: int = 192, width: int = 320, seed: int = 0, pool: int = 64):
        super().__init__()
        self.h, self.w, self.seed = height, width, seed
        rng = np.random.default_rng(seed)
        low = rng.random((pool, 3, height // 16, width // 16), dtype=np.float32)
        base = np.repeat(np.repeat(low, 16, axis=2), 16, axis=3)
        self.base = np.clip(base + 0.05 * rng.standard_normal(base.shape, dtype=np.float32), 0, 1)

    def describe(self):
        return {"type": "synthetic", "height": self.h, "width": self.w, "seed": self.seed}

    def source_id(self, index):
        return f"synthetic:{index}"

    def load(self, index):
        rng = np.random.default_rng([self.seed, index])
        img = np.roll(self.base[index % len(self.base)], int(rng.integers(0, self.w)), axis=2)
        caption = " ".join(rng.choice(WORDS, size=int(rng.integers(4, 12))))
        return Item(index, img, caption, self.source_id(index))


class CLIPScore:
    """100 * cosine(image, text) with an open_clip model (random weights: cost, not quality)."""

    modality = "text-image"
    version = "random-weights"

    def __init__(self, arch: str, device: torch.device, video: bool = False, bf16: bool = True):
        import open_clip

        self.model = open_clip.create_model(arch, pretrained=None).to(device).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.device = device
        self.name = f"clip-score-{arch}"
        self.size = self.model.visual.image_size
        self.size = self.size if isinstance(self.size, int) else self.size[0]
        self.mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor([0.26862954, 0.26130258, 0.27577711], device=device).view(1, 3, 1, 1)
        self.video = video
        self.bf16 = bf16
        if video:
            self.modality = "text-video"

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor, prompts=None) -> torch.Tensor:
        B = pixels.shape[0]
        x = pixels.flatten(0, 1) if pixels.dim() == 5 else pixels  # (N, 3, H, W)
        x = x.to(self.device, non_blocking=True)
        x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = (x - self.mean) / self.std
        tok = self.tokenizer(list(prompts)).to(self.device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16 and x.is_cuda):
            img = self.model.encode_image(x).float()
            txt = self.model.encode_text(tok).float()
        img = torch.nn.functional.normalize(img, dim=-1)
        txt = torch.nn.functional.normalize(txt, dim=-1)
        if pixels.dim() == 5:
            img = img.unflatten(0, (B, -1)).mean(1)  # frame-averaged image embedding
        return 100 * (img * txt).sum(-1)


def make_clip(args, device, video: bool, bf16: bool):
    if args.reward in ("auto", "adapters"):
        try:
            from reward_adapters import create_reward

            r = create_reward("clip-score", arch=args.clip, pretrained=None, device=str(device),
                              precision="bf16" if bf16 and device.type == "cuda" else "fp32")
            return r.to(device) or r
        except ImportError:
            if args.reward == "adapters":
                raise
    return CLIPScore(args.clip, device, video=video, bf16=bf16)


def sd_vae(device, bf16):
    from diffusers import AutoencoderKL

    from lrm.latent_space import VAE

    torch.manual_seed(0)
    ae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                       block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                       up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215)
    return VAE(ae.to(device), vae_id="sd-vae-config-random", autocast_bf16=bf16)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def floor(vae, te, reward, source, batch_size, iters, device, warmup=3) -> float:
    """Records/s of the GPU kernels alone on one resident batch (no loading, no writing)."""
    items = [source.load(i) for i in range(batch_size)]
    pixels = torch.from_numpy(np.stack([it.pixels for it in items])).to(device)
    prompts = [it.prompt for it in items]

    def step():
        with torch.no_grad():
            encode_pixels(vae, pixels)
            te(prompts)
            reward(pixels, prompts)

    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    return batch_size * iters / (time.perf_counter() - t0)


def end_to_end(cfg: BuildCacheConfig, source, vae, te, reward, warmup_records: int) -> dict:
    # warm-up build (cudnn autotuning, thread pools, allocator), then the timed one in a fresh directory
    warm = BuildCacheConfig(**{**cfg.__dict__, "out_dir": cfg.out_dir + "-warmup",
                               "source": SourceConfig(**{**cfg.source.__dict__, "num_samples": warmup_records})})
    build_cache(warm, source=source, rewards=[reward], vae=vae, text_encoder=te)
    shutil.rmtree(warm.out_dir, ignore_errors=True)
    _sync(vae.device)
    t0 = time.perf_counter()
    out = build_cache(cfg, source=source, rewards=[reward], vae=vae, text_encoder=te)
    _sync(vae.device)
    dt = time.perf_counter() - t0
    n = out["manifest"]["counts"]["records"]
    return {"records": n, "seconds": dt, "records_per_s": n / dt, "gpu_stage_s": out["gpu_stage_s"],
            "loader_wait_s": out["loader_wait_s"], "writer_wait_s": out["writer_wait_s"],
            "bytes_written": sum(e["bytes"] for e in out["manifest"]["shards"])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="", help="write results as JSON here")
    ap.add_argument("--workloads", default="shapes-video,sd-image")
    ap.add_argument("--clip", default="ViT-B-32", help="open_clip architecture (ViT-B-32 or ViT-H-14)")
    ap.add_argument("--reward", default="auto", choices=["auto", "adapters", "local"],
                    help="clip-score from reward_adapters (random weights, bf16) or the local class here; auto: "
                         "reward_adapters when importable")
    ap.add_argument("--video_records", type=int, default=4096)
    ap.add_argument("--image_records", type=int, default=4096)
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--num_workers", type=int, default=12)
    ap.add_argument("--worker_type", default="auto", choices=["auto", "thread", "process"],
                    help="auto: processes for Shapes rendering (Python-bound), threads for synthetic images")
    ap.add_argument("--no_bf16", action="store_true", help="run VAE and CLIP in fp32")
    ap.add_argument("--floor_iters", type=int, default=0, help="floor batches (default: half the records' batches)")
    ap.add_argument("--warmup_records", type=int, default=0, help="records of the warm-up build (default 4 batches)")
    ap.add_argument("--device", default="cuda", help="cuda (the benchmark); cpu only for a smoke test of the script")
    ap.add_argument("--tmp", default="", help="directory for the caches (default: a temp dir, deleted)")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU (--device cpu runs a smoke test only)", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    bf16 = not args.no_bf16
    from data_cache.sources import ShapesSource
    from lrm.latent_space import VAE
    from lrm.text import TextEncoder

    tmp = Path(args.tmp or tempfile.mkdtemp(prefix="lrm-cache-bench-"))
    te = TextEncoder(device=device)
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "bf16": bf16, "clip": args.clip, "reward_impl": args.reward,
               "batch_size": args.batch_size, "num_workers": args.num_workers, "worker_type": args.worker_type,
               "workloads": {}}
    for wl in args.workloads.split(","):
        if wl == "shapes-video":
            vae = VAE.shapes(device=device, autocast_bf16=bf16)
            source = ShapesSource(32, 16, 0)
            reward = make_clip(args, device, video=True, bf16=bf16)
            n = args.video_records
            src_cfg = SourceConfig(type="shapes", num_samples=n, num_frames=16)
        elif wl == "sd-image":
            vae = sd_vae(device, bf16)
            source = SyntheticImages(192, 320)
            reward = make_clip(args, device, video=False, bf16=bf16)
            n = args.image_records
            src_cfg = SourceConfig(type="shapes", num_samples=n)  # settings only; the source object is passed in
        else:
            raise SystemExit(f"unknown workload {wl!r}; valid: shapes-video, sd-image")
        _ = vae.latent_space  # hash the weights once, outside the timings
        wtype = args.worker_type if args.worker_type != "auto" else (
            "process" if wl == "shapes-video" else "thread")
        cfg = BuildCacheConfig(out_dir=str(tmp / wl), source=src_cfg, batch_size=args.batch_size, shard_size=1024,
                               num_workers=args.num_workers, worker_type=wtype, prefetch_batches=8,
                               device=str(device), vae_bf16=bf16, progress=False, overwrite=True)
        iters = args.floor_iters or max(10, n // args.batch_size // 2)
        fl = floor(vae, te, reward, source, args.batch_size, iters=iters, device=device)
        e2e = end_to_end(cfg, source, vae, te, reward, warmup_records=args.warmup_records or 4 * args.batch_size)
        ratio = e2e["records_per_s"] / fl
        results["workloads"][wl] = {"floor_records_per_s": fl, "end_to_end": e2e, "ratio": ratio,
                                    "worker_type": wtype}
        del vae, reward
        torch.cuda.empty_cache()
    if not args.tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    if device.type == "cpu":
        print("NOTE: --device cpu is a smoke test of this script; its numbers are not the benchmark")
    print(f"\ncache build throughput on {results['device']} (batch {args.batch_size}, {args.num_workers} "
          f"loader workers, bf16={bf16}, reward clip-score {args.clip})")
    print(f"{'workload':<14}{'workers':>9}{'floor rec/s':>13}{'end-to-end rec/s':>18}{'ratio':>8}"
          f"{'loader wait s':>15}{'writer wait s':>15}{'MB written':>12}")
    for wl, r in results["workloads"].items():
        e = r["end_to_end"]
        print(f"{wl:<14}{r['worker_type']:>9}{r['floor_records_per_s']:>13.1f}{e['records_per_s']:>18.1f}{r['ratio']:>8.2f}"
              f"{e['loader_wait_s']:>15.2f}{e['writer_wait_s']:>15.2f}{e['bytes_written'] / 1e6:>12.1f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
