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
from _kill_build import SlowReward, TinyText, config, tiny_vae  # noqa: E402


def _check_exactly_once(out_dir, n, vae, text_encoder=None):
    cache = LatentCache.open(out_dir)
    idx = cache.indices
    assert sorted(idx.tolist()) == list(range(n)), "records duplicated or missing"
    pixels, captions, _ = ShapesWorld(32, None, 0).batch(range(n))
    order = np.argsort(idx)
    t = cache.tensors()
    torch.testing.assert_close(t["latents"][order], vae.encode(pixels).half().float(), rtol=2e-3, atol=2e-3)
    assert [cache.prompts[i] for i in order] == captions
    if text_encoder is not None:
        emb = text_encoder(captions)
        torch.testing.assert_close(t["text_tokens"][order], emb.tokens.half().float(), rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(t["reward/slow-mean"][order], pixels.flatten(1).mean(1))
    res = verify_cache(out_dir)
    assert res["ok"], res["problems"]
    assert cache.manifest["complete"] and cache.manifest["counts"]["records"] == n


def test_sigkill_at_random_points_then_resume(tmp_path):
    n = 45
    out = tmp_path / "killed"
    rng = random.Random(0)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "LRM_LOG_LEVEL": "WARNING"}
    script = str(Path(__file__).parent / "_kill_build.py")
    kills = 0
    committed_at_kill = []

    def committed() -> int:
        if not (out / st.MANIFEST).exists():
            return 0
        m = json.loads((out / st.MANIFEST).read_text())
        return len(st.merge_shard_entries(m["shards"], st.read_journals(out)))

    for attempt in range(3):
        target = committed() + rng.randint(1, 3)  # kill after 1-3 more shards, at a random moment after that
        proc = subprocess.Popen([sys.executable, script, str(out), str(n)], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        t0 = time.time()
        while committed() < target and proc.poll() is None and time.time() - t0 < 90:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        committed_at_kill.append(committed())
    print("shards committed when killed:", committed_at_kill)
    # at least the first run was killed part-way, with shards on disk; later runs resumed from killed states
    assert kills >= 1 and 0 < committed_at_kill[0] < n // 3, (kills, committed_at_kill)
    # resume in-process to the end
    vae = tiny_vae()
    build_cache(config(str(out), n), rewards=[SlowReward()], vae=vae, text_encoder=TinyText())
    assert not list((out / st.SHARD_DIR).glob(".*.tmp"))
    _check_exactly_once(out, n, vae, TinyText())


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
