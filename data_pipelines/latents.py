"""Reading the latent shards written by `python -m sora_jax.encode` (ArrayRecord, msgpack records)."""
from __future__ import annotations

import json
import os

import numpy as np


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
        return example
