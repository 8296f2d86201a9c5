"""Reconstruction quality: PSNR and SSIM of videos in [-1, 1], channels-last (B, T, H, W, C).

Both are computed on the [0, 1] scale per sample (PSNR over the whole clip, SSIM averaged over frames
and channels) and returned per sample, so callers can average over any set of samples. SSIM follows
Wang et al. (2004) with an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03 and 'valid'
filtering -- the definition `tf.image.ssim` uses, which the tests compare against.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def psnr(x: jax.Array, y: jax.Array) -> jax.Array:
    """Per-sample PSNR in dB of two (B, ...) arrays in [-1, 1]."""
    mse = jnp.mean(jnp.square((x.astype(jnp.float32) - y.astype(jnp.float32)) / 2.0),
                   axis=tuple(range(1, x.ndim)))
    return 10.0 * jnp.log10(1.0 / jnp.maximum(mse, 1e-10))


def _gaussian_window(size: int, sigma: float) -> jax.Array:
    coords = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2.0
    g = jnp.exp(-0.5 * jnp.square(coords / sigma))
    return g / g.sum()


def _filter(x: jax.Array, window: jax.Array) -> jax.Array:
    """Separable 'valid' filtering of (N, H, W, C) over H and W, each channel on its own."""
    c = x.shape[-1]
    size = window.shape[0]
    kh = jnp.tile(window.reshape(size, 1, 1, 1), (1, 1, 1, c))
    kw = jnp.tile(window.reshape(1, size, 1, 1), (1, 1, 1, c))
    dn = ("NHWC", "HWIO", "NHWC")
    x = jax.lax.conv_general_dilated(x, kh, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c)
    return jax.lax.conv_general_dilated(x, kw, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c)


def ssim(x: jax.Array, y: jax.Array, window: int = 11, sigma: float = 1.5) -> jax.Array:
    """Per-sample SSIM of two (B, T, H, W, C) videos in [-1, 1]; frames must be at least `window` px."""
    b, t, h, w, c = x.shape
    if min(h, w) < window:
        raise ValueError(f"SSIM needs frames of at least {window}x{window} px; got {h}x{w}.")
    x = ((x.astype(jnp.float32) + 1.0) / 2.0).reshape(b * t, h, w, c)
    y = ((y.astype(jnp.float32) + 1.0) / 2.0).reshape(b * t, h, w, c)
    g = _gaussian_window(window, sigma)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mx, my = _filter(x, g), _filter(y, g)
    sxx = _filter(x * x, g) - mx * mx
    syy = _filter(y * y, g) - my * my
    sxy = _filter(x * y, g) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.reshape(b, -1).mean(axis=1)
