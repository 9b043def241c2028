"""The reward interface, the registry, video frame handling, composite rewards and the CPU pool.

A reward is called as ``reward(pixels, prompts=None) -> float32 (B,)`` with pixels in [0, 1], float,
``(B, 3, H, W)`` or ``(B, T, 3, H, W)``. Subclasses implement one method:

- ``score_images(pixels (N, 3, H, W), prompts) -> (N,)`` for image / text-image rewards (videos are
  scored per selected frame, batched across frames, and averaged), or
- ``score_videos(pixels (B, T, 3, H, W), prompts) -> (B,)`` for video / text-video rewards.

Rewards written with numpy/OpenCV subclass ``NumpyReward`` and implement ``score_one`` on a single
sample; the batch is spread over a thread (default) or process pool.
"""

from __future__ import annotations

import os
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from lrm.checks import check_pixels, check_prompts
from lrm.registry import Registry

MODALITIES = ("image", "text-image", "video", "text-video")
FRAME_MODES = ("all", "first", "middle", "last", "first-middle-last")

REWARDS: Registry["Reward"] = Registry("reward")


def register_reward(name: str, *, help: str | None = None):
    """Decorator: register a reward factory (a ``Reward`` subclass or a function returning one)."""
    return REWARDS.register(name, help=help)


def create_reward(name: str, /, **options: Any) -> "Reward":
    """Build a registered reward by name; unknown names raise with the list of available ones.

    ``name`` is positional-only so that options may include ``name=`` (callable / command rewards).
    """
    _import_builtin_rewards()
    if name not in REWARDS:
        REWARDS.create(name)  # raises KeyError listing the available rewards
    return REWARDS._factories[name](**options)


def list_rewards(pattern: str = "*") -> list[str]:
    _import_builtin_rewards()
    return REWARDS.list(pattern)


def describe_reward(name: str) -> str:
    _import_builtin_rewards()
    return REWARDS.describe(name)


# Modules whose @register_reward decorators fill the registry; heavy imports stay inside factories.
BUILTIN_MODULES = ["weight_free", "video_metrics", "shapes_adherence", "blackbox", "hpsv2", "imagereward",
                   "pickscore", "aesthetic", "clip_score"]


def _import_builtin_rewards() -> None:
    import importlib

    for mod in BUILTIN_MODULES:
        importlib.import_module(f"reward_adapters.{mod}")


def select_frames(num_frames: int, frames: str | int) -> list[int]:
    """Indices of the frames an image reward scores in a video of ``num_frames`` frames.

    ``frames``: "all", "first", "middle", "last", "first-middle-last", or an int K (K frames spaced
    uniformly from the first to the last).
    """
    T = int(num_frames)
    if isinstance(frames, bool) or not isinstance(frames, (int, str)):
        raise TypeError(f"frames must be one of {FRAME_MODES} or an int, got {frames!r}")
    if isinstance(frames, int):
        if not 1 <= frames <= T:
            raise ValueError(f"frames={frames} uniform frames asked from a video of {T} frames; use 1..{T}")
        return [int(round(i * (T - 1) / (frames - 1))) if frames > 1 else (T - 1) // 2 for i in range(frames)]
    mid = (T - 1) // 2
    table = {"all": list(range(T)), "first": [0], "middle": [mid], "last": [T - 1],
             "first-middle-last": [0, mid, T - 1]}
    if frames not in table:
        raise ValueError(f"frames={frames!r} is not a frame selection; valid: {FRAME_MODES} or an int K")
    return table[frames]


class Reward(nn.Module):
    """Base class of every reward. See the module docstring for the call contract.

    Args:
        device: where the reward computes ("cpu", "cuda", ...). Outputs come back on the input's device.
        frames: frame selection for scoring videos with an image reward (see ``select_frames``).
        max_batch: split calls into chunks of at most this many images/videos (None: one chunk).
    """

    name: str = "reward"
    version: str = "1"
    modality: str = "image"
    differentiable: bool = False
    # True when score_images also accepts (B, T, 3, H, W) itself (e.g. a Shapes reward that reads motion).
    handles_video: bool = False

    def __init__(self, device: str | torch.device = "cpu", frames: str | int = "all", max_batch: int | None = None):
        super().__init__()
        if self.modality not in MODALITIES:
            raise ValueError(f"{type(self).__name__}.modality={self.modality!r}; valid: {MODALITIES}")
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 or None, got {max_batch}")
        if isinstance(frames, bool) or not isinstance(frames, (int, str)) or \
                (isinstance(frames, str) and frames not in FRAME_MODES) or (isinstance(frames, int) and frames < 1):
            raise ValueError(f"frames={frames!r}; valid: {FRAME_MODES} or an int K >= 1 (K uniform frames)")
        self._device = torch.device(device)
        self.frames = frames
        self.max_batch = max_batch

    # ---- properties ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def needs_prompts(self) -> bool:
        return self.modality.startswith("text")

    @property
    def is_video_reward(self) -> bool:
        return self.modality.endswith("video")

    def to(self, *args, **kwargs):  # keep .device in sync with nn.Module.to
        out = super().to(*args, **kwargs)
        dev = torch._C._nn._parse_to(*args, **kwargs)[0]
        if dev is not None:
            self._device = torch.device(dev)
        return out

    def info(self) -> dict:
        """Identity recorded in cache manifests: name, version, modality, differentiable."""
        return {"name": self.name, "version": self.version, "modality": self.modality,
                "differentiable": self.differentiable}

    # ---- the call --------------------------------------------------------------------------------
    def forward(self, pixels: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        check_pixels(pixels, allow_image=not self.is_video_reward)
        B = pixels.shape[0]
        prompts = check_prompts(prompts, B, required=self.needs_prompts)
        if prompts is not None and not self.needs_prompts:
            prompts = None  # image-only rewards ignore prompts
        out_device = pixels.device
        ctx = torch.enable_grad() if (self.differentiable and torch.is_grad_enabled()) else torch.no_grad()
        with ctx:
            chunk = self.max_batch or B
            parts = [self._score(pixels[i:i + chunk], None if prompts is None else prompts[i:i + chunk])
                     for i in range(0, B, chunk)]
        scores = torch.cat(parts) if len(parts) > 1 else parts[0]
        if scores.shape != (B,):
            raise RuntimeError(f"{self.name}: returned shape {tuple(scores.shape)} for a batch of {B}; expected ({B},)")
        return scores.to(device=out_device, dtype=torch.float32)

    def _score(self, pixels: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        if self.is_video_reward:
            return self.score_videos(pixels, prompts)
        if pixels.dim() == 4 or self.handles_video:
            return self.score_images(pixels, prompts)
        # Image reward on a video: score the selected frames as one batch, then average per video.
        B, T = pixels.shape[:2]
        idx = select_frames(T, self.frames)
        K = len(idx)
        frames = pixels[:, idx].reshape(B * K, *pixels.shape[2:])  # (B*K, 3, H, W)
        frame_prompts = None if prompts is None else [p for p in prompts for _ in range(K)]
        return self.score_images(frames, frame_prompts).reshape(B, K).mean(dim=1)

    def score_images(self, pixels: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} scores videos only: pass (B, T, 3, H, W)")

    def score_videos(self, pixels: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement score_videos")

    # ---- DDPO-style call ---------------------------------------------------------------------------
    def ddpo(self, images, prompts: Sequence[str] | None = None, metadata: Any = None) -> tuple[torch.Tensor, dict]:
        """DDPO/TRL reward-function call: ``(images, prompts, metadata) -> (rewards (B,), info)``.

        ``images`` may be a float tensor in [0, 1] (channels-first), or uint8 arrays/tensors
        ``(B, H, W, 3)`` / ``(B, T, H, W, 3)`` as ddpo-pytorch hands them around. Rewards come back
        detached, float32, on CPU.
        """
        pixels = to_pixels(images)
        with torch.no_grad():
            rewards = self(pixels, None if prompts is None else list(prompts))
        return rewards.detach().float().cpu(), {"reward": self.info(), "metadata": metadata}

    def extra_repr(self) -> str:
        return f"name={self.name!r}, version={self.version!r}, modality={self.modality!r}, device={self.device}"


def to_pixels(images) -> torch.Tensor:
    """uint8 channels-last arrays/tensors -> float channels-first in [0, 1]; float tensors pass through."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor or numpy array, got {type(images).__name__}")
    if images.dtype == torch.uint8:
        if images.shape[-1] != 3:
            raise ValueError(f"uint8 images must be channels-last (..., H, W, 3), got {tuple(images.shape)}")
        perm = (0, 3, 1, 2) if images.dim() == 4 else (0, 1, 4, 2, 3)
        return images.permute(*perm).float() / 255.0
    return images


# ---- CPU rewards -------------------------------------------------------------------------------------
def to_uint8_numpy(pixels: torch.Tensor) -> np.ndarray:
    """[0, 1] float (..., 3, H, W) -> uint8 (..., H, W, 3), rounding like ddpo-pytorch."""
    x = (pixels.detach() * 255).round().clamp(0, 255).to(torch.uint8).cpu()
    return x.movedim(-3, -1).contiguous().numpy()


_EXECUTORS: dict[tuple[str, int], Executor] = {}


def get_executor(kind: str, workers: int) -> Executor:
    """A process-wide pool reused across calls (thread pools suit OpenCV/PIL, which release the GIL)."""
    key = (kind, workers)
    if key not in _EXECUTORS:
        if kind == "thread":
            _EXECUTORS[key] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reward")
        elif kind == "process":
            import multiprocessing as mp

            _EXECUTORS[key] = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))
        else:
            raise ValueError(f"executor={kind!r}; valid: 'thread', 'process', 'serial'")
    return _EXECUTORS[key]


class NumpyReward(Reward):
    """A reward computed per sample in numpy/OpenCV, spread over a CPU pool.

    Subclasses set ``score_fn``: a module-level function ``fn(sample, prompt, **params) -> float``
    (module-level so the process pool can pickle it), where ``sample`` is float32 ``(3, H, W)`` or
    ``(T, 3, H, W)`` in [0, 1] (or uint8 channels-last when ``uint8_input``), and ``params()``.

    Args:
        workers: pool size (default: min(8, CPU count)); 0 or 1 runs serially.
        executor: "thread" (default), "process" or "serial".
    """

    score_fn: Callable[..., float]
    uint8_input: bool = False

    def __init__(self, device="cpu", frames="all", max_batch=None, workers: int | None = None,
                 executor: str = "thread"):
        super().__init__(device=device, frames=frames, max_batch=max_batch)
        if executor not in ("thread", "process", "serial"):
            raise ValueError(f"executor={executor!r}; valid: 'thread', 'process', 'serial'")
        self.workers = min(8, os.cpu_count() or 1) if workers is None else int(workers)
        self.executor = "serial" if self.workers <= 1 else executor

    def params(self) -> dict:
        return {}

    def _map(self, samples: np.ndarray, prompts: list[str] | None) -> torch.Tensor:
        fn = type(self).score_fn
        ps = [None] * len(samples) if prompts is None else prompts
        kw = self.params()
        if self.executor == "serial" or len(samples) == 1:
            vals = [fn(s, p, **kw) for s, p in zip(samples, ps)]
        else:
            ex = get_executor(self.executor, self.workers)
            vals = list(ex.map(_call_score, [fn] * len(samples), samples, ps, [kw] * len(samples),
                               chunksize=max(1, len(samples) // (4 * self.workers))))
        return torch.tensor(np.asarray(vals, dtype=np.float64), dtype=torch.float32)

    def _prepare(self, pixels: torch.Tensor) -> np.ndarray:
        if self.uint8_input:
            return to_uint8_numpy(pixels)
        return pixels.detach().float().cpu().numpy()

    def score_images(self, pixels, prompts):
        return self._map(self._prepare(pixels), prompts)

    def score_videos(self, pixels, prompts):
        return self._map(self._prepare(pixels), prompts)


def _call_score(fn, sample, prompt, kw):
    return fn(sample, prompt, **kw)


# ---- composite -------------------------------------------------------------------------------------
@register_reward("composite", help="weighted sum of named rewards: rewards={'shapes-color': 1.0, ...}")
class CompositeReward(Reward):
    """``sum_i w_i * r_i(pixels, prompts)``.

    Args:
        rewards: mapping from a registered name (or a ``Reward`` object) to its weight. Names may
            also be given as ``{"name": {"weight": w, **options}}`` to pass options to the factory.
    """

    name = "composite"

    def __init__(self, rewards: Mapping[Any, Any], device="cpu", frames="all", max_batch=None):
        super().__init__(device=device, frames=frames, max_batch=max_batch)
        if not rewards:
            raise ValueError("composite reward needs at least one component: rewards={'jpeg-compressibility': 1.0}")
        comps, weights, keys = [], [], []
        for key, spec in rewards.items():
            opts: dict = {}
            if isinstance(spec, Mapping):
                opts = dict(spec)
                if "weight" not in opts:
                    raise ValueError(f"composite component {key!r}: options dict needs a 'weight' entry")
                w = float(opts.pop("weight"))
            else:
                w = float(spec)
            r = key if isinstance(key, Reward) else create_reward(str(key), **opts)
            comps.append(r)
            weights.append(w)
            keys.append(r.name if isinstance(key, Reward) else str(key))
        self.components = nn.ModuleList(comps)
        self.weights = weights
        self.keys = keys
        video = any(r.is_video_reward for r in comps)
        text = any(r.needs_prompts for r in comps)
        self.modality = ("text-" if text else "") + ("video" if video else "image")
        self.differentiable = all(r.differentiable for r in comps)
        self.handles_video = True  # components handle frames themselves
        self.version = "+".join(f"{w:g}*{k}@{r.version}" for k, w, r in zip(keys, weights, comps))
        self.name = "composite(" + ",".join(f"{w:g}*{k}" for k, w in zip(keys, weights)) + ")"

    def component_scores(self, pixels, prompts=None) -> dict[str, torch.Tensor]:
        return {k: r(pixels, prompts if r.needs_prompts else None) for k, r in zip(self.keys, self.components)}

    def score_images(self, pixels, prompts):
        return self._sum(pixels, prompts)

    def score_videos(self, pixels, prompts):
        return self._sum(pixels, prompts)

    def _sum(self, pixels, prompts):
        parts = self.component_scores(pixels, prompts)
        total = 0.0
        for k, w in zip(self.keys, self.weights):
            total = total + w * parts[k]
        return total

    def ddpo(self, images, prompts=None, metadata=None):
        pixels = to_pixels(images)
        with torch.no_grad():
            parts = self.component_scores(pixels, None if prompts is None else list(prompts))
        total = sum(w * parts[k] for k, w in zip(self.keys, self.weights))
        info = {"reward": self.info(), "metadata": metadata,
                "components": {k: v.detach().float().cpu() for k, v in parts.items()}}
        return total.detach().float().cpu(), info
