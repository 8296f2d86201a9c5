"""Shape and motion-direction detectors for videos of the procedural world (color lives in color.py).

The procedural world draws one saturated object over a dark, uniform background. Both detectors first
segment the object per frame with a *soft* mask: the background is the frame's median color, the
object's color is the mean of the pixels far from it, and every pixel's opacity is its projection on the
background -> object color line. Soft masks measure areas and centroids to a fraction of a pixel, which
matters at the world's sizes (a small object in a 32 px frame has a radius of ~5 px).

Shape, from the soft mask of the object's own region (the largest connected piece above one quarter,
widened by 2 px, so that noise elsewhere in the frame does not count), with two statistics:
- fill: the area divided by the product of its widest row and its tallest column (both soft sums, so
  sub-pixel). That is pi/4 = 0.785 for a circle, 1 for an axis-aligned square and 1/2 for a triangle
  (any triangle with a horizontal side: area = base x height / 2), whatever the size.
- vertical skew: the skewness of the mask's mass along the vertical axis; 0 for a circle or a square
  (symmetric), 2 sqrt(2) / 5 = 0.566 in size for a triangle with a horizontal side. A blur leaves the
  third central moment unchanged and only adds to the variance, so a blurred triangle keeps most of its
  skew (0.42-0.53 at a 1 px Gaussian blur), while its fill rises past the circle's (a 1 px blur turned 41%
  of the world's triangles into "circles" by fill alone).
A triangle has fill below, or skew above, the half-way points (0.64, 0.283); otherwise fill above the
circle/square half-way point (0.89) is a square. Majority vote over frames.

Direction: the sign of the object's horizontal velocity at the *start* of the clip, where the prompt's
direction holds (objects bounce off the side walls later). The first displacement decides, unless it is
smaller than a tenth of a pixel, in which case the next ones are added until it is not.

The tests run both on renders whose ground truth is known, and check that a mirrored video flips the
detected direction while leaving shape and color alone.
"""
from __future__ import annotations

import collections
from typing import Sequence

import numpy as np

from data_pipelines.procedural import DIRECTIONS, SHAPES

# Pixels this far (RGB distance) from the background color seed the object's mean color.
_SEED_THRESHOLD = 60.0
# Fill ratios half-way between triangle (0.5), circle (pi/4) and square (1).
_TRIANGLE_BELOW = (0.5 + np.pi / 4) / 2
_SQUARE_ABOVE = (np.pi / 4 + 1.0) / 2
# Half-way between the vertical skew of a symmetric shape (0) and of a triangle with a horizontal side.
_SKEW_ABOVE = np.sqrt(2.0) / 5.0
# Smallest object, in pixels of area, a frame must show to vote.
_MIN_AREA = 4.0


def object_mask(frame: np.ndarray, threshold: float = _SEED_THRESHOLD) -> np.ndarray | None:
    """Soft object mask in [0, 1] of a uint8 frame [H, W, 3]; None when no object stands out."""
    pixels = np.asarray(frame, np.float32)
    background = np.median(pixels.reshape(-1, 3), axis=0)
    offset = pixels - background
    far = np.linalg.norm(offset, axis=-1) > threshold
    if far.sum() < 3:
        return None
    axis = offset[far].mean(axis=0)  # object color minus background color
    alpha = (offset @ axis) / float(axis @ axis)
    return np.clip(alpha, 0.0, 1.0)


def fill_ratio(mask: np.ndarray) -> float:
    """Area over (widest row x tallest column) of a soft mask; pi/4 circle, 1 square, 1/2 triangle."""
    width = mask.sum(axis=1).max()
    height = mask.sum(axis=0).max()
    return float(mask.sum() / max(width * height, 1e-6))


def vertical_skew(mask: np.ndarray) -> float:
    """Skewness of a soft mask's mass along the vertical axis: 0 for a symmetric shape, 0.566 in size for a
    triangle with a horizontal side (a Gaussian blur lowers it only through the variance it adds)."""
    rows = mask.sum(axis=1)
    y = np.arange(rows.size, dtype=np.float64) + 0.5
    mass = max(float(rows.sum()), 1e-6)
    mean = float((rows * y).sum()) / mass
    var = float((rows * (y - mean) ** 2).sum()) / mass
    return float((rows * (y - mean) ** 3).sum()) / mass / max(var, 1e-6) ** 1.5


def object_region(mask: np.ndarray) -> np.ndarray:
    """The soft mask restricted to its largest connected piece above one quarter, widened by 2 px (a blurred
    edge stays in; noise and stray fragments elsewhere in the frame do not)."""
    from scipy import ndimage
    labels, count = ndimage.label(mask > 0.25)
    if not count:
        return mask
    largest = 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    return mask * ndimage.binary_dilation(labels == largest, iterations=2)


def detect_shape(video: np.ndarray) -> str:
    """Detected shape ("circle", "square", "triangle") of a uint8 video [T, H, W, 3]; "none" if no object."""
    votes = collections.Counter()
    for frame in np.asarray(video):
        mask = object_mask(frame)
        if mask is None or mask.sum() < _MIN_AREA:
            continue
        mask = object_region(mask)
        ratio = fill_ratio(mask)
        triangle = ratio < _TRIANGLE_BELOW or abs(vertical_skew(mask)) > _SKEW_ABOVE
        votes["triangle" if triangle else "square" if ratio > _SQUARE_ABOVE else "circle"] += 1
    return votes.most_common(1)[0][0] if votes else "none"


def centroids_x(video: np.ndarray) -> np.ndarray:
    """Horizontal object centroid per frame (pixels; NaN where no object is found)."""
    out = []
    for frame in np.asarray(video):
        mask = object_mask(frame)
        if mask is None or mask.sum() < _MIN_AREA:
            out.append(np.nan)
            continue
        xs = np.arange(mask.shape[1], dtype=np.float32) + 0.5
        out.append(float((mask.sum(axis=0) * xs).sum() / mask.sum()))
    return np.asarray(out, np.float32)


def detect_direction(video: np.ndarray, min_shift: float = 0.1) -> str:
    """Detected initial horizontal motion ("left" / "right") of a uint8 video [T, H, W, 3].

    "none" for a single frame, a video without a visible object in two frames, or no motion.
    """
    x = centroids_x(video)
    x = x[np.isfinite(x)]
    shift = 0.0
    for dx in np.diff(x):
        shift += float(dx)
        if abs(shift) >= min_shift:
            return "right" if shift > 0 else "left"
    return "none"


def whole_object_share(video: np.ndarray, min_part: float = 2.0) -> float:
    """Share of frames [T, H, W, 3] that show the object as one whole piece: the soft mask above one half forms
    exactly one connected region (4-neighbour) of at least _MIN_AREA pixels, and no other region of min_part
    pixels or more. A frame with no object, or the object in fragments (e.g. patches scattered across the
    frame), does not count."""
    from scipy import ndimage
    whole = []
    for frame in np.asarray(video):
        mask = object_mask(frame)
        if mask is None:
            whole.append(False)
            continue
        labels, count = ndimage.label(mask > 0.5)
        areas = np.bincount(labels.ravel())[1:] if count else np.zeros(0)
        whole.append(int(np.sum(areas >= min_part)) == 1 and float(areas.max()) >= _MIN_AREA)
    return float(np.mean(whole)) if whole else 0.0


def prompt_attribute(prompt: str, choices: Sequence[str]) -> str | None:
    """The first word of `prompt` that is one of `choices` (e.g. SHAPES), if any."""
    return next((w for w in prompt.lower().split() if w in choices), None)


def shape_accuracy(videos, prompts) -> dict:
    """Share of videos whose detected shape is the prompted one, with per-prompt detail."""
    detail = [{"prompt": p, "expected": prompt_attribute(p, SHAPES), "detected": detect_shape(v)}
              for v, p in zip(videos, prompts)]
    return {"shape_accuracy": sum(d["expected"] == d["detected"] for d in detail) / max(len(detail), 1),
            "shape_detail": detail}


def whole_object_accuracy(videos) -> dict:
    """Mean over videos of the share of frames showing one whole object (whole_object_share)."""
    return {"whole_object_share": float(np.mean([whole_object_share(v) for v in videos])) if len(videos) else 0.0}


def direction_accuracy(videos, prompts) -> dict:
    """Share of videos whose detected initial direction is the prompted one, with per-prompt detail."""
    detail = [{"prompt": p, "expected": prompt_attribute(p, DIRECTIONS), "detected": detect_direction(v)}
              for v, p in zip(videos, prompts)]
    return {"direction_accuracy": sum(d["expected"] == d["detected"] for d in detail) / max(len(detail), 1),
            "direction_detail": detail}
