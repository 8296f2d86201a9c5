"""The T5 v1.1 / umT5 encoder (the text side of Wan 2.1 and many video models), packed like our own.

Behaviour follows the published architecture: RMS norm without bias or mean subtraction; self-attention
with no 1/sqrt(d) scaling and a learned bias per (bucketed relative position, head); a gated-GELU
(tanh) feed-forward; pre-norm residual blocks and a final norm. T5 v1.1 learns one bias table, in the
first layer, and reuses its bias in every layer; umT5 learns a table per layer.

Like the tiny encoder it takes (ids, segments, positions) [B, Lt]: tokens attend only within their
segment (0 is padding) and relative positions come from `positions`, so captions packed into one row
are encoded exactly as if each had a row of its own. The relative bias rules out the fused attention
kernels, so attention is an explicit einsum with an additive [B, H, L, L] bias; captions are short.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from sora_jax import sharding
from sora_jax.layers.common import dense, norm

_MASK_VALUE = -1e30  # finite: a row can never be fully masked (a token sees itself), but stay NaN-free


@dataclasses.dataclass(frozen=True)
class T5EncoderConfig:
    """Architecture of a T5 v1.1 (per_layer_bias=False) or umT5 (per_layer_bias=True) encoder."""

    vocab_size: int
    d_model: int
    d_kv: int
    num_heads: int
    d_ff: int
    num_layers: int
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6
    per_layer_bias: bool = False


def relative_position_buckets(relative: jax.Array, num_buckets: int, max_distance: int) -> jax.Array:
    """Bidirectional T5 buckets of `relative` = key position - query position (int32, same shape).

    Half the buckets are for keys after the query, half for keys before. Within each half, distances
    below a quarter of `num_buckets` get a bucket each; larger ones share logarithmically wider buckets up
    to `max_distance`, beyond which all distances share the last bucket.
    """
    half = num_buckets // 2
    exact = half // 2
    side = jnp.where(relative > 0, half, 0)
    distance = jnp.abs(relative)
    # max(., 1) keeps log() finite where the exact branch is taken anyway; the int cast truncates, as the
    # original does.
    scaled = (jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / exact) / math.log(max_distance / exact)
              * (half - exact))
    far = jnp.minimum(exact + scaled.astype(jnp.int32), half - 1)
    return (side + jnp.where(distance < exact, distance, far)).astype(jnp.int32)


class T5Attention(nnx.Module):
    """Unscaled multi-head self-attention with an additive bias; optionally owns a relative-bias table."""

    def __init__(self, cfg: T5EncoderConfig, *, has_bias_table: bool, rngs: nnx.Rngs, dtype, param_dtype):
        self.heads, self.d_kv, self.dtype = cfg.num_heads, cfg.d_kv, dtype
        inner = cfg.num_heads * cfg.d_kv  # need not equal d_model
        kw = dict(rngs=rngs, use_bias=False, dtype=dtype, param_dtype=param_dtype)
        self.q = dense(cfg.d_model, inner, ("embed", "heads"), **kw)
        self.k = dense(cfg.d_model, inner, ("embed", "heads"), **kw)
        self.v = dense(cfg.d_model, inner, ("embed", "heads"), **kw)
        self.o = dense(inner, cfg.d_model, ("heads", "embed"), **kw)
        # [buckets, heads] is tiny (32 x 64 for umT5-XXL): replicated rather than split.
        self.relative_bias = nnx.Param(
            nnx.initializers.normal(cfg.d_model ** -0.5)(rngs.params(), (cfg.num_buckets, cfg.num_heads),
                                                       param_dtype),
            out_sharding=(None, None)) if has_bias_table else None

    def position_bias(self, buckets: jax.Array) -> jax.Array:
        """[B, H, Lq, Lk] float32 bias from bucket ids [B, Lq, Lk]; only for a layer with a table."""
        return jnp.take(self.relative_bias[...].astype(jnp.float32), buckets, axis=0).transpose(0, 3, 1, 2)

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        """x [B, L, d_model]; bias [B, H, L, L] float32 (relative bias plus segment mask)."""
        b, length, _ = x.shape
        q, k, v = (proj(x).reshape(b, length, self.heads, self.d_kv).astype(self.dtype)
                   for proj in (self.q, self.k, self.v))
        q = sharding.constrain(q, ("batch", "text_len", "act_heads", None))
        # No 1/sqrt(d_kv): T5 folds that scale into its initialisation, and the trained weights expect none.
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + bias
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        return self.o(out.reshape(b, length, self.heads * self.d_kv))


class T5GatedFFN(nnx.Module):
    """wo(gelu_tanh(wi_0 x) * wi_1 x): the gated-GELU feed-forward of T5 v1.1 and umT5."""

    def __init__(self, cfg: T5EncoderConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, use_bias=False, dtype=dtype, param_dtype=param_dtype)
        self.wi_0 = dense(cfg.d_model, cfg.d_ff, ("embed", "mlp"), **kw)
        self.wi_1 = dense(cfg.d_model, cfg.d_ff, ("embed", "mlp"), **kw)
        self.wo = dense(cfg.d_ff, cfg.d_model, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.wo(jax.nn.gelu(self.wi_0(x), approximate=True) * self.wi_1(x))


class T5Block(nnx.Module):
    """Pre-norm self-attention and feed-forward, each added to the residual stream."""

    def __init__(self, cfg: T5EncoderConfig, *, has_bias_table: bool, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.attn_norm = norm(cfg.d_model, kind="rms", eps=cfg.eps, dtype=dtype, **kw)
        self.attn = T5Attention(cfg, has_bias_table=has_bias_table, dtype=dtype, **kw)
        self.ffn_norm = norm(cfg.d_model, kind="rms", eps=cfg.eps, dtype=dtype, **kw)
        self.ffn = T5GatedFFN(cfg, dtype=dtype, **kw)

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        x = _clamp_half(x + self.attn(self.attn_norm(x), bias))
        return _clamp_half(x + self.ffn(self.ffn_norm(x)))


def _clamp_half(x: jax.Array) -> jax.Array:
    """float16 only: pulls overflowing activations back into range, as T5 needs in half precision
    (its feed-forward outputs exceed float16's range in the larger checkpoints)."""
    if x.dtype != jnp.float16:
        return x
    limit = jnp.finfo(jnp.float16).max - 1000.0
    return jnp.clip(jnp.where(jnp.isinf(x), jnp.sign(x) * limit, x), -limit, limit)


class T5Encoder(nnx.Module):
    """T5 v1.1 / umT5 encoder: (ids, segments, positions) [B, Lt] -> [B, Lt, d_model].

    Attributes:
      out_dim: the output width (d_model), as every text encoder has.
      cfg: the architecture.
    """

    def __init__(self, cfg: T5EncoderConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.cfg, self.out_dim, self.dtype = cfg, cfg.d_model, dtype
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                               embedding_init=nnx.with_partitioning(nnx.initializers.normal(1.0), ("vocab", "embed")))
        self.layers = nnx.List([
            T5Block(cfg, has_bias_table=cfg.per_layer_bias or i == 0, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
            for i in range(cfg.num_layers)])
        self.final_norm = norm(cfg.d_model, kind="rms", eps=cfg.eps, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, ids: jax.Array, segments: jax.Array, positions: jax.Array) -> jax.Array:
        """Encodes packed captions.

        Args:
          ids: int token ids [B, Lt].
          segments: int [B, Lt]; a token attends only to tokens with its segment id; 0 marks padding.
          positions: int [B, Lt]; each token's position within its own caption (relative distances are
            taken from these, so a caption's offset in the row does not matter).

        Returns:
          [B, Lt, d_model] in the compute dtype; rows of padding tokens are unspecified (but finite).
        """
        buckets = relative_position_buckets(positions[:, None, :] - positions[:, :, None], self.cfg.num_buckets,
                                            self.cfg.max_distance)
        same = (segments[:, :, None] == segments[:, None, :])[:, None]  # [B, 1, Lq, Lk]
        x = sharding.constrain(self.embed(ids), ("batch", "text_len", "act_embed"))
        bias = None
        for layer in self.layers:
            if layer.attn.relative_bias is not None:  # T5: layer 0 only, then reused; umT5: every layer
                bias = jnp.where(same, layer.attn.position_bias(buckets), _MASK_VALUE)
            x = layer(x, bias)
        return self.final_norm(x)

    def encode(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """Hugging Face style: one caption per row, `attention_mask` 1 for tokens and 0 for padding.

        Returns:
          [B, L, d_model]; padding rows are unspecified.
        """
        mask = jnp.asarray(attention_mask, jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(mask.shape[1], dtype=jnp.int32), mask.shape)
        return self(jnp.asarray(input_ids, jnp.int32), mask, positions)
