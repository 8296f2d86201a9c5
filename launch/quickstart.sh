#!/usr/bin/env bash
# Quickstart (a): train the default tiny text-to-video model on the procedural world on CPU, then
# sample held-out prompts into WORKDIR/samples and print where they are. Extra args go to the trainer,
# e.g. `bash launch/quickstart.sh --config.total_steps=100`.
source "$(dirname "$0")/env.sh"
WORKDIR=${WORKDIR:-workdirs/tiny}
python -m sora_jax.train --config=configs/tiny.py --workdir="$WORKDIR" "$@"
