"""Convert pretrained weights to our format.

  python -m sora_jax.convert --kind=wan_vae --src=DIFFUSERS_VAE_DIR --dst=OUT_DIR

Reads a diffusers-format directory (config.json + *.safetensors; pickle files are refused) and writes an
orbax checkpoint plus vae_config.json into OUT_DIR, which a config names as
`config.autoencoder.checkpoint`. OUT_DIR must not exist yet.
"""
from __future__ import annotations

import sys

from absl import app, flags

from sora_jax.convert.diffusers_vae import load_diffusers_vae
from sora_jax.convert.vae_checkpoint import save_vae

CONVERTERS = {"wan_vae": (load_diffusers_vae, save_vae)}

FLAGS = flags.FLAGS
flags.DEFINE_enum("kind", "wan_vae", list(CONVERTERS), "What to convert.")
flags.DEFINE_string("src", None, "Source directory (diffusers format).")
flags.DEFINE_string("dst", None, "Destination directory (must not exist or be empty).")


def main(argv):
    del argv
    if not FLAGS.src or not FLAGS.dst:
        raise app.UsageError("--src and --dst are required.")
    load, save = CONVERTERS[FLAGS.kind]
    try:
        save(load(FLAGS.src), FLAGS.dst)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f"error: {e}")
    print(f"Wrote {FLAGS.dst}")


if __name__ == "__main__":
    app.run(main)
