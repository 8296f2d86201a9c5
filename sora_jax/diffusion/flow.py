"""Rectified flow: x_t = (1 - t) x_0 + t eps, trained by matching the velocity v = eps - x_0.

The network's raw output is read as the velocity itself ("velocity") or as the clean sample x_0
("x0", converted to v = (x_t - x_0) / t). The loss is the velocity error either way. Pixel-space models
whose patches have more features than the hidden width (8x8x3 = 192 > 128 in the tiny config) cannot
carry the full-rank noise through the bottleneck that v-prediction requires and leave their samples
noisy; predicting x_0, which lies on a low-dimensional manifold, removes that (Li & He 2025, "Back to
Basics: Let Denoising Generative Models Denoise").

Timesteps are drawn per sample from a logit-normal and then shifted toward noise by an amount that
grows with the sample's token count (SD3 / Open-Sora 2.0): a large video keeps more of its structure at
a given t than a small image does, so it needs more time at high noise.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sora_jax.diffusion import tasks as conditioning_tasks
from sora_jax.layers.common import gather_segments
from sora_jax.models.dit import PackedInputs


def token_shift(num_tokens: jax.Array, flow_cfg) -> jax.Array:
    """Shift factor base_shift * sqrt(n / base_tokens), clipped to [1, max_shift]; 1 means no shift.

    base_shift sets the level for a sample of base_tokens tokens. Pixel-space models need it well
    above 1: a 192-feature patch reveals the object's layout at very high noise, so the layout is
    decided near t = 1, where an unshifted logit-normal rarely trains.
    """
    n = jnp.maximum(num_tokens.astype(jnp.float32), 1.0)
    return jnp.clip(flow_cfg.base_shift * jnp.sqrt(n / flow_cfg.shift_base_tokens), 1.0, flow_cfg.max_shift)


def shift_t(t: jax.Array, shift: jax.Array) -> jax.Array:
    """Warps t in [0, 1] toward 1 (noise) by `shift`: s t / (1 + (s - 1) t)."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def sample_t(key: jax.Array, num_tokens: jax.Array, flow_cfg) -> jax.Array:
    """Per-sample training timesteps [B, S]: logit-normal, then shifted by token count."""
    z = flow_cfg.logit_mean + flow_cfg.logit_std * jax.random.normal(key, num_tokens.shape)
    t = jax.nn.sigmoid(z)
    return shift_t(t, token_shift(num_tokens, flow_cfg))


def predict_velocity(model, inputs: PackedInputs, flow_cfg) -> jax.Array:
    """The model's velocity estimate for packed inputs, whatever it was trained to output."""
    out = model(inputs)
    if flow_cfg.prediction == "velocity":
        return out
    if flow_cfg.prediction == "x0":
        t = gather_segments(inputs.t, inputs.segments)[..., None]
        return (inputs.tokens - out) / jnp.maximum(t, flow_cfg.t_min)
    raise ValueError(f"config.flow.prediction={flow_cfg.prediction!r}; choose 'velocity' or 'x0'.")


def flow_loss(model, batch: dict, key: jax.Array, flow_cfg, caption_dropout: float, tasks: bool = False):
    """Mean squared velocity error over the generated (non-padding, not given) tokens of a packed batch.

    tasks: mix the per-token conditioning tasks of config.flow.tasks (sora_jax.diffusion.tasks): some tokens of
      a sample are given clean (at t = 0) and only the others are noised and scored. Training does; the
      held-out loss, comparable across runs, is text-to-video.

    Returns:
      (loss, aux) where aux holds the token count behind the mean.
    """
    k_t, k_noise, k_drop = jax.random.split(key, 3)
    x0, segments = batch["video"], batch["video_segment_ids"]
    num_tokens = batch["info"][..., 3]
    t = sample_t(k_t, num_tokens, flow_cfg)
    if "t" in batch:  # fixed timesteps, for validation
        t = batch["t"]
    noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
    t_tok = gather_segments(t, segments)[..., None]
    xt = (1.0 - t_tok) * x0 + t_tok * noise
    drop = jax.random.bernoulli(k_drop, caption_dropout, t.shape)
    weights = conditioning_tasks.task_weights(flow_cfg) if tasks else None
    given = None
    if weights is not None:  # a separate key: text-to-video-only training draws exactly as before
        given, _ = conditioning_tasks.given_tokens(jax.random.fold_in(key, 7), weights, batch["video_pos"][..., 0],
                                                   segments, batch["info"][..., 0])
        xt = jnp.where(given[..., None], x0, xt)
    inputs = PackedInputs(xt, batch["video_pos"], segments, t, batch["text"], batch["text_segment_ids"],
                          batch["text_positions"], drop, batch.get("meta"), given=given)
    pred = predict_velocity(model, inputs, flow_cfg)
    real = segments > 0
    mask = (real if given is None else real & ~given).astype(jnp.float32)[..., None]
    denom = jnp.maximum(mask.sum() * x0.shape[-1], 1.0)
    loss = jnp.sum(mask * jnp.square(pred - (noise - x0))) / denom
    return loss, {"real_tokens": jnp.sum(real.astype(jnp.float32))}
