"""``Denoiser``: a diffusers network + a noise schedule + what the network predicts.

The wrapped model may be a ``UNet2DConditionModel`` (images, latents ``(B, C, h, w)``), a
``UNet3DConditionModel`` (videos: our latents are ``(B, T, C, h, w)``; diffusers wants
``(B, C, T, h, w)``, converted here), or a diffusers flow transformer that takes
``hidden_states / encoder_hidden_states / timestep`` (e.g. ``SD3Transformer2DModel``).

Classifier-free guidance is pinned to the **Imagen form** ``uncond + s * (cond - uncond)`` with
DOLLAR's ``s`` (3.5 for VSD's real score, 7.5 for CD's teacher). It is applied to the raw network output;
because every parameterisation's x0 and eps are affine in the output with weights that do not depend on
it, this equals the same formula on the eps prediction and on the x0 prediction (tested). ``s = 1`` (or
``None``) is the conditional prediction, ``s = 0`` the unconditional one. (LCM's code writes
``cond + w (cond - uncond)``, i.e. ``w = s - 1``.)

The null caption used for CFG and caption dropout is ``cfg_null = (tokens (1, L0, D), mask (1, L0))``,
e.g. the text encoder's embedding of ``""``; by default a single all-zero token. It is padded with masked
zeros (or truncated) to the caption length at call time.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from distill.parameterization import PARAMETERIZATIONS, to_x0_eps
from distill.schedules import _as_timesteps


class Denoiser(nn.Module):
    """A diffusion network with an explicit parameterisation and schedule.

    Args:
        model: diffusers ``UNet2DConditionModel`` / ``UNet3DConditionModel`` / flow transformer.
        schedule: ``DDPMSchedule`` or ``FlowSchedule``.
        parameterization: one of ``PARAMETERIZATIONS`` (``"eps"``, ``"v"``, ``"conjugate_v"``, ``"x0"``, ``"flow"``).
        cfg_null: ``(tokens (1, L0, D), mask (1, L0) bool)`` of the null caption; ``None`` = one zero token.
    """

    def __init__(self, model: nn.Module, schedule: Any, parameterization: str,
                 cfg_null: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"unknown parameterization {parameterization!r}; choose one of {PARAMETERIZATIONS}")
        self.model = model
        self.schedule = schedule
        self.parameterization = parameterization
        name = type(model).__name__
        self.is_video = "3D" in name
        self.is_transformer = "Transformer" in name
        cfg = getattr(model, "config", None)
        dim = getattr(cfg, "cross_attention_dim", None) or getattr(cfg, "joint_attention_dim", None)
        if cfg_null is None:
            if dim is None:
                raise ValueError(f"cannot infer the text width of {name}; pass cfg_null=(tokens, mask)")
            tokens, mask = torch.zeros(1, 1, int(dim)), torch.ones(1, 1, dtype=torch.bool)
        else:
            tokens, mask = cfg_null
            if tokens.dim() == 2:
                tokens, mask = tokens[None], mask[None]
            if tokens.dim() != 3 or mask.shape != tokens.shape[:2]:
                raise ValueError(f"cfg_null must be (tokens (1, L, D), mask (1, L)), got {tuple(tokens.shape)} "
                                 f"and {tuple(mask.shape)}")
        self.register_buffer("null_tokens", tokens[:1].float().clone(), persistent=False)
        self.register_buffer("null_mask", mask[:1].bool().clone(), persistent=False)
        self._accepts = set(inspect.signature(model.forward).parameters)

    # ---- network call ----------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def forward(self, x_t: torch.Tensor, t, text_tokens: torch.Tensor, text_mask: torch.Tensor | None = None,
                **model_kwargs: Any) -> torch.Tensor:
        """Raw network output, same shape as ``x_t`` (``(B, C, h, w)`` or ``(B, T, C, h, w)`` for video)."""
        want = 5 if self.is_video else 4
        if x_t.dim() != want:
            layout = "(B, T, C, h, w)" if self.is_video else "(B, C, h, w)"
            raise ValueError(f"{type(self.model).__name__} takes {layout} latents, got shape {tuple(x_t.shape)}")
        B = x_t.shape[0]
        if text_tokens.shape[0] != B:
            raise ValueError(f"text_tokens batch {text_tokens.shape[0]} != latents batch {B}")
        t = _as_timesteps(t, x_t).to(x_t.device)
        dtype = self.dtype
        tokens = text_tokens.to(x_t.device, dtype)
        mask = None if text_mask is None else text_mask.to(x_t.device).bool()
        if self.is_video:
            # UNet3DConditionModel has no encoder mask: zero the padding tokens (keys/values without bias -> 0).
            if mask is not None:
                tokens = tokens * mask.unsqueeze(-1).to(dtype)
            sample = x_t.to(dtype).permute(0, 2, 1, 3, 4)  # (B, C, T, h, w)
            out = self.model(sample, t, encoder_hidden_states=tokens, **model_kwargs).sample
            return out.permute(0, 2, 1, 3, 4).to(x_t.dtype)  # (B, T, C, h, w)
        if self.is_transformer:
            kw = dict(hidden_states=x_t.to(dtype), encoder_hidden_states=tokens, timestep=t)
            if "pooled_projections" in self._accepts and "pooled_projections" not in model_kwargs:
                pdim = self.model.config.pooled_projection_dim
                m = torch.ones(tokens.shape[:2], device=tokens.device, dtype=dtype) if mask is None else mask.to(dtype)
                pooled = (tokens * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp_min(1)
                if pooled.shape[-1] != pdim:
                    raise ValueError(f"{type(self.model).__name__} wants pooled_projections of width {pdim}; the "
                                     f"masked token mean has width {pooled.shape[-1]}. Pass pooled_projections=...")
                kw["pooled_projections"] = pooled
            return self.model(**kw, **model_kwargs).sample.to(x_t.dtype)
        kw = {"encoder_attention_mask": mask} if mask is not None else {}
        return self.model(x_t.to(dtype), t, encoder_hidden_states=tokens, **kw, **model_kwargs).sample.to(x_t.dtype)

    # ---- null caption and CFG --------------------------------------------------------------------------
    def null_text(self, batch: int, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The null caption repeated ``batch`` times, padded with masked zeros / cut to ``length`` tokens."""
        tok, mask = self.null_tokens, self.null_mask
        L0 = tok.shape[1]
        if length is not None and length != L0:
            if length > L0:
                tok = torch.cat([tok, tok.new_zeros(1, length - L0, tok.shape[2])], 1)
                mask = torch.cat([mask, mask.new_zeros(1, length - L0)], 1)
            else:
                tok, mask = tok[:, :length], mask[:, :length]
        return tok.expand(batch, -1, -1), mask.expand(batch, -1)

    def guided(self, x_t: torch.Tensor, t, text_tokens: torch.Tensor, text_mask: torch.Tensor | None = None,
               guidance_scale: float | None = None, null_tokens: torch.Tensor | None = None,
               null_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Raw output with Imagen-form CFG ``uncond + s (cond - uncond)``; one batched call of size 2B."""
        if guidance_scale is None or guidance_scale == 1.0:
            return self(x_t, t, text_tokens, text_mask)
        B, L = text_tokens.shape[:2]
        if null_tokens is None:
            null_tokens, null_mask = self.null_text(B, L)
        elif null_tokens.shape[0] == 1 and B > 1:
            null_tokens = null_tokens.expand(B, -1, -1)
            null_mask = None if null_mask is None else null_mask.expand(B, -1)
        if null_tokens.shape[1] != L:
            raise ValueError(f"null_tokens have {null_tokens.shape[1]} tokens but the captions have {L}")
        if text_mask is None:
            text_mask = torch.ones(B, L, dtype=torch.bool, device=text_tokens.device)
        if null_mask is None:
            null_mask = torch.ones(B, L, dtype=torch.bool, device=text_tokens.device)
        t = _as_timesteps(t, x_t)
        tokens = torch.cat([text_tokens, null_tokens.to(text_tokens.device, text_tokens.dtype)])
        mask = torch.cat([text_mask.bool(), null_mask.to(text_mask.device).bool()])
        out = self(torch.cat([x_t, x_t]), torch.cat([t, t]), tokens, mask)
        cond, uncond = out.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    def x0_eps(self, x_t, t, text_tokens, text_mask=None, guidance_scale=None, null_tokens=None,
               null_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x0, eps)`` predictions (with CFG when ``guidance_scale`` is given)."""
        out = self.guided(x_t, t, text_tokens, text_mask, guidance_scale, null_tokens, null_mask)
        return to_x0_eps(out, x_t, _as_timesteps(t, x_t).to(x_t.device), self.schedule, self.parameterization)

    def x0(self, x_t, t, text_tokens, text_mask=None, guidance_scale=None, null_tokens=None, null_mask=None):
        """Clean-sample prediction (Eq. 15 for conjugate v), with Imagen-form CFG if ``guidance_scale``."""
        return self.x0_eps(x_t, t, text_tokens, text_mask, guidance_scale, null_tokens, null_mask)[0]

    def eps(self, x_t, t, text_tokens, text_mask=None, guidance_scale=None, null_tokens=None, null_mask=None):
        """Noise prediction, with Imagen-form CFG if ``guidance_scale``."""
        return self.x0_eps(x_t, t, text_tokens, text_mask, guidance_scale, null_tokens, null_mask)[1]

    # ---- save / load -----------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """What ``denoiser.json`` records next to the diffusers weights."""
        return {"model_class": type(self.model).__name__, "parameterization": self.parameterization,
                "schedule": self.schedule.to_dict(), "cfg": "imagen: uncond + s * (cond - uncond)",
                "video_layout": "(B, T, C, h, w)" if self.is_video else None}

    def save_pretrained(self, directory, fp16: bool = False) -> None:
        """diffusers ``save_pretrained`` (safetensors) + ``denoiser.json`` + ``null_text.safetensors``."""
        import copy
        from pathlib import Path

        from lrm.io import save_tensors, write_json

        directory = Path(directory)
        model = copy.deepcopy(self.model).to("cpu")
        if fp16:
            model = model.half()
        model.save_pretrained(directory, safe_serialization=True)
        write_json(directory / "denoiser.json", self.describe())
        save_tensors(directory / "null_text.safetensors",
                     {"tokens": self.null_tokens.cpu().contiguous(), "mask": self.null_mask.cpu().to(torch.uint8)})

    @classmethod
    def from_pretrained(cls, directory, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> "Denoiser":
        """Load what ``save_pretrained`` wrote (the model class is read from ``denoiser.json``)."""
        from pathlib import Path

        import diffusers

        from distill.schedules import schedule_from_dict
        from lrm.io import load_tensors, read_json

        directory = Path(directory)
        meta_path = directory / "denoiser.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{meta_path} is missing: not a Denoiser directory (expected denoiser.json, "
                                    "config.json and diffusion_pytorch_model.safetensors, from save_pretrained)")
        meta = read_json(meta_path)
        model_cls = getattr(diffusers, meta["model_class"], None)
        if model_cls is None:
            raise ValueError(f"diffusers has no model class {meta['model_class']!r} (from {meta_path})")
        model = model_cls.from_pretrained(str(directory), torch_dtype=dtype).to(device)
        null = None
        if (directory / "null_text.safetensors").exists():
            t = load_tensors(directory / "null_text.safetensors")
            null = (t["tokens"], t["mask"].bool())
        return cls(model, schedule_from_dict(meta["schedule"]), meta["parameterization"], cfg_null=null).to(device)
