"""Our own VAE checkpoints: an orbax PyTree of parameters plus vae_config.json, in one directory.

Configs name such a directory (config.autoencoder.checkpoint); `python -m sora_jax.convert` writes one
from a diffusers directory. An existing directory is never overwritten.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import orbax.checkpoint as ocp
from flax import nnx

from sora_jax.models.vae import CausalVAE, VAEConfig


def save_vae(vae: CausalVAE, directory: str) -> None:
    """Writes vae_config.json and params/ (orbax) into a new directory."""
    directory = os.path.abspath(directory)
    if os.path.exists(directory) and os.listdir(directory):
        raise FileExistsError(f"{directory} exists and is not empty; refusing to overwrite it. Choose a new --dst.")
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "vae_config.json"), "w") as f:
        json.dump(dataclasses.asdict(vae.cfg), f, indent=2)
    params = nnx.to_pure_dict(nnx.state(vae, nnx.Param))
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(os.path.join(directory, "params"), params)


def load_vae(directory: str) -> CausalVAE:
    """Restores a VAE written by `save_vae` (shapes checked against vae_config.json by orbax)."""
    config_path = os.path.join(directory, "vae_config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} does not exist: pass a directory written by sora_jax.convert.")
    with open(config_path) as f:
        cfg = VAEConfig.from_dict(json.load(f))
    abstract = nnx.eval_shape(lambda: CausalVAE(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract, nnx.Param)
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), nnx.to_pure_dict(state))
    with ocp.PyTreeCheckpointer() as ckptr:
        params = ckptr.restore(os.path.join(os.path.abspath(directory), "params"), args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
    return nnx.merge(graphdef, params)
