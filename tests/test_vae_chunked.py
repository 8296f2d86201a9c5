"""Chunked (streaming, frame-cached) encode/decode equal the whole-video path."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sora_jax.models.vae import CausalVAE, VAEConfig

CFG = VAEConfig(base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1)


@pytest.fixture(scope="module")
def vae():
    return CausalVAE(CFG, rngs=nnx.Rngs(1))


@pytest.mark.parametrize("frames,chunk", [(1, 4), (5, 4), (17, 4), (17, 8), (21, 12)])
def test_chunked_encode_equals_whole(vae, frames, chunk):
    video = jnp.asarray(np.random.default_rng(frames).uniform(-1, 1, (1, frames, 16, 24, 3)), jnp.float32)
    whole = np.asarray(vae.encode(video))
    chunked = np.asarray(vae.encode_chunked(video, chunk))
    assert chunked.shape == whole.shape
    np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-5 * np.abs(whole).max())


def test_encode_accepts_a_stream_of_pieces(vae):
    video = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, 9, 16, 16, 3)), jnp.float32)
    pieces = [video[:, :1], video[:, 1:5], video[:, 5:9]]
    np.testing.assert_allclose(vae.encode_chunked(iter(pieces)), vae.encode(video), atol=1e-5)
    with pytest.raises(ValueError, match="multiple of 4"):
        vae.encode_chunked(iter([video[:, :1], video[:, 1:4]]))


@pytest.mark.parametrize("latent_frames,chunk", [(1, 1), (2, 1), (5, 1), (5, 2)])
def test_chunked_decode_equals_whole(vae, latent_frames, chunk):
    latent = jnp.asarray(np.random.default_rng(latent_frames).normal(size=(1, latent_frames, 2, 3, 4)), jnp.float32)
    whole = np.asarray(vae.decode(latent))
    pieces = [np.asarray(p) for p in vae.decode_chunked(latent, chunk)]
    chunked = np.concatenate(pieces, axis=1)
    assert chunked.shape == whole.shape == (1, 1 + 4 * (latent_frames - 1), 16, 24, 3)
    np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-5)
