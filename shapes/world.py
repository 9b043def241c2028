"""Procedural Shapes world.

A sample is ``count`` (1-3) shapes of one kind and one color on a plain background. With one shape it
sits at a named position; videos add a motion direction and speed shared by all shapes. Every sample
is a pure function of ``(seed, index)``, so any item can be regenerated alone, in any order.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Iterator

import numpy as np
import torch

# Named colors (RGB in [0, 1]). Shape colors and backgrounds are disjoint so a shape never vanishes.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.75, 0.15),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.90, 0.10),
    "purple": (0.60, 0.15, 0.80),
    "orange": (1.00, 0.55, 0.05),
}
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0),
    "gray": (0.5, 0.5, 0.5),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom", "center")
DIRECTIONS = ("left", "right", "up", "down")
SPEEDS = ("slow", "fast")
# Pixels moved per frame, as a fraction of the image size.
SPEED_FRACTION = {"slow": 0.012, "fast": 0.028}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
_POSITION_CENTER = {  # (x, y) as fractions of the image size
    "left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75), "center": (0.5, 0.5),
}
_DIRECTION_VEC = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
_SUPERSAMPLE = 4


@dataclass
class ShapesSample:
    """One generated sample: pixels in [0, 1] plus its caption and ground truth."""

    pixels: np.ndarray  # (3, H, W) for images, (T, 3, H, W) for videos; float32 in [0, 1]
    caption: str
    shape: str
    color: str
    count: int
    background: str
    position: str | None  # only for count == 1
    direction: str | None  # videos only
    speed: str | None  # videos only
    centers: list[list[float]] = field(default_factory=list)  # per shape, first frame (x, y) in [0, 1]
    size: float = 0.0  # shape radius as a fraction of the image size
    index: int = 0

    def attributes(self) -> dict:
        d = asdict(self)
        d.pop("pixels")
        return d


def _plural(shape: str) -> str:
    return shape + "s"


def make_caption(rng: np.random.Generator, shape: str, color: str, count: int, background: str,
                 position: str | None, direction: str | None, speed: str | None) -> str:
    """A varied natural phrasing of the attributes; every attribute word appears verbatim."""
    if count == 1:
        article = "an" if color[0] in "aeiou" else "a"
        obj = f"{rng.choice([article, 'one'])} {color} {shape}"
    else:
        obj = f"{NUMBER_WORDS[count]} {color} {_plural(shape)}"
    parts = [obj]
    verb_s = count == 1
    if direction is not None:
        moving = rng.choice(["moving", "sliding", "drifting"])
        adverb = {"slow": rng.choice(["slowly", "at a slow pace"]),
                  "fast": rng.choice(["quickly", "fast", "at a fast pace"])}[speed or "slow"]
        dir_word = direction
        parts.append(f"{moving} {dir_word} {adverb}" if rng.random() < 0.5 else f"{moving} {adverb} {dir_word}")
    if position is not None:
        where = {"left": "on the left", "right": "on the right", "top": "at the top",
                 "bottom": "at the bottom", "center": "in the center"}[position]
        parts.append(where)
    bg = rng.choice([f"on a {background} background", f"against a {background} background",
                     f"over a plain {background} background"])
    parts.append(bg)
    text = " ".join(parts)
    u = rng.random()
    if u < 0.3:
        text = (f"there is {text}" if verb_s else f"there are {text}")
    elif u < 0.5:
        text = ("an image of " if direction is None else "a video of ") + text
    return text


_NUM_RE = {"one": 1, "a": 1, "an": 1, "two": 2, "three": 3}


def parse_caption(caption: str) -> dict:
    """Recover the attributes a Shapes caption names (the inverse of ``make_caption``).

    Returns keys shape, color, count, background, position, direction, speed; a key is None when the
    caption does not name it. Works on any text: unknown words are ignored.
    """
    words = re.findall(r"[a-z]+", caption.lower())
    out: dict = {k: None for k in ("shape", "color", "count", "background", "position", "direction", "speed")}
    for i, w in enumerate(words):
        nxt = words[i + 1] if i + 1 < len(words) else ""
        singular = w[:-1] if w.endswith("s") and w[:-1] in SHAPES else w
        if singular in SHAPES and out["shape"] is None:
            out["shape"] = singular
        if w in COLORS and out["color"] is None:
            out["color"] = w
            prev = words[i - 1] if i > 0 else ""
            if prev in _NUM_RE:
                out["count"] = _NUM_RE[prev]
        if w in BACKGROUNDS and nxt == "background":
            out["background"] = w
        if w in ("moving", "sliding", "drifting"):
            for w2 in words[i + 1:i + 6]:
                if w2 in DIRECTIONS:
                    out["direction"] = w2
                    break
        if w in ("slowly", "slow"):
            out["speed"] = "slow"
        if w in ("quickly", "fast"):
            out["speed"] = "fast"
    text = " ".join(words)
    for pos, phrase in (("left", "on the left"), ("right", "on the right"), ("top", "at the top"),
                        ("bottom", "at the bottom"), ("center", "in the center")):
        if phrase in text:
            out["position"] = pos
    return out


def _draw(canvas: np.ndarray, shape: str, cx: float, cy: float, r: float, rgb: tuple[float, float, float]) -> None:
    """Draw a filled shape on a supersampled (3, S, S) canvas; coordinates in pixels of that canvas."""
    S = canvas.shape[-1]
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) + 0.5
    if shape == "circle":
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    elif shape == "square":
        h = r * 0.886  # same area as the circle of radius r
        mask = (np.abs(xx - cx) <= h) & (np.abs(yy - cy) <= h)
    elif shape == "triangle":
        # Upward isosceles triangle inscribed in the circle of radius 1.2 r.
        R = r * 1.2
        top, base = cy - R, cy + 0.5 * R
        half = R * 0.866
        frac = (yy - top) / (base - top)
        mask = (yy >= top) & (yy <= base) & (np.abs(xx - cx) <= frac * half)
    else:
        raise ValueError(f"unknown shape {shape!r}; valid: {SHAPES}")
    for c in range(3):
        canvas[c][mask] = rgb[c]


class ShapesWorld:
    """Deterministic generator of captioned Shapes images (``num_frames=None``) or videos.

    Limits of the world: all shapes of one sample share one kind and one color (and, in videos, one motion
    direction and speed), and a position is named only for a single shape (``count == 1``); captions and
    rewards therefore never ask about mixed kinds or colors, or where each of several shapes is.

    Args:
        image_size: 32 (default) or 64 pixels square.
        num_frames: None for images, else frames per video (default for videos: 16).
        seed: base seed; sample ``i`` depends only on ``(seed, i)``.
        max_count: largest number of shapes in one sample (1-3).
    """

    def __init__(self, image_size: int = 32, num_frames: int | None = None, seed: int = 0, max_count: int = 3):
        if image_size not in (32, 64):
            raise ValueError(f"image_size must be 32 or 64, got {image_size}")
        if num_frames is not None and num_frames < 2:
            raise ValueError(f"num_frames must be >= 2 for videos (or None for images), got {num_frames}")
        if not 1 <= max_count <= 3:
            raise ValueError(f"max_count must be in 1..3, got {max_count}")
        self.image_size = image_size
        self.num_frames = num_frames
        self.seed = int(seed)
        self.max_count = max_count

    @property
    def is_video(self) -> bool:
        return self.num_frames is not None

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(index), 7919 if self.is_video else 104729])

    def sample(self, index: int) -> ShapesSample:
        rng = self._rng(index)
        shape = str(rng.choice(SHAPES))
        color = str(rng.choice(list(COLORS)))
        background = str(rng.choice(list(BACKGROUNDS)))
        count = int(rng.integers(1, self.max_count + 1))
        position = str(rng.choice(POSITIONS)) if count == 1 else None
        direction = str(rng.choice(DIRECTIONS)) if self.is_video else None
        speed = str(rng.choice(SPEEDS)) if self.is_video else None
        size = float(rng.uniform(0.13, 0.17) if count == 1 else rng.uniform(0.09, 0.11))
        centers = self._place(rng, count, position, size, direction, speed)
        pixels = self.render(shape, color, background, centers, size, direction, speed)
        caption = make_caption(rng, shape, color, count, background, position, direction, speed)
        return ShapesSample(pixels=pixels, caption=caption, shape=shape, color=color, count=count,
                            background=background, position=position, direction=direction, speed=speed,
                            centers=[list(map(float, c)) for c in centers], size=size, index=int(index))

    def _travel(self, direction: str | None, speed: str | None) -> tuple[float, float]:
        if direction is None:
            return 0.0, 0.0
        d = SPEED_FRACTION[speed or "slow"] * (self.num_frames - 1)
        vx, vy = _DIRECTION_VEC[direction]
        return vx * d, vy * d

    def _place(self, rng, count, position, size, direction, speed) -> list[tuple[float, float]]:
        tx, ty = self._travel(direction, speed)
        if count == 1:
            cx, cy = _POSITION_CENTER[position]
            cx += rng.uniform(-0.04, 0.04)
            cy += rng.uniform(-0.04, 0.04)
            # Start behind the target so the motion is centred on the named position.
            return [(cx - tx / 2, cy - ty / 2)]
        # Several shapes: non-overlapping positions that stay inside the frame for the whole video.
        lo_x, hi_x = size + max(0.0, -tx) + 0.02, 1 - size - max(0.0, tx) - 0.02
        lo_y, hi_y = size + max(0.0, -ty) + 0.02, 1 - size - max(0.0, ty) - 0.02
        centers: list[tuple[float, float]] = []
        for _ in range(count):
            for _attempt in range(200):
                c = (rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y))
                if all((c[0] - o[0]) ** 2 + (c[1] - o[1]) ** 2 > (2.6 * size) ** 2 for o in centers):
                    break
            centers.append(c)
        return centers

    def render(self, shape, color, background, centers, size, direction=None, speed=None) -> np.ndarray:
        S = self.image_size * _SUPERSAMPLE
        frames = self.num_frames or 1
        tx, ty = self._travel(direction, speed)
        out = np.empty((frames, 3, self.image_size, self.image_size), dtype=np.float32)
        bg = np.asarray(BACKGROUNDS[background], dtype=np.float32)[:, None, None]
        for f in range(frames):
            a = f / (frames - 1) if frames > 1 else 0.0
            canvas = np.broadcast_to(bg, (3, S, S)).copy()
            for cx, cy in centers:
                _draw(canvas, shape, (cx + a * tx) * S, (cy + a * ty) * S, size * S, COLORS[color])
            out[f] = canvas.reshape(3, self.image_size, _SUPERSAMPLE, self.image_size, _SUPERSAMPLE).mean(axis=(2, 4))
        return out if self.is_video else out[0]

    # ---- batches and datasets -------------------------------------------------------------------
    def batch(self, indices) -> tuple[torch.Tensor, list[str], list[dict]]:
        """Pixels ``(B, 3, H, W)`` or ``(B, T, 3, H, W)`` in [0, 1], captions, attributes."""
        samples = [self.sample(int(i)) for i in indices]
        pixels = torch.from_numpy(np.stack([s.pixels for s in samples]))
        return pixels, [s.caption for s in samples], [s.attributes() for s in samples]

    def __iter__(self) -> Iterator[ShapesSample]:
        """Unbounded stream of samples 0, 1, 2, ..."""
        i = 0
        while True:
            yield self.sample(i)
            i += 1

    def to_dataset(self, num_samples: int, start: int = 0):
        """A ``datasets.Dataset`` of ``num_samples`` items (pixels as float32 arrays + attribute columns)."""
        import datasets

        def gen():
            for i in range(start, start + num_samples):
                s = self.sample(i)
                d = s.attributes()
                d["centers"] = [list(c) for c in d["centers"]]
                d["pixels"] = s.pixels
                yield d

        pix_shape = ((self.num_frames, 3, self.image_size, self.image_size) if self.is_video
                     else (3, self.image_size, self.image_size))
        arr = datasets.Array4D if self.is_video else datasets.Array3D
        features = datasets.Features({
            "pixels": arr(shape=pix_shape, dtype="float32"),
            "caption": datasets.Value("string"),
            "shape": datasets.Value("string"),
            "color": datasets.Value("string"),
            "count": datasets.Value("int32"),
            "background": datasets.Value("string"),
            "position": datasets.Value("string"),
            "direction": datasets.Value("string"),
            "speed": datasets.Value("string"),
            "centers": datasets.Sequence(datasets.Sequence(datasets.Value("float32"))),
            "size": datasets.Value("float32"),
            "index": datasets.Value("int64"),
        })
        return datasets.Dataset.from_generator(gen, features=features, keep_in_memory=True)
