"""`lrm train` / `lrm evaluate` / `lrm lrms list` on a small real Shapes cache built with data_cache."""

import json

import pytest

from lrm.cli import main


@pytest.fixture(scope="module")
def shapes_cache(tmp_path_factory):
    from data_cache import BuildCacheConfig, SourceConfig, build_cache

    root = tmp_path_factory.mktemp("lrm_cli") / "cache"
    build_cache(BuildCacheConfig(out_dir=str(root), source=SourceConfig(type="shapes", num_samples=128),
                                 rewards=["jpeg-compressibility"], batch_size=64, shard_size=128, num_workers=1,
                                 device="cpu", progress=False))
    return root


def test_lrms_list(capsys):
    assert main(["lrms", "list", "text-*"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names == ["text-image-cnn", "text-image-cnn-paper", "text-video-3d-cnn", "text-video-frame-avg"]


def test_train_and_evaluate_on_a_cache(shapes_cache, tmp_path, capsys, monkeypatch):
    out = tmp_path / "lrm"
    rc = main(["train", "--cache_dir", str(shapes_cache), "--reward", "jpeg-compressibility", "--head", "image-cnn",
               "--head_kwargs", "{width: 16, patch: 2}", "--steps", "40", "--eval_every", "20", "--batch_size", "32",
               "--progress", "false", "--out_dir", str(out)])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {"out_dir", "val", "ridge_baseline"}
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["reward"] == {"name": "jpeg-compressibility", "version": "ddpo-q95-v1", "modality": "image"}
    assert meta["latent_space"]["vae_id"] == "shapes-vae" and meta["latent_space"]["latent_channels"] == 4
    assert meta["training_data"]["num_samples"] == 128
    assert (out / "config.yaml").exists() and (out / "train_log.csv").exists()

    rc = main(["evaluate", "--lrm_dir", str(out), "--cache_dir", str(shapes_cache), "--split", "val",
               "--out_dir", str(tmp_path / "ev")])
    assert rc == 0
    ev = json.loads((tmp_path / "ev" / "eval_metrics.json").read_text())
    assert ev["num_samples"] == meta["training_data"]["num_val"]
    assert ev["metrics"]["spearman"] == pytest.approx(meta["metrics"]["val"]["spearman"], abs=1e-3)
    assert (tmp_path / "ev" / "eval_calibration.png").exists()
    # The ridge baseline is refit on the same train split: the training run's baseline, on the same rows.
    assert ev["ridge_baseline"]["source"].startswith("refit")
    assert ev["ridge_baseline"]["spearman"] == pytest.approx(meta["metrics"]["ridge_baseline"]["spearman"], abs=1e-6)
    assert json.loads(capsys.readouterr().out)["ridge_baseline"] == ev["ridge_baseline"]
    # All rows of the training cache: still refit on its train split.
    assert main(["evaluate", "--lrm_dir", str(out), "--cache_dir", str(shapes_cache), "--out_dir",
                 str(tmp_path / "ev_all")]) == 0
    ev_all = json.loads(capsys.readouterr().out)
    assert ev_all["num_samples"] == 128 and ev_all["ridge_baseline"]["source"].startswith("refit")
    assert ev_all["ridge_baseline"]["num_train"] == meta["training_data"]["num_train"]
    # On a GPU `lrm evaluate` moves the data to the LRM's device; numpy is then taken through .cpu() (issue 16).
    from _gpu_tensor_mock import on_gpu

    from latent_rewards.data import LatentData

    to = LatentData.to
    monkeypatch.setattr(LatentData, "to", lambda self, device: LatentData(
        *(on_gpu(t) for t in (self.latents, self.target, self.text_tokens, self.text_mask, self.text_pooled)),
        self.prompts, self.reward_name, self.reward_info, self.latent_space, self.text_encoder, self.source)
        if str(device) == "cpu" else to(self, device))
    assert main(["evaluate", "--lrm_dir", str(out), "--cache_dir", str(shapes_cache), "--split", "val",
                 "--out_dir", str(tmp_path / "ev_gpu")]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"] == pytest.approx(ev["metrics"])


def test_train_config_errors(capsys):
    assert main(["train", "--reward", "x"]) == 2
    assert "cache_dir is required" in capsys.readouterr().err
    assert main(["train", "--cache_dir", "c", "--reward", "x", "--hed", "image-cnn"]) == 2
    assert "Did you mean 'head'" in capsys.readouterr().err


def test_train_resume_refuses_another_reward_and_a_bad_cache_writes_nothing(shapes_cache, tmp_path, capsys):
    """Issue 17: `lrm train --reward colorfulness --out_dir D` on D of a JPEG run resumed the JPEG run and saved it as
    a colorfulness LRM; a bad cache_dir overwrote the run's config.yaml."""
    out = tmp_path / "lrm"
    base = ["train", "--cache_dir", str(shapes_cache), "--head", "image-cnn", "--head_kwargs", "{width: 8, patch: 2}",
            "--steps", "6", "--eval_every", "3", "--checkpoint_every", "3", "--batch_size", "32", "--progress",
            "false", "--out_dir", str(out)]
    assert main(base + ["--reward", "jpeg-compressibility"]) == 0
    config = (out / "config.yaml").read_text()
    weights = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(base + ["--reward", "shapes-adherence", "--steps", "9"]) == 2
    err = capsys.readouterr().err
    assert "reward: 'jpeg-compressibility' -> 'shapes-adherence'" in err and "--overwrite true" in err
    bad = list(base)
    bad[bad.index("--cache_dir") + 1] = str(tmp_path / "no-cache")
    assert main(bad + ["--reward", "jpeg-compressibility"]) == 2
    assert (out / "config.yaml").read_text() == config and (out / "model.safetensors").read_bytes() == weights
    assert main(base + ["--reward", "jpeg-compressibility", "--steps", "9"]) == 0  # more steps: the same run goes on


@pytest.mark.parametrize("args, expected", [
    (["--head_kwargs", "{widht: 8}"], "config error: head 'image-cnn' has no option 'widht' (did you mean 'width'?)"),
    (["--lr", "-1"], "config error: lr must be a positive learning rate"),
    (["--val_fraction", "1.5"], "config error: val_fraction must be in (0, 1)"),
    (["--device", "gpu"], "config error: device='gpu' is not a device (did you mean cuda?); use one of auto, cpu, "
                          "cuda, cuda:N"),
    (["--head_kwargs", "{width: 8, patch: 3}"], "error: head 'image-cnn' with head_kwargs {'width': 8, 'patch': 3} "
                                                "cannot take the 'jpeg-compressibility' data's latents of shape "
                                                "(4, 8, 8)"),
    (["--reward", "colorfulness"], "error: reward 'colorfulness' is not in the cache"),
    ("one-record cache", "error: need at least 5 records with a finite 'jpeg-compressibility' reward to fit an LRM "
                         "(2 to train, 3 to validate), got 1"),
])
def test_train_user_errors_are_one_line_exit_2_and_write_nothing(shapes_cache, tmp_path_factory, tmp_path, capsys,
                                                                 args, expected):
    """Issue 17: bad head_kwargs, lr -1, val_fraction 1.5, --device gpu and empty / one-record caches gave raw
    tracebacks (the run directory written first)."""
    cache = shapes_cache
    if args == "one-record cache":
        from data_cache import BuildCacheConfig, SourceConfig, build_cache

        cache = tmp_path_factory.mktemp("one") / "cache"
        build_cache(BuildCacheConfig(out_dir=str(cache), source=SourceConfig(type="shapes", num_samples=1),
                                     rewards=["jpeg-compressibility"], batch_size=8, num_workers=1, device="cpu",
                                     progress=False))
        args = []
    out = tmp_path / "lrm"
    base = ["train", "--cache_dir", str(cache), "--reward", "jpeg-compressibility", "--head_kwargs",
            "{width: 8, patch: 2}", "--steps", "2", "--batch_size", "8", "--progress", "false", "--out_dir", str(out)]
    capsys.readouterr()
    assert main(base + args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"lrm train: {expected}") and "\n" not in err, err
    assert not out.exists()  # a failed start writes nothing
