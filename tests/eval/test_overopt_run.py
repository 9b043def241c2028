"""`lrm overopt` end to end on tiny CPU configs: study rows per checkpoint, d = 0 at step 0, sweeps, resume, errors."""

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from eval.overopt_run import OveroptConfig, apply_assignment, run_overopt, sweep_assignments, sweep_key_check
from lrm.config import ConfigError, load_config

TINY = dict(device="cpu", teacher="shapes-image", gold_reward="jpeg-compressibility", lrm_train_size=48,
            lrm_steps=10, lrm_batch_size=16, lrm_width=16, lrm_depth=1, steps=2, eval_every=1, batch_size=2,
            num_prompts=4, num_eval_prompts=2, n_per_prompt=2, n_bootstrap=5, accuracy=False, progress=False,
            eval_batch_size=4, finetune={"student_steps": 1, "ddpo_grad_steps": 1})


def tiny(tmp_path: Path, **kw) -> OveroptConfig:
    return load_config(OveroptConfig, None, {**TINY, "run_dir": str(tmp_path), **kw})


def test_single_run_study_rows_and_reference(tmp_path):
    s = run_overopt(tiny(tmp_path / "run", bon_n=4))
    run = tmp_path / "run"
    t = pd.read_csv(run / "study" / "study.csv")
    assert list(t["step"]) == [0, 1, 2]  # one row per saved checkpoint, step 0 = the initial model
    assert t["d"].iloc[0] == 0.0
    assert (t["d"].iloc[1:] > 0).all()  # the lr 1e-4 steps moved the student
    assert {"gold/jpeg-compressibility", "proxy/lrm"} <= set(t.columns)
    students = sorted(p.name for p in (run / "finetune" / "students").iterdir())
    assert students == ["step_000000", "step_000001", "step_000002"]
    summ = json.loads((run / "summary.json").read_text())
    assert summ["n_checkpoints"] == 3 and s["peak"]["observed"]["step"] in (0, 1, 2)
    assert summ["early_stop"]["rule"] == "peak-gold"
    assert summ["lrm_params"] > 0 and Path(summ["lrm_dir"]).is_dir()
    assert (run / "study" / "report.html").exists() and (run / "study" / "fits.json").exists()
    assert (run / "study" / "checkpoints" / "step_000002" / "samples.png").exists()
    # gold-free recommendation next to peak gold (default rule: proxy slope, from d and proxy/lrm only)
    ep = summ["early_stop_proxy"]
    assert ep["uses_gold"] is False and ep["proxy_column"] == "proxy/lrm" and ep["step"] in (0, 1, 2)
    assert ep["d"] == pytest.approx(float(t["d"][ep["index"]]))
    assert (run / "study" / "early_stop_proxy.json").exists()
    # best-of-n from the step-0 model: pools of 4 per prompt, n = 1, 2, 4 at d = sqrt(log n - (n - 1)/n)
    bon = pd.read_csv(run / "study" / "bon.csv")
    assert list(bon["n"]) == [1, 2, 4] and bon["pool"].eq(4).all() and bon["n_prompts"].eq(2).all()
    assert bon["d"].tolist() == pytest.approx([0.0, math.sqrt(math.log(2) - 0.5), math.sqrt(math.log(4) - 0.75)])
    pool = pd.read_csv(run / "study" / "bon_pool" / "samples.csv")
    assert len(pool) == 2 * 4
    g = pool["gold/jpeg-compressibility"]
    assert bon["gold"].iloc[0] == pytest.approx(g.mean(), rel=1e-6)
    best = pool.loc[pool.groupby("prompt_id")["proxy/lrm"].idxmax(), "gold/jpeg-compressibility"]
    assert bon["gold"].iloc[-1] == pytest.approx(best.mean(), rel=1e-6)  # n = N: the proxy-best of each pool
    assert bon["proxy"].is_monotonic_increasing
    fits = json.loads((run / "study" / "fits.json").read_text())
    assert fits["bon/gold"]["form"] == "bon" and fits["gold/jpeg-compressibility"]["form"] == "rl"
    assert fits["bon/gold"]["r0"] == pytest.approx(bon["gold"].iloc[0])
    assert "bon/proxy" in summ["fits"]
    html = (run / "study" / "report.html").read_text()
    assert "plots/best_of_n.png" in html and (run / "study" / "plots" / "best_of_n.png").exists()
    assert "Proxy-only early-stopping recommendation" in html and "Best-of-n</b>" in html
    # a finished run is skipped
    again = run_overopt(tiny(tmp_path / "run"))
    assert again.get("skipped") is True


def test_sweep_sub_runs_table_and_resume(tmp_path, caplog):
    root = tmp_path / "sweep"
    cfg = tiny(root, steps=1, sweep={"lr": [1e-5, 1e-3]})
    res = run_overopt(cfg)
    names = ["lr=1e-05", "lr=0.001"]
    for n in names:
        assert (root / n / "summary.json").exists()
        assert len(pd.read_csv(root / n / "study" / "study.csv")) == 2
    table = pd.read_csv(root / "sweep.csv")
    assert list(table["sub_run"]) == names and list(table["lr"]) == [1e-5, 1e-3]
    assert {"gold_peak", "peak_d", "d_final", "proxy_final"} <= set(table.columns)
    # the larger learning rate moves further from the reference
    assert table["d_final"].iloc[1] > table["d_final"].iloc[0] > 0
    # one cache and one LRM for both sub-runs (lr does not change the proxy)
    shared = sorted(p.name.split("-")[0] for p in (root / "shared").iterdir())
    assert shared == ["cache", "lrm"]
    assert (root / "report.html").exists() and (root / "plots" / "sweep_vs_d.png").exists()
    assert res["report"] is not None
    # re-run: finished sub-runs are skipped; an unfinished one (no summary.json) is redone from its students
    first = (root / names[0] / "summary.json").stat().st_mtime_ns
    (root / names[1] / "summary.json").unlink()
    res2 = run_overopt(cfg)
    assert res2["summaries"][names[0]].get("skipped") is True
    assert not res2["summaries"][names[1]].get("skipped")
    assert (root / names[0] / "summary.json").stat().st_mtime_ns == first
    assert json.loads((root / "sweep.json").read_text())["skipped"] == [names[0]]
    assert len(pd.read_csv(root / "sweep.csv")) == 2


def test_sweep_key_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown sweep key 'lrm_widht'.*did you mean 'lrm_width'"):
        tiny(tmp_path, sweep={"lrm_widht": [16, 32]})
    with pytest.raises(ConfigError, match="not a FinetuneConfig field"):
        sweep_key_check({"finetune.kl_coef": [0.1]})
    with pytest.raises(ConfigError, match="not a FitConfig field"):
        sweep_key_check({"lrm_fit.nope": [1]})
    with pytest.raises(ConfigError, match="non-empty list"):
        tiny(tmp_path, sweep={"lr": 1e-4})
    with pytest.raises(ConfigError, match="run_dir"):
        sweep_key_check({"run_dir": ["a", "b"]})
    sweep_key_check({"lrm_width": [16], "finetune.beta_cd": [0.5], "lrm_fit.patience": [2]})  # valid keys pass
    with pytest.raises(ConfigError, match="unknown FinetuneConfig field"):
        tiny(tmp_path, finetune={"kl_coef": 0.1})
    with pytest.raises(ConfigError, match="needs an ensemble"):
        tiny(tmp_path, ensemble_lambda=1.0)


def test_beta_kl_and_new_options_config(tmp_path):
    cfg = tiny(tmp_path, beta_kl=0.05)
    assert cfg.finetune_config(tmp_path / "ft").beta_kl == 0.05
    # a beta_kl sweep: one sub-run config per value, each reaching FinetuneConfig
    sw = tiny(tmp_path, sweep={"beta_kl": [0.0, 0.1]})
    subs = [apply_assignment(sw, a, tmp_path / str(i)) for i, a in enumerate(sweep_assignments(sw.sweep))]
    assert [c.finetune_config(tmp_path / "ft").beta_kl for c in subs] == [0.0, 0.1]
    with pytest.raises(ConfigError, match="set by the overopt config itself"):
        tiny(tmp_path, finetune={"beta_kl": 0.1})
    with pytest.raises(ConfigError, match="beta_kl must be >= 0"):
        tiny(tmp_path, beta_kl=-1.0)
    with pytest.raises(ConfigError, match="bon_n must be 0"):
        tiny(tmp_path, bon_n=2)
    with pytest.raises(ConfigError, match="selects by a proxy LRM"):
        tiny(tmp_path, bon_n=8, method="ddpo")
    with pytest.raises(ConfigError, match="stop_slope_frac"):
        tiny(tmp_path, stop_slope_frac=0.0)
    with pytest.raises(ConfigError, match="d_budget must be > 0"):
        tiny(tmp_path, d_budget=-0.5)
