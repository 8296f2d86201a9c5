"""The DiT trained and sampled in the latent space of a CausalVAE checkpoint (config.autoencoder = vae)."""
import os
import subprocess
import sys

import pytest
from flax import nnx

from sora_jax.config_validation import ConfigError
from sora_jax.convert.vae_checkpoint import save_vae
from sora_jax.models.vae import CausalVAE, VAEConfig
from sora_jax.train.loop import train_and_evaluate
from tests.conftest import ROOT, check_config, smoke_config


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("vae") / "ckpt")
    cfg = VAEConfig(base_dim=4, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1,
                    latents_mean=(0.0, 0.1, -0.1, 0.0), latents_std=(1.0, 2.0, 0.5, 1.0))
    save_vae(CausalVAE(cfg, rngs=nnx.Rngs(0)), path)
    return path


def _latent_config(vae_dir, **overrides):
    return smoke_config(**{"autoencoder.name": "vae", "autoencoder.checkpoint": vae_dir, "model.patch": (1, 1, 1),
                           "data.sides": [16, 24, 32], "data.frames": [1, 5, 9], "sample.width": 24,
                           "sample.height": 16, "sample.frames": 5, **overrides})


def test_latent_config_validation(vae_dir):
    check_config(_latent_config(vae_dir))
    with pytest.raises(ConfigError, match="frames=4 is not 1 \\+ 4k"):
        check_config(_latent_config(vae_dir, **{"data.frames": [1, 4]}))
    with pytest.raises(ConfigError, match="has no vae_config.json"):
        check_config(_latent_config("/nonexistent"))


def test_train_and_sample_in_vae_latents(vae_dir, tmp_path):
    workdir = str(tmp_path / "run")
    summary = train_and_evaluate(_latent_config(vae_dir), workdir)
    assert summary["step"] == 4 and summary["val_loss_params"] > 0
    out = str(tmp_path / "out")
    r = subprocess.run([sys.executable, "-m", "sora_jax.sample", f"--workdir={workdir}", "--prompt=a red circle",
                        "--width=24", "--height=16", "--frames=5", f"--out={out}", "--steps=2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "XLA_FLAGS": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    import av
    mp4 = [f for f in os.listdir(out) if f.endswith(".mp4")][0]
    with av.open(os.path.join(out, mp4)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape == (16, 24, 3)
