"""A packed row is exactly its samples run alone: NaViT packing must change no sample's output.

A real packed batch from the smoke pipeline, every sample with its own timestep, caption, caption-drop
flag and metadata, goes through the randomised DiT (every weight perturbed, so adaLN-Zero gates and the
zero-initialised projections carry signal) once packed and once with each sample alone in a row of its
own. Per-sample conditioning is looked up by segment id at several places (gather_segments for the
modulation, the caption segments for cross-attention, the pooled caption, the drop flag); a lookup that
is off by one, or reads another sample's caption, gives a packed output that differs from the alone one.
Then the padding (video tokens, their positions, caption slots, unused per-sample slots) is filled with
noise: no real token may notice.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_pipelines import pipeline
from sora_jax.models.dit import PackedInputs
from sora_jax.models.text import build_tokenizer
from tests.conftest import randomised_model, smoke_config

# Every backend that runs on CPU; splash in Pallas interpret mode (tiles of 128 = the smoke row length).
BACKENDS = {"xla": 128, "blockwise": 32, "splash": 128}
REL_TOL = 1e-5  # of the largest output magnitude: float32 accumulation order, nothing more


def _config(backend):
    return smoke_config(**{"model.attention": backend, "model.attention_block": BACKENDS[backend],
                           "model.meta_conditioning": True,
                           "model.abs_pos": "edges"})


@functools.lru_cache(maxsize=1)
def _packed_batch():
    """The smoke pipeline's first packed batch, with per-sample conditioning made distinct.

    Returns (batch, t, drop, meta, samples) where samples lists (row, segment id) of every real sample.
    """
    config = _config("xla")
    first = next(iter(pipeline.packed_dataset(config)))
    batch = {k: np.array(v) for k, v in first.items() if not k.startswith("host_")}
    rng = np.random.default_rng(0)
    rows, slots = batch["info"].shape[:2]
    counts = (batch["info"][..., 3] > 0).sum(-1)
    samples = [(r, s) for r in range(rows) for s in range(1, counts[r] + 1)]
    # Own caption per sample: random words keep each caption's length but make no two captions alike
    # (the pipeline repeats captions, which would hide a lookup of the wrong sample's caption).
    vocab = build_tokenizer(config.text).vocab_size
    real_text = batch["text_segment_ids"] > 0
    batch["text"] = np.where(real_text, rng.integers(3, vocab, size=batch["text"].shape), 0).astype(np.int32)
    t = rng.uniform(0.05, 0.95, size=(rows, slots)).astype(np.float32)
    drop = rng.random((rows, slots)) < 0.4
    meta = np.stack([rng.uniform(1, 30, (rows, slots)), rng.integers(8, 512, (rows, slots)),
                     rng.integers(8, 512, (rows, slots)), rng.uniform(0, 10, (rows, slots))], -1).astype(np.float32)
    return batch, t, drop, meta, samples


def _check_variety(batch, t, drop, samples):
    """The checks below prove something only if samples really differ from each other."""
    row = max(range(len(batch["video"])), key=lambda r: sum(1 for rr, _ in samples if rr == r))
    n = sum(1 for r, _ in samples if r == row)
    shapes = {tuple(batch["info"][row, s, :3]) for s in range(n)}
    assert n >= 3 and len(shapes) >= 3, f"row {row}: need >= 3 samples of different shapes, got {shapes}"
    flags = [bool(drop[r, s - 1]) for r, s in samples]
    assert any(flags) and not all(flags), "need both dropped and kept captions"
    assert len({float(t[r, s - 1]) for r, s in samples}) == len(samples)
    padded = (batch["video_segment_ids"] == 0).any() and (batch["text_segment_ids"] == 0).any()
    assert padded, "need padding to fill with noise"


@functools.lru_cache(maxsize=None)
def _forward(backend):
    """The jitted randomised model of `backend`: inputs -> outputs [B, L, D] (one compile per shape)."""
    graphdef, state = nnx.split(randomised_model(_config(backend)))
    fn = jax.jit(lambda state, inputs: nnx.merge(graphdef, state)(inputs))
    return lambda batch, t, drop, meta: np.asarray(fn(state, PackedInputs(
        *(jnp.asarray(batch[k]) for k in ("video", "video_pos", "video_segment_ids")), jnp.asarray(t),
        *(jnp.asarray(batch[k]) for k in ("text", "text_segment_ids", "text_positions")), jnp.asarray(drop),
        jnp.asarray(meta))))


def _alone_rows(batch, t, drop, meta, chosen):
    """Rows that each hold one sample of `chosen` ((row, segment id) pairs) at the front, as segment 1, and
    nothing else: its tokens, positions, caption, t, drop flag and meta. Slots 2.. hold other values, so a
    lookup of the wrong slot shows."""
    rows = len(chosen)
    out = {k: np.zeros((rows,) + v.shape[1:], v.dtype) for k, v in batch.items()}
    t1 = np.full((rows, t.shape[1]), 0.5, np.float32)
    drop1 = np.ones((rows, t.shape[1]), bool)
    meta1 = np.ones((rows,) + meta.shape[1:], np.float32)
    for i, (r, s) in enumerate(chosen):
        vid, txt = batch["video_segment_ids"][r] == s, batch["text_segment_ids"][r] == s
        n, nt = int(vid.sum()), int(txt.sum())
        fields = (("video", vid, n), ("video_pos", vid, n), ("text", txt, nt), ("text_positions", txt, nt))
        for key, mask, length in fields:
            out[key][i, :length] = batch[key][r][mask]
        out["video_segment_ids"][i, :n], out["text_segment_ids"][i, :nt] = 1, 1
        t1[i, 0], drop1[i, 0], meta1[i, 0] = t[r, s - 1], drop[r, s - 1], meta[r, s - 1]
    return out, t1, drop1, meta1


def _with_noisy_padding(batch, t, drop, meta, rng):
    """The same batch with every padding token, caption slot and unused per-sample slot full of noise."""
    noisy = {k: v.copy() for k, v in batch.items()}
    pad, tpad = batch["video_segment_ids"] == 0, batch["text_segment_ids"] == 0
    noisy["video"][pad] = rng.normal(size=noisy["video"][pad].shape) * 3
    noisy["video_pos"][pad] = rng.integers(0, 9, size=noisy["video_pos"][pad].shape)
    noisy["text"][tpad] = rng.integers(3, 20, size=noisy["text"][tpad].shape)
    noisy["text_positions"][tpad] = rng.integers(0, 12, size=noisy["text_positions"][tpad].shape)
    unused = batch["info"][..., 3] == 0
    t, drop, meta = t.copy(), drop.copy(), meta.copy()
    t[unused] = rng.uniform(size=int(unused.sum()))
    drop[unused] = ~drop[unused]
    meta[unused] = rng.uniform(1, 99, size=meta[unused].shape)
    return noisy, t, drop, meta


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_every_packed_sample_equals_itself_alone_and_ignores_padding(backend):
    batch, t, drop, meta, samples = _packed_batch()
    _check_variety(batch, t, drop, samples)
    forward = _forward(backend)
    packed = forward(batch, t, drop, meta)
    scale = float(np.abs(packed[batch["video_segment_ids"] > 0]).max())
    assert scale > 1e-2, "the randomised model's output is too small to prove anything"
    atol = REL_TOL * scale

    rows = len(batch["video"])  # alone rows go through in batches of the packed shape: one compile
    for start in range(0, len(samples), rows):
        chosen = samples[start:start + rows] + [samples[0]] * (rows - len(samples[start:start + rows]))
        alone = forward(*_alone_rows(batch, t, drop, meta, chosen))
        for i, (r, s) in enumerate(samples[start:start + rows]):
            n = int((batch["video_segment_ids"][r] == s).sum())
            np.testing.assert_allclose(alone[i, :n], packed[r][batch["video_segment_ids"][r] == s], rtol=0, atol=atol,
                                       err_msg=f"{backend}: sample {s} of row {r} differs packed vs alone")

    noisy = forward(*_with_noisy_padding(batch, t, drop, meta, np.random.default_rng(1)))
    real = batch["video_segment_ids"] > 0
    # Masked-out keys get exactly zero weight, so the real tokens' outputs are bitwise unchanged.
    np.testing.assert_array_equal(noisy[real], packed[real],
                                  err_msg=f"{backend}: noise in the padding changed real tokens")
