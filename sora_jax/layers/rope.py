"""3D rotary position embedding from per-token (t, h, w) positions.

The head dimension's rotation pairs are split between the three axes (time gets the remainder), as in
Wan 2.1 and HunyuanVideo. For a head dimension d this is exactly diffusers' WanRotaryPosEmbed: height and
width get d // 6 pairs (2 * (d // 6) channels) each, time the other d - 4 * (d // 6) channels; each axis'
frequencies are theta^(-2k / channels), and adjacent channels (2k, 2k + 1) rotate together, the axes
concatenated in (t, h, w) order. So a Wan checkpoint needs no option here (tests/test_wan_parity.py).
Positions come from each token's own sample, so packed samples all start at (0, 0, 0) and a model
trained on small videos sees familiar relative offsets at any size.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def split_pairs(head_dim: int) -> tuple[int, int, int]:
    """Rotation pairs per axis (t, h, w) for a head dimension."""
    if head_dim % 2:
        raise ValueError(f"3D RoPE needs an even head dimension, got {head_dim}.")
    pairs = head_dim // 2
    hw = pairs // 3
    return pairs - 2 * hw, hw, hw


def rope_angles(positions: jax.Array, head_dim: int, theta: float = 10000.0) -> jax.Array:
    """[B, L, head_dim // 2] rotation angles for integer positions [B, L, 3]."""
    angles = []
    for axis, n in enumerate(split_pairs(head_dim)):
        freqs = 1.0 / (theta ** (jnp.arange(n, dtype=jnp.float32) * 2.0 / (2 * n)))
        angles.append(positions[..., axis, None].astype(jnp.float32) * freqs)
    return jnp.concatenate(angles, axis=-1)


def apply_rope(x: jax.Array, angles: jax.Array) -> jax.Array:
    """Rotates adjacent pairs of x [B, L, H, D] by angles [B, L, D // 2] (complex multiplication)."""
    dtype = x.dtype
    x = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    cos, sin = jnp.cos(angles)[:, :, None], jnp.sin(angles)[:, :, None]
    re = x[..., 0] * cos - x[..., 1] * sin
    im = x[..., 0] * sin + x[..., 1] * cos
    return jnp.stack([re, im], axis=-1).reshape(*x.shape[:-2], -1).astype(dtype)
