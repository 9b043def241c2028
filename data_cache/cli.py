"""``lrm cache build | verify | repair | add-reward | stats``."""

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


def _build(cfg: BuildCacheConfig) -> dict[str, Any]:
    from data_cache.build import build_cache, check_out_dir
    from data_cache.lock import BUILD, writer_lock
    from lrm.run import get_logger

    lock = contextlib.nullcontext()
    if _is_rank0():
        check_out_dir(cfg)  # a refused build leaves an existing cache's config.yaml alone
        lock = writer_lock(cfg.out_dir, BUILD)  # a second writer is refused before it writes config.yaml
    with lock, run_dir(cfg.out_dir, cfg):
        out = build_cache(cfg)
        m = out["manifest"]
        msg = (f"cache {cfg.out_dir}: {m['counts']['records']} records ({out['records_written']} written now, "
               f"{out['records_per_s']:.1f} records/s after {out['setup_s']:.1f} s of model loading; "
               f"{out['records_per_s_total']:.1f} records/s overall), rejects {m['counts']['rejects']}, "
               f"complete={m['complete']}")
        get_logger(LOGGER).info(msg)
    print(msg)
    return out


def _verify(cfg: VerifyConfig) -> None:
    from data_cache import storage as st
    from data_cache.ops import verify_cache

    res = verify_cache(cfg.cache_dir, deep=cfg.deep)
    for w in res["warnings"]:
        print(f"warning: {w}")
    for p in res["problems"]:
        print(f"PROBLEM: {p}")
    print(f"{'OK' if res['ok'] else 'DAMAGED'}: {res['shards']} shards, {res['records']} records, "
          f"rejects {res['rejects']}")
    if not res["ok"]:
        print(f"fix: {st.repair_hint(cfg.cache_dir)}")
        sys.exit(1)


def _repair(ns: argparse.Namespace, overrides: list[str]) -> None:
    """``lrm cache repair DIR [--key value ...]``: the last build's config (DIR/config.yaml) with resume and repair on;
    then add-reward again (its config in DIR/add-reward/NAME/config.yaml) for rewards whose rebuilt shards lost
    their scores."""
    from data_cache import storage as st
    from lrm.config import ConfigError, load_config, parse_overrides

    over = parse_overrides(_positional_dir(overrides, "out_dir"))
    if not over.get("out_dir"):
        raise ConfigError("name the cache to repair: lrm cache repair DIR")
    root = Path(over["out_dir"])
    st.read_manifest(root)
    cfg_path = root / "config.yaml"
    if not cfg_path.is_file():
        raise st.CacheError(f"{root} has no config.yaml of the `lrm cache build` that made it (built from Python?); "
                            "repair it with build_cache(cfg, ...) where cfg holds the original settings with "
                            "resume=True, repair=True")
    shared = {k: over[k] for k in ("device", "progress") if k in over}
    over.update(out_dir=str(root), resume="true", overwrite="false", repair="true")
    out = _build(load_config(BuildCacheConfig, cfg_path, over))
    left = []
    for name in sorted(out.get("rescore") or {}):
        add_cfg = root / st.ADD_REWARD_RUNS / st.safe_name(name) / "config.yaml"
        if not add_cfg.is_file():
            left.append(name)
            continue
        print(f"scoring the rebuilt shards with {name!r} again (add-reward)")
        _add_reward(load_config(AddRewardConfig, add_cfg, {**shared, "cache_dir": str(root)}))
    if left:
        raise st.CacheError(f"rewards {left} lost the scores of the rebuilt shards and have no add-reward config.yaml "
                            f"in {root / st.ADD_REWARD_RUNS}; run `lrm cache add-reward --cache_dir {root} --reward "
                            "NAME` for each")


def _add_reward(cfg: AddRewardConfig) -> None:
    from data_cache import storage as st
    from data_cache.lock import ADD_REWARD, writer_lock
    from data_cache.ops import add_reward

    root = Path(cfg.cache_dir)
    st.read_manifest(root)  # not a cache: fail before creating anything in it
    if not cfg.reward:
        from lrm.config import ConfigError

        raise ConfigError("name the reward to add: --reward NAME")
    # the lock first: a refused second writer leaves the running one's config.yaml and log alone
    with writer_lock(root, ADD_REWARD, cfg.reward), run_dir(root / st.ADD_REWARD_RUNS / st.safe_name(cfg.reward), cfg):
        res = add_reward(cfg)
    print(json.dumps(res, indent=2))


def _stats(cfg: StatsConfig) -> None:
    from data_cache.ops import cache_stats

    res = cache_stats(cfg.cache_dir)
    print(json.dumps(res, indent=2))
    if cfg.out:
        from lrm.io import write_json

        write_json(cfg.out, res)


def _positional_dir(overrides: list[str], key: str = "cache_dir") -> list[str]:
    """``lrm cache verify DIR``: a leading argument that is not an option is the directory (``--KEY DIR``)."""
    if overrides and not overrides[0].startswith("-"):
        if any(o == f"--{key}" or o.startswith(f"--{key}=") for o in overrides[1:]):
            from lrm.config import ConfigError

            raise ConfigError(f"the directory is given twice: {overrides[0]!r} and --{key}; give one")
        return [f"--{key}", overrides[0], *overrides[1:]]
    return overrides


def _with_positional_dir(p: argparse.ArgumentParser, config_cls: type, run) -> None:
    from lrm.config import load_config

    p.usage = "%(prog)s [DIR] [--config FILE] [--key value ...]  (DIR = --cache_dir DIR)"
    p.set_defaults(_handler=lambda ns, o: run(load_config(config_cls, ns.config, _positional_dir(o))))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help="build, extend, verify, repair and inspect latent caches")
    s = p.add_subparsers(dest="cache_command", metavar="SUBCOMMAND")
    add_config_command(s, "build", BuildCacheConfig, _build,
                       "encode a source into a cache of (latent, text embedding, rewards); resumable")
    v = add_config_command(s, "verify", VerifyConfig, _verify,
                           "check the manifest and every shard's size and sha256 (exit 1 if damaged): "
                           "lrm cache verify DIR")
    _with_positional_dir(v, VerifyConfig, _verify)
    r = s.add_parser("repair", help="rebuild exactly the damaged or missing shards (lrm cache repair DIR)",
                     description="Rebuild the shards of DIR that are damaged, missing or invalid in the manifest, with "
                                 "the settings of its last build (DIR/config.yaml; --key value overrides such as "
                                 "--device), then score them again with the rewards added by add-reward. Needs the "
                                 "source, VAE, text encoder and rewards of that build.",
                     usage="%(prog)s DIR [--key value ...]")
    r.set_defaults(_handler=_repair, _takes_overrides=True)
    add_config_command(s, "add-reward", AddRewardConfig, _add_reward,
                       "score an existing cache with one more reward (pixels decoded or re-read)")
    st_p = add_config_command(s, "stats", StatsConfig, _stats, "records, rejects and per-reward statistics")
    _with_positional_dir(st_p, StatsConfig, _stats)
    p.set_defaults(_handler=lambda ns, o: p.print_help(), _takes_overrides=False)
