"""Fused accelerator kernels for packed attention: cuDNN flash attention (GPU), splash attention (TPU).

Both follow the backend contract of `sora_jax.layers.attention` (q [B, Lq, H, D], k/v [B, Lk, H, D],
int32 segment ids [B, Lq] / [B, Lk], 0 = padding). Nothing accelerator-only is imported at module load,
so the module imports on any machine; each kernel imports what it needs when it is traced.

cuDNN (`cudnn_attention`)
  cuDNN's ragged ("THD") layout runs attention independently over (offset, length) ranges of the rows,
  so a row of S packed samples costs the sum of their squared lengths, not the square of the row length.
  jax 0.10.2 reaches it only through the private `jax._src.cudnn.fused_attention_stablehlo.
  dot_product_attention` (arguments q_seqlen/kv_seqlen [B, M] and q_offsets/kv_offsets [B, M + 1]);
  `jax.nn.dot_product_attention` exposes only one length per row, which cannot express several samples.
  The ranges are derived from the segment ids at run time (`packed_segment_layout`), with a static number
  of range slots per row, M = max_segments + 1 (ids 1..max_segments, then the padding id 0). Layouts the
  ranges cannot express (more samples than max_segments, ids that are not laid out 1, 1, 2, ..., S, 0, 0)
  switch at run time to cuDNN with a dense [B, 1, Lq, Lk] segment mask (`jax.lax.cond`), which is
  correct for any ids but does all the cross-sample work. The ragged layout also needs cuDNN >= 9.6 on a
  Hopper or newer GPU; elsewhere the dense-mask path is the only one.

splash (`splash_attention`)
  Pallas TPU splash attention with `SegmentIds`: per (row, head) a flash kernel whose tiles mask logits
  of different segments. With the FullMask used here its block-sparsity metadata is static, so every
  (query block, key block) pair is computed; segment ids mask elements inside each pair. On CPU it runs
  in Pallas interpret mode (what the tests use).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

DEFAULT_MAX_SEGMENTS = 16  # = configs/common.py data.max_samples_per_row; bind the config's value instead
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)  # cuDNN flash attention has no float32 kernel
_CUDNN_RAGGED_MIN_VERSION = 90600  # the oldest cuDNN JAX's own packed-layout test runs on
_SPLASH_LANES = 128  # splash tiles must be whole TPU lane groups
_Q_PAD, _KV_PAD = -1, -2  # splash ids of block-padding tokens: never equal to each other or to a real id


# --------------------------------------------------------------------------------------------------
# cuDNN: segment ids -> ragged (offset, length) ranges
# --------------------------------------------------------------------------------------------------


class PackedLayout(NamedTuple):
    """The ragged layout handed to cuDNN, in the argument format of JAX's private cuDNN API.

    Slot m of a row stands for segment id m + 1 (m < max_segments) or padding (m = max_segments; last,
    because padding closes the row). A slot becomes a cuDNN sequence only when it has both queries and
    keys; unused slots are -1 on both sides, so JAX's left-compaction keeps the i-th query range paired
    with the i-th key range.

    Attributes:
      q_seqlen, kv_seqlen: [B, M] int32 range lengths, -1 for unused slots.
      q_offsets, kv_offsets: [B, M + 1] int32 range starts (token index within the row), -1 for unused
        slots and for the last column, which JAX's API expects to be -1.
      q_covered, kv_covered: [B, Lq] / [B, Lk] bool, tokens inside some sequence. cuDNN never writes the
        others (outputs or gradients), so the caller zeroes them.
      fits: [] bool, every row's ids fit the slots and are laid out contiguously in slot order.
    """

    q_seqlen: jax.Array
    kv_seqlen: jax.Array
    q_offsets: jax.Array
    kv_offsets: jax.Array
    q_covered: jax.Array
    kv_covered: jax.Array
    fits: jax.Array


def _slot_ranges(segments, max_segments: int):
    """Per-slot lengths and exclusive-cumsum offsets of one side, and whether each token lies in its slot.

    Offsets are cumulative sums of the lengths in slot order, so they are non-decreasing (as in JAX's own
    packed example). Each token is then checked against its slot's range: the ranges tile [0, L), so
    "every token inside its own slot's range" holds exactly when the row reads 1..1, 2..2, ..., 0..0 with
    every id in [0, max_segments]; anything else sets the row's `ok` to False.

    Returns:
      lengths, offsets: [B, M] int32; slot: [B, L] int32 (M for out-of-range ids); ok: [B] bool.
    """
    n_slots = max_segments + 1
    in_range = (segments >= 0) & (segments <= max_segments)
    slot = jnp.where(segments == 0, max_segments, segments - 1)
    slot = jnp.where(in_range, slot, n_slots).astype(jnp.int32)
    # One-hot count instead of a scatter: L x M booleans per row is small and deterministic on every backend.
    lengths = jnp.sum(slot[:, :, None] == jnp.arange(n_slots, dtype=jnp.int32), axis=1, dtype=jnp.int32)
    offsets = jnp.cumsum(lengths, axis=1, dtype=jnp.int32) - lengths
    own = jnp.minimum(slot, max_segments)
    start = jnp.take_along_axis(offsets, own, axis=1)
    end = start + jnp.take_along_axis(lengths, own, axis=1)
    pos = jnp.arange(segments.shape[1], dtype=jnp.int32)
    ok = jnp.all(in_range & (start <= pos) & (pos < end), axis=1)
    return lengths, offsets, slot, ok


def packed_segment_layout(q_segments, kv_segments, max_segments: int = DEFAULT_MAX_SEGMENTS) -> PackedLayout:
    """Derives cuDNN's ragged ranges from packed segment ids (self- or cross-attention).

    Args:
      q_segments: [B, Lq] int32, samples laid out 1, 1, ..., S, S, then 0 padding.
      kv_segments: [B, Lk] int32, the same layout (the same array for self-attention, caption ids for
        cross-attention).
      max_segments: static bound on the sample ids per row; the layout has max_segments + 1 slots.

    Returns:
      The PackedLayout; where `fits` is False its ranges are meaningless and the caller must not use them.
    """
    if max_segments < 1:
        raise ValueError(f"max_segments must be >= 1, got {max_segments}.")
    q_len, q_off, q_slot, q_ok = _slot_ranges(q_segments.astype(jnp.int32), max_segments)
    kv_len, kv_off, kv_slot, kv_ok = _slot_ranges(kv_segments.astype(jnp.int32), max_segments)
    # A range with queries but no keys (or keys but no queries) is left out: zero-length sides are an edge
    # case of fused kernels, and those tokens' true outputs/gradients are known anyway (unspecified / 0).
    used = (q_len > 0) & (kv_len > 0)
    unused = jnp.full((q_len.shape[0], 1), -1, jnp.int32)

    def covered(slot):
        padded = jnp.concatenate([used, jnp.zeros_like(unused, dtype=bool)], axis=1)  # column for bad ids
        return jnp.take_along_axis(padded, slot, axis=1)

    return PackedLayout(
        q_seqlen=jnp.where(used, q_len, -1),
        kv_seqlen=jnp.where(used, kv_len, -1),
        q_offsets=jnp.concatenate([jnp.where(used, q_off, -1), unused], axis=1),
        kv_offsets=jnp.concatenate([jnp.where(used, kv_off, -1), unused], axis=1),
        q_covered=covered(q_slot),
        kv_covered=covered(kv_slot),
        fits=jnp.all(q_ok & kv_ok),
    )


# --------------------------------------------------------------------------------------------------
# cuDNN: kernel calls (the tests replace these three with emulations; nothing else touches cuDNN)
# --------------------------------------------------------------------------------------------------


def _packed_layout_supported() -> bool:
    """Whether cuDNN's ragged layout can run here: cuDNN >= 9.6 on a compute capability >= 9.0 GPU."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa
    try:
        version = cudnn_fa.check_cudnn_version()
    except RuntimeError:  # no cuDNN in this jaxlib / on this platform
        return False
    return version >= _CUDNN_RAGGED_MIN_VERSION and cudnn_fa.check_compute_capability("9.0")


def _cudnn_packed_kernel(q, k, v, q_seqlen, kv_seqlen, q_offsets, kv_offsets, scale: float):
    """cuDNN flash attention over ragged ranges (JAX's private API; see the module docstring)."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa
    # NO_MASK is the mask type JAX's packed-layout test uses: with offsets present XLA passes the
    # lengths to cuDNN and masks by them itself.
    return cudnn_fa.dot_product_attention(
        q, k, v, None, None, q_seqlen, kv_seqlen, q_offsets, kv_offsets, scale=scale,
        mask_type=cudnn_fa.MaskType.NO_MASK, qkv_layout="BTNH")


def _cudnn_masked_kernel(q, k, v, q_segments, kv_segments):
    """cuDNN flash attention with a dense [B, 1, Lq, Lk] segment mask: any ids, all cross-sample work."""
    mask = q_segments[:, None, :, None] == kv_segments[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")


# --------------------------------------------------------------------------------------------------
# cuDNN: the backend
# --------------------------------------------------------------------------------------------------


def _check_cudnn_inputs(q, k, v) -> None:
    """Raises a TypeError/ValueError naming the problem before cuDNN's own less specific errors."""
    dtypes = {jnp.dtype(a.dtype) for a in (q, k, v)}
    if len(dtypes) != 1 or next(iter(dtypes)) not in {jnp.dtype(d) for d in _CUDNN_DTYPES}:
        raise TypeError(
            f"cudnn_attention needs q, k and v in one of bfloat16/float16 (cuDNN flash attention has no "
            f"float32 kernel); got q={q.dtype}, k={k.dtype}, v={v.dtype}. Cast them to the compute dtype "
            "before the call, or use the 'xla'/'blockwise' backend for float32.")
    if q.ndim != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"cudnn_attention expects q [B, Lq, H, D] and k, v [B, Lk, H, D]; got "
                         f"q {q.shape}, k {k.shape}, v {v.shape}.")


def _cudnn_packed(q, k, v, layout: PackedLayout):
    """The ragged-layout call with the tokens cuDNN does not cover zeroed in outputs and gradients."""
    def grad_only_where(x, keep):
        # Same values; the cotangent reaching x is kept only where `keep` (select: garbage never leaks).
        return jnp.where(keep[:, :, None, None], x, jax.lax.stop_gradient(x))

    out = _cudnn_packed_kernel(
        grad_only_where(q, layout.q_covered), grad_only_where(k, layout.kv_covered),
        grad_only_where(v, layout.kv_covered), layout.q_seqlen, layout.kv_seqlen, layout.q_offsets,
        layout.kv_offsets, scale=q.shape[-1] ** -0.5)
    return jnp.where(layout.q_covered[:, :, None, None], out, jnp.zeros((), out.dtype))


def cudnn_attention(q, k, v, q_segments, kv_segments, *, block: int = 0,
                    max_segments: int = DEFAULT_MAX_SEGMENTS, fallback: bool = True):
    """Packed attention with cuDNN flash attention, skipping cross-sample work via the ragged layout.

    Args:
      q: [B, Lq, H, D] bfloat16/float16.
      k, v: [B, Lk, H, D], same dtype as q.
      q_segments, kv_segments: int32 [B, Lq] / [B, Lk]; samples contiguous 1..S, then 0 padding.
      block: unused (cuDNN tiles internally); part of the backend signature.
      max_segments: static bound on sample ids per row. Rows with more fall back to the dense mask.
        cuDNN keeps float32 softmax stats of shape [B * (max_segments + 1), H, Lq] for the backward, so
        the bound should be the data's real maximum (config.data.max_samples_per_row), not the row length.
      fallback: when a layout does not fit the ranges, True runs the dense-mask kernel (lax.cond: both
        branches are compiled, one runs); False skips the cond and returns NaN for the whole call, for
        pipelines whose packing guarantees the layout.

    Returns:
      [B, Lq, H, D] in q's dtype. On the ragged path, query rows whose segment has no key are 0.

    Raises:
      TypeError: q/k/v are not all bfloat16 or all float16.
      ValueError: shapes do not follow the contract.
    """
    del block
    _check_cudnn_inputs(q, k, v)
    q_segments, kv_segments = q_segments.astype(jnp.int32), kv_segments.astype(jnp.int32)
    if not _packed_layout_supported():
        return _cudnn_masked_kernel(q, k, v, q_segments, kv_segments)
    layout = packed_segment_layout(q_segments, kv_segments, max_segments)
    if not fallback:
        return jnp.where(layout.fits, _cudnn_packed(q, k, v, layout), jnp.array(jnp.nan, q.dtype))
    return jax.lax.cond(layout.fits, lambda: _cudnn_packed(q, k, v, layout),
                        lambda: _cudnn_masked_kernel(q, k, v, q_segments, kv_segments))


# --------------------------------------------------------------------------------------------------
# splash (TPU)
# --------------------------------------------------------------------------------------------------


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _pad_axis(x, axis: int, length: int, value=0):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def splash_block_sizes(block: int, lq: int, lk: int):
    """Splash tile sizes for `block` and the lengths they pad to.

    A tile never exceeds the (lane-rounded) length, so a short caption is not padded up to a large block.

    Returns:
      (BlockSizes, padded Lq, padded Lk).

    Raises:
      ValueError: block is not a positive multiple of 128 (splash tiles whole lane groups).
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    if block <= 0 or block % _SPLASH_LANES:
        raise ValueError(f"splash attention needs block to be a positive multiple of {_SPLASH_LANES}, "
                         f"got {block}.")
    bq = min(block, _round_up(lq, _SPLASH_LANES))
    bkv = min(block, _round_up(lk, _SPLASH_LANES))
    sizes = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                              block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    return sizes, _round_up(lq, bq), _round_up(lk, bkv)


def splash_attention(q, k, v, q_segments, kv_segments, *, block: int = 128, interpret: bool | None = None):
    """Packed attention with Pallas TPU splash attention and segment ids.

    Args:
      q: [B, Lq, H, D]; k, v: [B, Lk, H, D] (bfloat16 or float32).
      q_segments, kv_segments: int32 [B, Lq] / [B, Lk]; a query attends to keys of its own id.
      block: tile size along both sequences (a multiple of 128; 512 is typical on TPU).
      interpret: run the kernel in Pallas interpret mode; None means only on CPU (tests), where
        splash refuses to run otherwise ("Only interpret mode is supported on CPU backend.").

    Returns:
      [B, Lq, H, D] in q's dtype. Rows whose segment has no key average all keys (finite).
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash,
        splash_attention_mask as splash_mask,
    )
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    _, lq, heads, head_dim = q.shape
    sizes, lq_pad, lk_pad = splash_block_sizes(block, lq, k.shape[1])

    def heads_major(x, length):  # [B, L, H, D] -> [B, H, L_pad, D]
        return _pad_axis(jnp.swapaxes(x, 1, 2), 2, length)

    # Splash does not scale logits; folding 1/sqrt(D) into q is exact for power-of-two head dims.
    q_t = heads_major(q * jnp.asarray(head_dim ** -0.5, q.dtype), lq_pad)
    k_t, v_t = heads_major(k, lk_pad), heads_major(v, lk_pad)
    q_ids = _pad_axis(q_segments.astype(jnp.int32), 1, lq_pad, _Q_PAD)
    kv_ids = _pad_axis(kv_segments.astype(jnp.int32), 1, lk_pad, _KV_PAD)
    mask = splash_mask.MultiHeadMask([splash_mask.FullMask((lq_pad, lk_pad))] * heads)
    kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                    interpret=interpret)

    def one_row(q_r, k_r, v_r, q_ids_r, kv_ids_r):
        return kernel(q_r, k_r, v_r, segment_ids=splash.SegmentIds(q=q_ids_r, kv=kv_ids_r))

    out = jax.vmap(one_row)(q_t, k_t, v_t, q_ids, kv_ids)  # [B, H, Lq_pad, D]
    return jnp.swapaxes(out[:, :, :lq], 1, 2).astype(q.dtype)
