#!/usr/bin/env bash
# N processes on this machine, one jax.distributed job (CPU collectives via gloo), e.g.
#   NPROC=2 bash launch/local_multiprocess.sh --config=configs/tiny.py:smoke --workdir=/tmp/mp
# Each process simulates DEVICES_PER_PROC CPU devices.
source "$(dirname "$0")/env.sh"
NPROC=${NPROC:-2}
DEVICES_PER_PROC=${DEVICES_PER_PROC:-4}
PORT=${PORT:-12355}
pids=()
for ((i = 0; i < NPROC; i++)); do
  JAX_PLATFORMS=cpu JAX_COORDINATOR_ADDRESS=127.0.0.1:$PORT JAX_NUM_PROCESSES=$NPROC JAX_PROCESS_ID=$i \
  XLA_FLAGS=--xla_force_host_platform_device_count=$DEVICES_PER_PROC \
    python -m sora_jax.train "$@" --config.distributed=True &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
