"""Frame and clip features for Fréchet distances, from a VGG16-layout network read from safetensors.

NOT Inception, NOT I3D. Published FID uses Inception-v3 pool features and published FVD uses an I3D
network trained on Kinetics; this module uses the VGG16 layout of sora_jax/losses/perceptual.py with
whatever weights config.eval.feature_weights names (torchvision's ImageNet VGG16, converted once to
safetensors, is the natural choice). The numbers it yields therefore rank checkpoints of one run, or
runs evaluated with the same weights file, against each other; they are NOT comparable with FID/FVD
values in papers, and must not be reported as such.

  frame features  the last stage's ReLU output, global-average-pooled: [C]
  clip features   [mean over time of the frame features, mean over time of |f_{t+1} - f_t|]: [2C].
                  The second half measures how much the content changes between frames (motion
                  energy per channel); pooled features cannot see *where* things move, so a clip
                  moving left and its mirror image moving right get the same clip feature.

The weights file holds torchvision's names: features.{i}.weight (O, I, 3, 3) and features.{i}.bias (O,)
for i in 0 2 5 7 10 12 14 17 19 21 24 26 28; extra tensors (an LPIPS file's lin*) are ignored and widths
are read from the file. Pickle files are refused. Frames are resized to `size` x `size` (bilinear) and
normalised with the ImageNet mean and standard deviation, as torchvision's VGG16 expects.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# The convolution stack itself is perceptual.py's: one VGG16 implementation in the code base.
from sora_jax.losses.perceptual import VGG16_STAGES, _features as vgg16_stages
from sora_jax.safetensors_io import read_safetensors

_IMAGENET_MEAN = np.asarray([0.485, 0.456, 0.406], np.float32)
_IMAGENET_STD = np.asarray([0.229, 0.224, 0.225], np.float32)


def load_feature_weights(path: str, field: str = "config.eval.feature_weights") -> dict:
    """Reads VGG16 convolution weights from a local safetensors file into perceptual.py's layout.

    Raises:
      ValueError: naming `field` for an empty path, a pickle file, a missing or unreadable file, or a
        missing tensor.
    """
    tensors = read_safetensors(
        path, field, "the fid/fvd evaluators need a local safetensors file of VGG16 weights (torchvision names "
        "features.{i}.weight/bias; see sora_jax/evaluation/features.py). Set it, or drop fid/fvd from "
        "config.eval.evaluators")
    convs = []
    for stage in VGG16_STAGES:
        layers = []
        for i in stage:
            names = (f"features.{i}.weight", f"features.{i}.bias")
            missing = [n for n in names if n not in tensors]
            if missing:
                raise ValueError(f"{field}={path!r} lacks tensor {missing[0]!r}; it must hold torchvision VGG16 "
                                 "`features.*` convolution weights.")
            w, b = (tensors[n].astype(np.float32) for n in names)
            layers.append((w.transpose(2, 3, 1, 0), b))  # (O, I, kh, kw) -> HWIO
        convs.append(layers)
    return {"convs": convs}


def feature_width(weights: dict) -> int:
    """Channels of the frame features (the last convolution's outputs)."""
    return int(weights["convs"][-1][-1][0].shape[-1])


def _frame_features(weights: dict, frames: jax.Array, size: int) -> jax.Array:
    """uint8 frames [N, H, W, 3] -> pooled last-stage features [N, C]."""
    x = frames.astype(jnp.float32) / 255.0
    if size:
        x = jax.image.resize(x, (x.shape[0], size, size, 3), "bilinear", antialias=True)
    x = (x - _IMAGENET_MEAN) / _IMAGENET_STD
    return vgg16_stages(weights, x)[-1].mean(axis=(1, 2))


class FeatureExtractor:
    """Frame and clip features of uint8 videos, jitted once per input shape.

    Args:
      weights: from load_feature_weights.
      size: frames are resized to size x size first (the network pools by 16, so at least 16).
    """

    def __init__(self, weights: dict, size: int):
        if size and size < 16:
            raise ValueError(f"config.eval.feature_size={size} is below 16, the VGG's total pooling.")
        self.weights, self.size = weights, size
        self._fn = jax.jit(lambda w, f: _frame_features(w, f, size))

    def frames(self, videos: np.ndarray) -> np.ndarray:
        """Per-frame features [B, T, C] of uint8 videos [B, T, H, W, 3]."""
        videos = np.asarray(videos)
        b, t = videos.shape[:2]
        if not self.size and min(videos.shape[2:4]) < 16:
            raise ValueError(f"frames of {videos.shape[2]}x{videos.shape[3]} px are too small for the VGG "
                             "(it pools by 16); set config.eval.feature_size.")
        feats = self._fn(self.weights, jnp.asarray(videos.reshape(b * t, *videos.shape[2:])))
        return np.asarray(feats, np.float64).reshape(b, t, -1)

    def clips(self, videos: np.ndarray) -> np.ndarray:
        """Clip features [B, 2C]: frame-feature mean and mean absolute frame-to-frame change."""
        f = self.frames(videos)
        if f.shape[1] < 2:
            raise ValueError("clip features need videos of at least 2 frames (temporal differences).")
        return np.concatenate([f.mean(axis=1), np.abs(np.diff(f, axis=1)).mean(axis=1)], axis=1)
