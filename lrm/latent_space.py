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
    temporal_downsample: int = 1  # 1 for per-frame image VAEs; 4 for causal video VAEs (T = 1 + 4k frames)
    vae_dtype: str = ""  # dtype of the VAE's weights when the space was recorded (informational; "" = unknown)
    # Per-channel normalisation (Wan): z = (raw - mean) / std, applied after shift/scale; None = none.
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    # Valid clip lengths are 1 + frame_step * k (0 = temporal_downsample). CogVideoX's VAE (1.0 / 1.5) decodes an
    # even number of latent frames to 2**n of them (2 -> 8 frames), so it round-trips 1 + 8k frames only (49 -> 13).
    frame_step: int = 0

    def __post_init__(self):  # JSON gives lists; compare as tuples
        for k in ("latents_mean", "latents_std"):
            v = getattr(self, k)
            if v is not None:
                object.__setattr__(self, k, tuple(float(a) for a in v))

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames of a clip: ``1 + (T - 1) / r`` for a causal video VAE (temporal factor ``r``), which takes
        ``T = 1 + r k`` frames only; ``T`` for per-frame VAEs. Other counts raise with the nearest valid ones."""
        r = self.temporal_downsample
        if r == 1:
            return int(num_frames)
        step = self.frame_step or r
        if num_frames < 1 or (num_frames - 1) % step:
            k = max(0, (num_frames - 1) // step)
            near = sorted({1 + step * k, 1 + step * (k + 1)})
            raise ValueError(f"{num_frames} frames: this video VAE compresses time by {r} causally and takes "
                             f"1 + {step}k frames (1, {1 + step}, {1 + 2 * step}, ...); nearest valid: "
                             f"{', '.join(map(str, near))}")
        return 1 + (num_frames - 1) // r

    def latent_shape(self, height: int, width: int, num_frames: int | None = None) -> tuple[int, ...]:
        if height % self.downsample or width % self.downsample:
            d = self.downsample
            raise ValueError(f"{height}x{width} is not divisible by the VAE's downsampling factor {d}; nearest valid: "
                             f"{max(d, round(height / d) * d)}x{max(d, round(width / d) * d)}")
        hw = (self.latent_channels, height // self.downsample, width // self.downsample)
        if num_frames is None:
            return hw
        return (self.latent_frames(num_frames),) + hw

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


# Video VAEs that encode whole clips (B, 3, T, H, W) -> (B, C, 1 + (T - 1) / 4, h, w), causal in time.
VIDEO_VAES = ("AutoencoderKLWan", "AutoencoderKLCogVideoX", "AutoencoderKLHunyuanVideo")
# diffusers autoencoder classes VAE.from_pretrained loads (read from config.json's _class_name).
SUPPORTED_VAES = ("AutoencoderKL",) + VIDEO_VAES


class VAE(torch.nn.Module):
    """A diffusers ``AutoencoderKL`` (SD, SDXL, SD3, FLUX) or video VAE (``VIDEO_VAES``) with scaling, chunking and
    video handling.

    ``encode`` takes pixels in [0, 1] ``(B, 3, H, W)`` / ``(B, T, 3, H, W)`` and returns scaled latents
    ``(B, C, h, w)`` / ``(B, T', C, h, w)``; ``decode`` inverts it. Normalisation as each pipeline does it:
    ``z = (raw - shift_factor) * scaling_factor`` (FLUX / SD3: both; SD, CogVideoX, HunyuanVideo: scale only), then
    per-channel ``(z - latents_mean) / latents_std`` where the config has them (Wan; scale 1, shift 0).
    Image VAEs run frame by frame, ``chunk_size`` frames per call (0 = ``auto_chunk_size`` of the pixel size); video
    VAEs run whole clips (``T = 1 + 4k`` frames, ``T' = 1 + k``; CogVideoX: ``1 + 8k``; other counts raise with the
    nearest valid ones),
    ``max(1, chunk_size // T)`` clips per call. ``tiling`` / ``slicing`` switch on diffusers' tiled / sliced
    encode-decode (``enable_tiling`` / ``enable_slicing``) for less memory. ``autocast_bf16`` runs the network in
    bf16 on CUDA and keeps the weights (and so the latent space) as loaded.
    """

    def __init__(self, vae: Any, vae_id: str, scaling_factor: float | None = None, shift_factor: float | None = None,
                 chunk_size: int = 64, autocast_bf16: bool = False, tiling: bool = False, slicing: bool = False):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        cfg = vae.config
        self.vae_id = vae_id
        self.kind = type(vae).__name__
        self.is_video = self.kind in VIDEO_VAES
        sc = scaling_factor if scaling_factor is not None else getattr(cfg, "scaling_factor", 1.0)
        self.scaling_factor = float(sc)
        sf = shift_factor if shift_factor is not None else getattr(cfg, "shift_factor", None)
        self.shift_factor = float(sf or 0.0)
        mean = std = None
        if self.kind == "AutoencoderKLWan":  # WanPipeline: raw = z * std + mean (other classes' stats: not used)
            mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if (mean is None) != (std is None):
            raise ValueError(f"{self.kind} config has only one of latents_mean / latents_std")
        self.latents_mean = None if mean is None else tuple(float(v) for v in mean)
        self.latents_std = None if std is None else tuple(float(v) for v in std)
        if chunk_size < 0:
            raise ValueError(f"chunk_size must be >= 1 frames, or 0 for auto (by pixel size), got {chunk_size}")
        self.chunk_size = chunk_size
        self.autocast_bf16 = autocast_bf16
        for flag, method in ((tiling, "enable_tiling"), (slicing, "enable_slicing")):
            if flag:
                if not hasattr(vae, method):
                    raise ValueError(f"{self.kind} has no {method}(); pass {method.split('_')[1]}=False")
                getattr(vae, method)()
        self.tiling, self.slicing = bool(tiling), bool(slicing)
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
        import diffusers

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
            cls_name = diffusers.AutoencoderKL.load_config(str(path), subfolder=subfolder, cache_dir=cache_dir).get(
                "_class_name", "AutoencoderKL")
            if cls_name not in SUPPORTED_VAES:
                raise ValueError(f"VAE {name_or_path!r} is a {cls_name}; supported: {list(SUPPORTED_VAES)}")
            vae = getattr(diffusers, cls_name).from_pretrained(str(path), subfolder=subfolder, cache_dir=cache_dir,
                                                               torch_dtype=dtype)
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
        cfg = self.vae.config
        for key in ("scale_factor_spatial", "spatial_compression_ratio"):  # Wan / HunyuanVideo
            if getattr(cfg, key, None):
                return int(getattr(cfg, key))
        return 2 ** (len(cfg.block_out_channels) - 1)

    @property
    def temporal_downsample(self) -> int:
        if not self.is_video:
            return 1
        cfg = self.vae.config
        return int(getattr(cfg, "scale_factor_temporal", None) or getattr(cfg, "temporal_compression_ratio", 4))

    @property
    def latent_channels(self) -> int:
        cfg = self.vae.config
        return int(getattr(cfg, "z_dim", None) or cfg.latent_channels)  # Wan: z_dim

    @property
    def latent_space(self) -> LatentSpace:
        """This VAE's latent space; ``vae_hash`` hashes the weights as held (see ``lrm.io.state_dict_sha256``: fp16 /
        bf16 values hash as their float32 values, so a half-precision checkpoint loaded in half or in float32 is the
        same space, while float32 weights cast to bf16 are another one)."""
        dtype = str(next(self.vae.parameters()).dtype).replace("torch.", "")
        if self._space is None or self._space.vae_dtype != dtype:  # recomputed after .to(dtype)
            self._space = LatentSpace(
                vae_id=self.vae_id, vae_hash=state_dict_sha256(self.vae.state_dict()),
                latent_channels=self.latent_channels, downsample=self.downsample,
                scaling_factor=self.scaling_factor, shift_factor=self.shift_factor, vae_dtype=dtype,
                temporal_downsample=self.temporal_downsample, latents_mean=self.latents_mean,
                latents_std=self.latents_std,
                frame_step=2 * self.temporal_downsample if self.kind == "AutoencoderKLCogVideoX" else 0,
            )
        return self._space

    # ---- encode / decode --------------------------------------------------------------------------
    def frames_per_call(self, height: int, width: int) -> int:
        """Frames per network call for ``height x width`` pixels: ``chunk_size``, or the auto size when it is 0."""
        return self.chunk_size or auto_chunk_size(height, width)

    def _autocast(self):
        enabled = self.autocast_bf16 and self.device.type == "cuda"
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled)

    def _normalize(self, z: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """Raw VAE latents (channels at dim 1) <-> ours: shift/scale, then per-channel mean/std (Wan)."""
        shape = (1, -1) + (1,) * (z.dim() - 2)
        mean = std = None
        if self.latents_mean is not None:
            mean = torch.tensor(self.latents_mean, device=z.device, dtype=z.dtype).view(shape)
            std = torch.tensor(self.latents_std, device=z.device, dtype=z.dtype).view(shape)
        if not inverse:
            z = (z - self.shift_factor) * self.scaling_factor
            return z if mean is None else (z - mean) / std
        if mean is not None:
            z = z * std + mean
        return z / self.scaling_factor + self.shift_factor

    def _clips_per_call(self, T: int, H: int, W: int) -> int:
        return max(1, self.frames_per_call(H, W) // max(1, T))

    def encode(self, pixels: torch.Tensor, sample: bool = False,
               generator: torch.Generator | None = None, check: bool = True) -> torch.Tensor:
        """Pixels in [0, 1] -> scaled latents. ``check=False`` skips the range check (it synchronises the GPU; the
        cache builder has validated the pixels on CPU already)."""
        if check:
            check_pixels(pixels, "pixels")
        video = pixels.dim() == 5
        B = pixels.shape[0]
        dtype = next(self.vae.parameters()).dtype
        if self.is_video:  # whole clips through the causal 3-D VAE
            x = pixels if video else pixels[:, None]  # (B, T, 3, H, W)
            T, H, W = x.shape[1], x.shape[-2], x.shape[-1]
            self.latent_space.latent_shape(H, W, T)  # refuses T != 1 + 4k, sizes not divisible
            outs = []
            for chunk in x.split(self._clips_per_call(T, H, W)):
                chunk = chunk.to(self.device, dtype, non_blocking=True)
                chunk = chunk.permute(0, 2, 1, 3, 4) * 2 - 1  # (b, 3, T, H, W)
                with self._autocast():
                    dist = self.vae.encode(chunk).latent_dist
                z = dist.sample(generator) if sample else dist.mode()
                outs.append(self._normalize(z.float()).permute(0, 2, 1, 3, 4))  # (b, T', C, h, w)
            z = torch.cat(outs)
            return z if video else z[:, 0]
        x = pixels.flatten(0, 1) if video else pixels  # (N, 3, H, W)
        outs = []
        for chunk in x.split(self.frames_per_call(x.shape[-2], x.shape[-1])):
            chunk = chunk.to(self.device, dtype, non_blocking=True) * 2 - 1
            with self._autocast():
                dist = self.vae.encode(chunk).latent_dist
            z = dist.sample(generator) if sample else dist.mean
            outs.append(self._normalize(z.float()))
        z = torch.cat(outs)  # (N, C, h, w)
        return z.unflatten(0, (B, -1)) if video else z

    def decode(self, latents: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Latents -> pixels in [0, 1]. ``clamp=False`` keeps gradients everywhere (reward backprop)."""
        self.latent_space.check_latents(latents)
        video = latents.dim() == 5
        B = latents.shape[0]
        dtype = next(self.vae.parameters()).dtype
        d = self.downsample
        if self.is_video:
            z = latents if video else latents[:, None]  # (B, T', C, h, w)
            T = 1 + (z.shape[1] - 1) * self.temporal_downsample
            outs = []
            for chunk in z.split(self._clips_per_call(T, z.shape[-2] * d, z.shape[-1] * d)):
                chunk = self._normalize(chunk.to(self.device, dtype).permute(0, 2, 1, 3, 4), inverse=True)
                with self._autocast():
                    x = self.vae.decode(chunk).sample  # (b, 3, T, H, W)
                x = (x.float().permute(0, 2, 1, 3, 4) + 1) / 2
                outs.append(x.clamp(0, 1) if clamp else x)
            x = torch.cat(outs)
            return x if video else x[:, 0]
        z = latents.flatten(0, 1) if video else latents
        outs = []
        for chunk in z.split(self.frames_per_call(z.shape[-2] * d, z.shape[-1] * d)):
            chunk = self._normalize(chunk.to(self.device, dtype), inverse=True)
            with self._autocast():
                x = self.vae.decode(chunk).sample
            x = (x.float() + 1) / 2
            outs.append(x.clamp(0, 1) if clamp else x)
        x = torch.cat(outs)
        return x.unflatten(0, (B, -1)) if video else x
