"""Latent spaces: which VAE made a latent, and encode/decode helpers for images and videos.

A ``LatentSpace`` records the VAE's content hash, its scaling/shift factors and the latent geometry (plus its name
and weight dtype, for messages). Caches and LRMs store it and refuse latents from another space. Identity is by
content: the same weights under another name (a hub id and a local copy) are the same space; other weights under
the same name are not.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lrm.checks import check_pixels
from lrm.io import state_dict_sha256


class LatentSpaceMismatchError(ValueError):
    """Latents (or a cache, or an LRM) come from a different latent space than expected."""


# Fields shown in messages but not compared: where the VAE came from and the dtype its weights were held in.
INFORMATIONAL_FIELDS = ("vae_id", "vae_dtype")


@dataclass(frozen=True)
class LatentSpace:
    vae_id: str  # name, hub id or path of the VAE (informational: two names can hold the same weights)
    vae_hash: str  # sha256 of the VAE weights (lrm.io.state_dict_sha256: names, shapes, values; not device/layout)
    latent_channels: int
    downsample: int  # spatial factor: latent H = pixel H / downsample
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    temporal_downsample: int = 1  # 1 for per-frame image VAEs
    vae_dtype: str = ""  # dtype of the VAE's weights when the space was recorded (informational; "" = unknown)

    def latent_shape(self, height: int, width: int, num_frames: int | None = None) -> tuple[int, ...]:
        if height % self.downsample or width % self.downsample:
            raise ValueError(f"{height}x{width} is not divisible by the VAE's downsampling factor {self.downsample}")
        hw = (self.latent_channels, height // self.downsample, width // self.downsample)
        if num_frames is None:
            return hw
        return (num_frames // self.temporal_downsample,) + hw

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LatentSpace":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)

    def short(self) -> str:
        return (f"{self.vae_id}@{self.vae_hash[:12]} (C={self.latent_channels}, /{self.downsample}, "
                f"scale={self.scaling_factor:.4g})")

    def check_compatible(self, other: "LatentSpace", what: str = "these latents") -> None:
        """Raise ``LatentSpaceMismatchError`` unless ``other`` is the same space: the same VAE weights (``vae_hash``)
        and the same geometry and scaling. ``vae_id`` / ``vae_dtype`` are not compared (only shown)."""
        mine, theirs = self.to_dict(), other.to_dict()
        diffs = [f"{k}: {theirs[k]!r} != {mine[k]!r}" for k in mine if k not in INFORMATIONAL_FIELDS
                 and (abs(mine[k] - theirs[k]) > 1e-6 * max(1.0, abs(mine[k])) if isinstance(mine[k], float)
                      else mine[k] != theirs[k])]
        if not diffs:
            return
        hints = []
        if self.vae_hash != other.vae_hash:
            if self.vae_id == other.vae_id:
                hints.append(f"both VAEs are named {self.vae_id!r} but their weights differ (latent spaces are "
                             "matched by the weights' content hash, not by name)")
            if self.vae_dtype and other.vae_dtype and self.vae_dtype != other.vae_dtype:
                hints.append(f"the VAE weights are {other.vae_dtype} there but {self.vae_dtype} here: casting "
                             f"weights to another dtype rounds them, which makes another VAE. Load the VAE in "
                             f"{self.vae_dtype} (VAE.from_pretrained(..., dtype=torch.{self.vae_dtype})) and, for "
                             "bf16 speed, run it under autocast (VAE(autocast_bf16=True); `lrm cache build "
                             "--vae_bf16 true`), which keeps the weights")
            elif not (self.vae_dtype and other.vae_dtype):
                hints.append("if it is the same VAE loaded in another dtype (e.g. dtype=torch.bfloat16 from float32 "
                             "weights): rounding the weights changes them; load it in float32 and use bf16 autocast "
                             "(autocast_bf16=True / --vae_bf16 true) instead")
        raise LatentSpaceMismatchError(
            f"{what} come from latent space {other.short()}, but {self.short()} is expected ({'; '.join(diffs)}). "
            + "".join(f"Note: {h}. " for h in hints)
            + "Re-encode the data with the matching VAE, or use an LRM / cache built for this VAE."
        )

    def check_latents(self, latents: torch.Tensor, name: str = "latents") -> None:
        """Shape check: ``(B, C, h, w)`` or ``(B, T, C, h, w)`` with this space's channel count."""
        if latents.dim() not in (4, 5):
            raise ValueError(f"{name} must be (B, C, h, w) or (B, T, C, h, w), got {tuple(latents.shape)}")
        if latents.shape[-3] != self.latent_channels:
            raise LatentSpaceMismatchError(
                f"{name} have {latents.shape[-3]} channels at dim -3 (shape {tuple(latents.shape)}), but latent space "
                f"{self.short()} has {self.latent_channels}. Wrong VAE, or channels in the wrong place?"
            )


# Auto chunk: frames per VAE call so that one call sees about as many pixels as 64 frames of 256x256 (4.2 Mpx).
# VAE activation memory grows with the pixels per call. SD-1.5 VAE, H100: encoding 64 frames of 512x512 peaked at
# 52 GB (fp32) / 35 GB (bf16 autocast); 4.2 Mpx per call at 13 GB / 8.6 GB (decoding 17 GB / 15 GB).
CHUNK_PIXELS = 64 * 256 * 256


def auto_chunk_size(height: int, width: int) -> int:
    """Frames per VAE encode/decode call for ``height x width`` pixels: ``max(1, CHUNK_PIXELS // (H * W))``
    (256 px -> 64, 512 px -> 16, 1024 px -> 4, 32 px -> 4096)."""
    return max(1, CHUNK_PIXELS // max(1, height * width))


def _shapes_vae_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "shapes" / "weights" / "vae"


class VAE(torch.nn.Module):
    """A diffusers ``AutoencoderKL`` with scaling, chunking and video handling.

    ``encode`` takes pixels in [0, 1] ``(B, 3, H, W)`` / ``(B, T, 3, H, W)`` and returns scaled latents
    ``(B, C, h, w)`` / ``(B, T, C, h, w)``; ``decode`` inverts it. Frames are batched and processed in
    chunks of ``chunk_size`` frames to bound memory (0 = ``auto_chunk_size`` of the pixel size); ``autocast_bf16``
    runs the network in bf16 on CUDA and keeps the weights (and so the latent space) as loaded.
    """

    def __init__(self, vae: Any, vae_id: str, scaling_factor: float | None = None, shift_factor: float | None = None,
                 chunk_size: int = 64, autocast_bf16: bool = False):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        cfg = vae.config
        self.vae_id = vae_id
        sc = scaling_factor if scaling_factor is not None else getattr(cfg, "scaling_factor", 1.0)
        self.scaling_factor = float(sc)
        sf = shift_factor if shift_factor is not None else getattr(cfg, "shift_factor", None)
        self.shift_factor = float(sf or 0.0)
        if chunk_size < 0:
            raise ValueError(f"chunk_size must be >= 1 frames, or 0 for auto (by pixel size), got {chunk_size}")
        self.chunk_size = chunk_size
        self.autocast_bf16 = autocast_bf16
        self._space: LatentSpace | None = None

    # ---- loading ----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str, subfolder: str | None = None, cache_dir: str | None = None,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, **kw) -> "VAE":
        """Load an ``AutoencoderKL`` from a local directory or the hub (``stabilityai/sd-vae-ft-mse``, or a
        pipeline repo with ``subfolder="vae"``). ``"shapes"`` loads the built-in world's shipped VAE.

        ``dtype`` is the dtype the weights are held in, and part of the latent space's identity when it rounds
        them: float32 weights loaded as bfloat16 are another VAE to caches and LRMs built with float32 (a clear
        ``LatentSpaceMismatchError`` says so). For bf16 speed keep ``dtype=torch.float32`` and pass
        ``autocast_bf16=True``."""
        from diffusers import AutoencoderKL

        if name_or_path == "shapes":
            path = _shapes_vae_dir()
            if not (path / "config.json").exists():
                raise FileNotFoundError(
                    f"The Shapes VAE weights are missing from {path}. Reinstall the package, or train them with "
                    "`lrm shapes train-vae --out_dir shapes/weights/vae`."
                )
            vae_id = "shapes-vae"
        else:
            path, vae_id = name_or_path, name_or_path
        cache_dir = cache_dir or os.environ.get("LRM_CACHE_DIR")
        try:
            vae = AutoencoderKL.from_pretrained(str(path), subfolder=subfolder, cache_dir=cache_dir, torch_dtype=dtype)
        except (OSError, EnvironmentError) as e:
            raise OSError(
                f"Could not load VAE {name_or_path!r} (subfolder={subfolder!r}, cache_dir={cache_dir!r}): {e}\n"
                "Offline? Download the VAE on a connected machine (huggingface-cli download REPO --local-dir DIR) "
                "and pass the local directory, or set LRM_CACHE_DIR to a cache that holds it."
            ) from None
        return cls(vae.to(device), vae_id=vae_id, **kw)

    @classmethod
    def shapes(cls, device: str | torch.device = "cpu", **kw) -> "VAE":
        """The built-in world's VAE (4 latent channels, 4x downsampling), shipped with the package."""
        return cls.from_pretrained("shapes", device=device, **kw)

    # ---- identity ---------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_space(self) -> LatentSpace:
        """This VAE's latent space; ``vae_hash`` hashes the weights as held (see ``lrm.io.state_dict_sha256``: fp16 /
        bf16 values hash as their float32 values, so a half-precision checkpoint loaded in half or in float32 is the
        same space, while float32 weights cast to bf16 are another one)."""
        dtype = str(next(self.vae.parameters()).dtype).replace("torch.", "")
        if self._space is None or self._space.vae_dtype != dtype:  # recomputed after .to(dtype)
            self._space = LatentSpace(
                vae_id=self.vae_id, vae_hash=state_dict_sha256(self.vae.state_dict()),
                latent_channels=int(self.vae.config.latent_channels), downsample=self.downsample,
                scaling_factor=self.scaling_factor, shift_factor=self.shift_factor, vae_dtype=dtype,
            )
        return self._space

    # ---- encode / decode --------------------------------------------------------------------------
    def frames_per_call(self, height: int, width: int) -> int:
        """Frames per network call for ``height x width`` pixels: ``chunk_size``, or the auto size when it is 0."""
        return self.chunk_size or auto_chunk_size(height, width)

    def _autocast(self):
        enabled = self.autocast_bf16 and self.device.type == "cuda"
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled)

    def encode(self, pixels: torch.Tensor, sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        check_pixels(pixels, "pixels")
        video = pixels.dim() == 5
        B = pixels.shape[0]
        x = pixels.flatten(0, 1) if video else pixels  # (N, 3, H, W)
        dtype = next(self.vae.parameters()).dtype
        outs = []
        for chunk in x.split(self.frames_per_call(x.shape[-2], x.shape[-1])):
            chunk = chunk.to(self.device, dtype) * 2 - 1
            with self._autocast():
                dist = self.vae.encode(chunk).latent_dist
            z = dist.sample(generator) if sample else dist.mean
            outs.append(((z.float() - self.shift_factor) * self.scaling_factor))
        z = torch.cat(outs)  # (N, C, h, w)
        return z.unflatten(0, (B, -1)) if video else z

    def decode(self, latents: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Latents -> pixels in [0, 1]. ``clamp=False`` keeps gradients everywhere (reward backprop)."""
        self.latent_space.check_latents(latents)
        video = latents.dim() == 5
        B = latents.shape[0]
        z = latents.flatten(0, 1) if video else latents
        dtype = next(self.vae.parameters()).dtype
        outs = []
        for chunk in z.split(self.frames_per_call(z.shape[-2] * self.downsample, z.shape[-1] * self.downsample)):
            chunk = (chunk.to(self.device, dtype) / self.scaling_factor) + self.shift_factor
            with self._autocast():
                x = self.vae.decode(chunk).sample
            x = (x.float() + 1) / 2
            outs.append(x.clamp(0, 1) if clamp else x)
        x = torch.cat(outs)
        return x.unflatten(0, (B, -1)) if video else x
