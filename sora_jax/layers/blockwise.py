"""Blockwise (flash-style) packed attention in pure JAX that skips block pairs sharing no segment.

Runs on any platform. Queries are processed one (row, query block) at a time; each query block visits
only the contiguous range of key blocks that hold its own segments, so a row of many short samples costs
about the sum of their squared lengths instead of the square of the row length.

Why contiguous ranges: NaViT packing lays every sample out contiguously, so the keys of a query block's
samples form one range [lo, hi). The range is computed at run time from the segment ids (first and last
key position of every segment id), and the key loop is a `fori_loop(lo, hi)` with traced bounds, i.e. a
while loop. A data-dependent skip written as `lax.cond` would compute both branches once batched (vmap
turns cond into select); a loop bound stays a loop bound, and under vmap it runs to the largest bound
with the finished lanes masked. For layouts that are not contiguous the range still covers every
matching key (it spans the first to the last), only less is skipped.

Memory: the forward keeps the output and the float32 log-sum-exp per query; the backward recomputes the
probabilities block by block (no [L, L] tensor exists in either pass).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_NEG = -1e30  # finite: exp(_NEG - m) underflows to 0 without inf - inf = NaN
_Q_PAD, _KV_PAD = -1, -2  # segment ids of block-padding rows; never equal, never equal to a real id


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def kv_block_ranges(q_segments, kv_segments, block_q: int, block_k: int):
    """For every (row, query block), the range [lo, hi) of key blocks holding its segments.

    Args:
      q_segments: [B, Lq] int32, Lq a multiple of block_q; negative ids are padding that needs no key.
      kv_segments: [B, Lk] int32, Lk a multiple of block_k; negative ids match nothing.
    Returns:
      lo, hi: [B, Lq // block_q] int32 (hi <= lo means no key block at all).
    """
    b, lq = q_segments.shape
    lk = kv_segments.shape[1]
    n_ids = max(lq, lk) + 1  # ids are sample indices (< row length); larger ids get the full range
    dump = n_ids  # bucket for negative kv ids
    kv_ids = jnp.where((kv_segments >= 0) & (kv_segments < n_ids), kv_segments, dump)
    pos = jnp.broadcast_to(jnp.arange(lk, dtype=jnp.int32), (b, lk))
    first = jax.vmap(lambda p, i: jax.ops.segment_min(p, i, num_segments=n_ids + 1))(pos, kv_ids)
    last = jax.vmap(lambda p, i: jax.ops.segment_max(p + 1, i, num_segments=n_ids + 1))(pos, kv_ids)
    big = jnp.int32(lk)
    # Empty segments come back as the int extremes; the dump bucket (padding queries) needs nothing.
    first = jnp.minimum(first, big).at[:, dump].set(big)
    last = jnp.maximum(last, 0).at[:, dump].set(0)
    q_ids = jnp.where(q_segments < 0, dump, jnp.minimum(q_segments, n_ids))
    start = jnp.take_along_axis(first, jnp.minimum(q_ids, dump), axis=1)
    end = jnp.take_along_axis(last, jnp.minimum(q_ids, dump), axis=1)
    unknown = q_segments >= n_ids  # an id outside the table: attend over the whole row (still masked)
    start = jnp.where(unknown, 0, start)
    end = jnp.where(unknown, lk, end)
    nq = lq // block_q
    lo = start.reshape(b, nq, block_q).min(-1) // block_k
    hi = (end.reshape(b, nq, block_q).max(-1) + block_k - 1) // block_k
    return lo.astype(jnp.int32), hi.astype(jnp.int32)


def _slice_rows(x, b, start, size):
    """x[b, start:start + size] for x [B, L, ...] with traced b and start."""
    idx = (b, start) + (0,) * (x.ndim - 2)
    return jax.lax.dynamic_slice(x, idx, (1, size) + x.shape[2:])[0]


def _scores(qb, kb, qs, ks, scale):
    """Masked logits [H, bq, bk] (float32) and the mask [bq, bk]."""
    s = jnp.einsum("qhd,khd->hqk", qb, kb, preferred_element_type=jnp.float32) * scale
    mask = qs[:, None] == ks[None, :]
    return jnp.where(mask[None], s, _NEG), mask


def _forward(q, k, v, qs, ks, block_q, block_k):
    """Returns out [B, Lq, H, D] (q.dtype) and lse [B, Lq, H] (float32)."""
    b, lq, h, d = q.shape
    nq, scale = lq // block_q, d ** -0.5
    lo, hi = kv_block_ranges(qs, ks, block_q, block_k)

    def one_block(_, idx):
        r, i = idx // nq, idx % nq
        qb, qsb = _slice_rows(q, r, i * block_q, block_q), _slice_rows(qs, r, i * block_q, block_q)

        def kv_step(j, acc):
            o, m, denom = acc
            kb, vb = _slice_rows(k, r, j * block_k, block_k), _slice_rows(v, r, j * block_k, block_k)
            s, mask = _scores(qb, kb, qsb, _slice_rows(ks, r, j * block_k, block_k), scale)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.where(mask[None], jnp.exp(s - m_new[..., None]), 0.0)
            corr = jnp.exp(m - m_new)
            o = o * corr[..., None] + jnp.einsum("hqk,khd->hqd", p.astype(v.dtype), vb,
                                                 preferred_element_type=jnp.float32)
            return o, m_new, denom * corr + p.sum(-1)

        init = (jnp.zeros((h, block_q, d), jnp.float32), jnp.full((h, block_q), _NEG, jnp.float32),
                jnp.zeros((h, block_q), jnp.float32))
        o, m, denom = jax.lax.fori_loop(lo[r, i], hi[r, i], kv_step, init)
        safe = jnp.where(denom > 0, denom, 1.0)
        return None, ((o / safe[..., None]).astype(q.dtype), m + jnp.log(safe))

    _, (out, lse) = jax.lax.scan(one_block, None, jnp.arange(b * nq))
    out = out.reshape(b, nq, h, block_q, d).transpose(0, 1, 3, 2, 4).reshape(b, lq, h, d)
    lse = lse.reshape(b, nq, h, block_q).transpose(0, 1, 3, 2).reshape(b, lq, h)
    return out, lse


def _backward(q, k, v, qs, ks, out, lse, dout, block_q, block_k):
    """Flash-attention backward: probabilities recomputed per block from the saved log-sum-exp."""
    b, lq, h, d = q.shape
    nq, scale = lq // block_q, d ** -0.5
    lo, hi = kv_block_ranges(qs, ks, block_q, block_k)
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, Lq, H]

    def one_block(carry, idx):
        r, i = idx // nq, idx % nq
        rows = lambda x: _slice_rows(x, r, i * block_q, block_q)  # noqa: E731
        qb, qsb, dob = rows(q), rows(qs), rows(dout)
        lse_b, delta_b = rows(lse).T, rows(delta).T  # [H, bq]

        def kv_step(j, acc):
            dq, dk, dv = acc
            cols = lambda x: _slice_rows(x, r, j * block_k, block_k)  # noqa: E731
            kb, vb = cols(k), cols(v)
            s, mask = _scores(qb, kb, qsb, cols(ks), scale)
            p = jnp.where(mask[None], jnp.exp(s - lse_b[..., None]), 0.0)
            dv_j = jnp.einsum("hqk,qhd->khd", p.astype(dout.dtype), dob, preferred_element_type=jnp.float32)
            dp = jnp.einsum("qhd,khd->hqk", dob, vb, preferred_element_type=jnp.float32)
            ds = p * (dp - delta_b[..., None]) * scale
            dq = dq + jnp.einsum("hqk,khd->qhd", ds.astype(k.dtype), kb, preferred_element_type=jnp.float32)
            dk_j = jnp.einsum("hqk,qhd->khd", ds.astype(q.dtype), qb, preferred_element_type=jnp.float32)
            at = (r, j * block_k, 0, 0)
            dk = jax.lax.dynamic_update_slice(dk, (cols(dk) + dk_j)[None], at)
            dv = jax.lax.dynamic_update_slice(dv, (cols(dv) + dv_j)[None], at)
            return dq, dk, dv

        dq0 = jnp.zeros((block_q, h, d), jnp.float32)
        dq, dk, dv = jax.lax.fori_loop(lo[r, i], hi[r, i], kv_step, (dq0, *carry))
        return (dk, dv), dq

    zeros = jnp.zeros(k.shape, jnp.float32)
    (dk, dv), dq = jax.lax.scan(one_block, (zeros, zeros), jnp.arange(b * nq))
    dq = dq.reshape(b, lq, h, d)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention(q, k, v, qs, ks, block_q, block_k):
    return _forward(q, k, v, qs, ks, block_q, block_k)[0]


def _attention_fwd(q, k, v, qs, ks, block_q, block_k):
    out, lse = _forward(q, k, v, qs, ks, block_q, block_k)
    return out, (q, k, v, qs, ks, out, lse)


def _attention_bwd(block_q, block_k, res, dout):
    q, k, v, qs, ks, out, lse = res
    dq, dk, dv = _backward(q, k, v, qs, ks, out, lse, dout, block_q, block_k)
    return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _pad_to(x, length: int, value):
    pad = [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2)
    return jnp.pad(x, pad, constant_values=value)


def blockwise_attention(q, k, v, q_segments, kv_segments, *, block: int = 128):
    """Packed attention that skips key blocks holding none of a query block's segments.

    Args:
      q: [B, Lq, H, D]; k, v: [B, Lk, H, D] (any float dtype; logits and accumulators are float32).
      q_segments, kv_segments: int32 [B, Lq] / [B, Lk]; a query attends to keys of its own segment id.
      block: tile size along both lengths (clipped to the lengths, which are padded to a multiple).
    Returns:
      [B, Lq, H, D] in q's dtype; rows whose segment has no key get zeros.
    """
    if block <= 0:
        raise ValueError(f"attention block size must be positive, got {block}.")
    lq, lk = q.shape[1], k.shape[1]
    block_q, block_k = min(block, _round_up(lq, 8)), min(block, _round_up(lk, 8))
    pq, pk = _round_up(lq, block_q), _round_up(lk, block_k)
    qs = _pad_to(q_segments.astype(jnp.int32), pq, _Q_PAD)
    ks = _pad_to(kv_segments.astype(jnp.int32), pk, _KV_PAD)
    out = _attention(_pad_to(q, pq, 0), _pad_to(k, pk, 0), _pad_to(v, pk, 0), qs, ks, block_q, block_k)
    return out[:, :lq]
