"""Packed attention: one API (q, k, v, segment ids), several backends chosen by name.

A query attends only to keys with the same segment id, so samples packed into one sequence never see
each other. Padding has segment id 0; padding queries attend to padding keys (or to nothing, which the
finite mask value turns into a harmless uniform average) and their outputs are masked downstream.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from sora_jax import sharding
from sora_jax.layers.common import dense, norm
from sora_jax.layers.rope import apply_rope

_MASK_VALUE = -1e30  # finite: a fully masked row gives a uniform softmax, never NaN


def segment_mask(q_segments: jax.Array, kv_segments: jax.Array) -> jax.Array:
    """[B, 1, Lq, Lk] boolean mask: same segment id."""
    return (q_segments[:, :, None] == kv_segments[:, None, :])[:, None]


def xla_attention(q, k, v, mask):
    """Reference backend: explicit logits in float32. q: [B, Lq, H, D], k/v: [B, Lk, H, D]."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask, logits, _MASK_VALUE)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def _jax_attention(implementation: str | None) -> Callable:
    def attend(q, k, v, mask):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
    return attend


# "cudnn" is the fused flash kernel on NVIDIA GPUs; "jax" lets jax pick. Both take the same mask.
ATTENTION_BACKENDS: dict[str, Callable] = {
    "xla": xla_attention,
    "jax": _jax_attention(None),
    "cudnn": _jax_attention("cudnn"),
}


def attend(q, k, v, mask, backend: str):
    """Dispatches to a registered backend; unknown names list the choices."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {sorted(ATTENTION_BACKENDS)}.")
    return ATTENTION_BACKENDS[backend](q, k, v, mask)


class Attention(nnx.Module):
    """Multi-head attention with QK-RMSNorm; self-attention (with RoPE) or cross-attention."""

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs, kv_dim: int | None = None,
                 backend: str = "xla", qk_norm: bool = True, dtype=jnp.float32):
        if dim % heads:
            raise ValueError(f"hidden size {dim} is not divisible by {heads} heads.")
        kv_dim = kv_dim or dim
        self.heads, self.head_dim, self.backend = heads, dim // heads, backend
        self.q = dense(dim, dim, ("embed", "heads"), rngs=rngs, dtype=dtype)
        self.k = dense(kv_dim, dim, ("embed", "heads"), rngs=rngs, dtype=dtype)
        self.v = dense(kv_dim, dim, ("embed", "heads"), rngs=rngs, dtype=dtype)
        self.out = dense(dim, dim, ("heads", "embed"), rngs=rngs, dtype=dtype)
        self.q_norm = norm(self.head_dim, rngs=rngs, kind="rms", axis="kv") if qk_norm else None
        self.k_norm = norm(self.head_dim, rngs=rngs, kind="rms", axis="kv") if qk_norm else None

    def __call__(self, x, mask, context=None, rope=None):
        kv_in = x if context is None else context
        b, lq, _ = x.shape
        q = self.q(x).reshape(b, lq, self.heads, self.head_dim)
        k = self.k(kv_in).reshape(b, kv_in.shape[1], self.heads, self.head_dim)
        v = self.v(kv_in).reshape(b, kv_in.shape[1], self.heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        q = sharding.constrain(q, ("batch", "length", "act_heads", None))
        out = attend(q, k, v, mask, self.backend).reshape(b, lq, -1)
        return self.out(out)
