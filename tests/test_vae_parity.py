"""Our CausalVAE against diffusers' AutoencoderKLWan (PyTorch, CPU) on small random configurations."""
import os

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sora_jax.convert import load_diffusers_vae

CONFIGS = {
    "wan_layout": dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                       temperal_downsample=[False, True, True]),
    # diffusers 0.42.1 cannot run encoder attention (attn_scales): WanAttentionBlock.forward() rejects
    # the feat_cache argument its encoder passes. Wan 2.1's released VAE has none, so none is tested here.
    "two_blocks": dict(base_dim=8, z_dim=6, dim_mult=[1, 2, 4], num_res_blocks=2, attn_scales=[],
                       temperal_downsample=[True, True]),
}


def _torch_vae(tmp_path, name):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLWan(**CONFIGS[name]).eval()
    with torch.no_grad():
        for p in vae.parameters():  # move every tensor off its default, so a wrong mapping shows
            p.add_(0.05 * torch.randn_like(p))
    path = os.path.join(tmp_path, name)
    vae.save_pretrained(path, safe_serialization=True)
    return vae, path


def _rel_err(ours, ref):
    return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-6))


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("frames", [1, 5, 17])
def test_encode_decode_match_diffusers(tmp_path, name, frames):
    vae_t, path = _torch_vae(str(tmp_path), name)
    ours = load_diffusers_vae(path)
    video = np.random.default_rng(frames).uniform(-1, 1, size=(1, frames, 16, 24, 3)).astype(np.float32)
    with torch.no_grad():
        mean_t = vae_t.encode(torch.from_numpy(video).permute(0, 4, 1, 2, 3)).latent_dist.mean
    mean_t = mean_t.permute(0, 2, 3, 4, 1).numpy()
    mean = np.asarray(ours.encode(jnp.asarray(video)))
    assert mean.shape == mean_t.shape
    assert _rel_err(mean, mean_t) < 1e-4

    latent = np.random.default_rng(frames + 1).normal(size=mean_t.shape).astype(np.float32)
    with torch.no_grad():
        out_t = vae_t.decode(torch.from_numpy(latent).permute(0, 4, 1, 2, 3)).sample.permute(0, 2, 3, 4, 1).numpy()
    out = np.asarray(ours.decode(jnp.asarray(latent)))
    assert out.shape == out_t.shape == (1, frames, 16, 24, 3)
    assert _rel_err(out, out_t) < 1e-4
