"""fit under torchrun with 2 CPU processes (DDP through accelerate): ranks agree and the run differs from 1 process."""

import textwrap

import pytest

from tests.torchrun import results, torchrun

SCRIPT = textwrap.dedent("""
    import json, os, sys, torch
    from latent_rewards import fit, LatentData
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 4, 8, 8, generator=g)
    y = 3 * x.mean((2, 3))[:, 0] - x.mean((2, 3))[:, 1]
    r = fit(LatentData(x, y, prompts=[f"p{i % 30}" for i in range(300)]), head="image-cnn", ensemble=2,
            head_kwargs={"width": 16, "patch": 2}, steps=15, batch_size=32, eval_every=5, progress=False,
            device="cpu")
    w = float(sum(p.double().sum() for p in r.lrm.model.parameters()))
    print("RESULT", json.dumps({"rank": os.environ.get("RANK", "0"), "w": w, "steps": [h["step"] for h in r.history]}),
          flush=True)
""")


@pytest.mark.slow
def test_fit_under_torchrun_two_processes(tmp_path):
    script = tmp_path / "ddp_fit.py"
    script.write_text(SCRIPT)
    multi = torchrun([str(script)], timeout=180)
    assert multi.returncode == 0, multi.stderr[-2000:]
    ranks = results(multi.stdout)
    assert sorted(r["rank"] for r in ranks) == ["0", "1"], multi.stdout[-2000:] + multi.stderr[-2000:]
    assert ranks[0]["w"] == pytest.approx(ranks[1]["w"], abs=1e-6)  # DDP keeps the replicas identical
    assert ranks[0]["steps"] == [5, 10, 15]
    # the same run in one process (in this interpreter) ends elsewhere: gradients were averaged over 2 ranks
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(SCRIPT, "ddp_fit.py", "exec"), {"__name__": "__main__"})
    assert abs(ranks[0]["w"] - results(buf.getvalue())[0]["w"]) > 1e-6
