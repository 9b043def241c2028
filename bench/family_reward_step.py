"""One reward fine-tuning step of a real-size student, latent reward (LRM) vs pixel reward, per frame count (issue 19).

Random weights at real size, base transformer in bf16 (diffusers' fp32 modules kept fp32, as ``from_pretrained(
torch_dtype=bfloat16)`` keeps them) under bf16 autocast, batch 1, LoRA rank 64 (``distill.lora.LoraBase``: peft on
``DEFAULT_TARGET_MODULES``, adapter weights fp32) with the toolkit's block gradient checkpointing. A step is:

  1. x0 = the student's x0 map with grad at t = 249 (the last step of our 4-step students): ``Denoiser.x0`` through
     the family adapter (``distill.families``) and the consistency boundary (``distill.cd.consistency_output``, as
     ``FinetuneTrainer.student_x0``); random ``x_t``, random text tokens instead of a text encoder;
  2. the reward loss and its backward to x0 (``x0`` is detached into a leaf for this phase so its memory is measured
     on its own; ``x0.backward(leaf.grad)`` then gives the same gradients as one ``loss.backward()``):
       lrm    ``distill.lrm_ft.lrm_ft_loss`` with a latent reward head of ``latent_rewards`` at its defaults
              (``--lrm``; default ``text-video-3d-cnn`` for video, ``text-image-cnn`` for images) on the latents;
              no decoder in the graph;
       pixel  ``distill.reward.PixelReward.loss`` (``distill.direct.direct_reward_loss``: ``VAE.decode(z,
              clamp=False)``, straight-through clamp) with the family's VAE (``lrm.latent_space.VAE``, fp32 weights,
              bf16 autocast, slicing) and a ``reward_adapters.CompositeReward`` of
                - ``HPSv2Reward`` (open_clip ViT-H-14, random weights, its own preprocessing: longest side to 224,
                  zero-pad, OpenAI mean/std, cosine) on the first, middle and last decoded frames, weight 1, and
                - for video, a ViCLIP-style video-text score (no differentiable video adapter exists in
                  ``reward_adapters``): open_clip ViT-L-14 (random weights) on 8 evenly spaced decoded frames
                  (``select_frames(T, 8)``), CLIP preprocessing, features mean-pooled over frames, cosine with the
                  prompt's text feature, weight 1.
              Video VAEs decode whole clips (causal in time). The toolkit's decoder checkpointing for a video
              VAE is one clip per checkpoint, which at batch 1 cannot lower the peak (the backward recomputes the
              whole clip's decoder), so it is used for image VAEs only; ``AutoencoderKLWan`` has no gradient
              checkpointing of its own;
  3. the transformer's backward (``x0.backward``), 4. AdamW on the LoRA parameters.

Families (``--family``):
  wan  Wan2.1-T2V-1.3B ``WanTransformer3DModel`` (30 layers, 12 x 128 heads, ffn 8960, text 4096), 480x832,
       ``--frames`` 17 33 49 81 (latents (1 + (F - 1) / 4, 16, 60, 104)), 512 umT5-width tokens, Wan 2.1 VAE
       (``AutoencoderKLWan()`` defaults), flow / x0 as ``WanPipeline``.
  sd3  SD3.5-medium ``SD3Transformer2DModel`` (24 layers, 24 x 64 heads, MMDiT-X dual attention in layers 0-12,
       qk rms_norm), 1024x1024 (latents (16, 128, 128)), 333 tokens x 4096 + pooled 2048, SD3 16-channel
       ``AutoencoderKL`` (scale 1.5305, shift 0.0609), HPSv2-style ViT-H-14 on the image.
  flux FLUX.1-dev ``FluxTransformer2DModel`` (19 + 38 blocks, 24 x 128 heads, guidance embedding 3.5), 1024x1024
       (latents (16, 128, 128), packed 2x2 by the family adapter), 512 T5 tokens + pooled 768, FLUX VAE (scale 0.3611,
       shift 0.1159); otherwise as sd3. 12B parameters: 24 GB of bf16 weights, built in fp32 first (48 GB).

Memory, per row (GiB, ``torch.cuda.memory_allocated`` / ``max_memory_allocated``; CPU: null):
  weights_gib          transformer base + LoRA adapter, after building
  reward_weights_gib   the frozen reward side: LRM head, or VAE + ViT-H-14 (+ ViT-L-14), after building
  optimizer_gib        AdamW state of the LoRA parameters (allocated by the first ``optimizer.step()``)
  lora_grads_gib       the LoRA gradients (parameter count x 4 bytes)
  activations_gib      peak above the step's starting memory during the transformer's forward and backward alone
                       (checkpointed block inputs, one block's recomputation, LoRA gradients)
  saved_after_forward_gib  what the transformer's forward keeps until its backward (held during the reward phase)
  reward_path_gib      peak of the reward phase above the memory held when it starts: decode + reward forward +
                       backward to x0 (pixel), the head's forward + backward (lrm)
  peak_gib             ``max_memory_allocated`` over the whole step (everything held: weights, optimizer, both phases)
  peak_reserved_gib    ``max_memory_reserved`` (the allocator's cached blocks; what ``nvidia-smi`` sees)
Time: ``step_s`` median over ``--steps`` timed steps after ``--warmup`` (synchronised ``perf_counter``; the phases
``fwd_s`` / ``reward_s`` / ``bwd_s`` / ``opt_s`` are synchronised too). A row that raises CUDA out-of-memory is
recorded as ``does not fit`` (memory freed, next row); once a path does not fit, its larger frame counts are
``skipped`` unless ``--try_all``. Rows run LRM first, then pixel, frames ascending (out-of-memory-prone last).
Each row also checks that the LoRA weights changed and the base weights did not. Writes
``family_reward_step_<family>.json`` and ``.md`` to ``--out`` after every row; no numbers are claimed here.

    python3 bench/family_reward_step.py --out $OUT/frs --family wan     # H100, ~5-7 min
    python3 bench/family_reward_step.py --out $OUT/frs --family sd3     # H100, ~2-3 min
    python3 bench/family_reward_step.py --out $OUT/frs --family flux    # optional, H100, ~3-4 min
    python3 bench/family_reward_step.py --out $OUT/frs --family wan --frames 17 81 --paths lrm
    python3 bench/family_reward_step.py --tiny --device cpu --out /tmp/frs                          # CPU smoke
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # less fragmentation near the limit

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 2 ** 30
TIMESTEP = 249  # the last step of the 4-step students (distill.samplers.STUDENT_TIMESTEPS[4])
PROMPT = "a red fox runs through fresh snow at sunrise"

# Wan2.1-T2V-1.3B transformer/config.json
WAN_13B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
               text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
# stable-diffusion-3.5-medium transformer/config.json
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                   dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
# stable-diffusion-3.5-medium vae/config.json
SD3_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2, norm_num_groups=32,
               block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024, scaling_factor=1.5305,
               shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)

# FLUX.1-dev transformer/config.json (in_channels 64 = 16 latent channels packed 2x2) and vae/config.json
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
FLUX_VAE = dict(SD3_VAE, scaling_factor=0.3611, shift_factor=0.1159)

TINY_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
                text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32)
TINY_WAN_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
TINY_SD3 = dict(sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=16,
                pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")
TINY_FLUX = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=True,
                 axes_dims_rope=(4, 4, 8))
TINY_SD3_VAE = dict(SD3_VAE, block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4, sample_size=32)
TINY_CLIP = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                                             "patch_size": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}

COLUMNS = {
    "path": "lrm: latent reward head on the latents; pixel: VAE decode + pixel rewards",
    "frames": "pixel frames of the clip (images: 1)",
    "latent_shape": "latents per sample: (T', C, h, w) for video, (C, h, w) for images",
    "tokens": "transformer sequence length (latent patches)",
    "pixel_shape": "decoded pixels the pixel rewards score, (B, T, 3, H, W) or (B, 3, H, W)",
    "status": "ok | does not fit (CUDA out of memory) | skipped (a smaller frame count did not fit) | error",
    "weights_gib": "transformer base + LoRA after building",
    "reward_weights_gib": "frozen reward side after building (LRM head, or VAE + CLIP towers)",
    "optimizer_gib": "AdamW state of the LoRA parameters (first optimizer step)",
    "lora_grads_gib": "LoRA gradients (fp32)",
    "activations_gib": "peak above the step's starting memory in the transformer's forward / backward alone",
    "saved_after_forward_gib": "memory the transformer's forward keeps for its backward",
    "reward_path_gib": "peak of the reward phase (decode + reward forward + backward to x0) above memory at its start",
    "peak_gib": "max_memory_allocated over the step",
    "peak_reserved_gib": "max_memory_reserved over the step",
    "step_s": "median step time (s) over the timed steps",
    "fwd_s / reward_s / bwd_s / opt_s": "median phase times (s)",
    "losses": "reward loss of every step (warm-up included)",
    "lora_changed / base_unchanged": "LoRA weights moved / base weights identical after the row's steps",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", choices=("wan", "sd3", "flux"), default="wan", help="model family (one per run)")
    p.add_argument("--out", default="runs/bench/family_reward_step", help="output folder (JSON + markdown)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny configs of the same classes (CPU test)")
    p.add_argument("--frames", type=int, nargs="+", default=None,
                   help="pixel frame counts, 1 + 4k (wan default: 17 33 49 81; tiny: 5 9)")
    p.add_argument("--height", type=int, default=None, help="pixels (wan 480, sd3 1024; tiny 64 / 32)")
    p.add_argument("--width", type=int, default=None, help="pixels (wan 832, sd3 1024; tiny 64 / 32)")
    p.add_argument("--paths", nargs="+", choices=("lrm", "pixel"), default=["lrm", "pixel"], help="reward paths")
    p.add_argument("--lrm", default=None, help="latent reward head (default text-video-3d-cnn / text-image-cnn)")
    p.add_argument("--video_frames", type=int, default=8, help="frames of the ViCLIP-style video reward")
    p.add_argument("--lora_rank", type=int, default=64)
    p.add_argument("--grad_ckpt", type=int, default=1, help="block gradient checkpointing of the transformer (1/0)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                   help="base weights + autocast (default bf16 on CUDA, fp32 on CPU); LoRA and optimizer stay fp32")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate of the LoRA parameters")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per row")
    p.add_argument("--steps", type=int, default=3, help="timed steps per row (the median is reported)")
    p.add_argument("--try_all", action="store_true", help="run larger frame counts after one did not fit")
    p.add_argument("--seed", type=int, default=0)
    ns = p.parse_args(argv)
    if ns.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device; use --device cpu (with --tiny)")
    ns.dtype = ns.dtype or ("bf16" if ns.device.startswith("cuda") else "fp32")
    if ns.dtype == "bf16" and not ns.device.startswith("cuda"):
        p.error("--dtype bf16 runs under CUDA autocast; on CPU use --dtype fp32")
    wan = ns.family == "wan"
    ns.height = ns.height or ((64 if wan else 32) if ns.tiny else 480 if wan else 1024)
    ns.width = ns.width or ((64 if wan else 32) if ns.tiny else 832 if wan else 1024)
    if not wan:
        ns.frames = [1]
    elif ns.frames is None:
        ns.frames = [5, 9] if ns.tiny else [17, 33, 49, 81]
    bad = [f for f in ns.frames if f < 1 or (f - 1) % 4]
    if bad:
        p.error(f"--frames {bad}: the Wan VAE takes 1 + 4k frames (nearest valid: "
                f"{sorted({max(1, 1 + 4 * ((f - 1) // 4)) for f in bad} | {1 + 4 * ((f + 2) // 4) for f in bad})})")
    ns.lrm = ns.lrm or ("text-video-3d-cnn" if wan else "text-image-cnn")
    return ns


# ---- memory and time ------------------------------------------------------------------------------------------------
class Meter:
    """CUDA memory counters in GiB (None on CPU) and synchronised wall time."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    def allocated(self) -> float | None:
        return torch.cuda.memory_allocated() / GIB if self.cuda else None

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> float | None:
        return torch.cuda.max_memory_allocated() / GIB if self.cuda else None

    def peak_reserved(self) -> float | None:
        return torch.cuda.max_memory_reserved() / GIB if self.cuda else None

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _max(*xs: float | None) -> float | None:
    xs = [x for x in xs if x is not None]
    return max(xs) if xs else None


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


# ---- models ---------------------------------------------------------------------------------------------------------
def cast_keep_fp32(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``model`` in ``dtype`` except the modules diffusers keeps in fp32 (``_keep_in_fp32_modules``: Wan's rope, time
    embedder, norms, scale-shift tables), as ``from_pretrained(torch_dtype=dtype)`` loads it."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    for mod_name, mod in model.named_modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            if p.is_floating_point() and not keep.intersection(f"{mod_name}.{name}".split(".")):
                p.data = p.data.to(dtype)
        for name, b in list(mod.named_buffers(recurse=False)):
            if b is not None and b.is_floating_point() and not keep.intersection(f"{mod_name}.{name}".split(".")):
                mod._buffers[name] = b.to(dtype)
    return model


def build_student(ns: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """``(student Denoiser (LoRA view), LoraBase, model config dict, parameter count)``."""
    import diffusers

    from distill.denoiser import Denoiser
    from distill.lora import LoraBase, role
    from lrm.schedules import FlowSchedule

    cls, cfg = {"wan": (diffusers.WanTransformer3DModel, TINY_WAN if ns.tiny else WAN_13B),
                "sd3": (diffusers.SD3Transformer2DModel, TINY_SD3 if ns.tiny else SD35_MEDIUM),
                "flux": (diffusers.FluxTransformer2DModel, TINY_FLUX if ns.tiny else FLUX_DEV)}[ns.family]
    torch.manual_seed(ns.seed)
    with torch.device(device):  # random init where it runs (seconds instead of minutes on the CPU)
        model = cls(**cfg)
    model = cast_keep_fp32(model, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    # flow models predicting the velocity (WanPipeline / StableDiffusion3Pipeline / FluxPipeline)
    base = Denoiser(model, FlowSchedule(), "flow", use_text_mask=(ns.family == "wan"))
    lora = LoraBase(model, ns.lora_rank, ns.lora_rank)
    student = role(base, lora.add("student"))
    for p in student.model.parameters():  # adapter weights trained in fp32 (diffusers' cast_training_params)
        p.data = p.data.float()
    if ns.grad_ckpt:
        student.model.enable_gradient_checkpointing()  # the toolkit's: recompute each block under its adapter
    return student.train(), lora, dict(cfg), n_params


def text_inputs(ns: argparse.Namespace, student, device: torch.device):
    """Random caption tokens (+ pooled text for SD3) of the family's widths and lengths."""
    g = torch.Generator().manual_seed(ns.seed + 1)
    width = int(student.family.text_dim())
    length = 8 if ns.tiny else {"wan": 512, "sd3": 333, "flux": 512}[ns.family]  # umT5 512; SD3 77 + 256; T5 512
    tok = torch.randn(1, length, width, generator=g).to(device)
    mask = torch.ones(1, length, dtype=torch.bool, device=device)
    pooled = None
    if ns.family in ("sd3", "flux"):
        pooled = torch.randn(1, int(student.model.config.pooled_projection_dim), generator=g).to(device)
    return tok, mask, pooled


def build_lrm(ns: argparse.Namespace, device: torch.device, text_dim: int):
    from latent_rewards import create_lrm

    head = create_lrm(ns.lrm, in_channels=16, **({"text_dim": text_dim} if ns.lrm.startswith("text") else {}))
    head = head.to(device).eval().requires_grad_(False)
    if hasattr(head, "check_finite"):
        head.check_finite = False  # as FinetuneTrainer sets it (no host sync per call)
    return head


def build_vae(ns: argparse.Namespace, device: torch.device):
    import diffusers

    from lrm.latent_space import VAE

    torch.manual_seed(ns.seed + 2)
    with torch.device(device):
        if ns.family == "wan":
            ae = diffusers.AutoencoderKLWan(**(TINY_WAN_VAE if ns.tiny else {}))  # defaults = the Wan 2.1 VAE
        else:
            ae = diffusers.AutoencoderKL(**(TINY_SD3_VAE if ns.tiny else SD3_VAE if ns.family == "sd3" else FLUX_VAE))
    vae = VAE(ae, vae_id=f"random-{ns.family}-vae", autocast_bf16=True, slicing=True)
    _ = vae.latent_space  # hash the weights once, outside the timings
    return vae


def make_video_reward_class():
    from reward_adapters.base import select_frames
    from reward_adapters.openclip_backbone import OpenCLIPReward
    from reward_adapters.preprocess import open_clip_preprocess

    class MeanPooledCLIPVideoReward(OpenCLIPReward):
        """ViCLIP-style video-text score: CLIP image features of ``num_frames`` evenly spaced frames, mean-pooled
        over frames, cosine with the prompt's text feature. A stand-in of the video reward's cost (no differentiable
        video adapter exists in ``reward_adapters``)."""

        name = "clip-video-meanpool"
        version = "random-weights"
        modality = "text-video"

        def __init__(self, model, num_frames: int = 8, **kw):
            super().__init__(model, "ViT-L-14", **kw)
            self.num_frames = int(num_frames)

        def score_videos(self, pixels, prompts):
            B, T = pixels.shape[:2]
            idx = select_frames(T, min(self.num_frames, T))
            x = pixels[:, idx].flatten(0, 1)  # (B*K, 3, H, W)
            x = open_clip_preprocess(x.to(self.device, torch.float32), self.preprocess_cfg)
            f = self.image_features(x).unflatten(0, (B, len(idx))).mean(1)  # (B, D)
            f = torch.nn.functional.normalize(f, dim=-1)
            return (f * self.text_features(prompts)).sum(-1)

    return MeanPooledCLIPVideoReward


def build_pixel_reward(ns: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """``(CompositeReward, description)``: HPSv2 (ViT-H-14) on first / middle / last frames (+ the video reward)."""
    import open_clip

    from reward_adapters.base import CompositeReward
    from reward_adapters.hpsv2 import HPSv2Reward

    precision = "bf16" if dtype == torch.bfloat16 else "fp32"

    def clip(arch: str, seed: int):
        torch.manual_seed(seed)
        if ns.tiny:
            model = open_clip.CLIP(**TINY_CLIP).to(device)
        else:
            with torch.device(device):  # random init where it runs
                model = open_clip.create_model(arch, pretrained=None, device=device)
        return model.to(dtype).eval().requires_grad_(False)

    tok = open_clip.get_tokenizer("ViT-H-14")  # open_clip's bundled BPE (no hub)
    hps = HPSv2Reward(model=clip("ViT-H-14", ns.seed + 3), tokenizer=tok, precision=precision, device=device,
                      frames="first-middle-last")
    parts: dict[Any, float] = {hps: 1.0}
    arch = "a tiny CLIP" if ns.tiny else "ViT-H-14"
    where = "first/middle/last frames" if ns.family == "wan" else "the image"
    desc = [f"1 * hpsv2 ({arch}, random weights, {precision}) on {where}"]
    if ns.family == "wan":
        video = make_video_reward_class()(clip("ViT-L-14", ns.seed + 4), ns.video_frames, tokenizer=tok,
                                          precision=precision, device=device)
        parts[video] = 1.0
        desc.append(f"1 * ViCLIP-style video score ({'a tiny CLIP' if ns.tiny else 'ViT-L-14'}, random weights, "
                    f"{ns.video_frames} frames mean-pooled)")
    return CompositeReward(parts, device=device), " + ".join(desc)


# ---- one row --------------------------------------------------------------------------------------------------------
def fingerprint(params) -> torch.Tensor:
    """Per-tensor float64 sums: a change detector that holds no copy of the weights."""
    return torch.stack([p.detach().double().sum() for p in params]).cpu()


def run_row(ns, path: str, frames: int, student, lora, reward_loss, text, meter: Meter, autocast) -> dict[str, Any]:
    """Warm-up + timed steps of one (path, frames); memory per phase, times, losses, weight checks."""
    from distill.cd import consistency_output

    device = student.device
    d = 2 if ns.tiny and ns.family != "wan" else 8  # the VAEs downsample 8x (the tiny image VAE 2x)
    h, w = ns.height // d, ns.width // d
    shape = (1 + (frames - 1) // 4, 16, h, w) if ns.family == "wan" else (16, h, w)
    patch = 2
    tokens = (shape[0] if ns.family == "wan" else 1) * (h // patch) * (w // patch)
    row: dict[str, Any] = {"path": path, "frames": frames, "latent_shape": list(shape), "tokens": tokens,
                           "pixel_shape": None}
    tok, mask, pooled = text
    g = torch.Generator().manual_seed(ns.seed + frames)
    x_t = torch.randn((1, *shape), generator=g).to(device)
    t = torch.full((1,), TIMESTEP, device=device)
    lora_params = list(student.model.parameters())
    base_params = [p for _, p in lora.named(None)]
    lora_before, base_before = fingerprint(lora_params), fingerprint(base_params)  # no copies of the weights
    opt = torch.optim.AdamW(lora_params, lr=ns.lr)
    row["lora_grads_gib"] = sum(p.numel() * 4 for p in lora_params) / GIB if meter.cuda else None
    times: dict[str, list[float]] = {k: [] for k in ("step_s", "fwd_s", "reward_s", "bwd_s", "opt_s")}
    mem: dict[str, list[float | None]] = {k: [] for k in ("activations_gib", "saved_after_forward_gib",
                                                          "reward_path_gib", "peak_gib", "peak_reserved_gib")}
    losses: list[float] = []
    meter.free()  # once per row: emptying the allocator's cache inside the loop would time cudaMalloc
    for i in range(ns.warmup + ns.steps):
        start = meter.allocated()
        meter.reset_peak()
        t0 = meter.now()
        # 1. the student's x0 (transformer forward, graph kept through the checkpointed blocks)
        with autocast():
            x0 = student.x0(x_t, t, tok, mask, pooled=pooled)
        x0 = consistency_output(x_t, x0.float(), t)
        t1 = meter.now()
        held, peak_fwd, reserved = meter.allocated(), meter.peak(), [meter.peak_reserved()]
        # 2. reward loss and its backward to x0
        leaf = x0.detach().requires_grad_(True)
        meter.reset_peak()
        loss = reward_loss(leaf)
        loss.backward()
        t2 = meter.now()
        peak_reward = meter.peak()
        reserved.append(meter.peak_reserved())
        losses.append(float(loss.detach()))
        del loss
        # 3. the transformer's backward
        meter.reset_peak()
        x0.backward(leaf.grad)
        t3 = meter.now()
        peak_bwd = meter.peak()
        reserved.append(meter.peak_reserved())
        del x0, leaf
        # 4. AdamW on the LoRA parameters
        before_opt = meter.allocated()
        opt.step()
        t4 = meter.now()
        if i == 0:
            row["optimizer_gib"] = _sub(meter.allocated(), before_opt)
        opt.zero_grad(set_to_none=True)
        if i < ns.warmup:
            continue
        for k, v in zip(("step_s", "fwd_s", "reward_s", "bwd_s", "opt_s"), (t4 - t0, t1 - t0, t2 - t1, t3 - t2,
                                                                             t4 - t3)):
            times[k].append(v)
        mem["activations_gib"].append(_sub(_max(peak_fwd, peak_bwd), start))
        mem["saved_after_forward_gib"].append(_sub(held, start))
        mem["reward_path_gib"].append(_sub(peak_reward, held))
        mem["peak_gib"].append(_max(peak_fwd, peak_reward, peak_bwd))
        mem["peak_reserved_gib"].append(_max(*reserved))
    row.update({k: statistics.median(v) for k, v in times.items()})
    if path == "pixel":
        row["pixel_shape"] = getattr(reward_loss, "pixel_shape", None)
    row["step_s_all"] = times["step_s"]
    row.update({k: _max(*v) for k, v in mem.items()})
    row["losses"] = losses
    with torch.no_grad():
        row["lora_changed"] = bool((lora_before != fingerprint(lora_params)).any())
        row["base_unchanged"] = bool(torch.equal(base_before, fingerprint(base_params)))
    row["status"] = "ok"
    return row


def guarded_row(ns, path, frames, student, lora, reward_loss, text, meter, autocast) -> dict[str, Any]:
    """``run_row``; CUDA out of memory -> ``does not fit`` (memory freed), other errors -> ``error``."""
    try:
        return run_row(ns, path, frames, student, lora, reward_loss, text, meter, autocast)
    except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
        if not meter.cuda and not is_oom(e):
            raise  # on CPU (the test) a failure is a failure
        status = "does not fit" if is_oom(e) else "error"
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    finally:
        for p in student.model.parameters():
            p.grad = None
        meter.free()
    return {"path": path, "frames": frames, "status": status, "error": msg}


# ---- the run --------------------------------------------------------------------------------------------------------
def bench(ns: argparse.Namespace) -> dict[str, Any]:
    import contextlib

    import diffusers

    from distill.lrm_ft import lrm_ft_loss
    from distill.reward import PixelReward

    device = torch.device(ns.device)
    dtype = torch.bfloat16 if ns.dtype == "bf16" else torch.float32
    meter = Meter(device)

    def autocast():
        return (torch.autocast("cuda", dtype=torch.bfloat16) if dtype == torch.bfloat16 and meter.cuda
                else contextlib.nullcontext())

    meter.free()
    m0 = meter.allocated()
    student, lora, model_cfg, n_params = build_student(ns, device, dtype)
    meter.free()
    weights = _sub(meter.allocated(), m0)
    text = text_inputs(ns, student, device)
    n_lora = sum(p.numel() for p in student.model.parameters())
    result: dict[str, Any] = {
        "family": ns.family, "device": torch.cuda.get_device_name(device) if meter.cuda else "cpu",
        "torch": torch.__version__, "diffusers": diffusers.__version__, "config": vars(ns),
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        "model": {"class": type(lora.model).__name__, "config": {k: list(v) if isinstance(v, tuple) else v
                                                                 for k, v in model_cfg.items()},
                  "params_m": n_params / 1e6, "lora_params_m": n_lora / 1e6, "lora_rank": ns.lora_rank,
                  "base_dtype": ns.dtype, "gradient_checkpointing": bool(ns.grad_ckpt), "timestep": TIMESTEP,
                  "text_tokens": list(text[0].shape)},
        "rewards": {}, "columns": COLUMNS, "rows": [], "ratios": []}
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        (out / f"family_reward_step_{ns.family}.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / f"family_reward_step_{ns.family}.md").write_text(markdown(result))

    tok, mask, _ = text
    for path in sorted(set(ns.paths), key=["lrm", "pixel"].index):  # LRM first: pixel rows are the OOM-prone ones
        m1 = meter.allocated()
        if path == "lrm":
            head = build_lrm(ns, device, int(tok.shape[-1]))
            result["rewards"]["lrm"] = f"{ns.lrm} (latent_rewards defaults, in_channels 16, random weights)"

            def reward_loss(x0, head=head):
                return lrm_ft_loss(head, x0, tok, mask)[0]
        else:
            vae = build_vae(ns, device)
            reward, desc = build_pixel_reward(ns, device, dtype)
            # image VAEs: the toolkit's chunked decoder checkpointing; video VAEs: whole clips, batch 1 (see doc)
            term = PixelReward(reward, vae, checkpointing=bool(ns.grad_ckpt) and not vae.is_video)
            result["rewards"]["pixel"] = (f"{type(vae.vae).__name__} decode (fp32 weights, bf16 autocast on CUDA, "
                                          f"{'whole clips, ' if vae.is_video else ''}decoder checkpointing "
                                          f"{term.checkpointing}) + {desc}")

            def reward_loss(x0, term=term):
                return term.loss(x0, tok, mask, [PROMPT])[0]

            def seen(module, args, fn=reward_loss):  # the decoded pixels the rewards score, for the JSON
                fn.pixel_shape = list(args[0].shape)

            reward.register_forward_pre_hook(seen)
        meter.free()
        reward_weights = _sub(meter.allocated(), m1)
        failed_at = None
        for frames in sorted(ns.frames):
            if failed_at is not None and not ns.try_all:
                row = {"path": path, "frames": frames, "status": "skipped",
                       "error": f"{failed_at} frames did not fit (--try_all runs it anyway)"}
            else:
                row = guarded_row(ns, path, frames, student, lora, reward_loss, text, meter, autocast)
                if row["status"] == "does not fit" and failed_at is None:
                    failed_at = frames
            row.update(weights_gib=weights, reward_weights_gib=reward_weights)
            result["rows"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "step_s_all"}), flush=True)
            save()
        reward_loss = None  # noqa: F841  (drop the reward models before the next path)
        head = vae = reward = term = None  # noqa: F841
        meter.free()
    result["ratios"] = ratios(result["rows"])
    save()
    return result


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per frame count: pixel / lrm reward-path memory and step time (where both ran), or the pixel status."""
    by = {(r["path"], r["frames"]): r for r in rows}
    outs = []
    for frames in sorted({r["frames"] for r in rows}):
        a, b = by.get(("lrm", frames)), by.get(("pixel", frames))
        if a is None or b is None:
            continue
        o: dict[str, Any] = {"frames": frames, "lrm_status": a["status"], "pixel_status": b["status"]}
        if a["status"] == b["status"] == "ok":
            if a.get("reward_path_gib") and b.get("reward_path_gib") is not None:
                o["reward_path_ratio"] = b["reward_path_gib"] / a["reward_path_gib"]
            o["step_time_ratio"] = b["step_s"] / a["step_s"]
        outs.append(o)
    return outs


def markdown(result: dict[str, Any]) -> str:
    def f(v, p=2):
        return "-" if v is None else f"{v:.{p}f}" if isinstance(v, float) else str(v)

    m = result["model"]
    lines = [f"# One reward fine-tuning step, {result['family']} ({m['class']} {m['params_m']:.4g}M, LoRA rank "
             f"{m['lora_rank']} = {m['lora_params_m']:.3g}M, {m['base_dtype']}, checkpointing "
             f"{m['gradient_checkpointing']}) on {result['device']}", ""]
    lines += [f"- {k}: {v}" for k, v in result["rewards"].items()] + [""]
    lines += ["| path | frames | latents | status | weights GiB | reward weights GiB | optimizer GiB | activations GiB "
              "| reward path GiB | peak GiB | step s | fwd / reward / bwd s |",
              "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        ok = r["status"] == "ok"
        lat = "x".join(map(str, r.get("latent_shape", []))) or "-"
        lines.append(f"| {r['path']} | {r['frames']} | {lat} | {r['status']} | {f(r.get('weights_gib'))} | "
                     f"{f(r.get('reward_weights_gib'))} | {f(r.get('optimizer_gib'))} | "
                     f"{f(r.get('activations_gib'))} | {f(r.get('reward_path_gib'), 3)} | {f(r.get('peak_gib'))} | "
                     + (f"{r['step_s']:.3f} | {r['fwd_s']:.2f} / {r['reward_s']:.2f} / {r['bwd_s']:.2f} |" if ok
                        else "- | - |"))
    if result.get("ratios"):
        lines += ["", "| frames | pixel / lrm reward-path memory | pixel / lrm step time | pixel status |",
                  "|---:|---:|---:|---|"]
        for o in result["ratios"]:
            lines.append(f"| {o['frames']} | {f(o.get('reward_path_ratio'), 1)} | {f(o.get('step_time_ratio'), 2)} | "
                         f"{o['pixel_status']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ns = parse_args(argv)
    result = bench(ns)
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
