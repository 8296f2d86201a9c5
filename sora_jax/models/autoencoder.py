"""The autoencoder interface between pixels and the latents the DiT models.

An autoencoder has `channels` (latent channels), `stride` (t, h, w compression), `encode(video)` and
`decode(latent)`, both channels-last (B, T, H, W, C) with pixel values in [-1, 1], and
`latent_shape(frames, height, width)`, which raises ValueError for a size it cannot represent. The
identity autoencoder serves pixel-space configs; "latent" is a VAE latent space by shape only (no
weights: for compiling and sizing latent models); "vae" loads a CausalVAE checkpoint written by
`python -m sora_jax.convert` (or by VAE training) and works in its normalised latent space.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Protocol

import numpy as np


class Autoencoder(Protocol):
    channels: int
    stride: tuple[int, int, int]

    def encode(self, video): ...

    def decode(self, latent): ...

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int]: ...


class IdentityAutoencoder:
    """Pixels are the latents: stride (1, 1, 1), 3 channels. Works on numpy and jax arrays alike."""

    channels = 3
    stride = (1, 1, 1)

    def encode(self, video):
        return video

    def decode(self, latent):
        return latent

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        return frames, height, width


@functools.lru_cache(maxsize=4)
def _load_vae(checkpoint: str):
    from sora_jax.convert.vae_checkpoint import load_vae
    return load_vae(checkpoint)


class VAEAutoencoder:
    """A CausalVAE checkpoint; shapes come from its vae_config.json, weights load on first use.

    Latents are normalised per channel (the Wan pipeline's mean/std) on encode and restored on decode.
    Encode and decode run the chunked causal paths, so any length fits in bounded memory.
    """

    def __init__(self, checkpoint: str):
        from sora_jax.models.vae import VAEConfig
        path = os.path.join(checkpoint or "", "vae_config.json")
        if not checkpoint or not os.path.exists(path):
            raise ValueError(f"config.autoencoder.checkpoint={checkpoint!r} has no vae_config.json; point it at a "
                             "directory written by `python -m sora_jax.convert` or by VAE training.")
        with open(path) as f:
            self.cfg = VAEConfig.from_dict(json.load(f))
        self.checkpoint, self.channels, self.stride = checkpoint, self.cfg.z_dim, self.cfg.stride

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        st, sh, sw = self.stride
        if (frames - 1) % st:
            nearest = 1 + st * max(1, (frames - 1) // st)
            raise ValueError(f"frames={frames} is not 1 + {st}k, which this causal VAE needs (e.g. {nearest}).")
        if height % sh or width % sw:
            raise ValueError(f"{width}x{height} is not a multiple of the VAE's spatial stride {sh}.")
        return 1 + (frames - 1) // st, height // sh, width // sw

    def encode(self, video):
        import jax.numpy as jnp
        vae = _load_vae(self.checkpoint)
        latent = vae.normalize(vae.encode_chunked(jnp.asarray(video)))
        return np.asarray(latent) if isinstance(video, np.ndarray) else latent

    def decode(self, latent):
        import jax.numpy as jnp
        vae = _load_vae(self.checkpoint)
        return jnp.concatenate(list(vae.decode_chunked(vae.denormalize(jnp.asarray(latent)))), axis=1)


class LatentSpace:
    """A causal VAE's latent space by its shape alone (config.autoencoder.channels and .stride), no weights.

    Enough to build, shard and compile a latent DiT (sora_jax.aot, memory benchmarks) without a VAE
    checkpoint on the machine; encoding or decoding asks for one.
    """

    def __init__(self, channels: int, stride):
        self.channels, self.stride = int(channels), tuple(int(s) for s in stride)

    latent_shape = VAEAutoencoder.latent_shape

    def encode(self, video):
        raise ValueError("config.autoencoder.name='latent' describes the latent space only; to encode or decode "
                         "set --config.autoencoder.name=vae --config.autoencoder.checkpoint=DIR.")

    decode = encode


AUTOENCODERS = {
    "identity": lambda ae_cfg: IdentityAutoencoder(),
    "vae": lambda ae_cfg: VAEAutoencoder(ae_cfg.get("checkpoint")),
    "latent": lambda ae_cfg: LatentSpace(ae_cfg.get("channels", 16), ae_cfg.get("stride", (4, 8, 8))),
}


def build_autoencoder(ae_cfg) -> Autoencoder:
    """The autoencoder named by config.autoencoder.name."""
    if ae_cfg.name not in AUTOENCODERS:
        raise ValueError(f"config.autoencoder.name={ae_cfg.name!r}; choose one of {sorted(AUTOENCODERS)}.")
    return AUTOENCODERS[ae_cfg.name](ae_cfg)
