"""The autoencoder interface between pixels and the latents the DiT models.

An autoencoder has `channels` (latent channels), `stride` (t, h, w compression), `encode(video)` and
`decode(latent)`, both channels-last (B, T, H, W, C) with pixel values in [-1, 1]. The identity
autoencoder (pixel-space diffusion) serves the tiny config until the 3D causal VAE lands.
"""
from __future__ import annotations

from typing import Protocol


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


AUTOENCODERS = {"identity": IdentityAutoencoder}


def build_autoencoder(ae_cfg) -> Autoencoder:
    """The autoencoder named by config.autoencoder.name."""
    if ae_cfg.name not in AUTOENCODERS:
        raise ValueError(f"config.autoencoder.name={ae_cfg.name!r}; choose one of {sorted(AUTOENCODERS)}.")
    return AUTOENCODERS[ae_cfg.name]()
