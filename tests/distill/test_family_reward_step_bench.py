"""bench/family_reward_step.py end to end on tiny configs of the same classes, on CPU: both reward paths run, their
losses are finite, the LoRA weights move and the base weights do not, and the JSON / markdown have every column."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("open_clip")
pytest.importorskip("peft")

from bench.family_reward_step import COLUMNS, main  # noqa: E402

ROW_KEYS = ["path", "frames", "latent_shape", "tokens", "pixel_shape", "status", "weights_gib", "reward_weights_gib",
            "optimizer_gib", "lora_grads_gib", "activations_gib", "saved_after_forward_gib", "reward_path_gib",
            "peak_gib", "peak_reserved_gib", "step_s", "step_s_all", "fwd_s", "reward_s", "bwd_s", "opt_s", "losses",
            "lora_changed", "base_unchanged"]


@pytest.mark.parametrize("family,frames,latents,pixels", [
    ("wan", [5, 9], [[2, 16, 8, 8], [3, 16, 8, 8]], [[1, 5, 3, 64, 64], [1, 9, 3, 64, 64]]),
    ("sd3", [1], [[16, 16, 16]], [[1, 3, 32, 32]]),
    ("flux", [1], [[16, 16, 16]], [[1, 3, 32, 32]]),
])
def test_family_reward_step_bench_tiny_cpu(tmp_path, family, frames, latents, pixels):
    out = tmp_path / "frs"
    main(["--tiny", "--device", "cpu", "--family", family, "--warmup", "1", "--steps", "2", "--out", str(out)])
    res = json.loads((out / f"family_reward_step_{family}.json").read_text())
    md = (out / f"family_reward_step_{family}.md").read_text()
    assert res["family"] == family and res["device"] == "cpu" and res["model"]["lora_rank"] == 64
    assert res["model"]["gradient_checkpointing"] is True and res["model"]["lora_params_m"] > 0
    assert set(res["rewards"]) == {"lrm", "pixel"} and "hpsv2" in res["rewards"]["pixel"]
    assert ("video score" in res["rewards"]["pixel"]) == (family == "wan")
    rows = res["rows"]
    # LRM rows first, then pixel rows, frames ascending
    assert [(r["path"], r["frames"]) for r in rows] == [(p, f) for p in ("lrm", "pixel") for f in frames]
    for r, lat in zip(rows, latents * 2):
        assert set(ROW_KEYS) <= set(r), set(ROW_KEYS) - set(r)
        assert r["status"] == "ok" and r["latent_shape"] == lat
        assert len(r["losses"]) == 3 and all(math.isfinite(x) for x in r["losses"])
        assert r["losses"][-1] != r["losses"][0]  # the LoRA step changes the student's output
        assert r["lora_changed"] is True and r["base_unchanged"] is True
        assert len(r["step_s_all"]) == 2 and r["step_s"] > 0 and r["fwd_s"] > 0 and r["reward_s"] > 0
        assert r["peak_gib"] is None and r["activations_gib"] is None  # CUDA counters only
    assert [r["pixel_shape"] for r in rows if r["path"] == "pixel"] == pixels  # whole clips decoded
    assert all(r["pixel_shape"] is None for r in rows if r["path"] == "lrm")
    assert [o["frames"] for o in res["ratios"]] == frames
    assert all(o["pixel_status"] == "ok" and o["step_time_ratio"] > 0 for o in res["ratios"])
    assert md.count("\n| lrm |") == len(frames) and md.count("\n| pixel |") == len(frames)
    assert "reward_path_gib" in COLUMNS and "activations_gib" in COLUMNS


def test_family_reward_step_refuses_bad_frames(capsys):
    with pytest.raises(SystemExit):
        main(["--tiny", "--device", "cpu", "--family", "wan", "--frames", "16"])
    assert "1 + 4k" in capsys.readouterr().err


def test_family_reward_step_out_of_memory_row_is_recorded(tmp_path, monkeypatch):
    """A row that runs out of CUDA memory is 'does not fit', larger frame counts of that path 'skipped'."""
    import torch

    import bench.family_reward_step as frs

    real = frs.run_row

    def run_row(ns, path, frames, *args):
        if frames >= 9:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(ns, path, frames, *args)

    monkeypatch.setattr(frs, "run_row", run_row)
    out = tmp_path / "frs"
    main(["--tiny", "--device", "cpu", "--family", "wan", "--frames", "5", "9", "13", "--paths", "pixel",
          "--warmup", "0", "--steps", "1", "--out", str(out)])
    rows = json.loads((out / "family_reward_step_wan.json").read_text())["rows"]
    assert [(r["frames"], r["status"]) for r in rows] == [(5, "ok"), (9, "does not fit"), (13, "skipped")]
    assert "out of memory" in rows[1]["error"] and "9 frames did not fit" in rows[2]["error"]
    assert "| pixel | 9 | - | does not fit |" in (out / "family_reward_step_wan.md").read_text()
