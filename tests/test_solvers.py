"""The Sampler's ODE solvers (sora_jax.diffusion.solvers.integrate) step for step against diffusers' flow-matching
schedulers on a nonlinear toy velocity field (the stochastic one with diffusers' noise), given frames held, and
UniPC's own parity in test_wan_pipeline."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

from sora_jax.diffusion.solvers import SOLVERS, integrate, stochastic_step, timesteps

SCHEDULERS = {"euler": FlowMatchEulerDiscreteScheduler, "heun": FlowMatchHeunDiscreteScheduler}


def _field(x, t):
    return np.sin(x) * (1.0 + t) - 0.3 * x


@pytest.mark.parametrize("solver", sorted(SCHEDULERS))
def test_solver_matches_diffusers_scheduler(solver):
    scheduler = SCHEDULERS[solver](shift=3.0)
    scheduler.set_timesteps(6)
    sigmas = scheduler.sigmas.numpy()
    noise = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
    x = torch.from_numpy(noise)
    for t in scheduler.timesteps:  # diffusers' timesteps are sigma * 1000 (Heun visits each twice)
        x = scheduler.step(torch.from_numpy(_field(x.numpy(), float(t) / 1000).astype(np.float32)), t, x).prev_sample
    ours = integrate(solver, lambda x, t: jnp.sin(x) * (1.0 + t) - 0.3 * x, jnp.asarray(noise), sigmas)
    np.testing.assert_allclose(np.asarray(ours), x.numpy(), rtol=0, atol=2e-5)
    other = integrate("euler" if solver == "heun" else "heun", lambda x, t: jnp.sin(x) * (1.0 + t) - 0.3 * x,
                      jnp.asarray(noise), sigmas)
    assert np.abs(np.asarray(other) - x.numpy()).max() > 1e-3  # the two rules are far apart at 6 steps


def test_stochastic_solver_matches_diffusers_stochastic_sampling():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True)
    scheduler.set_timesteps(6)
    sigmas = scheduler.sigmas.numpy()
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32))
    ours = jnp.asarray(x.numpy())
    for i, t in enumerate(scheduler.timesteps):
        generator = torch.Generator().manual_seed(i)
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(i))  # the noise diffusers will draw
        v = _field(x.numpy(), float(t) / 1000).astype(np.float32)
        x = scheduler.step(torch.from_numpy(v), t, x, generator=generator).prev_sample
        ours = stochastic_step(ours, jnp.sin(ours) * (1.0 + sigmas[i]) - 0.3 * ours, float(sigmas[i]),
                               float(sigmas[i + 1]), jnp.asarray(z.numpy()))
        np.testing.assert_allclose(np.asarray(ours), x.numpy(), rtol=0, atol=2e-5)
    # integrate: deterministic in its key, fresh noise per step (a different key, a different result)
    field = lambda x, t: jnp.sin(x) * (1.0 + t) - 0.3 * x  # noqa: E731
    start = jnp.ones((4, 5))
    a, b = (np.asarray(integrate("stochastic", field, start, sigmas, key=jax.random.key(k))) for k in (3, 3))
    np.testing.assert_array_equal(a, b)
    c = np.asarray(integrate("stochastic", field, start, sigmas, key=jax.random.key(4)))
    assert np.abs(a - c).max() > 1e-3
    assert np.abs(a - np.asarray(integrate("euler", field, start, sigmas))).max() > 1e-3


@pytest.mark.parametrize("solver", SOLVERS)
def test_given_entries_stay_clean_under_every_solver(solver):
    rng = np.random.default_rng(1)
    noise, clean = (jnp.asarray(rng.normal(size=(2, 6, 3)).astype(np.float32)) for _ in range(2))
    mask = jnp.asarray(rng.random((2, 6, 1)) < 0.5)
    seen = []

    def velocity(x, t):
        seen.append(np.asarray(x))
        return jnp.tanh(x) + t
    ts = np.linspace(1.0, 0.0, 7, dtype=np.float32)
    out = np.asarray(integrate(solver, velocity, noise, ts, given=(mask, clean)))
    m = np.broadcast_to(np.asarray(mask), out.shape)
    np.testing.assert_array_equal(out[m], np.asarray(clean)[m])
    for x in seen:  # the model is shown the clean values at every evaluation
        np.testing.assert_allclose(x[m], np.asarray(clean)[m], rtol=0, atol=1e-5)
    assert not np.allclose(out[~m], np.asarray(clean)[~m])


@pytest.mark.parametrize("solver", SOLVERS)
def test_several_schedules_at_once_equal_each_alone(solver):
    """Packed samples of different sizes each follow their own shifted schedule (sora_jax/packed_sampling.py):
    every entry must come out as integrating its schedule alone would give it."""
    ts = np.stack([timesteps(6, shift) for shift in (1.0, 3.0, 6.0)], axis=1)  # [7, 3]
    columns = np.array([[0, 0, 1, 2, 2], [1, 2, 0, 0, 1]])
    rng = np.random.default_rng(2)
    start = jnp.asarray(rng.normal(size=(2, 5, 3)).astype(np.float32))
    z = jnp.asarray(rng.normal(size=(6, 2, 5, 3)).astype(np.float32))

    def together_field(x, t):
        assert np.shape(t) == (3,)  # the model sees each schedule's time
        return jnp.sin(x) * (1.0 + jnp.asarray(t)[columns][..., None]) - 0.3 * x
    together = np.asarray(integrate(solver, together_field, start, ts, columns=columns, fresh_noise=lambda i: z[i]))
    for k in range(3):
        alone = np.asarray(integrate(solver, lambda x, t: jnp.sin(x) * (1.0 + t) - 0.3 * x, start, ts[:, k],
                                     fresh_noise=lambda i: z[i]))
        mine = columns == k
        np.testing.assert_allclose(together[mine], alone[mine], rtol=0, atol=1e-5)
        if k:  # the schedules differ enough for a mix-up to show
            assert np.abs(together[~mine] - alone[~mine]).max() > 1e-3
