"""The packed-attention API: backends equal the reference, skipping is real, compute dtype is kept.

That a packed row equals its samples run alone (the whole model) is tests/test_packed_isolation.py.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_pipelines import pipeline
from sora_jax.layers import attention
from sora_jax.layers.attention import xla_attention
from sora_jax.layers.blockwise import blockwise_attention, kv_block_ranges
from sora_jax.models import build_model
from sora_jax.models.dit import PackedInputs
from tests.conftest import smoke_config


def _segments(lengths, total):
    """Contiguous segment ids 1..S for samples of `lengths`, then 0 (padding) up to `total`."""
    out = np.zeros(total, np.int32)
    start = 0
    for i, n in enumerate(lengths):
        out[start:start + n] = i + 1
        start += n
    return out


def _qkv(rng, b, lq, lk, h=2, d=16, dtype=jnp.float32):
    shapes = [(b, lq, h, d), (b, lk, h, d), (b, lk, h, d)]
    return [jnp.asarray(rng.normal(size=s), dtype) for s in shapes]


def _grads(fn, q, k, v, weight):
    """Gradients of a weighted sum of the outputs (real query rows only carry weight)."""
    return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * weight), argnums=(0, 1, 2))(q, k, v)


LAYOUTS = {
    # self-attention: two rows of different packings with padding at the end, a length no block divides
    "self": dict(lq=200, q=[[50, 30, 70, 20], [10, 100, 60]], kv=None),
    # cross-attention: video tokens against short caption segments
    "cross": dict(lq=136, q=[[40, 60, 30], [100, 36]], lk=24, kv=[[5, 7, 6], [8, 12]]),
    # one sample filling the row, no padding
    "full": dict(lq=128, q=[[128], [128]], kv=None),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("block", [16, 64])
def test_blockwise_equals_xla_forward_and_gradients(layout, block):
    spec = LAYOUTS[layout]
    rng = np.random.default_rng(0)
    qs = np.stack([_segments(row, spec["lq"]) for row in spec["q"]])
    ks = qs if spec["kv"] is None else np.stack([_segments(row, spec["lk"]) for row in spec["kv"]])
    q, k, v = _qkv(rng, 2, qs.shape[1], ks.shape[1])
    real = jnp.asarray(qs > 0)[..., None, None]
    weight = jnp.asarray(rng.normal(size=q.shape), jnp.float32) * real
    ours = lambda q, k, v: blockwise_attention(q, k, v, qs, ks, block=block)  # noqa: E731
    ref = lambda q, k, v: xla_attention(q, k, v, qs, ks)  # noqa: E731
    np.testing.assert_allclose(np.asarray(ours(q, k, v) * real), np.asarray(ref(q, k, v) * real), atol=2e-6)
    for a, b in zip(_grads(ours, q, k, v, weight), _grads(ref, q, k, v, weight)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-6)


def test_blockwise_bfloat16_close_to_float32_reference():
    rng = np.random.default_rng(1)
    qs = np.stack([_segments([96, 64, 80], 256)])
    q, k, v = _qkv(rng, 1, 256, 256, h=4, d=32)
    ours = blockwise_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), qs, qs, block=64)
    assert ours.dtype == jnp.bfloat16
    ref = xla_attention(q, k, v, qs, qs)
    real = (qs > 0)[..., None, None]
    assert float(jnp.max(jnp.abs(ours.astype(jnp.float32) - ref) * real)) < 3e-2  # bf16 inputs: ~8 bits


def test_blockwise_is_correct_for_interleaved_segments_and_under_vmap():
    """Non-contiguous layouts lose skipping, not correctness; vmap over an extra axis keeps both."""
    rng = np.random.default_rng(2)
    qs = rng.integers(0, 4, size=(2, 96)).astype(np.int32)  # segments scattered along the row
    q, k, v = _qkv(rng, 2, 96, 96)
    np.testing.assert_allclose(np.asarray(blockwise_attention(q, k, v, qs, qs, block=16)),
                               np.asarray(xla_attention(q, k, v, qs, qs)), atol=2e-6)
    stacked = [jnp.stack([x, 2 * x]) for x in (q, k, v)]
    batched = jax.vmap(lambda q, k, v: blockwise_attention(q, k, v, qs, qs, block=16))(*stacked)
    ref = jax.vmap(lambda q, k, v: xla_attention(q, k, v, qs, qs))(*stacked)
    np.testing.assert_allclose(np.asarray(batched), np.asarray(ref), atol=2e-5)


def test_block_ranges_skip_every_pair_sharing_no_segment():
    # Samples of 64, 64 and 128 tokens, then 64 padding: with 64-token blocks each query block needs
    # exactly the key blocks of its own sample.
    qs = _segments([64, 64, 128], 320)[None]
    lo, hi = kv_block_ranges(jnp.asarray(qs), jnp.asarray(qs), 64, 64)
    assert lo.tolist() == [[0, 1, 2, 2, 4]]
    assert hi.tolist() == [[1, 2, 4, 4, 5]]
    visited = int(jnp.sum(hi - lo))
    assert visited == 1 + 1 + 2 + 2 + 1  # vs 25 block pairs for dense attention
    # Query padding from rounding up to a block (-1) needs no key at all.
    lo, hi = kv_block_ranges(jnp.asarray([[1] * 8 + [-1] * 8]), jnp.asarray([[1] * 16]), 8, 8)
    assert lo.tolist() == [[0, 2]] and hi.tolist()[0][1] <= lo.tolist()[0][1]


def test_unknown_backend_and_auto_resolution():
    with pytest.raises(ValueError, match="unknown attention backend 'flash2'.*choose one of"):
        attention.resolve_backend("flash2")
    assert attention.resolve_backend("auto", "cpu") == "blockwise"
    assert attention.resolve_backend("auto", "gpu") == "cudnn"
    assert attention.resolve_backend("auto", "tpu") == "splash"
    assert attention.resolve_backend("auto", "gpu", jnp.bfloat16) == "cudnn"
    assert attention.resolve_backend("auto", "gpu", jnp.float32) == "blockwise"  # cuDNN has no f32 kernel


def _run(model, batch, t, drop):
    video = (jnp.asarray(batch[k]) for k in ("video", "video_pos", "video_segment_ids"))
    text = (jnp.asarray(batch[k]) for k in ("text", "text_segment_ids", "text_positions"))
    inputs = PackedInputs(*video, jnp.asarray(t), *text, jnp.asarray(drop))
    return np.asarray(model(inputs))


@pytest.mark.parametrize("scan", [False, True])
def test_bfloat16_model_hands_only_bfloat16_to_the_kernel(monkeypatch, scan):
    """No float32 operand reaches the attention kernel of a bfloat16 model (the cudnn crash), looped or scanned."""
    seen = []

    def checking(q, k, v, qs, ks, *, block):
        seen.append((q.dtype, k.dtype, v.dtype))
        return xla_attention(q, k, v, qs, ks)

    monkeypatch.setitem(attention.ATTENTION_BACKENDS, "xla", checking)
    config = smoke_config(**{"model.dtype": "bfloat16", "model.attention": "xla", "model.scan_layers": scan,
                             "model.remat": "full" if scan else "none"})
    batch = dict(next(iter(pipeline.packed_dataset(config))))
    t = np.full(batch["info"].shape[:2], 0.5, np.float32)
    out = _run(build_model(config, nnx.Rngs(0)), batch, t, np.zeros(t.shape, bool))
    assert np.isfinite(out).all()
    # text encoder layers + (self, cross) per DiT block (a scanned block is traced once)
    assert len(seen) == config.text.depth + 2 * (1 if scan else config.model.depth)
    assert all(d == jnp.bfloat16 for triple in seen for d in triple), seen
