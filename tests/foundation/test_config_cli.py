from dataclasses import dataclass, field
from typing import Literal

import pytest

from lrm.config import ConfigError, load_config, opt, parse_overrides


@dataclass
class Inner:
    lr: float = opt(1e-3, "learning rate")
    betas: tuple[float, float] = opt((0.9, 0.99), "Adam betas")


@dataclass
class Cfg:
    steps: int = opt(10, "steps")
    name: str = opt("x", "name")
    flag: bool = opt(False, "a flag")
    mode: Literal["a", "b"] = opt("a", "mode")
    rewards: list[str] = opt(["r1"], "rewards")
    maybe: int | None = opt(None, "optional")
    optim: Inner = field(default_factory=Inner, metadata={"help": "optimizer"})

    def __post_init__(self):
        if self.steps <= 0:
            raise ValueError(f"steps must be positive, got {self.steps}")


def test_yaml_plus_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("steps: 5\noptim:\n  lr: 0.01\nrewards: [a, b]\n")
    cfg = load_config(Cfg, p, ["--steps", "7", "--optim.betas", "[0.5, 0.6]", "--flag", "--mode=b", "--maybe", "3"])
    assert cfg.steps == 7 and cfg.optim.lr == 0.01 and cfg.optim.betas == (0.5, 0.6)
    assert cfg.flag is True and cfg.mode == "b" and cfg.rewards == ["a", "b"] and cfg.maybe == 3
    assert load_config(Cfg, None, ["--maybe", "none"]).maybe is None
    # Mutable defaults are not shared between instances.
    a, b = Cfg(), Cfg()
    a.rewards.append("z")
    assert b.rewards == ["r1"]


@pytest.mark.parametrize("args,match", [
    (["--stepz", "3"], "unknown config key 'stepz'.*Did you mean 'steps'"),
    (["--optim.lrr", "1"], "unknown config key 'optim.lrr'"),
    (["--steps", "abc"], "steps: 'abc' is not an integer"),
    (["--steps", "1.5"], "not an integer"),
    (["--flag", "maybe"], "not a boolean"),
    (["--mode", "c"], r"not one of \['a', 'b'\]"),
    (["--optim.betas", "[1, 2, 3]"], "expected 2 items"),
    (["--optim.lr", "fast"], "not a number"),
    (["steps", "3"], "expected an option"),
])
def test_bad_overrides(args, match):
    with pytest.raises(ConfigError, match=match):
        load_config(Cfg, None, args)


def test_bad_files_and_validation(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Cfg, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Cfg, bad)
    typed = tmp_path / "typed.yaml"
    typed.write_text("steps: 'ten'\n")
    with pytest.raises(ConfigError, match="steps"):
        load_config(Cfg, typed)
    with pytest.raises(ValueError, match="steps must be positive"):
        load_config(Cfg, None, ["--steps", "0"])


def test_parse_overrides_nesting():
    assert parse_overrides(["--a.b", "1", "--c=x", "--d"]) == {"a": {"b": "1"}, "c": "x", "d": "true"}


def test_cli_unknown_key_exit_code(capsys):
    from lrm.cli import main

    assert main(["shapes", "sample", "--nmu", "3"]) == 2
    assert "Did you mean 'num'" in capsys.readouterr().err


def test_cli_sample_writes_grid(tmp_path, capsys):
    from lrm.cli import main

    out = tmp_path / "g.png"
    assert main(["shapes", "sample", "--num", "4", "--out", str(out)]) == 0
    assert out.exists() and out.stat().st_size > 200
    assert "wrote" in capsys.readouterr().out


def test_cli_user_errors_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    import argparse

    from lrm import cli
    from lrm.registry import Registry

    # A missing LRM directory (FileNotFoundError from the loader): one line, exit code 2, no traceback.
    assert cli.main(["evaluate", "--lrm_dir", str(tmp_path / "nope"), "--cache_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lrm evaluate: error: ") and "config.json is missing" in err and "\n" not in err

    def handler_raising(exc):
        def run(ns, extra):
            raise exc
        return run

    def run_with(exc):
        parser = argparse.ArgumentParser()
        monkeypatch.setattr(cli, "build_parser", lambda: parser)
        parser.set_defaults(_handler=handler_raising(exc), _takes_overrides=True, command="x")
        return cli.main([])

    # An unknown registry name: the message (not KeyError's repr) on one line.
    with pytest.raises(KeyError) as info:
        Registry("widget").create("gizmo")
    assert run_with(info.value) == 2
    assert capsys.readouterr().err.strip() == "lrm x: error: Unknown widget 'gizmo'. Available: (none)."
    # A missing optional extra is a user error; any other exception is a bug and keeps its traceback.
    assert run_with(ImportError("hpsv2 is not installed:\n  pip install 'lrm[hpsv2]'")) == 2
    assert capsys.readouterr().err.strip() == "lrm x: error: hpsv2 is not installed: pip install 'lrm[hpsv2]'"
    with pytest.raises(ZeroDivisionError):
        run_with(ZeroDivisionError("a bug"))
    with pytest.raises(KeyError):
        run_with(KeyError("a plain KeyError is a bug too"))


def test_cli_group_without_subcommand_prints_its_own_help(capsys):
    from lrm.cli import main

    assert main(["lrms"]) == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: lrm lrms") and "list" in out and "latent reward model heads" in out
    assert "fine-tune" not in out  # not the top-level description
    assert main(["shapes"]) == 2
    assert capsys.readouterr().out.startswith("usage: lrm shapes")


def test_resolve_device_refuses_unknown_forms_listing_the_valid_ones():
    """Issue 17: `--device gpu` gave a raw RuntimeError traceback (torch's list of 20 backends)."""
    import torch

    from lrm.run import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match=r"device='gpu' is not a device \(did you mean cuda\?\); use one of auto, "
                                          r"cpu, cuda, cuda:N \(N = GPU index\), mps"):
        resolve_device("gpu")
    for bad in ("cuda:x", "meta", "", "tpu"):
        with pytest.raises(ConfigError, match="is not a device; use one of auto, cpu, cuda"):
            resolve_device(bad)
    assert resolve_device("cuda:1", check_available=False) == torch.device("cuda:1")  # the form only
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        with pytest.raises(ConfigError, match=f"this machine has {n} CUDA device"):
            resolve_device(f"cuda:{n}")
    else:
        with pytest.raises(ConfigError, match="CUDA is not available; use --device cpu or auto"):
            resolve_device("cuda")


def test_cli_device_and_batch_errors_are_one_line(capsys):
    from lrm.cli import main

    for args, expected in [(["--device", "gpu"], "device='gpu' is not a device"),
                           (["--batch_size", "0"], "batch_size must be >= 1")]:
        assert main(["evaluate", "--lrm_dir", "d", "--cache_dir", "c"] + args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("lrm evaluate: config error: ") and expected in err and "\n" not in err
