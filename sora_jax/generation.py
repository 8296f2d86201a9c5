"""Generation from a trained model: the Sampler library behind `python -m sora_jax.sample` (the CLI).

  python -m sora_jax.sample --workdir=DIR --prompt="a small red circle bouncing to the left" \
      --width=48 --height=32 --frames=8 --out=DIR [--steps=30 --guidance=3 --seed=0]

Writes one MP4 and one GIF per prompt (a PNG when --frames=1) plus a JSON of the request into --out.
Requests are checked before anything is compiled.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from sora_jax import patching
from sora_jax.config_validation import FIRST_FRAME, ConfigError, check_guidance_interval, check_video_size
from sora_jax.convert.hf_text import caption_encoder_of, encode_captions
from sora_jax.diffusion.flow import predict_velocity, token_shift
from sora_jax.diffusion.solvers import SOLVERS, integrate, timesteps
from sora_jax.layers.common import gather_segments
from sora_jax.models import build_model
from sora_jax.models.autoencoder import build_autoencoder
from sora_jax.models.dit import PackedInputs
from sora_jax.models.text import build_tokenizer
from sora_jax.train import checkpointing
from sora_jax.video_io import slug, to_uint8, write_media


def check_request(config, prompts, width: int, height: int, frames: int, steps: int,
                  branches: int = 2) -> tuple[int, int, int]:
    """Validates a sampling request before anything is restored or compiled; returns the token grid.

    branches: model evaluations batched per step (guidance_branches), which the memory estimate counts.
    """
    if not prompts or not all(p.strip() for p in prompts):
        raise ConfigError("no prompt given: pass at least one non-empty --prompt=\"...\".")
    if steps <= 0:
        raise ConfigError(f"--steps={steps} must be a positive number of sampling steps.")
    tokenizer = build_tokenizer(config.text)
    for p in prompts:
        unknown = getattr(tokenizer, "unknown_words", lambda _: [])(p)
        if unknown:
            logging.warning("prompt %r has words the text encoder never saw: %s", p, unknown)
    grid = check_video_size(config, width, height, frames, what="--")
    check_memory(config, len(prompts), int(np.prod(grid)), width * height * frames, branches)
    return grid


def guidance_branches(guidance: float, image_guidance: float = 1.0, given: bool = False) -> int:
    """How many model evaluations one sampling step batches together (Sampler._velocity): 1 without guidance,
    2 with text guidance, 3 with a separate image guidance scale on given frames."""
    if given and image_guidance != 1.0:
        return 3
    return 1 if guidance == 1.0 and image_guidance == 1.0 else 2


# Bytes of working memory per token and hidden unit during sampling, per guidance branch: the residual
# stream, q/k/v, attention output and the 4x MLP activations in float32, with slack for XLA's temporaries.
# Blockwise attention keeps logits per block, so memory is linear in the tokens.
_BYTES_PER_TOKEN_UNIT = 4 * 24


def available_memory() -> int:
    """Bytes the sampler may use: the first device's memory limit, else the host's available RAM."""
    stats = jax.devices()[0].memory_stats() or {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_memory(config, num_prompts: int, tokens: int, pixels: int, branches: int = 2) -> None:
    """Refuses, before anything is allocated, a request whose estimated working memory exceeds what is
    available (e.g. 100000x100000 pixels, or 2048x2048x8 in pixel space). branches: see guidance_branches."""
    need = num_prompts * (tokens * config.model.hidden * _BYTES_PER_TOKEN_UNIT * branches + pixels * 3 * 4 * 2)
    have = available_memory()
    if need > have:
        raise ConfigError(
            f"this request needs about {need / 2**30:.1f} GiB ({num_prompts} prompt(s) x {tokens} tokens at hidden "
            f"{config.model.hidden}, {branches} guidance branch(es)) but {have / 2**30:.1f} GiB is available; lower "
            "--width/--height/--frames or sample fewer prompts at once.")


class Sampler:
    """A trained model ready to generate: graphdef + (EMA) params + tokenizer + autoencoder."""

    def __init__(self, config, graphdef, params):
        self.config, self.graphdef, self.params = config, graphdef, params
        self.tokenizer = build_tokenizer(config.text)
        self.autoencoder = build_autoencoder(config.autoencoder)
        self.patch = tuple(config.model.patch)
        self._vel = jax.jit(self._velocity, static_argnames=("guidance", "image_guidance"))
        # (lo, hi): guidance only while t is in it (see _velocity); callers may set another checked pair.
        self.guidance_interval = check_guidance_interval(config.sample.get("guidance_interval", (0.0, 1.0)),
                                                         "config.sample.guidance_interval")
        # A frozen caption encoder (config.text.path): the very one, and the same features, as in training.
        self._caption_encoder = caption_encoder_of(config)
        self._encode_captions = jax.jit(encode_captions, static_argnums=0)

    @classmethod
    def from_workdir(cls, workdir: str, use_ema: bool = True) -> "Sampler":
        """Restores the newest readable checkpoint's EMA (or raw) params of a training work dir.

        A damaged newer step is skipped with a line saying why (and left in place: moving it aside is the
        trainer's job).
        """
        config = checkpointing.read_config(workdir)
        ckpt = checkpointing.Checkpointer(workdir, read_only=True)
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"{workdir} has no checkpoint; train first (python -m sora_jax.train).")
        abstract_model = nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0)))
        graphdef, abstract = nnx.split(abstract_model, nnx.Param)
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        which = "ema" if use_ema else "params"
        try:
            if config.get("lora") is not None and config.lora.rank > 0:
                # Adapters only in the checkpoints: folded into config.init_from's base weights.
                from sora_jax.train.init_from import merged_lora_params
                step, params = merged_lora_params(config, ckpt, which, device)
            else:
                abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                                        nnx.to_pure_dict(abstract))
                step, params = ckpt.restore_params_newest_good(abstract, which)
        finally:
            ckpt.close()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints reads back (each one's problem is "
                                    "printed above). Training again there moves the damaged steps aside and "
                                    "writes new ones.")
        sampler = cls(config, graphdef, params)
        sampler.checkpoint_step = step
        return sampler

    def _velocity(self, params, inputs: PackedInputs, x, t, guidance: float, image_guidance: float = 1.0,
                  clean=None, noise=None, interval=None):
        """The guided velocity at (x, t); every branch goes through the model in one batch (one call).

        guidance: text guidance g. image_guidance: with given tokens, a separate scale g_i on them:
        v = v_none + g_i (v_given - v_none) + g (v_full - v_given), where v_full has caption and given tokens,
        v_given the given tokens only, v_none neither (its given tokens are noised to t like the rest, from
        `noise`, and generated). g_i = 1 reduces to plain text guidance with the given tokens in both branches.
        Both scales apply only while t lies in `interval` (lo, hi; None: self.guidance_interval, which the jitted
        callers pass as an array, so changing it never meets a stale trace); outside it a token's velocity is the
        conditional one, v_full (t may differ per sample: packed requests).
        """
        model = nnx.merge(self.graphdef, params)
        inputs = inputs._replace(tokens=x, t=jnp.full_like(inputs.t, t))
        lo, hi = self.guidance_interval if interval is None else interval
        t_tok = gather_segments(inputs.t, inputs.segments)[..., None]
        inside = (t_tok >= lo) & (t_tok <= hi)
        g, g_image = (jnp.where(inside, scale, 1.0) for scale in (guidance, image_guidance))
        kept, dropped = jnp.zeros_like(inputs.drop_text), jnp.ones_like(inputs.drop_text)
        conditional = inputs._replace(drop_text=kept)

        def conditional_only(_):
            return predict_velocity(model, conditional, self.config.flow)
        if guidance == 1.0 and image_guidance == 1.0:
            return conditional_only(None)
        separate = image_guidance != 1.0 and inputs.given is not None

        def guided(_):
            branches = [conditional, inputs._replace(drop_text=dropped)]
            if separate:
                noised = jnp.where(inputs.given[..., None], (1.0 - t_tok) * clean + t_tok * noise, x)
                branches.append(inputs._replace(tokens=noised, drop_text=dropped, given=jnp.zeros_like(inputs.given)))
            batch = jax.tree.map(lambda *a: jnp.concatenate(a), *branches)
            velocities = jnp.split(predict_velocity(model, batch, self.config.flow), len(branches))
            if not separate:
                v_cond, v_uncond = velocities
                return v_uncond + g * (v_cond - v_uncond)
            v_full, v_given, v_none = velocities
            return v_none + g_image * (v_given - v_none) + g * (v_full - v_given)

        # Outside the guidance interval every token's velocity is the conditional one: the extra branches are
        # not run at all there (one model call instead of two or three).
        return jax.lax.cond(jnp.any(inside), guided, conditional_only, None)

    def caption_inputs(self, prompts) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(text, text_segments, text_positions), one prompt per row of config.text.max_len slots: token ids
        [P, max_len], or with a frozen caption encoder (config.text.path) its features [P, max_len, width]."""
        max_len = self.config.text.max_len
        text = np.zeros((len(prompts), max_len), np.int32)
        text_seg = np.zeros((len(prompts), max_len), np.int32)
        padded = self.config.text.get("pad_captions", False)  # every slot read, as in training (zeros past the ids)
        for i, prompt in enumerate(prompts):
            ids = self.tokenizer.encode(prompt, max_len)
            text[i, :len(ids)], text_seg[i, :max_len if padded else len(ids)] = ids, 1
        positions = jnp.asarray(np.broadcast_to(np.arange(max_len, dtype=np.int32), text.shape))
        text, text_seg = jnp.asarray(text), jnp.asarray(text_seg)
        if self._caption_encoder is not None:
            text = self._encode_captions(self._caption_encoder[0], self._caption_encoder[1], text, text_seg, positions)
        return text, text_seg, positions

    def generate(self, prompts, width: int, height: int, frames: int, steps: int = 30,
                 guidance: float = 3.0, seed: int = 0, progress: bool = True, fps: float = 0.0,
                 condition: "Condition | None" = None, solver: str = "", image_guidance: float = 1.0,
                 first_frame: str = "", return_latents: bool = False):
        """Generates uint8 videos [P, frames, height, width, 3], one per prompt.

        fps (0: config.sample.fps) is what a metadata-conditioned model is asked for; others ignore it.
        condition: latent frames handed to the model clean (kept as they are: image-to-video, extension, loops,
        transitions) and/or a start from the noised given latents instead of pure noise (SDEdit, video-to-video);
        see Condition and sora_jax/modes.py.
        solver: one of SOLVERS ("": config.sample.solver, else Euler).
        image_guidance: a separate guidance scale on the given frames (see _velocity); 1 = text guidance only.
        first_frame: text-to-video (no condition, frames > 1) in one pass ("joint") or image first ("image":
          the prompt's image is generated as a 1-frame sample, then animated as image-to-video with it given
          at frame 0, as Emu Video factorises text-to-video); "": config.sample.first_frame, else "joint".
        return_latents: also return the sampled latents [P, T', H', W', C] (float32), so that a mode conditioning
          a later generation on this one hands over what the model made, not its decode re-encoded (the
          autoencoder's round trip, and uint8 rounding, would otherwise enter at every window).

        Returns:
          the videos, or (videos, latents) with return_latents.
        """
        solver, first_frame = self.resolve(solver, first_frame)
        if first_frame == "image" and condition is None and frames > 1:
            _, images = self.generate(prompts, width, height, 1, steps, guidance, seed, progress, fps, solver=solver,
                                      first_frame="joint", return_latents=True)
            condition = given_at(images[:, 0], self.autoencoder.latent_shape(frames, height, width)[0])
        fps = float(fps or self.config.sample.fps)
        has_given = condition is not None and bool(np.asarray(condition.given).any())
        grid = check_request(self.config, prompts, width, height, frames, steps,
                             guidance_branches(guidance, image_guidance, has_given))
        n, p = int(np.prod(grid)), len(prompts)
        dim = int(np.prod(self.patch)) * self.autoencoder.channels
        text, text_segments, text_positions = self.caption_inputs(prompts)
        clean, given = (None, None) if condition is None else condition.tokens(grid, self.patch, p)
        inputs = PackedInputs(
            tokens=None, positions=jnp.asarray(np.broadcast_to(patching.positions(grid), (p, n, 3))),
            segments=jnp.ones((p, n), jnp.int32), t=jnp.ones((p, 1), jnp.float32),
            text=text, text_segments=text_segments, text_positions=text_positions,
            drop_text=jnp.zeros((p, 1), bool),
            # Images are 1-frame samples with no frame rate, as the data pipeline records them.
            meta=jnp.asarray(np.broadcast_to(np.asarray([fps if frames > 1 else 0.0, height, width,
                                                         frames / fps if frames > 1 else 0.0], np.float32),
                                             (p, 1, 4))),
            given=None if given is None or not given.any() else jnp.asarray(given))
        shift = float(token_shift(jnp.float32(n), self.config.flow))
        x = noise = jax.random.normal(jax.random.key(seed), (p, n, dim), jnp.float32)
        ts = timesteps(steps, shift)
        if condition is not None and condition.strength < 1.0:  # SDEdit: the given latents noised to `strength`
            ts = np.concatenate([[condition.strength], ts[ts < condition.strength]]).astype(ts.dtype)
            x = (1.0 - condition.strength) * clean + condition.strength * x
        given = inputs.given

        def velocity(x, t):
            return self._vel(self.params, inputs, x, jnp.float32(t), guidance=float(guidance),
                             image_guidance=float(image_guidance), clean=clean, noise=noise,
                             interval=jnp.asarray(self.guidance_interval, jnp.float32))
        with tqdm(total=len(ts) - 1, desc="sampling", disable=not progress, file=sys.stderr) as bar:
            x = integrate(solver, velocity, x, ts, bar, None if given is None else (given[..., None], clean),
                          key=stochastic_key(seed))
        latents = jnp.stack([patching.unpatchify(x[i], grid, self.patch, self.autoencoder.channels)
                             for i in range(p)])
        videos = to_uint8(np.asarray(self.autoencoder.decode(latents)))
        return (videos, np.asarray(latents, np.float32)) if return_latents else videos

    def image_condition(self, images: np.ndarray, frames: int, latent_index: int = 0) -> "Condition":
        """Uint8 images [P, 1, H, W, 3] given at latent frame `latent_index` of a `frames`-frame request (the
        image-to-video condition); the other latent frames are generated."""
        first = np.stack([to_latents(self, image)[0] for image in images])  # [P, h, w, C]
        return given_at(first, self.autoencoder.latent_shape(frames, images.shape[2], images.shape[3])[0],
                        latent_index)

    def resolve(self, solver: str = "", first_frame: str = "") -> tuple[str, str]:
        """(solver, first_frame): the ones asked for, or config.sample's ("euler", "joint" where it has none)."""
        solver = solver or self.config.sample.get("solver", "euler")
        first_frame = first_frame or self.config.sample.get("first_frame", "joint")
        if solver not in SOLVERS:
            raise ConfigError(f"solver {solver!r}; choose one of {SOLVERS}.")
        if first_frame not in FIRST_FRAME:
            raise ConfigError(f"first_frame {first_frame!r}; choose one of {FIRST_FRAME}.")
        return solver, first_frame


def to_latents(sampler: Sampler, frames: np.ndarray) -> np.ndarray:
    """Latents [T', H', W', C] of uint8 frames [T, H, W, 3] (the autoencoder's normalised encoding)."""
    video = frames.astype(np.float32) / 127.5 - 1.0
    return np.asarray(sampler.autoencoder.encode(video[None])[0], np.float32)


def given_at(frame_latents: np.ndarray, total: int, latent_index: int = 0) -> "Condition":
    """The condition of `total` latent frames with frame_latents [P, H', W', C] given at `latent_index`."""
    latents = np.zeros((len(frame_latents), total) + frame_latents.shape[1:], np.float32)
    given = np.zeros((len(frame_latents), total), bool)
    latents[:, latent_index], given[:, latent_index] = frame_latents, True
    return Condition(latents, given)


def stochastic_key(seed: int) -> jax.Array:
    """The key of the stochastic solver's fresh noise for a request of this seed (alone or packed)."""
    return jax.random.fold_in(jax.random.key(seed), 1)

class Condition(NamedTuple):
    """What a generation starts from besides text.

    latents: [P or 1, T', H', W', C] latents of the request's size (normalised, as the autoencoder encodes);
      only the given frames' values and, for strength < 1, all of them are read.
    given: [P or 1, T'] bool: latent frames handed to the model clean and kept unchanged.
    strength: 1 starts from pure noise; s < 1 starts at t = s from the latents noised to s (SDEdit).
    """
    latents: np.ndarray
    given: np.ndarray
    strength: float = 1.0

    def tokens(self, grid, patch, prompts: int) -> tuple[jax.Array, np.ndarray]:
        """(clean latent patches [P, n, D], given [P, n]): a token is given when every latent frame it covers is."""
        latents = np.broadcast_to(self.latents, (prompts,) + self.latents.shape[1:])
        given = np.broadcast_to(self.given, (prompts, self.given.shape[1]))
        clean = jnp.stack([patching.patchify(np.asarray(v, np.float32), patch) for v in latents])
        token_frame = patching.positions(grid)[:, 0]
        pt = patch[0]
        per_token = np.stack([given[:, token_frame * pt + k] for k in range(pt)]).all(axis=0)
        return clean, per_token


def sample_to_dir(sampler: Sampler, prompts, out: str, width: int, height: int, frames: int, steps: int,
                  guidance: float, seed: int, fps: int, solver: str = "",
                  first_frame: str = "") -> tuple[np.ndarray, list[str]]:
    """Generates and writes media + a JSON record per prompt; returns (videos, paths)."""
    solver, first_frame = sampler.resolve(solver, first_frame)
    videos = sampler.generate(prompts, width, height, frames, steps, guidance, seed, fps=fps, solver=solver,
                              first_frame=first_frame)
    paths = []
    for i, (prompt, video) in enumerate(zip(prompts, videos)):
        request = dict(mode="t2v" if frames > 1 else "t2i", width=width, height=height, frames=frames, fps=fps,
                       steps=steps, guidance=guidance, guidance_interval=list(sampler.guidance_interval), seed=seed,
                       solver=solver, first_frame=first_frame,
                       checkpoint_step=getattr(sampler, "checkpoint_step", None))
        paths += write_result(out, i, prompt, video, request)
    return videos, paths


def write_result(out: str, index: int, prompt: str, video: np.ndarray, request: dict) -> list[str]:
    """Writes one result's media (MP4 + GIF, or PNG) and a JSON sidecar of the request; returns the media paths."""
    name = f"{index:03d}_{slug(prompt)}"
    paths = write_media(out, name, video, int(request["fps"]))
    with open(os.path.join(out, name + ".json"), "w") as f:
        json.dump({"prompt": prompt, **request, "frames_written": int(video.shape[0])}, f, indent=2)
    return paths
