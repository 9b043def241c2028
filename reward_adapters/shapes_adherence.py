"""Prompt adherence for the Shapes world, from pixels, by classical vision (numpy + OpenCV).

The prompt is parsed with ``shapes.parse_caption``; each attribute gets a graded score in [0, 1]:

1. background = median of the border pixels; foreground = pixels farther than ``FG_THRESHOLD`` from it.
2. color: fraction of foreground pixels whose nearest named color (``shapes.COLORS``) is the asked one.
3. count: connected foreground components n (ignoring specks); score 1 / (1 + |n - asked|).
4. shape: per component, the extent (area / bounding-box area) and how far the centroid sits below
   the box centre give soft class probabilities (Gaussians around per-shape prototypes); score =
   mean probability of the asked shape.
5. position: centroid of the foreground vs the named position; score exp(-d^2 / (2 * 0.15^2)).
6. direction (videos): centroid displacement first -> last frame along the asked direction;
   0.5 + 0.5 * (d . u) / max(|d|, 5% of the image), clipped to [0, 1]; no motion scores 0.5.

An attribute the prompt does not name scores NaN (the cache convention for "missing"); the
"shapes-adherence" reward is the mean over the attributes the prompt names (and the input can show).
For videos, color / count / shape are averaged over frames and position uses the mean centroid.
"""

from __future__ import annotations

import math

import numpy as np

from reward_adapters.base import NumpyReward, register_reward

FG_THRESHOLD = 0.2  # RGB distance from the background (0-1 scale) above which a pixel is foreground
MIN_AREA_FRACTION = 0.004  # components smaller than this fraction of the image are specks
# Per shape: (extent = area / box area, centroid offset below the box centre in box heights), measured
# on the Shapes renderer at 32 px (ideal extents: circle pi/4, square 1, triangle 1/2; pixels round them).
SHAPE_PROTOTYPES = {"circle": (0.785, 0.0), "square": (0.98, 0.0), "triangle": (0.61, 0.13)}
SHAPE_SIGMAS = (0.07, 0.04)
POSITION_SIGMA = 0.15
MIN_TRAVEL = 0.05
ATTRIBUTES = ("color", "shape", "count", "position", "direction")


def _world():
    # Imported lazily so that reward_adapters does not need the Shapes world unless these rewards are used.
    from shapes import world

    return world


def foreground(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """img (3, H, W) float in [0, 1] -> (mask (H, W) bool, background RGB (3,))."""
    border = np.concatenate([img[:, 0, :], img[:, -1, :], img[:, :, 0], img[:, :, -1]], axis=1)  # (3, 4W)
    bg = np.median(border, axis=1)
    dist = np.sqrt(((img - bg[:, None, None]) ** 2).sum(axis=0))
    return dist > FG_THRESHOLD, bg


def _components(mask: np.ndarray) -> list[dict]:
    import cv2

    n, labels, stats, cents = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    min_area = max(2, int(MIN_AREA_FRACTION * mask.size))
    out = []
    for k in range(1, n):
        x, y, w, h, area = stats[k]
        if area < min_area:
            continue
        # yoff: centroid below the box centre, in box heights (an upward triangle sits low: ~+0.1)
        yoff = (cents[k][1] - (y + (h - 1) / 2.0)) / h
        out.append({"area": int(area), "extent": area / float(w * h), "yoff": float(yoff), "centroid": cents[k]})
    return out


def frame_scores(img: np.ndarray, want: dict) -> dict:
    """Scores of one frame for color / count / shape, plus its foreground centroid (x, y) in [0, 1]."""
    W = _world()
    mask, _ = foreground(img)
    H, Wd = mask.shape
    out: dict = {"centroid": None}
    if mask.any():
        ys, xs = np.nonzero(mask)
        out["centroid"] = np.array([(xs.mean() + 0.5) / Wd, (ys.mean() + 0.5) / H])
    if want.get("color") is not None:
        if not mask.any():
            out["color"] = 0.0
        else:
            names = list(W.COLORS)
            palette = np.asarray([W.COLORS[c] for c in names], dtype=np.float32)  # (K, 3)
            px = img[:, mask].T  # (N, 3)
            nearest = np.argmin(((px[:, None, :] - palette[None]) ** 2).sum(-1), axis=1)
            out["color"] = float((nearest == names.index(want["color"])).mean())
    comps = _components(mask) if (want.get("count") is not None or want.get("shape") is not None) else []
    if want.get("count") is not None:
        out["count"] = 1.0 / (1.0 + abs(len(comps) - int(want["count"])))
    if want.get("shape") is not None:
        if not comps:
            out["shape"] = 0.0
        else:
            names = list(SHAPE_PROTOTYPES)
            protos = np.array([SHAPE_PROTOTYPES[s] for s in names])  # (3, 2)
            probs = []
            for c in comps:
                z = (np.array([c["extent"], c["yoff"]]) - protos) / np.array(SHAPE_SIGMAS)
                logits = -(z ** 2).sum(axis=1) / 2
                p = np.exp(logits - logits.max())
                probs.append(p[names.index(want["shape"])] / p.sum())
            out["shape"] = float(np.mean(probs))
    return out


def adherence_scores(sample: np.ndarray, prompt: str) -> dict:
    """All attribute scores of one image (3, H, W) or video (T, 3, H, W) for ``prompt`` (NaN = not named)."""
    W = _world()
    want = W.parse_caption(prompt)
    frames = sample[None] if sample.ndim == 3 else sample
    per = [frame_scores(f, want) for f in frames]
    out = {a: float("nan") for a in ATTRIBUTES}
    for a in ("color", "count", "shape"):
        if want.get(a) is not None:
            out[a] = float(np.mean([p[a] for p in per]))
    cents = [p["centroid"] for p in per]
    if want.get("position") is not None:
        valid = [c for c in cents if c is not None]
        if not valid:
            out["position"] = 0.0
        else:
            target = np.array(W._POSITION_CENTER[want["position"]])
            d2 = float(((np.mean(valid, axis=0) - target) ** 2).sum())
            out["position"] = math.exp(-d2 / (2 * POSITION_SIGMA ** 2))
    if want.get("direction") is not None and sample.ndim == 4:
        if cents[0] is None or cents[-1] is None:
            out["direction"] = 0.0
        else:
            d = cents[-1] - cents[0]
            u = np.array(W._DIRECTION_VEC[want["direction"]])
            s = 0.5 + 0.5 * float(d @ u) / max(float(np.linalg.norm(d)), MIN_TRAVEL)
            out["direction"] = float(min(1.0, max(0.0, s)))
    return out


def _score(sample: np.ndarray, prompt: str, attribute: str) -> float:
    scores = adherence_scores(sample, prompt)
    if attribute == "adherence":
        named = [v for v in scores.values() if not math.isnan(v)]
        return float(np.mean(named)) if named else float("nan")
    return scores[attribute]


class _ShapesReward(NumpyReward):
    modality = "text-image"
    version = "shapes-cv-v1"
    handles_video = True  # videos are read whole (mean over frames; direction from motion)
    score_fn = staticmethod(_score)
    attribute = "adherence"

    def params(self) -> dict:
        return {"attribute": self.attribute}


@register_reward("shapes-color")
class ShapesColor(_ShapesReward):
    """Shapes: fraction of foreground pixels nearest to the prompt's color."""

    name, attribute = "shapes-color", "color"


@register_reward("shapes-shape")
class ShapesShape(_ShapesReward):
    """Shapes: soft probability (from component extent) that the shapes are the prompt's shape."""

    name, attribute = "shapes-shape", "shape"


@register_reward("shapes-count")
class ShapesCount(_ShapesReward):
    """Shapes: 1 / (1 + |components - asked count|)."""

    name, attribute = "shapes-count", "count"


@register_reward("shapes-position")
class ShapesPosition(_ShapesReward):
    """Shapes: Gaussian score of the foreground centroid's distance to the named position."""

    name, attribute = "shapes-position", "position"


@register_reward("shapes-direction")
class ShapesDirection(_ShapesReward):
    """Shapes videos: centroid motion from the first to the last frame along the asked direction."""

    name, attribute = "shapes-direction", "direction"
    modality = "text-video"


@register_reward("shapes-adherence")
class ShapesAdherence(_ShapesReward):
    """Shapes: mean of the color / shape / count / position (/ direction) scores the prompt names."""

    name, attribute = "shapes-adherence", "adherence"
