"""Latent caching: shards, resume after interruption, host split, and the DiT reading the shards."""
import os

import numpy as np
import pytest
from flax import nnx

from data_pipelines import pipeline
from data_pipelines.latents import LatentShards, shard_name
from sora_jax import patching
from sora_jax.convert.vae_checkpoint import save_vae
from sora_jax.encode import encode_dataset
from sora_jax.models.vae import CausalVAE, VAEConfig
from sora_jax.train.loop import train_and_evaluate
from tests.conftest import smoke_config


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("vae") / "ckpt")
    save_vae(CausalVAE(VAEConfig(base_dim=4, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1), rngs=nnx.Rngs(0)), path)
    return path


def _config(vae_dir, latent_dir=""):
    return smoke_config(**{"autoencoder.name": "vae", "autoencoder.checkpoint": vae_dir, "model.patch": (1, 1, 1),
                           "data.sides": [16, 24], "data.frames": [1, 5], "data.latent_dir": latent_dir,
                           "data.source": "latents" if latent_dir else "procedural",
                           "sample.width": 16, "sample.height": 16, "sample.frames": 5})


def test_encode_resume_split_and_train(vae_dir, tmp_path):
    out = str(tmp_path / "latents")
    config = _config(vae_dir)
    # Two hosts split the shards between them.
    a = encode_dataset(config, out, num_examples=12, shard_size=5, process_index=0, process_count=2)
    b = encode_dataset(config, out, num_examples=12, shard_size=5, process_index=1, process_count=2)
    assert a == [shard_name(0, 3), shard_name(2, 3)] and b == [shard_name(1, 3)]
    # An interrupted run left shard 1 unfinished: only it is redone.
    os.remove(os.path.join(out, shard_name(1, 3)))
    before = {n: os.path.getmtime(os.path.join(out, n)) for n in (shard_name(0, 3), shard_name(2, 3))}
    assert encode_dataset(config, out, num_examples=12, shard_size=5) == [shard_name(1, 3)]
    assert before == {n: os.path.getmtime(os.path.join(out, n)) for n in before}

    shards = LatentShards(out)
    assert len(shards) == 12
    world = pipeline.build_source(config.data, "train")
    from sora_jax.models.autoencoder import build_autoencoder
    ae = build_autoencoder(config.autoencoder)
    np.testing.assert_allclose(shards[7]["latent"], ae.encode(world[7]["video"][None])[0], atol=1e-5)
    assert shards[7]["caption"] == world[7]["caption"]

    # The DiT pipeline packs the cached latents, unchanged.
    train_config = _config(vae_dir, out)
    batch = next(iter(pipeline.packed_dataset(train_config)))
    nt, nh, nw, n, index = batch["info"][0, 0]
    sel = batch["video_segment_ids"][0] == 1
    np.testing.assert_array_equal(batch["video"][0][sel], patching.patchify(shards[int(index)]["latent"], (1, 1, 1)))
    summary = train_and_evaluate(train_config, str(tmp_path / "run"))
    assert summary["step"] == 4


def test_missing_shards_are_named(vae_dir, tmp_path):
    out = str(tmp_path / "latents")
    encode_dataset(_config(vae_dir), out, num_examples=4, shard_size=2, process_index=0, process_count=2)
    with pytest.raises(ValueError, match="1 of 2 shards are missing"):
        LatentShards(out)
    with pytest.raises(ValueError, match="no manifest.json"):
        LatentShards(str(tmp_path / "nothing"))
