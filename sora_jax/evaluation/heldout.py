"""Real held-out videos at a fixed size, for comparing generated samples with real data (fid / fvd).

The procedural world is rendered *exactly* at the requested width, height and frame count (its held-out
combinations, never trained on), so real and generated clips differ only in content. Other sources
(folders, records, TFDS) are read through the pipeline's held-out stream and resized: clips shorter than
the requested frame count are passed over, longer ones are cut to their first frames.
"""
from __future__ import annotations

import itertools

import numpy as np

from data_pipelines.procedural import ProceduralWorld, render
from data_pipelines.sources import pixel_source
from sora_jax.video_io import to_uint8


def procedural_clips(data_cfg, count: int, width: int, height: int, frames: int) -> tuple[np.ndarray, list[str]]:
    """`count` held-out procedural clips rendered at width x height x frames, with their captions.

    The world draws each side from (width, height) independently; draws of the wrong size are passed over
    (a quarter are kept when width != height), so the clips stay a deterministic function of the seed.
    """
    world = ProceduralWorld(seed=data_cfg.seed, sides=(width, height), frames=(frames,), split="heldout")
    videos, captions = [], []
    for i in itertools.count():
        if len(videos) == count:
            break
        p = world.params(i)
        if (p.width, p.height) == (width, height):
            videos.append(to_uint8(render(p)))
            captions.append(p.caption)
    return np.stack(videos), captions


def resized_clips(examples, count: int, width: int, height: int, frames: int,
                  max_reads: int = 100_000) -> tuple[np.ndarray, list[str]]:
    """The first `count` examples ({"video" (T, H, W, 3) in [-1, 1], "caption"}) with T >= frames,
    cut to `frames` frames and resized to width x height (bilinear, antialiased).

    Raises:
      ValueError: when fewer than `count` usable clips turn up in `max_reads` examples.
    """
    import jax

    videos, captions = [], []
    for i, example in enumerate(examples):
        if len(videos) == count or i >= max_reads:
            break
        if example is None or "video" not in example or example["video"].shape[0] < frames:
            continue
        clip = np.asarray(example["video"][:frames], np.float32)
        clip = np.asarray(jax.image.resize(clip, (frames, height, width, 3), "linear", antialias=True))
        videos.append(to_uint8(clip))
        captions.append(str(example["caption"]))
    if len(videos) < count:
        raise ValueError(f"only {len(videos)} held-out clips of >= {frames} frames were found; lower "
                         "config.eval.fid_samples or config.eval.frames.")
    return np.stack(videos), captions


def heldout_clips(config, count: int, width: int, height: int, frames: int) -> tuple[np.ndarray, list[str]]:
    """`count` real held-out clips (uint8 [count, frames, height, width, 3]) and their captions."""
    data = config.data
    if pixel_source(data) == "procedural":
        return procedural_clips(data, count, width, height, frames)
    from data_pipelines import pipeline
    stream = pipeline.source_dataset(config, "heldout")
    return resized_clips((stream[i] for i in range(len(stream))), count, width, height, frames)
