"""Small building blocks whose parameters carry logical axis names."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

# Parameters are annotated, never placed: the train state is created under jit with out_shardings.
nnx.use_eager_sharding(False)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dense(din: int, dout: int, axes: tuple[str | None, str | None], *, rngs: nnx.Rngs,
          use_bias: bool = True, zero_init: bool = False, dtype=jnp.float32,
          param_dtype=jnp.float32) -> nnx.Linear:
    """An nnx.Linear whose kernel is annotated `axes` (and bias the output axis)."""
    kinit = nnx.initializers.zeros if zero_init else nnx.initializers.xavier_uniform()
    return nnx.Linear(
        din, dout, use_bias=use_bias, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
        kernel_init=nnx.with_partitioning(kinit, axes),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros, (axes[1],)))


def norm(dim: int, *, rngs: nnx.Rngs, affine: bool = True, eps: float = 1e-6, kind: str = "layer",
         axis: str = "embed", dtype=None, param_dtype=jnp.float32) -> nnx.Module:
    """LayerNorm or RMSNorm over the last axis; `affine=False` for adaLN, where modulation scales.

    The statistics are computed in float32 whatever `dtype` is; `dtype` (None: the input's) is the output's.
    """
    kw = dict(epsilon=eps, use_scale=affine, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    if kind == "rms":
        return nnx.RMSNorm(dim, **kw, scale_init=nnx.with_partitioning(nnx.initializers.ones, (axis,)))
    return nnx.LayerNorm(dim, use_bias=affine, **kw,
                         scale_init=nnx.with_partitioning(nnx.initializers.ones, (axis,)),
                         bias_init=nnx.with_partitioning(nnx.initializers.zeros, (axis,)))


class MLP(nnx.Module):
    """GELU(tanh) feed-forward: embed -> mlp -> embed."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.fc1 = dense(dim, hidden, ("embed", "mlp"), rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.fc2 = dense(hidden, dim, ("mlp", "embed"), rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of (continuous) timesteps, [..., dim]; t is scaled to [0, 1000].

    Cosines first, then sines, with frequencies max_period^(-k / (dim / 2)): diffusers' `Timesteps` with
    flip_sin_to_cos=True and downscale_freq_shift=0 (Wan 2.1's) applied to 1000 t.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = (t.astype(jnp.float32) * 1000.0)[..., None] * freqs
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def gather_segments(per_sample: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """Per-token values from per-sample ones: [B, S, ...] indexed by segment id (1-based) -> [B, L, ...].

    Padding tokens (segment 0) receive sample 0's value; every consumer masks them out.
    """
    idx = jnp.clip(segment_ids - 1, 0, per_sample.shape[1] - 1)
    idx = idx.reshape(idx.shape + (1,) * (per_sample.ndim - 2))
    return jnp.take_along_axis(per_sample, idx, axis=1)

