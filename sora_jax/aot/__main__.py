"""Compile the train step for a target topology and print its per-device memory; nothing is executed.

  python -m sora_jax.aot --config=configs/dit_xl.py --topology=cpu:1 --hbm_gib=80
  python -m sora_jax.aot --config=configs/wan14b.py --topology=v5p-128 --json=aot_wan14b.json
  python -m sora_jax.aot --config=configs/tiny.py:smoke --topology=cpu:8 --config.model.remat=full

--topology: cpu:N (N simulated CPU devices), a Cloud TPU type (v5p-128 = 64 chips 4x4x4, v6e-256 = 256
chips 16x16, v5litepod-16) or a libtpu topology (v5p:4x4x4); TPU targets need `pip install -e '.[aot]'`.
GPU targets (H100 x N) cannot be compiled without a GPU attached; use cpu:N with --hbm_gib=80 instead.

Exit status: 0 when the step compiles and fits (or the device memory is unknown), 1 when it does not fit
(the report is still printed and written), 2 for an invalid config, target or insufficient sharding.
"""
from __future__ import annotations

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from sora_jax import aot
from sora_jax.config_validation import ConfigError, parse_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file with get_config(arg).", lock_config=True)
flags.DEFINE_string("topology", None, "cpu:N | v5p-128 | v6e-256 | v5litepod-16 | v5p:4x4x4 (see --helpfull). "
                    "GPU targets cannot be compiled without a GPU.")
flags.DEFINE_float("hbm_gib", None, "Per-device memory in GiB to check against; default by device kind "
                   "(H100 80, H200 141, v5p 95, v6e 32, v5e 16; unknown for CPU).")
flags.DEFINE_string("json", None, "Write the report to this JSON file.")


def _write(report: dict) -> None:
    report["config"] = config_flags.get_config_filename(FLAGS["config"])
    report["overrides"] = config_flags.get_override_values(FLAGS["config"])
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"report written to {FLAGS.json}")


def main(argv):
    del argv
    if FLAGS.config is None or not FLAGS.topology:
        raise app.UsageError("--config and --topology are required.")
    try:
        target = aot.parse_target(FLAGS.topology)
        # Before anything starts JAX's backends: cpu:N sets the device count here.
        aot.prepare_platform(target)
        report = aot.compile_train_step(FLAGS.config, target, FLAGS.hbm_gib)
    except aot.DoesNotFitError as e:
        report = {**e.report, "fits": False, "error": str(e)}
        print(aot.format_report(report))
        _write(report)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(aot.format_report(report))
    _write(report)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
