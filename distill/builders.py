"""One place that turns a model specification into models: the teacher / student ``Denoiser``, the ``VAE``, the
``TextEncoder`` and a prompt source. ``lrm distill``, ``lrm finetune``, ``lrm eval`` and ``lrm overopt`` all call
these, so the same keys mean the same thing in every config:

  teacher            'shapes-image' / 'shapes-video' / 'shapes-video-flow' (the built-in world), a
                     ``Denoiser.save_pretrained`` directory (a distilled / fine-tuned student), a LoRA student/ folder,
                     or a diffusers pipeline directory / hub id
  teacher_subfolder  model subfolder of a diffusers teacher (None: 'transformer' if present, else 'unet')
  vae, vae_subfolder 'shapes' or a diffusers AutoencoderKL path / hub id (+ 'vae' inside a pipeline)
  vae_bf16           run the VAE under bf16 autocast (CUDA)
  vae_chunk_size     images / frames per VAE call (0: auto by pixel area)
  text_encoder       'all-MiniLM-L6-v2' or a transformers encoder path / hub id / pipeline directory
  text_max_length    caption length in tokens (SD's CLIP: 77)

A spec is any object with these attributes; the run configs inherit them from ``ModelSpec`` (``teacher`` itself is
each config's own: ``lrm eval`` calls it ``denoiser``).

Also here, the inputs of the student trainers built from their configs: the data (``build_data``: a data cache or
Shapes samples; ``build_prompt_pool``: a cache, a prompt file or Shapes prompts), the identity of the text encoder
behind them (``text_identity``), and the rewards (``load_latent_reward``: a frozen LRM checked against the VAE and the
captions' encoder; ``build_lrm``: DOLLAR's L_FT reward; ``build_mixed_reward``: paper 004's mixed rewards).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from distill.models import SHAPES_TEACHER_KINDS
from lrm.config import ConfigError, opt
from lrm.io import read_records

SHAPES_TEACHERS = tuple(f"shapes-{kind}" for kind in SHAPES_TEACHER_KINDS)
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
    """``lrm.text.text_encoder_for(spec.text_encoder, spec.text_max_length)``: ``PipelineText`` (tokens + pooled
    vector, as the pipeline encodes them) for a FLUX / SD3 / HunyuanVideo pipeline, else ``TextEncoder``."""
    from lrm.text import text_encoder_for

    return text_encoder_for(spec.text_encoder, max_length=int(getattr(spec, "text_max_length", 32)), device=device)


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
    """The ``Denoiser`` named by ``spec.teacher`` (the one resolver of model names): a Shapes teacher, a
    ``Denoiser.save_pretrained`` directory, a LoRA ``student/`` folder (fused into its base), or a diffusers pipeline
    directory / hub id (``Denoiser.from_diffusers``; its null caption is ``text_encoder([""])``,
    built from ``spec`` when not given)."""
    from distill.denoiser import Denoiser

    if spec.teacher in SHAPES_TEACHERS:
        from distill.models import load_shapes_teacher

        return load_shapes_teacher(spec.teacher[len("shapes-"):], device=device)
    from distill.lora import is_lora_student, load_lora_student

    if is_lora_student(spec.teacher):  # a LoRA student/ folder: its base network (resolved here) + the adapter, fused
        return load_lora_student(spec.teacher, lambda base: build_teacher(
            dataclasses.replace(spec, teacher=base) if dataclasses.is_dataclass(spec)
            else SimpleNamespace(**{**vars(spec), "teacher": base}), device, text_encoder=text_encoder))
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

# ---- data and rewards of the student trainers ------------------------------------------------------------------
def text_identity(spec: Any, text_encoder: Any = None) -> dict:
    """The identity of the text encoder behind the data's caption embeddings: the cache's record with
    ``data_cache``, else ``text_encoder.identity()`` (default: ``build_text_encoder(spec)``)."""
    if getattr(spec, "data_cache", None) is not None:
        from data_cache import LatentCache

        return dict(LatentCache.open(spec.data_cache).text_encoder)
    if text_encoder is None:
        text_encoder = build_text_encoder(spec, torch.device("cpu"))
    return text_encoder.identity()


def _cache_data(spec: Any, vae: Any):
    """``DistillData`` of ``spec.data_cache``, its latent space checked against the VAE's."""
    from data_cache import LatentCache
    from distill.data import DistillData

    vae.latent_space.check_compatible(LatentCache.open(spec.data_cache).latent_space,
                                      f"latents of cache {spec.data_cache}")
    return DistillData.from_cache(spec.data_cache)


def build_data(spec: Any, vae: Any, device: torch.device, video: bool = False, text_encoder: Any = None):
    """``lrm distill``'s data: the LatentCache ``data_cache``, else ``num_data`` encoded Shapes world samples
    (captions encoded by ``text_encoder``, default ``build_text_encoder(spec)``)."""
    from distill.data import DistillData

    if spec.data_cache is not None:
        return _cache_data(spec, vae)
    text_encoder = text_encoder if text_encoder is not None else build_text_encoder(spec, device)
    return DistillData.from_shapes(spec.num_data, vae, text_encoder, num_frames=spec.num_frames if video else None,
                                   seed=spec.data_seed, progress=spec.progress)


def build_prompt_pool(spec: Any, vae: Any, text_encoder: Any, video: bool = False, progress: bool = True):
    """``lrm finetune``'s prompt pool: a data cache (captions, embeddings, latents), a prompt file (encoded by
    ``text_encoder``; no latents) or, for the Shapes teachers, ``num_prompts`` encoded Shapes world samples."""
    from distill.data import DistillData, PromptPool

    if spec.data_cache is not None:
        return PromptPool.from_distill_data(_cache_data(spec, vae))
    if spec.prompt_file is not None:
        prompts = load_prompt_file(spec.prompt_file)
        toks, masks, pooled = [], [], []
        for s in range(0, len(prompts), 256):
            emb = text_encoder(prompts[s:s + 256])
            toks.append(emb.tokens.float().cpu())
            masks.append(emb.mask.cpu())
            if getattr(emb, "pooled", None) is not None:  # PipelineText of FLUX / SD3 / HunyuanVideo
                pooled.append(emb.pooled.float().cpu())
        return PromptPool(torch.cat(toks), torch.cat(masks), prompts,
                          text_pooled=torch.cat(pooled) if pooled else None)
    if teacher_is_diffusers(spec) or spec.vae != "shapes":
        raise ConfigError(f"teacher {spec.teacher!r} / vae {spec.vae!r}: Shapes world prompts fit only the Shapes "
                          "teachers and VAE; set data_cache (a LatentCache from `lrm cache build`) or prompt_file")
    data = DistillData.from_shapes(spec.num_prompts, vae, text_encoder, num_frames=spec.num_frames if video else None,
                                   seed=spec.data_seed, progress=progress)
    return PromptPool.from_distill_data(data)


def load_latent_reward(path: str, vae: Any, text_id: Any, device: torch.device | str):
    """A frozen ``LatentReward`` directory (``lrm train``), checked against the VAE's latent space and, for text
    heads, against ``text_id``: the identity of the captions' text encoder, or a function returning it (called only
    for a text head)."""
    from latent_rewards import LatentReward

    lrm = LatentReward.from_pretrained(path, device=device)
    if lrm.needs_text and callable(text_id):
        text_id = text_id()
    lrm.check_inputs(latent_space=vae.latent_space, text_encoder=text_id if lrm.needs_text else None)
    return lrm


def build_lrm(spec: Any, data: Any, vae: Any, device: torch.device, text_encoder: Any = None):
    """DOLLAR's L_FT reward: a frozen ``LatentReward`` (``load_latent_reward``) or a ``ConcurrentLRM`` (a new head
    fit to ``pixel_reward`` during distillation); ``None`` without use_lrm_ft."""
    if not spec.use_lrm_ft:
        return None
    if spec.lrm_mode == "frozen":
        if spec.lrm_path is None:
            raise ConfigError("use_lrm_ft=true with lrm_mode=frozen needs lrm_path (a LatentReward directory from "
                              "`lrm train`), or set lrm_mode=concurrent")
        return load_latent_reward(spec.lrm_path, vae, lambda: text_identity(spec, text_encoder), device)
    from distill.lrm_ft import ConcurrentLRM
    from latent_rewards import create_lrm
    from reward_adapters import create_reward

    kw = dict(spec.lrm_head_kwargs)
    kw.setdefault("in_channels", int(data.latents.shape[-3]))
    if spec.lrm_head.startswith("text-"):
        kw.setdefault("text_dim", int(data.text_tokens.shape[-1]))
    head = create_lrm(spec.lrm_head, **kw).to(device)
    reward = create_reward(spec.pixel_reward, device=str(device))
    return ConcurrentLRM(head, torch.optim.AdamW(head.parameters(), lr=spec.lr_lrm), reward, vae)


def build_mixed_reward(spec: Any, vae: Any, device: torch.device, text_encoder: Any = None):
    """Paper 004's mixed rewards from ``spatial_rewards`` / ``temporal_reward``: a LatentReward directory gives the
    latent form (``load_latent_reward``), any other name a differentiable pixel reward through the decoder; ``None``
    when both are unset."""
    from distill.reward import LatentRewardTerm, MixedReward, PixelReward

    names = list(spec.spatial_rewards) + ([spec.temporal_reward] if spec.temporal_reward else [])
    if not names:
        return None

    def term(name: str):
        if Path(name).is_dir():
            return LatentRewardTerm(load_latent_reward(name, vae, lambda: text_identity(spec, text_encoder), device))
        from reward_adapters import create_reward

        if vae is None:
            raise ConfigError(f"pixel reward {name!r} needs the VAE to decode; set vae")
        reward = create_reward(name, device=str(device))
        if not getattr(reward, "differentiable", False):
            raise ConfigError(f"reward {name!r} is not differentiable; use a differentiable one (colorfulness, "
                              "sharpness, brightness, ...) or a LatentReward directory")
        return PixelReward(reward, vae, checkpointing=spec.gradient_checkpointing)

    spatial = [term(n) for n in spec.spatial_rewards] + [None, None]
    return MixedReward(spatial[0], spatial[1], term(spec.temporal_reward) if spec.temporal_reward else None,
                       weights=(spec.beta_gan, spec.beta_spatial, spec.beta_temporal))


__all__ = ["ModelSpec", "build_text_encoder", "teacher_is_diffusers", "build_teacher", "build_vae", "load_prompt_file",
           "check_text_identity", "check_text_width", "SHAPES_TEACHERS", "text_identity", "build_data",
           "build_prompt_pool", "load_latent_reward", "build_lrm", "build_mixed_reward"]
