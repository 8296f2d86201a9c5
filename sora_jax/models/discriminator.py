"""A 3D patch discriminator for adversarial VAE training (hinge loss), causal in time.

Strided causal 3D convolutions halve height and width per layer (time keeps its length, so an image --
a 1-frame video -- is judged by the same network), then a final convolution gives one logit per
spacetime patch. Parameters carry the VAE's logical axis names, so the trainer shards them alike.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sora_jax.models.vae import CausalConv3d


class PatchDiscriminator3D(nnx.Module):
    def __init__(self, in_channels: int = 3, channels: int = 32, layers: int = 3, *, rngs: nnx.Rngs):
        convs, cin = [], in_channels
        for i in range(layers):
            cout = channels * 2 ** min(i, 3)
            convs.append(CausalConv3d(cin, cout, (3, 4, 4), stride=(1, 2, 2), padding=(1, 1, 1), rngs=rngs))
            cin = cout
        self.convs = nnx.List(convs)
        self.head = CausalConv3d(cin, 1, 3, padding=1, rngs=rngs)

    def __call__(self, video: jax.Array) -> jax.Array:
        """Logits (B, T, H / 2^layers, W / 2^layers, 1) for videos (B, T, H, W, C) in [-1, 1]."""
        x = video
        for conv in self.convs:
            x = jax.nn.leaky_relu(conv(x), 0.2)
        return self.head(x)


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """The discriminator's hinge loss: push real logits above 1 and fake ones below -1."""
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def generator_loss(logits_fake: jax.Array) -> jax.Array:
    """The generator's (decoder's) adversarial term."""
    return -jnp.mean(logits_fake)
