"""Several text-to-video requests of different sizes generated together, NaViT-packed into shared rows.

Each request (prompt, width, height, frames) becomes one sample of a packed row: its own segment id, token
positions, caption, metadata and timestep schedule (the token-count shift differs per size), exactly as
training packs clips; any of the solvers integrates every sample on its own schedule. Rows hold up to
`row_tokens` tokens (default: the largest request, or config.data.seq_len if larger); requests go first-fit by
decreasing size. A request's output does not depend on what it is packed with (tests/test_modes.py checks it
against the request alone), and its noise is drawn from its own seed (request["seed"], default seed + its
index; the stochastic solver's fresh noise too), so the same requests give the same videos.
"""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from sora_jax import patching
from sora_jax.diffusion.flow import token_shift
from sora_jax.diffusion.solvers import integrate, timesteps
from sora_jax.generation import Sampler, check_request, stochastic_key
from sora_jax.models.dit import PackedInputs
from sora_jax.video_io import to_uint8


def _pack(sizes: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: rows of request indices whose token counts sum to <= capacity."""
    rows, used = [], []
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        for r, total in enumerate(used):
            if total + sizes[i] <= capacity:
                rows[r].append(i)
                used[r] += sizes[i]
                break
        else:
            rows.append([i])
            used.append(sizes[i])
    return rows


def generate_packed(sampler: Sampler, requests: list[dict], steps: int = 30, guidance: float = 3.0, seed: int = 0,
                    fps: float = 0.0, row_tokens: int = 0, progress: bool = True, solver: str = "") -> list[np.ndarray]:
    """uint8 videos [frames, height, width, 3], one per request {prompt, width, height, frames[, seed]}, in order.

    solver: one of SOLVERS ("": config.sample.solver), each sample integrated on its own schedule.
    """
    config, fps = sampler.config, float(fps or sampler.config.sample.fps)
    solver, _ = sampler.resolve(solver, "joint")
    grids = [check_request(config, [r["prompt"]], r["width"], r["height"], r["frames"], steps) for r in requests]
    sizes = [int(np.prod(g)) for g in grids]
    capacity = max(row_tokens or config.data.seq_len, max(sizes))
    rows = _pack(sizes, capacity)
    slots = max(len(r) for r in rows)
    inputs, noise = _packed_inputs(sampler, requests, grids, rows, capacity, slots, fps, seed)
    # Slots a row leaves empty keep an unshifted schedule that no token reads (all zeros would make UniPC's
    # coefficients NaN there).
    schedules = np.broadcast_to(timesteps(steps, 1.0), (len(rows), slots, steps + 1)).copy()
    for r, members in enumerate(rows):
        for k, i in enumerate(members):
            schedules[r, k] = timesteps(steps, float(token_shift(jnp.float32(sizes[i]), config.flow)))
    # Every token follows its own sample's schedule: column r * slots + k of [steps + 1, rows * slots].
    columns = np.arange(len(rows))[:, None] * slots + np.clip(np.asarray(inputs.segments) - 1, 0, None)

    def velocity(x, t):
        t = jnp.asarray(t.reshape(len(rows), slots))
        return sampler._vel(sampler.params, inputs._replace(t=t), x, t, guidance=float(guidance),
                            interval=jnp.asarray(sampler.guidance_interval, jnp.float32))
    with tqdm(total=steps, desc="sampling", disable=not progress, file=sys.stderr) as bar:
        x = integrate(solver, velocity, noise, schedules.reshape(-1, steps + 1).T, bar, columns=columns,
                      fresh_noise=_fresh_noise(requests, sizes, rows, noise.shape, seed))
    return _unpack(sampler, np.asarray(x), requests, grids, rows)


def _fresh_noise(requests, sizes, rows, shape, seed):
    """The stochastic solver's noise of step i, each request's drawn from its own seed as sampling it alone
    (Sampler.generate) would: a request's video does not depend on what it is packed with."""
    def noise(i):
        out = np.zeros(shape, np.float32)
        for r, members in enumerate(rows):
            start = 0
            for k in members:
                key = jax.random.fold_in(stochastic_key(requests[k].get("seed", seed + k)), i)
                out[r, start:start + sizes[k]] = np.asarray(jax.random.normal(key, (sizes[k], shape[-1]), jnp.float32))
                start += sizes[k]
        return jnp.asarray(out)
    return noise


def _packed_inputs(sampler, requests, grids, rows, capacity, slots, fps, seed):
    """(PackedInputs of the rows, initial noise [R, capacity, D])."""
    dim = int(np.prod(sampler.patch)) * sampler.autoencoder.channels
    text, text_seg, _ = sampler.caption_inputs([r["prompt"] for r in requests])
    text, text_seg = np.asarray(text), np.asarray(text_seg)
    max_len = text.shape[1]
    shape = (len(rows), capacity)
    tokens, positions = np.zeros(shape + (dim,), np.float32), np.zeros(shape + (3,), np.int32)
    segments = np.zeros(shape, np.int32)
    ptext = np.zeros((len(rows), slots * max_len) + text.shape[2:], text.dtype)
    pseg, ppos = (np.zeros((len(rows), slots * max_len), np.int32) for _ in range(2))
    meta = np.zeros((len(rows), slots, 4), np.float32)
    for r, members in enumerate(rows):
        start = 0
        for k, i in enumerate(members):
            n, req = int(np.prod(grids[i])), requests[i]
            key = jax.random.key(req.get("seed", seed + i))
            tokens[r, start:start + n] = np.asarray(jax.random.normal(key, (n, dim), jnp.float32))
            positions[r, start:start + n], segments[r, start:start + n] = patching.positions(grids[i]), k + 1
            slot = slice(k * max_len, (k + 1) * max_len)
            ptext[r, slot], pseg[r, slot] = text[i], np.where(text_seg[i] > 0, k + 1, 0)
            ppos[r, slot] = np.arange(max_len)
            video = req["frames"] > 1  # images have no frame rate, as the data pipeline records them
            meta[r, k] = [fps if video else 0.0, req["height"], req["width"], req["frames"] / fps if video else 0.0]
            start += n
    inputs = PackedInputs(
        tokens=None, positions=jnp.asarray(positions), segments=jnp.asarray(segments),
        t=jnp.ones((len(rows), slots), jnp.float32), text=jnp.asarray(ptext), text_segments=jnp.asarray(pseg),
        text_positions=jnp.asarray(ppos), drop_text=jnp.zeros((len(rows), slots), bool), meta=jnp.asarray(meta))
    return inputs, jnp.asarray(tokens)


def _unpack(sampler, x, requests, grids, rows) -> list[np.ndarray]:
    out = [None] * len(requests)
    for r, members in enumerate(rows):
        start = 0
        for i in members:
            n = int(np.prod(grids[i]))
            latent = patching.unpatchify(x[r, start:start + n], grids[i], sampler.patch, sampler.autoencoder.channels)
            out[i] = to_uint8(np.asarray(sampler.autoencoder.decode(jnp.asarray(latent)[None]))[0])
            start += n
    return out
