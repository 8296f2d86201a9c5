#!/usr/bin/env bash
# Quickstart (a): train the default tiny text-to-video model on the procedural world on CPU, then
# sample held-out prompts into WORKDIR/samples and print where they are. Extra args go to the trainer,
# e.g. `bash launch/quickstart.sh --config.total_steps=100`.
source "$(dirname "$0")/env.sh"
WORKDIR=${WORKDIR:-workdirs/tiny}
# One XLA:CPU device per core, so the data-parallel mesh runs each core's rows on its own thread: XLA:CPU
# spreads the tiny model's small ops over the cores poorly (one device: 5.6k tokens/s on 2 cores; two: 7.2k).
# An XLA_FLAGS already set is left as it is.
export XLA_FLAGS=${XLA_FLAGS:---xla_force_host_platform_device_count=$(nproc)}
python -m sora_jax.train --config=configs/tiny.py --workdir="$WORKDIR" "$@"
