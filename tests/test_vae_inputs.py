"""CausalVAE: shapes, the 1 + 4k frame rule, and clear errors for bad input and bad checkpoints."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sora_jax.convert import load_diffusers_vae
from sora_jax.models.vae import CausalVAE, VAEConfig, pad_frames

TINY = VAEConfig(base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1)


@pytest.fixture(scope="module")
def vae():
    return CausalVAE(TINY, rngs=nnx.Rngs(0))


def test_images_and_videos_share_one_latent_space(vae):
    video = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, 9, 16, 24, 3)), jnp.float32)
    latent = vae.encode(video)
    assert latent.shape == (1, 3, 2, 3, 4)  # 1 + 4k frames -> 1 + k latent frames, 8x spatially
    # Causality: the first latent frame is the image encoding of the first frame alone.
    np.testing.assert_allclose(vae.encode(video[:, :1])[:, 0], latent[:, 0], atol=1e-5)
    assert vae.decode(latent).shape == video.shape


@pytest.mark.parametrize("shape,match", [
    ((1, 5, 16, 24, 4), "has 4 channels; this VAE takes 3"),
    ((1, 0, 16, 24, 3), "has 0 frames"),
    ((1, 6, 16, 24, 3), r"has 6 frames; this VAE takes 1 \+ 4k frames. Trim to 5 or pad to 9"),
    ((1, 5, 12, 24, 3), "multiples of 8"),
])
def test_bad_videos_are_named(vae, shape, match):
    with pytest.raises(ValueError, match=match):
        vae.encode(jnp.zeros(shape))


def test_pad_frames_repeats_the_last_frame():
    video = jnp.arange(6, dtype=jnp.float32).reshape(1, 6, 1, 1, 1)
    padded = pad_frames(video)
    assert padded.shape[1] == 9 and np.all(np.asarray(padded[0, 5:, 0, 0, 0]) == 5)


@pytest.fixture(scope="module")
def saved_wan(tmp_path_factory):
    import diffusers
    import torch
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("wan"))
    diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1).save_pretrained(
        path, safe_serialization=True)
    return path


def _copy(src, dst):
    os.makedirs(dst)
    for name in os.listdir(src):
        with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
            g.write(f.read())
    return dst


def test_config_that_does_not_match_the_weights(saved_wan, tmp_path):
    path = _copy(saved_wan, str(tmp_path / "mismatch"))
    raw = json.load(open(os.path.join(path, "config.json")))
    raw["z_dim"] = 6
    json.dump(raw, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ValueError, match=r"tensor decoder\.conv_in\.weight: shape \(3, 3, 3, 4, 64\) .* but "
                                         r"\(3, 3, 3, 6, 64\)|tensor \S+: shape .* but"):
        load_diffusers_vae(path)


def test_corrupt_safetensors(saved_wan, tmp_path):
    path = _copy(saved_wan, str(tmp_path / "corrupt"))
    weights = [f for f in os.listdir(path) if f.endswith(".safetensors")][0]
    with open(os.path.join(path, weights), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(path, weights)) // 2)
    with pytest.raises(ValueError, match="is not a valid safetensors file"):
        load_diffusers_vae(path)


def test_pickle_weights_are_refused(saved_wan, tmp_path):
    path = str(tmp_path / "pickle")
    os.makedirs(path)
    _copy(saved_wan, str(tmp_path / "tmp"))
    os.rename(str(tmp_path / "tmp" / "config.json"), os.path.join(path, "config.json"))
    with open(os.path.join(path, "diffusion_pytorch_model.bin"), "wb") as f:
        f.write(b"\x80\x04not really a pickle")
    with pytest.raises(ValueError, match="pickle files are refused"):
        load_diffusers_vae(path)


def test_convert_cli_writes_a_checkpoint_configs_can_name(saved_wan, tmp_path):
    import subprocess
    import sys

    from sora_jax.convert.vae_checkpoint import load_vae
    from tests.conftest import ROOT
    dst = str(tmp_path / "converted")
    r = subprocess.run([sys.executable, "-m", "sora_jax.convert", "--kind=wan_vae", f"--src={saved_wan}",
                        f"--dst={dst}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    video = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, 5, 16, 16, 3)), jnp.float32)
    np.testing.assert_allclose(load_vae(dst).encode(video), load_diffusers_vae(saved_wan).encode(video), atol=1e-6)
    r = subprocess.run([sys.executable, "-m", "sora_jax.convert", f"--src={saved_wan}", f"--dst={dst}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "refusing to overwrite" in r.stderr


def test_latent_normalisation_is_per_channel_and_invertible():
    cfg = VAEConfig(base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1,
                    latents_mean=(0.5, -1.0, 0.0, 2.0), latents_std=(2.0, 0.5, 1.0, 4.0))
    vae = CausalVAE(cfg, rngs=nnx.Rngs(0))
    z = jnp.ones((1, 1, 2, 2, 4))
    np.testing.assert_allclose(vae.normalize(z)[0, 0, 0, 0], [0.25, 4.0, 1.0, -0.25])
    np.testing.assert_allclose(vae.denormalize(vae.normalize(z)), z, atol=1e-6)
