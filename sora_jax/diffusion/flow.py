"""Rectified flow: x_t = (1 - t) x_0 + t eps, the model predicts v = eps - x_0.

Timesteps are drawn per sample from a logit-normal and then shifted toward noise by an amount that
grows with the sample's token count (SD3 / Open-Sora 2.0): a large video keeps more of its structure at
a given t than a small image does, so it needs more time at high noise.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sora_jax.layers.common import gather_segments
from sora_jax.models.dit import PackedInputs


def token_shift(num_tokens: jax.Array, base_tokens: float, max_shift: float) -> jax.Array:
    """Shift factor sqrt(n / base), clipped to [1, max_shift]; 1 means no shift."""
    n = jnp.maximum(num_tokens.astype(jnp.float32), 1.0)
    return jnp.clip(jnp.sqrt(n / base_tokens), 1.0, max_shift)


def shift_t(t: jax.Array, shift: jax.Array) -> jax.Array:
    """Warps t in [0, 1] toward 1 (noise) by `shift`: s t / (1 + (s - 1) t)."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def sample_t(key: jax.Array, num_tokens: jax.Array, flow_cfg) -> jax.Array:
    """Per-sample training timesteps [B, S]: logit-normal, then shifted by token count."""
    z = flow_cfg.logit_mean + flow_cfg.logit_std * jax.random.normal(key, num_tokens.shape)
    t = jax.nn.sigmoid(z)
    return shift_t(t, token_shift(num_tokens, flow_cfg.shift_base_tokens, flow_cfg.max_shift))


def flow_loss(model, batch: dict, key: jax.Array, flow_cfg, caption_dropout: float):
    """Mean squared velocity error over real (non-padding) tokens of a packed batch.

    Returns:
      (loss, aux) where aux holds the token count behind the mean.
    """
    k_t, k_noise, k_drop = jax.random.split(key, 3)
    x0, segments = batch["video"], batch["video_seg"]
    num_tokens = batch["info"][..., 3]
    t = sample_t(k_t, num_tokens, flow_cfg)
    if "t" in batch:  # fixed timesteps, for validation
        t = batch["t"]
    noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
    t_tok = gather_segments(t, segments)[..., None]
    xt = (1.0 - t_tok) * x0 + t_tok * noise
    drop = jax.random.bernoulli(k_drop, caption_dropout, t.shape)
    pred = model(PackedInputs(xt, batch["video_pos"], segments, t, batch["text"], batch["text_seg"],
                              batch["text_pos"], drop))
    mask = (segments > 0).astype(jnp.float32)[..., None]
    denom = jnp.maximum(mask.sum() * x0.shape[-1], 1.0)
    loss = jnp.sum(mask * jnp.square(pred - (noise - x0))) / denom
    return loss, {"real_tokens": mask.sum()}
