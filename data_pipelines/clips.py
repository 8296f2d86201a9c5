"""Fixed-shape batches of video clips and images for autoencoder training.

One grain item is one host's share of a global batch: {"video": (Bv, T, H, W, 3), "image": (Bi, 1, H, W, 3)}
in [-1, 1]. Every batch mixes videos and images (1-frame videos), so each step trains both uses of
the causal VAE's shared latent space. Clips are random crops of procedural renders whose sides come
from config.data.sides (all at least the crop size); crop offsets are drawn from (seed, batch, slot),
so batch k is the same on every run and host count, and the iterator position is the whole state.
"""
from __future__ import annotations

import grain
import numpy as np

from data_pipelines.procedural import ProceduralWorld

# Seed offset of the image stream, so images and the first frames of videos are different draws.
_IMAGE_SEED_OFFSET = 7919


class ClipBatches:
    """Random-access source of this host's slices of global clip batches.

    Args:
      data_cfg: config.data with seed, sides, clip_frames, clip_height, clip_width, video_batch, image_batch.
      split: "train" or "heldout" (the procedural world's held-out combinations).
      process_index, process_count: this host's slice of every global batch.
    """

    def __init__(self, data_cfg, split: str, process_index: int = 0, process_count: int = 1):
        self.cfg, self.split = data_cfg, split
        self.videos = ProceduralWorld(data_cfg.seed, data_cfg.sides, (data_cfg.clip_frames,), split)
        self.images = ProceduralWorld(data_cfg.seed + _IMAGE_SEED_OFFSET, data_cfg.sides, (1,), split)
        self.pi, self.pc = process_index, process_count
        for name in ("video_batch", "image_batch"):
            if data_cfg[name] % process_count:
                raise ValueError(f"config.data.{name}={data_cfg[name]} is not divisible by {process_count} hosts.")

    def __len__(self) -> int:
        return 2**31 - 1

    def _crop(self, video: np.ndarray, key: tuple) -> np.ndarray:
        h, w = self.cfg.clip_height, self.cfg.clip_width
        rng = np.random.default_rng([self.cfg.seed, 0 if self.split == "train" else 1, *key])
        y = int(rng.integers(video.shape[1] - h + 1))
        x = int(rng.integers(video.shape[2] - w + 1))
        return video[:, y:y + h, x:x + w]

    def _slice(self, world: ProceduralWorld, global_size: int, k: int, stream: int) -> np.ndarray:
        per_host = global_size // self.pc
        first = k * global_size + self.pi * per_host
        return np.stack([self._crop(world[i]["video"], (stream, i)) for i in range(first, first + per_host)])

    def __getitem__(self, k: int) -> dict:
        return {"video": self._slice(self.videos, self.cfg.video_batch, int(k), 0),
                "image": self._slice(self.images, self.cfg.image_batch, int(k), 1)}


def clip_dataset(data_cfg, process_index: int = 0, process_count: int = 1, start: int = 0) -> grain.IterDataset:
    """This host's checkpointable stream of training clip batches, from global batch `start` on."""
    source = ClipBatches(data_cfg, "train", process_index, process_count)
    return grain.MapDataset.source(source)[start:].to_iter_dataset(
        grain.ReadOptions(num_threads=data_cfg.num_threads, prefetch_buffer_size=data_cfg.prefetch))


def reshard_start(states: list[dict], start: int) -> int:
    """The global batch a run on a different number of hosts resumes at: every host's iterator is at the
    same global batch (each reads its slice of every batch), so the continuation is exact."""
    positions = {start + int(s["next_index"]) for s in states}
    if len(positions) != 1:
        raise ValueError(f"the hosts' clip iterators disagree on the next global batch: {sorted(positions)}.")
    return positions.pop()


def heldout_batches(data_cfg, num_batches: int, process_index: int = 0, process_count: int = 1) -> list[dict]:
    """This host's part of the fixed held-out batches (combinations never seen in training)."""
    source = ClipBatches(data_cfg, "heldout", process_index, process_count)
    return [source[k] for k in range(num_batches)]
