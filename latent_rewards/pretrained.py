"""``LatentReward``: a trained head + what it imitates, in the original reward's units; save/load as a directory.

A directory holds ``config.json`` (the architecture: ``create_lrm`` name + kwargs), ``model.safetensors`` and
``metadata.json`` (reward name/version/modality, latent space, text encoder, target normalisation, training
data summary, metrics, noise schedule for noise-aware heads).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from latent_rewards.heads.base import EnsembleLRM, LRMInputError, member_outputs
from latent_rewards.registry import create_lrm_from_config
from lrm.io import load_tensors, read_json, save_tensors, write_json
from lrm.latent_space import LatentSpace, LatentSpaceMismatchError
from lrm.text import identity_diffs

FORMAT_VERSION = 1


class TextEncoderMismatchError(ValueError):
    """Text embeddings come from another text encoder than the one an LRM was trained with."""


def _check_text_encoder(expected: dict | None, given: dict | None, what: str = "these text embeddings") -> None:
    if expected is None or given is None:
        return
    diffs = identity_diffs(expected, given)
    if diffs:
        raise TextEncoderMismatchError(
            f"{what} come from text encoder {given.get('name')!r}, but this LRM was trained on "
            f"{expected.get('name')!r} ({'; '.join(diffs)}). Encode the prompts with "
            f"lrm.text.TextEncoder({expected.get('name')!r}, max_length={expected.get('max_length')}), "
            "or use an LRM trained for this encoder.")


class LatentReward(nn.Module):
    """Differentiable latent-space reward: ``lrm(latents, text_tokens=None, text_mask=None, t=None) -> (B,)`` in
    the original reward's units. Video heads run all frames of the batch through their trunk at once.

    ``text_tokens`` may also be an ``lrm.text.TextEmbedding`` (its ``.tokens`` / ``.mask`` are used).
    ``t`` (noise-aware heads only): diffusion timesteps of noisy latents x_t; ``None`` = clean latents.
    Ensembles return ``reduce`` of their members: "mean", "std" or "lcb" (mean - lam * std), in reward units.

    Every call checks its inputs and raises a one-line error naming the problem and the fix instead of returning a
    score (``LatentSpaceMismatchError``, ``TextEncoderMismatchError``, ``LRMInputError``):

    - latents: the latent space's channel count, and a spatial size (frame count for 3D heads) that the head's patch
      divides; otherwise the patch conv would silently drop the last rows / columns. A size the head takes but was
      not trained on (``metadata["training_data"]["latent_shape"]``) is scored with a warning, once per size: the
      conv + mean-pool head is defined at any multiple of its patch and the real path may score at another
      resolution, but the LRM's accuracy was measured at the trained size only.
    - text: ``(B, L, D)`` token embeddings of the trained width D and length L (the text encoder's ``max_length``:
      another length is another truncation / padding of the prompts than the LRM learned from).
    - values (``check_finite``, default on): NaN / inf in the latents or text, or a text mask without a real token,
      raise instead of giving a NaN "score". The shape checks read shapes only (no device sync); the value check is
      one fused reduction and ONE host sync per call on CUDA (noise next to an LRM forward; the distill trainers
      sync every step anyway). A loop that guards its own loss can set ``lrm.check_finite = False``; calls traced by
      ``torch.compile`` skip it.
    """

    def __init__(self, model: nn.Module, metadata: dict[str, Any], check_finite: bool = True):
        super().__init__()
        self.model = model
        self.metadata = dict(metadata)
        self.check_finite = bool(check_finite)
        td = self.metadata.get("training_data") or {}
        self._trained_shape = tuple(int(v) for v in td["latent_shape"]) if td.get("latent_shape") else None
        self._warned_sizes: set[tuple[int, ...]] = set()
        target = self.metadata.get("target_normalization", {"mean": 0.0, "std": 1.0})
        self.register_buffer("target_mean", torch.tensor(float(target["mean"])), persistent=False)
        self.register_buffer("target_std", torch.tensor(float(target["std"])), persistent=False)
        ls = self.metadata.get("latent_space")
        self._latent_space = LatentSpace.from_dict(ls) if ls else None

    # ---- identity --------------------------------------------------------------------------------------
    @property
    def reward_name(self) -> str:
        return self.metadata.get("reward", {}).get("name", "reward")

    @property
    def reward_version(self) -> str | None:
        return self.metadata.get("reward", {}).get("version")

    @property
    def modality(self) -> str:
        return self.metadata.get("reward", {}).get("modality") or getattr(self.model, "modality", "image")

    @property
    def latent_space(self) -> LatentSpace | None:
        return self._latent_space

    @property
    def text_encoder(self) -> dict | None:
        return self.metadata.get("text_encoder")

    @property
    def needs_text(self) -> bool:
        return getattr(self.model, "text_dim", None) is not None

    @property
    def timestep_cond(self) -> bool:
        return bool(getattr(self.model, "timestep_cond", False))

    @property
    def text_length(self) -> int | None:
        """Tokens per prompt the LRM was trained on (recorded by ``fit``; else the text encoder's ``max_length``)."""
        td = self.metadata.get("training_data") or {}
        n = td.get("text_length") or (self.text_encoder or {}).get("max_length")
        return int(n) if n else None

    @property
    def noise_schedule(self):
        """The ``DDPMSchedule`` a noise-aware LRM was trained on (``None`` for clean-latent LRMs)."""
        from lrm.schedules import DDPMSchedule

        ns = self.metadata.get("noise_schedule")
        return None if not ns else DDPMSchedule(alphas_cumprod=torch.tensor(ns["alphas_cumprod"]))

    def check_inputs(self, latent_space: LatentSpace | dict | None = None, text_encoder: Any = None) -> None:
        """Refuse latents from another latent space / embeddings from another text encoder (clear error).

        ``text_encoder``: a ``TextEncoder`` or its ``identity()`` dict.
        """
        if latent_space is not None and self._latent_space is not None:
            if isinstance(latent_space, dict):
                latent_space = LatentSpace.from_dict(latent_space)
            self._latent_space.check_compatible(latent_space, what="the latents given to this LRM")
        if text_encoder is not None:
            if hasattr(text_encoder, "identity"):
                text_encoder = text_encoder.identity()
            if not self.needs_text:
                raise TextEncoderMismatchError(f"LRM for {self.reward_name!r} takes no text, but a text encoder "
                                               "was given")
            _check_text_encoder(self.text_encoder, text_encoder)

    # ---- inference -------------------------------------------------------------------------------------
    @staticmethod
    def _size(shape: tuple[int, ...]) -> str:
        """One sample's ([T,] C, H, W) -> 'HxW' or 'T frames of HxW'."""
        hw = f"{shape[-2]}x{shape[-1]}"
        return hw if len(shape) < 4 else f"{shape[-4]} frames of {hw}"

    def _check_call(self, latents: torch.Tensor, text_tokens, text_mask=None) -> None:
        who = f"LRM for {self.reward_name!r}"
        if self._latent_space is not None:
            try:
                self._latent_space.check_latents(latents)
            except LatentSpaceMismatchError as e:
                raise LatentSpaceMismatchError(f"{who}: {e}") from None
        # 1. size: refused where the head's patch does not divide it, warned about where it was not trained on
        check = getattr(self.model, "check_latents", None)
        if check is not None:
            try:
                check(tuple(latents.shape))
            except LRMInputError as e:
                trained = f" (trained on {self._size(self._trained_shape)} latents)" if self._trained_shape else ""
                raise LRMInputError(f"{who}{trained}: {e}") from None
        size = tuple(latents.shape[1:-3]) + tuple(latents.shape[-2:])  # ([T,] H, W)
        trained = None if self._trained_shape is None else self._trained_shape[:-3] + self._trained_shape[-2:]
        if trained is not None and size != trained and size not in self._warned_sizes:
            self._warned_sizes.add(size)
            warnings.warn(f"{who} was trained on {self._size(self._trained_shape)} latents and is given "
                          f"{self._size(tuple(latents.shape[1:]))}: its head runs at this size, but its accuracy was "
                          "measured at the trained size only", UserWarning, stacklevel=4)
        # 2. text: presence, (B, L, D) form, width and length
        if self.needs_text and text_tokens is None:
            raise LRMInputError(f"{who} is text-conditioned ({self.modality}); pass text_tokens "
                                f"(B, L, {self.model.text_dim}) and text_mask from {self.text_encoder}")
        if not self.needs_text and text_tokens is not None:
            raise LRMInputError(f"{who} ({self.modality}) takes no text; drop text_tokens")
        if text_tokens is not None:
            if text_tokens.dim() != 3:
                raise LRMInputError(f"{who} takes text_tokens (B, L, D) token embeddings (lrm.text.TextEncoder "
                                    f"output .tokens), got shape {tuple(text_tokens.shape)}")
            if text_tokens.shape[-1] != self.model.text_dim:
                raise TextEncoderMismatchError(
                    f"text embeddings have width {text_tokens.shape[-1]}, but this LRM expects {self.model.text_dim} "
                    f"from text encoder {self.text_encoder}. Encode prompts with that encoder.")
            n = self.text_length
            if n is not None and text_tokens.shape[1] != n:
                name = (self.text_encoder or {}).get("name")
                raise TextEncoderMismatchError(
                    f"text embeddings have {text_tokens.shape[1]} tokens per prompt, but {who} was trained on "
                    f"{n}-token embeddings (text encoder {name!r}, max_length={n}). Encode the prompts with "
                    f"lrm.text.TextEncoder({name!r}, max_length={n}), or use an LRM trained on "
                    f"{text_tokens.shape[1]}-token embeddings")
        # 3. values: one fused reduction, one host sync (see the class docstring)
        if self.check_finite and not torch.compiler.is_compiling():
            ok = torch.isfinite(latents).all()
            if text_tokens is not None:
                ok = ok & torch.isfinite(text_tokens).all()
                if text_mask is not None:
                    ok = ok & text_mask.bool().any(-1).all()
            if not bool(ok):
                raise LRMInputError(f"{who}: {self._non_finite_report(latents, text_tokens, text_mask)}")

    @staticmethod
    def _non_finite_report(latents, text_tokens, text_mask) -> str:
        """What is non-finite, by sample (error path only)."""
        def rows(bad: torch.Tensor) -> str:
            idx = bad.nonzero().flatten().tolist()
            return f"{len(idx)} of {bad.numel()} samples (rows {idx[:8]}{' ...' if len(idx) > 8 else ''})"

        parts = []
        bad = ~torch.isfinite(latents.detach()).flatten(1).all(1)
        if bad.any():
            parts.append(f"the latents of {rows(bad)} hold NaN or inf")
        if text_tokens is not None:
            bad = ~torch.isfinite(text_tokens.detach()).flatten(1).all(1)
            if bad.any():
                parts.append(f"the text embeddings of {rows(bad)} hold NaN or inf")
        if text_tokens is not None and text_mask is not None:
            bad = ~text_mask.bool().any(-1)
            if bad.any():
                parts.append(f"the text_mask of {rows(bad)} has no real token")
        return ("; ".join(parts) + ". Their reward would be NaN, not a score: find where the values come from (a "
                "diverged sampler, a failed VAE or text encode) or drop those samples (check_finite=False skips "
                "this check)")

    def members(self, latents: torch.Tensor, text_tokens=None, text_mask=None, t=None) -> torch.Tensor:
        """(K, B) member rewards in original units (K = 1 without an ensemble)."""
        if text_tokens is not None and hasattr(text_tokens, "tokens"):
            text_tokens, text_mask = text_tokens.tokens, text_tokens.mask
        self._check_call(latents, text_tokens, text_mask)
        if t is not None and not self.timestep_cond:
            raise LRMInputError(f"LRM for {self.reward_name!r} is not noise-aware (timestep_cond=False); do not pass t")
        dev = self.target_mean.device
        dtype = latents.dtype
        if not torch.is_autocast_enabled(dev.type):  # fp32 head + bf16 latents (or the reverse) outside autocast
            dtype = next(self.model.parameters()).dtype
        latents = latents.to(dev, dtype)  # differentiable cast
        if text_tokens is not None:
            text_tokens = text_tokens.to(dev, latents.dtype)
            text_mask = None if text_mask is None else text_mask.to(dev)
        out = member_outputs(self.model, latents, text_tokens, text_mask, t)  # (K, B) standardised
        return out.float() * self.target_std + self.target_mean

    def forward(self, latents: torch.Tensor, text_tokens=None, text_mask=None, t=None) -> torch.Tensor:
        m = self.members(latents, text_tokens, text_mask, t)
        if isinstance(self.model, EnsembleLRM):
            return EnsembleLRM.aggregate(m, self.model.reduce, self.model.lam)
        return m[0]

    @torch.no_grad()
    def predict(self, latents: torch.Tensor, text_tokens=None, text_mask=None, batch_size: int = 1024,
                t=None) -> torch.Tensor:
        """No-grad batched prediction (B,) on CPU, in eval mode."""
        was = self.training
        self.eval()
        outs = []
        for i in range(0, latents.shape[0], batch_size):
            sl = slice(i, i + batch_size)
            outs.append(self(latents[sl], None if text_tokens is None else text_tokens[sl],
                             None if text_mask is None else text_mask[sl], t).float().cpu())
        self.train(was)
        return torch.cat(outs)

    # ---- persistence ------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        cfg = getattr(self.model, "lrm_config", None)
        if cfg is None:
            raise ValueError("this model was not built by create_lrm (no lrm_config); build it with create_lrm")
        write_json(directory / "config.json", {"format_version": FORMAT_VERSION, **cfg})
        sd = self.model.state_dict()
        save_tensors(directory / "model.safetensors", {k: v.float() if v.is_floating_point() else v
                                                       for k, v in sd.items()},
                     metadata={"reward": self.reward_name})
        write_json(directory / "metadata.json", self.metadata)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu",
                        check_finite: bool = True) -> "LatentReward":
        """Load an LRM directory onto ``device``; ``check_finite``: see the class docstring."""
        directory = Path(directory)
        for f in ("config.json", "model.safetensors", "metadata.json"):
            if not (directory / f).exists():
                raise FileNotFoundError(f"{directory / f} is missing: an LRM directory holds config.json, "
                                        "model.safetensors and metadata.json (written by save_pretrained / lrm train)")
        cfg = read_json(directory / "config.json")
        if cfg.get("format_version", 1) > FORMAT_VERSION:
            raise ValueError(f"{directory} was written by a newer toolkit (format {cfg['format_version']}); upgrade")
        model = create_lrm_from_config(cfg)
        missing, unexpected = model.load_state_dict(load_tensors(directory / "model.safetensors"), strict=False)
        if missing or unexpected:
            raise ValueError(f"{directory / 'model.safetensors'} does not fit config.json "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
        lrm = cls(model.eval(), read_json(directory / "metadata.json"), check_finite=check_finite)
        return lrm.to(device)
