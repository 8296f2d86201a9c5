"""The tiny 3D causal VAE, trained on the procedural world on a CPU (4x8x8 compression, 8 latent channels).

Run (trains, exports WORKDIR/autoencoder_step<N> for latent configs, writes held-out reconstructions):
  python -m sora_jax.train --config=configs/vae_tiny.py --workdir=workdirs/vae_tiny

Variants: `--config=configs/vae_tiny.py:smoke` is a seconds-long run for tests.
"""
from configs.common import vae_base_config


def get_config(arg: str | None = None):
    """arg: None for the default run, "smoke" for a few-step test configuration."""
    c = vae_base_config()
    c.total_steps = 1500
    c.checkpoint_every_steps = 500
    c.log_every_steps = 50
    c.eval_batches = 2
    c.vae.update(base_dim=8, z_dim=8, dim_mult=(1, 2, 4, 4), num_res_blocks=1)
    c.data.update(video_batch=4, image_batch=4)
    # A high peak rate: autoencoders sit on a "mean background" plateau first; 3e-3 leaves it ~2x sooner
    # than 1e-3 (single-batch overfit, 2026-11-22).
    c.optim.update(lr=3e-3, warmup_steps=50, schedule="cosine", weight_decay=0.0)
    if arg == "smoke":
        c.total_steps = 3
        c.checkpoint_every_steps = 2
        c.log_every_steps = 1
        c.eval_batches = 1
        c.export_stats_batches = 1
        c.vae.update(base_dim=4, z_dim=4, dim_mult=(1, 2, 2, 2))
        c.data.update(sides=(16, 24), clip_frames=5, clip_height=16, clip_width=16, video_batch=4, image_batch=4,
                      num_threads=1, prefetch=1)
        c.mesh.update(data=2, fsdp=2, tensor=2)
    elif arg:
        raise ValueError(f"configs/vae_tiny.py: unknown variant {arg!r}; use no argument or 'smoke'.")
    return c
