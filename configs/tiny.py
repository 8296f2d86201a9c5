"""The default tiny text-to-video model: pixel-space DiT on the procedural world, sized for a CPU.

Run (trains, then samples held-out prompts into WORKDIR/samples):
  python -m sora_jax.train --config=configs/tiny.py --workdir=workdirs/tiny

Variants: `--config=configs/tiny.py:smoke` is a seconds-long run for tests.
"""
from configs.common import base_config, shrink_dit_for_smoke


def get_config(arg: str | None = None):
    """arg: None for the default run, "smoke" for a few-step test configuration."""
    c = base_config()
    c.total_steps = 500
    c.checkpoint_every_steps = 100
    # Pixel patches (8*8*3 = 192 features) are wider than the model (128): predict x0, match velocity.
    c.flow.prediction = "x0"
    # ...and spend more training time at high noise, where pixel-space layout is decided.
    c.flow.update(base_shift=4.0, max_shift=8.0)
    if arg == "smoke":
        shrink_dit_for_smoke(c)
        c.data.update(sides=(16, 24, 32), frames=(1, 2, 3, 4), seq_len=128, text_len=64, packing_bins=8,
                      max_samples_per_row=8, global_batch_rows=8)
        c.sample.update(steps=2, width=16, height=16, frames=2, num_prompts=2)
    elif arg:
        raise ValueError(f"configs/tiny.py: unknown variant {arg!r}; use no argument or 'smoke'.")
    return c
