"""Train entry point: python -m sora_jax.train --config=configs/tiny.py --workdir=DIR [--config.X=V ...]

Re-running with the same work dir resumes from its latest checkpoint. After training, held-out prompts
(config.sample.num_prompts of them) are sampled into WORKDIR/samples and scored by the color detector;
the summary goes to WORKDIR/results.json. What happens after training is the task's (config.task):
the DiT samples held-out prompts, the VAE exports an autoencoder directory and reconstructions.
"""
from __future__ import annotations

import json
import logging
import os
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from data_pipelines.sources import NoReadableExamples
from sora_jax import sharding
from sora_jax.config_validation import ConfigError
from sora_jax.train.checkpointing import CheckpointMismatchError
from sora_jax.train.workdir_lock import WorkdirLocked

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file with get_config(arg).", lock_config=True)
flags.DEFINE_string("workdir", None, "Work dir: checkpoints, metrics, samples.")


def main(argv):
    del argv
    if FLAGS.config is None or not FLAGS.workdir:
        raise app.UsageError("--config and --workdir are required.")
    config = FLAGS.config
    sharding.maybe_initialize_distributed(config.distributed)
    from sora_jax.train.loop import pending_marker, train_and_evaluate
    try:
        summary = train_and_evaluate(config, FLAGS.workdir)
        done = summary.get("trained") or summary.get("finish")
        if done and jax.process_index() == 0:
            from sora_jax.tasks import build_task
            # If this part is interrupted (e.g. preempted while sampling), a rerun does it again.
            open(pending_marker(FLAGS.workdir), "w").close()
            summary.update(build_task(config).after_training(FLAGS.workdir))
    except (ConfigError, CheckpointMismatchError, NoReadableExamples, WorkdirLocked) as e:
        sys.exit(f"error: {e}")
    if jax.process_index() == 0 and done:
        with open(os.path.join(FLAGS.workdir, "results.json"), "w") as f:
            json.dump(summary, f, indent=2)
        os.remove(pending_marker(FLAGS.workdir))
        for key in ("val_loss_initial", "val_loss_ema", "val_loss_params", "color_accuracy", "val_psnr_ema",
                    "val_ssim_ema", "val_psnr_image_ema", "val_ssim_image_ema"):
            if summary.get(key) is not None:
                print(f"{key}: {summary[key]:.4f}")
        if "autoencoder_dir" in summary:
            print(f"Autoencoder for latent configs (config.autoencoder.checkpoint): {summary['autoencoder_dir']}")
        if "samples_dir" in summary:
            print(f"Samples of held-out prompts: {summary['samples_dir']}")
            print("  " + "\n  ".join(summary["sample_paths"]))
    logging.info("done: %s", {k: v for k, v in summary.items() if k not in ("color_detail", "sample_paths")})


if __name__ == "__main__":
    app.run(main)
