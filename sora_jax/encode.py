"""Latent caching: run the VAE over a dataset once and write ArrayRecord shards of latents + captions.

  python -m sora_jax.encode --config=configs/tiny.py --config.autoencoder.name=vae \
      --config.autoencoder.checkpoint=VAE_DIR --out=LATENT_DIR --num_examples=100000 --shard_size=1000

Shard k holds source examples [k * shard_size, (k + 1) * shard_size). Each host writes the shards
k = process_index (mod process_count); a shard is written to a temporary name and renamed when complete,
so a rerun after an interruption skips finished shards and redoes only the unfinished ones. Records are
msgpack (flax.serialization): {latent (T', H', W', C) float32 normalised, caption, index, frames, height,
width}; no pickle. Training reads them with `--config.data.source=latents --config.data.latent_dir=DIR`.

With a frozen caption encoder (config.text.encoder="precomputed" and config.text.path, e.g. umT5 in
configs/wan21.py), each record also holds the caption's features, text_features (n, width) float32 for its
n <= config.text.max_len tokens, and the manifest says which encoder, tokenizer, max_len and dtype made them
(data_pipelines.latents.text_features_key). Training on the cache then reads them and its step holds no
encoder: the 5.7B-parameter umT5-XXL is run once per clip here, not once per step.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from data_pipelines.latents import shard_name
from sora_jax.config_validation import parse_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config whose data and autoencoder to use.")
flags.DEFINE_string("out", None, "Output directory for shards and manifest.json.")
flags.DEFINE_integer("num_examples", 1000, "How many source examples (indices 0..N-1) to encode.")
flags.DEFINE_integer("shard_size", 256, "Examples per shard.")
flags.DEFINE_string("split", "train", "Source split.")
flags.DEFINE_integer("process_index", None, "This host's index (default: jax.process_index()).")
flags.DEFINE_integer("process_count", None, "Number of hosts (default: jax.process_count()).")


def encode_dataset(config, out: str, num_examples: int, shard_size: int, split: str = "train",
                   process_index: int = 0, process_count: int = 1) -> list[str]:
    """Writes this host's missing shards; returns the shard names it wrote."""
    from array_record.python.array_record_module import ArrayRecordWriter
    from flax import serialization

    from data_pipelines.latents import text_features_key
    from data_pipelines.pipeline import raw_examples
    from sora_jax.models.autoencoder import build_autoencoder

    if num_examples <= 0 or shard_size <= 0:
        raise ValueError(f"--num_examples={num_examples} and --shard_size={shard_size} must be positive.")
    if config.autoencoder.name == "identity":
        logging.warning("config.autoencoder.name is 'identity': caching pixels, not latents.")
    source = raw_examples(config, split)  # pixels, whatever the DiT trains on; None for a skipped file
    num_examples = min(num_examples, len(source))  # a folder has as many examples as files
    ae = build_autoencoder(config.autoencoder)
    total = -(-num_examples // shard_size)
    os.makedirs(out, exist_ok=True)
    manifest = {"num_examples": num_examples, "shard_size": shard_size, "split": split, "shards": total,
                "autoencoder": config.autoencoder.to_dict(), "latent_channels": ae.channels,
                "data_seed": config.data.seed}
    captions = _CaptionEncoder(config) if text_features_key(config) else None
    if captions is not None:
        manifest["text_features"] = text_features_key(config)
    manifest = json.loads(json.dumps(manifest))  # as it reads back (tuples become lists)
    path = os.path.join(out, "manifest.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old != manifest:
            raise ValueError(f"{path} was written for a different encoding ({old}); use a new --out.")
    elif process_index == 0:
        with open(path, "w") as f:
            json.dump(manifest, f, indent=2)

    written = []
    for k in range(process_index, total, process_count):
        final = os.path.join(out, shard_name(k, total))
        if os.path.exists(final):
            continue  # finished before an interruption
        tmp = final + ".tmp"
        writer = ArrayRecordWriter(tmp, "group_size:1")
        for index in range(k * shard_size, min((k + 1) * shard_size, num_examples)):
            example = source[index]
            if example is None:  # unreadable file or caption: skipped, counted and logged by the decoder
                continue
            video = example["video"]
            latent = np.asarray(ae.encode(video[None])[0], np.float32)
            record = {"latent": latent, "caption": example["caption"], "index": index,
                      "frames": video.shape[0], "height": video.shape[1], "width": video.shape[2]}
            if "meta" in example:
                record["meta"] = np.asarray(example["meta"], np.float32)
            if captions is not None:
                record["text_features"] = captions(example["caption"])
            writer.write(serialization.msgpack_serialize(record))
        writer.close()
        os.replace(tmp, final)
        written.append(shard_name(k, total))
        logging.info("wrote %s", final)
    return written


class _CaptionEncoder:
    """caption -> the frozen encoder's features [n, width] float32, exactly as the train step would compute them."""

    def __init__(self, config):
        from sora_jax.convert.hf_text import CaptionFeatures
        from sora_jax.models.text import build_tokenizer
        self.tokenizer, self.max_len = build_tokenizer(config.text), int(config.text.max_len)
        self.features = CaptionFeatures(config)

    def __call__(self, caption: str) -> np.ndarray:
        return self.features.one(self.tokenizer.encode(caption, self.max_len), self.max_len)


def main(argv):
    del argv
    import jax
    if FLAGS.config is None or not FLAGS.out:
        raise app.UsageError("--config and --out are required.")
    pi = jax.process_index() if FLAGS.process_index is None else FLAGS.process_index
    pc = jax.process_count() if FLAGS.process_count is None else FLAGS.process_count
    try:
        written = encode_dataset(FLAGS.config, FLAGS.out, FLAGS.num_examples, FLAGS.shard_size, FLAGS.split, pi, pc)
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(f"Wrote {len(written)} shards to {FLAGS.out}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
