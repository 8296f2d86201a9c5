"""Has a trained demo model learned motion? One denoising step on held-out clips of the procedural world.

Held-out clips (48x32, 8 frames) are noised to a fixed t with fixed noise, the first G frames given clean
(G = 0: text-to-video; 1: image-to-video; 4: extension), and the model's x0 estimate is read once -- no
sampler, so the figures say what the network itself predicts. For the three frames after the last given one
(frames 1-3 when nothing is given) it reports:

  centroid_err   mean |x| error (px) of the object's tracked centroid against the physical trajectory;
  copy_err       the same for a model that repeats the last given frame (the frozen baseline; G > 0);
  direction      share of clips whose estimate moves the way the object really moves over those frames;
  word_drift     mean drift (px, signed so that positive = the true way) of the estimate under the true
                 caption minus under the caption with "left" and "right" swapped: 0 when the direction word
                 is ignored.

At high noise (t >= 0.95) the noisy frames show almost nothing, so a model that has learned motion
extrapolates from the given frames and the caption; at t <= 0.9 the noisy frames themselves show where the
object is. Run:
  python benchmarks/motion_probe.py --workdir=workdirs/tiny [--clips=16] [--out=benchmarks/results/X.json]
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from data_pipelines.procedural import ProceduralWorld, render, trajectory
from sora_jax import patching
from sora_jax.diffusion.flow import predict_velocity
from sora_jax.evaluation.detectors import centroids_x
from sora_jax.generation import Sampler
from sora_jax.models.dit import PackedInputs
from sora_jax.video_io import to_uint8

flags.DEFINE_string("workdir", None, "A trained DiT work dir (pixel space).", required=True)
flags.DEFINE_integer("clips", 16, "Held-out clips.")
flags.DEFINE_string("out", "", "Optional JSON path for the table.")
FLAGS = flags.FLAGS
WIDTH, HEIGHT, FRAMES = 48, 32, 8
SWAP = {"left": "right", "right": "left"}


def held_out_clips(count: int) -> list:
    """The first `count` held-out clips the world draws at 48x32, 8 frames."""
    world = ProceduralWorld(0, (HEIGHT, WIDTH), (FRAMES,), split="heldout")
    params = (world.params(i) for i in range(100 * count))
    return [p for p in params if (p.width, p.height) == (WIDTH, HEIGHT)][:count]


def x0_estimate(sampler: Sampler, model, clips, captions, given_frames: int, t: float) -> np.ndarray:
    """uint8 x0 estimates [P, F, H, W, 3] at time t with the first given_frames frames clean."""
    grid = patching.check_divisible((FRAMES, HEIGHT, WIDTH, 3), sampler.patch, "video")
    x0 = jnp.stack([patching.patchify(render(p), sampler.patch) for p in clips])
    count, n = x0.shape[:2]
    positions = jnp.asarray(np.broadcast_to(patching.positions(grid), (count, n, 3)))
    given = positions[..., 0] < given_frames
    noise = jax.random.normal(jax.random.key(1), x0.shape)
    xt = jnp.where(given[..., None], x0, (1.0 - t) * x0 + t * noise)
    text, text_segments, text_positions = sampler.caption_inputs(captions)
    inputs = PackedInputs(xt, positions, jnp.ones((count, n), jnp.int32), jnp.full((count, 1), t), text,
                          text_segments, text_positions, jnp.zeros((count, 1), bool), None,
                          given=given if given_frames else None)
    estimate = jnp.where(given[..., None], x0, xt - t * predict_velocity(model, inputs, sampler.config.flow))
    return np.stack([to_uint8(np.asarray(patching.unpatchify(e, grid, sampler.patch, 3))) for e in estimate])


def probe(sampler: Sampler, model, clips, given_frames: int, t: float) -> dict:
    """The table row for one (given frames, t); see the module docstring."""
    captions = [p.caption for p in clips]
    swapped = [" ".join(SWAP.get(w, w) for w in c.split()) for c in captions]
    true_videos = x0_estimate(sampler, model, clips, captions, given_frames, t)
    swapped_videos = x0_estimate(sampler, model, clips, swapped, given_frames, t)
    a = max(given_frames - 1, 0)  # the reference frame: the last given one (frame 0 when none is)
    errors, copies, right_way, drifts = [], [], [], []
    for p, video, other in zip(clips, true_videos, swapped_videos):
        truth = trajectory(p)[:, 0]
        x, x_swapped = centroids_x(video), centroids_x(other)
        span = slice(a + 1, a + 4)
        errors.append(np.nanmean(np.abs(x[span] - truth[span])))
        copies.append(np.mean(np.abs(truth[span] - truth[a])))
        way = np.sign(truth[a + 3] - truth[a])
        right_way.append(np.sign(x[a + 3] - x[a]) == way)
        drifts.append(way * ((x[a + 3] - x[a]) - (x_swapped[a + 3] - x_swapped[a])))
    return dict(given_frames=given_frames, t=t, centroid_err=float(np.nanmean(errors)),
                copy_err=float(np.mean(copies)) if given_frames else None,
                direction=float(np.mean(right_way)), word_drift=float(np.nanmean(drifts)))


def main(argv):
    del argv
    sampler = Sampler.from_workdir(FLAGS.workdir)
    if sampler.autoencoder.channels != 3 or tuple(sampler.patch[:1]) != (1,):
        raise SystemExit("motion_probe reads pixel-space models with temporal patch 1 (configs/tiny.py).")
    model = nnx.merge(sampler.graphdef, sampler.params)
    clips = held_out_clips(FLAGS.clips)
    rows = [probe(sampler, model, clips, g, t) for g in (0, 1, 4) for t in (0.8, 0.9, 0.97)]
    print(f"{'given':>5} {'t':>5} {'centroid_err':>12} {'copy_err':>8} {'direction':>9} {'word_drift':>10}")
    for r in rows:
        copy = "-" if r["copy_err"] is None else f"{r['copy_err']:.2f}"
        print(f"{r['given_frames']:>5} {r['t']:>5} {r['centroid_err']:>12.2f} {copy:>8} {r['direction']:>9.2f} "
              f"{r['word_drift']:>+10.2f}")
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(dict(workdir=FLAGS.workdir, step=sampler.checkpoint_step, clips=FLAGS.clips, rows=rows), f,
                      indent=1)


if __name__ == "__main__":
    app.run(main)
