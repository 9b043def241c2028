"""DOLLAR-style ablation on the Shapes world (GPU, ~8 min): CD only, VSD only, VSD+CD, VSD+CD+LRM (4 steps), and
VSD+CD at 1 and 2 steps, each a short run from configs/distill_shapes_ablation_*.yaml, and the baseline every
student starts from: the teacher itself sampled with the 4-step student sampler, no CFG, no training.

Per row, on held-out prompts (Shapes world seed 1), against the 50-step CFG teacher measured in the same run:
  speedup   wall-clock of the teacher (50 DDIM steps x CFG = 100 network calls) / the student (k calls), same batch
  adherence mean ``shapes-adherence`` reward (reward_adapters, classical vision on pixels), and its ratio to the teacher
            with a 90 % bootstrap interval over prompts (paired: same prompts and noise); per-prompt values in the JSON
  vendi     Vendi score (cosine kernel on raw pixels) over the samples of one prompt, averaged over prompts
  gold      the pixel reward the LRM targets (the configs' ``pixel_reward``, default colorfulness)
  sharpness variance of the Laplacian (``sharpness`` reward; video: mean over frames) relative to the teacher's: what
            adherence misses (an undistilled 4-step sampler draws blurred means that still read as the caption)
Writes ``OUT/ablation.json`` and ``OUT/ablation.md``, sample grids in ``OUT/<row>/``. ``--split val`` evaluates on
validation prompts (world seed 2, none of the test captions) instead: choose settings there, report the test table.

``--video``: the same rows on the 16-frame video teacher (``shapes-video``, a ``video-frame-avg`` LRM, batch 16 unless
``--batch_size``), adherence including motion direction, Vendi per DOLLAR Eq. 27 (mean over keyframes, every 4th
frame), frame strips instead of grids.

    PYTHONPATH=. python3 bench/distill_shapes_ablation.py --out runs/distill_ablation [--steps 300]
    PYTHONPATH=. python3 bench/distill_shapes_ablation.py --video --out runs/distill_ablation_video

``--suite tdm`` (issue 18, paper 004; implies ``--video``): on one teacher (``--teacher DIR``, e.g. the rectified-flow
Shapes video teacher; default ``shapes-video``) the rows VSD+CD, VSD+CD+LRM, TDM, TDM+GAN, TDM + mixed pixel rewards,
TDM + mixed latent rewards and all three (pixel and latent form), from configs/distill_shapes_ablation_tdm*.yaml.
Extra columns (any suite, with ``--frechet_n`` > 0; the tdm suite's default is 512):
  FD        Fréchet distance to real Shapes videos (``eval.frechet``: the Shapes VAE encoder's latents, 2x2-pooled,
            + net motion and path length; 40 dims, no download). Conditional protocol as COCO FID: the real set is
            samples 0..N-1 of the split's world (seed 1 test / 2 val), the generated set one sample per real caption
            (noise seed 4321); 90 % bootstrap interval, and the paired interval of FD(row) - FD(TDM) (shared
            resamples), both bias-corrected (``eval.frechet.paired_interval``)
  golds     each pixel reward the mixed terms target (colorfulness on the first / middle / last frame, flickering)
  s/step    median ``step_time_s`` of the row's log.csv;  peak MB: max ``peak_mem_mb`` there (CUDA; null on CPU)
Mixed latent rewards: the configs name ``LRM/<reward>``; the bench maps that to ``--lrm_dir`` (default OUT/lrms) and
first fits any that is missing (``fit_reward_lrms``: ``lrm train``'s ``fit`` on Shapes videos of the training world,
half of them noised in latent space for coverage; image-cnn on frames for a frame reward, video-3d-cnn on clips for a
video reward). ``--fit_lrms_only`` stops after that (run it beside the teacher's training).

GPU, three device calls of <= 9 min each (bench/device/tdm_ablation_run.sh; R = the results folder):
    1. teacher + LRMs, side by side (~8 min):
       python3 -m lrm.cli shapes train-teacher --kind video --parameterization flow --out_dir R/teacher_flow \
           --max_minutes 7 --steps 20000 --batch_size 96 --num_samples 24000 --workers 12 &
       python3 bench/distill_shapes_ablation.py --suite tdm --fit_lrms_only --lrm_dir R/lrms --out R/lrm_fit \
           --lrm_records 4096 --lrm_steps 1500 & wait
    2. the rows on validation prompts, one process per row (ROW in vsd_cd vsd_cd_lrm tdm tdm_gan tdm_mixed_pixel
       tdm_mixed_latent tdm_gan_mixed_pixel tdm_gan_mixed_latent), then one table with sampling retimed alone:
       python3 bench/distill_shapes_ablation.py --suite tdm --split val --teacher R/teacher_flow/teacher \
           --lrm_dir R/lrms --rows ROW --out R/tdm_val/ROW --steps 150 --timing_repeats 0 &  ...; wait
       python3 bench/distill_shapes_ablation.py --out R/tdm_val --merge R/tdm_val/* --retime
    3. the same with --split test and the settings chosen on val (--set KEY=VALUE): the reported table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# what fixes the evaluation batch (teacher, prompts, noise): runs that share these share their sampling times
EVAL_SETUP = ("kind", "teacher", "prompts", "split", "per_prompt", "latent_shape")
BASELINE = "teacher_4step"  # the teacher run with the students' 4-step sampler, untrained: what distillation adds
ROWS = [  # (row name, config file suffix)
    ("CD only (4 steps)", "cd_only"),
    ("VSD only (4 steps)", "vsd_only"),
    ("VSD+CD (4 steps)", "vsd_cd"),
    ("VSD+CD+LRM (4 steps)", "vsd_cd_lrm"),
    ("VSD+CD (2 steps)", "vsd_cd_2step"),
    ("VSD+CD (1 step)", "vsd_cd_1step"),
]
TDM_ROWS = [  # --suite tdm (issue 18): paper 004's terms beside DOLLAR's on the same teacher
    ("VSD+CD (4 steps)", "vsd_cd"),
    ("VSD+CD+LRM (4 steps)", "vsd_cd_lrm"),
    ("TDM (4 steps)", "tdm"),
    ("TDM+GAN", "tdm_gan"),
    ("TDM+mixed pixel rewards", "tdm_mixed_pixel"),
    ("TDM+mixed latent rewards", "tdm_mixed_latent"),
    ("TDM+GAN+mixed pixel (all three)", "tdm_gan_mixed_pixel"),
    ("TDM+GAN+mixed latent (all three)", "tdm_gan_mixed_latent"),
]
SUITES = {"dollar": ROWS, "tdm": TDM_ROWS}
LRM_PREFIX = "LRM/"  # in a config's spatial_rewards / temporal_reward: a LatentReward the bench fits into --lrm_dir
FRECHET_NOISE_SEED = 4321
# a row-per-process run:  for r in cd_only vsd_only ...; do ... --rows $r --out OUT/$r & done; wait
#                          then  bench/distill_shapes_ablation.py --out OUT --merge OUT/cd_only OUT/vsd_only ...


def timed(fn, repeats: int = 3) -> tuple[torch.Tensor, float]:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` calls after one warm-up call, CUDA-synchronised;
    ``repeats=0``: the one (cold) call's time."""
    def once() -> tuple[torch.Tensor, float]:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    if repeats == 0:
        return once()
    fn()
    runs = [once() for _ in range(repeats)]
    return runs[-1][0], sorted(t for _, t in runs)[len(runs) // 2]


def heldout_prompts(n: int, video: bool, split: str = "test") -> list[str]:
    """The first ``n`` distinct captions of a held-out Shapes world: ``test`` from seed 1 (every table), ``val`` from
    seed 2 minus the ``test`` captions (for choosing settings without looking at the test prompts)."""
    from shapes import ShapesWorld

    if split not in ("test", "val"):
        raise ValueError(f"split must be 'test' or 'val', got {split!r}")
    exclude = set(heldout_prompts(n, video)) if split == "val" else set()
    world = ShapesWorld(seed=1 if split == "test" else 2, num_frames=16 if video else None)
    prompts: list[str] = []
    i = 0
    while len(prompts) < n:
        c = world.sample(i).caption
        if c not in prompts and c not in exclude:
            prompts.append(c)
        i += 1
    return prompts


def eval_batch(prompts: int, per_prompt: int, video: bool, split: str, latent_shape, text_encoder,
               device: torch.device) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
    """The evaluation batch every generator of a table shares: the held-out prompts, each ``per_prompt`` times, their
    text tokens and mask, and fixed noise (seed 1234) of ``latent_shape`` per sample."""
    texts = [p for p in heldout_prompts(prompts, video, split) for _ in range(per_prompt)]
    emb = text_encoder(texts)
    noise = torch.randn((len(texts), *latent_shape), generator=torch.Generator().manual_seed(1234))
    return texts, emb.tokens.to(device), emb.mask.to(device), noise.to(device)


def ratio_ci(row: list[float], teacher: list[float], level: float = 0.9, n: int = 2000,
             seed: int = 0) -> list[float]:
    """Bootstrap interval (over prompts, paired: the same prompts and noise) of mean(row) / mean(teacher)."""
    a, b = torch.tensor(row, dtype=torch.float64), torch.tensor(teacher, dtype=torch.float64)
    idx = torch.randint(len(a), (n, len(a)), generator=torch.Generator().manual_seed(seed))
    ratios = a[idx].mean(1) / b[idx].mean(1).clamp_min(1e-12)
    lo, hi = torch.quantile(ratios, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return [float(lo), float(hi)]


def retime(meta: dict, results: dict, device: torch.device, teacher_cfg: float, repeats: int = 3) -> dict:
    """Sampling wall-clock of teacher and students measured again in this one process, alone on the device.

    The rows' own timings come from processes that share the GPU (one per row), so their speedups mix in the
    other rows' load. Every student here has the teacher's architecture, so a k-step student sample costs what
    ``student_sample`` with the teacher's network and the student's k timesteps costs: this times that against
    the 50-step CFG teacher on the same batch and noise, and returns the rows with ``seconds`` / ``speedup``
    replaced (the concurrent measurements kept as ``seconds_concurrent`` / ``speedup_concurrent``)."""
    from distill.builders import build_teacher
    from distill.samplers import STUDENT_TIMESTEPS, ddim_sample, student_sample
    from distill.trainer import DistillConfig
    from lrm.config import load_config
    from lrm.text import TextEncoder

    if "latent_shape" not in meta:
        raise SystemExit("--retime: the ablation.json has no latent_shape (written by an older version); rerun it")
    cfg = load_config(DistillConfig, ROOT / "configs/distill_shapes_ablation_cd_only.yaml",
                      {"teacher": meta["teacher"]})
    teacher = build_teacher(cfg, device)
    _, tok, mask, noise = eval_batch(meta["prompts"], meta["per_prompt"], meta["kind"] == "video",
                                     meta.get("split", "test"), meta["latent_shape"],
                                     TextEncoder(cfg.text_encoder, device=device), device)
    with torch.no_grad():
        _, t_time = timed(lambda: ddim_sample(teacher, noise, tok, mask, num_steps=50, guidance_scale=teacher_cfg),
                          repeats)
        student_time = {k: timed(lambda: student_sample(teacher, noise, tok, mask, timesteps=ts), repeats)[1]
                        for k, ts in STUDENT_TIMESTEPS.items()}
    return with_timings(results, t_time, student_time)


def setup_differs(a: dict, b: dict, keys=EVAL_SETUP) -> list[str]:
    """The ``keys`` in which two ablation runs' evaluation set-ups differ (same prompts, noise, teacher: [])."""
    return [k for k in keys if a.get(k) != b.get(k)]


def timings_of(run: dict, meta: dict) -> tuple[float, dict[int, float]]:
    """The retimed teacher seconds and k-step student seconds of a merged ``run`` (an ablation.json written with
    ``--retime``) measured on the same teacher, batch and noise as ``meta``: they do not depend on training."""
    differ = setup_differs(run, meta)
    if differ or not run.get("timing"):
        raise SystemExit(f"--timings_from: not a --retime merge of the same set-up (differs in {differ or ['timing']})")
    res = run["results"]
    return res["teacher"]["seconds"], {r["network_calls"]: r["seconds"] for k, r in res.items() if k != "teacher"}


def with_timings(results: dict, t_time: float, student_time: dict[int, float]) -> dict:
    """``results`` with teacher / k-step seconds and speedups replaced (old values kept as ``*_concurrent``)."""
    out = {"teacher": {**results["teacher"], "seconds_concurrent": results["teacher"]["seconds"], "seconds": t_time}}
    for key, r in results.items():
        if key == "teacher":
            continue
        s = student_time[r["network_calls"]]
        out[key] = {**r, "seconds_concurrent": r["seconds"], "speedup_concurrent": r["speedup"],
                    "seconds": s, "speedup": t_time / s}
    return out


def config_path(suffix: str) -> Path:
    return ROOT / f"configs/distill_shapes_ablation_{suffix}.yaml"


def mixed_reward_names(suffix: str) -> list[str]:
    """A row config's ``spatial_rewards`` + ``temporal_reward`` as written (``LRM/<reward>`` kept)."""
    raw = yaml.safe_load(config_path(suffix).read_text()) or {}
    return list(raw.get("spatial_rewards") or []) + ([raw["temporal_reward"]] if raw.get("temporal_reward") else [])


def targeted_rewards(suffixes) -> list[str]:
    """The pixel rewards the rows' mixed terms target (``LRM/<reward>`` counts as ``<reward>``), first-seen order."""
    out: list[str] = []
    for name in (n for s in suffixes for n in mixed_reward_names(s)):
        name = name[len(LRM_PREFIX):] if name.startswith(LRM_PREFIX) else name
        if name not in out:
            out.append(name)
    return out


def resolve_lrms(suffix: str, lrm_dir: Path) -> dict:
    """Overrides that replace a row's ``LRM/<reward>`` names by ``lrm_dir/<reward>`` ({} when it names none)."""
    raw = yaml.safe_load(config_path(suffix).read_text()) or {}

    def fix(n: str) -> str:
        return str(Path(lrm_dir) / n[len(LRM_PREFIX):]) if n.startswith(LRM_PREFIX) else n
    over: dict = {}
    if any(n.startswith(LRM_PREFIX) for n in raw.get("spatial_rewards") or []):
        over["spatial_rewards"] = [fix(n) for n in raw["spatial_rewards"]]
    if (raw.get("temporal_reward") or "").startswith(LRM_PREFIX):
        over["temporal_reward"] = fix(raw["temporal_reward"])
    return over


def fit_reward_lrms(names: list[str], lrm_dir: Path, vae, num_frames: int, device: torch.device,
                    records: int = 2048, steps: int = 1500, seed: int = 0) -> dict[str, dict]:
    """A LatentReward in ``lrm_dir/<name>`` for each pixel reward ``name`` that is not there yet (``lrm train``'s
    ``fit``; returns the new ones' held-out metrics).

    Data: ``records`` videos of the training world (ShapesWorld seed ``seed``, as the distillation data; never the
    held-out prompts), every other one noised in latent space (sigma ~ U[0, 0.5]) so that the LRM has seen the blur and
    flicker a student may produce; targets are the reward of what the latents decode to. A video reward gets a
    ``video-3d-cnn`` on clips; a frame reward an ``image-cnn`` on the first / middle / last frames (Eq. 13's frames,
    one record each)."""
    from distill.reward import spatial_frames
    from eval.frechet import real_shapes
    from latent_rewards import FitConfig, LatentData, fit
    from reward_adapters import create_reward

    todo = [n for n in names if not (Path(lrm_dir) / n / "model.safetensors").is_file()]
    if not todo:
        return {}
    pixels, captions = real_shapes(records, seed, num_frames)
    with torch.no_grad():
        z = torch.cat([vae.encode(c.to(device)).float() for c in pixels.split(256)])  # (N, T, C, h, w)
        g = torch.Generator().manual_seed(seed)
        sigma = torch.rand(len(z), generator=g) * 0.5 * (torch.arange(len(z)) % 2)
        z = z + sigma.view(-1, 1, 1, 1, 1).to(z) * torch.randn(z.shape, generator=g).to(z)
        pixels = torch.cat([vae.decode(c) for c in z.split(256)])  # (N, T, 3, H, W)
    metrics = {}
    for name in todo:
        reward = create_reward(name, device=str(device))
        with torch.no_grad():
            if reward.is_video_reward:
                lat, prompts, head = z, captions, "video-3d-cnn"
                target = torch.cat([reward(c) for c in pixels.split(256)])
                kw = {"patch": 2, "width": 64, "depth": 2}
            else:
                idx = spatial_frames(num_frames)
                lat, prompts, head = z[:, idx].flatten(0, 1), [c for c in captions for _ in idx], "image-cnn"
                target = torch.cat([reward(c) for c in pixels[:, idx].flatten(0, 1).split(1024)])
                kw = {"patch": 2, "width": 64}
        data = LatentData(lat.cpu(), target.float().cpu(), prompts=prompts, reward_name=name,
                          reward_info=reward.info(), latent_space=vae.latent_space.to_dict())
        cfg = FitConfig(head=head, head_kwargs=kw, steps=steps, batch_size=256, lr=1e-3,
                        warmup_steps=min(100, steps // 10), eval_every=max(1, min(250, steps // 2)), patience=4,
                        seed=seed, device=str(device), progress=False, checkpoint_every=0)
        res = fit(data, cfg, out_dir=Path(lrm_dir) / name)
        metrics[name] = {"head": head, "spearman": res.metrics["spearman"], "r2": res.metrics["r2"],
                         "train_s": res.train_time_s, "records": len(data)}
        print(f"LRM {name} ({head}, {len(data)} records): held-out Spearman {res.metrics['spearman']:.3f}, "
              f"{res.train_time_s:.0f} s", flush=True)
    return metrics


def log_costs(run_dir: Path, cuda: bool) -> dict:
    """s/step (median ``step_time_s``) and peak memory (max ``peak_mem_mb``; None off CUDA) of a run's log.csv."""
    import csv

    with open(Path(run_dir) / "log.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("step_time_s")]
    times = sorted(float(r["step_time_s"]) for r in rows)
    peaks = [float(r["peak_mem_mb"]) for r in rows if r.get("peak_mem_mb")]
    return {"step_time_s": times[len(times) // 2] if times else None,
            "peak_mem_mb": max(peaks) if cuda and peaks else None}


def frechet_columns(real_feats: torch.Tensor, gen_feats: torch.Tensor, boot: int) -> dict:
    """FD to the real features, its 90 % bootstrap interval and the replicates (shared resamples: paired)."""
    from eval.frechet import bootstrap_frechet, frechet_from_features, paired_interval

    reps = bootstrap_frechet(real_feats, gen_feats, boot) if boot else []
    fd = frechet_from_features(real_feats, gen_feats)
    return {"frechet": fd, "frechet_ci90": paired_interval(reps, estimate=fd) if reps else None,
            "frechet_boot": reps}


def tdm_checks(results: dict, golds: list[str]) -> list[str]:
    """Issue 18's expectations on the rows present (one line each)."""
    from eval.frechet import paired_interval

    t, lines = results["teacher"], []
    tdm = results.get("tdm")
    if tdm is None:
        return lines
    pct = (lambda a, b: f"{100 * a / max(b, 1e-12):.1f}%")
    lines.append(f"- TDM: adherence {pct(tdm['adherence'], t['adherence'])} of the teacher (>= 95 %), sharpness "
                 f"{pct(tdm['sharpness'], t['sharpness'])} (>= 90 %)")
    gan = results.get("tdm_gan")
    if gan is not None and gan.get("frechet_boot") and tdm.get("frechet_boot"):
        lo, hi = paired_interval(gan["frechet_boot"], tdm["frechet_boot"], estimate=gan["frechet"] - tdm["frechet"])
        lines.append(f"- GAN vs TDM: FD {gan['frechet']:.3f} vs {tdm['frechet']:.3f}, difference 90% CI "
                     f"[{lo:.3f}, {hi:.3f}] (lower is better)")
    full = results.get("tdm_gan_mixed_pixel")
    if full is not None:
        gains = ", ".join(f"{g} {full[f'gold:{g}'] - tdm[f'gold:{g}']:+.4g}" for g in golds)
        lines.append(f"- all three vs TDM: {gains}; adherence {pct(full['adherence'], t['adherence'])} of the "
                     "teacher (within 5 %)")
    pix, lat = results.get("tdm_mixed_pixel"), results.get("tdm_mixed_latent")
    if pix is not None and lat is not None:
        ratios = ", ".join(
            f"{g} {(lat[f'gold:{g}'] - tdm[f'gold:{g}']) / d:.2f}" if abs(d := pix[f"gold:{g}"] - tdm[f"gold:{g}"])
            > 1e-12 else f"{g} n/a" for g in golds)
        cost = (f"{lat['step_time_s'] / pix['step_time_s']:.2f}" if lat.get("step_time_s") and pix.get("step_time_s")
                else "n/a")
        lines.append(f"- latent / pixel reward gain over TDM (>= 0.8): {ratios}; step-time ratio latent / pixel "
                     f"{cost}")
    return lines


def write_tables(out: Path, meta: dict, results: dict) -> str:
    """``out/ablation.json`` (meta + results) and ``out/ablation.md`` (the table, rows in ``ROWS`` order)."""
    from lrm.io import write_json

    write_json(out / "ablation.json", {**meta, "results": results})
    t = results["teacher"]
    has_sharp = "sharpness" in t  # (runs before 2026-12-02 have no sharpness)
    sharp_head = " | sharpness vs teacher" if has_sharp else ""

    def sharp_cell(r: dict) -> str:
        return f" | {100 * r['sharpness'] / max(t['sharpness'], 1e-12):.0f}%" if has_sharp else ""
    # issue 18's columns, after "train s" (runs without them keep the old table)
    has_fd, golds, has_cost = "frechet" in t, list(meta.get("targeted_rewards") or []), meta.get("suite") == "tdm"
    tdm = results.get("tdm") if has_fd and results.get("tdm", {}).get("frechet_boot") else None
    extra_head = ((" | FD to real [90% CI]" + (" | FD - FD(TDM) [90% CI]" if tdm else "")) if has_fd else "") + \
        "".join(f" | {g}" for g in golds) + (" | s/step | peak MB" if has_cost else "")
    n_extra = extra_head.count(" | ")

    def extra_cells(r: dict) -> str:
        from eval.frechet import paired_interval

        cells = []
        if has_fd:
            ci = r.get("frechet_ci90")
            cells.append(f"{r['frechet']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
            if tdm:
                d = (paired_interval(r["frechet_boot"], tdm["frechet_boot"], estimate=r["frechet"] - tdm["frechet"])
                     if r.get("frechet_boot") and r is not tdm else None)
                cells.append(f"{r['frechet'] - tdm['frechet']:+.3f} [{d[0]:+.3f}, {d[1]:+.3f}]" if d else "-")
        cells += [f"{r[f'gold:{g}']:.4g}" if f"gold:{g}" in r else "-" for g in golds]
        if has_cost:
            cells += [f"{r['step_time_s']:.3f}" if r.get("step_time_s") is not None else "-",
                      f"{r['peak_mem_mb']:.0f}" if r.get("peak_mem_mb") is not None else "-"]
        return "".join(f" | {c}" for c in cells)
    lines = [f"Shapes {meta['kind']} ablation on {meta['device']} ({meta['prompts']} held-out "
             f"{'validation ' if meta.get('split') == 'val' else ''}prompts x "
             f"{meta['per_prompt']} samples; gold = {meta['gold_reward']}; total {meta['total_seconds']:.0f} s"
             + ("; sampling times retimed alone in one process" if meta.get("timing") else "") + ")", "",
             "| generator | NFE | sample s | speedup | adherence | vs teacher [90% CI] | Vendi | gold"
             f"{sharp_head} | train s{extra_head} |",
             "| --- " * ((10 if has_sharp else 9) + n_extra) + "|",
             f"| {t['name']} | {t.get('network_calls', 100)} | {t['seconds']:.3f} | 1.0x | {t['adherence']:.3f} | "
             f"100% | {t['vendi']:.3f} | "
             f"{t['gold']:.2f}{' | 100%' if has_sharp else ''} | -{extra_cells(t)} |"]
    for suffix in (BASELINE, *(s for _, s in SUITES[meta.get("suite") or "dollar"])):
        if suffix not in results:
            continue
        r = results[suffix]
        ci = r.get("adherence_vs_teacher_ci90")
        ci = f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else ""
        lines.append(f"| {r['name']} | {r['network_calls']} | {r['seconds']:.3f} | {r['speedup']:.1f}x | "
                     f"{r['adherence']:.3f} | {100 * r['adherence_vs_teacher']:.1f}%{ci} | {r['vendi']:.3f} | "
                     f"{r['gold']:.2f}{sharp_cell(r)} | {r.get('train_seconds', 0):.0f}{extra_cells(r)} |")
    if meta.get("suite") == "tdm":
        lines += ["", *tdm_checks(results, golds)]
    text = "\n".join(lines) + "\n"
    (out / "ablation.md").write_text(text)
    return text


def merge(out: Path, parts: list[str], retime_device: torch.device | None = None, teacher_cfg: float = 7.5,
          timings_from: Path | None = None) -> str:
    """One table from runs of disjoint ``--rows`` (e.g. one process per row): every part's teacher row must be
    the same measurement setup (same teacher, prompts and noise); the first part's teacher row is kept, and each
    row keeps the adherence ratio measured against the teacher in its own process. With ``retime_device`` the
    sampling times are measured again in this process (``retime``); with ``timings_from`` (a ``--retime`` merge of the
    same set-up) they are taken from there; else each row keeps its own speedup."""
    runs = [json.loads((Path(p) / "ablation.json").read_text()) for p in parts]
    keys = (*EVAL_SETUP, "gold_reward", "overrides", "suite", "frechet_n", "targeted_rewards")
    for p, r in zip(parts[1:], runs[1:]):
        differ = setup_differs(r, runs[0], keys)
        if differ:
            raise SystemExit(f"--merge: {p} differs from {parts[0]} in {differ}")
    results = {k: v for k, v in runs[0]["results"].items() if k in ("teacher", BASELINE)}
    for r in runs:
        results.update({k: v for k, v in r["results"].items() if k not in ("teacher", BASELINE)})
    meta = {**{k: runs[0].get(k) for k in (*keys, "device")}, "total_seconds": max(r["total_seconds"] for r in runs),
            "merged_from": parts,
            "teacher_adherence_per_part": [r["results"]["teacher"]["adherence"] for r in runs]}
    if retime_device is not None:
        results = retime(meta, results, retime_device, teacher_cfg)
        meta["timing"] = f"retimed alone in the merge process on {retime_device}"
    elif timings_from is not None:
        run = json.loads((Path(timings_from) / "ablation.json").read_text())
        results = with_timings(results, *timings_of(run, meta))
        meta["timing"] = f"{run['timing']} (taken from {timings_from})"
    out.mkdir(parents=True, exist_ok=True)
    return write_tables(out, meta, results)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/distill_ablation")
    ap.add_argument("--steps", type=int, default=None, help="override the configs' generator steps")
    ap.add_argument("--batch_size", type=int, default=None, help="override the configs' batch size")
    ap.add_argument("--rows", default="all",
                    help="comma list of config suffixes (cd_only,vsd_only,...), 'all', or 'none' (only the teacher and "
                         "the untrained 4-step baseline: the --reference of row processes)")
    ap.add_argument("--reference", default=None, metavar="DIR",
                    help="take the teacher and baseline rows from DIR (a --rows none run of the same set-up, waited "
                         "for up to --reference_wait s) instead of sampling them in this process")
    ap.add_argument("--reference_wait", type=float, default=900.0)
    ap.add_argument("--prompts", type=int, default=16, help="held-out prompts")
    ap.add_argument("--split", default="test",
                    help="held-out prompts: test (world seed 1, every table), val (seed 2 minus the test captions: "
                         "choose settings on val, report test) or val,test (each row trained once and scored on "
                         "both: OUT/val/ and OUT/test/ tables)")
    ap.add_argument("--per_prompt", type=int, default=8, help="samples per prompt (Vendi is over these)")
    ap.add_argument("--teacher_cfg", type=float, default=7.5, help="CFG scale of the 50-step teacher (Imagen form)")
    ap.add_argument("--teacher_steps", type=int, default=50,
                    help="DDIM steps of the teacher row (fewer: CPU tests only)")
    ap.add_argument("--teacher", default=None,
                    help="override the teacher (a Denoiser dir for tests; default shapes-image / shapes-video)")
    ap.add_argument("--video", action="store_true", help="16-frame video teacher and student")
    ap.add_argument("--suite", choices=tuple(SUITES), default="dollar",
                    help="dollar: DOLLAR's ablation rows; tdm: paper 004's TDM / GAN / mixed-reward rows beside VSD+CD "
                         "and VSD+CD+LRM (implies --video)")
    ap.add_argument("--num_frames", type=int, default=16, help="--video: frames per clip")
    ap.add_argument("--frechet_n", type=int, default=None,
                    help="real videos (and generated samples, one per real caption) of the Fréchet distance; "
                         "0 = no FD column; default 512 with --suite tdm, else 0")
    ap.add_argument("--frechet_boot", type=int, default=200, help="bootstrap replicates of the FD intervals")
    ap.add_argument("--lrm_dir", default=None,
                    help="where the configs' LRM/<reward> LatentRewards are (fitted there first if missing); "
                         "default OUT/lrms")
    ap.add_argument("--lrm_records", type=int, default=2048, help="videos the missing LRMs are fitted on")
    ap.add_argument("--lrm_steps", type=int, default=1500, help="optimizer steps of each LRM fit (early stopping)")
    ap.add_argument("--fit_lrms_only", action="store_true", help="fit the rows' missing LRMs, then stop")
    ap.add_argument("--keyframe_stride", type=int, default=4, help="video Vendi: every Nth frame is a keyframe")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="DistillConfig override for every row (YAML value), e.g. --set beta_ft=0.05 "
                         "--set lrm_mode=frozen --set lrm_path=runs/lrm-colorfulness; repeatable")
    ap.add_argument("--num_data", type=int, default=None, help="override the configs' number of data latents")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--timing_repeats", type=int, default=2,
                    help="timed sampling calls after a warm-up (median); 0: time the one evaluation call")
    ap.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                    help="only merge the ablation.json of earlier runs (e.g. one per row) into --out")
    ap.add_argument("--timings_from", default=None, metavar="DIR",
                    help="with --merge: take the sampling times from an earlier --retime merge of the same set-up")
    ap.add_argument("--retime", action="store_true",
                    help="with --merge: measure the sampling times again in the merge process (see retime())")
    args = ap.parse_args(argv)
    if args.merge:
        from lrm.run import resolve_device

        print(merge(Path(args.out), args.merge, resolve_device(args.device) if args.retime else None,
                    args.teacher_cfg, args.timings_from))
        return

    from distill.builders import build_mixed_reward, build_teacher, build_vae
    from distill.cli import build_data, build_lrm
    from distill.samplers import STUDENT_TIMESTEPS, ddim_sample, student_sample
    from distill.trainer import DistillConfig, DistillData, DistillTrainer
    from eval.vendi import keyframe_diversity
    from lrm.config import load_config
    from lrm.run import resolve_device
    from lrm.text import TextEncoder
    from reward_adapters import create_reward
    from shapes.grid import save_grid, save_video_strip

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    suite = SUITES[args.suite]
    rows = suite if args.rows == "all" else [r for r in suite if r[1] in args.rows.split(",")]
    if not rows and args.rows != "none":
        raise SystemExit(f"--rows {args.rows!r}: none of the {args.suite} suite's rows {[r[1] for r in suite]}")
    if args.reference and not rows:
        raise SystemExit("--reference is for row processes: give --rows (the reference run itself is --rows none)")
    splits = list(dict.fromkeys(args.split.split(",")))
    if not splits or any(sp not in ("test", "val") for sp in splits):
        raise SystemExit(f"--split {args.split!r}: expected test, val or val,test")
    args.video = args.video or args.suite == "tdm"
    frechet_n = args.frechet_n if args.frechet_n is not None else (512 if args.suite == "tdm" else 0)
    lrm_dir = Path(args.lrm_dir) if args.lrm_dir else out / "lrms"
    golds = targeted_rewards([r[1] for r in suite]) if args.suite == "tdm" else []
    t_start = time.perf_counter()
    kind = "video" if args.video else "image"
    # the configs are written for the image student; --video swaps teacher, frames, LRM head and batch size
    world_over = {"teacher": args.teacher or ("shapes-video-flow" if args.suite == "tdm" else f"shapes-{kind}")}
    if args.video:
        world_over.update(num_frames=args.num_frames, lrm_head="video-frame-avg", batch_size=16)
    if args.num_data:
        world_over["num_data"] = args.num_data
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        world_over[key.strip()] = yaml.safe_load(value)

    base = load_config(DistillConfig, config_path((rows or suite)[0][1]), world_over)
    vae = build_vae(base, device)
    lrm_names = [n[len(LRM_PREFIX):] for _, suffix in rows for n in mixed_reward_names(suffix)
                 if n.startswith(LRM_PREFIX)]
    lrm_fits = fit_reward_lrms(sorted(set(lrm_names)), lrm_dir, vae, base.num_frames, device, args.lrm_records,
                               args.lrm_steps, seed=base.data_seed) if lrm_names else {}
    if args.fit_lrms_only:
        print(f"LRMs in {lrm_dir}: {sorted(set(lrm_names))} (fitted now: {lrm_fits or 'none'})")
        return
    teacher = build_teacher(base, device)
    data = build_data(base, vae, device, video=teacher.is_video)
    text_encoder = TextEncoder(base.text_encoder, device=device)

    adherence = create_reward("shapes-adherence", device=str(device))
    gold = create_reward(base.pixel_reward, device=str(device))
    sharp = create_reward("sharpness", device=str(device))
    # targeted golds as the mixed terms score them: a frame reward on the first / middle / last frame (Eq. 13)
    gold_rewards = {g: create_reward(g, device=str(device), frames="first-middle-last") for g in golds}
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    overrides = dict(item.split("=", 1) for item in args.set)  # as given (the configs hold the rest)

    class Split:
        """One held-out split's evaluation: its prompts, noise and Fréchet reference, its table (``dir``) and rows."""

        def __init__(self, name: str) -> None:
            self.name, self.results = name, {}
            self.dir = out if len(splits) == 1 else out / name
            self.dir.mkdir(parents=True, exist_ok=True)
            self.prompts, self.tok, self.mask, self.noise = eval_batch(
                args.prompts, args.per_prompt, args.video, name, data.latents.shape[1:], text_encoder, device)
            if frechet_n:
                from eval.frechet import real_shapes, shapes_video_features

                real_px, real_caps = real_shapes(frechet_n, 1 if name == "test" else 2,
                                                 base.num_frames if args.video else None)
                self.real_feats = shapes_video_features(real_px.to(device), vae)
                f_emb = text_encoder(real_caps)
                self.f_tok, self.f_mask = f_emb.tokens.to(device), f_emb.mask.to(device)
                self.f_noise = torch.randn((frechet_n, *data.latents.shape[1:]),
                                           generator=torch.Generator().manual_seed(FRECHET_NOISE_SEED)).to(device)

        def frechet(self, sample) -> dict:
            """FD columns of ``sample(noise, tokens, mask) -> latents`` on the Fréchet set (batches of 64)."""
            if not frechet_n:
                return {}
            from eval.frechet import shapes_video_features

            with torch.no_grad():
                feats = torch.cat([shapes_video_features(vae.decode(sample(
                    self.f_noise[i:i + 64], self.f_tok[i:i + 64], self.f_mask[i:i + 64]).float()), vae)
                    for i in range(0, frechet_n, 64)])
            return frechet_columns(self.real_feats, feats, args.frechet_boot)

        def score(self, latents: torch.Tensor, name: str) -> dict:
            pixels = vae.decode(latents.float())  # (N, 3, H, W) or (N, T, 3, H, W)
            if args.video:
                save_video_strip(pixels[:8].cpu(), self.dir / f"{name}.png", frames=8, scale=2)
            else:
                save_grid(pixels[: 8 * args.per_prompt].cpu(), self.dir / f"{name}.png", nrow=args.per_prompt,
                          scale=2)
            groups = pixels.view(args.prompts, args.per_prompt, *pixels.shape[1:])
            rewards = {"adherence": adherence, "gold": gold, "sharpness": sharp,
                       **{f"gold:{g}": r for g, r in gold_rewards.items()}}
            per_prompt = {k: r(pixels, self.prompts).view(args.prompts, -1).mean(1).tolist()
                          for k, r in rewards.items()}
            per_prompt["vendi"] = [float(keyframe_diversity(gp.cpu(), args.keyframe_stride)) for gp in groups]
            return {**{k: sum(v) / len(v) for k, v in per_prompt.items()}, "per_prompt": per_prompt}

        def versus_teacher(self, r: dict) -> dict:
            """``r`` with its speedup and adherence ratio (+ interval) against this split's teacher row."""
            t = self.results["teacher"]
            return {**r, "speedup": t["seconds"] / r["seconds"],
                    "adherence_vs_teacher": r["adherence"] / max(t["adherence"], 1e-12),
                    "adherence_vs_teacher_ci90": ratio_ci(r["per_prompt"]["adherence"],
                                                          t["per_prompt"]["adherence"])}

        def add(self, key: str, sample, row: dict) -> None:
            """Sample this split's batch with ``sample`` (timed), score it and its Fréchet set, keep it as ``key``."""
            with torch.no_grad():
                lat, seconds = timed(lambda: sample(self.noise, self.tok, self.mask), args.timing_repeats)
                r = {**row, "seconds": seconds, **self.score(lat, key), **self.frechet(sample)}
            self.results[key] = r if key == "teacher" else self.versus_teacher(r)
            shown = {k: v for k, v in self.results[key].items() if k not in ("final_losses", "frechet_boot")}
            print(f"[{self.name}] {row['name']}: {json.dumps(shown)}", flush=True)

        def setup(self) -> dict:
            """This split's evaluation set-up (``EVAL_SETUP`` + ``frechet_n``): what fixes its prompts, noise, teacher
            and real videos."""
            return {"kind": kind, "teacher": world_over["teacher"], "prompts": args.prompts, "split": self.name,
                    "per_prompt": args.per_prompt, "latent_shape": list(data.latents.shape[1:]), "frechet_n": frechet_n}

        def write(self) -> str:
            """ablation.json + ablation.md with the rows done so far (a run cut off by a time limit keeps them)."""
            meta = {**self.setup(), "device": device_name, "total_seconds": time.perf_counter() - t_start,
                    "gold_reward": base.pixel_reward, "overrides": overrides,
                    **({"suite": args.suite, "targeted_rewards": golds} if args.suite != "dollar" or frechet_n else {}),
                    **({"lrm_dir": str(lrm_dir), "lrm_fits": lrm_fits} if lrm_names else {})}
            return write_tables(self.dir, meta, self.results)

    evals = [Split(name) for name in splits]

    def teacher_sample(n, tk, m):
        return ddim_sample(teacher, n, tk, m, num_steps=args.teacher_steps, guidance_scale=args.teacher_cfg)

    def baseline_sample(n, tk, m):  # no CFG, like the students (which distil it in)
        return student_sample(teacher, n, tk, m, timesteps=STUDENT_TIMESTEPS[4])

    def load_reference(ev: Split) -> None:
        """The teacher and baseline rows of ``--reference`` (the same evaluation set-up), waited for (a reference
        process runs beside the rows): measured once instead of once per row process."""
        path = Path(args.reference) / (ev.name if len(splits) > 1 else "") / "ablation.json"
        deadline = time.monotonic() + args.reference_wait
        while True:
            run = json.loads(path.read_text()) if path.is_file() else {"results": {}}
            if BASELINE in run["results"]:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"--reference: no teacher and baseline rows in {path} after {args.reference_wait} s")
            time.sleep(5)
        differ = setup_differs(run, ev.setup(), (*EVAL_SETUP, "frechet_n"))
        if differ:
            raise SystemExit(f"--reference {path}: another evaluation set-up (differs in {differ})")
        ev.results.update({k: run["results"][k] for k in ("teacher", BASELINE)})

    for ev in evals if not args.reference else []:
        ev.add("teacher", teacher_sample, {"name": f"teacher ({args.teacher_steps} DDIM x CFG {args.teacher_cfg})",
                                           "network_calls": 2 * args.teacher_steps})
        ev.add(BASELINE, baseline_sample, {"name": "teacher, 4 steps, not distilled", "network_calls": 4,
                                           "train_seconds": 0.0})
        ev.write()

    for name, suffix in rows:
        over = {**resolve_lrms(suffix, lrm_dir), **world_over, "device": str(device), "progress": False,
                "tensorboard": False, "run_dir": str(out / suffix), "resume": False}
        if args.steps is not None:
            over["steps"] = args.steps
        if args.batch_size is not None:
            over["batch_size"] = args.batch_size
        cfg = load_config(DistillConfig, config_path(suffix), over)
        lrm = build_lrm(cfg, data, vae, device)
        mixed = build_mixed_reward(cfg, vae, device, text_encoder=text_encoder)
        tr = DistillTrainer(cfg, teacher, DistillData(data.latents, data.text_tokens, data.text_mask, data.prompts),
                            lrm=lrm, vae=vae, mixed_reward=mixed)
        t0 = time.perf_counter()
        hist = tr.train()
        train_s = time.perf_counter() - t0
        row = {"name": name, "config": f"configs/distill_shapes_ablation_{suffix}.yaml", "steps": tr.step,
               "train_seconds": train_s, "network_calls": len(tr.timesteps),
               **log_costs(out / suffix, device.type == "cuda"),
               "final_losses": {k: v for k, v in hist[-1].items() if k.startswith("loss")}}
        for ev in evals:
            if "teacher" not in ev.results:
                load_reference(ev)
            ev.add(suffix, tr.sample, row)
            ev.write()
        tr = lrm = mixed = None  # free the networks before the next row
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    for ev in evals:
        print(ev.write())


if __name__ == "__main__":
    main()
