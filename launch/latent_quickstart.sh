#!/usr/bin/env bash
# The latent pipeline on CPU, end to end: train the tiny VAE (configs/vae_tiny.py), cache latents of the
# procedural world with it (python -m sora_jax.encode), train the DiT on the cache (configs/tiny_latent.py)
# and sample held-out prompts, decoded by the VAE. Each stage resumes / skips finished work when rerun.
#   VAE_STEPS=3000 DIT_STEPS=1000 NUM_EXAMPLES=8192 bash launch/latent_quickstart.sh
set -euo pipefail
source "$(dirname "$0")/env.sh"
ROOT=${ROOT:-workdirs}
VAE_STEPS=${VAE_STEPS:-3000}
DIT_STEPS=${DIT_STEPS:-1000}
NUM_EXAMPLES=${NUM_EXAMPLES:-8192}

python -m sora_jax.train --config=configs/vae_tiny.py --workdir="$ROOT/vae_tiny" --config.total_steps="$VAE_STEPS"
AE="$(cd "$ROOT/vae_tiny" && pwd)/autoencoder_step$VAE_STEPS"
CACHE="$ROOT/tiny_latent_cache_step$VAE_STEPS"
python -m sora_jax.encode --config=configs/tiny_latent.py --config.autoencoder.checkpoint="$AE" \
    --out="$CACHE" --num_examples="$NUM_EXAMPLES" --shard_size=512
python -m sora_jax.train --config=configs/tiny_latent.py --config.autoencoder.checkpoint="$AE" \
    --config.data.latent_dir="$CACHE" --workdir="$ROOT/tiny_latent" --config.total_steps="$DIT_STEPS" "$@"
