"""Issue 17, item 7 (cache parts): command rewards time out once per batch and take their children with them, a
reward failing everywhere fails the build, --overwrite only deletes caches, folder captions stay inside their folder,
the generator option says it runs code, `lrm cache verify DIR`, progress per batch, and empty / one-record caches
read for training give a clear error."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MeanReward
from PIL import Image

from data_cache import CacheError, LatentCache, SourceConfig, build_cache
from data_cache import storage as st
from reward_adapters import create_reward
from shapes.world import ShapesWorld

PY = sys.executable

# Hangs on its first call (after starting a child that would outlive it), scores 0.5 afterwards; logs every call.
HANG_ONCE = r"""
import json, os, subprocess, sys, time
flag, pidfile, log, d = sys.argv[1:5]
with open(log, "a") as f:
    f.write("call\n")
n = len(json.load(open(os.path.join(d, "inputs.json")))["files"])
if not os.path.exists(flag):
    open(flag, "w").close()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    open(pidfile, "w").write(str(child.pid))
    time.sleep(60)
json.dump([0.5] * n, open(os.path.join(d, "scores.json"), "w"))
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def _hang_once(tmp_path, tag):
    script = tmp_path / "hang_once.py"
    script.write_text(HANG_ONCE)
    files = [tmp_path / f"{tag}.{k}" for k in ("flag", "pid", "log")]
    reward = create_reward("command", command=[PY, str(script), *map(str, files), "{dir}"], timeout=3, name="cmd")
    return reward, files


@pytest.mark.parametrize("retry", [False, True])
def test_command_reward_times_out_once_per_batch_and_its_children_die(vae, text_encoder, small_cfg, tmp_path, retry):
    reward, (_, pidfile, log) = _hang_once(tmp_path, f"r{retry}")
    kw = {"retry_timeouts_per_record": True} if retry else {}  # the default: no retry
    cfg = small_cfg(n=8, shard_size=8, batch_size=4, name=f"c{retry}", **kw)
    m = build_cache(cfg, rewards=[reward], vae=vae, text_encoder=text_encoder)["manifest"]
    child = int(pidfile.read_text())
    assert not _alive(child), "the scorer's child outlived the timeout"
    calls = len(log.read_text().splitlines())
    v = LatentCache.open(cfg.out_dir).rewards("cmd")
    if not retry:  # one timeout for the first batch: its 4 records fail; the second batch is scored
        assert calls == 2
        assert np.isnan(v[:4]).all() and (v[4:] == 0.5).all()
        assert m["counts"]["rejects"] == {"reward_timeout:cmd": 4}
        assert "timed out after 3 s" in json.loads((Path(cfg.out_dir) / st.REJECTS).read_text().splitlines()[0])[
            "message"]
    else:  # asked for: each record of the timed-out batch is tried again on its own
        assert calls == 1 + 4 + 1
        assert (v == 0.5).all() and not m["counts"]["rejects"]
    assert m["complete"]


class AlwaysFails(MeanReward):
    name = "broken"

    def __call__(self, pixels, prompts=None):
        raise RuntimeError("model weights are garbage")


@pytest.mark.parametrize("policy", ["nan", "skip"])
def test_a_reward_failing_on_every_record_fails_the_build(vae, text_encoder, small_cfg, policy):
    cfg = small_cfg(n=6, shard_size=4, on_reward_error=policy, name=policy)
    with pytest.raises(CacheError, match="reward 'broken' failed on every record it scored .*garbage"):
        build_cache(cfg, rewards=[MeanReward(), AlwaysFails()], vae=vae, text_encoder=text_encoder)
    assert st.read_manifest(cfg.out_dir)["complete"] is False


def test_cli_build_with_a_reward_failing_everywhere_exits_nonzero(tmp_path, capsys):
    from lrm.cli import main

    d = tmp_path / "c"
    code = main(["cache", "build", "--out_dir", str(d), "--source.num_samples", "4", "--shard_size", "4",
                 "--device", "cpu", "--progress", "false", "--num_workers", "1", "--rewards", "[command]",
                 "--reward_options", "{command: {command: 'false', timeout: 30}}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "failed on every record" in err[-1] and "complete=True" not in err[-1]
    assert st.read_manifest(d)["complete"] is False


def test_overwrite_refuses_a_directory_that_is_not_a_cache(vae, text_encoder, small_cfg, tmp_path, capsys):
    from lrm.cli import main

    cfg = small_cfg(n=4, overwrite=True, name="notacache")
    root = Path(cfg.out_dir)
    (root / "shards").mkdir(parents=True)
    (root / "shards" / "thesis.tex").write_text("years of work")
    (root / "manifest.json").write_text(json.dumps({"name": "another tool's manifest"}))
    with pytest.raises(CacheError, match="only deletes a latent cache"):
        build_cache(cfg, rewards=[MeanReward()], vae=vae, text_encoder=text_encoder)
    code = main(["cache", "build", "--out_dir", str(root), "--overwrite", "true", "--source.num_samples", "4",
                 "--device", "cpu", "--progress", "false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "only deletes a latent cache" in err[0]
    assert (root / "shards" / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in root.iterdir()) == ["manifest.json", "shards"]  # no config.yaml, no lock
    # a cache of ours is overwritten
    cfg = small_cfg(n=4, name="ours")
    build_cache(cfg, rewards=[MeanReward()], vae=vae, text_encoder=text_encoder)
    cfg.overwrite, cfg.source.num_samples = True, 2
    assert build_cache(cfg, rewards=[MeanReward()], vae=vae, text_encoder=text_encoder)["manifest"]["counts"][
        "records"] == 2


def test_folder_captions_cannot_leave_the_folder(vae, text_encoder, small_cfg, tmp_path):
    pixels, captions, _ = ShapesWorld(32, None, 0).batch(range(3))
    imgs = [(p.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for p in pixels]
    folder = tmp_path / "data"
    folder.mkdir()
    Image.fromarray(imgs[0]).save(folder / "ok.png")
    Image.fromarray(imgs[1]).save(tmp_path / "secret.png")  # beside the folder, not in it
    rows = [{"file": "ok.png", "caption": captions[0]}, {"file": "../secret.png", "caption": captions[1]},
            {"file": str(tmp_path / "secret.png"), "caption": captions[2]},
            {"file": "./ok.png", "caption": captions[0]}]
    (folder / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = SourceConfig(type="folder", path=str(folder), captions_file="captions.jsonl", num_samples=0)
    m = build_cache(small_cfg(source=src, name="inside"), rewards=[MeanReward()], vae=vae,
                    text_encoder=text_encoder)["manifest"]
    assert m["counts"]["records"] == 2 and m["counts"]["rejects"] == {"outside_root": 2}
    log = [json.loads(line) for line in (tmp_path / "inside" / st.REJECTS).read_text().splitlines()]
    assert all("allow_outside_root" in r["message"] for r in log)
    src.allow_outside_root = True
    m = build_cache(small_cfg(source=src, name="allowed"), rewards=[MeanReward()], vae=vae,
                    text_encoder=text_encoder)["manifest"]
    assert m["counts"]["records"] == 4 and not m["counts"]["rejects"]


def test_generator_option_is_documented_as_code_execution(capsys):
    from lrm.cli import main

    with pytest.raises(SystemExit):
        main(["cache", "build", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    help_text = out.split("--source.generator ", 1)[1][:600]
    assert "code execution" in help_text and "trust" in help_text


def test_verify_and_stats_take_the_directory_as_an_argument(vae, text_encoder, small_cfg, capsys):
    from lrm.cli import main

    cfg = small_cfg(n=4)
    build_cache(cfg, rewards=[MeanReward()], vae=vae, text_encoder=text_encoder)
    assert main(["cache", "verify", cfg.out_dir]) == 0
    assert "OK: 1 shards, 4 records" in capsys.readouterr().out
    assert main(["cache", "verify", cfg.out_dir, "--deep", "false"]) == 0
    assert main(["cache", "verify", "--cache_dir", cfg.out_dir]) == 0
    capsys.readouterr()
    assert main(["cache", "stats", cfg.out_dir]) == 0
    assert json.loads(capsys.readouterr().out)["records"] == 4


def test_progress_moves_per_batch(vae, text_encoder, small_cfg, monkeypatch):
    import tqdm.auto

    updates = []

    class Bar:
        def __init__(self, *a, **k):
            self.total = k.get("total")

        def update(self, n):
            updates.append(n)

        def close(self):
            pass

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    cfg = small_cfg(n=10, shard_size=8, batch_size=3)
    cfg.progress = True
    build_cache(cfg, rewards=[MeanReward()], vae=vae, text_encoder=text_encoder)
    # batches aligned to multiples of 3 within shards [0, 8) and [8, 10): not once per shard (8, 2)
    assert updates == [3, 3, 2, 1, 1]


def test_empty_and_one_record_caches_give_a_clear_error_for_training(vae, text_encoder, small_cfg, tmp_path, capsys):
    from lrm.cli import main

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "captions.jsonl").write_text(json.dumps({"file": "gone.png", "caption": "a red circle"}) + "\n")
    src = SourceConfig(type="folder", path=str(folder), captions_file="captions.jsonl", num_samples=0)
    empty = small_cfg(source=src, name="empty")
    build_cache(empty, rewards=[MeanReward()], vae=vae, text_encoder=text_encoder)
    cache = LatentCache.open(empty.out_dir)
    assert len(cache) == 0
    with pytest.raises(CacheError, match=r"holds no records \(all 1 records were rejected: see .*rejects.jsonl\)"):
        cache.tensors()
    one = small_cfg(n=1, name="one")
    build_cache(one, rewards=[MeanReward()], vae=vae, text_encoder=text_encoder)
    with pytest.raises(CacheError, match="1 record.* 1 distinct prompt.*at least 2"):
        LatentCache.open(one.out_dir).split_by_prompt(0.1)
    assert torch.isfinite(LatentCache.open(one.out_dir).tensors()["reward/mean-brightness"]).all()
    # where training reads them (latent_rewards may check the size first): one line, exit 2, no traceback
    for d in (empty.out_dir, one.out_dir):
        capsys.readouterr()
        code = main(["train", "--cache_dir", d, "--reward", "mean-brightness", "--out_dir", str(tmp_path / "lrm"),
                     "--device", "cpu", "--steps", "1"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and "record" in err[-1] and "Traceback" not in "".join(err), err
