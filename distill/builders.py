"""One place that turns a model specification into models: the teacher / student ``Denoiser``, the ``VAE``, the
``TextEncoder`` and a prompt source. ``lrm distill``, ``lrm finetune``, ``lrm eval`` and ``lrm overopt`` all call
these, so the same keys mean the same thing in every config:

  teacher            'shapes-image' / 'shapes-video' (the built-in world), a ``Denoiser.save_pretrained`` directory
                     (a distilled / fine-tuned student), or a diffusers pipeline directory / hub id
  teacher_subfolder  model subfolder of a diffusers teacher (None: 'transformer' if present, else 'unet')
  vae, vae_subfolder 'shapes' or a diffusers AutoencoderKL path / hub id (+ 'vae' inside a pipeline)
  vae_bf16           run the VAE under bf16 autocast (CUDA)
  vae_chunk_size     images / frames per VAE call (0: auto by pixel area)
  text_encoder       'all-MiniLM-L6-v2' or a transformers encoder path / hub id / pipeline directory
  text_max_length    caption length in tokens (SD's CLIP: 77)

A spec is any object with these attributes; the run configs inherit them from ``ModelSpec`` (``teacher`` itself is
each config's own: ``lrm eval`` calls it ``denoiser``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lrm.config import ConfigError, opt
from lrm.io import read_records

SHAPES_TEACHERS = ("shapes-image", "shapes-video")
PROMPT_COLUMNS = ("prompt", "caption", "text")


@dataclass
class ModelSpec:
    """The model keys every run config shares (``lrm distill / finetune / eval / overopt``); see the module doc."""

    teacher_subfolder: str | None = opt(None, "model subfolder of a diffusers teacher; None: 'transformer' if the "
                                              "directory has one, else 'unet'; '' for a bare model directory")
    vae: str = opt("shapes", "'shapes' (the Shapes world's VAE) or a diffusers AutoencoderKL path / hub id (a pipeline "
                             "directory with vae_subfolder 'vae')")
    vae_subfolder: str | None = opt(None, "subfolder of the VAE inside a pipeline repo (e.g. 'vae')")
    vae_bf16: bool = opt(False, "run the VAE under bf16 autocast (CUDA; weights unchanged): about half the "
                                "activations; recommended at 512 px")
    vae_chunk_size: int = opt(0, "images / frames per VAE call; 0 = auto by pixel area (16 at 512x512, 64 at 256x256: "
                                 "lrm.latent_space.auto_chunk_size); lower it if the VAE runs out of memory")
    text_encoder: str = opt("all-MiniLM-L6-v2", "text encoder name or path (lrm.text.TextEncoder); for a diffusers "
                                                "teacher, the pipeline directory (its text_encoder/ + tokenizer/)")
    text_max_length: int = opt(32, "caption length in tokens (padded/truncated), of the captions and the null caption; "
                                   "Stable Diffusion's CLIP: 77")

    def __post_init__(self) -> None:
        if self.vae_chunk_size < 0:
            raise ConfigError(f"vae_chunk_size must be >= 1, or 0 for auto, got {self.vae_chunk_size}")
        if self.text_max_length < 1:
            raise ConfigError(f"text_max_length must be >= 1, got {self.text_max_length}")


def build_text_encoder(spec: Any, device: torch.device | str = "cpu"):
    """``lrm.text.TextEncoder(spec.text_encoder, max_length=spec.text_max_length)``."""
    from lrm.text import TextEncoder

    return TextEncoder(spec.text_encoder, max_length=int(getattr(spec, "text_max_length", 32)), device=device)


def teacher_is_diffusers(spec: Any) -> bool:
    """Whether ``spec.teacher`` names a diffusers pipeline (a directory with ``model_index.json`` / ``unet/`` /
    ``transformer/``, or a hub id) rather than a Shapes teacher or a ``Denoiser.save_pretrained`` directory."""
    from distill.denoiser import is_diffusers_dir

    if spec.teacher in SHAPES_TEACHERS:
        return False
    path = Path(spec.teacher)
    if (path / "denoiser.json").is_file():
        return False
    return is_diffusers_dir(path) or not path.exists()


def build_teacher(spec: Any, device: torch.device | str, text_encoder: Any = None):
    """The ``Denoiser`` named by ``spec.teacher``: a Shapes teacher, a ``Denoiser.save_pretrained`` directory, or a
    diffusers pipeline directory / hub id (``Denoiser.from_diffusers``; its null caption is ``text_encoder([""])``,
    built from ``spec`` when not given)."""
    from distill.denoiser import Denoiser

    if spec.teacher in SHAPES_TEACHERS:
        from distill.models import load_shapes_teacher

        return load_shapes_teacher(spec.teacher.split("-")[1], device=device)
    if not teacher_is_diffusers(spec):
        return Denoiser.from_pretrained(spec.teacher, device=device)
    sub = getattr(spec, "teacher_subfolder", None)
    if sub is None:
        sub = "transformer" if (Path(spec.teacher) / "transformer" / "config.json").is_file() else "unet"
    text_encoder = text_encoder if text_encoder is not None else build_text_encoder(spec, device)
    try:
        return Denoiser.from_diffusers(spec.teacher, subfolder=sub or None, text_encoder=text_encoder, device=device)
    except ValueError as e:  # e.g. a text encoder of the wrong width: a config problem, one line
        raise ConfigError(f"teacher {spec.teacher!r}: {e}") from None


def build_vae(spec: Any, device: torch.device | str):
    """The ``lrm.latent_space.VAE`` of ``spec.vae`` with ``vae_bf16`` / ``vae_chunk_size``."""
    from lrm.latent_space import VAE

    return VAE.from_pretrained(spec.vae, subfolder=None if spec.vae == "shapes" else spec.vae_subfolder,
                               device=device, autocast_bf16=bool(getattr(spec, "vae_bf16", False)),
                               chunk_size=int(getattr(spec, "vae_chunk_size", 0) or 0))


def load_prompt_file(path: str | Path) -> list[str]:
    """Prompts from a text file (one per line), a CSV (column ``prompt``, ``caption`` or ``text``) or a JSONL file
    (one object per line with one of those keys). Empty prompts are refused."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"prompt file {path} does not exist (give a .txt with one prompt per line, a .csv with a "
                          f"column among {PROMPT_COLUMNS}, or a .jsonl with one of those keys)")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".jsonl", ".ndjson"):
        try:
            records = read_records(path)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        prompts = []
        for i, row in records:
            key = next((c for c in PROMPT_COLUMNS if c in row), None)
            if key is None:
                raise ConfigError(f"{path}:{i}: no column among {PROMPT_COLUMNS} (the record has {sorted(row)})")
            prompts.append(row[key])
    else:
        prompts = path.read_text().splitlines()
    prompts = [str(p).strip() for p in prompts]
    empty = [i for i, p in enumerate(prompts) if not p]
    if suffix not in (".csv", ".jsonl", ".ndjson"):  # blank lines of a text file are separators
        prompts = [p for p in prompts if p]
    elif empty:
        raise ConfigError(f"{path}: {len(empty)} empty prompt(s), first at record {empty[0] + 1}")
    if not prompts:
        raise ConfigError(f"{path} holds no prompts")
    return prompts


def check_text_identity(expected: dict, given: dict, what: str) -> None:
    """Refuse a text encoder that differs (name, width, length, pooling) from the one ``expected`` records."""
    from lrm.text import identity_diffs

    diffs = identity_diffs(expected, given)
    if diffs:
        raise ConfigError(f"{what} were made by text encoder {expected.get('name')!r} (max_length "
                          f"{expected.get('max_length')}), but the config's is {given.get('name')!r} "
                          f"({'; '.join(diffs)}): set text_encoder / text_max_length to match")


def check_text_width(denoiser: Any, text_dim: int, what: str) -> None:
    """Refuse caption embeddings whose width is not the denoiser's cross-attention width (one line, with the fix)."""
    cfg = getattr(denoiser.model, "config", None)
    want = getattr(cfg, "cross_attention_dim", None) or getattr(cfg, "joint_attention_dim", None)
    if want is not None and int(want) != int(text_dim):
        raise ConfigError(f"{what} are {text_dim} wide but the model takes {want}-wide text: set text_encoder (and "
                          "text_max_length) to the encoder the model was trained with, e.g. the pipeline directory "
                          "itself for a diffusers teacher")


__all__ = ["ModelSpec", "build_text_encoder", "teacher_is_diffusers", "build_teacher", "build_vae", "load_prompt_file",
           "check_text_identity", "check_text_width", "SHAPES_TEACHERS"]
