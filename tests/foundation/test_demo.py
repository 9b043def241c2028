"""``lrm demo``: every stage runs end to end at toy size, writes summary.json + report.html, and a re-run reuses it."""

import json
import math

import pytest

from lrm.config import ConfigError
from lrm.demo import STAGES, DemoConfig, run_demo

TINY = dict(device="cpu", progress=False, roundtrip_images=4, roundtrip_videos=1, num_scored=3, num_images=96,
            cache_batch_size=64, cache_workers=1, lrm_steps=20, lrm_eval_every=10, lrm_width=16, finetune_steps=2,
            finetune_batch_size=4, study_checkpoints=2, num_prompts=8, eval_prompts=4, eval_samples_per_prompt=1,
            eval_batch_size=4, n_bootstrap=10)


def _finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_demo_config_checks_and_checkpoint_steps():
    assert DemoConfig().checkpoint_steps == [15, 30, 45, 60, 75, 90]
    assert DemoConfig(finetune_steps=10, study_checkpoints=4).checkpoint_steps == [2, 5, 8, 10]
    assert DemoConfig().cache_rewards == ["jpeg-compressibility", "shapes-color"]
    assert DemoConfig(text_lrm_reward="").cache_rewards == ["jpeg-compressibility"]
    with pytest.raises(ConfigError, match="study_checkpoints"):
        DemoConfig(finetune_steps=2, study_checkpoints=3)
    with pytest.raises(ConfigError, match="num_images"):
        DemoConfig(num_images=8)
    with pytest.raises(ConfigError, match="both"):
        DemoConfig(text_lrm_reward="jpeg-compressibility")


def test_demo_end_to_end_tiny_and_resume(tmp_path):
    out = tmp_path / "demo"
    s = run_demo(DemoConfig(out_dir=str(out), **TINY))
    on_disk = json.loads((out / "summary.json").read_text())
    for stage in STAGES:
        assert stage in on_disk, f"summary.json lacks stage {stage}"
        assert _finite(on_disk[stage]["seconds"])

    # 1-2. VAE round trip and pixel rewards
    assert on_disk["encode_decode"]["psnr_image_db"] > 25
    assert on_disk["encode_decode"]["psnr_video_frame_db"] > 25
    assert set(on_disk["rewards"]["rewards"]) == {"jpeg-compressibility", "colorfulness", "shapes-color"}
    assert all(_finite(v["mean"]) for v in on_disk["rewards"]["rewards"].values())
    # 3. cache
    assert on_disk["cache"]["records"] == 96
    assert set(on_disk["cache"]["rewards"]) == {"jpeg-compressibility", "shapes-color"}
    # 4. LRMs beside the ridge baseline on the same split
    for reward in ("jpeg-compressibility", "shapes-color"):
        m = on_disk["lrm"][reward]
        for k in ("spearman", "r2", "ridge_spearman", "ridge_r2"):
            assert _finite(m[k]), (reward, k, m[k])
        assert m["num_train"] + m["num_val"] == 96
        assert (out / f"lrm_{reward}" / "calibration.png").exists()
        assert (out / f"lrm_{reward}" / "model.safetensors").exists()
    # 5. fine-tuning: gold before/after on the trainer's fixed eval set, proxy on training batches
    ft = on_disk["finetune"]
    for k in ("eval_gold_start", "eval_gold_final", "train_proxy_first", "train_proxy_last"):
        assert _finite(ft[k]), (k, ft[k])
    assert ft["checkpoints"] == [1, 2]
    assert (out / "finetune" / "students" / "step_000002" / "student.json").exists()
    # 6. study over step 0 (the teacher's 4-step path) and both students
    ev = on_disk["eval"]
    assert ev["checkpoints"] == [0, 1, 2]
    for k in ("gold/jpeg-compressibility", "proxy/lrm-jpeg-compressibility", "proxy/lrm-shapes-color"):
        assert _finite(ev["before"][k]) and _finite(ev["after"][k]), k
    assert ev["before"]["d"] == 0.0 and ev["after"]["d"] > 0  # the fine-tuned student moved away from step 0
    report = (out / "report.html").read_text()
    for name in ("vae_roundtrip.png", "lrm_metrics.csv", "study.csv", "calibration.png", "reward_vs_step.png"):
        assert name in report, name
    assert s["eval"]["after"] == on_disk["eval"]["after"]

    # a re-run reuses the finished stages and reports the same numbers
    s2 = run_demo(DemoConfig(out_dir=str(out), **TINY))
    assert s2["cache"]["new_records"] == 0
    for stage in ("finetune", "eval"):
        assert s2[stage].get("reused") is True
    assert s2["lrm"]["jpeg-compressibility"]["reused"] is True
    assert s2["lrm"]["jpeg-compressibility"]["spearman"] == on_disk["lrm"]["jpeg-compressibility"]["spearman"]
    assert s2["eval"]["after"] == on_disk["eval"]["after"]
