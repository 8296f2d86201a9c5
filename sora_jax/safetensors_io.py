"""Tensors from local safetensors files: the one way sora_jax reads weights from disk.

Nothing is downloaded and nothing is unpickled (loading a pickle can run code), so files with a pickle
suffix are refused by name before they are opened.
"""
from __future__ import annotations

import os

import numpy as np

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def read_safetensors(path: str, field: str, needed_for: str) -> dict[str, np.ndarray]:
    """Every tensor of the local safetensors file `path`, as numpy arrays.

    Args:
      path: the file.
      field: the config field or flag that named it (every message names it, so the user knows what to fix).
      needed_for: what the file must hold and who needs it, for the message when `path` is empty.

    Raises:
      ValueError: for an empty path, a pickle-format file, a missing file or an unreadable one.
    """
    if not path:
        raise ValueError(f"{field} is empty: {needed_for}; nothing is downloaded.")
    if path.endswith(PICKLE_SUFFIXES):
        raise ValueError(f"{field}={path!r} is a pickle-format file, which sora_jax never loads (unpickling can "
                         "run code). Convert it once to safetensors (torch.load + safetensors.torch.save_file).")
    if not os.path.isfile(path):
        raise ValueError(f"{field}={path!r} does not exist; pass a local safetensors file.")
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{field}={path!r} is not a readable safetensors file ({e}).") from None
