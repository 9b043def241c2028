"""Building a latent cache: load -> (GPU) encode + score -> write, as three overlapped stages.

1. Loader thread (with a pool of ``num_workers`` threads) reads/decodes records ahead of the GPU.
2. The calling thread runs the VAE, the text encoder and the rewards on batches (GPU-batched); its
   outputs are copied to pinned host memory asynchronously.
3. A writer thread waits for the copies, assembles one shard per unit of ``shard_size`` source indices
   and commits it (see ``data_cache.storage`` for the crash-safe protocol).

Several GPUs: launch with ``accelerate launch -m lrm.cli cache build ...``; the uncommitted units are dealt
out round-robin to ranks, each rank writes its own shards and journal, rank 0 merges the manifest.
"""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import lrm
from data_cache import lock as lock_mod
from data_cache import storage as st
from data_cache.config import BuildCacheConfig, SourceConfig
from data_cache.sources import (
    DatasetSource,
    FolderSource,
    GeneratorSource,
    Item,
    PixelSource,
    Reject,
    ShapesSource,
    import_callable,
)
from lrm.config import config_to_dict
from lrm.io import read_json
from lrm.latent_space import VAE, LatentSpace
from lrm.run import get_logger, resolve_device
from lrm.text import TextEncoder, text_encoder_for

log = get_logger("lrm.data_cache")


# ---- objects from config ------------------------------------------------------------------------------
def make_source(cfg: SourceConfig, generator: Callable | None = None,
                device: torch.device | str | None = None) -> PixelSource | GeneratorSource:
    """The source a config names. A generator source resolves ``cfg.generator`` ("module:callable") by import path
    at run time (code execution: trust the config like a script), or uses the ``generator`` callable given in Python;
    either gets ``cfg.generator_kwargs`` (and ``device`` when it takes one)."""
    resize = tuple(cfg.resize) if cfg.resize else None
    frames = cfg.num_frames or None
    if cfg.type == "shapes":
        return ShapesSource(cfg.image_size, frames, cfg.seed)
    if cfg.type == "dataset":
        return DatasetSource(cfg.path, cfg.image_column, cfg.caption_column, cfg.split, cfg.video, resize, frames,
                             cfg.convert_rgb)
    if cfg.type == "folder":
        return FolderSource(cfg.path, cfg.captions_file, cfg.file_column, cfg.caption_column, cfg.video, resize,
                            frames, cfg.convert_rgb, allow_outside_root=cfg.allow_outside_root)
    opts = {"kwargs": cfg.generator_kwargs, "factory": cfg.generator_factory, "device": device}
    if generator is None:
        if not cfg.generator:
            raise ValueError("a generator source needs source.generator='package.module:callable' (CLI) or a "
                             "callable passed as build_cache(cfg, source=fn)")
        return GeneratorSource(import_callable(cfg.generator), cfg.seed, name=cfg.generator, **opts)
    return GeneratorSource(generator, cfg.seed, **opts)


def load_vae(name: str, subfolder: str = "", device: torch.device | str = "cpu", bf16: bool = False,
             chunk_size: int = 0) -> VAE:
    """The VAE in float32 (``bf16``: bf16 autocast, weights kept); ``chunk_size`` frames per call, 0 = by pixel size."""
    if name in ("shapes", "shapes-vae"):
        return VAE.shapes(device=device, autocast_bf16=bf16, chunk_size=chunk_size)
    return VAE.from_pretrained(name, subfolder=subfolder or None, device=device, autocast_bf16=bf16,
                               chunk_size=chunk_size)


def resolve_rewards(names: list[str], device: torch.device, options: dict[str, dict[str, Any]] | None = None
                    ) -> list[Any]:
    """Rewards by registry name, built with ``create_reward(name, **options[name])``. Model rewards go to
    ``device``; NumPy/OpenCV rewards stay on the CPU, where the build scores them in a thread pool beside the
    GPU work."""
    if not names:
        return []
    options = options or {}
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise ValueError(f"reward options for {unknown}, which are not among the rewards {names}")
    try:
        from reward_adapters import NumpyReward, create_reward
    except ImportError:
        raise ImportError(
            f"rewards {names} are named by string but the reward_adapters package is not importable; pass reward "
            "objects with build_cache(cfg, rewards=[...]) instead"
        ) from None
    out = []
    for n in names:
        r = create_reward(n, **options.get(n, {}))
        if torch.device(device).type != "cpu" and not isinstance(r, NumpyReward) and hasattr(r, "to"):
            r = r.to(device) or r
        out.append(r)
    return out


def reward_info(reward: Any) -> dict[str, Any]:
    for attr in ("name", "version", "modality"):
        if not hasattr(reward, attr):
            raise TypeError(f"reward {reward!r} has no .{attr}; a reward needs name, version and modality")
    info = {"version": str(reward.version), "modality": str(reward.modality)}
    if hasattr(reward, "differentiable"):
        info["differentiable"] = bool(reward.differentiable)
    return info


def check_reward_modality(reward: Any, is_video: bool) -> None:
    """Video rewards need videos; image rewards score videos only if they say how (reward_adapters' rewards
    average over selected frames: they carry ``frames``)."""
    mod = str(reward.modality)
    if is_video and mod in ("image", "text-image") and not (hasattr(reward, "frames") or
                                                            getattr(reward, "handles_video", False)):
        raise ValueError(f"reward {reward.name!r} scores images (modality {mod!r}) but the source yields videos, and "
                         "it does not say how to score frames (no .frames / .handles_video); use a reward_adapters "
                         "reward (frames averaged) or a video reward")
    if not is_video and mod in ("video", "text-video"):
        raise ValueError(f"reward {reward.name!r} scores videos (modality {mod!r}) but the source yields images")


# ---- GPU kernels ------------------------------------------------------------------------------------
def encode_pixels(vae: VAE, pixels: torch.Tensor, sample: bool = False) -> torch.Tensor:
    """``VAE.encode`` without its range check, which would synchronise the GPU every batch; the loader has
    already validated the pixels on CPU. (B, 3, H, W) / (B, T, 3, H, W) in [0, 1] -> scaled latents (a video VAE
    encodes whole clips: (B, T', C, h, w) with its temporal compression and per-channel normalisation)."""
    return vae.encode(pixels, sample=sample, check=False)


def score_reward(reward: Any, pixels: torch.Tensor, prompts: list[str], retry_timeouts: bool = False
                 ) -> tuple[Any, list[tuple[int, str, str]]]:
    """Scores (B,) float32 (a tensor, maybe still on the GPU) and the records whose call raised, as
    (row, reason, message); those rows are NaN. A batch that raises is retried record by record so one bad
    record does not blank the batch, except a batch that timed out (a ``TimeoutError``, e.g. a command reward past
    its timeout): each retry would wait the whole timeout again, so every record of it fails (reason
    ``reward_timeout``) unless ``retry_timeouts``. NaN outputs are found later by ``finish_scores``."""
    B = pixels.shape[0]
    try:
        return _call_reward(reward, pixels, prompts), []
    except Exception as e:
        timed_out = isinstance(e, TimeoutError)
        reason = f"reward_timeout:{reward.name}" if timed_out else f"reward_error:{reward.name}"
        if B == 1 or (timed_out and not retry_timeouts):
            msg = f"{type(e).__name__}: {e}"
            return torch.full((B,), float("nan")), [(i, reason, msg) for i in range(B)]
    out = torch.full((B,), float("nan"))
    fails: list[tuple[int, str, str]] = []
    for i in range(B):
        v, f = score_reward(reward, pixels[i:i + 1], prompts[i:i + 1], retry_timeouts)
        out[i] = v.detach().float().cpu()[0]
        fails += [(i, r, m) for _, r, m in f]
    return out, fails


def finish_scores(name: str, scores: Any, fails: list[tuple[int, str, str]]) -> tuple[np.ndarray, list]:
    """(B,) float32 numpy with NaN for every failed record, and all failures (raised or non-finite)."""
    s = scores.numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)
    s = s.astype(np.float32, copy=True)
    failed = {row for row, _, _ in fails}
    fails = list(fails)
    for i in np.flatnonzero(~np.isfinite(s)):
        if int(i) not in failed:
            fails.append((int(i), f"reward_nan:{name}", f"reward returned {s[i]}"))
        s[i] = np.nan
    return s, fails


def _call_reward(reward: Any, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        out = reward(pixels, prompts)
    out = torch.as_tensor(out).detach().float().reshape(-1)
    if out.shape != (pixels.shape[0],):
        raise ValueError(f"reward {reward.name!r} returned shape {tuple(out.shape)} for a batch of {pixels.shape[0]}")
    return out


def _cpu_score(reward: Any, pixels: torch.Tensor, prompts: list[str], retry_timeouts: bool = False
               ) -> tuple[np.ndarray, list]:
    s, f = score_reward(reward, pixels, prompts, retry_timeouts)
    return finish_scores(reward.name, s.cpu(), f)


def _reward_device(reward: Any, default: torch.device) -> torch.device:
    dev = getattr(reward, "device", None)
    return torch.device(dev) if dev is not None else default


# ---- pipeline records -------------------------------------------------------------------------------
@dataclass
class LoadedBatch:
    unit: tuple[int, int]
    last: bool  # last batch of its unit
    span: tuple[int, int] = (0, 0)  # the source indices [a, b) of this batch (progress)
    indices: list[int] = field(default_factory=list)
    pixels: torch.Tensor | None = None  # (B, ...) pixels (pixel sources)
    latents: torch.Tensor | None = None  # (B, ...) latents (generator sources)
    prompts: list[str] = field(default_factory=list)
    source_ids: list[str] = field(default_factory=list)
    hashes: list[str] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class EncodedBatch:
    loaded: LoadedBatch
    event: Any = None  # CUDA event marking the end of the device->host copies
    latents: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    rewards: dict[str, Any] = field(default_factory=dict)  # name -> (scores, fails) or Future of it


class _Stop:
    pass


def _load_list(source, indices: list[int]) -> list:
    return [_load_hashed(source, i) for i in indices]


def _aligned_batches(start: int, end: int, batch_size: int) -> list[tuple[int, int]]:
    """Batches aligned to global multiples of ``batch_size`` so a resumed build batches identically."""
    out = []
    i = start
    while i < end:
        j = min(end, (i // batch_size + 1) * batch_size)
        out.append((i, j))
        i = j
    return out


_WORKER_SOURCE = None
_PROCESS_POOLS: dict[tuple[int, int], Any] = {}  # (id(source), workers) -> (source, pool): reused across builds


def _init_worker(source) -> None:
    global _WORKER_SOURCE
    torch.set_num_threads(1)
    _WORKER_SOURCE = source


def _load_hashed(source, index: int):
    """Load record ``index`` and hash its content, in the worker (hashing is a real cost at high rates)."""
    r = source.load(index)
    if isinstance(r, Item):
        r.hash = st.content_hash(np.round(r.pixels * 255).astype(np.uint8), text=r.prompt)
    return r


def _load_chunk_in_worker(indices: list[int]) -> list:
    return [_load_hashed(_WORKER_SOURCE, i) for i in indices]


def _process_pool(source, workers: int):
    """A spawned process pool bound to ``source``; kept for later builds from the same source object (worker
    start-up costs seconds)."""
    key = (id(source), workers)
    if key not in _PROCESS_POOLS:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                   initargs=(source,))
        _PROCESS_POOLS[key] = (source, pool)
    return _PROCESS_POOLS[key][1]


class _Loader(threading.Thread):
    """Keeps up to ``prefetch`` batches in flight in the worker pool and hands them over in order."""

    def __init__(self, source, units, batch_size, num_workers, prefetch, pixel_shape, pin, worker_type="thread"):
        super().__init__(daemon=True, name="lrm-cache-loader")
        self.source, self.units, self.batch_size = source, units, batch_size
        self.q: queue.Queue = queue.Queue(maxsize=prefetch)
        self.depth = max(1, prefetch)
        workers = max(1, num_workers)
        self.own_pool = True
        if isinstance(source, GeneratorSource):
            self.pool = None
        elif worker_type == "process":
            self.pool = _process_pool(source, workers)
            self.own_pool = False
            self.load_chunk = _load_chunk_in_worker
        else:
            self.pool = ThreadPoolExecutor(workers, thread_name_prefix="lrm-cache-load")
            self.load_chunk = functools.partial(_load_list, source)
        self.chunksize = max(1, batch_size // (2 * workers))
        self.pixel_shape = tuple(pixel_shape) if pixel_shape else None
        self.pin = pin
        self.error: BaseException | None = None
        self.stop_flag = threading.Event()

    def _put(self, obj):
        while not self.stop_flag.is_set():
            try:
                self.q.put(obj, timeout=0.2)
                return
            except queue.Full:
                continue

    def _specs(self):
        for unit in self.units:
            batches = _aligned_batches(unit[0], unit[1], self.batch_size)
            for k, (a, b) in enumerate(batches):
                yield unit, k == len(batches) - 1, a, b

    def _submit(self, spec):
        unit, last, a, b = spec
        if self.pool is None:
            return spec, None
        idx = list(range(a, b))
        chunks = [idx[i:i + self.chunksize] for i in range(0, len(idx), self.chunksize)]
        return spec, [self.pool.submit(self.load_chunk, c) for c in chunks]

    def run(self):
        from collections import deque

        inflight: deque = deque()
        try:
            specs = self._specs()
            for spec in specs:
                inflight.append(self._submit(spec))
                if len(inflight) >= self.depth:
                    break
            while inflight:
                if self.stop_flag.is_set():
                    return
                (unit, last, a, b), futures = inflight.popleft()
                nxt = next(specs, None)
                if nxt is not None:
                    inflight.append(self._submit(nxt))
                lb = LoadedBatch(unit=unit, last=last, span=(a, b))
                if futures is None:
                    self._generate(lb, a, b)
                else:
                    self._load(lb, [r for f in futures for r in f.result()])
                self._put(lb)
            self._put(_Stop())
        except BaseException as e:  # surfaced in the main thread
            self.error = e
            self._put(_Stop())
        finally:
            for _, futures in inflight:
                for f in futures or []:
                    f.cancel()
            if self.pool is not None and self.own_pool:
                self.pool.shutdown(wait=False, cancel_futures=True)

    def _generate(self, lb: LoadedBatch, a: int, b: int) -> None:
        latents, prompts = self.source.generate(a, b - a)
        lb.indices = list(range(a, b))
        lb.latents = latents
        lb.prompts = prompts
        lb.source_ids = [self.source.source_id(i) for i in lb.indices]
        z = latents.detach().to("cpu", torch.float16).numpy()
        lb.hashes = [st.content_hash(z[i], text=p) for i, p in enumerate(prompts)]

    def _load(self, lb: LoadedBatch, results: list[Item | Reject]) -> None:
        good = []
        for r in results:
            if isinstance(r, Reject):
                lb.rejects.append(r.to_dict())
                continue
            if self.pixel_shape is None:
                self.pixel_shape = tuple(r.pixels.shape)
            if tuple(r.pixels.shape) != self.pixel_shape:
                lb.rejects.append(Reject(r.index, r.source_id, "wrong_size",
                                         f"pixels of shape {tuple(r.pixels.shape)}, the cache holds "
                                         f"{self.pixel_shape}; set source.resize").to_dict())
                continue
            lb.indices.append(r.index)
            lb.prompts.append(r.prompt)
            lb.source_ids.append(r.source_id)
            lb.hashes.append(r.hash or st.content_hash(np.round(r.pixels * 255).astype(np.uint8), text=r.prompt))
            good.append(r.pixels)
        if good:
            # one copy, straight into (pinned) batch memory
            t = torch.empty((len(good),) + self.pixel_shape, dtype=torch.float32, pin_memory=self.pin)
            for k, px in enumerate(good):
                t[k] = torch.from_numpy(px)
            lb.pixels = t


# ---- the build ------------------------------------------------------------------------------------------
def _dist_info(rank: int | None, world_size: int | None, cpu: bool = False):
    """(rank, world_size, device or None, barrier); accelerate only when launched with several processes.
    ``cpu``: the build runs on the CPU (accelerate then needs ``cpu=True`` to start gloo; without it every process
    of a CPU launch would take itself for rank 0 of 1)."""
    if rank is not None:
        return rank, world_size or 1, None, lambda: None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        state = PartialState(cpu=cpu)
        if state.num_processes == 1:
            raise RuntimeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but accelerate found one process; launch with "
                               "`accelerate launch` or `torchrun` (and --device cpu on a machine without GPUs)")
        return state.process_index, state.num_processes, state.device, state.wait_for_everyone
    return 0, 1, None, lambda: None


def _header(cfg: BuildCacheConfig, source, space: LatentSpace, te_identity: dict, rewards: list[Any],
            text_shape: tuple[int, int], source_from_cfg: bool = True,
            reward_options: list[dict[str, Any]] | None = None, pooled_dim: int | None = None) -> dict[str, Any]:
    opts = reward_options or [{} for _ in rewards]
    return {
        "format": st.FORMAT, "format_version": st.FORMAT_VERSION, "toolkit_version": lrm.__version__,
        "latent_space": space.to_dict(), "text_encoder": te_identity,
        "rewards": {r.name: {**reward_info(r), "column": st.reward_column(r.name), "storage": "shard",
                             "pixels_from": "decoded" if isinstance(source, GeneratorSource) else "source",
                             **({"options": o} if o else {})}
                    for r, o in zip(rewards, opts)},
        # how add-reward re-reads the source; None when the source object was passed in directly
        "source": source.describe(), "source_config": config_to_dict(cfg.source) if source_from_cfg else None,
        "is_video": bool(source.is_video) if source.is_video is not None else None,
        "latent_shape": None, "pixel_shape": None, "latent_dtype": cfg.latent_dtype, "text_dtype": cfg.text_dtype,
        "text_shape": list(text_shape), "text_pooled_dim": int(pooled_dim or text_shape[1]),
        "shard_size": cfg.shard_size, "batch_size": cfg.batch_size,
        "sample_latents": cfg.sample_latents, "num_records_planned": None, "shards": [], "sidecars": {},
        "complete": False, "counts": {},
    }


def holds_cache(root: Path) -> bool:
    return st.manifest_path(root).exists() or (root / st.SHARD_DIR).exists()


# What a build (or the CLI around it) leaves in a directory before its first manifest.json is written.
_OWN_NAMES = {"config.yaml", "log.txt", st.SHARD_DIR, st.JOURNAL_DIR, lock_mod.LOCK_DIR, lock_mod.MUTEX}


def recognised_cache(root: Path) -> bool:
    """Whether ``root`` is a latent cache this toolkit wrote: its manifest.json has our format, or (a build killed
    before its first manifest) it holds nothing but what a starting build writes, with shard-named files only."""
    p = st.manifest_path(root)
    if p.exists():
        try:
            return read_json(p).get("format") == st.FORMAT
        except (OSError, ValueError):
            return False
    if not root.is_dir():
        return False
    names = {c.name for c in root.iterdir()}
    if not names <= _OWN_NAMES:
        return False
    shards = root / st.SHARD_DIR
    return all(st.parse_shard_name(c.name) or c.name.endswith(".tmp") for c in shards.iterdir()) \
        if shards.is_dir() else True


def check_out_dir(cfg: BuildCacheConfig) -> None:
    """Refuse to build into a directory that already holds a cache unless resuming or overwriting, and refuse to
    overwrite a directory that is not a cache (run first, so a refused build touches nothing there)."""
    root = Path(cfg.out_dir)
    if holds_cache(root) and not (cfg.resume or cfg.overwrite):
        raise st.CacheError(f"{root} already holds a cache; pass --resume true to continue or extend it, "
                            "or --overwrite true to delete it, or choose another out_dir")
    if cfg.overwrite and holds_cache(root) and not recognised_cache(root):
        found = sorted(c.name for c in root.iterdir())[:6]
        raise st.CacheError(f"--overwrite true only deletes a latent cache, and {root} is not one (no manifest.json of "
                            f"format {st.FORMAT!r}; it holds {found}); choose another out_dir, or empty it yourself")


def _delete_cache(root: Path) -> None:
    """``--overwrite``: the cache's own files only (``recognised_cache`` was checked)."""
    for sub in (st.SHARD_DIR, st.JOURNAL_DIR, st.REWARD_DIR, st.ADD_REWARD_RUNS):
        shutil.rmtree(root / sub, ignore_errors=True)
    for f in (st.MANIFEST, st.REJECTS):
        (root / f).unlink(missing_ok=True)


def check_committed(root: Path, manifest: dict[str, Any], check_hash: bool = True) -> None:
    """Before a resume: every committed shard (and reward file) exists with its recorded size (and sha256), so the
    build never calls a damaged cache complete. Raises one line naming the files and the fix."""
    problems = []
    for e in manifest["shards"]:
        problems += st.verify_shard_file(root / st.SHARD_DIR / e["file"], e, deep=False, check_hash=check_hash)
    for name, entries in manifest.get("sidecars", {}).items():
        for e in entries:
            p = st.size_problem(root / e["file"], e)
            if p is None and check_hash and e.get("sha256") and st.file_sha256(root / e["file"]) != e["sha256"]:
                p = f"{root / e['file']}: sha256 differs from the manifest"
            problems += [p] if p else []
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise st.CacheError(f"cache {root} is damaged ({shown}); {st.repair_hint(root)} (or add --repair true to "
                            "this resume)")


def repair_entries(root: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """``--repair``: drop every shard entry that is invalid (path, name, range, overlap), missing or damaged (size,
    sha256, Arrow), deleting damaged files, so the resume rebuilds exactly those units; drop the reward files of
    dropped shards and damaged reward files (``manifest['rescore']``: rewards to run `add-reward` for again);
    record size and sha256 of sound entries that lack them (caches from before they were recorded)."""
    shard_dir = root / st.SHARD_DIR
    by_file: dict[str, dict[str, Any]] = {}
    for e in list(manifest.get("shards", [])) + st.read_journals(root):
        by_file[str(e.get("file"))] = e
    kept, dropped = [], []
    for f, e in by_file.items():
        probe = {**manifest, "shards": [e], "sidecars": {}, "complete": False, "counts": {}}
        problems = st.validate_manifest(root, probe)
        if problems:  # an entry naming a path outside, or not its own range: its file (if any) is left to recover()
            dropped.append((f, problems[0]))
            continue
        problems = st.verify_shard_file(shard_dir / f, e, deep=True, check_hash=True)
        if problems:
            (shard_dir / f).unlink(missing_ok=True)
            dropped.append((f, problems[0]))
            continue
        if not e.get("sha256") or e.get("bytes") is None:
            e = {**e, "bytes": (shard_dir / f).stat().st_size, "sha256": st.file_sha256(shard_dir / f)}
            log.info("repair: recorded the size and sha256 of %s (the manifest had none)", f)
        kept.append(e)
    kept.sort(key=lambda e: (e["start"], e["end"]))
    overlapping = set()
    for a, b in zip(kept, kept[1:]):
        if b["start"] < a["end"]:
            overlapping |= {a["file"], b["file"]}
    for f in sorted(overlapping):
        dropped.append((f, "overlaps another shard"))
        (shard_dir / f).unlink(missing_ok=True)
    kept = [e for e in kept if e["file"] not in overlapping]
    for f, why in dropped:
        log.warning("repair: dropping shard %s (%s); it is rebuilt", f, why)
    listed = {e["file"] for e in kept}
    rescore: dict[str, int] = dict(manifest.get("rescore") or {})
    for name, entries in (manifest.get("sidecars") or {}).items():
        good = []
        for e in entries:
            rel = st.sidecar_file(name, str(e.get("shard")))
            path = root / rel
            why = None
            if e.get("file") != rel:
                why = f"its path {e.get('file')!r} is not {rel!r}"
            elif e.get("shard") not in listed:
                why = "its shard was dropped"
            else:
                why = st.size_problem(path, e)
                if why is None and e.get("sha256") and st.file_sha256(path) != e["sha256"]:
                    why = "sha256 differs from the manifest"
            if why is not None:
                if e.get("file") == rel:
                    path.unlink(missing_ok=True)
                log.warning("repair: dropping reward file %s of %r (%s); run `lrm cache add-reward --reward %s` "
                            "again (`lrm cache repair` does)", rel, name, why, name)
                rescore[name] = rescore.get(name, 0) + 1
                continue
            if not e.get("sha256") or e.get("bytes") is None:
                e = {**e, "bytes": path.stat().st_size, "sha256": st.file_sha256(path)}
            good.append(e)
        manifest["sidecars"][name] = good
    manifest["shards"] = kept
    manifest["complete"] = False
    if rescore:
        manifest["rescore"] = rescore
    manifest["counts"] = st.summarize_counts(manifest)
    st.write_manifest(root, manifest)
    jd = root / st.JOURNAL_DIR
    for p in jd.glob("rank-*.json") if jd.exists() else []:
        p.unlink()
    log.info("repair of %s: %d shard(s) dropped and rebuilt, reward files to score again: %s", root, len(dropped),
             rescore or "none")
    return manifest


def check_resume_compatible(manifest: dict[str, Any], header: dict[str, Any], root: Path) -> None:
    """Refuse to mix latent spaces, text encoders, sources or settings in one cache."""
    LatentSpace.from_dict(manifest["latent_space"]).check_compatible(
        LatentSpace.from_dict(header["latent_space"]), what=f"the VAE's latents for {root}")
    if manifest["text_encoder"] != header["text_encoder"]:
        raise st.TextEncoderMismatchError(
            f"cache {root} was built with text encoder {manifest['text_encoder']}, not {header['text_encoder']}; "
            "use the same text encoder or build a new cache")
    old = {k: v["version"] for k, v in manifest["rewards"].items() if v.get("storage") == "shard"}
    new = {k: v["version"] for k, v in header["rewards"].items()}
    if old != new:
        raise st.CacheError(f"cache {root} scores rewards {old} during the build, this build asks for {new}; "
                            "resume with the same rewards and add others with `lrm cache add-reward`")
    for k, v in header["rewards"].items():
        if manifest["rewards"][k].get("options", {}) != v.get("options", {}):
            raise st.CacheError(f"cache {root} scores {k!r} with options {manifest['rewards'][k].get('options', {})}, "
                                f"this build with {v.get('options', {})}; resume with the original reward_options")
    D = header["text_shape"][1]
    if manifest.get("text_pooled_dim", manifest["text_shape"][1]) != header.get("text_pooled_dim", D):
        raise st.CacheError(f"cache {root} stores {manifest.get('text_pooled_dim', manifest['text_shape'][1])}-d "
                            f"pooled text, this build's text encoder gives {header.get('text_pooled_dim', D)}-d; use "
                            "the same text encoder or build a new cache")
    for k in ("source", "latent_dtype", "text_dtype", "text_shape", "shard_size", "batch_size", "sample_latents"):
        if manifest.get(k) != header.get(k):
            raise st.CacheError(f"cache {root} has {k}={manifest.get(k)!r} but this build has {header.get(k)!r}; "
                                "resume with the original settings (only source.num_samples may grow)")


def recover(root: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Fold journals into the manifest, adopt sound orphan shards, delete torn/temp files."""
    entries = st.merge_shard_entries(manifest.get("shards", []), st.read_journals(root), root=root)
    known = {e["file"] for e in entries}
    shard_dir = root / st.SHARD_DIR
    if shard_dir.exists():
        for p in sorted(shard_dir.iterdir()):
            if p.name.startswith(".") and p.name.endswith(".tmp"):
                p.unlink()
                continue
            if p.name in known or st.parse_shard_name(p.name) is None:
                continue
            problems = st.verify_shard_file(p, None, deep=True)
            entry = None
            if not problems:
                meta = st.shard_metadata(st.open_table(p, memory_map=False))
                entry = {**meta, "file": p.name, "bytes": p.stat().st_size, "sha256": st.file_sha256(p)}
                try:
                    entries = st.merge_shard_entries(entries, [entry])
                    log.info("adopted shard %s (committed before the crash, not yet in the manifest)", p.name)
                    continue
                except st.CacheError:
                    problems = ["overlaps a committed shard"]
            log.warning("deleting orphan shard %s: %s", p.name, "; ".join(problems))
            p.unlink()
    manifest["shards"] = entries
    _fill_shapes(manifest)
    manifest["counts"] = st.summarize_counts(manifest)
    st.write_manifest(root, manifest)
    jd = root / st.JOURNAL_DIR
    if jd.exists():
        for p in jd.glob("rank-*.json"):
            p.unlink()
    return manifest


def _fill_shapes(manifest: dict[str, Any]) -> None:
    for key in ("latent_shape", "pixel_shape"):
        for e in manifest["shards"]:
            if e.get(key) is not None:
                if manifest.get(key) is None:
                    manifest[key] = e[key]
                elif list(manifest[key]) != list(e[key]):
                    raise st.CacheError(f"shard {e['file']} has {key} {e[key]} but the cache holds {manifest[key]}")


def finalize_cache(root: str | Path) -> dict[str, Any]:
    """Merge every rank's journal into ``manifest.json``, recount, rebuild ``rejects.jsonl`` (rank 0, at the end).

    ``complete`` only when every planned index is in a shard, every shard file has its recorded size, and no reward
    failed on every record (``build_cache`` then raises)."""
    root = Path(root)
    from data_cache.lock import manifest_mutex

    with manifest_mutex(root):
        manifest = recover(root, st.read_manifest(root))
        n = manifest.get("num_records_planned") or 0
        covered = not st.missing_units(manifest["shards"], n, manifest["shard_size"])
        sound = all(st.size_problem(root / st.SHARD_DIR / e["file"], e) is None for e in manifest["shards"])
        manifest["complete"] = covered and sound and not st.rewards_failed_everywhere(manifest)
        st.write_manifest(root, manifest)
        st.rebuild_rejects_log(root, manifest)
    return manifest


class _Writer(threading.Thread):
    def __init__(self, root: Path, rank: int, header: dict[str, Any], reward_names: list[str],
                 on_reward_error: str, progress_total: int, progress: bool, is_rank0: bool, world_size: int):
        super().__init__(daemon=True, name="lrm-cache-writer")
        self.root, self.rank, self.header = root, rank, header
        self.reward_names = reward_names
        self.on_reward_error = on_reward_error
        self.q: queue.Queue = queue.Queue(maxsize=4)
        self.error: BaseException | None = None
        self.committed: list[dict[str, Any]] = []
        self.records = 0
        self.is_rank0 = is_rank0
        self.world_size = world_size
        self.latent_shape = header.get("latent_shape")
        self.pixel_shape = header.get("pixel_shape")
        self.wait_s = 0.0
        from tqdm.auto import tqdm

        self.bar = tqdm(total=progress_total, desc=f"cache build r{rank}", unit="rec", disable=not progress,
                        mininterval=1.0)

    def run(self):
        pending: list[EncodedBatch] = []
        try:
            while True:
                eb = self.q.get()
                if isinstance(eb, _Stop):
                    return
                pending.append(eb)
                self.bar.update(eb.loaded.span[1] - eb.loaded.span[0])  # per batch, not per shard
                if eb.loaded.last:
                    self._commit(pending)
                    pending = []
        except BaseException as e:
            self.error = e
            while True:  # drain so the producer never blocks
                try:
                    if isinstance(self.q.get(timeout=1.0), _Stop):
                        return
                except queue.Empty:
                    return
        finally:
            self.bar.close()

    def _commit(self, batches: list[EncodedBatch]) -> None:
        unit = batches[0].loaded.unit
        cols: dict[str, list] = {k: [] for k in ("index", "source_id", "prompt", "content_hash", "latent",
                                                 "text_tokens", "text_mask", "text_pooled")}
        for name in self.reward_names:
            cols[st.reward_column(name)] = []
        reject_log: list[dict[str, Any]] = []
        for eb in batches:
            lb = eb.loaded
            reject_log += lb.rejects
            if not lb.indices:
                continue
            t0 = time.perf_counter()
            if eb.event is not None:
                eb.event.synchronize()
            scores = {}
            keep = np.ones(len(lb.indices), dtype=bool)
            for name in self.reward_names:
                res = eb.rewards[name]
                s, fails = res.result() if isinstance(res, Future) else finish_scores(name, *res)
                scores[name] = s
                for row, reason, msg in fails:
                    reject_log.append({"index": lb.indices[row], "source_id": lb.source_ids[row], "reason": reason,
                                       "message": msg, "action": "skipped" if self.on_reward_error == "skip"
                                       else "stored_nan"})
                    if self.on_reward_error == "skip":
                        keep[row] = False
            self.wait_s += time.perf_counter() - t0
            rows = np.flatnonzero(keep)
            cols["index"] += [lb.indices[i] for i in rows]
            cols["source_id"] += [lb.source_ids[i] for i in rows]
            cols["prompt"] += [lb.prompts[i] for i in rows]
            cols["content_hash"] += [lb.hashes[i] for i in rows]
            cols["latent"].append(eb.latents.numpy()[rows])
            cols["text_tokens"].append(eb.tokens.numpy()[rows])
            cols["text_mask"].append(eb.mask.numpy()[rows])
            cols["text_pooled"].append(eb.pooled.numpy()[rows])
            for name in self.reward_names:
                cols[st.reward_column(name)].append(scores[name][rows])
            if self.latent_shape is None:
                self.latent_shape = list(eb.latents.shape[1:])
            if self.pixel_shape is None and lb.pixels is not None:
                self.pixel_shape = list(lb.pixels.shape[1:])
        n = len(cols["index"])
        h = self.header
        L, D = h["text_shape"]
        P = int(h.get("text_pooled_dim", D))  # pooled width (FLUX / SD3 / HunyuanVideo: the CLIP pooled vector)
        latent_shape = tuple(self.latent_shape) if self.latent_shape else (1,)
        for k, shape, dt in (("latent", latent_shape, st.NP_DTYPES[h["latent_dtype"]]),
                             ("text_tokens", (L, D), st.NP_DTYPES[h["text_dtype"]]),
                             ("text_mask", (L,), np.uint8), ("text_pooled", (P,), st.NP_DTYPES[h["text_dtype"]])):
            cols[k] = np.concatenate(cols[k]) if cols[k] else np.zeros((0,) + shape, dt)
        for name in self.reward_names:
            c = st.reward_column(name)
            cols[c] = np.concatenate(cols[c]) if cols[c] else np.zeros(0, np.float32)
        schema = st.make_schema(latent_shape, h["latent_dtype"], (L, D), h["text_dtype"], self.reward_names,
                                pooled_dim=P)
        table = st.records_to_table(cols, schema)
        rejects: dict[str, int] = {}
        missing: dict[str, int] = {}
        for r in reject_log:
            rejects[r["reason"]] = rejects.get(r["reason"], 0) + 1
        for name in self.reward_names:
            missing[name] = int(np.isnan(cols[st.reward_column(name)]).sum())
        name = st.shard_name(unit[0], unit[1], self.rank)
        meta = {"start": unit[0], "end": unit[1], "rank": self.rank, "num_records": n, "rejects": rejects,
                "reject_log": reject_log, "missing_rewards": missing, "latent_shape": self.latent_shape,
                "pixel_shape": self.pixel_shape}
        # 1. shard: temp + fsync + rename
        info = st.write_shard_file(self.root / st.SHARD_DIR / name, table, meta)
        entry = {**meta, "file": name, **info}
        self.committed.append(entry)
        # 2. this rank's journal; 3. rank 0 folds every journal into the manifest
        from lrm.io import write_json

        write_json(st.journal_path(self.root, self.rank), {"rank": self.rank, "shards": self.committed})
        if self.is_rank0:
            def merge(m: dict[str, Any]) -> None:
                m["shards"] = st.merge_shard_entries(m["shards"], st.read_journals(self.root), root=self.root)
                _fill_shapes(m)
                m["counts"] = st.summarize_counts(m)

            st.update_manifest(self.root, merge)
        self.records += n


def build_cache(cfg: BuildCacheConfig, *, source: Callable | PixelSource | GeneratorSource | None = None,
                rewards: list[Any] | None = None, vae: VAE | None = None, text_encoder: TextEncoder | None = None,
                rank: int | None = None, world_size: int | None = None, finalize: bool = True) -> dict[str, Any]:
    """Build (or resume / extend) the cache in ``cfg.out_dir``; returns a summary with the manifest and speed.

    Speed: ``records_per_s`` counts the pipeline only (from the start of the load/encode/write stages to the last
    commit), not the set-up before it (loading the VAE, text encoder and rewards; checking the directory), which is
    ``setup_s``; ``seconds`` is the whole call and ``records_per_s_total`` the records over it.

    ``source``: a source object or a generator callable ``fn(n, seed) -> (latents, prompts)`` (overrides
    ``cfg.source``'s object, not its settings). ``rewards``: reward objects (default: ``cfg.rewards`` through
    ``reward_adapters.create_reward``). ``rank``/``world_size`` simulate one rank of a multi-process build
    (call ``finalize_cache`` after the last one); by default they come from ``accelerate`` when launched so.
    """
    t_start = time.perf_counter()
    root = Path(cfg.out_dir)
    device = resolve_device(cfg.device)
    rank, world, dist_device, barrier = _dist_info(rank, world_size, cpu=device.type == "cpu")
    device = dist_device if dist_device is not None else device

    # 1. objects
    if isinstance(source, (PixelSource, GeneratorSource)):
        src = source
    else:
        src = make_source(cfg.source, generator=source, device=device)
    vae = vae if vae is not None else load_vae(cfg.vae, cfg.vae_subfolder, device, cfg.vae_bf16, cfg.vae_chunk_size)
    # a FLUX / SD3 / HunyuanVideo pipeline: its PipelineText (the tokens + pooled vector the network takes)
    te = text_encoder if text_encoder is not None else text_encoder_for(cfg.text_encoder, cfg.text_max_length,
                                                                        device=device)
    reward_objs = list(rewards) if rewards is not None else resolve_rewards(cfg.rewards, device, cfg.reward_options)
    reward_opts = None if rewards is not None else [cfg.reward_options.get(n, {}) for n in cfg.rewards]
    names = [r.name for r in reward_objs]
    if len(set(names)) != len(names):
        raise ValueError(f"two rewards share a name: {names}")
    if src.is_video is not None:
        for r in reward_objs:
            check_reward_modality(r, src.is_video)
    num_records = cfg.source.num_samples or (src.num_records or 0)
    if src.num_records is not None:
        if cfg.source.num_samples > src.num_records:
            raise ValueError(f"source.num_samples={cfg.source.num_samples} but the source holds only "
                             f"{src.num_records} records")
        num_records = num_records or src.num_records
    header = _header(cfg, src, vae.latent_space, te.identity(), reward_objs,
                     (int(getattr(te, "num_tokens", te.max_length)), te.dim),
                     source_from_cfg=not isinstance(source, (PixelSource, GeneratorSource)), reward_options=reward_opts,
                     pooled_dim=getattr(te, "pooled_dim", None))

    # 2. create / check / recover the directory (rank 0, holding the build lock), then everyone reads the manifest
    lock = contextlib.nullcontext()
    if rank == 0:
        check_out_dir(cfg)  # before the lock file: a refused directory gets nothing written into it
        lock = lock_mod.writer_lock(root, lock_mod.BUILD)
    with lock:
        return _build_locked(cfg, root, src, vae, te, reward_objs, names, header, num_records, device, rank, world,
                             barrier, t_start, finalize)


def _build_locked(cfg: BuildCacheConfig, root: Path, src, vae: VAE, te: TextEncoder, reward_objs: list[Any],
                  names: list[str], header: dict[str, Any], num_records: int, device: torch.device, rank: int,
                  world: int, barrier: Callable[[], None], t_start: float, finalize: bool) -> dict[str, Any]:
    if rank == 0:
        check_out_dir(cfg)  # again, now that no other build can write: one may have finished since the first check
        if cfg.overwrite and holds_cache(root):
            _delete_cache(root)
        if st.manifest_path(root).exists():
            manifest = st.read_manifest(root)
            check_resume_compatible(manifest, header, root)
            if cfg.repair:
                manifest = repair_entries(root, manifest)
            else:
                st.check_manifest(root, manifest)  # a hand-edited manifest: paths, ranges, a removed entry
            manifest = recover(root, manifest)
            if not cfg.repair:
                check_committed(root, manifest, check_hash=cfg.check_shards == "hash")
        else:
            manifest = header
        manifest["num_records_planned"] = max(num_records, manifest.get("num_records_planned") or 0)
        manifest["toolkit_version"] = lrm.__version__
        manifest["complete"] = False
        (root / st.SHARD_DIR).mkdir(parents=True, exist_ok=True)
        st.write_manifest(root, manifest)
    barrier()
    manifest = st.read_manifest(root)
    if rank != 0:
        check_resume_compatible(manifest, header, root)
    header.update({k: manifest.get(k) for k in ("latent_shape", "pixel_shape")})
    # A unit goes to rank (slot % world): fixed by its position, not by what other ranks already committed.
    units = [u for u in st.missing_units(manifest["shards"], num_records, cfg.shard_size)
             if (u[0] // cfg.shard_size) % world == rank]
    todo = sum(b - a for a, b in units)
    log.info("cache %s: %d records planned, %d committed, rank %d/%d builds %d in %d shards (batch %d, %s)",
             root, num_records, manifest["counts"].get("records", 0) if manifest.get("counts") else 0, rank, world,
             todo, len(units), cfg.batch_size, device)

    # 3. the three stages
    cuda = device.type == "cuda"
    loader = _Loader(src, units, cfg.batch_size, cfg.num_workers, cfg.prefetch_batches, manifest.get("pixel_shape"),
                     pin=cuda, worker_type=cfg.worker_type)
    writer = _Writer(root, rank, header, names, cfg.on_reward_error, todo, cfg.progress, rank == 0, world)
    cpu_pool = ThreadPoolExecutor(2, thread_name_prefix="lrm-cache-cpu-reward")
    copy_stream = torch.cuda.Stream(device) if cuda else None
    ldt = st.NP_DTYPES[cfg.latent_dtype]
    tdt = st.NP_DTYPES[cfg.text_dtype]
    gpu_s = wait_s = 0.0
    t_pipeline = time.perf_counter()  # models are loaded: the speed is measured from here
    setup_s = t_pipeline - t_start
    loader.start()
    writer.start()
    try:
        while True:
            t0 = time.perf_counter()
            lb = loader.q.get()
            wait_s += time.perf_counter() - t0
            if isinstance(lb, _Stop):
                break
            if writer.error is not None:
                raise writer.error
            t0 = time.perf_counter()
            eb = EncodedBatch(loaded=lb)
            if lb.indices:
                _gpu_stage(eb, vae, te, reward_objs, device, cfg, ldt, tdt, cpu_pool, copy_stream)
            gpu_s += time.perf_counter() - t0
            writer.q.put(eb)
        if loader.error is not None:
            raise loader.error
    finally:
        loader.stop_flag.set()
        writer.q.put(_Stop())
        writer.join()
        cpu_pool.shutdown(wait=True)
    if writer.error is not None:
        raise writer.error
    pipeline_s = time.perf_counter() - t_pipeline
    barrier()
    if rank == 0 and finalize:
        finalize_cache(root)
    barrier()  # every rank returns the merged manifest, not one read before rank 0 finished it
    manifest = st.read_manifest(root)
    failed = st.rewards_failed_everywhere(manifest) if finalize else {}
    if failed:  # finalize_cache left complete=False
        name, info = next(iter(failed.items()))
        raise st.CacheError(f"reward {name!r} failed on every record it scored ({info['failures']} failures, e.g. "
                            f"{info['example']!r}); cache {root} is marked incomplete. Fix the reward (every failure "
                            f"is in {root / st.REJECTS}) and build again with --overwrite true")
    if manifest.get("rescore"):
        log.warning("cache %s: rewards added with add-reward lost the scores of rebuilt shards: %s; run `lrm cache "
                    "add-reward --reward NAME` for each (`lrm cache repair` does it)", root, manifest["rescore"])
    elapsed = time.perf_counter() - t_start
    log.info("cache %s: rank %d wrote %d records in %.1f s (%.1f records/s) after %.1f s of set-up (model loading)",
             root, rank, writer.records, pipeline_s, writer.records / max(pipeline_s, 1e-9), setup_s)
    return {"manifest": manifest, "records_written": writer.records, "indices_processed": todo,
            "seconds": elapsed, "setup_s": setup_s, "pipeline_s": pipeline_s,
            "records_per_s": writer.records / max(pipeline_s, 1e-9),
            "records_per_s_total": writer.records / max(elapsed, 1e-9), "gpu_stage_s": gpu_s,
            "loader_wait_s": wait_s, "writer_wait_s": writer.wait_s, "rank": rank, "world_size": world,
            "rescore": dict(manifest.get("rescore") or {})}


def _gpu_stage(eb: EncodedBatch, vae: VAE, te: TextEncoder, rewards: list[Any], device: torch.device,
               cfg: BuildCacheConfig, ldt, tdt, cpu_pool: ThreadPoolExecutor, copy_stream) -> None:
    lb = eb.loaded
    with torch.no_grad():
        if lb.latents is not None:  # generator: latents given, pixels decoded
            z = lb.latents.to(device, torch.float32)  # (B, C, h, w) / (B, T, C, h, w)
            vae.latent_space.check_latents(z, "generator latents")
            pixels = vae.decode(z, clamp=True)
        else:
            pixels = lb.pixels.to(device, non_blocking=True)
            z = encode_pixels(vae, pixels, cfg.sample_latents)
        emb = te(lb.prompts)
        cpu_pixels = None
        for r in rewards:
            rdev = _reward_device(r, device)
            if rdev.type == "cpu" and device.type != "cpu":
                if cpu_pixels is None:
                    cpu_pixels = lb.pixels if lb.pixels is not None else pixels.cpu()
                eb.rewards[r.name] = cpu_pool.submit(_cpu_score, r, cpu_pixels, lb.prompts,
                                                     cfg.retry_timeouts_per_record)
            else:
                eb.rewards[r.name] = score_reward(r, pixels if rdev == pixels.device else pixels.to(rdev), lb.prompts,
                                                  cfg.retry_timeouts_per_record)
        gpu_scores = {k: v[0] for k, v in eb.rewards.items() if not isinstance(v, Future)}
        outs = {"latents": z.to(_torch_dtype(ldt)), "tokens": emb.tokens.to(_torch_dtype(tdt)),
                "mask": emb.mask.to(torch.uint8), "pooled": emb.pooled.to(_torch_dtype(tdt))}
        if copy_stream is not None:
            copy_stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(copy_stream):
                for k, v in outs.items():
                    v.record_stream(copy_stream)
                    setattr(eb, k, v.to("cpu", non_blocking=True))
                for k, v in gpu_scores.items():
                    if v.device.type == "cuda":
                        v.record_stream(copy_stream)
                    eb.rewards[k] = (v.to("cpu", non_blocking=True), eb.rewards[k][1])
                ev = torch.cuda.Event()
                ev.record(copy_stream)
            eb.event = ev
        else:
            for k, v in outs.items():
                setattr(eb, k, v.cpu())
            for k, v in gpu_scores.items():
                eb.rewards[k] = (v.cpu(), eb.rewards[k][1])


def _torch_dtype(np_dtype) -> torch.dtype:
    return {np.float16: torch.float16, np.float32: torch.float32}[np_dtype]

