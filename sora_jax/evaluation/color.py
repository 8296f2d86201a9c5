"""A simple color detector: does a generated video show the prompted object color?

The procedural world draws one saturated object over a dark background. Per frame, the background is
the median color; pixels far from it are the object; their mean color's nearest palette entry is the
detected color (majority over frames).
"""
from __future__ import annotations

import collections

import numpy as np

from data_pipelines.procedural import COLORS

_NAMES = list(COLORS)
_PALETTE = np.asarray([COLORS[n] for n in _NAMES], np.float32)


def detect_color(video: np.ndarray, threshold: float = 60.0) -> str:
    """Detected object color of a uint8 video [T, H, W, 3]; "none" if no frame shows an object."""
    votes = collections.Counter()
    for frame in np.asarray(video, np.float32):
        pixels = frame.reshape(-1, 3)
        background = np.median(pixels, axis=0)
        obj = pixels[np.linalg.norm(pixels - background, axis=1) > threshold]
        if len(obj) < 3:
            continue
        votes[_NAMES[int(np.argmin(np.linalg.norm(_PALETTE - obj.mean(0), axis=1)))]] += 1
    return votes.most_common(1)[0][0] if votes else "none"


def prompt_color(prompt: str) -> str | None:
    """The palette color named in a prompt, if any."""
    words = prompt.lower().split()
    return next((w for w in words if w in COLORS), None)


def color_accuracy(videos, prompts) -> dict:
    """Share of videos whose detected color is the prompted one, with per-prompt detail."""
    detail = [{"prompt": p, "expected": prompt_color(p), "detected": detect_color(v)} for v, p in zip(videos, prompts)]
    hits = sum(d["expected"] == d["detected"] for d in detail)
    return {"color_accuracy": hits / max(len(detail), 1), "color_detail": detail}
