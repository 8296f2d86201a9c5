"""ODE solvers for the flow dx/dt = v(x, t), integrated from t = 1 (noise) to t = 0 (data), with CFG."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sora_jax.diffusion.flow import shift_t


def timesteps(steps: int, shift: float) -> np.ndarray:
    """steps + 1 decreasing times from 1 to 0, uniformly spaced then shifted like training."""
    t = np.linspace(1.0, 0.0, steps + 1, dtype=np.float32)
    return np.asarray(shift_t(jnp.asarray(t), jnp.float32(shift)))


def guided_velocity(velocity_fn: Callable, x, t, guidance: float):
    """Classifier-free guidance: v_u + g (v_c - v_u); `velocity_fn(x, t, drop_text)`."""
    if guidance == 1.0:
        return velocity_fn(x, t, False)
    v_cond, v_uncond = velocity_fn(x, t, False), velocity_fn(x, t, True)
    return v_uncond + guidance * (v_cond - v_uncond)


def euler_sample(step_fn: Callable, x: jax.Array, ts: np.ndarray, progress=None) -> jax.Array:
    """Euler integration; `step_fn(x, t, dt)` returns the next x (one jitted call per step)."""
    for i in range(len(ts) - 1):
        x = step_fn(x, jnp.float32(ts[i]), jnp.float32(ts[i + 1] - ts[i]))
        if progress is not None:
            progress.update(1)
    return x
