"""Model registry: config.model.name -> constructor. Plain dicts, easy to grep."""
from __future__ import annotations

import math

from flax import nnx

from sora_jax.models.autoencoder import build_autoencoder
from sora_jax.models.dit import DiT
from sora_jax.models.text import build_tokenizer

MODELS = {"dit": DiT}


def patch_dim(config) -> int:
    """Features per token: pt * ph * pw * latent channels."""
    return math.prod(config.model.patch) * build_autoencoder(config.autoencoder).channels


def build_model(config, rngs: nnx.Rngs) -> nnx.Module:
    """Instantiates config.model.name with the sizes the rest of the config implies."""
    if config.model.name not in MODELS:
        raise ValueError(f"config.model.name={config.model.name!r}; choose one of {sorted(MODELS)}.")
    vocab = build_tokenizer(config.text).vocab_size
    return MODELS[config.model.name](config.model, config.text, patch_dim(config), vocab, rngs=rngs)
