"""Record sources for cache builds: Shapes world, ``datasets`` datasets, folders, generators.

Every source is indexable: record ``i`` is a pure function of the source and ``i`` (generators: of the
seed and the batch the index falls in), so a killed build regenerates exactly what it lost.

Pixel sources return, per index, either ``Item`` (pixels float32 (3, H, W) or (T, 3, H, W) in [0, 1],
prompt, source id) or ``Reject`` (reason, message); a bad record never raises.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

VIDEO_EXTS = {".mp4", ".avi", ".mov", ".webm", ".mkv", ".gif", ".npy"}


@dataclass
class Item:
    index: int
    pixels: np.ndarray
    prompt: str
    source_id: str
    hash: str = ""  # content hash, filled by the loader worker


@dataclass
class Reject:
    index: int
    source_id: str
    reason: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "source_id": self.source_id, "reason": self.reason, "message": self.message}


def to_chw_float(value: Any, convert_rgb: bool = False) -> np.ndarray:
    """PIL image / HWC or CHW array (uint8 or float in [0, 1]) -> float32 (3, H, W) in [0, 1].

    Raises ``ValueError`` with a reason prefix (``wrong_channels:``, ``bad_range:``) for a bad record.
    """
    try:
        from PIL import Image
    except ImportError:  # PIL comes with torchvision/datasets
        Image = None
    if Image is not None and isinstance(value, Image.Image):
        if value.mode != "RGB":
            if not convert_rgb:
                raise ValueError(f"wrong_channels: image mode {value.mode!r}, expected RGB "
                                 "(set source.convert_rgb true to convert)")
            value = value.convert("RGB")
        value = np.asarray(value)
    a = np.asarray(value)
    if a.ndim == 2:
        if not convert_rgb:
            raise ValueError(f"wrong_channels: grayscale array of shape {a.shape}, expected 3 channels")
        a = np.stack([a] * 3, axis=-1)
    if a.ndim != 3:
        raise ValueError(f"wrong_shape: expected an image array with 3 dims, got shape {a.shape}")
    if a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # CHW -> HWC
    if a.shape[-1] != 3:
        if convert_rgb and a.shape[-1] in (1, 4):
            a = np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a[..., :3]
        else:
            raise ValueError(f"wrong_channels: image has {a.shape[-1]} channels (shape {a.shape}), expected 3")
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / 255.0
    else:
        a = a.astype(np.float32)
        if not np.isfinite(a).all():
            raise ValueError("bad_values: image contains NaN or inf")
        if a.min() < -1e-3 or a.max() > 1 + 1e-3:
            raise ValueError(f"bad_range: float image values in [{a.min():.3g}, {a.max():.3g}], expected [0, 1]")
        a = a.clip(0, 1)
    return np.ascontiguousarray(np.moveaxis(a, -1, 0))


def resize_chw(a: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    if size is None or tuple(a.shape[-2:]) == tuple(size):
        return a
    t = torch.from_numpy(a)
    t = t.unsqueeze(0) if t.dim() == 3 else t
    out = torch.nn.functional.interpolate(t, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
    out = out.clamp(0, 1)
    return (out[0] if a.ndim == 3 else out).numpy()


def _video_frames(frames: list[Any] | np.ndarray, num_frames: int | None, convert_rgb: bool) -> np.ndarray:
    """List/array of frames -> (T, 3, H, W); ``num_frames`` evenly spaced frames when set."""
    n = len(frames)
    if num_frames is not None:
        if n < num_frames:
            raise ValueError(f"too_few_frames: video has {n} frames, {num_frames} are needed")
        pick = np.linspace(0, n - 1, num_frames).round().astype(int)
        frames = [frames[i] for i in pick]
    return np.stack([to_chw_float(f, convert_rgb) for f in frames])


def read_video_file(path: Path) -> list[np.ndarray]:
    if path.suffix == ".npy":
        arr = np.load(path, allow_pickle=False)
        return list(arr)
    import cv2

    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, fr = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(fr, cv2.COLOR_BGR2RGB))
    cap.release()
    if not frames:
        raise ValueError(f"unreadable: no frames could be decoded from {path.name}")
    return frames


class PixelSource:
    """Base class: ``load(i) -> Item | Reject``; ``num_records`` or None when unbounded."""

    is_video: bool = False
    kind = "pixels"

    def __init__(self, image_size: tuple[int, int] | None = None, num_frames: int | None = None,
                 convert_rgb: bool = False):
        self.image_size = tuple(image_size) if image_size else None
        self.num_frames = num_frames
        self.convert_rgb = convert_rgb

    @property
    def num_records(self) -> int | None:
        return None

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    def _raw(self, index: int) -> tuple[Any, str, str]:
        """(pixel payload, prompt, source id) for record ``index``."""
        raise NotImplementedError

    def source_id(self, index: int) -> str:
        return f"{self.describe()['type']}:{index}"

    def load(self, index: int) -> Item | Reject:
        sid = self.source_id(index)
        try:
            payload, prompt, sid = self._raw(index)
            if not isinstance(prompt, str) or not prompt.strip():
                return Reject(index, sid, "bad_prompt", f"caption is {prompt!r}, expected a non-empty string")
            pixels = self._to_pixels(payload)
            pixels = resize_chw(pixels, self.image_size)
            return Item(index, pixels, prompt, sid)
        except Exception as e:  # a bad record must never stop the build
            msg = str(e)
            reason = msg.split(":", 1)[0] if ":" in msg and msg.split(":", 1)[0].isidentifier() else "unreadable"
            return Reject(index, sid, reason, f"{type(e).__name__}: {msg}")

    def _to_pixels(self, payload: Any) -> np.ndarray:
        if self.is_video:
            return _video_frames(payload, self.num_frames, self.convert_rgb)
        return to_chw_float(payload, self.convert_rgb)


class ShapesSource(PixelSource):
    def __init__(self, image_size: int = 32, num_frames: int | None = None, seed: int = 0):
        from shapes.world import ShapesWorld

        super().__init__(None, num_frames)
        self.world = ShapesWorld(image_size=image_size, num_frames=num_frames, seed=seed)
        self.is_video = num_frames is not None
        self._desc = {"type": "shapes", "image_size": image_size, "num_frames": num_frames, "seed": seed}

    def describe(self) -> dict[str, Any]:
        return dict(self._desc)

    def source_id(self, index: int) -> str:
        return f"shapes:{self._desc['seed']}:{index}"

    def load(self, index: int) -> Item | Reject:
        s = self.world.sample(index)
        return Item(index, s.pixels, s.caption, self.source_id(index))


class DatasetSource(PixelSource):
    """A ``datasets`` dataset saved with ``save_to_disk`` (or loaded by name when a hub is reachable)."""

    def __init__(self, path: str, image_column: str, caption_column: str, split: str = "train",
                 video: bool = False, image_size=None, num_frames=None, convert_rgb=False):
        import datasets

        super().__init__(image_size, num_frames, convert_rgb)
        self.is_video = video
        p = Path(path)
        if p.exists():
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ValueError(f"dataset {path} has splits {list(ds)}, not {split!r}; set source.split")
                ds = ds[split]
        else:
            try:
                ds = datasets.load_dataset(path, split=split)
            except Exception as e:
                raise FileNotFoundError(
                    f"dataset {path!r} is neither a directory saved with save_to_disk nor loadable from the hub "
                    f"({type(e).__name__}: {e}). Offline? Save it with `ds.save_to_disk(DIR)` and pass DIR."
                ) from None
        for col in (image_column, caption_column):
            if col not in ds.column_names:
                raise ValueError(f"dataset {path} has no column {col!r}; its columns are {ds.column_names}. "
                                 "Set source.image_column / source.caption_column.")
        self.ds = ds
        self.pixel_ds = ds.select_columns([image_column]).with_format("numpy")
        self.captions = ds[caption_column]
        self.image_column = image_column
        self._desc = {"type": "dataset", "path": str(path), "split": split, "image_column": image_column,
                      "caption_column": caption_column, "video": video, "convert_rgb": convert_rgb,
                      "image_size": list(self.image_size) if self.image_size else None, "num_frames": num_frames}

    @property
    def num_records(self) -> int:
        return len(self.ds)

    def describe(self) -> dict[str, Any]:
        return dict(self._desc)

    def source_id(self, index: int) -> str:
        return f"dataset:{Path(self._desc['path']).name}:{self._desc['split']}:{index}"

    def _raw(self, index: int):
        feat = self.ds.features[self.image_column]
        if type(feat).__name__ in ("Image", "Video"):
            value = self.ds[index][self.image_column]  # decoded PIL image / frames
        else:
            value = self.pixel_ds[index][self.image_column]
        if self.is_video and not isinstance(value, (list, np.ndarray)):
            value = [np.asarray(f) for f in value]
        return value, self.captions[index], self.source_id(index)


class FolderSource(PixelSource):
    """A folder of images or videos with a captions file (CSV or JSONL) naming ``file`` and ``caption``.

    File names are relative to the folder; one that points outside it (absolute, or with ``..``) is rejected (reason
    ``outside_root``) unless ``allow_outside_root``: a captions file must not read arbitrary files. Symbolic links
    inside the folder are followed (placing them there is the folder owner's choice).
    """

    def __init__(self, path: str, captions_file: str = "captions.csv", file_column: str = "file",
                 caption_column: str = "caption", video: bool = False, image_size=None, num_frames=None,
                 convert_rgb=False, allow_outside_root: bool = False):
        super().__init__(image_size, num_frames, convert_rgb)
        self.root = Path(path)
        if not self.root.is_dir():
            raise FileNotFoundError(f"source folder {self.root} does not exist")
        cap = Path(captions_file)
        cap = cap if cap.is_absolute() else self.root / cap
        if not cap.exists():
            raise FileNotFoundError(f"captions file {cap} does not exist; write a CSV or JSONL with columns "
                                    f"{file_column!r} and {caption_column!r}")
        if cap.suffix in (".jsonl", ".json"):
            rows = [json.loads(line) for line in cap.read_text().splitlines() if line.strip()]
        else:
            import pandas as pd

            rows = pd.read_csv(cap, keep_default_na=False).to_dict("records")
        if rows and (file_column not in rows[0] or caption_column not in rows[0]):
            raise ValueError(f"captions file {cap} has columns {list(rows[0])}; expected {file_column!r} and "
                             f"{caption_column!r} (set source.file_column / source.caption_column)")
        self.files = [str(r[file_column]) for r in rows]
        self.captions = [r[caption_column] for r in rows]
        self.is_video = video
        self._desc = {"type": "folder", "path": str(self.root), "captions_file": str(captions_file),
                      "file_column": file_column, "caption_column": caption_column, "video": video,
                      "convert_rgb": convert_rgb, "image_size": list(self.image_size) if self.image_size else None,
                      "num_frames": num_frames}
        self.allow_outside_root = bool(allow_outside_root)
        if self.allow_outside_root:  # only when set, so caches described before this option existed still resume
            self._desc["allow_outside_root"] = True

    @property
    def num_records(self) -> int:
        return len(self.files)

    def describe(self) -> dict[str, Any]:
        return dict(self._desc)

    def source_id(self, index: int) -> str:
        return f"folder:{self.files[index]}" if index < len(self.files) else f"folder:#{index}"

    def _raw(self, index: int):
        name = self.files[index]
        if not self.allow_outside_root and _leaves_root(name):
            raise ValueError(f"outside_root: {name!r} points outside the source folder {self.root}; name files "
                             "relative to it, or set source.allow_outside_root true to read it anyway")
        path = self.root / name
        if not path.exists():
            raise ValueError(f"unreadable: {path} does not exist")
        if self.is_video:
            payload = read_video_file(path)
        else:
            from PIL import Image

            try:
                with Image.open(path) as im:
                    im.load()
                    payload = im.copy()
            except Exception as e:
                raise ValueError(f"unreadable: {path.name}: {e}") from None
        return payload, self.captions[index], self.source_id(index)


def _leaves_root(name: str) -> bool:
    """Whether a captions-file name escapes its folder: absolute (any OS), or climbing above it with ``..``."""
    import ntpath
    import posixpath

    if posixpath.isabs(name) or ntpath.isabs(name) or ntpath.splitdrive(name)[0]:
        return True
    depth = 0
    for part in name.replace("\\", "/").split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in ("", "."):
            depth += 1
    return False


class GeneratorSource:
    """Samples from a generator ``fn(n, seed, **kwargs) -> (latents (n, C, h, w) or (n, T, C, h, w), prompts)``.

    On-policy data for the LRM (DOLLAR Alg. 1): ``fn`` is typically a teacher or student sampler from
    ``distill``, named in the config by import path so that data_cache never imports distill. A batch
    starting at record ``start`` is drawn with seed ``seed * 1_000_003 + start``, so a resumed build
    regenerates identical records.

    Args:
        fn: the sampler (or, with ``factory=True``, a factory called once as ``fn(**kwargs)`` that returns the
            sampler ``(n, seed) -> (latents, prompts)``: load a model once, sample per batch).
        kwargs: keyword arguments for ``fn`` (recorded in the manifest's source description).
        device: passed as ``device=`` when ``fn`` takes a ``device`` parameter and ``kwargs`` do not set it.
    """

    kind = "latents"

    def __init__(self, fn: Callable[..., Any], seed: int = 0, name: str | None = None,
                 is_video: bool | None = None, kwargs: dict[str, Any] | None = None, factory: bool = False,
                 device: str | torch.device | None = None):
        self.seed = int(seed)
        self.name = name or f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', type(fn).__name__)}"
        self.is_video = is_video
        self.kwargs = dict(kwargs or {})
        self.factory = bool(factory)
        call_kw = dict(self.kwargs)
        if device is not None and "device" not in call_kw and _takes_param(fn, "device"):
            call_kw["device"] = str(device)
        if self.factory:
            sampler = fn(**call_kw)
            if not callable(sampler):
                raise TypeError(f"generator factory {self.name} returned {type(sampler).__name__}, expected a "
                                "callable fn(n, seed) -> (latents, prompts)")
            self.fn, self._call_kw = sampler, {}
        else:
            self.fn, self._call_kw = fn, call_kw

    @property
    def num_records(self) -> int | None:
        return None

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": "generator", "callable": self.name, "seed": self.seed}
        if self.kwargs:  # only when set, so caches described before these options existed still resume
            d["kwargs"] = dict(self.kwargs)
        if self.factory:
            d["factory"] = True
        return d

    def source_id(self, index: int) -> str:
        return f"generator:{self.seed}:{index}"

    def batch_seed(self, start: int) -> int:
        return self.seed * 1_000_003 + start

    def generate(self, start: int, n: int) -> tuple[torch.Tensor, list[str]]:
        latents, prompts = self.fn(n, self.batch_seed(start), **self._call_kw)
        if not isinstance(latents, torch.Tensor) or latents.dim() not in (4, 5) or latents.shape[0] != n:
            raise ValueError(f"generator {self.name} returned latents of shape "
                             f"{getattr(latents, 'shape', type(latents))} for n={n}; expected (n, C, h, w) or "
                             "(n, T, C, h, w)")
        prompts = list(prompts)
        if len(prompts) != n or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"generator {self.name} must return {n} prompt strings, got {len(prompts)}")
        return latents, prompts


def _takes_param(fn: Callable, name: str) -> bool:
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins, some C callables
        return False
    return name in params  # an explicit parameter only: **kwargs may not expect a device


def import_callable(spec: str) -> Callable:
    """``"package.module:function"`` (or ``module:Class.method``) -> the callable (generators named in a config).

    This is code execution: importing the module runs it, and the build then calls whatever the name resolves to
    with the build's rights. A config naming a generator must be trusted like a script.
    """
    if ":" not in spec:
        raise ValueError(f"generator {spec!r} must be written 'package.module:function'")
    mod, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(mod)
    except ImportError as e:
        raise ImportError(f"cannot import generator module {mod!r} ({e}); is it on PYTHONPATH?") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"generator {spec!r}: {mod} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"generator {spec!r} is not callable")
    return obj
