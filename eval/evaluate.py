"""Evaluate any generator: gold and proxy rewards, attribute accuracy, diversity, speed, distance.

A generator is any callable ``generator(noise, text_tokens, text_mask) -> latents`` (a sampler closure over
a student or teacher). It may also accept keyword arguments ``prompts`` (list[str]) and ``seeds``
(list[int]); they are passed when its signature names them (the Shapes data generator uses them). It may
return a tensor, or a dict with ``"latents"`` and optionally ``"nfe"`` (network evaluations per sample)
and ``"kl"`` (``(B,)`` per-sample KL from the reference chain, see ``eval.kl.gaussian_chain_kl``).

Output: one row per sample (tidy), a per-prompt view, and a summary with bootstrap confidence intervals
(resampling PROMPTS, since samples of one prompt are correlated). With ``save_samples=True`` every sample is
also kept as a file (``samples/p{prompt_id:04d}_s{seed}.webp``, column ``sample_file``): the input of a human
pairwise study (``lrm human-eval prepare``).
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from eval.kl import smoothed_output_kl
from eval.vendi import keyframe_diversity, keyframe_indices

ATTRIBUTES = ("shape", "color", "count", "background", "position", "direction", "speed")
# Score >= threshold counts as correct for reward_adapters' graded shapes-* scores: count scores 1/(1+|err|),
# so only an exact count passes 0.75; direction scores 0.5 + 0.5 cos(angle), 0.75 = within 60 degrees.
SHAPES_ACCURACY_THRESHOLDS = {"color": 0.5, "shape": 0.5, "count": 0.75, "position": 0.5, "direction": 0.75}


def shapes_accuracy_rewards(video: bool = False, **options) -> dict[str, Callable]:
    """Per-attribute Shapes rewards from reward_adapters ("shapes-color", ...) keyed by attribute name."""
    try:
        from reward_adapters import create_reward
    except ImportError as e:
        raise ImportError(f"Shapes attribute accuracy needs the reward_adapters package ({e})") from None
    attrs = ["color", "shape", "count", "position"] + (["direction"] if video else [])
    return {a: create_reward(f"shapes-{a}", **options) for a in attrs}


# ---- diversity embeddings ------------------------------------------------------------------------------

DIVERSITY_FEATURES = ("pixels", "pooled", "vae")


class PooledPixels:
    """Diversity features: pixels average-pooled to ``size`` x ``size`` (layout and colour; blind to pixel noise,
    which inflates raw-pixel Vendi when samples degrade into noise). ``(n, 3, H, W) -> (n, 3 size^2)``."""

    def __init__(self, size: int = 8):
        if size < 1:
            raise ValueError(f"pool size must be >= 1, got {size}")
        self.size = int(size)
        self.name = f"pooled{self.size}"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x).float()
        return torch.nn.functional.adaptive_avg_pool2d(x, self.size).flatten(1)


class VAEFeatures:
    """Diversity features: the VAE encoder's (deterministic) latents of the pixels, flattened: ``(n, 3, H, W) ->
    (n, C h w)``."""

    name = "vae"

    def __init__(self, vae):
        if not hasattr(vae, "encode"):
            raise ValueError("VAEFeatures needs a VAE with .encode(pixels) (lrm.latent_space.VAE)")
        self.vae = vae

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        dev = getattr(self.vae, "device", "cpu")
        return self.vae.encode(torch.as_tensor(x).float().to(dev)).float().cpu().flatten(1)


def diversity_embedding(name: str, vae: Any = None, pool_size: int = 8) -> Callable | None:
    """The ``diversity_features`` callable of ``evaluate`` for a config name: "pixels" (None: raw pixels),
    "pooled" (``PooledPixels(pool_size)``) or "vae" (``VAEFeatures(vae)``)."""
    if name == "pixels":
        return None
    if name == "pooled":
        return PooledPixels(pool_size)
    if name == "vae":
        if vae is None:
            raise ValueError("diversity_features='vae' needs the VAE (pass vae=)")
        return VAEFeatures(vae)
    raise ValueError(f"diversity_features must be one of {DIVERSITY_FEATURES}, got {name!r}")


def features_name(features: Callable | None) -> str:
    if features is None:
        return "pixels"
    return str(getattr(features, "name", getattr(features, "__name__", type(features).__name__)))


# ---- generator protocol ------------------------------------------------------------------------------

def _accepts(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def call_generator(generator: Callable, noise: torch.Tensor, text_tokens=None, text_mask=None,
                   prompts: list[str] | None = None, seeds: list[int] | None = None) -> dict:
    """Call a generator and normalise its output to a dict with ``latents`` (and ``nfe``/``kl`` when given)."""
    kw = {}
    if prompts is not None and _accepts(generator, "prompts"):
        kw["prompts"] = prompts
    if seeds is not None and _accepts(generator, "seeds"):
        kw["seeds"] = seeds
    out = generator(noise, text_tokens, text_mask, **kw)
    if isinstance(out, torch.Tensor):
        out = {"latents": out}
    elif not (isinstance(out, dict) and isinstance(out.get("latents"), torch.Tensor)):
        raise TypeError(
            f"generator {getattr(generator, '__name__', type(generator).__name__)} must return a latents tensor or a "
            f"dict with a 'latents' tensor, got {type(out).__name__}"
        )
    if out["latents"].shape[0] != noise.shape[0]:
        raise ValueError(f"generator returned {out['latents'].shape[0]} latents for a batch of {noise.shape[0]} noises")
    if "nfe" not in out and getattr(generator, "nfe", None) is not None:
        out["nfe"] = generator.nfe
    return out


def sample_noise(shape: Sequence[int], seed: int, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=g).to(device)


def noise_seed(seed: int, prompt_index: int) -> int:
    """The noise seed of sample (prompt i, seed s): independent streams for every pair, reproducible."""
    return int(np.random.SeedSequence([int(seed), int(prompt_index)]).generate_state(1)[0])


# ---- per-sample files ------------------------------------------------------------------------------------

SAMPLE_FPS = 8  # frame rate of saved videos (shapes.grid.save_gif's)


def encode_sample(x: torch.Tensor, fps: int = SAMPLE_FPS) -> bytes:
    """One sample as a lossless WebP: ``(3, H, W)`` -> an image, ``(T, 3, H, W)`` -> an animated (looping) WebP.

    WebP, not PNG/GIF: lossless for both images and videos (GIF has 256 colours), no video codec needed, every
    browser shows it, and ``eval.report`` (which inlines every PNG/GIF of a run) does not list each sample."""
    import io

    from PIL import Image

    from shapes.grid import to_uint8

    a = to_uint8(x.float())  # (H, W, 3) or (T, H, W, 3)
    buf = io.BytesIO()
    if a.ndim == 3:
        Image.fromarray(a).save(buf, "WEBP", lossless=True, quality=100, method=4)
    else:
        frames = [Image.fromarray(f) for f in a]
        frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:], lossless=True, quality=100, method=4,
                       duration=int(round(1000 / fps)), loop=0)
    return buf.getvalue()


def sample_file_name(prompt_id: int, seed: int) -> str:
    return f"samples/p{int(prompt_id):04d}_s{int(seed)}.webp"


# ---- results -----------------------------------------------------------------------------------------

def _bootstrap_ci(groups: list[np.ndarray], stat: Callable[[np.ndarray], float], n_boot: int, ci: float,
                  rng: np.random.Generator) -> tuple[float, float]:
    """Percentile CI of ``stat(concat(groups))`` resampling groups (prompts) with replacement."""
    k = len(groups)
    if k < 2 or n_boot <= 0:
        return float("nan"), float("nan")
    vals = []
    for _ in range(n_boot):
        pick = rng.integers(0, k, k)
        v = stat(np.concatenate([groups[i] for i in pick]))
        if np.isfinite(v):
            vals.append(v)
    if not vals:
        return float("nan"), float("nan")
    a = (1 - ci) / 2
    return float(np.quantile(vals, a)), float(np.quantile(vals, 1 - a))


def _nanmean(a: np.ndarray) -> float:
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else float("nan")


@dataclass
class EvalResult:
    """``samples``: one row per sample; ``per_prompt``: means per prompt (+ diversity); ``summary``: one row per
    metric with mean and bootstrap CI; ``meta``: settings and speed; ``preview``: pixels of the first samples;
    ``sample_files``: (save_samples) every sample's encoded file, keyed by its path relative to the output directory
    (the ``sample_file`` column)."""

    samples: pd.DataFrame
    per_prompt: pd.DataFrame
    summary: pd.DataFrame
    meta: dict = field(default_factory=dict)
    preview: torch.Tensor | None = None
    sample_files: dict[str, bytes] = field(default_factory=dict)

    def metric(self, name: str) -> float:
        row = self.summary[self.summary["metric"] == name]
        if row.empty:
            raise KeyError(f"no metric {name!r}; available: {list(self.summary['metric'])}")
        return float(row["mean"].iloc[0])

    def save(self, out_dir: str | Path, preview_nrow: int | None = None) -> dict[str, Path]:
        """Write samples/per_prompt/summary as Parquet + CSV, ``eval.json``, a preview grid (PNG; GIF for video)
        and, when kept (save_samples), one file per sample under ``samples/``."""
        from lrm.io import atomic_write_bytes, write_json

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths: dict[str, Path] = {}
        for rel, data in self.sample_files.items():  # before the tables that name them
            atomic_write_bytes(out / rel, data)
        if self.sample_files:
            paths["sample_files"] = out / Path(next(iter(self.sample_files))).parent
        for name, df in (("samples", self.samples), ("per_prompt", self.per_prompt), ("summary", self.summary)):
            df.to_parquet(out / f"{name}.parquet", index=False)
            df.to_csv(out / f"{name}.csv", index=False)
            paths[name] = out / f"{name}.csv"
        write_json(out / "eval.json", {"meta": self.meta, "summary": self.summary.to_dict(orient="records")})
        paths["json"] = out / "eval.json"
        if self.preview is not None and len(self.preview):
            from shapes.grid import save_gif, save_grid, save_video_strip

            x = self.preview.float()
            nrow = preview_nrow or int(self.meta.get("n_per_prompt", 8))
            if x.dim() == 5:
                paths["strip"] = save_video_strip(x, out / "samples_strip.png", frames=8, scale=2)
                paths["gif"] = save_gif(x, out / "samples.gif", nrow=nrow, scale=2)
            else:
                paths["grid"] = save_grid(x, out / "samples.png", nrow=nrow, scale=2)
        return paths


# ---- evaluation --------------------------------------------------------------------------------------

def _call_reward(reward: Callable, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    modality = getattr(reward, "modality", None)
    with torch.no_grad():
        r = reward(pixels, None if modality in ("image", "video") else prompts)
    r = torch.as_tensor(r).detach().float().reshape(-1).cpu()
    if r.shape[0] != pixels.shape[0]:
        raise ValueError(f"reward {getattr(reward, 'name', reward)!r} returned {r.shape[0]} values for "
                         f"{pixels.shape[0]} samples; a reward must return shape (B,)")
    return r


def _encode_text(text_encoder, prompts: list[str], device):
    if text_encoder is None:
        return None, None
    emb = text_encoder(prompts)
    tokens, mask = (emb.tokens, emb.mask) if hasattr(emb, "tokens") else emb
    return tokens.to(device), mask.to(device)


def evaluate(
    generator: Callable,
    prompts: Sequence[str],
    n_per_prompt: int = 4,
    seeds: int | Sequence[int] = 0,
    gold_rewards: dict[str, Callable] | None = None,
    proxy_rewards: dict[str, Callable] | None = None,
    decode: Any = None,
    text_encoder: Any = None,
    latent_shape: Sequence[int] = (4, 8, 8),
    accuracy_rewards: dict[str, Callable] | None = None,
    accuracy_threshold: float | dict[str, float] | None = None,
    diversity_features: Callable | None = None,
    keyframe_stride: int = 20,
    reference: Callable | None = None,
    kl_sigma: float = 1.0,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    n_bootstrap: int = 1000,
    ci: float = 0.95,
    n_preview: int = 32,
    warmup: bool = True,
    progress: bool = True,
    name: str = "generator",
    save_samples: bool = False,
) -> EvalResult:
    """Evaluate ``generator`` on ``prompts`` x ``n_per_prompt`` fixed-seed samples.

    Args:
        generator: ``fn(noise, text_tokens, text_mask) -> latents`` (see module doc for the optional extras).
        prompts: prompt set; sample j of prompt i uses noise seed ``noise_seed(seeds[j], i)``.
        seeds: one seed per sample index (list of ``n_per_prompt``), or a base seed b meaning b, b+1, ...
        gold_rewards: name -> pixel reward (``reward(pixels in [0,1], prompts) -> (B,)``, reward_adapters API).
        proxy_rewards: name -> latent reward (``fn(latents, text_tokens, text_mask) -> (B,)``, LatentReward API).
        decode: a ``VAE`` (uses ``.decode``) or a callable latents -> pixels in [0, 1]; needed for gold rewards,
            accuracy and pixel diversity.
        text_encoder: ``TextEncoder`` or callable prompts -> (tokens, mask); None for unconditional generators.
        latent_shape: per-sample noise shape, ``(C, h, w)`` or ``(T, C, h, w)``.
        accuracy_rewards: attribute (one of shapes.parse_caption's keys) -> reward scoring that attribute in
            [0, 1] (``shapes_accuracy_rewards()``); a sample counts as correct when the score >= the
            attribute's threshold (``accuracy_threshold``: one float, a dict per attribute, or None for
            ``SHAPES_ACCURACY_THRESHOLDS`` / 0.5). Only attributes the prompt names are scored (others are
            NaN); ``acc/all`` = every named attribute correct.
        diversity_features: None = Vendi on raw pixels, else an embedding ``(n, 3, H, W) -> (n, D)``, e.g.
            ``diversity_embedding("pooled")`` / ``diversity_embedding("vae", vae)``; its ``name`` is recorded as
            ``meta["diversity_features"]``.
        keyframe_stride: DOLLAR Eq. 27 keyframe spacing for videos (every 20th frame).
        reference: optional reference generator; with it the per-sample smoothed-output KL (shared noise,
            ``kl_sigma``) is recorded as ``kl`` and d = sqrt(mean KL) in the summary.
        batch_size: samples per generator call.
        n_bootstrap, ci: bootstrap resamples over prompts and the confidence level.
        n_preview: how many decoded samples (prompt-major) to keep for a preview grid.
        warmup: run the first batch once untimed (CUDA init, cudnn autotune) before timing.
        save_samples: keep every decoded sample as a lossless WebP (``encode_sample``; videos animated at
            ``SAMPLE_FPS``) in ``EvalResult.sample_files``, named in the ``sample_file`` column; ``save`` writes them.
    """
    from tqdm.auto import tqdm

    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty list of strings")
    if n_per_prompt < 1:
        raise ValueError(f"n_per_prompt must be >= 1, got {n_per_prompt}")
    seed_list = [int(seeds) + j for j in range(n_per_prompt)] if isinstance(seeds, (int, np.integer)) else list(seeds)
    if len(seed_list) != n_per_prompt:
        raise ValueError(f"got {len(seed_list)} seeds for n_per_prompt={n_per_prompt}; pass one per sample or an int")
    if save_samples and len(set(seed_list)) != len(seed_list):
        raise ValueError(f"save_samples names each file by (prompt, seed), but seeds {seed_list} repeat; pass distinct "
                         "seeds")
    gold_rewards = dict(gold_rewards or {})
    proxy_rewards = dict(proxy_rewards or {})
    accuracy_rewards = dict(accuracy_rewards or {})
    bad = [a for a in accuracy_rewards if a not in ATTRIBUTES]
    if bad:
        raise ValueError(f"accuracy_rewards keys must be caption attributes {ATTRIBUTES}, got {bad}")
    if decode is None:  # diversity is always measured on pixels (or on an embedding of them)
        raise ValueError("decode (a VAE or latents -> pixels callable) is required for gold rewards, accuracy and "
                         "diversity; pass decode=VAE.shapes() for the Shapes world")
    if isinstance(accuracy_threshold, dict):
        thresholds = {a: float(accuracy_threshold.get(a, 0.5)) for a in accuracy_rewards}
    elif accuracy_threshold is None:
        thresholds = {a: SHAPES_ACCURACY_THRESHOLDS.get(a, 0.5) for a in accuracy_rewards}
    else:
        thresholds = {a: float(accuracy_threshold) for a in accuracy_rewards}
    decode_fn = decode.decode if hasattr(decode, "decode") else decode
    device = torch.device(device)

    from shapes.world import parse_caption

    items = [(i, j) for i in range(len(prompts)) for j in range(n_per_prompt)]  # prompt-major
    rows: list[dict] = []
    keyframes: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(prompts))}
    preview: list[torch.Tensor] = []
    sample_files: dict[str, bytes] = {}
    gen_time, n_timed, nfe_seen = 0.0, 0, set()
    batches = [items[k:k + batch_size] for k in range(0, len(items), batch_size)]
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    for b_idx, batch in enumerate(tqdm(batches, desc=f"eval {name}", disable=not progress)):
        bp = [prompts[i] for i, _ in batch]
        nseeds = [noise_seed(seed_list[j], i) for i, j in batch]
        noise = torch.stack([sample_noise(latent_shape, s) for s in nseeds]).to(device)  # (B, *latent_shape)
        tokens, mask = _encode_text(text_encoder, bp, device)
        with torch.no_grad():
            if warmup and b_idx == 0:
                call_generator(generator, noise, tokens, mask, bp, nseeds)
            sync()
            t0 = time.perf_counter()
            out = call_generator(generator, noise, tokens, mask, bp, nseeds)
            sync()
            dt = time.perf_counter() - t0
        gen_time += dt
        n_timed += len(batch)
        latents = out["latents"]
        nfe = out.get("nfe")
        if nfe is not None:
            nfe_seen.add(int(nfe))
        cols: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for rname, r in proxy_rewards.items():
                v = torch.as_tensor(r(latents, tokens, mask)).detach().float().reshape(-1).cpu()
                if v.shape[0] != len(batch):
                    raise ValueError(f"proxy reward {rname!r} returned {v.shape[0]} values for {len(batch)} samples")
                cols[f"proxy/{rname}"] = v
            pixels = decode_fn(latents).float()  # (B, 3, H, W) or (B, T, 3, H, W) in [0, 1]
            for rname, r in gold_rewards.items():
                cols[f"gold/{rname}"] = _call_reward(r, pixels, bp)
            acc_scores = {a: _call_reward(r, pixels, bp) for a, r in accuracy_rewards.items()}
            if "kl" in out:
                cols["kl"] = torch.as_tensor(out["kl"]).double().reshape(-1).cpu()
            elif reference is not None:
                ref = call_generator(reference, noise, tokens, mask, bp, nseeds)["latents"]
                cols["kl"] = smoothed_output_kl(latents, ref, kl_sigma).cpu()
        pix_cpu = pixels.detach().cpu()
        kf = keyframe_indices(pix_cpu.shape[1], keyframe_stride) if pix_cpu.dim() == 5 else None
        for k, (i, j) in enumerate(batch):
            row = {"prompt_id": i, "prompt": prompts[i], "sample": j, "seed": seed_list[j], "noise_seed": nseeds[k],
                   "time_per_sample_s": dt / len(batch)}
            if nfe is not None:
                row["nfe"] = int(nfe)
                row["time_per_nfe_s"] = dt / len(batch) / max(int(nfe), 1)
            if save_samples:
                row["sample_file"] = sample_file_name(i, seed_list[j])
                sample_files[row["sample_file"]] = encode_sample(pix_cpu[k])
            for c, v in cols.items():
                row[c] = float(v[k])
            if accuracy_rewards:
                named = parse_caption(prompts[i])
                correct = []
                for a, sc in acc_scores.items():
                    if named.get(a) is None:
                        row[f"acc/{a}"] = float("nan")
                    else:
                        ok = float(sc[k] >= thresholds[a])
                        row[f"acc/{a}"] = ok
                        correct.append(ok)
                row["acc/all"] = float(all(correct)) if correct else float("nan")
            rows.append(row)
            keyframes[i].append((pix_cpu[k, kf] if kf is not None else pix_cpu[k]).half())
            if len(preview) < n_preview:
                preview.append(pix_cpu[k].half())

    samples = pd.DataFrame(rows)
    metric_cols = [c for c in samples.columns if c.startswith(("gold/", "proxy/", "acc/")) or c == "kl"]

    # per-prompt view: means of every metric + Vendi diversity over that prompt's samples
    per_prompt = samples.groupby(["prompt_id", "prompt"], sort=True)[metric_cols].mean().reset_index()
    div = []
    for i in range(len(prompts)):
        x = torch.stack(keyframes[i]).float()  # (n, K, 3, H, W) or (n, 3, H, W)
        div.append(keyframe_diversity(x, stride=1, features=diversity_features) if x.dim() == 5
                   else keyframe_diversity(x, features=diversity_features))
    per_prompt["diversity"] = div
    per_prompt["n"] = samples.groupby("prompt_id").size().values

    # summary: mean and bootstrap CI over prompts
    rng = np.random.default_rng(0)
    summary_rows = []
    for c in metric_cols:
        groups = [g[c].to_numpy(dtype=np.float64) for _, g in samples.groupby("prompt_id")]
        allv = np.concatenate(groups)
        lo, hi = _bootstrap_ci(groups, _nanmean, n_bootstrap, ci, rng)
        summary_rows.append({"metric": c, "mean": _nanmean(allv), "ci_low": lo, "ci_high": hi,
                             "std": float(np.nanstd(allv)) if np.isfinite(allv).any() else float("nan"),
                             "n": int(np.isfinite(allv).sum())})
        if c == "kl":
            stat = lambda a: math.sqrt(max(_nanmean(a), 0.0))
            lo, hi = _bootstrap_ci(groups, stat, n_bootstrap, ci, rng)
            summary_rows.append({"metric": "d", "mean": stat(allv), "ci_low": lo, "ci_high": hi,
                                 "std": float("nan"), "n": int(np.isfinite(allv).sum())})
    dv = np.asarray(div, dtype=np.float64)
    lo, hi = _bootstrap_ci([np.array([v]) for v in dv], _nanmean, n_bootstrap, ci, rng)
    summary_rows.append({"metric": "diversity", "mean": float(dv.mean()), "ci_low": lo, "ci_high": hi,
                         "std": float(dv.std()), "n": len(dv)})
    tps = gen_time / max(n_timed, 1)
    summary_rows.append({"metric": "time_per_sample_s", "mean": tps, "ci_low": float("nan"),
                         "ci_high": float("nan"), "std": float("nan"), "n": n_timed})
    if len(nfe_seen) == 1:
        nfe_val = nfe_seen.pop()
        summary_rows.append({"metric": "time_per_nfe_s", "mean": tps / max(nfe_val, 1), "ci_low": float("nan"),
                             "ci_high": float("nan"), "std": float("nan"), "n": n_timed})
    else:
        nfe_val = None if not nfe_seen else sorted(nfe_seen)
    summary = pd.DataFrame(summary_rows)
    meta = {"name": name, "n_prompts": len(prompts), "n_per_prompt": n_per_prompt, "seeds": seed_list,
            "latent_shape": list(latent_shape), "batch_size": batch_size, "device": str(device),
            "nfe": nfe_val, "generation_time_s": gen_time, "kl_sigma": kl_sigma if reference is not None else None,
            "keyframe_stride": keyframe_stride, "diversity_features": features_name(diversity_features),
            "accuracy_thresholds": thresholds,
            "bootstrap": {"n": n_bootstrap, "ci": ci, "unit": "prompt"},
            "gold_rewards": sorted(gold_rewards), "proxy_rewards": sorted(proxy_rewards),
            "accuracy_attributes": sorted(accuracy_rewards)}
    return EvalResult(samples=samples, per_prompt=per_prompt, summary=summary, meta=meta,
                      preview=torch.stack(preview) if preview else None, sample_files=sample_files)
