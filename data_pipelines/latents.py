"""Reading the latent shards written by `python -m sora_jax.encode` (ArrayRecord, msgpack records)."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from sora_jax.models.text import frozen_encoder_path, hf_tokenizer_path


def shard_name(k: int, total: int) -> str:
    """File name of shard k of `total`."""
    return f"latents-{k:05d}-of-{total:05d}.array_record"


def _opens(path: str) -> bool:
    """Whether array_record can open this one shard."""
    import grain
    try:
        grain.sources.ArrayRecordDataSource([path])
        return True
    except Exception:
        return False


def _folder_fingerprint(path: str) -> str:
    """A digest of a model folder: config.json's bytes and the name and size of every other file in it."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            continue
        digest.update(name.encode())
        if name == "config.json":
            with open(full, "rb") as f:
                digest.update(f.read())
        else:
            digest.update(str(os.path.getsize(full)).encode())
    return digest.hexdigest()[:16]


def text_features_key(config) -> dict | None:
    """What cached caption features depend on -- the frozen encoder's weights, its tokenizer, config.text.max_len
    and the compute dtype -- or None when config.text names no frozen encoder. Folders are identified by their
    contents (file names and sizes, config.json), not their path: a moved copy still matches."""
    path = frozen_encoder_path(config.text)
    if not path:
        return None
    return {"encoder": _folder_fingerprint(path), "tokenizer": _folder_fingerprint(hf_tokenizer_path(config.text)),
            "max_len": int(config.text.max_len), "dtype": str(config.model.dtype)}


def cached_text_features(config) -> bool:
    """Whether training reads caption features from the latent cache instead of running the frozen encoder in
    the step: config.data.source is "latents", config.text names a frozen encoder, and the cache holds features
    of that encoder (`python -m sora_jax.encode` with this config writes them).

    Raises:
      ValueError: the cache holds features of another encoder, tokenizer, max_len or dtype.
    """
    key = text_features_key(config)
    manifest_path = os.path.join(config.data.get("latent_dir") or "", "manifest.json")
    if key is None or config.data.source != "latents" or not os.path.exists(manifest_path):
        return False
    with open(manifest_path) as f:
        cached = json.load(f).get("text_features")
    if cached is None:
        return False
    if cached != key:
        differ = sorted(k for k in key if cached.get(k) != key[k])
        raise ValueError(
            f"{config.data.latent_dir} holds caption features of another text encoder setting ({', '.join(differ)} "
            f"differ: cached {[cached.get(k) for k in differ]}, config {[key[k] for k in differ]}). Re-encode with "
            "this config (python -m sora_jax.encode --out=NEW_DIR), or set config.text back to the encoder, "
            "tokenizer, max_len and model dtype the cache was written with.")
    return True


class LatentShards:
    """Random-access source over the shards of `python -m sora_jax.encode` (what the DiT pipeline reads)."""

    def __init__(self, latent_dir: str):
        import grain
        manifest = os.path.join(latent_dir or "", "manifest.json")
        if not latent_dir or not os.path.exists(manifest):
            raise ValueError(f"config.data.latent_dir={latent_dir!r} has no manifest.json; run "
                             "`python -m sora_jax.encode` first.")
        with open(manifest) as f:
            self.manifest = json.load(f)
        total = self.manifest["shards"]
        paths = [os.path.join(latent_dir, shard_name(k, total)) for k in range(total)]
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            raise ValueError(f"{len(missing)} of {total} shards are missing in {latent_dir} (e.g. {missing[0]}); "
                             "rerun `python -m sora_jax.encode` with the same flags to finish them.")
        try:
            self._source = grain.sources.ArrayRecordDataSource(paths)
        except Exception as e:  # array_record names no file: find the one that does not open
            bad = next((p for p in paths if not _opens(p)), None)
            where = f"shard {bad} does not open (truncated or not an ArrayRecord file)" if bad else f"{e!r}"
            raise ValueError(f"{latent_dir}: {where}; delete it and rerun `python -m sora_jax.encode` with the same "
                             "flags to rewrite it.") from e

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        from flax import serialization
        record = serialization.msgpack_restore(self._source[index])
        example = {"latent": np.asarray(record["latent"]), "caption": record["caption"], "index": int(record["index"])}
        if "meta" in record:  # decoded sources record fps, original size and duration
            example["meta"] = np.asarray(record["meta"], np.float32)
        if "text_features" in record:  # a frozen caption encoder's output (see cached_text_features)
            example["text_features"] = np.asarray(record["text_features"], np.float32)
        return example
