"""Sampling CLI; see sora_jax/generation.py for the library.

  python -m sora_jax.sample --workdir=DIR --prompt="..." [--prompt=...] --width=W --height=H --frames=N \
      --out=DIR [--steps=S --guidance=G --seed=K]
"""
from __future__ import annotations

import math
import os

from absl import app, flags

from sora_jax import console
from sora_jax.config_validation import ConfigError
from sora_jax.generation import Sampler, check_request, sample_to_dir
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
console.define_verbose_flag()


def main(argv):
    del argv
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required.")
    # WORKDIR/sample.log (a temp file if the work dir is read-only or missing): orbax's restore chatter and
    # tracebacks. Sampling imports no TensorFlow, so console.quiet_native_logs() has nothing to do here.
    console.setup_logging(os.path.join(FLAGS.workdir, "sample.log"), FLAGS.verbose, create_dir=False)
    with console.reported_errors((ConfigError, FileNotFoundError)):
        _sample()


def _sample() -> None:
    """Checks the request against the run's config, then generates and writes the media."""
    config = checkpointing.read_config(FLAGS.workdir)
    s = config.sample

    def given(name, default):  # an explicit 0 is a request to check, not "use the default"
        value = getattr(FLAGS, name)
        return default if value is None else value
    width, height, frames = given("width", s.width), given("height", s.height), given("frames", s.frames)
    steps, guidance, fps = given("steps", s.steps), given("guidance", s.guidance), given("fps", s.fps)
    if not math.isfinite(guidance) or guidance < 0:
        raise ConfigError(f"--guidance={guidance} must be a finite number >= 0 (1 = no guidance).")
    if fps <= 0:
        raise ConfigError(f"--fps={fps} must be a positive frame rate.")
    out = FLAGS.out or os.path.join(FLAGS.workdir, "samples")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out={out} is an existing file; give a directory (it is created if missing).")
    check_request(config, FLAGS.prompt, width, height, frames, steps)
    sampler = Sampler.from_workdir(FLAGS.workdir, FLAGS.use_ema)
    _, paths = sample_to_dir(sampler, FLAGS.prompt, out, width, height, frames, steps, guidance, FLAGS.seed, fps)
    print("Wrote:\n  " + "\n  ".join(paths))


if __name__ == "__main__":
    app.run(main)
