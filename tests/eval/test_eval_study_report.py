"""run_study() end to end on synthetic checkpoint sequences, and the HTML report."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from eval.report import write_report
from eval.study import run_study

ALPHA, BETA = 0.8, 0.5


class ExactGold:
    """Gold reward whose value is exactly R_RL(d) for the constant generators below (d = 2 * shift)."""
    name, modality = "exact", "image"

    def __call__(self, pixels, prompts=None):
        d = 2 * (pixels.flatten(1).mean(1).double() - 0.25)
        dlogd = torch.where(d > 0, d * torch.log(d.clamp_min(1e-12)), torch.zeros_like(d))
        return (0.1 + ALPHA * d - BETA * dlogd).float()


def const_gen(shift):
    # the same latents for every noise: 0.25 + shift everywhere, plus a prompt-dependent pattern in channel 3
    def gen(noise, tokens, mask):
        z = torch.full_like(noise, 0.25 + shift)
        z[:, 3] = tokens.mean((1, 2))[:, None, None]
        return z
    return gen


def tiny_text(prompts):
    return torch.stack([torch.full((3, 4), float(len(p))) for p in prompts]), torch.ones(len(prompts), 3, dtype=bool)


def _html_images(path: Path) -> list[str]:
    return re.findall(r"<img[^>]+src='([^']+)'", path.read_text())


def test_study_recovers_curve_and_peak(tmp_path):
    shifts = [0.0, 0.1, 0.3, 0.6, 1.0, 1.5, 2.0]
    cks = [(100 * i, const_gen(s), {"lr": 1e-4}) for i, s in enumerate(shifts)]
    # smoothed-output KL at sigma = 8: 256 elements * shift^2 / (2 * 64) = 2 shift^2 -> but channel 3 is shared,
    # so 192 elements differ: KL = 192 shift^2 / 128 = 1.5 shift^2; pass d explicitly for an exact d = 2 shift.
    cks = [(step, g, {**extra, "d": 2 * s}) for (step, g, extra), s in zip(cks, shifts)]
    res = run_study(cks, ["a red circle", "two blue squares"], tmp_path / "study", reference=const_gen(0.0),
                    kl_sigma=8.0, n_per_prompt=2, seeds=0, gold_rewards={"exact": ExactGold()},
                    proxy_rewards={"mean": lambda z, t, m: z[:, :3].flatten(1).mean(1)},
                    decode=lambda z: z[:, :3], text_encoder=tiny_text, n_bootstrap=20, progress=False,
                    d_budget=1.3, min_slope_frac=0.25)
    t = res.table
    assert list(t["step"]) == [0, 100, 200, 300, 400, 500, 600]
    assert np.allclose(t["d"], [2 * s for s in shifts])
    # the measured smoothed-output KL is in the table too (192 shifted elements, sigma 8)
    assert np.allclose(t["kl"], [192 * s * s / 128 for s in shifts], rtol=1e-5)
    f = res.fits["gold/exact"]
    assert f["alpha"] == pytest.approx(ALPHA, abs=1e-4) and f["beta"] == pytest.approx(BETA, abs=1e-4)
    assert f["peak_d"] == pytest.approx(math.exp(ALPHA / BETA - 1), rel=1e-3)  # 1.822
    # observed peak: among d = 0, .2, .6, 1.2, 2, 3, 4 the best R_RL is at d = 2 (step 400)
    assert res.peak["observed"]["step"] == 400
    assert res.early_stop["rule"] == "peak-gold" and res.early_stop["step"] == 400
    # gold-free rule: the proxy (0.25 + shift = 0.25 + d/2) is linear in d, so its slope never falls and the
    # d budget decides: last d <= 1.3 is d = 1.2 (step 300), short of the gold peak at step 400
    ep = res.early_stop_proxy
    assert ep["rule"] == "kl-budget+proxy-slope" and ep["step"] == 300 and ep["proxy_column"] == "proxy/mean"
    assert ep["proxy_slope"]["step"] == 600 and ep["uses_gold"] is False
    assert ep["gold_at_stop"] == pytest.approx(float(t["gold/exact"][3]))
    assert json.loads((tmp_path / "study" / "early_stop_proxy.json").read_text())["step"] == 300
    assert "Proxy-only early-stopping recommendation" in res.report.read_text()
    assert t["extra/lr"].eq(1e-4).all()
    out = tmp_path / "study"
    for name in ("study.csv", "study.parquet", "fits.json", "peak.json", "early_stop.json", "report.html",
                 "plots/reward_vs_step.png", "plots/reward_vs_d.png", "checkpoints/step_000400/summary.csv"):
        assert (out / name).exists(), name
    imgs = _html_images(out / "report.html")
    assert "plots/reward_vs_d.png" in imgs and "checkpoints/step_000000/samples.png" in imgs
    assert all((out / s).exists() for s in imgs)
    assert json.loads((out / "fits.json").read_text())["gold/exact"]["form"] == "rl"


def test_study_on_shapes_data_with_perturbations(tmp_path, shapes_vae):
    from eval.generators import ShapesDataGenerator, shapes_prompts
    from reward_adapters import create_reward

    noise = [0.0, 0.05, 0.15, 0.3]
    cks = [(50 * i, ShapesDataGenerator(shapes_vae, pixel_noise=s), {}) for i, s in enumerate(noise)]
    res = run_study(cks, shapes_prompts(2, seed=4), tmp_path / "s", reference=ShapesDataGenerator(shapes_vae),
                    n_per_prompt=2, seeds=0, gold_rewards={"adherence": create_reward("shapes-adherence")},
                    proxy_rewards={"latent-std": lambda z, t, m: z.flatten(1).std(1)}, decode=shapes_vae,
                    n_bootstrap=20, progress=False)
    t = res.table
    assert t["d"].iloc[0] == 0 and t["d"].is_monotonic_increasing  # more pixel noise, farther from the data
    assert t["gold/adherence"].iloc[-1] < t["gold/adherence"].iloc[0]  # noise hurts prompt adherence
    assert t["proxy/latent-std"].iloc[-1] > t["proxy/latent-std"].iloc[0]  # while the "proxy" rises
    assert (t["d_source"] == "smoothed output kl").all()
    imgs = _html_images(res.report)
    assert len(imgs) == 2 + 4 and all((res.out_dir / s).exists() for s in imgs)


def test_report_on_plain_eval_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    pd.DataFrame({"metric": ["gold/x", "acc/all", "diversity", "time_per_sample_s"], "mean": [0.5, 0.8, 2.0, 0.01],
                  "ci_low": [0.4, 0.7, 1.5, float("nan")], "ci_high": [0.6, 0.9, 2.5, float("nan")],
                  "std": [0.1] * 4, "n": [8] * 4}).to_csv(run / "summary.csv", index=False)
    pd.DataFrame({"step": [1, 2], "loss": [0.3, 0.2]}).to_parquet(run / "log.parquet")
    (run / "meta.json").write_text(json.dumps({"name": "tiny", "n": 3}))
    from shapes.grid import save_grid

    save_grid(torch.rand(4, 3, 8, 8), run / "ckpt_10" / "samples.png", nrow=2)
    html = write_report(run, title="tiny <run>")
    text = html.read_text()
    assert "tiny &lt;run&gt;" in text  # escaped
    imgs = _html_images(html)
    assert set(imgs) == {"plots/summary.png", "ckpt_10/samples.png"}
    assert all((run / s).exists() for s in imgs)
    assert "log.parquet" in text and "loss" in text and "meta.json" in text
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_report(tmp_path / "missing")


def test_report_shows_best_of_n(tmp_path):
    from eval.overopt import bon_kl, fit_best_of_n

    run = tmp_path / "bon"
    run.mkdir()
    ns = np.array([1, 2, 4, 8])
    d = np.sqrt(bon_kl(ns))
    bon = pd.DataFrame({"n": ns, "kl": d ** 2, "d": d, "proxy": 0.1 + d, "gold": 0.1 + d * (0.5 - 0.3 * d),
                        "pool": 8})
    bon.to_csv(run / "bon.csv", index=False)
    (run / "fits.json").write_text(json.dumps(fit_best_of_n(bon)))
    text = write_report(run).read_text()
    assert "plots/best_of_n.png" in _html_images(run / "report.html") and (run / "plots" / "best_of_n.png").exists()
    assert "Best-of-n</b> (initial model, pool of 8 per prompt" in text
    assert "bon/gold" in text  # the R_bon fit row in the fitted-curves table
