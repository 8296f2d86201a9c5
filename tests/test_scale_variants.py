"""Context parallelism, remat and scan-over-layers give the plain step's loss and gradients (8 CPU devices)."""
import math

import jax
import numpy as np
import pytest
from flax import nnx

from data_pipelines import pipeline
from sora_jax import sharding
from sora_jax.tasks import build_task
from sora_jax.train.state import state_spec
from tests.conftest import smoke_config


def _random_params(config):
    """Plain-layout parameters with every weight non-zero (adaLN-Zero gates too), so every path has gradient."""
    model = build_task(config).build_model(nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda p: np.asarray(p) + 0.05 * rng.normal(size=p.shape).astype(np.float32), params)


def _stack_blocks(params):
    """Plain layout (blocks/0, blocks/1, ...) -> scanned layout (one stacked blocks tree)."""
    out = dict(params)
    blocks = [params["blocks"][i] for i in sorted(params["blocks"])]
    out["blocks"] = jax.tree.map(lambda *xs: np.stack(xs), *blocks)
    return out


def _loss_and_grads(config, mesh_cfg, params, batch):
    config.mesh.update(mesh_cfg)
    devices = jax.devices()[:math.prod(mesh_cfg.values())]
    mesh = sharding.make_mesh(config.mesh, devices)
    task = build_task(config)
    with sharding.use_mesh(mesh, sharding.rules_from_config(config)):
        spec = state_spec(config, mesh, task)
        params = jax.device_put(params, spec.param_shardings)
        global_batch = sharding.host_to_global(batch, mesh)

        def loss(p):
            return task.loss(nnx.merge(spec.graphdef, p), {}, global_batch, jax.random.key(3), 0)[0]

        value, grads = jax.jit(jax.value_and_grad(loss))(params)
    return float(value), jax.device_get(grads)


@pytest.fixture(scope="module")
def reference():
    config = smoke_config(**{"model.attention": "xla", "param_sharding_tolerance": -1.0})
    batch = dict(next(iter(pipeline.packed_dataset(config))))
    params = _random_params(config)
    value, grads = _loss_and_grads(config, dict(data=1, fsdp=1, tensor=1, context=1), params, batch)
    return batch, params, value, grads


VARIANTS = {
    "context4_blockwise": ({"model.attention": "blockwise", "model.attention_block": 16},
                           dict(data=2, fsdp=1, tensor=1, context=4)),
    "fsdp_tensor_context_xla": ({"model.attention": "xla"}, dict(data=1, fsdp=2, tensor=2, context=2)),
    "remat_full": ({"model.remat": "full", "model.attention": "blockwise", "model.attention_block": 32},
                   dict(data=2, fsdp=2, tensor=2, context=1)),
    "remat_save_dots": ({"model.remat": "save_dots"}, dict(data=2, fsdp=2, tensor=2, context=1)),
    "scan_remat_context": ({"model.scan_layers": True, "model.remat": "full", "model.attention": "blockwise",
                            "model.attention_block": 32}, dict(data=2, fsdp=2, tensor=1, context=2)),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_matches_plain_step(name, reference):
    batch, params, ref_value, ref_grads = reference
    overrides, mesh_cfg = VARIANTS[name]
    config = smoke_config(**overrides, param_sharding_tolerance=-1.0)
    scanned = config.model.scan_layers
    value, grads = _loss_and_grads(config, mesh_cfg, _stack_blocks(params) if scanned else params, batch)
    if scanned:
        ref_grads = _stack_blocks(ref_grads)
    assert value == pytest.approx(ref_value, rel=1e-5)
    flat_ref = jax.tree_util.tree_flatten_with_path(ref_grads)[0]
    flat = dict(jax.tree_util.tree_flatten_with_path(grads)[0])
    assert len(flat) == len(flat_ref)
    for path, ref in flat_ref:
        got = flat[path]
        scale = float(np.abs(ref).max()) + 1e-12
        assert scale > 1e-8, f"{jax.tree_util.keystr(path)} has no gradient: the test would prove nothing"
        np.testing.assert_allclose(got, ref, rtol=0, atol=2e-4 * scale, err_msg=jax.tree_util.keystr(path))


def test_bfloat16_first_moment_and_float32_master_weights():
    """optim.mu_dtype=bfloat16 halves Adam's first moment; params, EMA and the second moment stay float32."""
    config = smoke_config(**{"optim.mu_dtype": "bfloat16", "model.dtype": "bfloat16", "param_sharding_tolerance": -1.0})
    mesh = sharding.make_mesh(dict(data=-1), jax.devices()[:1])
    with sharding.use_mesh(mesh):
        spec = state_spec(config, mesh)
    adam = spec.abstract["opt_state"][1][0]  # chain(clip, adamw) -> adamw's ScaleByAdamState
    assert {x.dtype for x in jax.tree.leaves(adam.mu)} == {np.dtype("bfloat16")}
    assert {x.dtype for x in jax.tree.leaves(adam.nu)} == {np.dtype("float32")}
    assert {x.dtype for x in jax.tree.leaves(spec.abstract["params"])} == {np.dtype("float32")}
    assert {x.dtype for x in jax.tree.leaves(spec.abstract["ema"])} == {np.dtype("float32")}
