"""``lrm cache build | verify | add-reward | stats``."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterator

from data_cache.config import AddRewardConfig, BuildCacheConfig, StatsConfig, VerifyConfig
from lrm.cli import add_config_command

LOGGER = "lrm.data_cache"


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def run_dir(path: str | Path, cfg: Any) -> Iterator[Path]:
    """``config.yaml`` + ``log.txt`` in ``path`` (lrm.run.prepare_run_dir) for the command's duration; rank 0 only
    under accelerate. The log handler is removed afterwards so later commands in the process do not write there."""
    from lrm.run import prepare_run_dir

    if not _is_rank0():
        yield Path(path)
        return
    out = prepare_run_dir(path, cfg, logger_name=LOGGER)
    log_path = str((out / "log.txt").resolve())
    try:
        yield out
    finally:
        logger = logging.getLogger(LOGGER)
        for h in list(logger.handlers):
            if getattr(h, "baseFilename", None) == log_path:
                logger.removeHandler(h)
                h.close()


def _build(cfg: BuildCacheConfig) -> None:
    from data_cache.build import build_cache, check_out_dir
    from lrm.run import get_logger

    if _is_rank0():
        check_out_dir(cfg)  # a refused build leaves an existing cache's config.yaml alone
    with run_dir(cfg.out_dir, cfg):
        out = build_cache(cfg)
        m = out["manifest"]
        msg = (f"cache {cfg.out_dir}: {m['counts']['records']} records ({out['records_written']} written now, "
               f"{out['records_per_s']:.1f} records/s after {out['setup_s']:.1f} s of model loading; "
               f"{out['records_per_s_total']:.1f} records/s overall), rejects {m['counts']['rejects']}, "
               f"complete={m['complete']}")
        get_logger(LOGGER).info(msg)
    print(msg)


def _verify(cfg: VerifyConfig) -> None:
    from data_cache.ops import verify_cache

    res = verify_cache(cfg.cache_dir, deep=cfg.deep)
    for w in res["warnings"]:
        print(f"warning: {w}")
    for p in res["problems"]:
        print(f"PROBLEM: {p}")
    print(f"{'OK' if res['ok'] else 'DAMAGED'}: {res['shards']} shards, {res['records']} records, "
          f"rejects {res['rejects']}")
    if not res["ok"]:
        sys.exit(1)


def _add_reward(cfg: AddRewardConfig) -> None:
    from data_cache import storage as st
    from data_cache.ops import add_reward

    root = Path(cfg.cache_dir)
    st.read_manifest(root)  # not a cache: fail before creating anything in it
    if not cfg.reward:
        from lrm.config import ConfigError

        raise ConfigError("name the reward to add: --reward NAME")
    with run_dir(root / st.ADD_REWARD_RUNS / st.safe_name(cfg.reward), cfg):
        res = add_reward(cfg)
    print(json.dumps(res, indent=2))


def _stats(cfg: StatsConfig) -> None:
    from data_cache.ops import cache_stats

    res = cache_stats(cfg.cache_dir)
    print(json.dumps(res, indent=2))
    if cfg.out:
        from lrm.io import write_json

        write_json(cfg.out, res)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help="build, extend, verify and inspect latent caches")
    s = p.add_subparsers(dest="cache_command", metavar="SUBCOMMAND")
    add_config_command(s, "build", BuildCacheConfig, _build,
                       "encode a source into a cache of (latent, text embedding, rewards); resumable")
    add_config_command(s, "verify", VerifyConfig, _verify, "check shards against the manifest (exit 1 if damaged)")
    add_config_command(s, "add-reward", AddRewardConfig, _add_reward,
                       "score an existing cache with one more reward (pixels decoded or re-read)")
    add_config_command(s, "stats", StatsConfig, _stats, "records, rejects and per-reward statistics")
    p.set_defaults(_handler=lambda ns, o: p.print_help(), _takes_overrides=False)
