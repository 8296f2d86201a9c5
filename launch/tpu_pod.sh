#!/usr/bin/env bash
# Run on every worker of a TPU pod slice (jax discovers the coordinator itself), e.g.
#   gcloud compute tpus tpu-vm ssh $TPU --zone=$ZONE --worker=all --command="cd sora_jax && \
#     bash launch/tpu_pod.sh --config=configs/tiny.py --workdir=gs://BUCKET/run1"
# The work dir must be shared by all hosts (a GCS bucket).
EXTRAS=tpu source "$(dirname "$0")/env.sh"
python -m sora_jax.train "$@" --config.distributed=True
