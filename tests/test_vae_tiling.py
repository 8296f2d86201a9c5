"""Spatial tiling: exact blending machinery, and large frames (1080p video, 2048x2048 image) run."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sora_jax.models.vae import CausalVAE, VAEConfig
from sora_jax.models.vae_tiling import decode_tiled, encode_tiled, tile_starts


class LocalVAE:
    """A stand-in whose encode/decode are local (8x8 mean pooling / nearest upsampling): tiling is exact."""
    stride = (4, 8, 8)
    cfg = VAEConfig(z_dim=3, out_channels=3)

    def check_video(self, video):
        pass

    def latent_shape(self, t, h, w):
        return 1 + (t - 1) // 4, h // 8, w // 8

    def encode_chunked(self, video, chunk=None):
        b, t, h, w, c = video.shape
        pooled = video.reshape(b, t, h // 8, 8, w // 8, 8, c).mean(axis=(3, 5))
        return pooled[:, ::4]

    def decode_chunked(self, latent, chunk=4):
        up = jnp.repeat(jnp.repeat(latent, 8, axis=2), 8, axis=3)
        yield jnp.concatenate([up[:, :1], jnp.repeat(up[:, 1:], 4, axis=1)], axis=1)


def test_tile_grid_covers_the_frame():
    assert tile_starts(1080, 256, 192) == [0, 192, 384, 576, 768, 824]
    assert tile_starts(200, 256, 192) == [0]


def test_blending_is_exact_for_a_local_model():
    vae = LocalVAE()
    video = np.random.default_rng(0).uniform(-1, 1, (1, 5, 72, 104, 3)).astype(np.float32)
    whole = np.asarray(vae.encode_chunked(jnp.asarray(video)))
    np.testing.assert_allclose(encode_tiled(vae, video, tile=32, stride=24), whole, atol=1e-6)
    whole_dec = np.concatenate([np.asarray(p) for p in vae.decode_chunked(jnp.asarray(whole))], axis=1)
    np.testing.assert_allclose(decode_tiled(vae, whole, tile=32, stride=16), np.clip(whole_dec, -1, 1), atol=1e-6)


def test_tiles_must_align_with_the_vae_stride():
    with pytest.raises(ValueError, match="multiples of 8"):
        encode_tiled(LocalVAE(), np.zeros((1, 1, 64, 64, 3), np.float32), tile=36, stride=24)


@pytest.mark.parametrize("shape", [(1, 5, 1080, 1920, 3), (1, 1, 2048, 2048, 3)])
def test_large_frames_encode_and_decode_in_tiles(shape):
    vae = CausalVAE(VAEConfig(base_dim=4, z_dim=4, dim_mult=(1, 1, 1, 1), num_res_blocks=1), rngs=nnx.Rngs(0))
    video = np.zeros(shape, np.float32)
    video[..., 0] = np.linspace(-1, 1, shape[3])
    latent = encode_tiled(vae, video, tile=512, stride=448)
    assert latent.shape == (1, 1 + (shape[1] - 1) // 4, shape[2] // 8, shape[3] // 8, 4)
    assert np.isfinite(latent).all()
    out = decode_tiled(vae, latent[:, :, :, :64], tile=256, stride=192)  # a 512-px-wide strip suffices
    assert out.shape == (1, shape[1], shape[2], 512, 3) and np.isfinite(out).all()
