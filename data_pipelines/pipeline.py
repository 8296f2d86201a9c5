"""grain pipelines: source -> per-host shard -> latent patches + caption tokens -> NaViT packing -> batch.

Packing uses grain's BestFitPackIterDataset: every feature packs into its own fixed length, with segment
ids that agree across features, so sample k of a row has segment id k + 1 in the video tokens, in the
caption tokens and in the per-sample `info` slot k. No sample is cropped or split across rows.

A batch (per host) is a dict of numpy arrays:
  video [R, L, D] patches; video_pos [R, L, 3] (t, h, w); video_seg [R, L] (0 = padding);
  text [R, Lt]; text_seg [R, Lt]; text_pos [R, Lt] (position within its caption);
  info [R, S, 5] per sample: (nt, nh, nw, num_tokens, source index), zeros for empty slots.
"""
from __future__ import annotations

import grain
import grain.experimental as grain_exp
import numpy as np

from data_pipelines.latents import LatentShards
from data_pipelines.procedural import ProceduralWorld
from sora_jax import patching
from sora_jax.models.autoencoder import build_autoencoder
from sora_jax.models.text import build_tokenizer

INFO_FIELDS = ("nt", "nh", "nw", "num_tokens", "index")

def _procedural(data_cfg, split):
    return ProceduralWorld(seed=data_cfg.seed, sides=list(data_cfg.sides), frames=list(data_cfg.frames), split=split)


def _latents(data_cfg, split):
    # Cached latents are for training; held-out evaluation still reads (and encodes) the raw source.
    return LatentShards(data_cfg.latent_dir) if split == "train" else build_source(data_cfg, split, raw=True)


# Each source yields {"video" (T, H, W, 3) in [-1, 1] | "latent" (T', H', W', C), "caption", "index"}.
SOURCES = {"procedural": _procedural, "latents": _latents}
RAW_SOURCES = ("procedural",)  # sources of pixels, which `python -m sora_jax.encode` can cache


def build_source(data_cfg, split: str, raw: bool = False):
    """The random-access source named by config.data.source (raw=True: config.data.raw_source, pixels)."""
    name = data_cfg.get("raw_source", "procedural") if raw else data_cfg.source
    allowed = RAW_SOURCES if raw else tuple(SOURCES)
    if name not in allowed:
        field = "raw_source" if raw else "source"
        raise ValueError(f"config.data.{field}={name!r}; choose one of {sorted(allowed)}.")
    return SOURCES[name](data_cfg, split)


class ToTokens(grain.transforms.Map):
    """Encodes a video to latents, patchifies it and tokenizes its caption (numpy, in the data workers)."""

    def __init__(self, config):
        self.patch = tuple(config.model.patch)
        self.autoencoder = build_autoencoder(config.autoencoder)
        self.tokenizer = build_tokenizer(config.text)
        self.text_len = config.text.max_len

    def map(self, example: dict) -> dict:
        if "latent" in example:  # cached by `python -m sora_jax.encode`
            latent = example["latent"]
        else:
            latent = np.asarray(self.autoencoder.encode(example["video"][None])[0])
        grid = patching.check_divisible(latent.shape, self.patch)
        tokens = patching.patchify(latent, self.patch).astype(np.float32)
        n = tokens.shape[0]
        return {
            "video": tokens,
            "video_pos": patching.positions(grid),
            "text": self.tokenizer.encode(example["caption"], self.text_len),
            "info": np.asarray([[*grid, n, example["index"]]], np.int32),
        }


def _rename(batch: dict) -> dict:
    return {
        "video": batch["video"], "video_pos": batch["video_pos"], "video_seg": batch["video_segment_ids"],
        "text": batch["text"], "text_seg": batch["text_segment_ids"], "text_pos": batch["text_positions"],
        "info": batch["info"],
    }


def packed_dataset(config, split: str = "train", process_index: int = 0,
                   process_count: int = 1) -> grain.IterDataset:
    """This host's packed, batched dataset; `iter()` of it is checkpointable (get_state/set_state)."""
    data = config.data
    if data.global_batch_rows % process_count:
        raise ValueError(f"config.data.global_batch_rows={data.global_batch_rows} is not divisible by "
                         f"{process_count} hosts.")
    ds = grain.MapDataset.source(build_source(data, split))[process_index::process_count]
    if split == "train":
        ds = ds.repeat()  # finite sources (cached latents) run for as many epochs as training needs
    ds = ds.map(ToTokens(config)).to_iter_dataset(
        grain.ReadOptions(num_threads=data.num_threads, prefetch_buffer_size=data.prefetch))
    ds = grain_exp.BestFitPackIterDataset(
        ds,
        length_struct={"video": data.seq_len, "video_pos": data.seq_len, "text": data.text_len,
                       "info": data.max_samples_per_row},
        num_packing_bins=data.packing_bins,
        seed=data.seed,
        meta_features=("video_pos", "info"),
        max_sequences_per_bin=data.max_samples_per_row,
    )
    ds = ds.batch(data.global_batch_rows // process_count, drop_remainder=True)
    return ds.map(_rename)


def padding_fraction(batch: dict) -> float:
    """Share of video token slots that hold padding."""
    return float(1.0 - np.mean(batch["video_seg"] > 0))


def eval_batches(config, num_batches: int, process_index: int = 0, process_count: int = 1) -> list[dict]:
    """This host's part of a fixed list of packed batches of held-out prompts, with fixed timesteps.

    The timesteps are spread evenly over (0, 1) so the validation loss weighs every noise level and is
    comparable across steps and runs.
    """
    it = iter(packed_dataset(config, "heldout", process_index, process_count))
    batches = []
    for i in range(num_batches):
        batch = dict(next(it))
        rows, slots = batch["info"].shape[:2]
        grid = (np.arange(rows * slots, dtype=np.float32) + 0.5) / (rows * slots)
        rng = np.random.default_rng([i, process_index])
        batch["t"] = rng.permutation(grid).reshape(rows, slots).astype(np.float32)
        batches.append(batch)
    return batches

