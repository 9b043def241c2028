"""Sampling speed: the 50-step CFG teacher against the 4 / 2 / 1-step student, eager against optimized (issue 21).

Side by side in one process, on the same network and VAE (Stable Diffusion 1.5 configs with random weights by default,
``--pipeline DIR``: any StableDiffusionPipeline directory, e.g. ``bench/device/make_sd15_pipeline.py``'s, or
``--teacher shapes-image|shapes-video``: a shipped Shapes teacher with the Shapes VAE), both through the library's
sampling call ``distill.inference.sample`` (``Denoiser.sample``, what ``lrm eval`` runs):

  teacher   ``sampler="ddim"``, ``--teacher_steps`` (50) DDIM steps, trailing spacing, Imagen CFG ``--guidance`` (7.5)
            as ONE batched network call of 2B per step (``Denoiser.guided``)
  student   ``sampler="student"``: the k-step consistency sampler, k = 4, 2, 1 at DOLLAR's timesteps
            (``distill.samplers.STUDENT_TIMESTEPS``), no CFG. The student is the teacher's network (same cost per
            call; its weights do not matter for speed)
  eager     the network in ``--dtype`` (bf16 on CUDA) as loaded (diffusers' SDPA attention), fp32 VAE decode
  optimized the library's fast path on copies: ``Denoiser.prepare_for_sampling`` (channels_last for 2-D UNets,
            ``torch.compile(mode=--compile)``, ``--fuse_qkv``) and ``lrm.latent_space.VAE``'s bf16 decode in
            channels_last
            (``distill.inference.prepare_vae_for_sampling``, decoder compiled with ``--compile_vae``)

Each (batch, sampler, variant) is run ``--warmup`` times (compilation happens there), then ``--repeats`` times; a run
records the denoising time and the decode time (CUDA events on GPU, perf_counter on CPU), so "decode excluded" and
"decode included" come from the same runs; medians are reported, and the speedup of each student row over the
teacher row of the same batch / variant / decode. Optimized outputs are compared with eager ones from the same noise
and generator: max abs diff and relative L2 error ``||opt - eager|| / ||eager||`` of the latents and of the pixels;
``ok`` when the pixels' relative error is within ``--tol`` (1e-2, bf16-size, by default; 1e-4 for an fp32 run without
compilation). The latents' max abs diff alone is no criterion: x0 = (x_t - sqrt(1 - a) eps) / sqrt(a) multiplies a
bf16 rounding of eps by ~15 at t = 999.
Writes ``sampling_speed.json`` and ``sampling_speed.md`` to ``--out``; no numbers are claimed here.

    PYTHONPATH=. python bench/sampling_speed.py --out runs/bench/sampling_speed            # GPU, SD-1.5 size
    PYTHONPATH=. python bench/sampling_speed.py --tiny --device cpu --compile none --out /tmp/ss   # CPU smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.builders import SHAPES_TEACHERS, build_teacher  # noqa: E402
from distill.inference import COMPILE_MODES  # noqa: E402

STUDENT_STEPS = (4, 2, 1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/bench/sampling_speed", help="output folder (JSON + markdown)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="the tiny random SD pipeline of tests/tiny_sd.py (CPU test)")
    p.add_argument("--pipeline", default=None, help="a StableDiffusionPipeline directory (default: random SD-1.5)")
    p.add_argument("--teacher", choices=SHAPES_TEACHERS, default=None,
                   help="a shipped Shapes teacher with the Shapes VAE instead of an SD pipeline")
    p.add_argument("--num_frames", type=int, default=16, help="frames of --teacher shapes-video samples")
    p.add_argument("--text_length", type=int, default=77, help="caption tokens (random embeddings)")
    p.add_argument("--compile_vae", choices=COMPILE_MODES, default="none",
                   help="torch.compile mode of the optimized VAE decoder")
    p.add_argument("--fuse_qkv", action="store_true", help="the optimized network also fuses q, k, v projections")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16], help="batch sizes")
    p.add_argument("--student_steps", type=int, nargs="+", default=list(STUDENT_STEPS), help="k of the students")
    p.add_argument("--teacher_steps", type=int, default=50, help="DDIM steps of the teacher")
    p.add_argument("--guidance", type=float, default=7.5, help="teacher CFG scale (Imagen form, batched)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="UNet dtype (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--compile", choices=COMPILE_MODES, default="max-autotune-no-cudagraphs",
                   help="torch.compile mode of the optimized UNet ('none': channels_last + bf16 decode only)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per row (compilation happens here)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per row (the median is reported)")
    p.add_argument("--tol", type=float, default=None,
                   help="relative L2 error allowed between optimized and eager pixels (default 1e-2; 1e-4 in fp32 "
                        "without compilation)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ---- models --------------------------------------------------------------------------------------------------------
def load_models(ns: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """``(teacher Denoiser, diffusers VAE, vae id, text width, latent shape)``: a Shapes teacher (``--teacher``), the
    tiny test pipeline, ``--pipeline``, or random SD-1.5 modules."""
    from diffusers import AutoencoderKL

    from distill.denoiser import Denoiser
    from lrm.schedules import DDPMSchedule

    if ns.teacher is not None:  # the shipped Shapes teachers and VAE, at the world's 32 px
        from lrm.latent_space import VAE

        den = build_teacher(argparse.Namespace(teacher=ns.teacher), device)
        den.model.to(dtype)
        vae = VAE.from_pretrained("shapes").vae
        C, s = int(vae.config.latent_channels), 32 // (2 ** (len(vae.config.block_out_channels) - 1))
        shape = (ns.num_frames, C, s, s) if den.is_video else (C, s, s)
        return den.eval(), vae.to(device).eval(), "shapes-vae", int(den.null_tokens.shape[-1]), shape
    src = ns.pipeline
    if ns.tiny:
        from tests.tiny_sd import save_tiny_sd_pipeline

        src = save_tiny_sd_pipeline(Path(tempfile.mkdtemp(prefix="tiny_sd_")))
    if src is not None:
        den = Denoiser.from_diffusers(src, device=device, dtype=dtype)
        vae = AutoencoderKL.from_pretrained(src, subfolder="vae")
    else:
        from bench.distill_step_cost import sd15_unet, sd_vae

        torch.manual_seed(ns.seed)
        unet, vae = sd15_unet(), sd_vae()
        schedule = DDPMSchedule(1000, "scaled_linear", 0.00085, 0.012)
        den = Denoiser(unet.to(device, dtype), schedule, "eps", use_text_mask=False)
    cfg = den.model.config
    return (den.eval(), vae.to(device).eval(), str(src or "random-sd15"), int(cfg.cross_attention_dim),
            (cfg.in_channels, cfg.sample_size, cfg.sample_size))


def variants(den, vae, vae_id: str, ns: argparse.Namespace):
    """``{"eager": (Denoiser, VAE), "optimized": (...)}``: the eager path (fp32 VAE decode, network as loaded) and
    the library's fast path on copies (``Denoiser.prepare_for_sampling`` + ``lrm.latent_space.VAE``'s bf16
    decode)."""
    from distill.denoiser import Denoiser
    from distill.inference import prepare_vae_for_sampling
    from lrm.latent_space import VAE

    opt = Denoiser(copy.deepcopy(den.model), den.schedule, den.parameterization,
                   cfg_null=(den.null_tokens, den.null_mask), use_text_mask=den.use_text_mask).eval()
    applied = opt.prepare_for_sampling(ns.compile, channels_last=True, fuse_qkv=ns.fuse_qkv)
    eager = (den, VAE(vae, vae_id, chunk_size=0))
    fast_vae = VAE(copy.deepcopy(vae), vae_id, chunk_size=0, autocast_bf16=True)
    applied = {"denoiser": applied, "vae": prepare_vae_for_sampling(fast_vae, ns.compile_vae, channels_last=True)}
    return {"eager": eager, "optimized": (opt, fast_vae)}, applied


# ---- samplers (the toolkit's; nothing re-implemented) -------------------------------------------------------------
def make_sampler(name: str, den, ns: argparse.Namespace) -> Callable[..., torch.Tensor]:
    """``distill.inference.sample``: the teacher's CFG DDIM or the k-step student sampler."""
    if name == "teacher":
        def teacher(noise, tokens, generator):
            return den.sample(noise, tokens, None, sampler="ddim", steps=ns.teacher_steps,
                              guidance_scale=ns.guidance)
        return teacher
    k = int(name.split("_")[1])

    def student(noise, tokens, generator):
        return den.sample(noise, tokens, None, sampler="student", steps=k, generator=generator)
    return student


class Timer:
    """Elapsed ms between marks: CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def intervals(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1000.0 for a, b in zip(self.marks, self.marks[1:])]


@torch.no_grad()
def run_once(sample, vae, noise, tokens, seed: int, device: torch.device):
    """One timed run: ``(x0, pixels, denoise_ms, decode_ms)``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    timer = Timer(device)
    timer.mark()
    x0 = sample(noise, tokens, g)
    timer.mark()
    pixels = vae.decode(x0)
    timer.mark()
    d, v = timer.intervals()
    return x0, pixels, d, v


def bench(ns: argparse.Namespace, on_batch: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """All rows; ``on_batch(partial result)`` after each batch size (a run cut short keeps what it measured)."""
    device = torch.device(ns.device)
    dt = ns.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dt]
    tol = ns.tol if ns.tol is not None else (1e-4 if dtype == torch.float32 and ns.compile == "none" else 1e-2)
    den, vae, vae_id, text_dim, shape = load_models(ns, device, dtype)
    paths, applied = variants(den, vae, vae_id, ns)
    samplers = ["teacher"] + [f"student_{k}" for k in ns.student_steps]
    rows, checks = [], []
    for B in ns.batches:
        gen = torch.Generator().manual_seed(ns.seed + B)
        noise = torch.randn((B, *shape), generator=gen).to(device)
        tokens = torch.randn((B, ns.text_length, text_dim), generator=gen).to(device)
        for name in samplers:
            outs = {}
            for variant, (d, v) in paths.items():
                sample = make_sampler(name, d, ns)
                for _ in range(ns.warmup):
                    run_once(sample, v, noise, tokens, ns.seed, device)
                den_ms, dec_ms = [], []
                for _ in range(ns.repeats):
                    x0, pixels, a, b = run_once(sample, v, noise, tokens, ns.seed, device)
                    den_ms.append(a)
                    dec_ms.append(b)
                outs[variant] = (x0.float().cpu(), pixels.cpu())
                steps = ns.teacher_steps if name == "teacher" else int(name.split("_")[1])
                nfe = steps * (2 if name == "teacher" and ns.guidance != 1.0 else 1)  # UNet batch-B passes
                for decode_inc in (False, True):
                    ms = [a + (b if decode_inc else 0.0) for a, b in zip(den_ms, dec_ms)]
                    rows.append({"batch": B, "sampler": name, "steps": steps, "nfe": nfe, "variant": variant,
                                 "decode": "included" if decode_inc else "excluded",
                                 "median_ms": statistics.median(ms), "times_ms": ms})
            diff = [outs["optimized"][i] - outs["eager"][i] for i in (0, 1)]
            rel = [(d.norm() / outs["eager"][i].norm().clamp_min(1e-12)).item() for i, d in enumerate(diff)]
            checks.append({"batch": B, "sampler": name, "max_abs_diff_latents": diff[0].abs().max().item(),
                           "max_abs_diff_pixels": diff[1].abs().max().item(), "rel_err_latents": rel[0],
                           "rel_err_pixels": rel[1], "tol": tol, "ok": bool(rel[1] <= tol)})
        if on_batch is not None:
            on_batch(result(ns, device, dt, shape, applied, rows, checks))
    return result(ns, device, dt, shape, applied, rows, checks)


def result(ns, device, dt, shape, applied, rows, checks) -> dict[str, Any]:
    """The JSON: rows with their speedup over the teacher row of the same batch / variant / decode."""
    teacher_ms = {(r["batch"], r["variant"], r["decode"]): r["median_ms"] for r in rows if r["sampler"] == "teacher"}
    for r in rows:
        r["speedup_vs_teacher"] = teacher_ms[(r["batch"], r["variant"], r["decode"])] / r["median_ms"]
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "config": {k: v for k, v in vars(ns).items()}, "dtype": dt, "latent_shape": list(shape),
            "optimized": applied,
            "torch": torch.__version__, "rows": rows, "checks": checks}


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# Sampling speed ({result['device']}, UNet {result['dtype']}, latents {result['latent_shape']}, "
             f"compile={result['config']['compile']})", "",
             "| batch | sampler | NFE | variant | decode | median ms | speedup vs teacher |",
             "|---:|---|---:|---|---|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['batch']} | {r['sampler']} | {r['nfe']} | {r['variant']} | {r['decode']} | "
                     f"{r['median_ms']:.2f} | {r['speedup_vs_teacher']:.2f}x |")
    lines += ["", "| batch | sampler | latents: max abs diff (opt - eager) | rel. L2 error | pixels: max abs diff | "
                  "rel. L2 error | tol | ok |", "|---:|---|---:|---:|---:|---:|---:|---|"]
    for c in result["checks"]:
        lines.append(f"| {c['batch']} | {c['sampler']} | {c['max_abs_diff_latents']:.3g} | "
                     f"{c['rel_err_latents']:.2g} | "
                     f"{c['max_abs_diff_pixels']:.3g} | {c['rel_err_pixels']:.2g} | {c['tol']:g} | {c['ok']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ns = parse_args(argv)
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)

    def write(res: dict[str, Any]) -> None:
        (out / "sampling_speed.json").write_text(json.dumps(res, indent=2) + "\n")
        (out / "sampling_speed.md").write_text(markdown(res))

    res = bench(ns, on_batch=write)
    write(res)
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
