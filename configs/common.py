"""Shared pieces of experiment configs: every field a config may set exists here with its default.

ml_collections rejects overrides of fields that do not exist, so `--config.typo=1` fails loudly.
Sequence fields are tuples, not lists: ml_collections can override tuples from the command line
(`--config.data.frames="(1, 5, 9)"`) but not lists.
"""
from __future__ import annotations

import ml_collections

from data_pipelines import procedural


def base_config() -> ml_collections.ConfigDict:
    """Defaults for a text-to-video DiT trained with rectified flow on the procedural world."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 1000
    c.checkpoint_every_steps = 200
    c.keep_checkpoints = 3
    c.log_every_steps = 20
    c.eval_every_steps = 0  # 0: only at the start and the end
    c.eval_batches = 4
    c.distributed = False  # jax.distributed.initialize() for multi-host runs

    c.model = ml_collections.ConfigDict(dict(
        name="dit", hidden=128, depth=4, heads=4, mlp_ratio=4.0, patch=(1, 8, 8), dtype="float32",
        attention="xla", rope_theta=10000.0, pooled_text=True))
    # "identity" (pixel space) or "vae" with checkpoint= a directory from `python -m sora_jax.convert`.
    c.autoencoder = ml_collections.ConfigDict(dict(name="identity", checkpoint=""))
    c.text = ml_collections.ConfigDict(dict(
        tokenizer="words", vocabulary=tuple(procedural.VOCABULARY), encoder="tiny", width=128, depth=2,
        heads=4, max_len=12))

    c.data = ml_collections.ConfigDict(dict(
        source="procedural", latent_dir="", seed=0, sides=tuple(range(16, 49, 8)), frames=tuple(range(1, 13)),
        seq_len=512, text_len=128, max_samples_per_row=16, packing_bins=64, global_batch_rows=8,
        num_threads=1, prefetch=16))

    c.flow = ml_collections.ConfigDict(dict(
        logit_mean=0.0, logit_std=1.0, base_shift=1.0, shift_base_tokens=256.0, max_shift=3.0, caption_dropout=0.1,
        prediction="velocity", t_min=0.05))
    c.optim = ml_collections.ConfigDict(dict(
        lr=1e-3, warmup_steps=50, b1=0.9, b2=0.99, weight_decay=0.01, grad_clip=1.0, schedule="constant"))
    c.ema_decay = 0.999

    # Axes of size -1 take the remaining devices.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, context=1))
    # (logical axis, mesh axes) pairs; empty means sora_jax.sharding.DEFAULT_RULES. Example:
    # --config.logical_axis_rules='(("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"))'
    c.logical_axis_rules = ()

    c.sample = ml_collections.ConfigDict(dict(
        steps=30, guidance=3.0, width=48, height=32, frames=8, fps=8, use_ema=True, num_prompts=8))
    return c
