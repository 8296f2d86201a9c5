"""The procedural world: an infinite, index-deterministic source of short captioned videos.

One object (a shape of some color and size) moves under simple physics -- constant horizontal
velocity, optional gravity, elastic bounces off the walls and the floor -- over a dark background.
Sample i is a pure function of (seed, i), so any host can produce any sample and a data iterator's
position is all that a checkpoint needs. Width, height and frame count vary per sample (an image is a
1-frame video), which is what makes packing matter.

Captions are generated from the parameters, e.g. "a small red circle bouncing to the left", and every
sample keeps its parameters so that evaluation can check a generated video against its prompt. A fixed
set of (size, color, shape, motion, direction) combinations is held out of training for evaluation.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence

import numpy as np

# Saturated colors far apart in RGB, so a nearest-prototype detector separates them reliably.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 245),
    "yellow": (240, 220, 40),
    "magenta": (220, 50, 220),
    "cyan": (40, 215, 225),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.16, "large": 0.3}  # radius as a fraction of the shorter side
MOTIONS = ("bouncing", "moving")  # with gravity / without
DIRECTIONS = ("left", "right")

VOCABULARY: tuple[str, ...] = tuple(
    ["a", "to", "the"] + list(SIZES) + list(COLORS) + list(SHAPES) + list(MOTIONS) + list(DIRECTIONS))


def caption_of(size: str, color: str, shape: str, motion: str | None, direction: str | None) -> str:
    """The caption grammar: images have no motion phrase."""
    if motion is None:
        return f"a {size} {color} {shape}"
    return f"a {size} {color} {shape} {motion} to the {direction}"


def _held_out_combos(count_per_color: int = 2) -> tuple[tuple[str, str, str, str], ...]:
    """A fixed, seed-independent set of (size, color, shape, motion, direction) combos never trained on."""
    rng = np.random.default_rng(20261122)
    others = list(itertools.product(SIZES, SHAPES, MOTIONS, DIRECTIONS))
    picks = {color: rng.choice(len(others), size=count_per_color, replace=False) for color in COLORS}
    # Ordered round-robin over colors, so any prefix of the list covers as many colors as it can.
    combos = []
    for j in range(count_per_color):
        for color in COLORS:
            size, shape, motion, direction = others[picks[color][j]]
            combos.append((size, color, shape, motion, direction))
    return tuple(combos)


HELD_OUT = _held_out_combos()
HELD_OUT_PROMPTS: tuple[str, ...] = tuple(caption_of(*c) for c in HELD_OUT)


@dataclasses.dataclass(frozen=True)
class WorldParams:
    """Ground truth of one sample: everything needed to re-render it or to judge a generation."""
    width: int
    height: int
    frames: int
    size: str
    color: str
    shape: str
    motion: str | None
    direction: str | None
    x0: float
    y0: float
    vx: float
    vy: float
    gravity: float
    background: tuple[int, int, int]

    @property
    def caption(self) -> str:
        return caption_of(self.size, self.color, self.shape, self.motion, self.direction)


class ProceduralWorld:
    """Random-access source of procedural videos; `world[i]` is deterministic in (seed, i).

    Args:
      seed: the world's seed; different seeds give disjoint streams.
      sides: allowed widths and heights in pixels (each drawn independently: any aspect ratio).
      frames: allowed frame counts (1 = image).
      split: "train" (held-out combos never appear) or "heldout" (only held-out combos).
      length: the nominal length grain sees; the world itself is infinite.
    """

    def __init__(self, seed: int, sides: Sequence[int], frames: Sequence[int], split: str = "train",
                 length: int = 2**31 - 1):
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}.")
        if not sides or min(sides) < 8:
            raise ValueError(f"sides must be a non-empty list of sizes >= 8 px, got {list(sides)}.")
        if not frames or min(frames) < 1:
            raise ValueError(f"frames must be a non-empty list of counts >= 1, got {list(frames)}.")
        self.seed, self.sides, self.frames, self.split = seed, tuple(sides), tuple(frames), split
        self._length = length

    def __len__(self) -> int:
        return self._length

    def params(self, index: int) -> WorldParams:
        """Draws sample `index`'s parameters; training redraws any held-out combination."""
        split_key = 0 if self.split == "train" else 1
        for attempt in itertools.count():
            rng = np.random.default_rng([self.seed, split_key, int(index), attempt])
            p = self._draw(rng)
            combo = (p.size, p.color, p.shape, p.motion, p.direction)
            if self.split == "heldout" or combo not in HELD_OUT:
                return p

    def _draw(self, rng: np.random.Generator) -> WorldParams:
        width, height = (int(rng.choice(self.sides)) for _ in range(2))
        frames = int(rng.choice(self.frames))
        if self.split == "heldout":
            size, color, shape, motion, direction = HELD_OUT[int(rng.integers(len(HELD_OUT)))]
            frames = max(frames, min(f for f in self.frames if f > 1) if max(self.frames) > 1 else 1)
        else:
            size = str(rng.choice(list(SIZES)))
            color = str(rng.choice(list(COLORS)))
            shape = str(rng.choice(SHAPES))
            motion, direction = str(rng.choice(MOTIONS)), str(rng.choice(DIRECTIONS))
        r = SIZES[size] * min(width, height)
        speed = rng.uniform(0.03, 0.08) * width
        vx = -speed if direction == "left" else speed
        gravity = 0.02 * height if motion == "bouncing" else 0.0
        return WorldParams(
            width=width, height=height, frames=frames, size=size, color=color, shape=shape,
            motion=motion if frames > 1 else None, direction=direction if frames > 1 else None,
            x0=float(rng.uniform(r, width - r)), y0=float(rng.uniform(r, height - r)), vx=float(vx),
            vy=float(rng.uniform(-0.03, 0.03) * height), gravity=float(gravity),
            background=tuple(int(c) for c in rng.integers(15, 60, size=3)))

    def __getitem__(self, index: int) -> dict:
        p = self.params(index)
        return {"video": render(p), "caption": p.caption, "index": int(index), "params": p}


def trajectory(p: WorldParams) -> np.ndarray:
    """(frames, 2) object centres under velocity, gravity and elastic bounces."""
    r = SIZES[p.size] * min(p.width, p.height)
    x, y, vx, vy = p.x0, p.y0, p.vx, p.vy
    out = []
    for _ in range(p.frames):
        out.append((x, y))
        vy += p.gravity
        x, y = x + vx, y + vy
        if x < r or x > p.width - r:  # reflect off the side walls
            vx = -vx
            x = 2 * r - x if x < r else 2 * (p.width - r) - x
        if y < r or y > p.height - r:  # the ceiling and the floor
            vy = -vy
            y = 2 * r - y if y < r else 2 * (p.height - r) - y
    return np.asarray(out, np.float32)


def render(p: WorldParams) -> np.ndarray:
    """Renders (frames, height, width, 3) float32 in [-1, 1], anti-aliased by signed distance."""
    r = SIZES[p.size] * min(p.width, p.height)
    yy, xx = np.mgrid[0:p.height, 0:p.width].astype(np.float32) + 0.5
    centres = trajectory(p)
    dx = xx[None] - centres[:, 0, None, None]
    dy = yy[None] - centres[:, 1, None, None]
    if p.shape == "circle":
        dist = np.sqrt(dx * dx + dy * dy) - r
    elif p.shape == "square":
        dist = np.maximum(np.abs(dx), np.abs(dy)) - 0.85 * r
    else:  # apex down (image y grows downward): flat top edge at -r, the two slanted edges meet at +r
        edge = (np.sqrt(3.0) * np.abs(dx) + dy) / 2.0
        dist = np.maximum(edge - 0.5 * r, -dy - r)
    alpha = np.clip(0.5 - dist, 0.0, 1.0)[..., None]
    bg = np.asarray(p.background, np.float32)
    fg = np.asarray(COLORS[p.color], np.float32)
    video = (1 - alpha) * bg + alpha * fg
    return (video / 127.5 - 1.0).astype(np.float32)
