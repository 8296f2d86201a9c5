"""DiT-XL over 16-channel 4x8x8 latents, rows of 8,192 packed tokens, on one 80 GB GPU.

DiT-XL's transformer (hidden 1152, depth 28, 16 heads, MLP ratio 4) with 1x2x2 spacetime patches of
Wan-2.1-style latents (16 channels, 4x8x8 compression): one token is 4 frames x 16 x 16 pixels, so a
row of 8,192 tokens holds, e.g., a 25-frame 512x512 clip (7 x 32 x 32 = 7,168 tokens) or many images.
622M parameters (adaLN-single shares one modulation MLP where DiT has one per block; cross-attention
and a 4-layer text encoder add). bfloat16 compute, float32 parameters and optimizer state (9.3 GiB with
the EMA), attention "auto" (cuDNN on GPU, splash on TPU, blockwise on CPU).

Memory of the train step at 2 x 8,192 tokens (benchmarks/dit_memory.py; compiled, not run), per device:
  remat       scan   XLA:CPU total   one v5p chip (libtpu)
  none        on     139.7 GiB       refused: 97.8 GiB of temporaries > 95.7 GiB HBM
  full        on      19.3 GiB        22.7 GiB
  save_dots   on      40.7 GiB        34.6 GiB
  any         off    ~120 GiB        (XLA:CPU's unrolled schedule undoes remat; TPU's does not)
"save_dots" keeps the matmul outputs, so the backward recomputes only the cheap elementwise work and
attention; it fits 80 GB with room, so it is the default, with scan over layers (which also compiles
the 28 blocks once: 13 s instead of 75 s on a CPU). "full" is the fallback for longer rows.

Check memory and sharding without a GPU (compiles the train step for 1 simulated device; nothing runs):
  python -m sora_jax.aot --config=configs/dit_xl.py --topology=cpu:1 --hbm_gib=80
  python benchmarks/dit_memory.py                 # remat none / full / save_dots side by side

Train on one H100 (`pip install -e '.[gpu]'`), on cached latents of the Wan 2.1 VAE:
  python -m sora_jax.convert --kind=wan_vae --src=Wan2.1-T2V-14B-Diffusers/vae --dst=workdirs/wan_vae
  python -m sora_jax.encode --config=configs/dit_xl.py --config.autoencoder.name=vae \
      --config.autoencoder.checkpoint=workdirs/wan_vae --out=workdirs/dit_xl_latents --num_examples=100000
  python -m sora_jax.train --config=configs/dit_xl.py --config.autoencoder.name=vae \
      --config.autoencoder.checkpoint=workdirs/wan_vae --config.data.latent_dir=workdirs/dit_xl_latents \
      --workdir=workdirs/dit_xl
On N GPUs add --config.data.global_batch_rows=2N (parameters and optimizer state shard over fsdp).

The default autoencoder, "latent", is the latent space by shape only (no weights): enough to build,
shard and compile the model; encoding, evaluation and sampling need the "vae" override above.
Variants: `:smoke` is the same layout shrunk for CPU compile tests (tests/test_aot.py); like the
default it has no VAE weights, so it compiles but does not train.
"""
from configs.common import base_config, shrink_dit_for_smoke


def get_config(arg: str | None = None):
    """arg: None for the one-GPU run, "smoke" for the shrunk CPU compile-test configuration."""
    c = base_config()
    c.total_steps = 400_000
    c.checkpoint_every_steps = 5_000
    c.log_every_steps = 100
    c.eval_every_steps = 10_000
    c.eval_batches = 8
    c.model.update(hidden=1152, depth=28, heads=16, mlp_ratio=4.0, patch=(1, 2, 2), dtype="bfloat16",
                   param_dtype="float32", attention="auto", attention_block=512, remat="save_dots",
                   scan_layers=True)
    c.autoencoder.update(name="latent", checkpoint="", channels=16, stride=(4, 8, 8))
    c.text.update(width=512, depth=4, heads=8, max_len=32)
    # Token grids: sides multiple of 16 (stride 8 x patch 2), 1 + 4k frames; the largest is 7,168 tokens.
    c.data.update(source="latents", sides=(128, 192, 256, 320, 384, 512), frames=(1, 5, 9, 13, 17, 21, 25),
                  seq_len=8192, text_len=512, max_samples_per_row=16, packing_bins=64, global_batch_rows=2,
                  num_threads=8, prefetch=4)
    # One device: nothing to shard. On N devices the -1 axis becomes fsdp, so the state splits N ways.
    c.mesh.update(data=1, fsdp=-1)
    c.optim.update(lr=1e-4, warmup_steps=2_000, schedule="cosine", weight_decay=0.0, b2=0.999, grad_clip=1.0)
    c.ema_decay = 0.9999
    # Larger token counts get more high-noise training (resolution-dependent shift).
    c.flow.update(shift_base_tokens=1024.0, max_shift=4.0)
    c.sample.update(steps=50, guidance=5.0, width=256, height=256, frames=17, fps=16)
    if arg == "smoke":
        shrink_dit_for_smoke(c)
        # In a model this narrow the replicated biases and norm scales are a sizeable share of the bytes.
        c.param_sharding_tolerance = 0.25
        c.model.update(attention_block=128, scan_layers=True)
        c.text.update(max_len=12)
        c.data.update(source="procedural", sides=(16, 32), frames=(1, 5), seq_len=128, text_len=128,
                      max_samples_per_row=8, packing_bins=8, global_batch_rows=8, num_threads=1)
        c.sample.update(steps=2, width=32, height=32, frames=5, num_prompts=2)
    elif arg:
        raise ValueError(f"configs/dit_xl.py: unknown variant {arg!r}; use no argument or 'smoke'.")
    return c
