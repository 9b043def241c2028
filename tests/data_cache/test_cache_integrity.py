import json

import numpy as np
import pytest
import torch
from conftest import MeanReward
from PIL import Image

from data_cache import (
    AddRewardConfig,
    CacheError,
    LatentCache,
    LatentSpaceMismatchError,
    SourceConfig,
    TextEncoderMismatchError,
    add_reward,
    build_cache,
    verify_cache,
)
from data_cache import storage as st
from shapes.world import ShapesWorld


def test_verify_catches_damaged_shard(vae, text_encoder, small_cfg):
    from lrm.cli import main

    cfg = small_cfg(n=8, shard_size=4)
    build_cache(cfg, rewards=[MeanReward()], vae=vae, text_encoder=text_encoder)
    assert verify_cache(cfg.out_dir)["ok"]
    m = st.read_manifest(cfg.out_dir)
    path = st.Path(cfg.out_dir) / st.SHARD_DIR / m["shards"][1]["file"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of the records
    path.write_bytes(bytes(data))
    res = verify_cache(cfg.out_dir)
    assert not res["ok"]
    assert any(m["shards"][1]["file"] in p and "sha256" in p for p in res["problems"])
    assert not any(m["shards"][0]["file"] in p for p in res["problems"])
    with pytest.raises(SystemExit) as e:
        main(["cache", "verify", "--cache_dir", cfg.out_dir])
    assert e.value.code == 1
    path.unlink()
    assert any("missing" in p for p in verify_cache(cfg.out_dir)["problems"])


def _other_vae():
    from diffusers import AutoencoderKL

    from lrm.latent_space import VAE

    torch.manual_seed(0)
    ae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                       up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 16, 16), latent_channels=4,
                       norm_num_groups=8, layers_per_block=1)
    return VAE(ae, vae_id="tiny-random-vae")


def test_mixed_latent_spaces_and_text_encoders_refused(vae, text_encoder, small_cfg):
    from lrm.text import TextEncoder

    cfg = small_cfg(n=4, shard_size=2)
    build_cache(cfg, rewards=[], vae=vae, text_encoder=text_encoder)
    cfg.resume = True
    cfg.source.num_samples = 8
    with pytest.raises(LatentSpaceMismatchError, match="tiny-random-vae"):
        build_cache(cfg, rewards=[], vae=_other_vae(), text_encoder=text_encoder)
    with pytest.raises(TextEncoderMismatchError, match="max_length"):
        build_cache(cfg, rewards=[], vae=vae, text_encoder=TextEncoder(max_length=16))
    with pytest.raises(CacheError, match="add-reward"):
        build_cache(cfg, rewards=[MeanReward()], vae=vae, text_encoder=text_encoder)
    assert st.read_manifest(cfg.out_dir)["counts"]["records"] == 4  # nothing was mixed in
    # add-reward refuses a decoding VAE from another space too
    with pytest.raises(LatentSpaceMismatchError):
        add_reward(AddRewardConfig(cache_dir=cfg.out_dir, pixels_from="decode", progress=False, device="cpu"),
                   reward=MeanReward(), vae=_other_vae())
    # generator latents with the wrong channel count
    gen = lambda n, seed: (torch.zeros(n, 3, 8, 8), ["x"] * n)  # noqa: E731
    g = small_cfg(source=SourceConfig(type="generator", num_samples=2), name="gen")
    with pytest.raises(LatentSpaceMismatchError, match="3 channels"):
        build_cache(g, source=gen, rewards=[], vae=vae, text_encoder=text_encoder)


def test_a_copy_of_the_vae_under_another_name_is_the_same_space(vae, text_encoder, small_cfg):
    """Latent spaces are matched by the VAE's weights, not its name: resume and add-reward with the shipped Shapes
    VAE loaded from its directory (vae_id = the path) on a cache built with `shapes` (vae_id 'shapes-vae')."""
    from lrm.latent_space import _shapes_vae_dir

    cfg = small_cfg(n=4, shard_size=2)
    build_cache(cfg, rewards=[], vae=vae, text_encoder=text_encoder)
    cfg.resume, cfg.source.num_samples, cfg.vae = True, 6, str(_shapes_vae_dir())
    build_cache(cfg, rewards=[], text_encoder=text_encoder)  # the VAE is loaded from cfg.vae
    m = st.read_manifest(cfg.out_dir)
    assert m["counts"]["records"] == 6 and m["latent_space"]["vae_id"] == "shapes-vae"
    out = add_reward(AddRewardConfig(cache_dir=cfg.out_dir, reward="mean-brightness", pixels_from="decode",
                                     vae=str(_shapes_vae_dir()), progress=False, device="cpu"), reward=MeanReward())
    assert np.isfinite(LatentCache.open(cfg.out_dir).rewards("mean-brightness")).all(), out


class FlakyReward:
    """Raises on very bright images, returns NaN on very dark ones."""

    name = "flaky"
    version = "0"
    modality = "image"
    device = "cpu"

    def __call__(self, pixels, prompts=None):
        m = pixels.flatten(1).mean(1)
        if (m > 0.9).any():
            raise RuntimeError("too bright")
        return torch.where(m < 0.05, torch.full_like(m, float("nan")), m)


def _write_folder(root, n_good=6):
    root.mkdir()
    pixels, captions, _ = ShapesWorld(32, None, 0).batch(range(n_good))
    rows = []
    for i in range(n_good):
        arr = (pixels[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr).save(root / f"img{i}.png")
        rows.append({"file": f"img{i}.png", "caption": captions[i]})
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "gray.png")
    rows += [{"file": "broken.png", "caption": "a broken file"}, {"file": "gray.png", "caption": "a gray image"},
             {"file": "missing.png", "caption": "not there"}, {"file": "img0.png", "caption": ""},
             {"file": "img1.png", "caption": "wrong size"}]
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "small.png")
    rows[-1]["file"] = "small.png"
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return pixels, captions


def test_bad_records_are_counted_not_fatal(vae, text_encoder, small_cfg, tmp_path):
    pixels, captions = _write_folder(tmp_path / "imgs")
    src = SourceConfig(type="folder", path=str(tmp_path / "imgs"), captions_file="captions.jsonl", num_samples=0)
    cfg = small_cfg(source=src, shard_size=4, batch_size=3)
    out = build_cache(cfg, rewards=[FlakyReward(), MeanReward()], vae=vae, text_encoder=text_encoder)
    m = out["manifest"]
    assert m["complete"] and m["counts"]["records"] == 6
    bright = pixels.flatten(1).mean(1) > 0.9
    dark = pixels.flatten(1).mean(1) < 0.05
    assert bright.any() and dark.any(), "fixture must exercise both failure modes"
    rej = m["counts"]["rejects"]
    assert rej["unreadable"] == 2 and rej["wrong_channels"] == 1 and rej["bad_prompt"] == 1
    assert rej["wrong_size"] == 1
    assert rej["reward_error:flaky"] == int(bright.sum()) and rej["reward_nan:flaky"] == int(dark.sum())
    assert m["counts"]["missing_rewards"]["flaky"] == int((bright | dark).sum())
    log = [json.loads(line) for line in (st.Path(cfg.out_dir) / st.REJECTS).read_text().splitlines()]
    assert len(log) == sum(rej.values())
    assert {r["source_id"] for r in log if r["reason"] == "unreadable"} == {"folder:broken.png", "folder:missing.png"}
    cache = LatentCache.open(cfg.out_dir)
    f = cache.rewards("flaky")
    np.testing.assert_array_equal(np.isnan(f), (bright | dark).numpy())
    png = (pixels * 255).round() / 255  # what the PNG files hold
    torch.testing.assert_close(torch.from_numpy(cache.rewards("mean-brightness")), png.flatten(1).mean(1),
                               rtol=1e-5, atol=1e-5)
    assert cache.stats()["flaky"]["missing"] == int((bright | dark).sum())
    # skip policy: the failing records are left out instead
    cfg2 = small_cfg(source=src, shard_size=4, on_reward_error="skip", name="skip")
    m2 = build_cache(cfg2, rewards=[FlakyReward()], vae=vae, text_encoder=text_encoder)["manifest"]
    assert m2["counts"]["records"] == 6 - int((bright | dark).sum())


def test_add_reward_decode_and_source(vae, text_encoder, small_cfg):
    cfg = small_cfg(n=6, shard_size=4)
    build_cache(cfg, rewards=[MeanReward()], vae=vae, text_encoder=text_encoder)
    pixels, captions, _ = ShapesWorld(32, None, 0).batch(range(6))

    class Red(MeanReward):
        name = "red"

        def __call__(self, px, prompts=None):
            return px[:, 0].flatten(1).mean(1)

    class RedDecoded(Red):
        name = "red-decoded"

    res = add_reward(AddRewardConfig(cache_dir=cfg.out_dir, pixels_from="source", progress=False, device="cpu"),
                     reward=Red())
    assert res["pixels"]["source"] == 6
    add_reward(AddRewardConfig(cache_dir=cfg.out_dir, pixels_from="decode", progress=False, device="cpu"),
               reward=RedDecoded(), vae=vae)
    cache = LatentCache.open(cfg.out_dir)
    assert set(cache.reward_names) == {"mean-brightness", "red", "red-decoded"}
    torch.testing.assert_close(torch.from_numpy(cache.rewards("red")), pixels[:, 0].flatten(1).mean(1))
    latents = cache.tensors()["latents"]
    expect = vae.decode(latents)[:, 0].flatten(1).mean(1)
    torch.testing.assert_close(torch.from_numpy(cache.rewards("red-decoded")), expect, rtol=1e-4, atol=1e-4)
    assert cache.manifest["rewards"]["red-decoded"]["pixels_from"] == "decode"
    assert cache[3]["reward/red"].item() == pytest.approx(float(pixels[3, 0].mean()), rel=1e-5)
    assert verify_cache(cfg.out_dir)["ok"]
    with pytest.raises(CacheError, match="already has reward"):
        add_reward(AddRewardConfig(cache_dir=cfg.out_dir, progress=False, device="cpu"), reward=MeanReward())


def test_split_by_prompt_and_filters(vae, text_encoder, small_cfg):
    cfg = small_cfg(n=40, shard_size=16, batch_size=8)
    build_cache(cfg, rewards=[MeanReward()], vae=vae, text_encoder=text_encoder)
    cache = LatentCache.open(cfg.out_dir)
    prompts = cache.prompts
    # make some prompts repeat so leakage is possible: the Shapes captions already repeat a few times
    for seed in (0, 1, 2):
        tr, va = cache.split_by_prompt(0.25, seed=seed)
        assert len(tr) + len(va) == 40 and not set(tr) & set(va)
        assert not {prompts[i] for i in tr} & {prompts[i] for i in va}
        assert 5 <= len(va) <= 20
    a, b = cache.split_by_prompt(0.25, seed=0)
    np.testing.assert_array_equal(a, cache.split_by_prompt(0.25, seed=0)[0])
    # forced repeats: a view with duplicated records keeps both copies on the same side
    dup = cache.subset(np.r_[np.arange(40), np.arange(10)])
    tr, va = dup.split_by_prompt(0.3, seed=1)
    p = dup.prompts
    assert not {p[i] for i in tr} & {p[i] for i in va}
    v = cache.rewards("mean-brightness")
    bright = cache.filter(reward="mean-brightness", min=0.5)
    assert len(bright) == int((v >= 0.5).sum()) > 0
    assert (bright.tensors()["reward/mean-brightness"] >= 0.5).all()
    np.testing.assert_array_equal(bright.indices, np.flatnonzero(v >= 0.5))
    tr_cache = cache.subset(tr[tr < 40])
    assert len(tr_cache.tensors()["latents"]) == len(tr_cache)


# ---- issue 17, item 3: sizes and hashes in the manifest, checked by readers / verify / resume; repair ----------
def _damage(path, how):
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:  # one flipped byte in the middle of the records: same size
        b = bytearray(data)
        b[len(b) // 2] ^= 0xFF
        path.write_bytes(bytes(b))


def test_truncated_shard_is_a_one_line_error_naming_file_and_fix(vae, text_encoder, small_cfg, capsys):
    from lrm.cli import main

    cfg = small_cfg(n=8, shard_size=4)
    build_cache(cfg, rewards=[MeanReward()], vae=vae, text_encoder=text_encoder)
    m = st.read_manifest(cfg.out_dir)
    assert all(e["bytes"] > 0 and len(e["sha256"]) == 64 for e in m["shards"])  # written at commit
    bad = st.Path(cfg.out_dir) / st.SHARD_DIR / m["shards"][1]["file"]
    _damage(bad, "truncate")
    fix = f"lrm cache repair {cfg.out_dir}"
    with pytest.raises(CacheError, match=rf"{bad.name} is damaged: \d+ bytes on disk, \d+ in the manifest.*{fix}"):
        LatentCache.open(cfg.out_dir)
    for args in (["cache", "stats", cfg.out_dir],
                 ["cache", "add-reward", "--cache_dir", cfg.out_dir, "--reward", "brightness", "--device", "cpu",
                  "--progress", "false"]):
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and bad.name in err[0] and fix in err[0], err
    # a resume checks what it did not build: no complete=True over a damaged shard
    cfg.resume = True
    with pytest.raises(CacheError, match=rf"{bad.name}.*{fix}"):
        build_cache(cfg, rewards=[MeanReward()], vae=vae, text_encoder=text_encoder)
    res = verify_cache(cfg.out_dir)
    assert not res["ok"] and any(bad.name in p and "size" in p for p in res["problems"])


def test_bit_flip_found_by_resume_and_repair_rebuilds_exactly_the_damaged_shards(vae, text_encoder, small_cfg):
    cfg = small_cfg(n=12, shard_size=4)
    build_cache(cfg, rewards=[MeanReward()], vae=vae, text_encoder=text_encoder)
    add_reward(AddRewardConfig(cache_dir=cfg.out_dir, pixels_from="source", progress=False, device="cpu"),
               reward=_Red())
    root = st.Path(cfg.out_dir)
    ref = LatentCache.open(root).tensors()
    m = st.read_manifest(root)
    files = [e["file"] for e in m["shards"]]
    _damage(root / st.SHARD_DIR / files[1], "flip")
    (root / st.SHARD_DIR / files[2]).unlink()
    untouched = (root / st.SHARD_DIR / files[0]).stat()
    cfg.resume = True
    with pytest.raises(CacheError, match=rf"{files[1]}: sha256 .*{files[2]}: file is missing.*lrm cache repair"):
        build_cache(cfg, rewards=[MeanReward()], vae=vae, text_encoder=text_encoder)
    assert st.read_manifest(root)["complete"] is True  # untouched by the refused resume
    cfg.repair = True
    out = build_cache(cfg, rewards=[MeanReward()], vae=vae, text_encoder=text_encoder)
    assert out["records_written"] == 8 and out["indices_processed"] == 8  # shards 1 and 2, nothing else
    assert out["rescore"] == {"red": 2} and out["manifest"]["complete"]
    after = (root / st.SHARD_DIR / files[0]).stat()
    assert (after.st_ino, after.st_mtime_ns) == (untouched.st_ino, untouched.st_mtime_ns)
    # the rebuilt shards are the same records; the added reward is scored again by add-reward (what `repair` runs)
    add_reward(AddRewardConfig(cache_dir=cfg.out_dir, pixels_from="source", progress=False, device="cpu"),
               reward=_Red())
    res = verify_cache(root)
    assert res["ok"] and not res["warnings"], res
    cache = LatentCache.open(root)
    for k, v in cache.tensors().items():
        assert torch.equal(v, ref[k]), k


class _Red(MeanReward):
    name = "red"

    def __call__(self, px, prompts=None):
        return px[:, 0].flatten(1).mean(1)


def test_lrm_cache_repair_command(tmp_path, capsys):
    """`lrm cache repair DIR`: the last build's config.yaml with resume + repair, then add-reward again."""
    from lrm.cli import main

    d = str(tmp_path / "c")
    common = ["--device", "cpu", "--progress", "false"]
    assert main(["cache", "build", "--out_dir", d, "--source.num_samples", "8", "--shard_size", "4", "--batch_size",
                 "4", "--num_workers", "1", "--rewards", "[brightness]", *common]) == 0
    assert main(["cache", "add-reward", "--cache_dir", d, "--reward", "colorfulness", *common]) == 0
    ref = LatentCache.open(d).tensors()
    m = st.read_manifest(d)
    _damage(st.Path(d) / st.SHARD_DIR / m["shards"][0]["file"], "truncate")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["cache", "verify", d])
    assert e.value.code == 1 and f"fix: rebuild the damaged or missing shards with `lrm cache repair {d}`" in \
        capsys.readouterr().out
    assert main(["cache", "repair", d, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "complete=True" in out and "colorfulness" in out
    assert verify_cache(d)["ok"]
    t = LatentCache.open(d).tensors()
    for k in ("latents", "reward/brightness", "reward/colorfulness", "index"):
        assert torch.equal(t[k], ref[k]), k


def test_manifest_entries_are_validated(vae, text_encoder, small_cfg, tmp_path):
    """A hand-edited manifest: a path outside the cache, overlapping ranges, a removed entry -> verify fails,
    readers refuse, and nothing outside the cache directory is read."""
    cfg = small_cfg(n=12, shard_size=4)
    build_cache(cfg, rewards=[MeanReward()], vae=vae, text_encoder=text_encoder)
    root = st.Path(cfg.out_dir)
    good = st.read_manifest(root)

    def edited(fn):
        m = json.loads(json.dumps(good))
        fn(m)
        st.write_manifest(root, m)
        res = verify_cache(root)
        assert not res["ok"], res
        with pytest.raises(CacheError, match="lrm cache repair") as e:
            LatentCache.open(root)
        return res, str(e.value)

    outside = tmp_path / "outside"
    outside.mkdir()
    f1 = good["shards"][1]["file"]
    (outside / f1).write_bytes((root / st.SHARD_DIR / f1).read_bytes())
    for path in (f"../../outside/{f1}", str(outside / f1)):
        res, err = edited(lambda m: m["shards"][1].update(file=path))
        assert "refused" in err and path in err and any(path in p for p in res["problems"])

    def overlap(m):
        m["shards"][1]["start"] = 2
    res, err = edited(overlap)
    assert any("overlapping" in p or "does not match its range" in p for p in res["problems"])

    def overlap_named(m):  # a consistent-looking entry whose range overlaps its neighbour
        e = m["shards"][1]
        e.update(start=2, file=st.shard_name(2, 8, 0))
        (root / st.SHARD_DIR / e["file"]).write_bytes((root / st.SHARD_DIR / f1).read_bytes())
    res, err = edited(overlap_named)
    assert any("overlapping" in p for p in res["problems"]) and "overlapping" in err
    (root / st.SHARD_DIR / st.shard_name(2, 8, 0)).unlink()

    def removed(m):
        del m["shards"][1]
    res, err = edited(removed)
    assert any("[4, 8) are in no shard" in p for p in res["problems"]), res
    assert any(f"orphan file shards/{f1}" in p for p in res["problems"])

    def removed_and_recounted(m):
        del m["shards"][1]
        m["counts"] = st.summarize_counts(m)
    res, err = edited(removed_and_recounted)
    assert "in no shard" in err

    def sidecar_outside(m):
        m["rewards"]["x"] = {"version": "1", "modality": "image", "column": "reward/x", "storage": "sidecar"}
        m["sidecars"] = {"x": [{"shard": m["shards"][0]["file"], "file": "../../outside/x.arrow", "num_records": 4}]}
    res, err = edited(sidecar_outside)
    assert "../../outside/x.arrow" in err and "refused" in err
    st.write_manifest(root, good)
    assert verify_cache(root)["ok"] and len(LatentCache.open(root)) == 12


def test_old_manifest_without_sizes_and_hashes(vae, text_encoder, small_cfg):
    """Caches written before sizes and hashes were recorded keep working; verify says the hash is unknown; a repair
    records them."""
    cfg = small_cfg(n=8, shard_size=4)
    build_cache(cfg, rewards=[MeanReward()], vae=vae, text_encoder=text_encoder)
    root = st.Path(cfg.out_dir)
    m = st.read_manifest(root)
    want = {e["file"]: (e["bytes"], e["sha256"]) for e in m["shards"]}
    for e in m["shards"]:
        del e["bytes"], e["sha256"]
    st.write_manifest(root, m)
    res = verify_cache(root)
    assert res["ok"] and any("hash is unknown" in w and "lrm cache repair" in w for w in res["warnings"]), res
    assert len(LatentCache.open(root)) == 8
    cfg.resume = cfg.repair = True
    out = build_cache(cfg, rewards=[MeanReward()], vae=vae, text_encoder=text_encoder)
    assert out["records_written"] == 0
    assert {e["file"]: (e["bytes"], e["sha256"]) for e in st.read_manifest(root)["shards"]} == want
    res = verify_cache(root)
    assert res["ok"] and not res["warnings"], res
