"""Packed attention: one API (q, k, v, segment ids), several backends chosen by name.

A query attends only to keys with the same segment id, so samples packed into one sequence never see
each other. No backend receives a materialised [L, L] mask: each derives what it needs from the segment
ids, blockwise where it can, and the ones that can skip block pairs sharing no segment do.

Backend contract (every entry of ATTENTION_BACKENDS):
  fn(q, k, v, q_segments, kv_segments, *, block) -> out
  q [B, Lq, H, D], k/v [B, Lk, H, D] in the compute dtype; segments int32 [B, Lq] / [B, Lk]. Padding has
  segment id 0 and, like any segment, attends only to itself. Outputs of query rows whose segment has no
  key at all are unspecified (but finite); every consumer masks padding out. `block` is the tile size of
  the blockwise backends (others ignore it).
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from sora_jax import sharding
from sora_jax.layers.blockwise import blockwise_attention
from sora_jax.layers.common import dense, norm
from sora_jax.layers.rope import apply_rope

_MASK_VALUE = -1e30  # finite: a fully masked row gives a uniform softmax, never NaN


def xla_attention(q, k, v, q_segments, kv_segments, *, block: int = 0):
    """Reference backend: explicit [B, H, Lq, Lk] float32 logits, masked by segment. Kept for tests."""
    del block
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    mask = (q_segments[:, :, None] == kv_segments[:, None, :])[:, None]
    logits = jnp.where(mask, logits, _MASK_VALUE)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def _registry() -> dict[str, Callable]:
    from sora_jax.layers import attention_kernels  # GPU/TPU kernels; imports nothing accelerator-only at load
    return {
        "xla": xla_attention,
        "blockwise": blockwise_attention,
        "cudnn": attention_kernels.cudnn_attention,
        "splash": attention_kernels.splash_attention,
    }


ATTENTION_BACKENDS: dict[str, Callable] = _registry()
# "auto" picks per platform: the fused kernel that skips cross-sample work where one exists.
AUTO_BACKEND = {"gpu": "cudnn", "cuda": "cudnn", "tpu": "splash", "cpu": "blockwise"}
BACKEND_CHOICES = tuple(sorted(ATTENTION_BACKENDS)) + ("auto",)


def resolve_backend(name: str, platform: str | None = None, dtype=None) -> str:
    """The registered backend for `name`; "auto" maps the platform (default: jax's) through AUTO_BACKEND.

    cuDNN's flash kernels have no float32 variant, so "auto" on a GPU with float32 inputs is `blockwise`.
    """
    if name == "auto":
        platform = platform or jax.default_backend()
        chosen = AUTO_BACKEND.get(platform, "blockwise")
        if chosen == "cudnn" and dtype is not None and jnp.dtype(dtype) == jnp.float32:
            return "blockwise"
        return chosen
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKEND_CHOICES}.")
    return name


def attend(q, k, v, q_segments, kv_segments, backend: str, block: int = 128):
    """Segment-restricted attention through the named backend (see the module docstring for shapes).

    Under an active mesh (sharding.use_mesh) the backend runs per shard; see `shard_attention`.
    """
    fn = functools.partial(ATTENTION_BACKENDS[resolve_backend(backend, dtype=q.dtype)], block=block)
    return shard_attention(fn, q, k, v, q_segments.astype(jnp.int32), kv_segments.astype(jnp.int32))


def _fit(axes, size: int, mesh) -> str | tuple | None:
    """The longest prefix of mesh `axes` whose product divides `size` (the rest is replicated)."""
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    kept: list[str] = []
    for name in names:
        if size % math.prod(mesh.shape[a] for a in kept + [name]):
            break
        kept.append(name)
    return None if not kept else kept[0] if len(kept) == 1 else tuple(kept)


def shard_attention(fn: Callable, q, k, v, q_segments, kv_segments):
    """Runs `fn` on each device's shard: rows over the batch axes, heads over the tensor axis, and the
    queries' length over the context axis, with keys and values gathered whole (context parallelism).

    Why a shard_map rather than leaving it to the partitioner: the blockwise and fused kernels loop over
    rows and blocks with dynamic slices, which the partitioner would answer by gathering the whole batch
    on every device. Here each device runs the kernel on its own rows, heads and query chunk; the key and
    value all-gather over `context` happens at the shard_map boundary (its transpose, a reduce-scatter,
    returns their gradients), and every backend keeps skipping block pairs that share no segment.
    Dimensions the mesh does not divide are replicated for this call.
    """
    mesh = sharding.current_mesh()
    if mesh is None or mesh.size == 1:
        return fn(q, k, v, q_segments, kv_segments)
    spec = sharding.logical_to_spec(("batch", "length", "act_heads"), sharding.current_rules())
    spec = tuple(spec) + (None,) * (3 - len(spec))
    rows, length, heads = (_fit(a, n, mesh) for a, n in zip(spec, q.shape[:3]))
    q_spec, kv_spec = P(rows, length, heads, None), P(rows, None, heads, None)
    # check_vma=False: the kernels' loop carries start unvarying; replicated inputs' cotangents are summed
    # over the axes they are replicated on by shard_map's transpose either way.
    return jax.shard_map(fn, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, P(rows, length), P(rows, None)),
                         out_specs=q_spec, check_vma=False)(q, k, v, q_segments, kv_segments)


# Where the query/key RMS-norm's statistics (and its learned scale) live: "per_head" normalises each
# head's head_dim features (scale [head_dim], shared by the heads); "across_heads" normalises the whole
# projection before it is split into heads (scale [dim]), as Wan 2.1's rms_norm_across_heads does.
QK_NORMS = ("per_head", "across_heads", "none")


class Attention(nnx.Module):
    """Multi-head attention with QK-RMSNorm; self-attention (with RoPE) or cross-attention.

    Everything that reaches the attention kernel is in the compute `dtype` (QK-norm and RoPE included),
    so a bfloat16 model never hands a float32 operand to a bfloat16 kernel. `qk_norm` is one of QK_NORMS
    (True means "per_head", False "none"). With `image_kv` a cross-attention also reads image tokens
    through keys and values of their own, attended separately by the same queries and summed before the
    output projection (Wan 2.1 image-to-video): two softmaxes, so the caption's share is not diluted by
    the number of image tokens.
    """

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs, kv_dim: int | None = None,
                 backend: str = "xla", block: int = 128, qk_norm: bool | str = True, eps: float = 1e-6,
                 image_kv: bool = False, dtype=jnp.float32, param_dtype=jnp.float32):
        if dim % heads:
            raise ValueError(f"hidden size {dim} is not divisible by {heads} heads.")
        qk_norm = {True: "per_head", False: "none"}.get(qk_norm, qk_norm)
        if qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm={qk_norm!r}; choose one of {QK_NORMS}.")
        kv_dim = kv_dim or dim
        self.heads, self.head_dim, self.backend, self.block, self.dtype = heads, dim // heads, backend, block, dtype
        self.qk_norm = qk_norm
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q = dense(dim, dim, ("embed", "heads"), **kw)
        self.k = dense(kv_dim, dim, ("embed", "heads"), **kw)
        self.v = dense(kv_dim, dim, ("embed", "heads"), **kw)
        self.out = dense(dim, dim, ("heads", "embed"), **kw)
        size, axis = (self.head_dim, "kv") if qk_norm == "per_head" else (dim, "heads")
        make_norm = functools.partial(norm, size, kind="rms", axis=axis, eps=eps, **kw)
        self.q_norm, self.k_norm = nnx.data(None), nnx.data(None)
        if qk_norm != "none":
            self.q_norm, self.k_norm = make_norm(), make_norm()
        self.k_image, self.v_image, self.k_image_norm = nnx.data(None), nnx.data(None), nnx.data(None)
        if image_kv:
            self.k_image = dense(kv_dim, dim, ("embed", "heads"), **kw)
            self.v_image = dense(kv_dim, dim, ("embed", "heads"), **kw)
            if qk_norm != "none":
                self.k_image_norm = make_norm()

    def _split_heads(self, x, norm_layer=None):
        """[B, L, dim] -> [B, L, heads, head_dim], RMS-normed by `norm_layer` where qk_norm says."""
        if norm_layer is not None and self.qk_norm == "across_heads":
            x = norm_layer(x)
        x = x.reshape(*x.shape[:2], self.heads, self.head_dim)
        if norm_layer is not None and self.qk_norm == "per_head":
            x = norm_layer(x)
        return x

    def _attend(self, q, k, v, segments, kv_segments):
        q, k, v = (a.astype(self.dtype) for a in (q, k, v))
        q = sharding.constrain(q, ("batch", "length", "act_heads", None))
        return attend(q, k, v, segments, kv_segments, self.backend, self.block)

    def __call__(self, x, segments, context=None, context_segments=None, rope=None, image=None,
                 image_segments=None):
        """x [B, L, dim] with segments [B, L]; cross-attention when `context` [B, Lc, kv_dim] is given, and
        also to `image` [B, Li, kv_dim] (segments `image_segments`) in a model built with image_kv."""
        kv_in, kv_segments = (x, segments) if context is None else (context, context_segments)
        q = self._split_heads(self.q(x), self.q_norm)
        k, v = self._split_heads(self.k(kv_in), self.k_norm), self._split_heads(self.v(kv_in))
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        out = self._attend(q, k, v, segments, kv_segments)
        if self.k_image is not None:
            k_image = self._split_heads(self.k_image(image), self.k_image_norm)
            out = out + self._attend(q, k_image, self._split_heads(self.v_image(image)), segments, image_segments)
        return self.out(out.reshape(*x.shape[:2], -1))
