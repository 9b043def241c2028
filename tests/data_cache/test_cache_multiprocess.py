"""A real 2-process cache build: ``torchrun --nproc_per_node 2 -m lrm.cli cache build`` on CPU (gloo, through
accelerate). Each rank writes its own shards, rank 0 merges one manifest, and the cache holds the same records as a
single-process build of the same config. (Before build.py passed ``cpu=True`` to accelerate, every process of a CPU
launch took itself for rank 0 of 1: rank 1 refused the directory rank 0 had just created.)"""

from pathlib import Path

import numpy as np
import pytest

from data_cache import LatentCache, verify_cache
from data_cache import storage as st
from tests.torchrun import torchrun

N, SHARD, BATCH = 47, 6, 4  # 8 units (the last one short), batches not aligned to shards
REWARDS = ["brightness", "jpeg-compressibility"]


def _args(out: Path) -> list[str]:
    return ["cache", "build", "--out_dir", str(out), "--source.num_samples", str(N), "--vae", "shapes",
            "--shard_size", str(SHARD), "--batch_size", str(BATCH), "--num_workers", "1", "--prefetch_batches", "2",
            "--device", "cpu", "--progress", "false", "--rewards", "[" + ", ".join(REWARDS) + "]"]


def _by_source_id(cache: LatentCache) -> dict[str, dict]:
    t = cache.tensors()
    strings = {k: cache.column(k) for k in ("prompt", "content_hash")}
    rewards = {r: cache.rewards(r) for r in REWARDS}
    return {sid: {"index": int(t["index"][row]), **{k: v[row] for k, v in strings.items()},
                  **{k: t[k][row].numpy() for k in ("latents", "text_tokens", "text_mask", "text_pooled")},
                  **{r: float(v[row]) for r, v in rewards.items()}}
            for row, sid in enumerate(cache.column("source_id"))}


@pytest.mark.slow
def test_build_under_torchrun_two_processes(tmp_path):
    multi_dir = tmp_path / "multi"
    proc = torchrun(["-m", "lrm.cli", *_args(multi_dir)], timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    # both ranks report the merged manifest (rank 1 waits for rank 0's merge): all records, complete
    summaries = [ln for ln in proc.stdout.splitlines() if ln.startswith(f"cache {multi_dir}:")]
    assert len(summaries) == 2 and all(f": {N} records (" in ln and "complete=True" in ln for ln in summaries), \
        summaries
    written = sorted(int(ln.split("(", 1)[1].split()[0]) for ln in summaries)
    assert written == [23, 24]  # rank 0: 4 units of 6; rank 1: 3 units of 6 and the short last one (42..47)

    # one merged manifest counting every record exactly once; journals folded in and removed
    m = st.read_manifest(multi_dir)
    assert m["complete"] and m["counts"]["records"] == N and m["num_records_planned"] == N
    assert not m["counts"]["rejects"] and all(v == 0 for v in m["counts"]["missing_rewards"].values())
    assert not list((multi_dir / st.JOURNAL_DIR).glob("*.json"))
    assert set(m["rewards"]) == set(REWARDS)
    # each rank wrote its own shards: unit k (source indices k*SHARD ..) went to rank k % 2, named after it
    assert len(m["shards"]) == -(-N // SHARD)
    covered = []
    for e in m["shards"]:
        k = e["start"] // SHARD
        assert e["start"] == k * SHARD and e["end"] == min(N, (k + 1) * SHARD)
        assert e["rank"] == k % 2 and st.parse_shard_name(e["file"]) == (e["start"], e["end"], e["rank"])
        assert (multi_dir / st.SHARD_DIR / e["file"]).is_file()
        covered += range(e["start"], e["end"])
    assert sorted(covered) == list(range(N))
    assert {e["rank"] for e in m["shards"]} == {0, 1}
    assert sorted(p.name for p in (multi_dir / st.SHARD_DIR).iterdir()) == sorted(e["file"] for e in m["shards"])
    res = verify_cache(multi_dir)
    assert res["ok"] and not res["warnings"] and res["records"] == N, res

    # the single-process build of the same config, in this interpreter, with one thread as each rank had (the same
    # CPU kernels then give the same bits; the tolerance below still allows one fp16 ulp)
    import torch

    from lrm.cli import main

    single_dir = tmp_path / "single"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(_args(single_dir)) == 0
    finally:
        torch.set_num_threads(threads)
    assert verify_cache(single_dir)["ok"]

    multi, single = LatentCache.open(multi_dir, check_complete=True), LatentCache.open(single_dir)
    assert len(multi) == N and sorted(multi.indices.tolist()) == list(range(N))
    ids = multi.column("source_id")
    assert len(set(ids)) == N
    a, b = _by_source_id(multi), _by_source_id(single)
    assert set(a) == set(b)
    for sid, ra in a.items():
        rb = b[sid]
        assert (ra["index"], ra["prompt"], ra["content_hash"]) == (rb["index"], rb["prompt"], rb["content_hash"])
        np.testing.assert_allclose(ra["latents"], rb["latents"], rtol=1e-3, atol=1e-5, err_msg=sid)
        np.testing.assert_allclose(ra["text_tokens"], rb["text_tokens"], rtol=1e-3, atol=1e-5, err_msg=sid)
        np.testing.assert_allclose(ra["text_pooled"], rb["text_pooled"], rtol=1e-3, atol=1e-5, err_msg=sid)
        np.testing.assert_array_equal(ra["text_mask"], rb["text_mask"], err_msg=sid)
        for r in REWARDS:
            assert ra[r] == pytest.approx(rb[r], rel=1e-6, abs=1e-6), (sid, r)
    # the manifests agree on everything but where the shards came from
    ms = st.read_manifest(single_dir)
    for k in ("latent_space", "text_encoder", "rewards", "source", "latent_shape", "pixel_shape", "counts"):
        assert m[k] == ms[k], k
