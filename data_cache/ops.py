"""Operations on an existing cache: verify it, add a reward column, print statistics."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from data_cache import lock as lock_mod
from data_cache import storage as st
from data_cache.build import _cpu_score, load_vae, resolve_rewards, reward_info
from data_cache.config import AddRewardConfig, SourceConfig
from data_cache.sources import Item
from lrm.latent_space import VAE
from lrm.run import get_logger, resolve_device

log = get_logger("lrm.data_cache")


# ---- verify ----------------------------------------------------------------------------------------------
def verify_cache(root: str | Path, deep: bool = True) -> dict[str, Any]:
    """Check the manifest (paths inside the cache, ranges, counts, a removed entry) and every shard and reward file
    against it (size, sha256, rows, index ranges); list files the manifest does not know (orphans).

    Returns ``{"ok", "problems", "warnings", "records", "shards", "rejects"}``; ``ok`` is False when any problem was
    found (``lrm cache repair DIR`` rebuilds what is damaged or missing).
    """
    from data_cache.lock import live_holders

    root = Path(root)
    manifest = st.read_manifest(root)
    problems: list[str] = st.validate_manifest(root, manifest)
    warnings: list[str] = []
    no_hash: list[str] = []
    listed: set[str] = set()
    for e in manifest["shards"]:
        f = e.get("file")
        if not isinstance(f, str) or Path(f).name != f or f in ("..", "."):
            continue  # reported by validate_manifest; never opened
        listed.add(f)
        problems += st.verify_shard_file(root / st.SHARD_DIR / f, e, deep=deep)
        if not e.get("sha256"):
            no_hash.append(f)
    shard_rows = {e.get("file"): e.get("num_records") for e in manifest["shards"]}
    listed_rewards: set[str] = set()
    for name, entries in manifest.get("sidecars", {}).items():
        for e in entries:
            rel = st.sidecar_file(name, str(e.get("shard")))
            if e.get("file") != rel:
                continue  # reported by validate_manifest
            listed_rewards.add(rel)
            p = root / rel
            if not p.exists():
                problems.append(f"reward file {rel} ({name}) is missing")
                continue
            size = st.size_problem(p, e)
            if size:
                problems.append(f"reward file {size} ({name})")
                continue
            if not e.get("sha256"):
                no_hash.append(rel)
            else:
                digest = st.file_sha256(p)
                if digest != e["sha256"]:
                    problems.append(f"reward file {rel} ({name}): sha256 {digest[:16]}... != {e['sha256'][:16]}... "
                                    "in the manifest (damaged or changed)")
                    continue
            if e.get("num_records") != shard_rows.get(e.get("shard")):
                problems.append(f"reward file {rel} has {e.get('num_records')} rows, shard {e.get('shard')} has "
                                f"{shard_rows.get(e.get('shard'))}")
    if no_hash:
        warnings.append(f"{len(no_hash)} file(s) have no sha256 in the manifest (written by an older toolkit), so "
                        f"their hash is unknown and only size and rows were checked (e.g. {no_hash[0]}); "
                        f"`lrm cache repair {root}` records it")
    # files the manifest does not know: a crash leaves some (resume adopts or deletes shards); a complete cache has
    # none, so there a shard file outside the manifest means an entry was removed from it
    sd = root / st.SHARD_DIR
    for p in sorted(sd.iterdir()) if sd.exists() else []:
        if p.name in listed:
            continue
        if p.name.endswith(".tmp"):
            warnings.append(f"orphan file {st.SHARD_DIR}/{p.name}: a temp file of an interrupted write")
        elif manifest.get("complete"):
            problems.append(f"orphan file {st.SHARD_DIR}/{p.name} is not in the manifest of this complete cache (an "
                            f"entry was removed from manifest.json?); {st.repair_hint(root)}")
        else:
            warnings.append(f"orphan file {st.SHARD_DIR}/{p.name} is not in the manifest (left by an interrupted "
                            "build; `lrm cache build --resume true` adopts or deletes it)")
    rd = root / st.REWARD_DIR
    for p in sorted(rd.rglob("*")) if rd.exists() else []:
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in listed_rewards:
            warnings.append(f"orphan file {rel} is not in the manifest (left by an interrupted add-reward: run it "
                            "again to finish, or delete the file)")
    for lock, holder in live_holders(root).items():
        warnings.append(f"the cache is being written ({lock}: pid {holder.get('pid')} on {holder.get('host')} since "
                        f"{holder.get('since')}); files may change while they are checked")
    counts = st.summarize_counts(manifest)
    if manifest.get("rescore"):
        warnings.append(f"rewards {sorted(manifest['rescore'])} lost the scores of rebuilt shards; run `lrm cache "
                        "add-reward --reward NAME` for each")
    if not manifest.get("complete"):
        warnings.append("the build is not complete (interrupted, or still running)")
    return {"ok": not problems, "problems": problems, "warnings": warnings, "records": counts["records"],
            "shards": len(manifest["shards"]), "rejects": counts["rejects"]}


# ---- add a reward ------------------------------------------------------------------------------------------
def _source_for(manifest: dict[str, Any]):
    from data_cache.build import make_source

    sc = manifest.get("source_config")
    if not sc:
        raise ValueError("the cache was built from a source object passed in Python, which cannot be re-created")
    if sc.get("type") == "generator":
        raise ValueError("a generator source cannot be re-read; its pixels are decoded from the latents")
    fields = {f.name for f in dataclasses.fields(SourceConfig)}
    return make_source(SourceConfig(**{k: v for k, v in sc.items() if k in fields}))


def add_reward(cfg: AddRewardConfig, reward: Any | None = None, vae: VAE | None = None) -> dict[str, Any]:
    """Score every record of the cache in ``cfg.cache_dir`` with one more reward, without re-encoding.

    Scores go to ``rewards/<name>/<shard>.arrow`` files beside the shards (append-only; the shards are
    never rewritten). Resumable: an interrupted run continues with the shards not scored yet. Holds the cache's
    add-reward lock of this reward (a build, or another add-reward of the same reward, is refused with the holder's
    name); add-rewards of other rewards may run at the same time: every manifest update is a read-modify-write
    under the manifest mutex, so none is lost.
    """
    root = Path(cfg.cache_dir)
    st.read_manifest(root)  # not a cache: fail before anything is created in it
    device = resolve_device(cfg.device)
    options: dict[str, Any] = {}
    if reward is None:
        if not cfg.reward:
            raise ValueError("name the reward to add: --reward NAME")
        options = dict(cfg.reward_options.get(cfg.reward, {}))
        reward = resolve_rewards([cfg.reward], device, cfg.reward_options)[0]
    with lock_mod.writer_lock(root, lock_mod.ADD_REWARD, reward.name):
        return _add_reward_locked(cfg, root, reward, options, vae, device)


def _add_reward_locked(cfg: AddRewardConfig, root: Path, reward: Any, options: dict[str, Any], vae: VAE | None,
                       device: torch.device) -> dict[str, Any]:
    t0 = time.perf_counter()
    manifest = st.read_manifest(root)
    st.check_manifest(root, manifest)
    info = reward_info(reward)
    name = reward.name

    def check_existing(m: dict[str, Any]) -> None:
        existing = m["rewards"].get(name)
        if existing is not None and (existing.get("storage") != "sidecar" or existing["version"] != info["version"]):
            raise st.CacheError(f"cache {root} already has reward {name!r} (version {existing['version']}); caches "
                                "are append-only: register the new scorer under another name")
        if existing is not None and existing.get("options", {}) != options:
            raise st.CacheError(f"cache {root} is being scored with {name!r} under options "
                                f"{existing.get('options', {})}; continue with those, not {options}")

    check_existing(manifest)
    log.info("add-reward %s to %s (%d records, pixels_from=%s, options %s)", name, root,
             manifest.get("counts", {}).get("records", 0), cfg.pixels_from, options)
    is_video = len(manifest["latent_shape"] or []) == 4
    from data_cache.build import check_reward_modality

    check_reward_modality(reward, is_video)

    # 1. where pixels come from
    source = None
    mode = cfg.pixels_from
    if mode in ("source", "auto"):
        try:
            source = _source_for(manifest)
        except Exception as e:
            if mode == "source":
                raise ValueError(f"pixels_from=source but the source cannot be re-read ({e}); use "
                                 "--pixels_from decode") from None
            log.info("source not available (%s); decoding latents instead", e)
            mode = "decode"
        else:
            mode = "source" if mode == "source" else "auto"
    need_vae = mode in ("decode", "auto")
    if need_vae and vae is None:
        space = manifest["latent_space"]
        vae = load_vae(cfg.vae or space["vae_id"], cfg.vae_subfolder, device, chunk_size=cfg.vae_chunk_size)
    if vae is not None:
        from lrm.latent_space import LatentSpace

        LatentSpace.from_dict(manifest["latent_space"]).check_compatible(vae.latent_space, what="the decoding VAE")

    def register(m: dict[str, Any]) -> None:  # on the fresh manifest: other add-rewards may have written since
        check_existing(m)
        m["rewards"][name] = {**info, "column": st.reward_column(name), "storage": "sidecar",
                              "pixels_from": mode, **({"options": options} if options else {})}
        m.setdefault("sidecars", {}).setdefault(name, [])

    manifest = st.update_manifest(root, register)

    done = {e["shard"] for e in manifest["sidecars"][name]}
    todo = [e for e in manifest["shards"] if e["file"] not in done]
    latent_shape = tuple(manifest["latent_shape"] or (1,))
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(e["num_records"] for e in todo), desc=f"add-reward {name}", unit="rec",
               disable=not cfg.progress, mininterval=1.0)
    counts = {"source": 0, "decoded": 0}
    for e in todo:
        t = st.open_checked(root, root / st.SHARD_DIR / e["file"], e)
        idx = t.column("index").to_numpy()
        prompts = t.column("prompt").to_pylist()
        hashes = t.column("content_hash").to_pylist()
        lat = st.fixed_list_numpy(t.column("latent"), latent_shape) if len(idx) else None
        scores = np.full(len(idx), np.nan, np.float32)
        reject_log: list[dict[str, Any]] = []
        for a in range(0, len(idx), cfg.batch_size):
            b = min(len(idx), a + cfg.batch_size)
            pix = [None] * (b - a)
            if source is not None:
                for k in range(a, b):
                    it = source.load(int(idx[k]))
                    if isinstance(it, Item) and st.content_hash(np.round(it.pixels * 255).astype(np.uint8),
                                                                text=it.prompt) == hashes[k]:
                        pix[k - a] = torch.from_numpy(it.pixels)
            missing = [k for k in range(b - a) if pix[k] is None]
            if missing and mode == "source":
                for k in missing:
                    reject_log.append({"index": int(idx[a + k]), "reason": f"source_changed:{name}",
                                       "message": "record unreadable or changed in the source", "action":
                                       "stored_nan"})
            elif missing:
                z = torch.from_numpy(np.asarray(lat[a:b][missing], dtype=np.float32))
                with torch.no_grad():
                    dec = vae.decode(z.to(vae.device), clamp=True).cpu()
                for j, k in enumerate(missing):
                    pix[k] = dec[j]
                counts["decoded"] += len(missing)
            rows = [k for k in range(b - a) if pix[k] is not None]
            counts["source"] += len(rows) - (len(missing) if mode != "source" else 0)
            if not rows:
                continue
            batch = torch.stack([pix[k] for k in rows]).to(getattr(reward, "device", None) or device)
            s, fails = _cpu_score(reward, batch, [prompts[a + k] for k in rows], cfg.retry_timeouts_per_record)
            scores[[a + k for k in rows]] = s
            for row, reason, msg in fails:
                reject_log.append({"index": int(idx[a + rows[row]]), "reason": reason, "message": msg,
                                   "action": "stored_nan"})
            bar.update(b - a)
        rel = st.sidecar_file(name, e["file"])
        table = pa.table({"index": pa.array(idx, pa.int64()), st.reward_column(name): pa.array(scores, pa.float32())})
        meta = {"shard": e["file"], "reward": name, "num_records": len(idx)}
        info_f = st.write_shard_file(root / rel, table, meta)
        entry = {**meta, "file": rel, **info_f, "missing": int(np.isnan(scores).sum()), "reject_log": reject_log}

        def add_entry(m: dict[str, Any], entry=entry) -> None:
            sides = m.setdefault("sidecars", {}).setdefault(name, [])
            sides[:] = [x for x in sides if x.get("shard") != entry["shard"]] + [entry]
            m["counts"] = st.summarize_counts(m)

        manifest = st.update_manifest(root, add_entry)
    bar.close()

    def finish(m: dict[str, Any]) -> None:
        if name in (m.get("rescore") or {}):
            del m["rescore"][name]
            if not m["rescore"]:
                del m["rescore"]
        st.rebuild_rejects_log(root, m)

    manifest = st.update_manifest(root, finish)
    log.info("add-reward %s: %d shards scored (%d from the source, %d decoded), %d missing", name, len(todo),
             counts["source"], counts["decoded"], manifest["counts"]["missing_rewards"].get(name, 0))
    return {"reward": name, "shards_scored": len(todo), "seconds": time.perf_counter() - t0,
            "pixels": counts, "missing": manifest["counts"]["missing_rewards"].get(name, 0)}


def cache_stats(root: str | Path) -> dict[str, Any]:
    from data_cache.reader import LatentCache

    cache = LatentCache.open(root)
    m = cache.manifest
    return {"records": len(cache), "complete": m.get("complete"), "latent_shape": m.get("latent_shape"),
            "latent_dtype": m.get("latent_dtype"), "latent_space": cache.latent_space.short(),
            "text_encoder": m["text_encoder"], "rejects": m["counts"].get("rejects", {}),
            "distinct_prompts": len(set(cache.prompts)), "rewards": cache.stats()}
