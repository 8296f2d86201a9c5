"""The tiny 3D causal VAE, trained on the procedural world on a CPU (4x8x8 compression, 8 latent channels).

Run (trains, exports WORKDIR/autoencoder_step<N> for latent configs, writes held-out reconstructions):
  python -m sora_jax.train --config=configs/vae_tiny.py --workdir=workdirs/vae_tiny

Variants: `--config=configs/vae_tiny.py:smoke` is a seconds-long run for tests.
"""
from configs.common import vae_base_config


def get_config(arg: str | None = None):
    """arg: None for the default run, "smoke" for a few-step test configuration."""
    c = vae_base_config()
    c.total_steps = 3000
    c.checkpoint_every_steps = 500
    c.log_every_steps = 100
    c.eval_batches = 4
    c.vae.update(base_dim=8, z_dim=8, dim_mult=(1, 2, 4, 4), num_res_blocks=1)
    # Small clips of small renders: the VAE is convolutional, so it trains on 16x24 crops and runs at any
    # size; objects keep the proportions they have in the DiT's 16-48 px videos. Smaller clips buy ~3x
    # more steps per minute than 32x48x9 on a CPU, and steps are what a from-scratch VAE needs most.
    c.data.update(sides=(24, 32), clip_frames=5, clip_height=16, clip_width=24, video_batch=8, image_batch=8)
    # L1 alone sat on the "median background" plateau for 500+ steps; L2 gives object pixels (large
    # errors) the larger gradient. Constant rate, so a run can be extended by resuming.
    c.loss.update(l1=1.0, l2=1.0)
    c.optim.update(lr=2e-3, warmup_steps=50, schedule="constant", weight_decay=0.0)
    if arg == "smoke":
        c.total_steps = 3
        c.checkpoint_every_steps = 2
        c.log_every_steps = 1
        c.eval_batches = 1
        c.export_stats_batches = 1
        c.vae.update(base_dim=4, z_dim=4, dim_mult=(1, 2, 2, 2))
        c.data.update(sides=(16, 24), clip_frames=5, clip_height=16, clip_width=16, video_batch=4, image_batch=4,
                      num_threads=1, prefetch=1)
    elif arg:
        raise ValueError(f"configs/vae_tiny.py: unknown variant {arg!r}; use no argument or 'smoke'.")
    return c
