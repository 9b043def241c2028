"""Dataclass configs of the cache commands (``lrm cache build / add-reward / verify / stats``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from lrm.config import ConfigError, opt

SOURCE_TYPES = ("shapes", "dataset", "folder", "generator")
VAE_CHUNK_HELP = ("frames per VAE call (bounds the VAE's GPU memory; a batch is split into chunks of this many "
                  "frames, video frames counted one by one); 0 = auto by pixel size, max(1, 64*256*256 // (H*W)): "
                  "64 at 256x256, 16 at 512x512, 4 at 1024x1024. Memory grows with frames x pixels; an SD-1.5 VAE "
                  "on an H100 peaked at 52 GB (fp32) / 35 GB (vae_bf16) encoding 64 frames of 512x512, and at "
                  "13 GB / 8.6 GB for the auto size (decoding: about 1.3-1.7x more). Lower it on a small GPU or beside "
                  "large reward models; raising it gains little speed")


@dataclass
class SourceConfig:
    type: Literal["shapes", "dataset", "folder", "generator"] = opt("shapes", "where records come from")
    num_samples: int = opt(1024, "records to build (source indices 0..N-1); 0 = the whole dataset/folder")
    seed: int = opt(0, "shapes world seed / generator base seed")
    image_size: int = opt(32, "shapes: image size in pixels (32 or 64)")
    num_frames: int = opt(0, "shapes: 0 for images, else frames per video; dataset/folder videos: frames kept "
                             "(evenly spaced), 0 = all")
    path: str = opt("", "dataset: save_to_disk directory or hub name; folder: the folder")
    split: str = opt("train", "dataset split")
    image_column: str = opt("image", "dataset column with the image or video")
    caption_column: str = opt("caption", "dataset / captions-file column with the caption")
    captions_file: str = opt("captions.csv", "folder: CSV or JSONL captions file (relative to the folder)")
    file_column: str = opt("file", "folder: captions-file column with the file name (relative to the folder)")
    allow_outside_root: bool = opt(False, "folder: allow captions-file names that point outside the folder (an "
                                          "absolute path or one with ../); by default such a record is rejected "
                                          "(reason outside_root)")
    video: bool = opt(False, "dataset/folder: records are videos")
    resize: list[int] = opt([], "dataset/folder: resize every frame to [H, W] (empty = keep; then sizes must match)")
    convert_rgb: bool = opt(False, "dataset/folder: convert grayscale/RGBA to RGB instead of rejecting the record")
    generator: str = opt("", "generator: 'package.module:callable', resolved at run time: fn(n, seed, "
                             "**generator_kwargs) -> (latents (n, C, h, w) or (n, T, C, h, w), n prompts); a "
                             "`device` parameter not set in generator_kwargs receives the build's device. SECURITY: "
                             "this is code execution: the module is imported and the callable run with the "
                             "build's rights, whatever it is (any importable function, e.g. one that runs a shell "
                             "command); build only from configs you trust")
    generator_kwargs: dict[str, Any] = opt({}, "generator: keyword arguments for the callable (a YAML mapping: "
                                               "--source.generator_kwargs '{steps: 2, checkpoint: runs/student}')")
    generator_factory: bool = opt(False, "generator: the callable is a factory, called once as "
                                         "factory(**generator_kwargs) and returning fn(n, seed) (load a teacher/"
                                         "student once, then sample per batch)")

    def __post_init__(self):
        if self.num_samples < 0:
            raise ConfigError(f"source.num_samples must be >= 0, got {self.num_samples}")
        if self.type in ("shapes", "generator") and self.num_samples == 0:
            raise ConfigError(f"source.num_samples must be > 0 for a {self.type} source (it is unbounded)")
        if self.type in ("dataset", "folder") and not self.path:
            raise ConfigError(f"source.path is required for a {self.type} source")
        if self.resize and len(self.resize) != 2:
            raise ConfigError(f"source.resize must be [H, W], got {self.resize}")
        if self.num_frames < 0:
            raise ConfigError(f"source.num_frames must be >= 0, got {self.num_frames}")
        if self.allow_outside_root and self.type != "folder":
            raise ConfigError(f"source.allow_outside_root applies to folder sources, but source.type is {self.type!r}; "
                              "drop it")
        if self.type != "generator" and (self.generator or self.generator_kwargs or self.generator_factory):
            raise ConfigError(f"source.generator / generator_kwargs / generator_factory are set but source.type is "
                              f"{self.type!r}; set source.type generator or drop them")
        if self.generator and (":" not in self.generator or not all(self.generator.partition(":")[::2])):
            raise ConfigError(f"source.generator={self.generator!r} must be 'package.module:callable'")
        _check_json("source.generator_kwargs", self.generator_kwargs,
                    "pass non-JSON objects through Python: build_cache(cfg, source=functools.partial(fn, ...))")


@dataclass
class BuildCacheConfig:
    out_dir: str = opt("runs/cache", "cache directory")
    source: SourceConfig = field(default_factory=SourceConfig, metadata={"help": "record source"})
    vae: str = opt("shapes", "VAE: 'shapes' (built-in), a local AutoencoderKL directory or a hub id")
    vae_subfolder: str = opt("", "subfolder of the VAE in its repo (e.g. 'vae' for a pipeline repo)")
    text_encoder: str = opt("all-MiniLM-L6-v2", "text encoder name or path (lrm.text.TextEncoder)")
    text_max_length: int = opt(32, "text tokens per prompt (padded/truncated)")
    rewards: list[str] = opt([], "reward names (reward_adapters registry) scored on every record")
    reward_options: dict[str, dict[str, Any]] = opt(
        {}, "create_reward options per reward name, e.g. {clip-score: {arch: ViT-B-32}, brightness: {frames: first}}; "
            "recorded in the manifest (a resume must use the same)")
    latent_dtype: Literal["float16", "float32"] = opt("float16", "storage dtype of latents")
    text_dtype: Literal["float16", "float32"] = opt("float16", "storage dtype of text embeddings")
    sample_latents: bool = opt(False, "store a posterior sample instead of the posterior mean")
    batch_size: int = opt(64, "records per GPU batch (per process)")
    shard_size: int = opt(1024, "source indices per shard (the unit of commit and resume)")
    num_workers: int = opt(4, "loader workers decoding/reading records")
    worker_type: Literal["thread", "process"] = opt(
        "thread", "loader workers: threads (no start-up cost) or spawned processes (for Python-heavy sources such "
                  "as Shapes rendering, which hold the GIL; the source must be picklable)")
    prefetch_batches: int = opt(4, "batches loaded ahead of the GPU")
    device: str = opt("auto", "auto, cpu, cuda or cuda:N (multi-GPU: each accelerate process uses its own)")
    vae_bf16: bool = opt(False, "run the VAE under bf16 autocast on CUDA (faster; latents differ slightly)")
    vae_chunk_size: int = opt(0, VAE_CHUNK_HELP)
    on_reward_error: Literal["nan", "skip"] = opt("nan", "a reward that fails or returns NaN for a record: store "
                                                         "NaN (missing) or skip the record. A reward that fails on "
                                                         "every record fails the build")
    retry_timeouts_per_record: bool = opt(
        False, "a reward batch that timed out (a command reward past its timeout): false = every record of the batch "
               "fails (reason reward_timeout); true = retry record by record, each with the full timeout. Other "
               "reward errors are always retried record by record")
    resume: bool = opt(False, "continue an interrupted (or extend a finished) build in out_dir; the committed shards "
                              "are checked first (check_shards) and a damaged one stops the build")
    repair: bool = opt(False, "with resume: drop the shards that are damaged, missing or invalid in the manifest and "
                              "rebuild exactly those (what `lrm cache repair DIR` runs)")
    check_shards: Literal["hash", "size"] = opt("hash", "on resume, check the committed shards by sha256 (reads them "
                                                        "all) or only by size (fast)")
    overwrite: bool = opt(False, "delete an existing cache in out_dir first (only a directory holding a latent "
                                 "cache's manifest.json; anything else is refused)")
    progress: bool = opt(True, "show a progress bar")

    def __post_init__(self):
        for k in ("batch_size", "shard_size", "num_workers", "prefetch_batches", "text_max_length"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k} must be >= 1, got {getattr(self, k)}")
        check_vae_chunk_size(self.vae_chunk_size)
        if self.resume and self.overwrite:
            raise ConfigError("resume and overwrite exclude each other: pick one")
        if self.repair and not self.resume:
            raise ConfigError("repair rebuilds shards of an existing cache: pass --resume true with it (or run "
                              "`lrm cache repair DIR`)")
        if len(set(self.rewards)) != len(self.rewards):
            raise ConfigError(f"rewards lists a name twice: {self.rewards}")
        check_reward_options(self.reward_options, self.rewards)


@dataclass
class AddRewardConfig:
    cache_dir: str = opt("runs/cache", "cache directory")
    reward: str = opt("", "reward name (reward_adapters registry)")
    reward_options: dict[str, dict[str, Any]] = opt(
        {}, "create_reward options for the reward, keyed by its name: {composite: {rewards: {brightness: 2.0}}}")
    pixels_from: Literal["auto", "decode", "source"] = opt(
        "auto", "pixels to score: decode the cached latents with the VAE, re-read the source, or auto (source when "
                "it is still available and unchanged, else decode)")
    vae: str = opt("", "VAE for decoding (default: the cache's VAE id; 'shapes' for the built-in one); any copy of "
                       "the same weights works (matched by content hash, not by name)")
    vae_subfolder: str = opt("", "subfolder of the VAE in its repo")
    vae_chunk_size: int = opt(0, VAE_CHUNK_HELP.replace("VAE call", "VAE decode call"))
    batch_size: int = opt(64, "records per batch")
    retry_timeouts_per_record: bool = opt(False, "a batch that timed out: false = every record fails; true = retry "
                                                 "record by record, each with the full timeout")
    device: str = opt("auto", "auto, cpu, cuda or cuda:N")
    progress: bool = opt(True, "show a progress bar")

    def __post_init__(self):
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        check_vae_chunk_size(self.vae_chunk_size)
        check_reward_options(self.reward_options, [self.reward] if self.reward else [])


def check_vae_chunk_size(n: int) -> None:
    if n < 0:
        raise ConfigError(f"vae_chunk_size must be >= 1 frames, or 0 for auto (by pixel size), got {n}")


def _check_json(key: str, value: Any, fix: str) -> None:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{key} must be JSON-serialisable (it is recorded in the cache manifest): {e}; "
                          f"{fix}") from None


def check_reward_options(options: dict[str, Any], names: list[str]) -> None:
    """``reward_options`` keys must be rewards of the command, values mappings of create_reward options."""
    for name, opts in options.items():
        if name not in names:
            raise ConfigError(f"reward_options has options for {name!r}, which is not a reward of this command "
                              f"(rewards: {names}); add it to the rewards or fix the name")
        if not isinstance(opts, dict):
            raise ConfigError(f"reward_options[{name!r}] must be a mapping of create_reward options, got {opts!r}")
    _check_json("reward_options", options, "pass reward objects through Python: build_cache(cfg, rewards=[...])")


@dataclass
class VerifyConfig:
    cache_dir: str = opt("runs/cache", "cache directory (or the first positional argument: lrm cache verify DIR)")
    deep: bool = opt(True, "also parse every shard and check its rows against the manifest")


@dataclass
class StatsConfig:
    cache_dir: str = opt("runs/cache", "cache directory (or the first positional argument: lrm cache stats DIR)")
    out: str = opt("", "also write the statistics to this JSON file")
