"""DistillTrainer under torchrun with 2 CPU processes (DDP through accelerate): the concurrently trained LRM head
and the student stay identical across ranks, and a resumed run continues every rank's random stream."""

import textwrap

import pytest

from tests.torchrun import results, torchrun

SCRIPT = textwrap.dedent("""
    import json, os, sys, torch
    from lrm.latent_space import VAE
    from tests.tiny_distill import tiny_trainer

    root = sys.argv[1]
    vae = VAE.shapes()

    def trainer(run, steps, ckpt_every):
        return tiny_trainer(os.path.join(root, run), vae, steps=steps, ckpt_every=ckpt_every)

    tr, head = trainer("full", 3, 0)
    full = tr.train()
    head_w = float(sum(p.double().sum() for p in head.parameters()))
    student_w = float(sum(p.double().sum() for p in tr.student.model.parameters()))
    trainer("cut", 2, 2)[0].train()  # "killed" after the step-2 checkpoint
    resumed = trainer("cut", 3, 2)[0].train()
    keys = ("loss", "loss_vsd", "loss_cd", "loss_ft", "loss_fake", "loss_lrm")
    print("RESULT", json.dumps({"rank": os.environ["RANK"], "head": head_w, "student": student_w,
                                "full": [[r[k] for k in keys] for r in full],
                                "resumed": [[r["step"]] + [r[k] for k in keys] for r in resumed]}),
          flush=True)  # written now: a block-buffered pipe loses what an abrupt interpreter exit has not flushed
""")


@pytest.mark.slow
def test_distill_under_torchrun_two_processes(tmp_path):
    script = tmp_path / "ddp_distill.py"
    script.write_text(SCRIPT)
    run = torchrun([str(script), str(tmp_path)], timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    res = {r["rank"]: r for r in results(run.stdout)}
    assert sorted(res) == ["0", "1"], f"stdout: {run.stdout[-2000:]}\nstderr: {run.stderr[-3000:]}"
    # replicas agree: the LRM head and the student are all-reduced (the head saw different samples on each rank)
    assert res["0"]["head"] == pytest.approx(res["1"]["head"], abs=1e-9)
    assert res["0"]["student"] == pytest.approx(res["1"]["student"], abs=1e-9)
    # the ranks drew different batches, so their local losses differ
    assert res["0"]["full"][0] != res["1"]["full"][0]
    # resume: each rank's step 3 equals its uninterrupted step 3 (its own RNG stream came back)
    for rank in ("0", "1"):
        step, *losses = res[rank]["resumed"][0]
        assert step == 3
        assert losses == pytest.approx(res[rank]["full"][2], rel=1e-5, abs=1e-7), rank
