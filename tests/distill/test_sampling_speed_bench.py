"""bench/sampling_speed.py end to end on the tiny SD pipeline, on CPU: every row of the JSON, finite numbers."""

from __future__ import annotations

import json
import math

from bench.sampling_speed import main


def test_sampling_speed_bench_tiny_cpu(tmp_path):
    out = tmp_path / "ss"
    main(["--tiny", "--device", "cpu", "--compile", "none", "--batches", "1", "2", "--teacher_steps", "20",
          "--repeats", "2", "--warmup", "1", "--out", str(out)])
    res = json.loads((out / "sampling_speed.json").read_text())
    assert (out / "sampling_speed.md").read_text().count("\n| ") >= 32 + 8
    samplers = ["teacher", "student_4", "student_2", "student_1"]
    keys = {(r["batch"], r["sampler"], r["variant"], r["decode"]) for r in res["rows"]}
    want = {(b, s, v, d) for b in (1, 2) for s in samplers for v in ("eager", "optimized")
            for d in ("excluded", "included")}
    assert keys == want and len(res["rows"]) == len(want)
    for r in res["rows"]:
        assert math.isfinite(r["median_ms"]) and r["median_ms"] > 0 and len(r["times_ms"]) == 2
        assert math.isfinite(r["speedup_vs_teacher"]) and r["speedup_vs_teacher"] > 0
        assert r["nfe"] == ({"teacher": 40, "student_4": 4, "student_2": 2, "student_1": 1}[r["sampler"]])
        if r["sampler"] == "teacher":
            assert r["speedup_vs_teacher"] == 1.0
    by = {(r["batch"], r["sampler"], r["variant"], r["decode"]): r["median_ms"] for r in res["rows"]}
    for b in (1, 2):  # decode included costs more than excluded, from the same runs
        for s in samplers:
            assert by[(b, s, "eager", "included")] > by[(b, s, "eager", "excluded")]
    # optimized (channels_last, bf16 decode; no compile on CPU) equals eager: fp32 UNet, so the latents agree tightly
    assert {(c["batch"], c["sampler"]) for c in res["checks"]} == {(b, s) for b in (1, 2) for s in samplers}
    for c in res["checks"]:
        assert c["ok"] and c["max_abs_diff_latents"] < 1e-3 and c["rel_err_pixels"] <= c["tol"] == 1e-4
        assert c["max_abs_diff_pixels"] < 0.1  # bf16 decode
