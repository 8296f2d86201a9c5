"""Shared pieces of experiment configs: every field a config may set exists here with its default.

ml_collections rejects overrides of fields that do not exist, so `--config.typo=1` fails loudly.
Sequence fields are tuples, not lists: ml_collections can override tuples from the command line
(`--config.data.frames="(1, 5, 9)"`) but not lists.
"""
from __future__ import annotations

import ml_collections

from data_pipelines import procedural
from sora_jax.models.lora import DEFAULT_TARGETS


def trainer_config() -> ml_collections.ConfigDict:
    """The fields every task shares: steps, checkpoints, evaluation, optimizer, EMA, mesh."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 1000
    c.checkpoint_every_steps = 200
    c.keep_checkpoints = 3
    c.log_every_steps = 20
    c.eval_every_steps = 0  # 0: only at the start and the end
    c.eval_batches = 4
    c.distributed = False  # jax.distributed.initialize() for multi-host runs
    c.task = "dit"  # sora_jax.tasks.TASKS: "dit" or "vae"
    c.optim = ml_collections.ConfigDict(dict(
        lr=1e-3, warmup_steps=50, b1=0.9, b2=0.99, weight_decay=0.01, grad_clip=1.0, schedule="constant",
        # Adam's first moment may be kept in bfloat16 to save 2 bytes per parameter; the second stays float32.
        mu_dtype="float32"))
    c.ema_decay = 0.999
    # Axes of size -1 take the remaining devices.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, context=1))
    # (logical axis, mesh axes) pairs; empty means sora_jax.sharding.DEFAULT_RULES. Example:
    # --config.logical_axis_rules='(("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"))'
    c.logical_axis_rules = ()
    # MaxText's sufficiently-sharded check: per-device parameter bytes may exceed total / (product of the mesh
    # axes the rules put parameters on; fsdp x tensor by default) by at most this fraction; beyond it the
    # run stops before compiling. Negative disables it.
    c.param_sharding_tolerance = 0.02
    # A step whose loss, gradient or updated parameters are not finite: "stop" (no save; the last
    # checkpoint stays the newest), "skip" (drop that update, count it; stop after nonfinite_max_skips in
    # a row) or "rollback" (restore the newest checkpoint, multiply the learning rate by
    # nonfinite_lr_factor, go on; at most nonfinite_max_rollbacks times).
    c.nonfinite = "stop"
    c.nonfinite_max_skips = 3
    c.nonfinite_lr_factor = 0.5
    c.nonfinite_max_rollbacks = 3
    # Fine-tuning (sora_jax/train/init_from.py). init_from: a sora_jax work dir or a diffusers
    # WanTransformer3DModel directory whose weights a new run starts from at step 0 with a fresh optimizer and
    # data order (a work dir that already holds checkpoints resumes from them instead); init_from_weights: a
    # work dir's "ema" or raw "params".
    c.init_from = ""
    c.init_from_weights = "ema"
    # LoRA (sora_jax/models/lora.py): rank 0 is off. Otherwise only adapters on the linear layers whose module
    # paths fullmatch one of `targets` train, scaled by alpha / rank (alpha 0: the rank, a scale of 1), over the
    # frozen weights of init_from (required; read again at every start); checkpoints hold only the adapters.
    c.lora = ml_collections.ConfigDict(dict(rank=0, alpha=0.0, targets=DEFAULT_TARGETS))
    return c


def eval_config(task: str) -> ml_collections.ConfigDict:
    """The offline evaluation job's section (`python -m sora_jax.evaluate`); task is "dit" or "vae"."""
    e = ml_collections.ConfigDict()
    # sora_jax.evaluation.evaluators.EVALUATORS: val_loss, adherence, fid, fvd (dit); reconstruction (vae).
    e.evaluators = ("val_loss", "adherence") if task == "dit" else ("reconstruction",)
    # The job's own mesh (same form as config.mesh; it may differ from training's). -1 takes the rest.
    e.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, context=1))
    e.use_ema = True  # False: evaluate the raw parameters instead of the EMA ones
    e.batches = 0  # held-out batches for val_loss / reconstruction; 0: config.eval_batches
    e.poll_seconds = 30.0  # --watch: seconds between looks for new checkpoints
    e.timeout_seconds = 0.0  # --watch: give up after this long; 0 waits until config.total_steps is evaluated
    if task == "dit":
        e.timestep_buckets = 4  # val_loss per t in [k/B, (k+1)/B), plus their mean
        e.num_prompts = 8  # adherence: held-out prompts sampled per checkpoint
        # Generation (adherence, fid, fvd); 0 takes config.sample's value.
        e.width, e.height, e.frames, e.fps = 0, 0, 0, 0
        e.sample_steps = 0
        e.guidance = 0.0
        e.sample_batch = 8  # prompts per sampler call
        e.seed = 0  # noise seed of batch k is seed + k
        # fid / fvd: VGG16 weights (local safetensors, torchvision names; NOT Inception / I3D, so the values
        # are comparable only between evaluations with the same file), frames resized to feature_size^2.
        e.fid_samples = 64
        e.feature_weights = ""
        e.feature_size = 64
    return e


def vae_base_config() -> ml_collections.ConfigDict:
    """Defaults for training the 3D causal VAE (config.task = "vae") on the procedural world.

    config.vae holds sora_jax.models.vae.VAEConfig's fields (the Wan 2.1 layout by default).
    Batches mix `video_batch` clips of clip_frames x clip_height x clip_width with `image_batch` images.
    """
    c = trainer_config()
    c.task = "vae"
    c.vae = ml_collections.ConfigDict(dict(
        in_channels=3, out_channels=3, base_dim=96, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2,
        attn_scales=(), temporal_downsample=(False, True, True)))
    c.data = ml_collections.ConfigDict(dict(
        source="procedural", seed=0, sides=(48, 56, 64), clip_frames=9, clip_height=32, clip_width=48,
        video_batch=8, image_batch=8, num_threads=2, prefetch=4))
    # Loss weights; perceptual_weights is a local safetensors file (sora_jax/losses/perceptual.py).
    c.loss = ml_collections.ConfigDict(dict(
        l1=1.0, l2=0.0, kl=1e-6, perceptual=0.0, perceptual_weights="", adversarial=0.0, adv_start_step=0,
        disc_channels=32, disc_layers=3))
    c.eval = eval_config("vae")
    c.export_stats_batches = 4  # training batches that measure the exported latent mean/std
    c.ema_decay = 0.99
    return c


def data_config() -> ml_collections.ConfigDict:
    """The DiT's data section: which source, how clips are sampled and sized, how rows are packed.

    source (data_pipelines.pipeline.SOURCES):
      procedural  the built-in world (sides, frames)
      latents     latent_dir, written by `python -m sora_jax.encode` from raw_source; held-out evaluation and
                  the encoder itself read raw_source
      folder      a manifest (JSONL/CSV of path + caption, from `python -m data_pipelines.prepare`) of videos
                  and images under root (default: the manifest's directory); eval_manifest for held-out data
      records     ArrayRecord shards of raw clips (glob in records)
      tfds        tfds.data_source(tfds_name, split=tfds_split) of an array_record-format TFDS dataset
      mixture     weighted mix: mixture = (("videos", 0.7), ("images", 0.3)) names sub-sections of
                  `components` (each a partial data section: source, manifest, ...), set in a config file
    Decoded sources (folder, records, tfds) sample a clip of up to clip_frames frames at fps (0 keeps the
    native rate; frame counts follow the autoencoder's 1 + k*stride rule) and resize it, keeping its aspect
    ratio, to the largest size whose token count fits max_sample_tokens (crop=True centre-crops instead).
    Files larger than max_pixels per frame or max_frames in total are skipped (decompression bombs).
    """
    return ml_collections.ConfigDict(dict(
        source="procedural", raw_source="procedural", latent_dir="", seed=0, sides=tuple(range(16, 49, 8)),
        frames=tuple(range(1, 13)),
        manifest="", eval_manifest="", root="", records="", tfds_name="", tfds_split="train",
        tfds_eval_split="", tfds_data_dir="", tfds_video_key="video", tfds_caption_key="caption",
        mixture=(), components=ml_collections.ConfigDict(), shuffle=True,
        fps=8.0, clip_frames=9, max_sample_tokens=256, crop=False, max_pixels=4096 * 4096, max_frames=100_000,
        seq_len=512, text_len=128, max_samples_per_row=16, packing_bins=64, global_batch_rows=8,
        # workers > 0: grain multiprocessing (decode and tokenise in that many processes); threads read ahead.
        workers=0, num_threads=1, prefetch=16))


def base_config() -> ml_collections.ConfigDict:
    """Defaults for a text-to-video DiT trained with rectified flow on the procedural world."""
    c = trainer_config()

    c.model = ml_collections.ConfigDict(dict(
        name="dit", hidden=128, depth=4, heads=4, mlp_ratio=4.0, patch=(1, 8, 8), dtype="float32",
        param_dtype="float32", attention="auto", attention_block=128, rope_theta=10000.0, pooled_text=True,
        # attention "auto": blockwise on CPU, cudnn on GPU (bf16/f16; blockwise for f32), splash on TPU.
        # Memory: remat "none" | "full" | "save_dots" | "offload_dots" (host offload where the platform has
        # it); scan_layers stacks the blocks' parameters and runs them with nnx.scan (one compiled block).
        remat="none", scan_layers=False,
        # Condition on each sample's (fps, original height, width, duration) -- batch["meta"] -- as well.
        meta_conditioning=False,
        # "edges": tokens also learn their distances to their sample's boundaries (sora_jax/models/dit.py).
        abs_pos="none", head="linear"))
    # "identity" (pixel space) or "vae" with checkpoint= a directory from `python -m sora_jax.convert`.
    c.autoencoder = ml_collections.ConfigDict(dict(name="identity", checkpoint=""))
    # pad_captions (frozen encoders only): every caption takes max_len slots, zero features past its tokens, all
    # read by cross-attention -- as Wan 2.1 was trained (512 umT5 slots); otherwise only the real tokens are packed.
    c.text = ml_collections.ConfigDict(dict(
        tokenizer="words", vocabulary=tuple(procedural.VOCABULARY), encoder="tiny", width=128, depth=2,
        heads=4, max_len=12, pad_captions=False))

    c.data = data_config()

    c.flow = ml_collections.ConfigDict(dict(
        logit_mean=0.0, logit_std=1.0, base_shift=1.0, shift_base_tokens=256.0, max_shift=3.0, caption_dropout=0.1,
        prediction="velocity", t_min=0.05,
        # Per-token conditioning tasks mixed in training (sora_jax/diffusion/tasks.py: t2v, i2v_first, i2v_any,
        # forward, backward, first_last, keyframes -> weight); text-to-video only by default.
        tasks=ml_collections.ConfigDict(dict(t2v=1.0, i2v_first=0.0, i2v_any=0.0, forward=0.0, backward=0.0,
                                             first_last=0.0, keyframes=0.0))))

    # solver: sora_jax.diffusion.solvers.SOLVERS (euler, heun, unipc, stochastic). first_frame (text-to-video):
    # "joint" generates every frame at once; "image" generates the first frame as an image, then animates it.
    # guidance_interval (lo, hi): guidance applies only while t is in [lo, hi] (Kynkaanniemi et al. 2024);
    # outside it the conditional velocity alone is used.
    c.sample = ml_collections.ConfigDict(dict(
        steps=30, guidance=3.0, width=48, height=32, frames=8, fps=8, use_ema=True, num_prompts=8, solver="euler",
        first_frame="joint", guidance_interval=(0.0, 1.0)))
    c.eval = eval_config("dit")
    return c


def shrink_dit_for_smoke(c: ml_collections.ConfigDict) -> None:
    """The few-step, narrow-model settings DiT smoke variants share (they set their own data sizes)."""
    c.total_steps = 4
    c.checkpoint_every_steps = 2
    c.log_every_steps = 2
    c.eval_batches = 1
    c.model.update(hidden=32, depth=2, heads=2)
    c.text.update(width=32, depth=1, heads=2)
    # At width 32, biases, norms and the projections with one unsharded side are a large part of the model:
    # on the 2x2x2 test mesh each device holds ~35% more than a perfect split. 1.0 still stops a run whose
    # parameters are left whole (+700% there).
    c.param_sharding_tolerance = 1.0
