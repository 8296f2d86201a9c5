"""Convert pretrained weights to our format, and trained weights back.

  python -m sora_jax.convert --kind=wan_vae --src=DIFFUSERS_VAE_DIR --dst=OUT_DIR
  python -m sora_jax.convert --kind=dit_to_diffusers --src=WORKDIR --dst=OUT_DIR [--weights=ema] \
      [--dtype=bfloat16] [--max_shard_gib=5]

wan_vae reads a diffusers-format directory (config.json + *.safetensors; pickle files are refused) and writes
an orbax checkpoint plus vae_config.json into OUT_DIR, which a config names as `config.autoencoder.checkpoint`.
dit_to_diffusers writes a training work dir's newest readable weights (EMA by default; a LoRA run's adapters
merged into its config.init_from base) as a diffusers WanTransformer3DModel directory; the model must be
configured as Wan (configs/wan21.py). OUT_DIR must not exist yet (or be empty).
"""
from __future__ import annotations

import sys

from absl import app, flags

from sora_jax.convert.diffusers_vae import load_diffusers_vae
from sora_jax.convert.diffusers_wan import save_diffusers_transformer
from sora_jax.convert.vae_checkpoint import save_vae

FLAGS = flags.FLAGS
flags.DEFINE_enum("kind", "wan_vae", ["wan_vae", "dit_to_diffusers"], "What to convert.")
flags.DEFINE_string("src", None, "Source directory (diffusers format, or a training work dir).")
flags.DEFINE_string("dst", None, "Destination directory (must not exist or be empty).")
flags.DEFINE_enum("weights", "ema", ["ema", "params"], "dit_to_diffusers: the EMA or the raw parameters.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "dit_to_diffusers: the tensors' dtype "
                  "(bfloat16 halves the files, as the released Wan weights are stored).")
flags.DEFINE_float("max_shard_gib", 5.0, "dit_to_diffusers: split larger weights into numbered files + an index.")


def workdir_weights(workdir: str, which: str = "ema"):
    """(the plain model's parameters, config) of a training work dir's newest readable checkpoint; a LoRA run's
    adapters are merged into the base weights its config.init_from names (refused if that base is not the one
    they were trained on)."""
    import jax
    from flax import nnx

    from sora_jax.tasks import build_task
    from sora_jax.train import checkpointing, init_from, state

    config = checkpointing.read_config(workdir)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    ckpt = checkpointing.Checkpointer(workdir, read_only=True)
    try:
        if config.get("lora") is not None and config.lora.rank > 0:
            step, params = init_from.merged_lora_params(config, ckpt, which, device)
        else:
            _, trained, _ = state.split_model(nnx.eval_shape(
                lambda: state.build_model(config, build_task(config), nnx.Rngs(0))))
            step, params = ckpt.restore_params_newest_good(jax.tree.map(
                lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), nnx.to_pure_dict(trained)), which)
    finally:
        ckpt.close()
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints reads back.")
    return params, config


def main(argv):
    del argv
    if not FLAGS.src or not FLAGS.dst:
        raise app.UsageError("--src and --dst are required.")
    try:
        if FLAGS.kind == "wan_vae":
            save_vae(load_diffusers_vae(FLAGS.src), FLAGS.dst)
        else:
            params, config = workdir_weights(FLAGS.src, FLAGS.weights)
            save_diffusers_transformer(params, config, FLAGS.dst, FLAGS.dtype, FLAGS.max_shard_gib)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f"error: {e}")
    print(f"Wrote {FLAGS.dst}")


if __name__ == "__main__":
    app.run(main)
