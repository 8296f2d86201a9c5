"""Train entry point: python -m sora_jax.train --config=configs/tiny.py --workdir=DIR [--config.X=V ...]

Re-running with the same work dir resumes from its latest checkpoint. After training, held-out prompts
(config.sample.num_prompts of them) are sampled into WORKDIR/samples and scored by the color detector;
the summary goes to WORKDIR/results.json.
"""
from __future__ import annotations

import json
import logging
import os
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from sora_jax import sharding
from sora_jax.config_validation import ConfigError
from sora_jax.train.checkpointing import CheckpointMismatchError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file with get_config(arg).", lock_config=True)
flags.DEFINE_string("workdir", None, "Work dir: checkpoints, metrics, samples.")


def sample_heldout(config, workdir: str) -> dict:
    """Samples the first config.sample.num_prompts held-out prompts and scores their colors."""
    from data_pipelines.procedural import HELD_OUT_PROMPTS
    from sora_jax.evaluation.color import color_accuracy
    from sora_jax.sampling import Sampler, sample_to_dir

    s = config.sample
    prompts = list(HELD_OUT_PROMPTS[:s.num_prompts])
    sampler = Sampler.from_workdir(workdir, s.use_ema)
    out = os.path.join(workdir, "samples")
    videos, paths = sample_to_dir(sampler, prompts, out, s.width, s.height, s.frames, s.steps, s.guidance,
                                  config.seed, s.fps)
    return {"samples_dir": out, "sample_paths": paths, **color_accuracy(videos, prompts)}


def main(argv):
    del argv
    if FLAGS.config is None or not FLAGS.workdir:
        raise app.UsageError("--config and --workdir are required.")
    config = FLAGS.config
    sharding.maybe_initialize_distributed(config.distributed)
    from sora_jax.train.loop import train_and_evaluate
    try:
        summary = train_and_evaluate(config, FLAGS.workdir)
        if summary.get("trained") and config.sample.num_prompts > 0 and jax.process_index() == 0:
            summary.update(sample_heldout(config, FLAGS.workdir))
    except (ConfigError, CheckpointMismatchError) as e:
        sys.exit(f"error: {e}")
    if jax.process_index() == 0 and summary.get("trained"):
        with open(os.path.join(FLAGS.workdir, "results.json"), "w") as f:
            json.dump(summary, f, indent=2)
        for key in ("val_loss_initial", "val_loss_ema", "val_loss_params", "color_accuracy"):
            if key in summary:
                print(f"{key}: {summary[key]:.4f}")
        if "samples_dir" in summary:
            print(f"Samples of held-out prompts: {summary['samples_dir']}")
            print("  " + "\n  ".join(summary["sample_paths"]))
    logging.info("done: %s", {k: v for k, v in summary.items() if k not in ("color_detail", "sample_paths")})


if __name__ == "__main__":
    app.run(main)
