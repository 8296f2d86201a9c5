"""Wan 2.1 transformers (text-to-video 1.3B and 14B, image-to-video 14B) as configurations of our DiT.

The options of sora_jax/models/dit.py that make our DiT compute exactly what diffusers'
WanTransformer3DModel computes (across-head QK-norm, Wan's caption MLP over precomputed umT5-XXL features,
the table-modulated output norm, the FFN width) come from the same function the weight converter uses,
sora_jax.convert.diffusers_wan.dit_config_from_diffusers, applied to the released config.json values
below; tests/test_wan_parity.py holds the result to diffusers' outputs within 1e-4.

  arg      hidden  depth  heads  ffn     parameters
  1.3B     1536    30     12     8960    1.42B
  14B      5120    40     40     13824   14.3B
  i2v-14B  5120    40     40     13824   16.4B: + CLIP image tokens (1280 wide) and 20 conditioning channels
  tiny     32      2      2      64      random weights, for CPU tests

Load released weights (a local copy of Wan-AI/Wan2.1-T2V-1.3B-Diffusers; safetensors only, never pickle)
and run one denoising step on dense latents [B, T, H, W, 16] with umT5 features [B, 512, 4096]:
  from sora_jax.convert.diffusers_wan import apply_dense, load_diffusers_transformer
  model = load_diffusers_transformer("Wan2.1-T2V-1.3B-Diffusers/transformer")
  velocity = apply_dense(model, latents, timesteps_0_to_1000, text_features)
Our t in [0, 1] is Wan's timestep / 1000 (both: x_t = (1 - t) x_0 + t noise, velocity noise - x_0).

Image-to-video (Wan2.1-I2V-14B-480P/720P-Diffusers) also takes apply_dense(..., image=clip_features
[B, 257, 1280], condition=[B, T, H, W, 20]): the mask and first-frame latents the diffusers pipeline
concatenates after the noisy latents.

Per-device memory of a full fine-tune, ahead of time on this machine (one 480p clip per chip; rows = chips
divided by mesh.context):
  python -m sora_jax.aot --config=configs/wan21.py:1.3B --topology=v5p-8 --config.data.global_batch_rows=4
  python -m sora_jax.aot --config=configs/wan21.py:14B --topology=v5p-32 --config.data.global_batch_rows=8

Training and sampling text-to-video need umT5 caption features (config.text.encoder = "precomputed"). Give a
local umT5 encoder directory and its tokenizer and the DiT task computes them inside the step with the encoder
frozen (the sampler alike), from the caption ids the data pipeline tokenizes:
  --config.text.tokenizer=hf --config.text.path=Wan2.1-T2V-1.3B-Diffusers/text_encoder \
  --config.text.tokenizer_path=Wan2.1-T2V-1.3B-Diffusers/tokenizer
  (tokenizer_path only where the tokenizer files are not in config.text.path; tests/test_wan_finetune.py runs
  a tiny fine-tune this way). Wan was trained with every caption padded to 512 slots of zero features that
  cross-attention also reads; --config.text.pad_captions=True does the same (then data.text_len must hold
  512 slots per sample in a row); by default only the real caption tokens are packed and attended, which packs
  more clips per row but is conditioning the pretrained model has to adapt to.
  `python -m sora_jax.encode` with these flags caches the features beside the latents; training on that cache
  runs no encoder in its step.
Not wired yet: image-to-video's conditioning, which no data source or sampler produces today.
"""
from configs.common import base_config
from sora_jax.convert.diffusers_wan import dit_config_from_diffusers

# The released diffusers config.json values that differ from WanTransformer3DModel's defaults.
_COMMON = dict(patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
               freq_dim=256, eps=1e-6, qk_norm="rms_norm_across_heads", cross_attn_norm=True)
SIZES = {
    "1.3B": dict(_COMMON, num_attention_heads=12, ffn_dim=8960, num_layers=30),
    "14B": dict(_COMMON, num_attention_heads=40, ffn_dim=13824, num_layers=40),
    "i2v-14B": dict(_COMMON, num_attention_heads=40, ffn_dim=13824, num_layers=40, in_channels=36, image_dim=1280,
                    added_kv_proj_dim=5120),
    "tiny": dict(_COMMON, num_attention_heads=2, attention_head_dim=16, ffn_dim=64, num_layers=2, text_dim=32),
}


def get_config(arg: str | None = None):
    """arg: "1.3B" (the default), "14B", "i2v-14B" or "tiny"."""
    arg = arg or "1.3B"
    if arg not in SIZES:
        raise ValueError(f"configs/wan21.py: unknown size {arg!r}; use one of {sorted(SIZES)}.")
    c = base_config()
    big = arg != "tiny"
    wan = dit_config_from_diffusers(SIZES[arg], dtype="bfloat16" if big else "float32")
    c.model.update(wan.model)
    c.model.update(attention_block=512 if big else 128, remat="full" if big else "none", scan_layers=big)
    c.text.update(wan.text)
    # A frozen umT5 for the captions (see above); "" = features come with the batch.
    c.text.update(path="", tokenizer_path="")
    c.autoencoder.update(name="latent", checkpoint="", channels=wan.channels, stride=(4, 8, 8))
    # Wan's native 480p: 81 frames of 480 x 832 are 21 x 30 x 52 = 32,760 tokens.
    c.data.update(source="latents", sides=(256, 384, 480), frames=(1, 17, 33, 81), seq_len=32768,
                  text_len=512, max_samples_per_row=16, global_batch_rows=1)
    c.sample.update(steps=50, guidance=5.0, width=832, height=480, frames=81, fps=16)
    # Fine-tuning as the public Wan recipes do it (DiffSynth-Studio, musubi-tuner, finetrainers): AdamW at a
    # constant 1e-5 for full fine-tunes (1e-4 is theirs for LoRA) after a short warm-up, bf16 compute,
    # float32 master weights and moments, full remat, gradient clipping at 1, next to no weight decay.
    c.optim.update(lr=1e-5, warmup_steps=100, b1=0.9, b2=0.999, weight_decay=1e-4, grad_clip=1.0,
                   schedule="constant")
    c.ema_decay = 0.9999
    # One 81-frame 480p clip (32,760 tokens) per device, the state sharded over fsdp. Ahead-of-time compiled
    # for v5p-32 (16 chips, 95 GiB) on 2026-11-23 (BUILD_NOTES): 1.3B with fsdp=-1 on v5p-8 needs 30.6 GiB per
    # chip; 14B with fsdp=-1 needs 100.3 GiB (does not fit), with fsdp=8 x context=2 80.7 GiB (fits).
    c.mesh.update(data=1, fsdp=-1, context=2 if arg in ("14B", "i2v-14B") else 1)
    if not big:
        c.data.update(source="procedural", sides=(16, 32), frames=(1, 5), seq_len=128, text_len=512,
                      max_samples_per_row=8, global_batch_rows=8)
        c.sample.update(steps=2, width=32, height=32, frames=5)
        c.mesh.update(data=-1, fsdp=1, context=1)
    return c
