"""Writers of one cache, as real processes on real files (issue 17, item 6): a second build is refused with the
holder's pid, host and start time; a stale lock (its process is gone) is taken over; three concurrent add-reward
runs of different rewards all land, with no lost manifest update and no orphan file."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_cache import CacheError, LatentCache, build_cache, verify_cache
from data_cache import storage as st
from shapes.world import ShapesWorld

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))
from _kill_build import SlowReward, TinyText, config, tiny_vae  # noqa: E402

SCRIPT = str(Path(__file__).parent / "_kill_build.py")
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "LRM_LOG_LEVEL": "WARNING"}


def _committed(out: Path) -> int:
    if not (out / st.MANIFEST).exists():
        return 0
    m = json.loads((out / st.MANIFEST).read_text())
    return len(st.merge_shard_entries(m["shards"], st.read_journals(out)))


def test_second_build_refused_naming_the_holder_then_stale_lock_taken_over(tmp_path, capsys):
    from lrm.cli import main

    n, out = 45, tmp_path / "locked"
    proc = subprocess.Popen([sys.executable, SCRIPT, str(out), str(n)], cwd=ROOT, env={**ENV, "KILL_BUILD_SLEEP": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while _committed(out) < 1 and proc.poll() is None and time.time() - t0 < 90:
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        # the same build from this process: refused, naming the holder
        with pytest.raises(CacheError, match=rf"pid {proc.pid} on host {socket.gethostname()} since 20"):
            build_cache(config(str(out), n), rewards=[SlowReward()], vae=tiny_vae(), text_encoder=TinyText())
        # through the CLI: one line, exit 2, and the running build's config.yaml / log are left alone
        before = sorted(p.name for p in out.iterdir())
        code = main(["cache", "build", "--out_dir", str(out), "--resume", "true", "--source.num_samples", str(n),
                     "--device", "cpu", "--progress", "false"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        assert f"pid {proc.pid}" in err and "wait for it to finish" in err
        assert sorted(p.name for p in out.iterdir()) == before
        # add-reward is a writer too
        code = main(["cache", "add-reward", "--cache_dir", str(out), "--reward", "brightness", "--device", "cpu"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and f"pid {proc.pid}" in err and len(err.splitlines()) == 1, err
        assert not (out / st.ADD_REWARD_RUNS).exists()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # its pid is gone: the lock is stale and taken over without a word from the user; the build resumes
    assert (out / "locks" / "build.json").exists()
    vae = tiny_vae()
    build_cache(config(str(out), n), rewards=[SlowReward()], vae=vae, text_encoder=TinyText())
    assert not (out / "locks" / "build.json").exists()
    cache = LatentCache.open(out)
    assert sorted(cache.indices.tolist()) == list(range(n)) and cache.manifest["complete"]
    assert verify_cache(out)["ok"]


def test_lock_of_another_host_is_not_taken_over(tmp_path):
    out = tmp_path / "cache"
    (out / "locks").mkdir(parents=True)
    holder = {"pid": 1, "host": "gpu-node-7", "since": "2024-01-01T00:00:00Z", "command": "lrm cache build"}
    (out / "locks" / "build.json").write_text(json.dumps(holder))
    with pytest.raises(CacheError, match=r"pid 1 on host gpu-node-7 since 2024-01-01T00:00:00Z.*delete .*build\.json"):
        build_cache(config(str(out), 3), rewards=[SlowReward()], vae=tiny_vae(), text_encoder=TinyText())
    assert not (out / st.MANIFEST).exists()
    # a pid that is gone on this host: stale, removed automatically
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    holder.update(host=socket.gethostname(), pid=dead.pid)
    (out / "locks" / "build.json").write_text(json.dumps(holder))
    build_cache(config(str(out), 3), rewards=[SlowReward()], vae=tiny_vae(), text_encoder=TinyText())
    assert st.read_manifest(out)["complete"]


def test_three_concurrent_add_rewards_all_land(tmp_path):
    n, out = 24, tmp_path / "scored"
    build_cache(config(str(out), n), rewards=[SlowReward()], vae=tiny_vae(), text_encoder=TinyText())
    names = ["red", "green", "blue-ish"]
    start = time.time() + 4.0  # every process imports first, then they start together
    procs = [subprocess.Popen([sys.executable, SCRIPT, "add-reward", str(out), name, str(start)], cwd=ROOT, env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in names]
    results = [p.communicate(timeout=180) for p in procs]
    for p, (so, se) in zip(procs, results):
        assert p.returncode == 0 and "DONE" in so, se[-3000:]
    m = st.read_manifest(out)
    shards = [e["file"] for e in m["shards"]]
    assert len(shards) == 8
    for name in names:
        assert m["rewards"][name]["storage"] == "sidecar"
        assert sorted(e["shard"] for e in m["sidecars"][name]) == sorted(shards), name
    # every file written is listed: no orphan, and verify would say so
    written = sorted(p.relative_to(out).as_posix() for p in (out / st.REWARD_DIR).rglob("*") if p.is_file())
    listed = sorted(e["file"] for name in names for e in m["sidecars"][name])
    assert written == listed
    res = verify_cache(out)
    assert res["ok"] and not any("orphan" in w for w in res["warnings"]), res
    cache = LatentCache.open(out)
    pixels, _, _ = ShapesWorld(32, None, 0).batch(cache.indices.tolist())
    for name in names:
        np.testing.assert_allclose(cache.rewards(name), pixels.flatten(1).mean(1).numpy() * len(name), rtol=1e-5)
    # an orphan reward file (an add-reward killed between its file and its manifest entry) is reported
    (out / st.REWARD_DIR / "red" / "stray.arrow").write_bytes(b"x")
    assert any("orphan file rewards/red/stray.arrow" in w for w in verify_cache(out)["warnings"])
