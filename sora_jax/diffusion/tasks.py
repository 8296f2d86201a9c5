"""Per-token conditioning tasks: which tokens of a training sample are given clean and which are generated.

One model learns every generation mode when training mixes these tasks (config.flow.tasks, name -> weight):

  t2v         nothing given: text to video (and images, which have one frame)
  i2v_first   the first frame given: animate an image
  i2v_any     one frame, anywhere, given: an image placed at frame K
  forward     the first m frames given, the rest generated: extend forwards
  backward    the last m frames given, the earlier ones generated: extend backwards
  first_last  the first and the last frame given: loops (both the same) and transitions (A's end, B's start)
  keyframes   every r-th frame from a random offset given (r in 2..4): interpolation between keyframes

Frames are latent frames (the token grid's t; with Wan's causal VAE latent frame 0 is pixel frame 0 alone).
A given token enters the model clean and is modulated as at t = 0 (PackedInputs.given); the loss is taken on
the generated tokens only. A sample of one frame is always t2v; every other task leaves at least one frame to
generate (first_last on a two-frame sample gives the first frame only). Draws are per sample, from the
step's key: a resumed run repeats them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sora_jax.layers.common import gather_segments

TASKS = ("t2v", "i2v_first", "i2v_any", "forward", "backward", "first_last", "keyframes")


def task_weights(flow_cfg) -> np.ndarray | None:
    """The config's task weights in TASKS order, normalised; None when training is text-to-video only.

    Raises:
      ValueError: an unknown task name, a negative weight, or weights that sum to zero.
    """
    tasks = dict(flow_cfg.get("tasks", None) or {"t2v": 1.0})
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"config.flow.tasks names {unknown}; the tasks are {list(TASKS)}.")
    weights = np.asarray([float(tasks.get(name, 0.0)) for name in TASKS])
    if np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError(f"config.flow.tasks={tasks}: weights must be >= 0 and not all zero.")
    if weights[1:].sum() == 0:
        return None
    return weights / weights.sum()


def given_tokens(key: jax.Array, weights: np.ndarray, frames: jax.Array, segments: jax.Array,
                 num_frames: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(given [B, L] bool, task index [B, S]) for packed tokens.

    Args:
      key: this step's key for the task draws.
      weights: task_weights(...) (TASKS order, summing to 1).
      frames: each token's latent frame [B, L] (video_pos[..., 0]).
      segments: [B, L] sample ids (0 = padding).
      num_frames: each sample's latent frame count [B, S] (info[..., 0]).
    """
    k_task, k_frame, k_count, k_stride, k_offset = jax.random.split(key, 5)
    shape = num_frames.shape
    nt = jnp.maximum(num_frames, 1)
    task = jax.random.categorical(k_task, jnp.log(jnp.asarray(weights, jnp.float32)), shape=shape)
    task = jnp.where(nt > 1, task, 0)  # an image: nothing to condition on
    # Two frames cannot have a first and a last given and one generated: the first alone is given then.
    task = jnp.where((task == TASKS.index("first_last")) & (nt < 3), TASKS.index("i2v_first"), task)
    any_frame = jax.random.randint(k_frame, shape, 0, nt)  # i2v_any's frame
    count = jax.random.randint(k_count, shape, 1, jnp.maximum(nt, 2))  # forward / backward: 1 .. nt - 1 given
    stride = jax.random.randint(k_stride, shape, 2, 5)
    offset = jax.random.randint(k_offset, shape, 0, jnp.minimum(stride, nt))  # a keyframe inside the clip
    per_token = lambda x: gather_segments(x, segments)  # noqa: E731
    f, n, c = frames, per_token(nt), per_token(count)
    kind = per_token(task)
    options = [
        jnp.zeros_like(f, bool),                                  # t2v
        f == 0,                                                   # i2v_first
        f == per_token(any_frame),                                # i2v_any
        f < c,                                                    # forward
        f >= n - c,                                               # backward
        (f == 0) | (f == n - 1),                                  # first_last
        (f - per_token(offset)) % per_token(stride) == 0,         # keyframes
    ]
    given = jnp.select([kind == i for i in range(len(TASKS))], options, False)
    return given & (segments > 0), task

