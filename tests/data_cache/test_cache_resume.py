import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from data_cache import BuildCacheConfig, LatentCache, SourceConfig, build_cache, finalize_cache, verify_cache
from data_cache import storage as st
from shapes.world import ShapesWorld

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))
from _kill_build import SlowReward  # noqa: E402


def _check_exactly_once(out_dir, n, vae):
    cache = LatentCache.open(out_dir)
    idx = cache.indices
    assert sorted(idx.tolist()) == list(range(n)), "records duplicated or missing"
    pixels, captions, _ = ShapesWorld(32, None, 0).batch(range(n))
    order = np.argsort(idx)
    t = cache.tensors()
    torch.testing.assert_close(t["latents"][order], vae.encode(pixels).half().float(), rtol=2e-3, atol=2e-3)
    assert [cache.prompts[i] for i in order] == captions
    torch.testing.assert_close(t["reward/slow-mean"][order], pixels.flatten(1).mean(1))
    res = verify_cache(out_dir)
    assert res["ok"], res["problems"]
    assert cache.manifest["complete"] and cache.manifest["counts"]["records"] == n


def test_sigkill_at_random_points_then_resume(tmp_path, vae, text_encoder):
    n = 30
    out = tmp_path / "killed"
    rng = random.Random(0)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "LRM_LOG_LEVEL": "WARNING"}
    script = str(Path(__file__).parent / "_kill_build.py")
    kills = 0
    committed_before = []
    for attempt in range(3):
        proc = subprocess.Popen([sys.executable, script, str(out), str(n)], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        # wait until this run is building (manifest written), then kill after a random delay
        t0 = time.time()
        while not (out / st.MANIFEST).exists() and proc.poll() is None and time.time() - t0 < 60:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.8))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        m = json.loads((out / st.MANIFEST).read_text())
        committed_before.append(len(st.merge_shard_entries(m["shards"], st.read_journals(out))))
    assert kills >= 1, "the build finished before any kill; make it slower"
    # resume in-process to the end
    cfg = BuildCacheConfig(out_dir=str(out), source=SourceConfig(num_samples=n), batch_size=2, shard_size=3,
                           num_workers=1, progress=False, device="cpu", resume=True)
    build_cache(cfg, rewards=[SlowReward()], vae=vae, text_encoder=text_encoder)
    assert not list((out / st.SHARD_DIR).glob(".*.tmp"))
    _check_exactly_once(out, n, vae)


def test_orphan_shard_adopted_torn_files_removed(tmp_path, vae, text_encoder):
    n = 9
    out = tmp_path / "orphans"
    cfg = BuildCacheConfig(out_dir=str(out), source=SourceConfig(num_samples=n), batch_size=2, shard_size=3,
                           num_workers=1, progress=False, device="cpu")
    build_cache(cfg, rewards=[SlowReward()], vae=vae, text_encoder=text_encoder)
    m = st.read_manifest(out)
    files = [e["file"] for e in m["shards"]]
    # crash after renaming shard 2 but before the journal/manifest listed it; shard 1 is torn garbage with a
    # valid name (never happens through rename, but a disk can do it); a temp file was left mid-write
    m["shards"] = m["shards"][:1]
    m["complete"] = False
    m["counts"] = st.summarize_counts(m)
    st.write_manifest(out, m)
    (out / st.SHARD_DIR / files[1]).write_bytes(b"ARROW1 torn")
    (out / st.SHARD_DIR / f".{files[1]}.abc.tmp").write_bytes(b"partial")
    res = verify_cache(out)
    assert res["ok"] and any(files[2] in w for w in res["warnings"])
    cfg.resume = True
    build_cache(cfg, rewards=[SlowReward()], vae=vae, text_encoder=text_encoder)
    m = st.read_manifest(out)
    assert files[2] in [e["file"] for e in m["shards"]]  # adopted, not rebuilt
    _check_exactly_once(out, n, vae)


def test_extend_finished_cache_and_two_ranks(tmp_path, vae, text_encoder):
    out = tmp_path / "ranks"
    base = dict(out_dir=str(out), batch_size=2, shard_size=2, num_workers=1, progress=False, device="cpu")
    # two simulated ranks run one after the other (rank 0 creates the manifest), then the merge
    for rank in (0, 1):
        cfg = BuildCacheConfig(source=SourceConfig(num_samples=7), **base)
        build_cache(cfg, rewards=[SlowReward()], vae=vae, text_encoder=text_encoder, rank=rank, world_size=2,
                    finalize=False)
    m = finalize_cache(out)
    ranks = {e["rank"] for e in m["shards"]}
    assert ranks == {0, 1} and m["complete"] and m["counts"]["records"] == 7
    assert not list((out / st.JOURNAL_DIR).glob("*.json"))
    # extend the finished cache to 11 records (append-only: earlier shards untouched)
    before = {e["file"]: e["sha256"] for e in m["shards"]}
    cfg = BuildCacheConfig(source=SourceConfig(num_samples=11), resume=True, **base)
    build_cache(cfg, rewards=[SlowReward()], vae=vae, text_encoder=text_encoder)
    after = {e["file"]: e["sha256"] for e in st.read_manifest(out)["shards"]}
    assert all(after[f] == h for f, h in before.items())
    _check_exactly_once(out, 11, vae)
