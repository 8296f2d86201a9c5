"""Sampling CLI; see sora_jax/sampling.py for the library.

  python -m sora_jax.sample --workdir=DIR --prompt="..." [--prompt=...] --width=W --height=H --frames=N \
      --out=DIR [--steps=S --guidance=G --seed=K]
"""
from __future__ import annotations

import os
import sys

from absl import app, flags

from sora_jax.config_validation import ConfigError
from sora_jax.sampling import Sampler, check_request, sample_to_dir
from sora_jax.train import checkpointing

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training work dir (holds config.json and checkpoints).")
flags.DEFINE_multi_string("prompt", [], "Prompt; repeat for several.")
flags.DEFINE_integer("width", None, "Width in pixels (default: config.sample.width).")
flags.DEFINE_integer("height", None, "Height in pixels (default: config.sample.height).")
flags.DEFINE_integer("frames", None, "Frame count; 1 gives an image (default: config.sample.frames).")
flags.DEFINE_string("out", None, "Output directory (default: WORKDIR/samples).")
flags.DEFINE_integer("steps", None, "Euler steps (default: config.sample.steps).")
flags.DEFINE_float("guidance", None, "Classifier-free guidance scale (default: config.sample.guidance).")
flags.DEFINE_integer("seed", 0, "Noise seed.")
flags.DEFINE_integer("fps", None, "Frames per second of the written MP4/GIF.")
flags.DEFINE_bool("use_ema", True, "Sample with the EMA parameters.")


def main(argv):
    del argv
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required.")
    try:
        config = checkpointing.read_config(FLAGS.workdir)
        s = config.sample
        width, height = FLAGS.width or s.width, FLAGS.height or s.height
        frames = FLAGS.frames if FLAGS.frames is not None else s.frames
        steps = FLAGS.steps if FLAGS.steps is not None else s.steps
        guidance = FLAGS.guidance if FLAGS.guidance is not None else s.guidance
        check_request(config, FLAGS.prompt, width, height, frames, steps)
        sampler = Sampler.from_workdir(FLAGS.workdir, FLAGS.use_ema)
    except (ConfigError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    out = FLAGS.out or os.path.join(FLAGS.workdir, "samples")
    _, paths = sample_to_dir(sampler, FLAGS.prompt, out, width, height, frames, steps, guidance, FLAGS.seed,
                             FLAGS.fps or s.fps)
    print("Wrote:\n  " + "\n  ".join(paths))


if __name__ == "__main__":
    app.run(main)
