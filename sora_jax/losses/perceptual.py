"""LPIPS-style perceptual distance (VGG16 features, learned per-channel weights), from a local file.

The weights load from one safetensors file and never from a network or a pickle. Its tensors use the
torchvision / LPIPS names:

  features.{i}.weight (O, I, 3, 3), features.{i}.bias (O,)  for the VGG16 convolutions
      i in 0 2 | 5 7 | 10 12 14 | 17 19 21 | 24 26 28  (2x2 max-pool between the groups)
  lin{k}.model.1.weight (1, C_k, 1, 1)                      for the 5 per-stage channel weights

Convert the published LPIPS/torchvision checkpoints once, offline, with torch.load +
safetensors.torch.save_file. Channel widths are read from the file, so a narrower network with the
same names loads too (the tests use one). The distance: inputs in [-1, 1] are shifted and scaled as in
LPIPS, each stage's ReLU output is unit-normalised over channels, the squared difference is weighted
per channel, averaged over space and summed over stages.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sora_jax.safetensors_io import read_safetensors

# torchvision VGG16 `features` indices of the convolutions, grouped by stage (a max-pool follows each
# stage but the last; LPIPS taps the ReLU after each stage's last convolution).
VGG16_STAGES = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
_SHIFT = np.asarray([-0.030, -0.088, -0.188], np.float32)
_SCALE = np.asarray([0.458, 0.448, 0.450], np.float32)


def load_perceptual_weights(path: str) -> dict:
    """Reads the VGG16 + LPIPS weights from a safetensors file into {"convs": [...], "lins": [...]}.

    Raises:
      ValueError: for an empty path, a pickle file, a missing file or a missing tensor, naming the fix.
    """
    tensors = read_safetensors(path, "config.loss.perceptual_weights",
                               "config.loss.perceptual > 0 needs a local safetensors file of VGG16 + LPIPS weights "
                               "(see sora_jax/losses/perceptual.py)")

    def get(name):
        if name not in tensors:
            raise ValueError(f"{path} lacks tensor {name!r}; it must hold torchvision VGG16 `features.*` and LPIPS "
                             "`lin{k}.model.1.weight` tensors.")
        return tensors[name].astype(np.float32)

    convs = [[(get(f"features.{i}.weight").transpose(2, 3, 1, 0), get(f"features.{i}.bias")) for i in stage]
             for stage in VGG16_STAGES]
    lins = [get(f"lin{k}.model.1.weight").reshape(-1) for k in range(len(VGG16_STAGES))]
    for k, (stage, lin) in enumerate(zip(convs, lins)):
        if stage[-1][0].shape[-1] != lin.shape[0]:
            raise ValueError(f"{path}: lin{k}.model.1.weight has {lin.shape[0]} channels but stage {k} of the VGG "
                             f"outputs {stage[-1][0].shape[-1]}.")
    return {"convs": convs, "lins": lins}


def _features(weights: dict, x: jax.Array) -> list[jax.Array]:
    feats = []
    for k, stage in enumerate(weights["convs"]):
        if k > 0:
            x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        for kernel, bias in stage:
            x = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
            x = jax.nn.relu(x + bias)
        feats.append(x)
    return feats


def perceptual_distance(weights: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    """Per-frame LPIPS distance of (N, H, W, 3) images in [-1, 1]; returns (N,)."""
    shift, scale = jnp.asarray(_SHIFT), jnp.asarray(_SCALE)
    fx = _features(weights, (x.astype(jnp.float32) - shift) / scale)
    fy = _features(weights, (y.astype(jnp.float32) - shift) / scale)
    total = 0.0
    for a, b, lin in zip(fx, fy, weights["lins"]):
        a = a / (jnp.sqrt(jnp.sum(a * a, axis=-1, keepdims=True)) + 1e-10)
        b = b / (jnp.sqrt(jnp.sum(b * b, axis=-1, keepdims=True)) + 1e-10)
        total = total + jnp.mean(jnp.sum(jnp.square(a - b) * lin, axis=-1), axis=(1, 2))
    return total
