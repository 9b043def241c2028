"""Sampling a ``Denoiser`` (teacher or student) fast: ``prepare_for_sampling`` and ``sample`` (issue 21).

``sample`` is the one call that samples a ``Denoiser`` from noise with any of the toolkit's samplers (``lrm eval``'s
generators, ``Denoiser.sample`` and ``bench/sampling_speed.py`` go through it):

  student     the k-step consistency sampler (``distill.samplers.student_sample``: predict x0, re-noise to the next
              timestep; DOLLAR's 999, 749, 499, 249 by default)
  ddim        deterministic DDIM (``distill.samplers.ddim_sample``, trailing spacing, ``steps``)
  stochastic  the DDIM(eta) posterior chain of DDPO (``distill.samplers.stochastic_sample``)

CFG (``guidance_scale``) is batched: conditional and null caption in ONE network call of 2B (``Denoiser.guided``).

``prepare_for_sampling`` makes the network fast for inference with the ecosystem's tools (no hand-written kernels),
in place, on a network that is no longer trained:

  attention      diffusers' default processors call SDPA (``F.scaled_dot_product_attention``: flash / memory-efficient
                 kernels); the processors in use are reported
  channels_last  2-D convolution networks (UNet2D) in NHWC memory format (cuDNN's faster bf16/fp16 kernels); networks
                 with 5-D weights (video UNets) and transformers are left as they are
  fuse_qkv       diffusers' ``fuse_qkv_projections()``: one matmul for q, k, v (needs a merged / full network, not LoRA
                 adapters)
  compile        ``torch.compile(mode)``: ``reduce-overhead`` adds CUDA graphs (one graph per input shape: removes the
                 kernel-launch overhead that dominates small batches), ``max-autotune(-no-cudagraphs)`` also autotunes
                 the matmuls and convolutions; compilation happens on the first calls of each new shape

The VAE side of the fast path: ``lrm.latent_space.VAE``'s bf16 decode (``vae_bf16``) in chunks (slices / tiles for
large frames), and ``prepare_vae_for_sampling`` (channels_last, a compiled decoder).
Outputs stay equal to eager ones within bf16 tolerance (``bench/sampling_speed.py`` checks it on every row).
"""

from __future__ import annotations

from typing import Any

import torch

SAMPLERS = ("ddim", "student", "stochastic")
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")


def sampler_timesteps(denoiser: Any, sampler: str, steps: int | None = None, timesteps=None) -> list[int]:
    """The descending timesteps a sampler visits: ``timesteps`` (any order), else DOLLAR's four for ``student`` or
    ``steps`` trailing DDIM steps (default 50)."""
    from distill.samplers import ddim_timesteps

    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if timesteps is not None:
        return sorted((int(t) for t in timesteps), reverse=True)
    if sampler == "student":
        from distill.samplers import STUDENT_TIMESTEPS

        k = 4 if steps is None else int(steps)
        if k not in STUDENT_TIMESTEPS:
            raise ValueError(f"the student sampler has default timesteps for {sorted(STUDENT_TIMESTEPS)} steps, not "
                             f"{k}: pass timesteps=[...]")
        return sorted(STUDENT_TIMESTEPS[k], reverse=True)
    return ddim_timesteps(50 if steps is None else int(steps), denoiser.schedule.num_train_timesteps)


@torch.no_grad()
def sample(denoiser: Any, noise: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor | None = None, *,
           sampler: str = "student", steps: int | None = None, timesteps=None, guidance_scale: float | None = None,
           eta: float = 1.0, generator: torch.Generator | None = None, progress: bool = False,
           pooled: torch.Tensor | None = None) -> torch.Tensor:
    """x0 latents sampled from ``noise`` (``(B, C, h, w)`` / ``(B, T, C, h, w)``) for captions ``text_tokens``
    ``(B, L, D)`` (mask ``(B, L)``; ``pooled`` ``(B, P)``: the pooled text of FLUX / SD3 / HunyuanVideo, from
    ``lrm.text.PipelineText``). See the module docstring for the samplers; ``generator`` drives the student's
    re-noising and the stochastic chain."""
    from distill.samplers import ddim_sample, stochastic_sample, student_sample

    ts = sampler_timesteps(denoiser, sampler, steps, timesteps)
    if sampler == "ddim":
        return ddim_sample(denoiser, noise, text_tokens, text_mask, eta=0.0, timesteps=ts,
                           guidance_scale=guidance_scale, progress=progress, pooled=pooled)
    if sampler == "student":
        return student_sample(denoiser, noise, text_tokens, text_mask, timesteps=ts, generator=generator,
                              guidance_scale=guidance_scale, pooled=pooled)
    return stochastic_sample(denoiser, noise, text_tokens, text_mask, ts, eta=eta, guidance_scale=guidance_scale,
                             generator=generator, grad_steps=0, pooled=pooled).x0


def has_lora(model: torch.nn.Module) -> bool:
    return any("lora_" in n for n, _ in model.named_parameters())


def prepare_for_sampling(denoiser: Any, compile: str = "none", channels_last: bool = False,
                         fuse_qkv: bool = False) -> dict[str, Any]:
    """Make ``denoiser``'s network fast for sampling, in place (frozen, eval mode); returns what was applied.

    See the module docstring. ``compile`` is one of ``COMPILE_MODES`` (``none``: not compiled)."""
    if compile not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES}, got {compile!r}")
    model = denoiser.model
    applied: dict[str, Any] = {"channels_last": False, "fuse_qkv": False, "compile": compile}
    if channels_last:
        if any(p.dim() == 5 for p in model.parameters()) or denoiser.is_transformer:
            applied["channels_last"] = "skipped (not a 2-D convolution network)"
        else:
            model.to(memory_format=torch.channels_last)
            applied["channels_last"] = True
    if fuse_qkv:
        if has_lora(model):
            raise ValueError("fuse_qkv needs a full network, but this one has LoRA adapters: merge them first "
                             "(merge_lora: true, or distill.lora.load_lora_student, which fuses them) or set "
                             "fuse_qkv false")
        if not hasattr(model, "fuse_qkv_projections"):
            raise ValueError(f"{type(model).__name__} has no fuse_qkv_projections(); set fuse_qkv false")
        model.fuse_qkv_projections()
        applied["fuse_qkv"] = True
    model.eval().requires_grad_(False)  # after fusing: the fused projections are new parameters
    applied["attention"] = _attention(model)
    if compile != "none":
        model.compile(mode=None if compile == "default" else compile)  # in place: the class (family adapter) stays
    return applied


def prepare_vae_for_sampling(vae: Any, compile: str = "none", channels_last: bool = False) -> dict[str, Any]:
    """The decode side of the fast path, in place, for an ``lrm.latent_space.VAE``: its network in channels_last
    (2-D VAEs: the decoder is convolutions) and its decoder compiled (``compile`` as in ``prepare_for_sampling``).
    bf16 decode is the VAE's own ``autocast_bf16`` (config key ``vae_bf16``)."""
    if compile not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES}, got {compile!r}")
    net = vae.vae
    applied: dict[str, Any] = {"channels_last": False, "compile": compile, "bf16": bool(vae.autocast_bf16)}
    if channels_last:
        if vae.is_video:
            applied["channels_last"] = "skipped (video VAE: 3-D convolutions)"
        else:
            net.to(memory_format=torch.channels_last)
            applied["channels_last"] = True
    if compile != "none":
        net.decoder.compile(mode=None if compile == "default" else compile)
    return applied


def _attention(model: torch.nn.Module) -> str:
    """The attention processors in use (diffusers' defaults call SDPA; they are reported, not replaced)."""
    procs = getattr(model, "attn_processors", None)
    return ",".join(sorted({type(p).__name__ for p in procs.values()})) if procs else "n/a"


__all__ = ["COMPILE_MODES", "SAMPLERS", "prepare_for_sampling", "prepare_vae_for_sampling", "sample",
           "sampler_timesteps"]
