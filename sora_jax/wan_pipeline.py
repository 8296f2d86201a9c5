"""Wan 2.1 text-to-video from a local diffusers pipeline directory, run entirely by our JAX modules.

    pipe = WanTextToVideo.from_pretrained("Wan2.1-T2V-1.3B-Diffusers")
    frames = pipe("a cat surfing a wave", height=480, width=832, num_frames=81)  # [1, 81, 480, 832, 3]

The directory is what `WanPipeline.save_pretrained` writes: model_index.json and the subfolders
text_encoder (umT5), tokenizer, transformer (WanTransformer3DModel), vae (AutoencoderKLWan) and scheduler.
Weights are read from safetensors only (the converters in sora_jax.convert refuse pickles).

Sampling follows diffusers' WanPipeline step for step, so that the same initial noise gives the same video:
  1. prompts are cleaned (HTML entities, runs of whitespace), tokenised to `max_sequence_length` with
     padding, encoded by umT5; each caption's features past its token count are set to zero (the DiT's
     cross-attention reads all positions, so this is part of the conditioning, not a cosmetic detail);
  2. the DiT's velocity is integrated from sigma = 1 to 0 with classifier-free guidance v_u + g (v_c - v_u)
     whenever g > 1, by the solver and on the sigma schedule of the directory's scheduler:
     FlowMatchEulerDiscreteScheduler (Euler, `flow_match_sigmas`) or UniPCMultistepScheduler with flow
     sigmas (UniPC-bh2, `unipc_flow_sigmas`; what the released Wan 2.1 checkpoints ship), each at its shift;
  3. the latents are de-normalised with the VAE's latents_mean / latents_std, decoded, and mapped from
     [-1, 1] to [0, 1].

Not supported (refused with a message): Wan 2.2's two-transformer pipelines (transformer_2 /
boundary_ratio) and per-token timesteps (expand_timesteps), other pipeline classes (image-to-video), other
schedulers and scheduler options that change the schedule (pass `solver=` and `shift=` to sample anyway
with one of ours, knowing that the videos then differ from diffusers').
"""
from __future__ import annotations

import dataclasses
import html
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax.convert.diffusers_vae import load_diffusers_vae
from sora_jax.convert.diffusers_wan import apply_dense, load_diffusers_transformer
from sora_jax.convert.hf_text import load_hf_text_encoder
from sora_jax.diffusion.flow import shift_t
from sora_jax.diffusion.solvers import unipc_sample

PIPELINE_CLASS = "WanPipeline"
SUBFOLDERS = ("text_encoder", "tokenizer", "transformer", "vae", "scheduler")
SCHEDULERS = {"FlowMatchEulerDiscreteScheduler": "euler", "UniPCMultistepScheduler": "unipc"}
DEFAULT_MAX_SEQUENCE_LENGTH = 512  # WanPipeline's default, and the length Wan 2.1 was trained with
# Options of the supported schedulers that our solvers do not implement, with the values that are fine.
_SCHEDULER_DEFAULTS = {
    "euler": dict(use_dynamic_shifting=False, invert_sigmas=False, shift_terminal=None, use_karras_sigmas=False,
                  use_exponential_sigmas=False, use_beta_sigmas=False, stochastic_sampling=False),
    # bh2 only: diffusers' bh1 turns the last step (sigma 0, infinite log-SNR) into NaN.
    "unipc": dict(use_flow_sigmas=True, prediction_type="flow_prediction", predict_x0=True, solver_type="bh2",
                  thresholding=False,
                  lower_order_final=True, final_sigmas_type="zero", solver_p=None, use_dynamic_shifting=False,
                  shift_terminal=None, use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False),
}


def flow_match_sigmas(steps: int, shift: float, num_train_timesteps: int = 1000) -> np.ndarray:
    """The steps + 1 noise levels of diffusers' FlowMatchEulerDiscreteScheduler(shift) for `steps` steps.

    The schedule is not our `solvers.timesteps`: diffusers spaces the steps uniformly between sigma = 1
    and its smallest *training* sigma, which is already shifted (shift / N over 1 + (shift - 1) / N), then
    shifts the whole grid again and appends 0. So the last step before 0 is shifted twice.

    Returns:
      float32 [steps + 1], decreasing from 1 to 0; the DiT's timestep at step i is
      sigmas[i] * num_train_timesteps (both in float32, as diffusers computes them).
    """
    if steps < 1:
        raise ValueError(f"num_inference_steps={steps}; pass a positive number of sampling steps.")
    # The smallest training sigma, 1 / N shifted, in float32 as the scheduler computes it at construction.
    sigma_min = float(shift_t(np.float32(1.0) / np.float32(num_train_timesteps), np.float32(shift)))
    # The inference grid in float64 (numpy's linspace on Python floats), shifted, then rounded to float32.
    sigmas = shift_t(np.linspace(1.0, sigma_min, steps), float(shift)).astype(np.float32)
    return np.concatenate([sigmas, np.zeros(1, np.float32)])


def unipc_flow_sigmas(steps: int, shift: float, num_train_timesteps: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Noise levels and DiT timesteps of diffusers' UniPCMultistepScheduler(use_flow_sigmas, flow_shift).

    Uniform from 1 down to 1 / N over steps + 1 points, the last dropped, shifted; the first nudged to
    1 - 1e-6 (the solver takes log(1 - sigma)); 0 appended. The timesteps are sigma * N truncated to
    integers, as diffusers stores them (int64), so the DiT sees e.g. 999, not 999.999.

    Returns:
      (float32 [steps + 1] sigmas, float32 [steps] integer-valued timesteps).
    """
    if steps < 1:
        raise ValueError(f"num_inference_steps={steps}; pass a positive number of sampling steps.")
    sigmas = shift_t(np.linspace(1.0, 1.0 / num_train_timesteps, steps + 1)[:-1], float(shift))
    if abs(sigmas[0] - 1.0) < 1e-6:
        sigmas[0] -= 1e-6
    timesteps = (sigmas * num_train_timesteps).astype(np.int64).astype(np.float32)
    return np.concatenate([sigmas, [0.0]]).astype(np.float32), timesteps


@dataclasses.dataclass(frozen=True)
class Scheduler:
    """The part of a diffusers scheduler config that our sampling reproduces.

    Attributes:
      solver: "euler" (FlowMatchEulerDiscreteScheduler) or "unipc" (UniPCMultistepScheduler, flow sigmas).
      shift: the flow-matching shift (diffusers' `shift` / `flow_shift`).
      num_train_timesteps: the DiT's timestep scale (timestep = sigma * num_train_timesteps).
      order, disable_corrector: UniPC's solver_order and disable_corrector.
    """
    solver: str
    shift: float
    num_train_timesteps: int = 1000
    order: int = 2
    disable_corrector: tuple[int, ...] = ()

    def schedule(self, steps: int) -> tuple[np.ndarray, np.ndarray]:
        """(float32 sigmas [steps + 1] ending in 0, float32 DiT timesteps [steps])."""
        if self.solver == "unipc":
            return unipc_flow_sigmas(steps, self.shift, self.num_train_timesteps)
        sigmas = flow_match_sigmas(steps, self.shift, self.num_train_timesteps)
        return sigmas, sigmas[:-1] * np.float32(self.num_train_timesteps)


def clean_prompt(text: str) -> str:
    """diffusers' Wan prompt cleaning: HTML entities unescaped (twice), whitespace runs collapsed, stripped.

    diffusers also runs ftfy.fix_text when ftfy is installed; so do we, so that both see the same text.
    """
    try:
        import ftfy
        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def _existing(path: str, what: str) -> str:
    """`path`, or FileNotFoundError saying it is missing and `what` it should be."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: {what}")
    return path


def _read_json(path: str, what: str) -> dict:
    with open(_existing(path, what)) as f:
        return json.load(f)


def _check_pipeline_dir(path: str) -> None:
    """Raises FileNotFoundError / ValueError naming what is missing or unsupported in a pipeline directory."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a directory; pass a local diffusers Wan pipeline directory "
                                "(WanPipeline.save_pretrained, or a downloaded Wan2.1-T2V-*-Diffusers snapshot).")
    index = _read_json(os.path.join(path, "model_index.json"),
                       "pass the root of a diffusers pipeline directory (it holds model_index.json).")
    if index.get("_class_name") != PIPELINE_CLASS:
        raise ValueError(f"{path}/model_index.json describes a {index.get('_class_name')!r}; only {PIPELINE_CLASS} "
                         "(Wan 2.1 text-to-video) is supported.")
    if (index.get("transformer_2") or [None])[0] is not None or index.get("boundary_ratio") is not None:
        raise ValueError(f"{path} is a two-stage Wan 2.2 pipeline (transformer_2 / boundary_ratio); only single-"
                         "transformer Wan 2.1 pipelines are supported.")
    if index.get("expand_timesteps"):
        raise ValueError(f"{path} uses per-token timesteps (expand_timesteps, Wan 2.2 TI2V), which are not "
                         "supported.")
    missing = [s for s in SUBFOLDERS if not os.path.isdir(os.path.join(path, s))]
    if missing:
        raise FileNotFoundError(f"{path} lacks the subfolder(s) {', '.join(missing)}; a Wan pipeline directory needs "
                                f"all of {', '.join(SUBFOLDERS)}. Download the complete snapshot.")


def read_scheduler(path: str, solver: str | None = None, shift: float | None = None) -> Scheduler:
    """Our Scheduler for a diffusers scheduler folder; `solver` and `shift` override what it stores.

    Raises:
      ValueError: a scheduler we do not reproduce, or an option of it that changes the schedule, unless
        both `solver` and `shift` are given (then the videos differ from diffusers').
    """
    raw = _read_json(os.path.join(path, "scheduler_config.json"), "the scheduler folder needs scheduler_config.json.")
    name, train_steps = raw.get("_class_name"), int(raw.get("num_train_timesteps", 1000))
    stored_shift = raw.get("flow_shift", raw.get("shift"))  # UniPC and DPM-Solver say flow_shift, Euler shift
    kind = SCHEDULERS.get(name)
    # A missing key takes diffusers' default, which is the value needed except for these two.
    unsupported = [f"{k}={raw.get(k)!r}" for k, ok in _SCHEDULER_DEFAULTS.get(kind, {}).items()
                   if raw.get(k, None if k in ("use_flow_sigmas", "prediction_type") else ok) != ok]
    if (kind is None or unsupported) and (solver is None or shift is None):
        what = f"{name} with {', '.join(unsupported)}" if kind else f"the scheduler {name!r}"
        raise ValueError(f"{path}: {what} is not reproduced here (ours: {', '.join(SCHEDULERS)}, plain shifted flow "
                         f"schedule). Pass solver='euler' or 'unipc' and shift="
                         f"{stored_shift if stored_shift is not None else '<value>'} to sample with one of ours anyway "
                         "(the videos will differ from diffusers').")
    solver = solver or kind
    if solver not in ("euler", "unipc"):
        raise ValueError(f"solver={solver!r}; choose 'euler' or 'unipc'.")
    return Scheduler(solver, float(shift if shift is not None else (stored_shift or 1.0)), train_steps,
                     int(raw.get("solver_order", 2)) if kind == "unipc" else 2,
                     tuple(raw.get("disable_corrector") or ()) if kind == "unipc" else ())


def _load_text_encoder(encoder_dir: str, tokenizer_dir: str, dtype):
    """(our umT5 encoder, tokenizer) from diffusers' two sibling folders."""
    encoder = load_hf_text_encoder(encoder_dir, dtype=dtype, tokenizer_path=tokenizer_dir)
    return encoder, encoder.tokenizer


@nnx.jit
def _encode_text(encoder, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """umT5 features with every position at or past the caption's token count set to zero."""
    features = encoder.encode(ids, mask)
    lengths = jnp.sum(mask > 0, axis=1, keepdims=True)
    # By count, not by mask position: diffusers keeps the first `length` rows, whatever the padding side.
    keep = jnp.arange(ids.shape[1])[None, :] < lengths
    return jnp.where(keep[..., None], features, 0.0).astype(jnp.float32)


class WanTextToVideo:
    """Wan 2.1 text-to-video: our umT5, DiT (configured as Wan) and causal VAE, with diffusers' sampling.

    Attributes:
      text_encoder, tokenizer, transformer, vae: the loaded parts (ours, and the Hugging Face tokenizer).
      scheduler: the solver, its shift and the sigma schedule (`Scheduler`).
    """

    def __init__(self, text_encoder, tokenizer, transformer, vae, scheduler: Scheduler):
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.transformer, self.vae, self.scheduler = transformer, vae, scheduler
        self.patch, self.channels = tuple(transformer.patch), vae.cfg.z_dim

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: str = "float32", attention: str = "auto",
                        solver: str | None = None, shift: float | None = None) -> "WanTextToVideo":
        """Loads a local diffusers Wan 2.1 text-to-video pipeline directory.

        Args:
          path: the directory holding model_index.json and the subfolders text_encoder, tokenizer,
            transformer, vae and scheduler.
          dtype: compute and parameter dtype of the text encoder and the DiT ("float32", "bfloat16"); the
            VAE stays float32 (it runs once per video).
          attention: the DiT's attention backend (sora_jax.layers.attention.BACKEND_CHOICES).
          solver: "euler" or "unipc" instead of the scheduler's own solver; with `shift`, also for a
            scheduler we do not reproduce.
          shift: overrides the scheduler's shift.

        Raises:
          FileNotFoundError: the directory, model_index.json, a subfolder, a config or weights are missing
            (the message names which).
          ValueError: an unsupported pipeline or scheduler, pickle-only weights, or weights that do not fit
            their config.
        """
        _check_pipeline_dir(path)
        sub = {name: os.path.join(path, name) for name in SUBFOLDERS}
        scheduler = read_scheduler(sub["scheduler"], solver, shift)
        text_encoder, tokenizer = _load_text_encoder(sub["text_encoder"], sub["tokenizer"], jnp.dtype(dtype))
        transformer = load_diffusers_transformer(sub["transformer"], dtype=dtype, param_dtype=dtype,
                                                 attention=attention)
        vae = load_diffusers_vae(sub["vae"])
        predicted = transformer.final.kernel.shape[-1] // math.prod(transformer.patch)
        if vae.cfg.z_dim != predicted or transformer.cond_dim:
            raise ValueError(f"{path}: the VAE's z_dim is {vae.cfg.z_dim} but the transformer predicts {predicted} "
                             f"channels{' and reads conditioning latents' if transformer.cond_dim else ''}; the "
                             "subfolders come from different models, or from an image-to-video one.")
        return cls(text_encoder, tokenizer, transformer, vae, scheduler)

    def encode_prompt(self, prompts: list[str], max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH) -> jax.Array:
        """[B, max_sequence_length, text_dim] float32 caption features, zero past each caption's tokens."""
        tokens = self.tokenizer([clean_prompt(p) for p in prompts], padding="max_length",
                                max_length=max_sequence_length, truncation=True, add_special_tokens=True,
                                return_attention_mask=True, return_tensors="np")
        return _encode_text(self.text_encoder, jnp.asarray(tokens["input_ids"], jnp.int32),
                            jnp.asarray(tokens["attention_mask"], jnp.int32))

    def check_size(self, height: int, width: int, num_frames: int) -> tuple[int, int, int]:
        """The latent grid (T', H', W') for a request; raises ValueError naming a size that does not fit."""
        st, sh, sw = self.vae.stride
        mh, mw = sh * self.patch[1], sw * self.patch[2]
        if height <= 0 or width <= 0 or height % mh or width % mw:
            raise ValueError(f"height={height}, width={width}: both must be positive multiples of {mh} x {mw} "
                             "(the VAE's spatial stride times the DiT's patch size).")
        if num_frames < 1 or (num_frames - 1) % st:
            k = max(num_frames - 1, 0) // st
            raise ValueError(f"num_frames={num_frames}: this VAE takes 1 + {st}k frames; pass {1 + st * k} or "
                             f"{1 + st * (k + 1)}.")
        return 1 + (num_frames - 1) // st, height // sh, width // sw

    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] = "", *, height: int = 480,
                 width: int = 832, num_frames: int = 81, num_inference_steps: int = 50, guidance_scale: float = 5.0,
                 latents=None, latents_layout: str = "diffusers", seed: int = 0,
                 max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH) -> np.ndarray:
        """Generates one video per prompt.

        Args:
          prompt: a prompt or a list of them.
          negative_prompt: the unconditional branch's prompt(s) of classifier-free guidance ("" by default,
            as diffusers); one string for all prompts or one per prompt.
          height, width, num_frames: video size; multiples of the VAE stride times the patch size, and
            1 + 4k frames for Wan's VAE (`check_size`). Where diffusers rounds num_frames down with a
            warning, we refuse (as it does a height or width not divisible by 16).
          num_inference_steps: solver steps (DiT evaluations per branch).
          guidance_scale: classifier-free guidance weight g; g <= 1 runs the conditional branch only.
          latents: the initial noise. latents_layout="diffusers": [B, C, T', H', W'], what WanPipeline
            takes as `latents` (pass the same array to both to get the same video); "ours": [B, T', H',
            W', C] channels-last. None: drawn from `seed` with jax.random (not torch's generator, so
            diffusers' `generator=` noise is not reproduced; pass `latents` for that).
          latents_layout: "diffusers" or "ours", see `latents`.
          seed: the noise seed when `latents` is None.
          max_sequence_length: tokens per caption (padding included) the DiT attends to.

        Returns:
          float32 [B, num_frames, height, width, 3] in [0, 1]: the layout and range of WanPipeline's
          output_type="np" frames.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if not prompts or len(negatives) != len(prompts):
            raise ValueError(f"{len(prompts)} prompt(s) and {len(negatives)} negative prompt(s); pass at least one "
                             "prompt and one negative prompt per prompt (or a single string for all).")
        grid = self.check_size(height, width, num_frames)
        x = self._initial_noise(latents, latents_layout, len(prompts), grid, seed)
        schedule = self.scheduler.schedule(num_inference_steps)
        guided = guidance_scale > 1.0  # diffusers' rule: no unconditional branch at g <= 1
        context = self.encode_prompt(prompts + (negatives if guided else []), max_sequence_length)
        x = self.denoise(x, context, schedule, guidance_scale if guided else None)
        return self.decode(x)

    def _initial_noise(self, latents, layout: str, batch: int, grid, seed: int) -> jax.Array:
        """[B, T', H', W', C] float32 noise, from `latents` in `layout` or drawn from `seed`."""
        shape = (batch, *grid, self.channels)
        if latents is None:
            return jax.random.normal(jax.random.key(seed), shape, jnp.float32)
        if layout not in ("diffusers", "ours"):
            raise ValueError(f"latents_layout={layout!r}; choose 'diffusers' ([B, C, T, H, W]) or 'ours' "
                             "([B, T, H, W, C]).")
        x = np.asarray(latents, np.float32)
        x = x.transpose(0, 2, 3, 4, 1) if layout == "diffusers" and x.ndim == 5 else x
        if x.shape != shape:
            want = shape if layout == "ours" else (shape[0], shape[4], *shape[1:4])
            raise ValueError(f"latents of shape {tuple(np.shape(latents))} ({layout} layout) but this request needs "
                             f"{want} (batch, size, frames and the DiT's {shape[-1]} channels).")
        return jnp.asarray(x)

    def denoise(self, x: jax.Array, context: jax.Array, schedule: tuple[np.ndarray, np.ndarray],
                guidance: float | None) -> jax.Array:
        """Integrates [B, T', H', W', C] latents from sigmas[0] to 0 with the scheduler's solver.

        Args:
          context: [B, L, D] caption features, or [2B, L, D] (conditional rows first, then the negative
            ones) when `guidance` is set.
          schedule: (sigmas [steps + 1], DiT timesteps [steps]) from `Scheduler.schedule`.
          guidance: the classifier-free guidance weight, or None for the conditional branch alone.
        """
        sigmas, timesteps = schedule
        batch = x.shape[0]

        def velocity(x, i):
            t = jnp.full((context.shape[0],), timesteps[i], jnp.float32)
            v = apply_dense(self.transformer, x if guidance is None else jnp.concatenate([x, x]), t, context)
            if guidance is None:
                return v
            # One DiT call for both branches: they share x and the timestep.
            v_cond, v_uncond = v[:batch], v[batch:]
            return v_uncond + jnp.float32(guidance) * (v_cond - v_uncond)

        if self.scheduler.solver == "unipc":
            return unipc_sample(velocity, x, sigmas, self.scheduler.order, self.scheduler.disable_corrector)
        for i in range(len(timesteps)):  # Euler; the step in float32, as diffusers takes it
            x = x + (sigmas[i + 1] - sigmas[i]) * velocity(x, i)
        return x

    def decode(self, latents: jax.Array) -> np.ndarray:
        """Normalised latents [B, T', H', W', C] -> float32 frames [B, T, H, W, 3] in [0, 1]."""
        # Chunked: the causal frame caches keep memory at one chunk's, and equal the whole-video decode.
        pieces = self.vae.decode_chunked(self.vae.denormalize(latents.astype(jnp.float32)))
        video = jnp.concatenate(list(pieces), axis=1)
        return np.asarray(jnp.clip(video * 0.5 + 0.5, 0.0, 1.0), np.float32)

