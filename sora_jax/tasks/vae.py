"""The VAE task: train the 3D causal VAE on mixed image + video batches with the shared trainer.

Loss per batch (videos and images weighted by their sample counts):
  l1 * |x - x'| + l2 * (x - x')^2 + kl * KL(q(z|x) || N(0, 1))          per-element means
  + perceptual * LPIPS(x, x')                                          if config.loss.perceptual > 0
  + adversarial * (-D(x')) + hinge(D(x), D(x'))                        from config.loss.adv_start_step
The decoder output is not clipped in training (clipping would zero the gradient of out-of-range
pixels); evaluation clips, as inference does. The discriminator's gradient comes from the hinge term
only (reconstructions are stop-gradient there) and the decoder's adversarial gradient sees a
stop-gradient copy of the discriminator, so one backward pass trains both without interference.

Held-out metrics: PSNR and SSIM of the EMA and raw weights on fixed held-out videos and images. After
training, the EMA VAE is exported -- with per-channel latent mean/std measured on training data -- to
WORKDIR/autoencoder_step<N>, a directory latent DiT configs name as config.autoencoder.checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_pipelines import clips
from sora_jax.config_validation import ConfigError
from sora_jax.evaluation.reconstruction import psnr, ssim
from sora_jax.models.discriminator import PatchDiscriminator3D, generator_loss, hinge_d_loss
from sora_jax.models.vae import CausalVAE, VAEConfig


class VAETrainee(nnx.Module):
    """What the trainer optimises: the VAE, and the discriminator when the adversarial term is on."""

    def __init__(self, vae_cfg: VAEConfig, loss_cfg, *, rngs: nnx.Rngs):
        self.vae = CausalVAE(vae_cfg, rngs=rngs)
        self.disc = (PatchDiscriminator3D(vae_cfg.out_channels, loss_cfg.disc_channels, loss_cfg.disc_layers,
                                          rngs=rngs) if loss_cfg.adversarial > 0 else None)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


class VAETask:
    throughput_unit = "frames"

    def __init__(self, config):
        self.config = config
        try:
            self.vae_cfg = VAEConfig.from_dict(config.vae.to_dict())
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config.vae: {e}") from None
        self._frozen = None

    # --- checks before anything compiles -------------------------------------------------------------
    def validate(self) -> None:
        d, loss = self.config.data, self.config.loss
        cfg = self.vae_cfg
        _require(len(cfg.temporal_downsample) == len(cfg.dim_mult) - 1,
                 f"config.vae.temporal_downsample has {len(cfg.temporal_downsample)} entries; it needs one per "
                 f"down-sampling stage, len(config.vae.dim_mult) - 1 = {len(cfg.dim_mult) - 1}.")
        _require(d.source == "procedural", f"config.data.source={d.source!r}; VAE training reads 'procedural'.")
        st, sh, sw = cfg.stride
        _require(d.clip_frames >= 1 and (d.clip_frames - 1) % st == 0,
                 f"config.data.clip_frames={d.clip_frames} must be 1 + {st}k (the VAE's temporal stride is {st}).")
        _require(d.clip_height % sh == 0 and d.clip_width % sw == 0,
                 f"config.data.clip_height x clip_width = {d.clip_height}x{d.clip_width} must be multiples of the "
                 f"VAE's spatial stride {sh}.")
        _require(min(d.clip_height, d.clip_width) >= 11,
                 f"config.data clips of {d.clip_height}x{d.clip_width} are below SSIM's 11 px window.")
        _require(len(d.sides) > 0 and min(d.sides) >= max(d.clip_height, d.clip_width),
                 f"config.data.sides={tuple(d.sides)} must all be >= the crop size max(clip_height, clip_width) = "
                 f"{max(d.clip_height, d.clip_width)}: clips are crops of renders.")
        _require(d.video_batch > 0 and d.image_batch >= 0,
                 f"config.data.video_batch={d.video_batch} must be > 0 and image_batch={d.image_batch} >= 0.")
        for name in ("l1", "l2", "kl", "perceptual", "adversarial"):
            _require(loss[name] >= 0, f"config.loss.{name}={loss[name]} must be >= 0.")
        _require(loss.l1 + loss.l2 > 0, "config.loss.l1 and config.loss.l2 are both 0; set at least one.")
        if loss.perceptual > 0:
            self.frozen()  # reads the weights file now: a missing or pickle file is a config error

    def validate_for_mesh(self, mesh_shape: dict) -> None:
        split = mesh_shape["data"] * mesh_shape["fsdp"]
        for name in ("video_batch", "image_batch"):
            n = self.config.data[name]
            _require(n % split == 0, f"config.data.{name}={n} is not divisible by the mesh's data x fsdp = {split} "
                                     f"devices; use a multiple of {split} or change config.mesh.")

    # --- model and data --------------------------------------------------------------------------------
    def build_model(self, rngs):
        return VAETrainee(self.vae_cfg, self.config.loss, rngs=rngs)

    def frozen(self):
        if self._frozen is None:
            self._frozen = {}
            if self.config.loss.perceptual > 0:
                from sora_jax.losses.perceptual import load_perceptual_weights
                try:
                    self._frozen["perceptual"] = load_perceptual_weights(self.config.loss.perceptual_weights)
                except ValueError as e:
                    raise ConfigError(str(e)) from None
        return self._frozen

    def frozen_axes(self):
        """The perceptual network is small: replicated."""
        return {name: jax.tree.map(lambda _: (), tree) for name, tree in self.frozen().items()}

    def train_data(self, process_index: int, process_count: int, start: int = 0):
        return clips.clip_dataset(self.config.data, process_index, process_count, start)

    def reshard_start(self, states: list[dict], start: int, process_count: int) -> int:
        return clips.reshard_start(states, start)

    def eval_data(self, process_index: int, process_count: int) -> list[dict]:
        return clips.heldout_batches(self.config.data, self.config.eval_batches, process_index, process_count)

    def host_metrics(self, batch: dict) -> dict:
        return {}

    # --- loss and metrics ------------------------------------------------------------------------------
    def _terms(self, model: VAETrainee, frozen, x, key, step) -> dict:
        w = self.config.loss
        mean, logvar = model.vae.encode_moments(x)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
        rec = model.vae.decode(z, clip=False)
        diff = rec - x
        t = {"l1": jnp.mean(jnp.abs(diff)), "l2": jnp.mean(jnp.square(diff)),
             "kl": 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)}
        total = w.l1 * t["l1"] + w.l2 * t["l2"] + w.kl * t["kl"]
        if w.perceptual > 0:
            from sora_jax.losses.perceptual import perceptual_distance
            frames = lambda v: v.reshape(-1, *v.shape[2:])  # noqa: E731
            t["perceptual"] = jnp.mean(perceptual_distance(frozen["perceptual"], frames(rec), frames(x)))
            total = total + w.perceptual * t["perceptual"]
        if model.disc is not None:
            graphdef, disc_state = nnx.split(model.disc)
            fixed_disc = nnx.merge(graphdef, jax.lax.stop_gradient(disc_state))
            on = (step >= w.adv_start_step).astype(jnp.float32)
            t["g_adv"] = generator_loss(fixed_disc(rec))
            t["d_loss"] = hinge_d_loss(model.disc(x), model.disc(jax.lax.stop_gradient(rec)))
            total = total + on * (w.adversarial * t["g_adv"] + t["d_loss"])
        t["total"] = total
        return t

    def loss(self, model, frozen, batch, key, step):
        kv, ki = jax.random.split(key)
        parts = [(batch["video"].shape[0], self._terms(model, frozen, batch["video"], kv, step))]
        if batch["image"].shape[0]:
            parts.append((batch["image"].shape[0], self._terms(model, frozen, batch["image"], ki, step)))
        n = sum(p[0] for p in parts)
        terms = {k: sum(m * t[k] for m, t in parts) / n for k in parts[0][1]}
        frames = batch["video"].shape[0] * batch["video"].shape[1] + batch["image"].shape[0]
        return terms.pop("total"), {**terms, "count": jnp.asarray(frames, jnp.float32)}

    def eval_metrics(self, model, frozen, batch, key) -> dict:
        del frozen, key  # evaluation decodes the posterior mean: deterministic
        out = {}
        for name, suffix in (("video", ""), ("image", "_image")):
            x = batch[name]
            if not x.shape[0]:
                continue
            rec = model.vae.decode(model.vae.encode(x))
            out[f"psnr{suffix}"] = jnp.mean(psnr(rec, x))
            out[f"ssim{suffix}"] = jnp.mean(ssim(rec, x))
            out[f"l1{suffix}"] = jnp.mean(jnp.abs(rec - x))
        return out

    # --- after training --------------------------------------------------------------------------------
    def after_training(self, workdir: str) -> dict:
        """Exports the EMA VAE with measured latent statistics and writes held-out reconstructions."""
        from sora_jax.convert.vae_checkpoint import save_vae
        from sora_jax.video_io import to_uint8, write_media

        step, vae = restore_trained_vae(workdir, self.config)
        batches = [clips.ClipBatches(self.config.data, "train")[k] for k in range(self.config.export_stats_batches)]
        encode = nnx.jit(lambda m, x: m.encode(x))
        latents = [np.asarray(encode(vae, jnp.asarray(b[key]))) for b in batches for key in ("video", "image")
                   if b[key].shape[0]]
        flat = np.concatenate([z.reshape(-1, z.shape[-1]) for z in latents])
        mean, std = flat.mean(axis=0), flat.std(axis=0) + 1e-6
        vae.cfg = dataclasses.replace(vae.cfg, latents_mean=tuple(map(float, mean)), latents_std=tuple(map(float, std)))
        out = os.path.join(os.path.abspath(workdir), f"autoencoder_step{step}")
        if not os.path.exists(out):
            save_vae(vae, out)
        # Side by side: held-out originals (left) and their reconstructions (right).
        rec_dir = os.path.join(workdir, "reconstructions")
        heldout = clips.heldout_batches(self.config.data, 1)[0]
        roundtrip = nnx.jit(lambda m, x: m.decode(m.encode(x)))
        paths = []
        for key in ("video", "image"):
            x = heldout[key][:4]
            if not x.shape[0]:
                continue
            rec = np.asarray(roundtrip(vae, jnp.asarray(x)))
            for i in range(x.shape[0]):
                pair = np.concatenate([x[i], rec[i]], axis=2)
                paths += write_media(rec_dir, f"{key}_{i}", to_uint8(pair), fps=8)
        with open(os.path.join(out, "latent_stats.json"), "w") as f:
            json.dump({"step": step, "latents_mean": mean.tolist(), "latents_std": std.tolist()}, f, indent=2)
        return {"autoencoder_dir": out, "reconstructions_dir": rec_dir, "reconstruction_paths": paths}


def restore_trained_vae(workdir: str, config, use_ema: bool = True) -> tuple[int, CausalVAE]:
    """The latest checkpoint's (EMA) VAE of a VAE training work dir, on one device."""
    from sora_jax.train import checkpointing
    ckpt = checkpointing.Checkpointer(workdir, read_only=True)
    step = ckpt.latest_step()
    if step is None:
        raise FileNotFoundError(f"{workdir} has no checkpoint; train first (python -m sora_jax.train).")
    task = VAETask(config)
    abstract = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0)))
    graphdef, params = nnx.split(abstract, nnx.Param)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), nnx.to_pure_dict(params))
    restored = ckpt.restore_params(step, target, "ema" if use_ema else "params")
    ckpt.close()
    return step, nnx.merge(graphdef, restored).vae
