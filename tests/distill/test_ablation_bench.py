"""bench/distill_shapes_ablation.py's merge of one-process-per-row runs and its single-process retiming."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("ablation_bench", ROOT / "bench/distill_shapes_ablation.py")
ablation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ablation)

META = {"kind": "image", "teacher": "shapes-image", "device": "cpu", "prompts": 1, "per_prompt": 1,
        "gold_reward": "colorfulness", "latent_shape": [4, 8, 8], "total_seconds": 10.0}


def _row(name, calls, seconds, adherence, teacher_seconds=2.0):
    return {"name": name, "network_calls": calls, "seconds": seconds, "speedup": teacher_seconds / seconds,
            "adherence": adherence, "adherence_vs_teacher": adherence / 0.8, "vendi": 1.0, "gold": 40.0,
            "train_seconds": 5.0}


def _part(tmp_path, name, rows, teacher_adherence=0.8, **meta):
    d = tmp_path / name
    d.mkdir()
    teacher = {"name": "teacher", "seconds": 2.0, "network_calls": 100, "adherence": teacher_adherence,
               "vendi": 1.0, "gold": 45.0}
    (d / "ablation.json").write_text(json.dumps({**META, **meta, "results": {"teacher": teacher, **rows}}))
    return str(d)


def test_merge_keeps_every_row_and_refuses_other_setups(tmp_path):
    base = {"teacher_4step": _row("teacher, 4 steps, not distilled", 4, 0.1, 0.76)}
    a = _part(tmp_path, "a", {"cd_only": _row("CD only (4 steps)", 4, 0.1, 0.78), **base})
    b = _part(tmp_path, "b", {"vsd_cd_1step": _row("VSD+CD (1 step)", 1, 0.05, 0.72),
                              "teacher_4step": _row("teacher, 4 steps, not distilled", 4, 0.1, 0.6)},
              teacher_adherence=0.81)
    text = ablation.merge(tmp_path / "m", [a, b])
    merged = json.loads((tmp_path / "m/ablation.json").read_text())
    assert set(merged["results"]) == {"teacher", "teacher_4step", "cd_only", "vsd_cd_1step"}
    assert merged["teacher_adherence_per_part"] == [0.8, 0.81]
    assert merged["results"]["teacher_4step"]["adherence"] == 0.76  # the first part's, like the teacher row
    # the baseline first, then rows in ROWS order: CD only before the 1-step row; the ratio column is the row's own
    assert text.index("teacher, 4 steps") < text.index("CD only") < text.index("VSD+CD (1 step)")
    assert "| 97.5% |" in text and "| 90.0% |" in text
    c = _part(tmp_path, "c", {"vsd_only": _row("VSD only (4 steps)", 4, 0.1, 0.7)}, latent_shape=[4, 16, 16])
    with pytest.raises(SystemExit, match="latent_shape"):
        ablation.merge(tmp_path / "m2", [a, c])


def test_retime_measures_teacher_and_students_in_one_process():
    rows = {"teacher": {"name": "teacher", "seconds": 9.0, "network_calls": 100, "adherence": 0.8},
            "vsd_cd": _row("VSD+CD (4 steps)", 4, 1.0, 0.8), "vsd_cd_1step": _row("VSD+CD (1 step)", 1, 1.0, 0.7)}
    out = ablation.retime(META, rows, torch.device("cpu"), 7.5, repeats=0)
    t = out["teacher"]["seconds"]
    assert out["teacher"]["seconds_concurrent"] == 9.0 and t != 9.0
    for key in ("vsd_cd", "vsd_cd_1step"):
        assert out[key]["seconds_concurrent"] == 1.0 and out[key]["speedup_concurrent"] == 2.0
        assert out[key]["speedup"] == pytest.approx(t / out[key]["seconds"])
        assert out[key]["adherence"] == rows[key]["adherence"]  # only the timing changes
    assert out["vsd_cd"]["speedup"] > 1.0  # 4 network calls against the teacher's 100
    with pytest.raises(SystemExit, match="latent_shape"):
        ablation.retime({k: v for k, v in META.items() if k != "latent_shape"}, rows, torch.device("cpu"), 7.5)


def test_ratio_ci_is_a_paired_bootstrap_over_prompts():
    teacher = [0.9, 0.5, 0.7, 0.8, 0.6, 0.95, 0.4, 0.85]
    assert ablation.ratio_ci(teacher, teacher) == pytest.approx([1.0, 1.0])
    # a row at 90 % of the teacher on every prompt: no spread, however different the prompts are
    assert ablation.ratio_ci([0.9 * t for t in teacher], teacher) == pytest.approx([0.9, 0.9])
    noisy = [t * f for t, f in zip(teacher, [0.8, 1.1, 0.9, 1.0, 0.85, 1.05, 0.95, 0.9])]
    lo, hi = ablation.ratio_ci(noisy, teacher)
    assert lo < sum(noisy) / sum(teacher) < hi and hi - lo < 0.2
    assert ablation.ratio_ci(noisy, teacher, level=0.5)[0] > lo  # a narrower interval inside the 90 % one


def test_table_shows_sharpness_relative_to_the_teacher_when_measured(tmp_path):
    teacher = {"name": "teacher", "seconds": 2.0, "network_calls": 100, "adherence": 0.8, "vendi": 1.0,
               "gold": 45.0, "sharpness": 200.0}
    row = {**_row("CD only (4 steps)", 4, 0.1, 0.78), "sharpness": 150.0}
    text = ablation.write_tables(tmp_path, META, {"teacher": teacher, "cd_only": row})
    header, rule, t_line, r_line = text.splitlines()[2:6]
    assert header.endswith("| gold | sharpness vs teacher | train s |") and rule.count("---") == 10
    assert t_line.endswith("| 45.00 | 100% | - |") and r_line.endswith("| 40.00 | 75% | 5 |")


def test_merge_takes_timings_from_an_earlier_retimed_merge_of_the_same_setup(tmp_path):
    timed = _part(tmp_path, "timed", {"cd_only": _row("CD only (4 steps)", 4, 0.05, 0.78),
                                      "vsd_cd_1step": _row("VSD+CD (1 step)", 1, 0.0125, 0.7)},
                  timing="retimed alone in the merge process on cuda")
    a = _part(tmp_path, "a", {"vsd_cd": _row("VSD+CD (4 steps)", 4, 0.4, 0.79),
                              "vsd_cd_1step": _row("VSD+CD (1 step)", 1, 0.3, 0.72)}, overrides={"beta_cd": "1.0"})
    ablation.merge(tmp_path / "m", [a], timings_from=Path(timed))
    merged = json.loads((tmp_path / "m/ablation.json").read_text())
    res = merged["results"]
    assert res["vsd_cd"]["seconds"] == 0.05 and res["vsd_cd"]["speedup"] == pytest.approx(40.0)  # by network calls
    assert res["vsd_cd_1step"]["speedup"] == pytest.approx(160.0)
    assert res["vsd_cd"]["seconds_concurrent"] == 0.4 and res["vsd_cd"]["adherence"] == 0.79
    assert "taken from" in merged["timing"]
    not_retimed = _part(tmp_path, "plain", {"cd_only": _row("CD only (4 steps)", 4, 0.05, 0.78)})
    with pytest.raises(SystemExit, match="timing"):
        ablation.merge(tmp_path / "m2", [a], timings_from=Path(not_retimed))
    other = _part(tmp_path, "other", {"cd_only": _row("CD only (4 steps)", 4, 0.05, 0.78)}, prompts=2,
                  timing="retimed")
    with pytest.raises(SystemExit, match="prompts"):
        ablation.merge(tmp_path / "m3", [a], timings_from=Path(other))


def test_validation_prompts_are_fixed_and_disjoint_from_the_test_prompts():
    for video in (False, True):
        test, val = ablation.heldout_prompts(8, video), ablation.heldout_prompts(8, video, "val")
        assert len(set(val)) == 8 and not set(val) & set(test)
        assert val == ablation.heldout_prompts(8, video, "val")
    with pytest.raises(ValueError, match="split"):
        ablation.heldout_prompts(8, False, "train")
