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


# Errors a user can fix (bad input, missing files, a name that does not exist) print one line and exit 2;
# anything else is a bug and keeps its traceback. Classes of packages that may not be installed are named
# "module:Class" and looked up only once that module has been imported (an error it raised implies it was).
USER_ERRORS = (
    "lrm.config:ConfigError",
    "lrm.registry:UnknownNameError",
    "lrm.latent_space:LatentSpaceMismatchError",
    "latent_rewards.pretrained:TextEncoderMismatchError",
    "latent_rewards.heads.base:LRMInputError",
    "data_cache.storage:CacheError",
    "data_cache.storage:TextEncoderMismatchError",
    "reward_adapters.blackbox:RewardCommandError",
    "reward_adapters.weights:WeightsNotFoundError",
    "lrm.checkpoint:NonFiniteStateError",
    "distill.guard:NonFiniteError",
)


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exception classes ``main`` reports as one-line errors: ``USER_ERRORS`` plus ``OSError`` (missing
    weights, an existing or unreadable directory, ``FileNotFoundError`` from loaders). An ``ImportError`` whose
    message gives the ``pip install`` of a missing extra is reported the same way."""
    types: list[type[BaseException]] = [OSError]
    for spec in USER_ERRORS:
        mod_name, cls_name = spec.split(":")
        mod = sys.modules.get(mod_name)
        cls = getattr(mod, cls_name, None) if mod is not None else None
        if isinstance(cls, type) and issubclass(cls, BaseException):
            types.append(cls)
    return tuple(types)


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return msg or type(e).__name__


def _selected_parser(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> argparse.ArgumentParser:
    """The innermost parser the command line named (``lrm lrms`` -> the ``lrms`` parser)."""
    current = parser
    while True:
        subs = [a for a in current._actions if isinstance(a, argparse._SubParsersAction)]  # noqa: SLF001
        if not subs:
            return current
        chosen = getattr(ns, subs[0].dest, None)
        if chosen is None or chosen not in subs[0].choices:
            return current
        current = subs[0].choices[chosen]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns, extra = parser.parse_known_args(argv)
    if getattr(ns, "_handler", None) is None:
        _selected_parser(parser, ns).print_help()
        return 2 if argv is None or argv else 0
    if extra and not ns._takes_overrides:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        ns._handler(ns, extra)
    except ConfigError as e:
        print(f"lrm {ns.command}: config error: {e}", file=sys.stderr)
        return 2
    except user_error_types() as e:  # the tuple is built when an exception is being matched
        print(f"lrm {ns.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except ImportError as e:
        if "pip install" not in str(e):  # a broken install or a bug, not a missing optional extra
            raise
        print(f"lrm {ns.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
