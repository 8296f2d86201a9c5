"""Tiled vs whole-frame VAE on a *trained* VAE: how far spatial tiling moves latents and reconstructions.

  python benchmarks/vae_tiling.py --vae=workdirs/vae_tiny/autoencoder_step3000 [--size=128x192 --frames=9]

Renders held-out procedural videos larger than the training crops, encodes and decodes them whole and
in overlapping tiles, and reports the latents' mean relative difference and the PSNR of tiled against
whole reconstructions (and of each against the input). Writes benchmarks/results/vae_tiling.json.
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

flags.DEFINE_string("vae", None, "Autoencoder directory (vae_config.json + params).")
flags.DEFINE_string("size", "128x192", "HxW of the test videos.")
flags.DEFINE_integer("frames", 9, "Frames per video (1 + 4k).")
flags.DEFINE_integer("videos", 4, "Number of held-out videos.")
flags.DEFINE_string("tiles", "64:48,96:64", "Comma-separated tile:stride pairs in pixels.")
flags.DEFINE_string("out", "benchmarks/results", "Where vae_tiling.json goes.")
FLAGS = flags.FLAGS


def measure(vae, videos: np.ndarray, tiles) -> dict:
    """Whole vs tiled latents and reconstructions for a batch of videos in [-1, 1]."""
    import jax.numpy as jnp

    from sora_jax.evaluation.reconstruction import psnr
    from sora_jax.models.vae_tiling import decode_tiled, encode_tiled
    x = jnp.asarray(videos)
    z_whole = np.asarray(vae.encode(x))
    rec_whole = np.asarray(vae.decode(jnp.asarray(z_whole)))
    out = {"psnr_whole_vs_input": float(np.mean(psnr(rec_whole, x)))}
    for tile, stride in tiles:
        z_tiled = encode_tiled(vae, videos, tile=tile, stride=stride)
        rec_tiled = decode_tiled(vae, z_tiled, tile=tile, stride=stride)
        out[f"tile{tile}_stride{stride}"] = {
            "latent_mean_rel_diff": float(np.mean(np.abs(z_tiled - z_whole)) / np.mean(np.abs(z_whole))),
            "psnr_tiled_vs_whole": float(np.mean(psnr(rec_tiled, rec_whole))),
            "psnr_tiled_vs_input": float(np.mean(psnr(rec_tiled, x))),
        }
    return out


def main(argv):
    del argv
    from data_pipelines.procedural import ProceduralWorld
    from sora_jax.convert.vae_checkpoint import load_vae
    h, w = (int(v) for v in FLAGS.size.split("x"))
    world = ProceduralWorld(seed=1, sides=[max(h, w)], frames=[FLAGS.frames], split="heldout")
    videos = np.stack([world[i]["video"][:, :h, :w] for i in range(FLAGS.videos)])
    tiles = [tuple(int(v) for v in pair.split(":")) for pair in FLAGS.tiles.split(",")]
    vae = load_vae(FLAGS.vae)
    result = {"date": time.strftime("%Y-%m-%d"), "vae": os.path.abspath(FLAGS.vae), "size": [h, w],
              "frames": FLAGS.frames, **measure(vae, videos, tiles)}
    print(json.dumps(result, indent=2))
    os.makedirs(FLAGS.out, exist_ok=True)
    with open(os.path.join(FLAGS.out, "vae_tiling.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)
