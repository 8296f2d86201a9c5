"""Training: state, step, loop, checkpointing. `python -m sora_jax.train` runs __main__.py."""
