"""The sharded train step computes what one device computes: loss, every gradient, the gradient norm and
the parameters after a few steps agree between 1 device and the (data, fsdp, tensor) = (2, 2, 2) and
(1, 8, 1) meshes (8 simulated CPU devices).

The parameters start from one randomised tree (every weight perturbed, adaLN-Zero's zero-initialised
gates included), so every leaf has a gradient and the per-leaf comparison proves something for all of
them. The gradient check is the one that catches a gradient summed over shards instead of averaged:
Adam divides the scale away, so the parameters after a few steps barely notice it.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from data_pipelines import pipeline
from sora_jax import sharding
from sora_jax.train.state import state_spec
from sora_jax.train.step import make_train_step
from tests.conftest import randomised_model, smoke_config

STEPS = 3
MESHES = {  # name -> (number of devices, mesh sizes)
    "one_device": (1, dict(data=1, fsdp=1, tensor=1, context=1)),
    "data2_fsdp2_tensor2": (8, dict(data=2, fsdp=2, tensor=2, context=1)),
    "fsdp8": (8, dict(data=1, fsdp=8, tensor=1, context=1)),
}
GRAD_TOL = 1e-4  # of each leaf's largest gradient: float32 reduction order over shards
# Of each leaf's largest change over the STEPS updates: Adam normalises every element by its own gradient
# magnitude, so an element with a small gradient turns that gradient's rounding noise into a visible part
# of a full-size step (measured: up to 0.25% of the leaf's movement).
PARAM_TOL = 1e-2


def _config(mesh_cfg=None):
    # Warm-up 0: every update, the first included, runs at the full learning rate.
    config = smoke_config(**{"optim.warmup_steps": 0})
    if mesh_cfg:
        config.mesh.update(mesh_cfg)
    return config


@functools.lru_cache(maxsize=1)
def _inputs():
    """STEPS host batches and one randomised parameter tree (numpy), shared by every mesh."""
    config = _config()
    it = iter(pipeline.packed_dataset(config))
    batches = [dict(next(it)) for _ in range(STEPS)]
    params = nnx.to_pure_dict(nnx.state(randomised_model(config), nnx.Param))
    return batches, jax.tree.map(np.asarray, params)


def _state(spec, host_params):
    """The train state of `spec` holding `host_params` (what init_state makes, with these parameters)."""
    params = jax.device_put(host_params, spec.param_shardings)
    opt_state = jax.jit(spec.tx.init, out_shardings=spec.shardings["opt_state"])(params)
    state = {"step": np.zeros((), np.int32), "params": params, "opt_state": opt_state,
             "ema": jax.tree.map(jnp.copy, params), "lr_scale": np.ones((), np.float32)}
    return jax.device_put(state, spec.shardings)


def _run(name):
    """Loss, gradients and gradient norm of the first batch, then STEPS train steps, on mesh `name`."""
    num_devices, mesh_cfg = MESHES[name]
    config = _config(mesh_cfg)
    batches, host_params = _inputs()
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:num_devices])
    with sharding.use_mesh(mesh, sharding.rules_from_config(config)):
        spec = state_spec(config, mesh)
        state = _state(spec, host_params)
        globals_ = [sharding.host_to_global(b, mesh) for b in batches]
        # The train step's own loss at its own noise key (fold_in(seed, step 0)), gradients left sharded.
        key = jax.random.fold_in(jax.random.key(config.seed), 0)

        def loss(p, batch):
            return spec.task.loss(nnx.merge(spec.graphdef, p), {}, batch, key, 0)[0]

        batch_shardings = {k: sharding.batch_sharding(mesh) for k, _ in sharding.device_items(batches[0])}
        grad_fn = jax.jit(jax.value_and_grad(loss), in_shardings=(spec.param_shardings, batch_shardings),
                          out_shardings=(NamedSharding(mesh, P()), spec.param_shardings))
        value, grads = grad_fn(state["params"], globals_[0])
        kernel = grads["blocks"][0]["mlp"]["fc1"]["kernel"]
        step = make_train_step(config, spec, batches[0])
        metrics = []
        for batch in globals_:
            state, m = step(state, batch, {})
            metrics.append(jax.device_get(m))
    return dict(loss=float(value), grads=jax.device_get(grads), metrics=metrics, params=jax.device_get(state["params"]),
                kernel_spec=kernel.sharding.spec, kernel_shard=kernel.addressable_shards[0].data.shape)


@pytest.fixture(scope="module")
def reference():
    return _run("one_device")


def _flat(tree):
    return dict(jax.tree_util.tree_flatten_with_path(tree)[0])


@pytest.mark.parametrize("name", [n for n in MESHES if n != "one_device"])
def test_mesh_matches_one_device(name, reference):
    got = _run(name)
    _, mesh_cfg = MESHES[name]
    # The mesh really shards: the gradient of an MLP kernel lives split over fsdp (and tensor).
    fsdp, tensor = mesh_cfg["fsdp"], mesh_cfg["tensor"]
    shape = reference["grads"]["blocks"][0]["mlp"]["fc1"]["kernel"].shape
    assert got["kernel_shard"] == (shape[0] // fsdp, shape[1] // tensor), got["kernel_spec"]

    assert got["loss"] == pytest.approx(reference["loss"], rel=1e-5)
    ref_grads, grads = _flat(reference["grads"]), _flat(got["grads"])
    assert ref_grads.keys() == grads.keys()
    for path, ref in ref_grads.items():
        scale = float(np.abs(ref).max())
        assert scale > 1e-8, f"{jax.tree_util.keystr(path)} has no gradient: the test would prove nothing"
        np.testing.assert_allclose(grads[path], ref, rtol=0, atol=GRAD_TOL * scale,
                                   err_msg=f"{name}: gradient of {jax.tree_util.keystr(path)}")
    # The train step's first loss and gradient norm are those of the gradients above, on both sides.
    norm = float(np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in grads.values())))
    for run in (reference, got):
        assert float(run["metrics"][0]["loss"]) == pytest.approx(run["loss"], rel=1e-6)
    assert float(got["metrics"][0]["grad_norm"]) == pytest.approx(norm, rel=1e-5)
    for ref_m, m in zip(reference["metrics"], got["metrics"]):
        assert float(m["loss"]) == pytest.approx(float(ref_m["loss"]), rel=1e-5)
        assert float(m["grad_norm"]) == pytest.approx(float(ref_m["grad_norm"]), rel=1e-5)

    _, start = _inputs()
    ref_params, params, start = _flat(reference["params"]), _flat(got["params"]), _flat(start)
    for path, ref in ref_params.items():
        moved = float(np.abs(ref - start[path]).max())
        assert moved > 0, f"{jax.tree_util.keystr(path)} never moved in {STEPS} steps"
        np.testing.assert_allclose(params[path], ref, rtol=0, atol=PARAM_TOL * moved,
                                   err_msg=f"{name}: parameter {jax.tree_util.keystr(path)} after {STEPS} steps")
