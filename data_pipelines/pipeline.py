"""grain pipelines: source -> decode -> per-host shard -> latent patches + caption tokens -> NaViT packing -> batch.

Packing uses grain's BestFitPackIterDataset: every feature packs into its own fixed length, with segment
ids that agree across features, so sample k of a row has segment id k + 1 in the video tokens, in the
caption tokens and in the per-sample `info` and `meta` slots k. No sample is cropped or split across rows.

A batch (per host) is a dict of numpy arrays:
  video [R, L, D] patches; video_pos [R, L, 3] (t, h, w); video_segment_ids [R, L] (0 = padding);
  text [R, Lt] token ids, or [R, Lt, width] float32 caption features when a latent cache holds a frozen
    encoder's (latents.cached_text_features); text_segment_ids [R, Lt]; text_positions [R, Lt] (position
    within its caption);
  info [R, S, 5] per sample: (nt, nh, nw, num_tokens, source index), zeros for empty slots;
  meta [R, S, 4] per sample: (fps, original height, original width, duration in s), zeros where unknown;
  host_skipped [len(SKIP_REASONS)]: files skipped since this host's previous batch, by reason. Keys
  starting with "host_" stay on the host (sharding.host_to_global leaves them out).

Order and sharding. One global stream per run: the source, reshuffled each epoch when it is finite
(data.shuffle), repeated for training, decoded with a per-position random clip start; host p of P reads
stream positions start + p, start + p + P, ... . The iterator state in a checkpoint is each host's
position in its stride, so resuming with the same P continues exactly. `reshard_start` turns the states
of a run with a different P into a new `start` (see its docstring for what that costs).
"""
from __future__ import annotations

import logging

import grain
import grain.experimental as grain_exp
import ml_collections
import numpy as np

from data_pipelines import media, sources
from data_pipelines.latents import LatentShards, cached_text_features
from data_pipelines.procedural import ProceduralWorld
from sora_jax import patching
from sora_jax.models.autoencoder import build_autoencoder
from sora_jax.models.text import build_tokenizer

INFO_FIELDS = ("nt", "nh", "nw", "num_tokens", "index")
META_FIELDS = ("fps", "orig_height", "orig_width", "duration")


def _procedural(data_cfg, split):
    return ProceduralWorld(seed=data_cfg.seed, sides=list(data_cfg.sides), frames=list(data_cfg.frames), split=split)


def _latents(data_cfg, split):
    # Cached latents are for training; held-out evaluation still reads (and encodes) the raw source.
    return LatentShards(data_cfg.latent_dir) if split == "train" else build_source(data_cfg, split, raw=True)


def _folder(data_cfg, split):
    manifest = data_cfg.manifest
    if split == "heldout" and data_cfg.get("eval_manifest"):
        manifest = data_cfg.eval_manifest
    elif split == "heldout":
        logging.warning("config.data.eval_manifest is not set: validation reads the training manifest %s.", manifest)
    if not manifest:
        raise ValueError("config.data.source='folder' needs config.data.manifest: a JSONL or CSV of path + caption "
                         "(write one with `python -m data_pipelines.prepare --videos=DIR --out=DIR/manifest.jsonl`).")
    return sources.ManifestSource(manifest, data_cfg.get("root", ""))


def _records(data_cfg, split):
    if not data_cfg.records:
        raise ValueError("config.data.source='records' needs config.data.records: a glob of ArrayRecord clip shards.")
    return sources.ClipRecordSource(data_cfg.records)


def _tfds(data_cfg, split):
    if not data_cfg.tfds_name:
        raise ValueError("config.data.source='tfds' needs config.data.tfds_name (and tfds_data_dir if not default).")
    name = data_cfg.tfds_split if split == "train" else (data_cfg.tfds_eval_split or data_cfg.tfds_split)
    return sources.TfdsSource(data_cfg.tfds_name, name, data_cfg.tfds_data_dir, data_cfg.tfds_video_key,
                              data_cfg.tfds_caption_key)


# Each source yields {"video" (T, H, W, 3) in [-1, 1] | "latent" (T', H', W', C), "caption", "index"}, or, for
# the DECODED ones, undecoded records that sources.DecodeMedia turns into videos (skipping bad files).
SOURCES = {"procedural": _procedural, "latents": _latents, "folder": _folder, "records": _records, "tfds": _tfds}
DECODED = ("folder", "records", "tfds")
RAW_SOURCES = ("procedural", *DECODED)  # sources of pixels, which `python -m sora_jax.encode` can cache


def build_source(data_cfg, split: str, raw: bool = False):
    """The random-access source named by config.data.source (raw=True: config.data.raw_source, pixels)."""
    name = data_cfg.get("raw_source", "procedural") if raw else data_cfg.source
    allowed = RAW_SOURCES if raw else tuple(SOURCES)
    if name not in allowed:
        field = "raw_source" if raw else "source"
        raise ValueError(f"config.data.{field}={name!r}; choose one of {sorted(allowed)}.")
    return SOURCES[name](data_cfg, split)


def _component(data_cfg, name: str):
    """config.data with the mixture component `name`'s fields (config.data.components[name]) applied."""
    if name not in data_cfg.components:
        raise ValueError(f"config.data.mixture names {name!r}, which config.data.components lacks; components: "
                         f"{sorted(data_cfg.components)}.")
    merged = ml_collections.ConfigDict(data_cfg.to_dict())
    merged.update(data_cfg.components[name].to_dict())
    merged.mixture = ()
    return merged


def decode_transform(config, data_cfg, source_size: int) -> sources.DecodeMedia:
    """The DecodeMedia transform sized for config's autoencoder and patch (clip length and token budget)."""
    stride = build_autoencoder(config.autoencoder).stride
    patch = tuple(config.model.patch)
    return sources.DecodeMedia(data_cfg, temporal_stride=stride[0] * patch[0], multiple=stride[1] * patch[1],
                               source_size=source_size)


def source_dataset(config, split: str, data_cfg=None) -> grain.MapDataset:
    """The global example stream of one source (or a mixture): shuffled, repeated (train) and decoded."""
    data_cfg = data_cfg or config.data
    if data_cfg.source == "mixture":
        if not data_cfg.mixture:
            raise ValueError("config.data.source='mixture' needs config.data.mixture = ((name, weight), ...).")
        parts = [source_dataset(config, split, _component(data_cfg, name)) for name, _ in data_cfg.mixture]
        return sources.mixture(parts, [float(w) for _, w in data_cfg.mixture])
    src = build_source(data_cfg, split)
    ds = grain.MapDataset.source(src)
    # What the source reads: held-out batches of a latent cache come from its raw source.
    name = data_cfg.raw_source if data_cfg.source == "latents" and split != "train" else data_cfg.source
    finite = name != "procedural"  # the procedural world is random per index already
    if finite and data_cfg.shuffle and split == "train":
        ds = ds.shuffle(seed=data_cfg.seed)
    # Finite sources run for as many epochs as training needs (reshuffled each epoch); a held-out set too
    # small for config.eval_batches full batches is repeated to fill them.
    ds = ds.repeat()
    if name in DECODED:
        ds = ds.random_map(decode_transform(config, data_cfg, len(src)), seed=data_cfg.seed)
    return ds


def raw_examples(config, split: str = "train") -> grain.MapDataset:
    """config.data.raw_source's examples in source order, decoded to pixels, for `python -m sora_jax.encode`.

    Entries of skipped files are None (and counted in sources.SKIPS).
    """
    data = ml_collections.ConfigDict(config.data.to_dict())
    data.source = data.raw_source
    src = build_source(data, split)
    ds = grain.MapDataset.source(src)
    if data.source in DECODED:
        ds = ds.random_map(decode_transform(config, data, len(src)), seed=data.seed)
    return ds


class ToTokens(grain.transforms.Map):
    """Encodes a video to latents, patchifies it and tokenizes its caption (numpy, in the data workers)."""

    def __init__(self, config):
        self.patch = tuple(config.model.patch)
        self.autoencoder = build_autoencoder(config.autoencoder)
        self.tokenizer = build_tokenizer(config.text)
        self.text_len = config.text.max_len
        self.fps = float(config.sample.fps)
        # Caption features cached beside the latents replace the ids (the train step then runs no encoder).
        self.cached_text = cached_text_features(config)
        self.pad_captions = bool(config.text.get("pad_captions", False))

    def map(self, example: dict) -> dict:
        if "latent" in example:  # cached by `python -m sora_jax.encode`
            latent = example["latent"]
        else:
            latent = np.asarray(self.autoencoder.encode(example["video"][None])[0])
        grid = patching.check_divisible(latent.shape, self.patch)
        tokens = patching.patchify(latent, self.patch).astype(np.float32)
        n = tokens.shape[0]
        if "meta" in example:
            meta = np.asarray(example["meta"], np.float32)
        elif "video" in example:  # procedural: rendered at its own size, played at the sampling fps
            t, h, w = example["video"].shape[:3]
            fps = self.fps if t > 1 else 0.0  # images have no frame rate, as decoded images record it
            meta = np.asarray([fps, h, w, t / self.fps if t > 1 else 0.0], np.float32)
        else:
            meta = np.zeros(len(META_FIELDS), np.float32)
        return {
            "video": tokens,
            "video_pos": patching.positions(grid),
            "text": self._caption(example),
            "info": np.asarray([[*grid, n, example["index"]]], np.int32),
            "meta": meta[None],
        }


    def _caption(self, example: dict) -> np.ndarray:
        """Token ids [n], or with cached caption features those features [n, width]; with config.text.pad_captions
        [max_len] ids (pad id 0, which the frozen encoder turns into zero features) or [max_len, width] features."""
        if not self.cached_text or "latent" not in example:  # held-out batches read the raw source: ids
            caption = self.tokenizer.encode(example["caption"], self.text_len)
        elif "text_features" not in example:
            raise ValueError(f"latent record {example['index']} has no caption features although the cache's "
                             "manifest says it holds them; re-encode (python -m sora_jax.encode).")
        else:
            caption = example["text_features"]
        if self.pad_captions:
            caption = np.pad(caption, [(0, self.text_len - len(caption))] + [(0, 0)] * (caption.ndim - 1))
        return caption


def _finish(batch: dict) -> dict:
    """Keeps the packed features the model reads, under the names grain's packer gives them (one name from
    here to the loss), and attaches the skip counts drained from this process's tally."""
    skipped = sources.SKIPS.drain()
    return {
        "video": batch["video"], "video_pos": batch["video_pos"], "video_segment_ids": batch["video_segment_ids"],
        "text": batch["text"], "text_segment_ids": batch["text_segment_ids"], "text_positions": batch["text_positions"],
        "info": batch["info"], "meta": batch["meta"],
        "host_skipped": np.asarray([skipped.get(r, 0) for r in media.SKIP_REASONS], np.int64),
    }


def packed_dataset(config, split: str = "train", process_index: int = 0, process_count: int = 1,
                   start: int = 0) -> grain.IterDataset:
    """This host's packed, batched dataset; `iter()` of it is checkpointable (get_state/set_state).

    start: the global stream position this run begins at (nonzero only after `reshard_start`).
    """
    data = config.data
    if data.global_batch_rows % process_count:
        raise ValueError(f"config.data.global_batch_rows={data.global_batch_rows} is not divisible by "
                         f"{process_count} hosts.")
    ds = source_dataset(config, split)[start + process_index::process_count]
    ds = ds.map(ToTokens(config)).to_iter_dataset(
        grain.ReadOptions(num_threads=data.num_threads, prefetch_buffer_size=data.prefetch))
    ds = grain_exp.BestFitPackIterDataset(
        ds,
        length_struct={"video": data.seq_len, "video_pos": data.seq_len, "text": data.text_len,
                       "info": data.max_samples_per_row, "meta": data.max_samples_per_row},
        num_packing_bins=data.packing_bins,
        seed=data.seed,
        meta_features=("video_pos", "info", "meta"),
        max_sequences_per_bin=data.max_samples_per_row,
    )
    ds = ds.batch(data.global_batch_rows // process_count, drop_remainder=True).map(_finish)
    if data.get("workers", 0) > 0 and split == "train":
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.workers))
    return ds


def reshard_start(states: list[dict], start: int, process_count: int) -> int:
    """Where a run on a different number of hosts begins, from the iterator states of `process_count` hosts.

    Host p of the old run read stream positions start + p + k * process_count; its packer's state holds the
    position where its last, partly emitted packing round began (grain replays that round on restore), so
    every position before it was trained on. The new start is the smallest such frontier over the old hosts:
    nothing after it is skipped. What is repeated: positions past it that a host had already trained on --
    its partly emitted round and its lead over the slowest host, a few packing rounds per host.
    Exact continuation would need the set of trained positions past the frontier, which grain's packer does
    not record. Raises ValueError for states of a multiprocessing (data.workers > 0) pipeline.
    """
    if len(states) != process_count:
        raise ValueError(f"expected the iterator states of {process_count} hosts, found {len(states)}.")
    frontiers = []
    for p, state in enumerate(states):
        parent = state.get("parent") if isinstance(state, dict) else None
        if not isinstance(parent, dict) or "next_index" not in parent:
            raise ValueError("the checkpoint's data iterator state is not a single-process packed pipeline's (was "
                             "config.data.workers > 0?); resume on the same number of hosts, or from a fresh work dir.")
        frontiers.append(start + p + process_count * int(parent["next_index"]))
    return min(frontiers)


def sample_prompts(config, count: int) -> tuple[list[str], bool]:
    """(prompts to sample after training, whether they are the procedural world's held-out prompts).

    Real data has no held-out prompt list: its first `count` held-out captions are used instead.
    """
    from data_pipelines.procedural import HELD_OUT_PROMPTS
    data = config.data
    while data.source == "mixture":
        data = _component(data, data.mixture[0][0])
    if sources.pixel_source(data) == "procedural":
        return list(HELD_OUT_PROMPTS[:count]), True
    src = build_source(data, "heldout", raw=data.source == "latents")
    prompts = []
    for i in range(len(src)):
        if len(prompts) == count:
            break
        record = src[i]
        if record.get("caption") and not record.get("caption_error"):
            prompts.append(record["caption"])
    return prompts, False


def padding_fraction(batch: dict) -> float:
    """Share of video token slots that hold padding."""
    return float(1.0 - np.mean(batch["video_segment_ids"] > 0))


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

