"""Full-size 3D causal VAE in the Wan 2.1 layout (base 96, 4x8x8, 16 latent channels) for accelerators.

  python -m sora_jax.train --config=configs/vae_wan.py --workdir=gs://.../vae_wan --config.distributed=True
  python -m sora_jax.train --config=configs/vae_wan.py:/path/lpips_vgg.safetensors ...  # + perceptual loss

The argument, when given, is a local safetensors file of VGG16 + LPIPS weights (see
sora_jax/losses/perceptual.py); it turns on the perceptual term. The adversarial term starts once
reconstructions are good (adv_start_step). Parameters shard over fsdp (their conv_out axis), the
batch over data x fsdp. To fine-tune the released Wan 2.1 weights rather than train from scratch,
convert them first (python -m sora_jax.convert) and compare; initialising training from a converted
checkpoint is not wired yet.
"""
from configs.common import vae_base_config


def get_config(arg: str | None = None):
    c = vae_base_config()
    c.total_steps = 200_000
    c.checkpoint_every_steps = 2_000
    c.log_every_steps = 100
    c.eval_every_steps = 5_000
    c.eval_batches = 8
    c.data.update(sides=(256, 320, 384), clip_frames=17, clip_height=256, clip_width=256, video_batch=32,
                  image_batch=32, num_threads=16, prefetch=8)
    c.loss.update(l1=1.0, kl=1e-6, adversarial=0.1, adv_start_step=50_000, disc_channels=64, disc_layers=3)
    if arg:
        c.loss.update(perceptual=1.0, perceptual_weights=arg)
    c.optim.update(lr=1e-4, warmup_steps=1_000, schedule="cosine", weight_decay=0.0, b2=0.999)
    c.ema_decay = 0.999
    c.mesh.update(data=-1, fsdp=8)
    return c
