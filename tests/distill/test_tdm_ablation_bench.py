"""bench/distill_shapes_ablation.py --suite tdm end to end on CPU: a tiny flow teacher, every row one step."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("ablation_bench_tdm", ROOT / "bench/distill_shapes_ablation.py")
ablation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ablation)

ROW_KEYS = ("adherence", "adherence_vs_teacher", "sharpness", "vendi", "gold", "frechet", "gold:colorfulness",
            "gold:temporal-flickering-float", "seconds", "speedup")


def _tiny_flow_teacher(path: Path) -> Path:
    """A random rectified-flow Shapes video teacher (UNet3D width 8): the 'degraded generator'."""
    from distill.denoiser import Denoiser
    from distill.models import shapes_video_unet
    from lrm.schedules import FlowSchedule
    from lrm.text import TextEncoder

    torch.manual_seed(0)
    null = TextEncoder("all-MiniLM-L6-v2")([""])
    unet = shapes_video_unet(4, 8, 384, width=8, heads=1, norm_num_groups=8)
    Denoiser(unet, FlowSchedule(1000), "flow", cfg_null=(null.tokens, null.mask)).save_pretrained(path)
    return path


def test_tdm_suite_rows_and_columns_end_to_end(tmp_path):
    from eval.frechet import frechet_from_features, real_shapes, shapes_video_features

    teacher = _tiny_flow_teacher(tmp_path / "teacher")
    out, n = tmp_path / "out", 32
    ablation.main(["--suite", "tdm", "--teacher", str(teacher), "--out", str(out), "--device", "cpu",
                   "--num_frames", "4", "--steps", "1", "--batch_size", "2", "--num_data", "8", "--prompts", "2",
                   "--per_prompt", "2", "--teacher_steps", "2", "--frechet_n", str(n), "--frechet_boot", "20",
                   "--lrm_records", "40", "--lrm_steps", "2", "--timing_repeats", "0",
                   "--set", "cd_teacher_steps=2", "--set", "fake_updates=1", "--split", "val,test"])
    # each row trained once (OUT/<row>/log.csv) and scored on both splits' prompts: OUT/val/ and OUT/test/ tables
    val = json.loads((out / "val" / "ablation.json").read_text())
    res = json.loads((out / "test" / "ablation.json").read_text())
    assert (val["split"], res["split"]) == ("val", "test")
    assert val["results"]["tdm"]["train_seconds"] == res["results"]["tdm"]["train_seconds"]
    assert val["results"]["tdm"]["adherence"] != res["results"]["tdm"]["adherence"]
    assert res["suite"] == "tdm" and res["frechet_n"] == n
    assert res["targeted_rewards"] == ["colorfulness", "temporal-flickering-float"]
    rows = res["results"]
    assert set(rows) == {"teacher", "teacher_4step", *(s for _, s in ablation.TDM_ROWS)}
    for key, r in rows.items():
        for col in ROW_KEYS if key != "teacher" else [k for k in ROW_KEYS if k not in ("adherence_vs_teacher",
                                                                                           "speedup")]:
            assert math.isfinite(r[col]), (key, col, r.get(col))
        lo, hi = r["frechet_ci90"]
        assert lo <= hi and len(r["frechet_boot"]) == 20
        if key not in ("teacher", "teacher_4step"):
            assert r["step_time_s"] > 0 and r["peak_mem_mb"] is None  # CPU: no CUDA peak
            assert (out / key / "log.csv").is_file()
    # the latent rows ran on LRMs the bench fitted first, one per targeted pixel reward
    assert set(res["lrm_fits"]) == {"colorfulness", "temporal-flickering-float"}
    assert (out / "lrms" / "colorfulness" / "model.safetensors").is_file()
    md = (out / "test" / "ablation.md").read_text()
    assert "| FD to real [90% CI] | FD - FD(TDM) [90% CI] | colorfulness | temporal-flickering-float | s/step |" in md
    assert "- GAN vs TDM:" in md and "latent / pixel reward gain" in md
    # another seed's real renders are far closer to the real reference than any (random, 1-step) generator
    real, _ = real_shapes(n, 1, 4)
    other, _ = real_shapes(n, 3, 4)
    fd_real = frechet_from_features(shapes_video_features(real), shapes_video_features(other))
    assert fd_real < 0.25 * min(r["frechet"] for r in rows.values()), fd_real


def test_rows_take_the_teacher_and_baseline_from_a_reference_run(tmp_path):
    """--rows none measures the teacher and the untrained baseline once; row processes read them (--reference)
    instead of sampling them again, and refuse a reference of another evaluation set-up."""
    teacher = _tiny_flow_teacher(tmp_path / "teacher")
    common = ["--suite", "tdm", "--teacher", str(teacher), "--device", "cpu", "--num_frames", "4", "--steps", "1",
              "--batch_size", "2", "--num_data", "8", "--prompts", "2", "--per_prompt", "2", "--teacher_steps", "2",
              "--frechet_n", "16", "--frechet_boot", "5", "--timing_repeats", "0", "--split", "val,test",
              "--set", "fake_updates=1"]
    ref = tmp_path / "ref"
    ablation.main([*common, "--rows", "none", "--out", str(ref)])
    ablation.main([*common, "--rows", "tdm", "--out", str(tmp_path / "row"), "--reference", str(ref)])
    for split in ("val", "test"):
        r = json.loads((ref / split / "ablation.json").read_text())["results"]
        assert set(r) == {"teacher", "teacher_4step"}
        row = json.loads((tmp_path / "row" / split / "ablation.json").read_text())["results"]
        assert row["teacher"] == r["teacher"] and row["teacher_4step"] == r["teacher_4step"]
        assert row["tdm"]["adherence_vs_teacher"] == row["tdm"]["adherence"] / r["teacher"]["adherence"]
    with pytest.raises(SystemExit, match="prompts"):  # the last --prompts wins
        ablation.main([*common, "--prompts", "3", "--rows", "tdm", "--out", str(tmp_path / "x"),
                       "--reference", str(ref), "--reference_wait", "0"])
