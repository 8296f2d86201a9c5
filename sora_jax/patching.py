"""Spacetime patches: latent video (T, H, W, C) <-> tokens (N, pt*ph*pw*C) with (t, h, w) positions.

Shared by the data pipeline (numpy) and the sampler (jax.numpy): einops dispatches on the array type,
so there is one definition of the token layout.
"""
from __future__ import annotations

from typing import Sequence

import einops
import numpy as np

Patch = tuple[int, int, int]


def check_divisible(shape: Sequence[int], patch: Patch, what: str = "latent") -> tuple[int, int, int]:
    """Returns the token grid (nt, nh, nw), or raises a ValueError naming the bad dimension."""
    if len(shape) < 3:
        raise ValueError(f"{what} must be (T, H, W, C); got shape {tuple(shape)}.")
    grid = []
    for name, size, p in zip(("frames", "height", "width"), shape[:3], patch):
        if size <= 0:
            raise ValueError(f"{what} {name} must be positive, got {size}.")
        if size % p:
            raise ValueError(
                f"{what} {name} {size} is not divisible by the patch size {p} along {name}; "
                f"use a multiple of {p}.")
        grid.append(size // p)
    return tuple(grid)


def patchify(x, patch: Patch):
    """Splits a (T, H, W, C) array into (N, pt*ph*pw*C) tokens in (t, h, w) raster order."""
    check_divisible(x.shape, patch)
    pt, ph, pw = patch
    return einops.rearrange(x, "(t pt) (h ph) (w pw) c -> (t h w) (pt ph pw c)", pt=pt, ph=ph, pw=pw)


def unpatchify(tokens, grid: Sequence[int], patch: Patch, channels: int):
    """Inverse of `patchify`: (N, pt*ph*pw*C) tokens on grid (nt, nh, nw) -> (T, H, W, C)."""
    nt, nh, nw = grid
    if tokens.shape[0] != nt * nh * nw:
        raise ValueError(f"{tokens.shape[0]} tokens do not fill a grid of {tuple(grid)}.")
    pt, ph, pw = patch
    return einops.rearrange(tokens, "(t h w) (pt ph pw c) -> (t pt) (h ph) (w pw) c",
                            t=nt, h=nh, w=nw, pt=pt, ph=ph, pw=pw, c=channels)


def positions(grid: Sequence[int]) -> np.ndarray:
    """(N, 3) int32 (t, h, w) indices of each token, matching `patchify`'s order."""
    nt, nh, nw = grid
    t, h, w = np.meshgrid(np.arange(nt), np.arange(nh), np.arange(nw), indexing="ij")
    return np.stack([t.ravel(), h.ravel(), w.ravel()], axis=-1).astype(np.int32)
