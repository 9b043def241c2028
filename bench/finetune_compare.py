"""LRM vs DDPO vs direct reward-gradient fine-tuning on the Shapes world, under one GPU-seconds budget (issue 7).

Same student init (the shipped Shapes teacher, or --student DIR), same gold pixel reward (colorfulness: the one
weight-free reward that is differentiable, so the direct method can use it too), same prompt pool, same number
of device-seconds of training per method (``max_gpu_seconds``; evaluation is not counted). The LRM is fitted
first (``latent_rewards.fit`` on data latents + samples of the initial student, scored by the gold reward) unless
--lrm DIR is given; its data + fit time is reported and added to the LRM's total. DDPO follows ddpo-pytorch / TRL
(element-mean transition log-probs, PPO clip 1e-4, advantages clipped to 5); --lr-ddpo gives it its own lr.

Outputs (--out): compare.md, compare.json, reward_vs_gpu_seconds.png, and each run's directory.

    PYTHONPATH=. python3 bench/finetune_compare.py --kinds image,video --budget-image 45 --budget-video 30
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

METHODS = ("lrm", "ddpo", "direct")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kinds", default="image,video", help="comma list of image, video")
    p.add_argument("--budget-image", type=float, default=45.0, help="training device-seconds per method (image)")
    p.add_argument("--budget-video", type=float, default=30.0, help="training device-seconds per method (video)")
    p.add_argument("--gold", default="colorfulness", help="gold pixel reward (must be differentiable for direct)")
    p.add_argument("--student", default=None, help="Denoiser directory to start from (default: shipped teacher)")
    p.add_argument("--lrm", default=None, help="LatentReward directory (image; skips fitting)")
    p.add_argument("--lrm-video", default=None, help="LatentReward directory (video; skips fitting)")
    p.add_argument("--lrm-samples", type=int, default=4096, help="generated latents to fit the LRM on")
    p.add_argument("--lrm-steps", type=int, default=1500, help="LRM fit steps")
    p.add_argument("--lr", type=float, default=3e-5, help="student learning rate (all methods)")
    p.add_argument("--lr-ddpo", type=float, default=None,
                   help="DDPO's learning rate if not --lr (1e-5: the DDPO authors' full fine-tuning value, "
                        "jannerm/ddpo config/base.py; ddpo-pytorch's 3e-4 is for LoRA)")
    p.add_argument("--eval-every-s", type=float, default=None,
                   help="evaluate every this many training device-seconds (default: budget / 20)")
    p.add_argument("--num-eval", type=int, default=64)
    p.add_argument("--out", default="runs/bench-finetune-compare")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def fit_lrm(kind: str, trainer_proto, args, out: Path):
    """Fit an LRM on data latents + initial-student samples, targets = gold reward of their decodings."""
    from latent_rewards import LatentData, fit

    t0 = time.perf_counter()
    tr = trainer_proto
    pool = tr.pool
    lat, prompts = [], []
    B = 256
    g = torch.Generator().manual_seed(args.seed + 99)
    with torch.no_grad():
        for s in range(0, args.lrm_samples, B):
            n = min(B, args.lrm_samples - s)
            idx = torch.randint(len(pool), (n,), generator=g)
            tk, mk, pr, _ = pool.take(idx)
            noise = torch.randn((n, *tr.latent_shape), generator=g)
            lat.append(tr.sample(noise, tk, mk, generator=g).float())
            prompts += pr
    lat.append(pool.latents.float())
    prompts += list(pool.prompts)
    latents = torch.cat(lat)
    target = torch.cat([tr.gold(latents[i:i + B], prompts[i:i + B]) for i in range(0, len(latents), B)])
    if tr.device.type == "cuda":
        torch.cuda.synchronize()
    t_data = time.perf_counter() - t0
    data = LatentData(latents=latents.cpu(), target=target, prompts=prompts, reward_name=args.gold,
                      latent_space=tr.vae.latent_space.to_dict())
    head = "video-frame-avg" if kind == "video" else "image-cnn"
    t1 = time.perf_counter()
    # patch 2: the Shapes latents are only 8x8 (Tab. 10's patch 4 is for 24x40 latents)
    res = fit(data, head=head, head_kwargs={"patch": 2}, steps=args.lrm_steps, out_dir=out / f"lrm-{kind}",
              device=str(tr.device), eval_every=250, patience=0, progress=True)
    t_fit = time.perf_counter() - t1
    return res.lrm, {"data_s": t_data, "fit_s": t_fit, "samples": len(latents), "head": head,
                     "val_metrics": {k: float(v) for k, v in res.metrics.items() if isinstance(v, (int, float))}}


def run_kind(kind: str, args, out: Path) -> dict:
    from distill.denoiser import Denoiser
    from distill.finetune import FinetuneConfig, FinetuneTrainer, PromptPool
    from distill.models import load_shapes_teacher
    from distill.trainer import DistillData
    from latent_rewards import LatentReward
    from lrm.latent_space import VAE
    from lrm.run import resolve_device
    from lrm.text import TextEncoder
    from reward_adapters import create_reward

    device = resolve_device(args.device)
    init = Denoiser.from_pretrained(args.student, device=device) if args.student else \
        load_shapes_teacher(kind, device=device)
    vae = VAE.shapes(device=device)
    text = TextEncoder()
    nf = 16 if kind == "video" else None
    data = DistillData.from_shapes(64, vae, text, num_frames=nf, seed=args.seed)
    pool = PromptPool.from_distill_data(data)
    gold = create_reward(args.gold).to(device)
    budget = args.budget_video if kind == "video" else args.budget_image
    bs = 8 if kind == "video" else 16
    common = dict(run_dir="", device=str(device), seed=args.seed, gold_reward=args.gold, steps=10 ** 6,
                  max_gpu_seconds=budget, batch_size=bs, sample_batch_size=bs, num_sample_batches=2,
                  train_batch_size=bs, lr=args.lr, eval_every=0, num_eval=args.num_eval,
                  eval_every_gpu_s=args.eval_every_s or budget / 20,
                  ckpt_every=0, sample_every=0, log_every=100, num_frames=16, resume=False,
                  gradient_checkpointing=(kind == "video"), teacher=f"shapes-{kind}", progress=True)

    def trainer(method: str, lrm=None) -> FinetuneTrainer:
        lr = args.lr_ddpo if method == "ddpo" and args.lr_ddpo is not None else args.lr
        cfg = FinetuneConfig(**{**common, "method": method, "lr": lr, "run_dir": str(out / f"{kind}-{method}")})
        return FinetuneTrainer(cfg, init, pool, gold, vae, lrm=lrm)

    lrm_path = args.lrm_video if kind == "video" else args.lrm
    lrm_info = {"path": lrm_path, "data_s": 0.0, "fit_s": 0.0}
    if lrm_path:
        lrm = LatentReward.from_pretrained(lrm_path, device=device)
    else:
        proto = trainer("ddpo")
        lrm, info = fit_lrm(kind, proto, args, out)
        proto.close()
        lrm_info.update(info)
    results = {}
    for method in METHODS:
        tr = trainer(method, lrm if method == "lrm" else None)
        t0 = time.perf_counter()
        hist = tr.train()
        wall = time.perf_counter() - t0
        tr.close()
        curve = [(float(r["gpu_seconds"]), float(r["eval_gold_reward"])) for r in hist if "eval_gold_reward" in r]
        proxy = [float(r["proxy_reward"]) for r in hist if "proxy_reward" in r]
        results[method] = {"curve": curve, "start": curve[0][1], "final": curve[-1][1],
                           "best": max(v for _, v in curve), "gpu_seconds": tr.gpu_seconds,
                           "peak_mem_mb": tr.peak_mem_mb, "wall_s": wall, "steps": tr.step,
                           "optimizer_steps": tr.optimizer_steps,
                           "final_proxy": proxy[-1] if proxy else None}
        print(f"[{kind}] {method}: gold {curve[0][1]:.3f} -> {curve[-1][1]:.3f} (best {results[method]['best']:.3f})"
              f" in {tr.gpu_seconds:.1f} device-s, {tr.step} steps, peak {tr.peak_mem_mb:.0f} MB", flush=True)
    # time for each method to reach DDPO's final gold reward
    target = results["ddpo"]["final"]
    best = results["ddpo"]["best"]
    for m, r in results.items():
        hit = [s for s, v in r["curve"] if v >= target and s > 0]
        r["gpu_s_to_ddpo_final"] = hit[0] if hit else None
        # DDPO's final can sit below the start (early in training); its best is the sterner target
        hit = [s for s, v in r["curve"] if v >= best and s > 0]
        r["gpu_s_to_ddpo_best"] = hit[0] if hit else None
    lrm_total = results["lrm"]["gpu_s_to_ddpo_final"]
    lrm_overhead = lrm_info["data_s"] + lrm_info["fit_s"]
    ddpo_t = results["ddpo"]["gpu_s_to_ddpo_final"] or results["ddpo"]["gpu_seconds"]
    expectation = {
        "ddpo_final_gold": target,
        "lrm_time_ratio": None if lrm_total is None else lrm_total / ddpo_t,
        "lrm_time_ratio_incl_fit": None if lrm_total is None else (lrm_total + lrm_overhead) / ddpo_t,
        # peak memory is 0 on CPU: no ratio there
        "lrm_mem_ratio": (results["lrm"]["peak_mem_mb"] / results["ddpo"]["peak_mem_mb"]
                          if results["ddpo"]["peak_mem_mb"] > 0 else None),
    }
    expectation["time_met"] = expectation["lrm_time_ratio"] is not None and expectation["lrm_time_ratio"] <= 1 / 3
    expectation["mem_met"] = expectation["lrm_mem_ratio"] is not None and expectation["lrm_mem_ratio"] <= 1 / 5
    return {"kind": kind, "budget_gpu_s": budget, "gold_reward": args.gold, "lrm": lrm_info, "methods": results,
            "expectation": expectation, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}


def markdown(all_res: list[dict]) -> str:
    lines = ["| world | method | gold start | gold final | gold best | device-s to DDPO final | device-s to DDPO best "
             "| device-s used | steps | peak mem MB | wall s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for R in all_res:
        for m, r in R["methods"].items():
            hit = r["gpu_s_to_ddpo_final"]
            hb = r.get("gpu_s_to_ddpo_best")
            lines.append(f"| {R['kind']} | {m} | {r['start']:.3f} | {r['final']:.3f} | {r['best']:.3f} | "
                         f"{'never' if hit is None else f'{hit:.1f}'} | {'never' if hb is None else f'{hb:.1f}'} | "
                         f"{r['gpu_seconds']:.1f} | {r['steps']} | "
                         f"{r['peak_mem_mb']:.0f} | {r['wall_s']:.1f} |")
    lines.append("")
    for R in all_res:
        e, li = R["expectation"], R["lrm"]
        tr = "n/a" if e["lrm_time_ratio"] is None else f"{e['lrm_time_ratio']:.3f}"
        tri = "n/a" if e["lrm_time_ratio_incl_fit"] is None else f"{e['lrm_time_ratio_incl_fit']:.3f}"
        mr = "n/a" if e["lrm_mem_ratio"] is None else f"{e['lrm_mem_ratio']:.3f}"
        fit_s = li["data_s"] + li["fit_s"]
        lines.append(f"- {R['kind']} ({R['device']}, gold {R['gold_reward']}, budget {R['budget_gpu_s']} device-s): "
                     f"LRM time to DDPO's final gold / DDPO's = {tr} (with LRM data+fit {fit_s:.1f} s: {tri}; "
                     f"expectation <= 0.333: {'met' if e['time_met'] else 'not met'}); LRM peak memory / DDPO's = "
                     f"{mr} (expectation <= 0.2: {'met' if e['mem_met'] else 'not met'})")
    return "\n".join(lines) + "\n"


def plot(all_res: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(all_res), figsize=(6 * len(all_res), 4.2), squeeze=False)
    for ax, R in zip(axes[0], all_res):
        for m, r in R["methods"].items():
            xs, ys = zip(*r["curve"])
            ax.plot(xs, ys, marker=".", label=f"{m} (peak {r['peak_mem_mb']:.0f} MB)")
        ax.axhline(R["expectation"]["ddpo_final_gold"], color="gray", ls="--", lw=0.8, label="DDPO final")
        ax.set_xlabel(f"training device-seconds ({R.get('device', 'GPU')})")
        ax.set_ylabel(f"gold reward ({R['gold_reward']}), 4-step samples")
        ax.set_title(f"Shapes {R['kind']}: LRM vs DDPO vs direct gradient")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    args = parse()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in ("image", "video")]
    if bad:
        raise SystemExit(f"--kinds: {bad} unknown; use image and/or video")
    all_res = []
    for kind in kinds:
        all_res.append(run_kind(kind, args, out))
        md = markdown(all_res)  # write as we go, so a cut-off run keeps the image result
        (out / "compare.md").write_text(md)
        (out / "compare.json").write_text(json.dumps(all_res, indent=2))
        plot(all_res, out / "reward_vs_gpu_seconds.png")
    print(md)
    print(f"wrote {out / 'compare.md'}, {out / 'compare.json'}, {out / 'reward_vs_gpu_seconds.png'}")


if __name__ == "__main__":
    main()
