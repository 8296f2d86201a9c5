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


SOLVERS = ("euler", "heun", "unipc", "stochastic")


def stochastic_step(x: jax.Array, v: jax.Array, t: float, t_next: float, z: jax.Array) -> jax.Array:
    """One step of the stochastic (ancestral) flow sampler: the x_0 estimate x - t v, noised afresh to t_next
    with z, i.e. (1 - t_next) x_0 + t_next z -- diffusers' FlowMatchEulerDiscreteScheduler(stochastic_sampling=True).

    Unlike Euler, which carries the model's noise estimate forward, every step redraws the noise, so errors of
    the blurry early x_0 estimates are not baked into the trajectory.
    """
    return (1.0 - t_next) * (x - t * v) + t_next * z


def integrate(solver: str, velocity_fn: Callable, x: jax.Array, ts: np.ndarray, progress=None,
              given: tuple[jax.Array, jax.Array] | None = None, key: jax.Array | None = None,
              columns: jax.Array | None = None, fresh_noise: Callable[[int], jax.Array] | None = None) -> jax.Array:
    """Integrates dx/dt = velocity_fn(x, t) over the decreasing times ts (the last 0) with one of SOLVERS.

    euler: first order, one velocity per step. heun: second order (Euler, then the trapezoid with the velocity
    at the Euler point; the last step to t = 0 stays Euler, as diffusers' Heun does), two per step. unipc:
    UniPC-bh2 multistep (unipc_sample), one per step. stochastic: stochastic_step, one per step, its fresh
    noise drawn from `key` (None: jax.random.key(0)), so a key gives the same result every time.
    given: (mask [.., 1] bool, clean values): entries held at their clean values throughout. Euler and Heun reset
      them after every update; for UniPC their velocity is the one whose x_0 estimate is the clean value, which
      its data-prediction update keeps exactly, and the result is reset once more.
    columns: several schedules at once (packed samples of different sizes, each shifted for its own token
      count): ts is then [steps + 1, K], columns [..] int maps each entry of x but the last axis to its
      schedule, and velocity_fn receives the K times of a step as an array. Every entry is updated exactly as
      its own schedule alone would update it.
    fresh_noise: i -> the stochastic solver's noise of step i (shaped like x), instead of drawing it from `key`
      (packed samples each draw theirs from their own seed).
    """
    ts = np.asarray(ts, np.float32)
    at, per_entry = _schedule_access(ts, columns)
    keep = (lambda x: x) if given is None else (lambda x: jnp.where(given[0], given[1], x))  # noqa: E731
    x = keep(x)
    if solver == "unipc":
        def velocity(x, i):
            v = velocity_fn(x, at(i))
            return v if given is None else jnp.where(given[0], (x - given[1]) / per_entry(ts[i]), v)
        return keep(unipc_sample(velocity, x, ts, progress=progress, per_entry=per_entry if ts.ndim == 2 else None))
    if solver not in SOLVERS:
        raise ValueError(f"solver {solver!r}; choose one of {SOLVERS}.")
    if fresh_noise is None:
        key = jax.random.key(0) if key is None else key
        fresh_noise = lambda i: jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)  # noqa: E731
    for i in range(len(ts) - 1):
        t, dt = per_entry(ts[i]), per_entry(ts[i + 1] - ts[i])
        v = velocity_fn(x, at(i))
        if solver == "stochastic":
            euler = keep(stochastic_step(x, v, t, per_entry(ts[i + 1]), fresh_noise(i)))
        else:
            euler = keep(x + dt * v)
        if solver == "heun" and np.all(ts[i + 1] > 0):
            euler = keep(x + dt * 0.5 * (v + velocity_fn(euler, at(i + 1))))
        x = euler
        if progress is not None:
            progress.update(1)
    return x


def _schedule_access(ts: np.ndarray, columns: jax.Array | None):
    """(step i -> what velocity_fn receives, schedule values -> factors that broadcast against x) for one
    schedule [steps + 1] (python floats, as before) or several [steps + 1, K] gathered per entry by columns."""
    if ts.ndim == 1:
        return (lambda i: float(ts[i])), (lambda a: float(a))
    if columns is None or ts.ndim != 2:
        raise ValueError(f"several schedules need ts [steps + 1, K] and columns; got ts {ts.shape}, "
                         f"columns {None if columns is None else columns.shape}.")
    cols = jnp.asarray(columns)
    return (lambda i: ts[i]), (lambda a: jnp.asarray(np.asarray(a, np.float32))[cols][..., None])


def _log_snr(sigma: np.ndarray) -> np.ndarray:
    """float32 log((1 - s) / s) of the flow path x_s = (1 - s) x_0 + s eps; +inf at s = 0 (the data)."""
    sigma = np.asarray(sigma, np.float32)
    with np.errstate(divide="ignore"):
        return (np.log(np.float32(1.0) - sigma) - np.log(sigma)).astype(np.float32)


def _unipc_coefficients(lam: np.ndarray, s0: int, t: int, history: list[int], corrector: bool):
    """Scalars of one UniPC-bh2 update from sigma index s0 to t in x_0-prediction form (Zhao et al. 2023).

    Args:
      lam: float32 log-SNR per sigma index.
      history: the indices of the older x_0 estimates used, newest first (order - 1 of them).
      corrector: the corrector's weights (history plus the new estimate) rather than the predictor's.

    Returns:
      (h_phi_1, B_h, rks, rhos): float32; rks the relative log-SNR steps of `history`; rhos the weights of
      their divided differences (the corrector's last one weighs the new estimate).
    """
    one = np.float32(1.0)
    h = lam[t] - lam[s0]  # a scalar, or [K] for K schedules at once
    rks = np.array([(lam[k] - lam[s0]) / h for k in history] + [np.ones_like(h)], np.float32)
    hh = -h  # x_0-prediction integrates in -h
    with np.errstate(divide="ignore", invalid="ignore"):
        h_phi_1 = np.expm1(hh)
        h_phi_k = h_phi_1 / hh - one
        b_h = np.expm1(hh)  # bh2's B(h); bh1's, h, is infinite at sigma 0 and makes the last step NaN
        order, factorial, rows, b = len(rks), 1, [], []
        for i in range(1, order + 1):
            rows.append(rks ** (i - 1))
            b.append(h_phi_k * factorial / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - one / np.float32(factorial)
    r, b = np.stack(rows).astype(np.float32), np.asarray(b, np.float32)
    half = np.full((1,) + np.shape(h), 0.5, np.float32)
    if corrector:
        rhos = half if order == 1 else _solve(r, b)
    elif order == 1:
        rhos = np.zeros((0,) + np.shape(h), np.float32)
    else:  # second order has a closed form; higher orders solve the order conditions without the new point
        rhos = half if order == 2 else _solve(r[:-1, :-1], b[:-1])
    return h_phi_1, b_h, rks[:-1], rhos


def _solve(r: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float32 solution of r x = b: r [n, n], b [n]; or one system per schedule, r [n, n, K], b [n, K]."""
    if r.ndim == 2:
        return np.linalg.solve(r, b).astype(np.float32)
    return np.linalg.solve(np.moveaxis(r, -1, 0), np.moveaxis(b, -1, 0)[..., None])[..., 0].T.astype(np.float32)


def _unipc_update(x, m0, older, new, sigmas, lam, s0, t, history, per_entry):
    """x at sigma index t from x at s0: the predictor when `new` is None, else the corrector."""
    h_phi_1, b_h, rks, rhos = _unipc_coefficients(lam, s0, t, history, new is not None)
    alpha_t = np.float32(1.0) - sigmas[t]
    out = per_entry(sigmas[t] / sigmas[s0]) * x - per_entry(alpha_t * h_phi_1) * m0
    residual = sum((per_entry(rho) * ((m - m0) / per_entry(rk)) for rho, m, rk in zip(rhos, older, rks)),
                   jnp.zeros_like(x))
    if new is not None:
        residual = residual + per_entry(rhos[-1]) * (new - m0)
    return out - per_entry(alpha_t * b_h) * residual


def unipc_sample(velocity_fn: Callable, x: jax.Array, sigmas: np.ndarray, order: int = 2,
                 disable_corrector: tuple[int, ...] = (), progress=None, per_entry=None) -> jax.Array:
    """UniPC-bh2 multistep predictor-corrector on the flow x_s = (1 - s) x_0 + s eps, from sigmas[0] to 0.

    The model's velocity is read as an x_0 estimate (x - s v), and the solver runs in log-SNR with the
    lower orders at the start (too little history) and at the last step (sigma 0 has infinite log-SNR):
    the behaviour of diffusers' UniPCMultistepScheduler with use_flow_sigmas, predict_x0, lower_order_final
    and final_sigmas_type "zero", which the released Wan 2.1 checkpoints use.

    Args:
      velocity_fn: (x, i) -> the velocity at noise level sigmas[i] (i indexes the schedule, so a caller
        can give the network its own timestep for that level).
      x: the initial noise at sigmas[0].
      sigmas: float32 [steps + 1] decreasing noise levels, the last 0.
      order: solver order (history length); 2 is UniPC's and Wan's default.
      disable_corrector: step indices whose result is not corrected at the next step.
      per_entry: with sigmas [steps + 1, K] (K schedules at once), maps a [K] coefficient to factors that
        broadcast against x (see integrate's `columns`); None for one schedule.
    """
    per_entry = per_entry or (lambda a: a)
    sigmas = np.asarray(sigmas, np.float32)
    lam, steps = _log_snr(sigmas), len(sigmas) - 1
    estimates, last_x, last_order = [], None, 0  # x_0 estimates, newest last
    for i in range(steps):
        m = x - per_entry(sigmas[i]) * velocity_fn(x, i)  # from x before its correction, as in the reference
        if i > 0 and i - 1 not in disable_corrector:
            older = estimates[-2::-1][:last_order - 1]
            x = _unipc_update(last_x, estimates[-1], older, m, sigmas, lam, i - 1, i,
                              [i - 2 - k for k in range(len(older))], per_entry)
        estimates = (estimates + [m])[-order:]
        this_order = min(order, steps - i, len(estimates))
        last_x, last_order = x, this_order
        older = estimates[-2::-1][:this_order - 1]
        x = _unipc_update(x, m, older, None, sigmas, lam, i, i + 1, [i - 1 - k for k in range(len(older))],
                          per_entry)
        if progress is not None:
            progress.update(1)
    return x
