"""`lrm finetune --method ddpo` end to end through lrm.cli.main on CPU with tiny settings: the run dir's outputs."""

import csv
import json

import pytest
import yaml

# the heavy lazy imports happen at collection time, not inside the timed test
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401
from transformers import AutoModel, AutoTokenizer  # noqa: F401

from lrm.cli import build_parser, main

build_parser()  # imports every command module once

TINY = ["--device", "cpu", "--steps", "2", "--student_steps", "2", "--ddpo_grad_steps", "1",
        "--sample_batch_size", "2", "--num_sample_batches", "2", "--train_batch_size", "2", "--num_prompts", "2",
        "--num_eval", "2", "--eval_every", "1", "--ckpt_every", "0", "--sample_every", "0",
        "--num_sample_prompts", "1", "--samples_per_prompt", "2", "--stat_buffer_size", "2", "--stat_min_count", "2",
        "--gold_reward", "brightness", "--lr", "1e-3", "--beta_kl", "0.01", "--progress", "false"]


def test_cli_finetune_ddpo_writes_run_dir(tmp_path):
    run = tmp_path / "ddpo"
    assert main(["finetune", "--method", "ddpo", "--run_dir", str(run), *TINY]) == 0
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["method"] == "ddpo" and cfg["beta_kl"] == 0.01 and cfg["steps"] == 2
    rows = list(csv.DictReader(open(run / "log.csv")))
    assert [r["step"] for r in rows] == ["0", "1", "2"] and {r["method"] for r in rows} == {"ddpo"}
    for r in rows[1:]:
        assert 0 < float(r["gold_reward"]) < 1  # brightness of decoded samples
        assert r["eval_gold_reward"] != "" and float(r["step_time_s"]) > 0
        assert int(r["samples"]) == 4  # 2 sample batches x 2 chains
        assert float(r["kl"]) >= 0 and r["approx_kl"] != ""
    assert [int(r["optimizer_steps"]) for r in rows] == [0, 2, 4]  # 4 samples / train batch 2, one epoch
    assert float(rows[1]["kl"]) == 0.0 < float(rows[2]["kl"])  # step 1 samples the initial model itself
    assert float(rows[2]["gpu_seconds"]) > float(rows[1]["gpu_seconds"]) > 0
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2
    assert (run / "checkpoint" / "state.safetensors").stat().st_size > 0
    student = json.loads((run / "student" / "student.json").read_text())
    assert student["step"] == 2 and student["finetune_method"] == "ddpo" and student["timesteps"] == [999, 499]
    assert (run / "student" / "denoiser.json").exists() and (run / "samples" / "step_000002.png").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["optimizer_steps"] == 4 and summary["method"] == "ddpo"
    assert summary["eval_gold_start"] == pytest.approx(float(rows[0]["eval_gold_reward"]))
    assert summary["eval_gold_final"] == pytest.approx(float(rows[2]["eval_gold_reward"]))


def test_cli_finetune_config_errors(tmp_path, capsys):
    assert main(["finetune", "--method", "ddpo", "--run_dir", str(tmp_path / "x"), "--beta_kl", "-1"]) == 2
    assert "beta_kl must be >= 0" in capsys.readouterr().err
    assert main(["finetune", "--method", "ddpo", "--run_dir", str(tmp_path / "x"), "--not_a_key", "1"]) == 2
    assert not (tmp_path / "x").exists()


def test_summary_of_a_resumed_run_covers_the_whole_run(tmp_path):
    """Issue 17: a resumed finetune wrote summary.json from the part after the resume only (wrong start, 2 points)."""
    run = tmp_path / "resumed"
    args = ["finetune", "--method", "ddpo", "--run_dir", str(run), *TINY]
    assert main(args) == 0
    first = json.loads((run / "summary.json").read_text())
    assert main([*args, "--steps", "3"]) == 0  # resumes at step 2 (a mutable key)
    second = json.loads((run / "summary.json").read_text())
    assert second["steps"] == 3 and second["eval_gold_start"] == first["eval_gold_start"]
    assert len(second["eval_curve"]) == 4 and second["eval_curve"][:3] == first["eval_curve"]
