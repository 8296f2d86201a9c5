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

from sora_jax import console

console.quiet_native_logs()  # before JAX / TensorFlow load

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from data_pipelines.sources import NoReadableExamples  # noqa: E402
from sora_jax import sharding  # noqa: E402
from sora_jax.config_validation import ConfigError, parse_flags  # noqa: E402
from sora_jax.train.checkpointing import CheckpointMismatchError, CheckpointWriteError  # noqa: E402
from sora_jax.train.workdir_lock import WorkdirLocked  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file with get_config(arg).", lock_config=True)
flags.DEFINE_string("workdir", None, "Work dir: checkpoints, metrics, samples; its train.log gets the full log.")
console.define_verbose_flag()

# Errors whose messages are written for the user: printed as they are. Anything else is one paragraph too,
# with its traceback in the log file (console.reported_errors).
EXPECTED_ERRORS = (ConfigError, CheckpointMismatchError, CheckpointWriteError, NoReadableExamples, WorkdirLocked,
                   FloatingPointError)


def log_path(workdir: str, process_index: int = 0) -> str:
    """WORKDIR/train.log for process 0; train.process_<i>.log for the others (one writer per file)."""
    return os.path.join(workdir, "train.log" if process_index == 0 else f"train.process_{process_index}.log")


def main(argv):
    del argv
    if FLAGS.config is None or not FLAGS.workdir:
        raise app.UsageError("--config and --workdir are required.")
    config = FLAGS.config
    # Deferred: the trainer commits the log once the config is accepted (a rejected one writes nothing).
    console.setup_logging(log_path(FLAGS.workdir), FLAGS.verbose, deferred=True)
    with console.reported_errors(EXPECTED_ERRORS):
        sharding.maybe_initialize_distributed(config.distributed)
        if jax.process_index() > 0:
            console.setup_logging(log_path(FLAGS.workdir, jax.process_index()), FLAGS.verbose)
        else:
            print(f"Log: {console.log_file()}" + ("" if FLAGS.verbose else " (--verbose prints it here too)"),
                  flush=True)
        _train(config)


def _done(summary: dict) -> bool:
    """Whether this run trained or finished training (a rerun of a finished work dir does neither)."""
    return bool(summary.get("trained") or summary.get("finish"))


def _train(config) -> None:
    """Trains, runs the task's after-training part, writes results.json and prints the summary."""
    from sora_jax.tasks import build_task
    from sora_jax.train.loop import pending_marker, train_and_evaluate
    task = build_task(config)  # once per run: the trainer and the after-training part share it

    def finish(summary: dict) -> dict:  # under the work dir's lock (train_and_evaluate's `then`)
        if _done(summary) and jax.process_index() == 0:
            # If this part is interrupted (e.g. preempted while sampling), a rerun does it again.
            open(pending_marker(FLAGS.workdir), "w").close()
            summary.update(task.after_training(FLAGS.workdir))
            with open(os.path.join(FLAGS.workdir, "results.json"), "w") as f:
                json.dump(summary, f, indent=2)
            os.remove(pending_marker(FLAGS.workdir))
        return summary

    summary = train_and_evaluate(config, FLAGS.workdir, task, then=finish)
    if jax.process_index() == 0 and _done(summary):
        for key in ("val_loss_initial", "val_loss_ema", "val_loss_params", "color_accuracy", "shape_accuracy",
                    "direction_accuracy", "whole_object_share", "val_psnr_ema",
                    "val_ssim_ema", "val_psnr_image_ema", "val_ssim_image_ema"):
            if summary.get(key) is not None:
                print(f"{key}: {summary[key]:.4f}")
        if "autoencoder_dir" in summary:
            print(f"Autoencoder for latent configs (config.autoencoder.checkpoint): {summary['autoencoder_dir']}")
        if "samples_dir" in summary:
            print(f"Samples of held-out prompts: {summary['samples_dir']}")
            print("  " + "\n  ".join(summary["sample_paths"]))
    logging.info("done: %s", {k: v for k, v in summary.items() if not k.endswith("_detail") and k != "sample_paths"})


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
