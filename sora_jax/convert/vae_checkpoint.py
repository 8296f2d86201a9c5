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
from sora_jax.train.checkpointing import _quiet_abandoned_reads


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
    """Restores a VAE written by `save_vae`.

    Raises:
      FileNotFoundError: no vae_config.json or params/ in `directory`.
      ValueError: params/ does not read back, or vae_config.json describes another architecture than the
        stored weights (the message names the first tensor that differs and both shapes).
    """
    config_path = os.path.join(directory, "vae_config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} does not exist: pass a directory written by sora_jax.convert.")
    with open(config_path) as f:
        cfg = VAEConfig.from_dict(json.load(f))
    params_dir = os.path.join(os.path.abspath(directory), "params")
    if not os.path.isdir(params_dir):
        raise FileNotFoundError(f"{params_dir} does not exist: pass a directory written by sora_jax.convert.")
    abstract = nnx.eval_shape(lambda: CausalVAE(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract, nnx.Param)
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), nnx.to_pure_dict(state))
    with ocp.PyTreeCheckpointer() as ckptr:
        try:
            stored = ckptr.metadata(params_dir)
            stored = getattr(stored, "item_metadata", stored)
            stored = getattr(stored, "tree", stored)
        except Exception as e:  # noqa: BLE001 -- orbax, tensorstore and json each raise their own types
            raise _unreadable(params_dir, e) from e
        if not isinstance(stored, dict):
            raise _unreadable(params_dir, ValueError("orbax found no tensor metadata"))
        # orbax restores the stored shapes whatever the target says: compare first, or a config edited after
        # conversion would silently build a model around weights of another shape.
        _compare_shapes(_flat_shapes(stored), _flat_shapes(target), params_dir, config_path)
        try:
            params = ckptr.restore(params_dir, args=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
        except Exception as e:  # noqa: BLE001
            _quiet_abandoned_reads()  # the failed read's abandoned siblings would print pages at exit
            raise _unreadable(params_dir, e) from e
    return nnx.merge(graphdef, params)


def _flat_shapes(tree, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """{"decoder/conv_in/kernel": shape} for nested dicts of arrays, ShapeDtypeStructs or orbax metadata."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        out.update(_flat_shapes(value, name) if isinstance(value, dict) else {name: tuple(value.shape)})
    return out


def _compare_shapes(stored: dict, wanted: dict, params_dir: str, config_path: str) -> None:
    """ValueError naming the first tensor (in name order) whose presence or shape differs."""
    fix = "the config does not match the weights; use the vae_config.json written with them."
    for name in sorted(set(stored) | set(wanted)):
        if name not in stored:
            raise ValueError(f"tensor {name}: shape {wanted[name]} from {config_path} but missing from {params_dir}; "
                             f"{fix}")
        if name not in wanted:
            raise ValueError(f"tensor {name}: shape {stored[name]} in {params_dir} but no such tensor in the "
                             f"architecture of {config_path}; {fix}")
        if stored[name] != wanted[name]:
            raise ValueError(f"tensor {name}: shape {stored[name]} in {params_dir} but {wanted[name]} from "
                             f"{config_path}; {fix}")


def _unreadable(params_dir: str, error: BaseException) -> ValueError:
    return ValueError(f"{params_dir} does not read back ({_reason(error)}); its files are damaged or incomplete: "
                      "convert the VAE again (python -m sora_jax.convert) into a new directory.")


def _reason(error: BaseException) -> str:
    """The innermost cause's type and first line (orbax wraps tensorstore's errors in pages of JSON)."""
    while error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__):
        error = error.__cause__ or error.__context__
    line = (str(error).strip().splitlines() or [""])[0][:300]
    return f"{type(error).__name__}: {line}"
