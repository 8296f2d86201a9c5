"""Spatial tiling for large frames (1080p video, 2048x2048 images): overlapping tiles, blended.

Each tile goes through the VAE's chunked (causal, frame-cached) path, so memory is bounded in space and
in time. Tiles overlap by `tile - stride` pixels; in the overlap, each tile's output is weighted by a
linear ramp that falls toward its edge (where its zero padding makes it least accurate), and the
weighted outputs are normalised by the summed weights. Borders of the frame get no ramp.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Start offsets covering [0, size) with tiles of `tile` every `stride`; the last tile is flush."""
    if size <= tile:
        return [0]
    return sorted(set(range(0, size - tile, stride)) | {size - tile})


def _ramp(length: int, lo: int, hi: int) -> np.ndarray:
    """Weights over one tile axis: linear ramps of lo (hi) samples at the start (end), 1 elsewhere."""
    w = np.ones(length, np.float32)
    if lo:
        w[:lo] = (np.arange(lo, dtype=np.float32) + 1) / (lo + 1)
    if hi:
        w[length - hi:] = np.minimum(w[length - hi:], ((np.arange(hi, dtype=np.float32) + 1) / (hi + 1))[::-1])
    return w


def _check(tile: int, stride: int, unit: int) -> None:
    if tile % unit or stride % unit or not 0 < stride <= tile:
        raise ValueError(f"tile={tile} and stride={stride} must be multiples of {unit} with 0 < stride <= tile.")


def _blend(run_tile, height: int, width: int, tile: int, stride: int, scale: float, out_shape) -> np.ndarray:
    """Runs `run_tile(y0, x0)` over the tile grid (input units) and blends outputs (input units x scale)."""
    out = np.zeros(out_shape, np.float32)
    norm = np.zeros(out_shape[2:4], np.float32)
    ys, xs = tile_starts(height, tile, stride), tile_starts(width, tile, stride)
    for i, y0 in enumerate(ys):
        for j, x0 in enumerate(xs):
            piece = np.asarray(run_tile(y0, x0), np.float32)
            th, tw = piece.shape[2:4]
            oy, ox = int(y0 * scale), int(x0 * scale)
            lo_y = oy and (ys[i - 1] * scale + th - oy) if i else 0
            hi_y = (oy + th - ys[i + 1] * scale) if i + 1 < len(ys) else 0
            lo_x = ox and (xs[j - 1] * scale + tw - ox) if j else 0
            hi_x = (ox + tw - xs[j + 1] * scale) if j + 1 < len(xs) else 0
            w = np.outer(_ramp(th, int(lo_y), int(hi_y)), _ramp(tw, int(lo_x), int(hi_x)))
            out[:, :, oy:oy + th, ox:ox + tw] += piece * w[None, None, :, :, None]
            norm[oy:oy + th, ox:ox + tw] += w
    return out / norm[None, None, :, :, None]


def encode_tiled(vae, video, tile: int = 256, stride: int = 192, chunk: int | None = None) -> np.ndarray:
    """Latent mean of a (B, T, H, W, C) video from overlapping spatial tiles (pixels)."""
    vae.check_video(video)
    sh = vae.stride[1]
    _check(tile, stride, sh)
    b, t, h, w, _ = video.shape
    out_shape = (b, vae.latent_shape(t, h, w)[0], h // sh, w // sh, vae.cfg.z_dim)
    return _blend(lambda y0, x0: vae.encode_chunked(jnp.asarray(video[:, :, y0:y0 + tile, x0:x0 + tile]), chunk),
                  h, w, tile, stride, 1.0 / sh, out_shape)


def decode_tiled(vae, latent, tile: int = 256, stride: int = 192, chunk: int = 4) -> np.ndarray:
    """Video from a (B, T', H', W', z) latent, decoded in overlapping tiles (tile, stride in pixels)."""
    sh = vae.stride[1]
    _check(tile, stride, sh)
    lt, ls = tile // sh, stride // sh
    b, t, h, w, _ = latent.shape
    out_shape = (b, 1 + vae.stride[0] * (t - 1), h * sh, w * sh, vae.cfg.out_channels)

    def run(y0, x0):
        pieces = vae.decode_chunked(jnp.asarray(latent[:, :, y0:y0 + lt, x0:x0 + lt]), chunk)
        return np.concatenate([np.asarray(p) for p in pieces], axis=1)

    return np.clip(_blend(run, h, w, lt, ls, float(sh), out_shape), -1.0, 1.0)
