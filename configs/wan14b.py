"""A Wan 2.1 14B-sized DiT (hidden 5120, depth 40, 40 heads, FFN 13824) for a v5p-128 pod slice.

Wan 2.1 T2V-14B's transformer sizes -- hidden 5120, 40 layers, 40 heads of 128, FFN 13,824 (mlp_ratio
2.7), 1x2x2 patches of 16-channel 4x8x8 latents, 4096-wide text features -- in our DiT (adaLN-single,
packed rows, 3D RoPE). A row is 32,768 tokens: one 81-frame 480x832 clip (21 x 30 x 52 = 32,760
tokens), or many smaller samples packed together. The text side is today's small trainable encoder,
kept at umT5-XXL's width (4096) so text_proj has Wan's shape; a pretrained umT5 would replace it.

Parallelism: v5p-128 is 64 chips (v5p-N counts TensorCores, 2 per chip; JAX sees one device per
chip). Each row's 32,768 tokens split over context = 2 chips, and parameters, optimizer state and EMA
over fsdp = the other 32 (ZeRO-3): 32 rows, about a million tokens a step. remat "full" with scan over
layers keeps one block's activations live at a time. AOT-checked on this CPU (libtpu 0.0.42.1, compile
about 80 s), per chip: 14.74B parameters (+0.4% replicated), state 6.0 GiB, temporaries 46.3 GiB,
total 52.5 GiB of 95 (55%). With context = 1 (64 rows of 32,768 tokens, fsdp 64) it is 93.3 GiB (98%):
too close to the limit to run. v6e-256 (32 GiB chips) needs context = 8: 22.5 GiB, 70%.

Check that it compiles and fits from any machine (`pip install -e '.[aot]'`; a CPU is enough):
  python -m sora_jax.aot --config=configs/wan14b.py --topology=v5p-128 --json=aot_wan14b.json
  python -m sora_jax.aot --config=configs/wan14b.py --topology=v6e-256 --config.mesh.context=8

Train, on every worker of the slice (latents cached as in configs/dit_xl.py, on a shared bucket):
  gcloud compute tpus tpu-vm ssh $TPU --zone=$ZONE --worker=all --command="cd sora_jax && \
    bash launch/tpu_pod.sh --config=configs/wan14b.py --config.autoencoder.name=vae \
      --config.autoencoder.checkpoint=gs://BUCKET/wan_vae --config.data.latent_dir=gs://BUCKET/latents \
      --workdir=gs://BUCKET/wan14b"

Variants: `:smoke` shrinks the model and rows for CPU compile tests, keeping the fsdp x context mesh.
"""
from configs.common import base_config, shrink_dit_for_smoke


def get_config(arg: str | None = None):
    """arg: None for the v5p-128 run, "smoke" for a CPU compile-test configuration."""
    c = base_config()
    c.total_steps = 200_000
    c.checkpoint_every_steps = 1_000
    c.log_every_steps = 50
    c.eval_every_steps = 5_000
    c.eval_batches = 4
    c.model.update(hidden=5120, depth=40, heads=40, mlp_ratio=2.7, patch=(1, 2, 2), dtype="bfloat16",
                   param_dtype="float32", attention="auto", attention_block=512, remat="full",
                   scan_layers=True)
    c.autoencoder.update(name="latent", checkpoint="", channels=16, stride=(4, 8, 8))
    c.text.update(width=4096, depth=2, heads=32, max_len=256)
    # Validation sizes the rows from these square sides: the largest, 640 px x 65 frames, is 17 x 40 x 40 =
    # 27,200 tokens (81 frames at 640 px would be 33,600 > 32,768). Real latent shards may hold any shape.
    c.data.update(source="latents", sides=(256, 384, 512, 640), frames=(1, 17, 33, 49, 65), seq_len=32768,
                  text_len=1024, max_samples_per_row=16, packing_bins=64, global_batch_rows=32,
                  num_threads=16, prefetch=4)
    # Each row's tokens split over context=2 chips (16,384 a chip); parameters over the other 32 (fsdp).
    c.mesh.update(data=1, fsdp=-1, tensor=1, context=2)
    # Adam's first moment in bfloat16 saves 2 bytes per parameter (28 GB over the slice).
    c.optim.update(lr=1e-4, warmup_steps=2_000, schedule="cosine", weight_decay=0.0, b2=0.999, grad_clip=1.0,
                   mu_dtype="bfloat16")
    c.ema_decay = 0.9999
    c.flow.update(shift_base_tokens=4096.0, base_shift=1.0, max_shift=5.0)
    c.sample.update(steps=50, guidance=5.0, width=512, height=512, frames=33, fps=16)
    if arg == "smoke":
        shrink_dit_for_smoke(c)
        # In a model this narrow the replicated biases and norm scales are a sizeable share of the bytes.
        c.param_sharding_tolerance = 0.25
        c.model.update(hidden=64, heads=4, mlp_ratio=2.7, attention_block=128)
        c.text.update(width=64, heads=2, max_len=12)
        c.data.update(source="procedural", sides=(16, 32), frames=(1, 5), seq_len=128, text_len=128,
                      max_samples_per_row=8, packing_bins=8, global_batch_rows=8, num_threads=1)
        c.sample.update(steps=2, width=32, height=32, frames=5, num_prompts=2)
    elif arg:
        raise ValueError(f"configs/wan14b.py: unknown variant {arg!r}; use no argument or 'smoke'.")
    return c
