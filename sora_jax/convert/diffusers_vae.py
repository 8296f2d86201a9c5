"""diffusers `AutoencoderKLWan` (config.json + *.safetensors) -> our CausalVAE.

Our module tree mirrors diffusers' names, so each tensor maps by name: PyTorch kernels (O, I, *k) become
channels-last (*k, I, O), RMS-norm gammas (C, 1, 1[, 1]) become (C,), and the Sequential index of
`resample.1` becomes `resample_conv`. Every tensor must be used, and every parameter filled, with equal
shapes; otherwise the error names the tensor and both shapes.
"""
from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax.models.vae import CausalVAE, VAEConfig
from sora_jax.safetensors_io import PICKLE_SUFFIXES


def vae_config_from_diffusers(raw: dict) -> VAEConfig:
    """Our VAEConfig from a diffusers AutoencoderKLWan config.json dict."""
    if raw.get("is_residual") or raw.get("patch_size"):
        raise ValueError("this is a Wan 2.2 VAE (residual blocks / patch_size); only the Wan 2.1 layout is supported.")
    if raw.get("decoder_base_dim") not in (None, raw.get("base_dim", 96)):
        raise ValueError("decoder_base_dim different from base_dim is not supported.")
    return VAEConfig(
        in_channels=raw.get("in_channels", 3), out_channels=raw.get("out_channels", 3),
        base_dim=raw.get("base_dim", 96), z_dim=raw.get("z_dim", 16),
        dim_mult=tuple(raw.get("dim_mult", (1, 2, 4, 4))), num_res_blocks=raw.get("num_res_blocks", 2),
        attn_scales=tuple(raw.get("attn_scales", ())),
        temporal_downsample=tuple(raw.get("temperal_downsample", (False, True, True))),
        latents_mean=tuple(raw["latents_mean"]) if raw.get("latents_mean") else None,
        latents_std=tuple(raw["latents_std"]) if raw.get("latents_std") else None)


def _read_safetensors(directory: str) -> dict[str, tuple[np.ndarray, str]]:
    """{tensor name: (array, the file it came from)} over every .safetensors file; pickles are refused."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        pickles = [f for f in os.listdir(directory) if f.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise ValueError(f"{directory} holds only pickle weights ({', '.join(pickles)}); pickle files are refused "
                             "because loading them can run arbitrary code. Convert them to .safetensors first.")
        raise FileNotFoundError(f"no .safetensors file in {directory}.")
    tensors = {}
    for name in files:
        path = os.path.join(directory, name)
        try:
            tensors.update({key: (value, name) for key, value in load_file(path).items()})
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{path} is not a valid safetensors file ({e}); re-download or re-export it.") from None
    return tensors


def _our_name(torch_name: str) -> tuple[str, str]:
    """('encoder/down_blocks/0/conv1', 'kernel') for 'encoder.down_blocks.0.conv1.weight'."""
    parts = torch_name.replace(".resample.1.", ".resample_conv.").split(".")
    leaf = {"weight": "kernel"}.get(parts[-1], parts[-1])
    return "/".join(parts[:-1]), leaf


def _to_ours(torch_name: str, value: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "gamma":
        return value.reshape(value.shape[0])
    if leaf == "kernel":  # (O, I, *k) -> (*k, I, O)
        return np.transpose(value, tuple(range(2, value.ndim)) + (1, 0))
    return value


def _flatten(tree, prefix="") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(_flatten(value, name))
        else:
            out[name] = value
    return out


def _unflatten(flat: dict, like):
    def build(node, prefix):
        return {k: build(v, f"{prefix}/{k}" if prefix else str(k)) if isinstance(v, dict) else flat[
            f"{prefix}/{k}" if prefix else str(k)] for k, v in node.items()}
    return build(like, "")


def load_diffusers_vae(path: str, dtype=jnp.float32) -> CausalVAE:
    """Reads a diffusers-format AutoencoderKLWan directory and returns our CausalVAE with its weights.

    Raises:
      ValueError: pickle-only weights, a corrupt safetensors file, or a tensor whose name or shape does
        not match the architecture in config.json (the message names the tensor and both shapes).
    """
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} does not exist: pass a diffusers-format VAE directory.")
    with open(config_path) as f:
        cfg = vae_config_from_diffusers(json.load(f))
    tensors = _read_safetensors(path)

    abstract = nnx.eval_shape(lambda: CausalVAE(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract, nnx.Param)
    wanted = _flatten(nnx.to_pure_dict(state))
    filled = {}
    for torch_name, (stored, file) in sorted(tensors.items()):  # sorted: the same tensor is reported each time
        module, leaf = _our_name(torch_name)
        ours = f"{module}/{leaf}"
        if ours not in wanted:
            raise ValueError(f"tensor {torch_name}: shape {tuple(stored.shape)} in {file} but no such tensor in the "
                             f"architecture of {config_path}; the config does not match the weights.")
        value = _to_ours(torch_name, np.asarray(stored), leaf)
        if tuple(value.shape) != tuple(wanted[ours].shape):
            # Both in our layout; the stored one also as the file has it, to find it there.
            layout = f" ({tuple(stored.shape)} as stored)" if value.shape != stored.shape else ""
            raise ValueError(f"tensor {torch_name}: shape {tuple(value.shape)}{layout} in {file} but "
                             f"{tuple(wanted[ours].shape)} from {config_path}; the config does not match the weights.")
        filled[ours] = jnp.asarray(value, dtype)
    missing = sorted(set(wanted) - set(filled))
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} tensors the config needs, e.g. {missing[0]} "
                         f"{tuple(wanted[missing[0]].shape)}; the config does not match the weights.")
    return nnx.merge(graphdef, _unflatten(filled, nnx.to_pure_dict(state)))
