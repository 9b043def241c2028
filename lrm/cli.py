"""The ``lrm`` command. Each package contributes subcommands through ``register(subparsers)``.

A package's CLI module is listed in ``COMMAND_MODULES``; one that is not built yet is skipped, so
``lrm --help`` lists only commands that exist.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any, Callable

from lrm.config import ConfigError, describe_config, load_config

COMMAND_MODULES = [
    "lrm.demo",
    "shapes.cli",
    "reward_adapters.cli",
    "data_cache.cli",
    "latent_rewards.cli",
    "distill.cli",
    "distill.finetune_cli",
    "eval.cli",
]


def add_config_command(
    subparsers: Any,
    name: str,
    config_cls: type,
    run: Callable[[Any], Any],
    help: str,
    extra_args: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.ArgumentParser:
    """A subcommand configured by a dataclass: ``--config FILE`` plus ``--key value`` overrides.

    ``run`` receives the built config (and the parsed namespace when ``extra_args`` is given).
    """
    epilog = "config keys (YAML file or --key value):\n" + "\n".join(describe_config(config_cls))
    p = subparsers.add_parser(name, help=help, description=help, epilog=epilog,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML config file; --key value options override it")
    if extra_args is not None:
        extra_args(p)

    def _run(ns: argparse.Namespace, overrides: list[str]) -> Any:
        cfg = load_config(config_cls, ns.config, overrides)
        return run(cfg, ns) if extra_args is not None else run(cfg)

    p.set_defaults(_handler=_run, _takes_overrides=True)
    return p


def add_command(subparsers: Any, name: str, run: Callable[[argparse.Namespace], Any], help: str,
                args: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.ArgumentParser:
    """A plain subcommand with argparse options only."""
    p = subparsers.add_parser(name, help=help, description=help)
    if args is not None:
        args(p)
    p.set_defaults(_handler=lambda ns, _o: run(ns), _takes_overrides=False)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lrm",
        description="Latent reward models for diffusion: train LRMs, fine-tune students, study overoptimization.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod_name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name == mod_name or mod_name.startswith(f"{e.name}."):
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns, extra = parser.parse_known_args(argv)
    if getattr(ns, "_handler", None) is None:
        parser.print_help()
        return 2 if argv is None or argv else 0
    if extra and not ns._takes_overrides:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        ns._handler(ns, extra)
    except ConfigError as e:
        print(f"lrm {ns.command}: config error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
