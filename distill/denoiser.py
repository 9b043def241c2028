"""``Denoiser``: a diffusers network + a noise schedule + what the network predicts.

Our latents are ``(B, C, h, w)`` (images) or ``(B, T, C, h, w)`` (videos). How each diffusers network is called
(layout, timestep scaling, pooled text, ids, guidance embedding) lives in a per-family adapter,
``distill.families`` (keyed by class name): ``UNet2DConditionModel``, ``UNet3DConditionModel``,
``SD3Transformer2DModel``, ``FluxTransformer2DModel``, ``WanTransformer3DModel``, ``CogVideoXTransformer3DModel``,
``HunyuanVideoTransformer3DModel``.

Pooled text (SD3, FLUX: CLIP pooled; HunyuanVideo: CLIP-L pooled) is the ``pooled=`` argument of every call; the
null caption's pooled vector is ``cfg_null_pooled`` (``lrm.text.PipelineText`` encodes both).

**Distilled guidance** (FLUX-dev, HunyuanVideo: ``config.guidance_embeds``): the network takes the guidance scale as an
input and runs once. ``Denoiser.distilled_guidance`` is the value used when a call gives none (pipeline defaults 3.5 /
6.0); a CFG call ``guided(..., guidance_scale=s)`` on such a model passes ``s`` as the embedded guidance in ONE
conditional pass (as ``FluxPipeline`` with ``true_cfg_scale=1`` and ``HunyuanVideoPipeline`` do), never the two-pass
Imagen formula; the null caption is then unused.

Classifier-free guidance is pinned to the **Imagen form** ``uncond + s * (cond - uncond)`` with
DOLLAR's ``s`` (3.5 for VSD's real score, 7.5 for CD's teacher). It is applied to the raw network output;
because every parameterisation's x0 and eps are affine in the output with weights that do not depend on
it, this equals the same formula on the eps prediction and on the x0 prediction (tested). ``s = 1`` (or
``None``) is the conditional prediction, ``s = 0`` the unconditional one. (LCM's code writes
``cond + w (cond - uncond)``, i.e. ``w = s - 1``.)

The null caption used for CFG and caption dropout is ``cfg_null = (tokens (1, L0, D), mask (1, L0))``,
e.g. the text encoder's embedding of ``""``; by default a single all-zero token. It is padded with masked
zeros (or truncated) to the caption length at call time.

``use_text_mask=False`` calls the network without the caption padding mask, as the diffusers pipelines call
Stable Diffusion, ModelScope and SD3 (they attend to all ``max_length`` CLIP/T5 hidden states, padding included);
captions and the null caption must then be encoded with that ``max_length`` (SD: 77).
``Denoiser.from_diffusers`` loads such a model from a diffusers repo / directory.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.families import family_for
from distill.parameterization import PARAMETERIZATIONS, to_x0_eps
from lrm.schedules import _as_timesteps


class Denoiser(nn.Module):
    """A diffusion network with an explicit parameterisation and schedule.

    Args:
        model: diffusers ``UNet2DConditionModel`` / ``UNet3DConditionModel`` / flow transformer.
        schedule: ``DDPMSchedule`` or ``FlowSchedule``.
        parameterization: one of ``PARAMETERIZATIONS`` (``"eps"``, ``"v"``, ``"conjugate_v"``, ``"x0"``, ``"flow"``).
        cfg_null: ``(tokens (1, L0, D), mask (1, L0) bool)`` of the null caption; ``None`` = one zero token.
        use_text_mask: pass the caption padding mask to the network (``False``: attend to padding tokens too,
            as diffusers' pipelines do for SD-class models).
        cfg_null_pooled: ``(1, P)`` pooled vector of the null caption (families with pooled text).
        distilled_guidance: embedded guidance value for guidance-distilled models (``None``: the family's
            pipeline default); ignored by models without a guidance embedding.
    """

    def __init__(self, model: nn.Module, schedule: Any, parameterization: str,
                 cfg_null: tuple[torch.Tensor, torch.Tensor] | None = None, use_text_mask: bool = True,
                 cfg_null_pooled: torch.Tensor | None = None, distilled_guidance: float | None = None):
        super().__init__()
        self.use_text_mask = bool(use_text_mask)
        self.family = family_for(model)
        self.flow_shift: float | str | None = None  # the scheduler's sampling shift (from_diffusers), for samplers
        self.distilled_guidance = (None if not self.family.guidance_embedded else
                                   float(distilled_guidance if distilled_guidance is not None
                                         else self.family.default_guidance))
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"unknown parameterization {parameterization!r}; choose one of {PARAMETERIZATIONS}")
        self.model = model
        self.schedule = schedule
        self.parameterization = parameterization
        name = type(model).__name__
        self.is_video = self.family.video
        self.is_transformer = "Transformer" in name
        dim = self.family.text_dim()
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
        pooled = cfg_null_pooled
        if pooled is None and self.family.needs_pooled and self.family.pooled_dim():
            pooled = torch.zeros(1, int(self.family.pooled_dim()))
        if pooled is not None:
            pooled = pooled.reshape(1, -1).float().clone()
        self.register_buffer("null_pooled", pooled, persistent=False)
        self._accepts = set(inspect.signature(model.forward).parameters)

    # ---- network call ----------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def forward(self, x_t: torch.Tensor, t, text_tokens: torch.Tensor, text_mask: torch.Tensor | None = None,
                pooled: torch.Tensor | None = None, guidance: float | torch.Tensor | None = None,
                **model_kwargs: Any) -> torch.Tensor:
        """Raw network output, same shape as ``x_t`` (``(B, C, h, w)`` or ``(B, T, C, h, w)`` for video).

        ``pooled``: ``(B, P)`` pooled text (SD3 / FLUX / HunyuanVideo); ``guidance``: embedded guidance for
        guidance-distilled models (default ``self.distilled_guidance``).
        """
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
        mask = None if (text_mask is None or not self.use_text_mask) else text_mask.to(x_t.device).bool()
        if pooled is not None:
            pooled = pooled.to(x_t.device, dtype)
            if pooled.shape[0] == 1 and B > 1:
                pooled = pooled.expand(B, -1)
        g = None
        if self.family.guidance_embedded:
            g = self.distilled_guidance if guidance is None else guidance
            g = torch.as_tensor(g, dtype=torch.float32, device=x_t.device).reshape(-1).expand(B)
        out = self.family.call(self.model, x_t.to(dtype), t, tokens, mask, pooled, g, **model_kwargs)
        return out.to(x_t.dtype)

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
               null_mask: torch.Tensor | None = None, *, pooled: torch.Tensor | None = None,
               null_pooled: torch.Tensor | None = None) -> torch.Tensor:
        """Raw output with Imagen-form CFG ``uncond + s (cond - uncond)``; one batched call of size 2B.

        Guidance-distilled models (``distilled_guidance`` set): one conditional call with ``s`` as the embedded
        guidance (``None``: ``distilled_guidance``).
        """
        if self.distilled_guidance is not None:
            return self(x_t, t, text_tokens, text_mask, pooled=pooled, guidance=guidance_scale)
        if guidance_scale is None or guidance_scale == 1.0:
            return self(x_t, t, text_tokens, text_mask, pooled=pooled)
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
        pooled2 = None
        if pooled is not None or self.family.needs_pooled:
            if pooled is None:
                pooled = self.family.require_pooled(pooled, self.model)
            if null_pooled is None:
                null_pooled = self.null_pooled
            pooled2 = torch.cat([pooled.to(text_tokens.device), null_pooled.to(pooled.device, pooled.dtype).expand(
                B, -1)])
        out = self(torch.cat([x_t, x_t]), torch.cat([t, t]), tokens, mask, pooled=pooled2)
        cond, uncond = out.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    def x0_eps(self, x_t, t, text_tokens, text_mask=None, guidance_scale=None, null_tokens=None,
               null_mask=None, *, pooled=None, null_pooled=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x0, eps)`` predictions (with CFG when ``guidance_scale`` is given)."""
        out = self.guided(x_t, t, text_tokens, text_mask, guidance_scale, null_tokens, null_mask, pooled=pooled,
                          null_pooled=null_pooled)
        return to_x0_eps(out, x_t, _as_timesteps(t, x_t).to(x_t.device), self.schedule, self.parameterization)

    def x0(self, x_t, t, text_tokens, text_mask=None, guidance_scale=None, null_tokens=None, null_mask=None, *,
           pooled=None, null_pooled=None):
        """Clean-sample prediction (Eq. 15 for conjugate v), with Imagen-form CFG if ``guidance_scale``."""
        return self.x0_eps(x_t, t, text_tokens, text_mask, guidance_scale, null_tokens, null_mask, pooled=pooled,
                           null_pooled=null_pooled)[0]

    def eps(self, x_t, t, text_tokens, text_mask=None, guidance_scale=None, null_tokens=None, null_mask=None, *,
            pooled=None, null_pooled=None):
        """Noise prediction, with Imagen-form CFG if ``guidance_scale``."""
        return self.x0_eps(x_t, t, text_tokens, text_mask, guidance_scale, null_tokens, null_mask, pooled=pooled,
                           null_pooled=null_pooled)[1]

    # ---- sampling (distill/inference.py) ---------------------------------------------------------------
    def sample(self, noise: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor | None = None,
               **kw: Any) -> torch.Tensor:
        """x0 latents from ``noise``: ``distill.inference.sample`` (``sampler="student"`` 4 steps by default,
        ``"ddim"`` with ``steps``, ``"stochastic"``; ``guidance_scale``, ``timesteps``, ``generator``)."""
        from distill.inference import sample

        return sample(self, noise, text_tokens, text_mask, **kw)

    def prepare_for_sampling(self, compile: str = "none", channels_last: bool = False,
                             fuse_qkv: bool = False) -> dict[str, Any]:
        """Freeze the network and make it fast for sampling, in place (``distill.inference.prepare_for_sampling``:
        torch.compile mode, channels_last, fused QKV); returns what was applied."""
        from distill.inference import prepare_for_sampling

        return prepare_for_sampling(self, compile=compile, channels_last=channels_last, fuse_qkv=fuse_qkv)

    # ---- save / load -----------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """What ``denoiser.json`` records next to the diffusers weights."""
        return {"model_class": type(self.model).__name__, "parameterization": self.parameterization,
                "schedule": self.schedule.to_dict(), "cfg": "imagen: uncond + s * (cond - uncond)",
                "video_layout": "(B, T, C, h, w)" if self.is_video else None, "use_text_mask": self.use_text_mask,
                "family": self.family.name, "distilled_guidance": self.distilled_guidance,
                **({"flow_shift": self.flow_shift} if getattr(self, "flow_shift", None) is not None else {}),
                **({"temporal_pos_embed": n} if (n := self._temporal_pos_embed()) else {})}

    def _temporal_pos_embed(self) -> int:
        if not self.is_video:
            return 0
        from distill.models import temporal_pos_embed

        return temporal_pos_embed(self.model)

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
        null = {"tokens": self.null_tokens.cpu().contiguous(), "mask": self.null_mask.cpu().to(torch.uint8)}
        if self.null_pooled is not None:
            null["pooled"] = self.null_pooled.cpu().contiguous()
        save_tensors(directory / "null_text.safetensors", null)

    @classmethod
    def from_pretrained(cls, directory, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> "Denoiser":
        """Load what ``save_pretrained`` wrote (the model class is read from ``denoiser.json``)."""
        from pathlib import Path

        import diffusers

        from lrm.io import load_tensors, read_json
        from lrm.schedules import schedule_from_dict

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
        if meta.get("temporal_pos_embed"):
            from distill.models import add_temporal_pos_embed

            add_temporal_pos_embed(model, int(meta["temporal_pos_embed"]))
        null, null_pooled = None, None
        if (directory / "null_text.safetensors").exists():
            t = load_tensors(directory / "null_text.safetensors")
            null, null_pooled = (t["tokens"], t["mask"].bool()), t.get("pooled")
        den = cls(model, schedule_from_dict(meta["schedule"]), meta["parameterization"], cfg_null=null,
                  use_text_mask=meta.get("use_text_mask", True), cfg_null_pooled=null_pooled,
                  distilled_guidance=meta.get("distilled_guidance"))
        den.flow_shift = meta.get("flow_shift")
        return den.to(device)

    @classmethod
    def from_diffusers(cls, path_or_id: str | os.PathLike, subfolder: str | None = "unet",
                       scheduler_subfolder: str | None = "scheduler", text_encoder: Any = None,
                       parameterization: str | None = None, schedule: Any = None, use_text_mask: bool | None = None,
                       distilled_guidance: float | None = None, cache_dir: str | None = None,
                       revision: str | None = None,
                       device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> "Denoiser":
        """A Denoiser from a diffusers pipeline repo / directory (``runwayml/stable-diffusion-v1-5``,
        ``ali-vilab/text-to-video-ms-1.7b``, a ``save_pretrained`` directory, ...).

        1. The network: ``<subfolder>/config.json`` names the class (any of ``SUPPORTED_DIFFUSERS_MODELS``;
           ``subfolder="transformer"`` for SD3 / FLUX / Wan / CogVideoX / HunyuanVideo hub ids; a local pipeline
           directory without ``unet/`` but with ``transformer/`` is read from there).
        2. The schedule and parameterisation from ``<scheduler_subfolder>/scheduler_config.json``
           (``lrm.schedules.schedule_from_scheduler_config``): a DDPM-family scheduler gives
           ``DDPMSchedule.from_diffusers`` and ``prediction_type`` epsilon -> ``"eps"``, v_prediction -> ``"v"``
           (CogVideoX), sample -> ``"x0"``; a flow-matching scheduler (FLUX, SD3, HunyuanVideo; Wan's UniPC with flow
           sigmas) gives ``FlowSchedule`` and ``"flow"``, its shift kept in ``denoiser.flow_shift`` for samplers.
           ``schedule=`` / ``parameterization=`` override what the config says (both given: it is not read).
        3. The null caption for CFG: ``text_encoder([""])`` (an ``lrm.text.TextEncoder`` / ``PipelineText`` or any
           callable returning ``.tokens (1, L, D)`` / ``.mask (1, L)`` and, for pooled families, ``.pooled``); its
           width must equal the network's text width. ``None``: one zero token (not what the model was trained with).
        4. ``use_text_mask=None``: the family's pipeline behaviour (SD / SD3 / FLUX / CogVideoX: the network sees all
           caption tokens, padding included -- encode captions with the null caption's length; Wan: padding zeroed;
           HunyuanVideo: the mask is passed).
        5. ``distilled_guidance``: the embedded guidance of FLUX-dev / HunyuanVideo (``None``: pipeline default).

        ``cache_dir`` defaults to ``$LRM_CACHE_DIR`` (else the hub's cache). Offline, a model that is neither a
        local directory nor in the cache raises ``OSError`` naming the file looked for and how to provide it.
        """
        import diffusers

        from lrm.schedules import schedule_from_scheduler_config

        cache_dir = cache_dir or os.environ.get("LRM_CACHE_DIR")
        src = str(path_or_id)
        kw = dict(cache_dir=cache_dir, revision=revision)

        def where(sub: str | None, filename: str) -> str:
            rel = f"{sub}/{filename}" if sub else filename
            if Path(src).is_dir():
                return f"{Path(src) / rel} (local directory)"
            if Path(src).is_absolute() or src.startswith((".", "~")):
                return f"{Path(src) / rel} (no such local directory)"
            return (f"{rel} of hub repo {src!r} (cache_dir={cache_dir or 'the hub default'}, "
                    f"HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')})")

        def not_found(sub: str | None, filename: str, err: Exception) -> OSError:
            return OSError(
                f"Could not load the diffusers {'model' if filename == 'config.json' else 'scheduler'} of "
                f"{src!r}: looked for {where(sub, filename)}: {err}\n"
                "Offline? On a connected machine run `huggingface-cli download REPO --local-dir DIR` (or "
                "pipeline.save_pretrained(DIR)) and pass DIR, or set LRM_CACHE_DIR to a hub cache that holds the "
                "repo. For a bare model directory pass subfolder=None (and schedule= / parameterization=).")

        # 1. network class + weights
        here = Path(src)
        if here.is_dir() and subfolder in (None, "unet") and not (here / str(subfolder) / "config.json").is_file() \
                and (here / "transformer" / "config.json").is_file():
            subfolder = "transformer"  # a transformer pipeline (SD3, FLUX, Wan, CogVideoX, HunyuanVideo)
        try:
            model_cfg = diffusers.UNet2DConditionModel.load_config(  # reads config.json of any model
                src, subfolder=subfolder, **kw)
        except (OSError, ValueError) as e:
            raise not_found(subfolder, "config.json", e) from None
        name = model_cfg.get("_class_name")
        if name not in SUPPORTED_DIFFUSERS_MODELS:
            raise ValueError(f"{where(subfolder, 'config.json')} describes {name!r}; Denoiser.from_diffusers "
                             f"supports {list(SUPPORTED_DIFFUSERS_MODELS)} (pass subfolder='transformer' for "
                             "transformer families)")
        model_cls = getattr(diffusers, name)
        try:
            model = model_cls.from_pretrained(src, subfolder=subfolder, torch_dtype=dtype, **kw)
        except OSError as e:
            raise not_found(subfolder, "diffusion_pytorch_model.safetensors", e) from None

        # 2. schedule + parameterisation
        flow_shift = None
        if schedule is None or parameterization is None:
            try:
                sch_cfg = diffusers.DDPMScheduler.load_config(  # reads scheduler_config.json of any scheduler
                    src, subfolder=scheduler_subfolder, **kw)
            except (OSError, ValueError) as e:
                raise not_found(scheduler_subfolder, "scheduler_config.json", e) from None
            sch, par, flow_shift = schedule_from_scheduler_config(sch_cfg)
            schedule = sch if schedule is None else schedule
            parameterization = par if parameterization is None else parameterization

        # 3. null caption
        null, null_pooled = None, None
        family = family_for(model)
        if text_encoder is not None:
            emb = text_encoder([""])
            tokens, mask = emb.tokens[:1].detach().float().cpu(), emb.mask[:1].bool().cpu()
            if getattr(emb, "pooled", None) is not None:
                null_pooled = emb.pooled[:1].detach().float().cpu()
            dim = family.text_dim()
            if dim is not None and int(dim) != tokens.shape[-1]:
                raise ValueError(f"the text encoder {getattr(text_encoder, 'name', type(text_encoder).__name__)!r} "
                                 f"gives {tokens.shape[-1]}-d tokens but {name} of {src!r} takes {dim}-d "
                                 "encoder_hidden_states; use the pipeline's own text encoder")
            null = (tokens, mask)
            pdim = family.pooled_dim()
            if pdim is not None and null_pooled is not None and null_pooled.shape[-1] != int(pdim):
                raise ValueError(f"the text encoder's pooled vector is {null_pooled.shape[-1]}-d but {name} takes "
                                 f"{pdim}-d pooled_projections; use the pipeline's own encoders (PipelineText)")
        if use_text_mask is None:
            use_text_mask = family.use_text_mask
        den = cls(model.to(device), schedule, parameterization, cfg_null=null, use_text_mask=use_text_mask,
                  cfg_null_pooled=null_pooled, distilled_guidance=distilled_guidance)
        den.flow_shift = flow_shift
        return den.to(device)


# Models whose forward the Denoiser knows how to call (adapters in ``distill.families``).
SUPPORTED_DIFFUSERS_MODELS = ("UNet2DConditionModel", "UNet3DConditionModel", "SD3Transformer2DModel",
                              "FluxTransformer2DModel", "WanTransformer3DModel", "CogVideoXTransformer3DModel",
                              "HunyuanVideoTransformer3DModel")
# diffusers ``prediction_type`` -> our parameterisation.
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def is_diffusers_dir(path: str | os.PathLike) -> bool:
    """A diffusers pipeline directory (``model_index.json``) or one with ``unet/`` / ``transformer/`` configs."""
    p = Path(path)
    return p.is_dir() and any((p / f).is_file() for f in ("model_index.json", "unet/config.json",
                                                           "transformer/config.json"))
