"""``lrm cache build | verify | add-reward | stats``."""

from __future__ import annotations

import argparse
import json
import sys

from data_cache.config import AddRewardConfig, BuildCacheConfig, StatsConfig, VerifyConfig
from lrm.cli import add_config_command


def _build(cfg: BuildCacheConfig) -> None:
    from data_cache.build import build_cache

    out = build_cache(cfg)
    m = out["manifest"]
    print(f"cache {cfg.out_dir}: {m['counts']['records']} records ({out['records_written']} written now, "
          f"{out['records_per_s']:.1f} records/s), rejects {m['counts']['rejects']}, complete={m['complete']}")


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
    from data_cache.ops import add_reward

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
