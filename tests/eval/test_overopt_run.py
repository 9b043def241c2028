"""`lrm overopt` end to end on tiny CPU configs: study rows per checkpoint, d = 0 at step 0, sweeps, resume, errors."""

import json
from pathlib import Path

import pandas as pd
import pytest

from eval.overopt_run import OveroptConfig, run_overopt, sweep_key_check
from lrm.config import ConfigError, load_config

TINY = dict(device="cpu", teacher="shapes-image", gold_reward="jpeg-compressibility", lrm_train_size=48,
            lrm_steps=10, lrm_batch_size=16, lrm_width=16, lrm_depth=1, steps=2, eval_every=1, batch_size=2,
            num_prompts=4, num_eval_prompts=2, n_per_prompt=2, n_bootstrap=5, accuracy=False, progress=False,
            eval_batch_size=4, finetune={"student_steps": 1, "ddpo_grad_steps": 1})


def tiny(tmp_path: Path, **kw) -> OveroptConfig:
    return load_config(OveroptConfig, None, {**TINY, "run_dir": str(tmp_path), **kw})


def test_single_run_study_rows_and_reference(tmp_path):
    s = run_overopt(tiny(tmp_path / "run"))
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
