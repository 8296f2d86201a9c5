"""The tiny DiT trained on cached latents of the trained tiny VAE (configs/vae_tiny.py), end to end.

  bash launch/latent_quickstart.sh     # VAE training -> latent caching -> DiT training -> samples

or by hand, with AE = the VAE run's WORKDIR/autoencoder_step<N>:
  python -m sora_jax.encode --config=configs/tiny_latent.py --config.autoencoder.checkpoint=$AE \
      --out=workdirs/tiny_latent_cache --num_examples=8192 --shard_size=512
  python -m sora_jax.train --config=configs/tiny_latent.py --config.autoencoder.checkpoint=$AE \
      --config.data.latent_dir=workdirs/tiny_latent_cache --workdir=workdirs/tiny_latent

Latents are 4x8x8 compressed (1 + 4k frames; sides multiples of 8), so one latent voxel is one token.
Variants: `:smoke` is a seconds-long run for tests.
"""
from configs.common import base_config, shrink_dit_for_smoke


def get_config(arg: str | None = None):
    """arg: None for the default run, "smoke" for a few-step test configuration."""
    c = base_config()
    c.total_steps = 1000
    c.checkpoint_every_steps = 250
    c.autoencoder.update(name="vae", checkpoint="")
    c.model.patch = (1, 1, 1)
    c.data.update(source="latents", sides=(16, 24, 32, 40, 48), frames=(1, 5, 9), seq_len=256,
                  max_samples_per_row=32, packing_bins=32)
    c.flow.update(prediction="velocity", base_shift=1.0, max_shift=3.0, shift_base_tokens=64.0)
    c.sample.update(width=48, height=32, frames=9)
    if arg == "smoke":
        shrink_dit_for_smoke(c)
        c.data.update(sides=(16, 24), frames=(1, 5), seq_len=64, text_len=64, packing_bins=8, max_samples_per_row=8)
        c.sample.update(steps=2, width=24, height=16, frames=5, num_prompts=2)
    elif arg:
        raise ValueError(f"configs/tiny_latent.py: unknown variant {arg!r}; use no argument or 'smoke'.")
    return c
