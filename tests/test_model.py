"""Packed attention isolation and mesh equivalence of the train step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines import pipeline
from sora_jax import sharding
from sora_jax.models.dit import PackedInputs
from sora_jax.train.state import init_state, state_spec
from sora_jax.train.step import make_train_step
from tests.conftest import randomised_model, smoke_config


def _inputs(batch, t):
    return PackedInputs(jnp.asarray(batch["video"]), jnp.asarray(batch["video_pos"]), jnp.asarray(batch["video_seg"]),
                        jnp.asarray(t), jnp.asarray(batch["text"]), jnp.asarray(batch["text_seg"]),
                        jnp.asarray(batch["text_pos"]), jnp.zeros(t.shape, bool))


def test_packed_attention_never_crosses_samples():
    config = smoke_config()
    batch = dict(next(iter(pipeline.packed_dataset(config))))
    row = int(np.argmax((batch["info"][..., 3] > 0).sum(-1)))
    assert (batch["info"][row, :, 3] > 0).sum() >= 2, "need a row with several samples"
    model = randomised_model(config)
    t = np.linspace(0.1, 0.9, batch["info"].shape[1], dtype=np.float32)[None].repeat(len(batch["video"]), 0)
    before = np.asarray(model(_inputs(batch, t)))

    changed = {k: v.copy() for k, v in batch.items()}
    target = changed["video_seg"][row] == 1
    changed["video"][row][target] = np.random.default_rng(0).normal(size=changed["video"][row][target].shape)
    changed["text"][row][changed["text_seg"][row] == 1] = 3  # a different caption for sample 1
    t2 = t.copy()
    t2[row, 0] = 0.77  # and a different timestep
    after = np.asarray(model(_inputs(changed, t2)))

    others = (batch["video_seg"][row] > 1)
    np.testing.assert_allclose(after[row][others], before[row][others], rtol=0, atol=1e-6)
    assert np.abs(after[row][target] - before[row][target]).max() > 1e-3  # the changed sample did change
    rest = np.arange(len(batch["video"])) != row
    np.testing.assert_allclose(after[rest], before[rest], rtol=0, atol=1e-6)


def _one_step(config, devices, mesh_cfg):
    config.mesh.update(mesh_cfg)
    batch = next(iter(pipeline.packed_dataset(config)))
    mesh = sharding.make_mesh(config.mesh, devices)
    with sharding.use_mesh(mesh):
        spec = state_spec(config, mesh)
        state = init_state(config, spec)
        step = make_train_step(config, spec, batch)
        state, metrics = step(state, sharding.host_to_global(batch, mesh), {})
        state, metrics2 = step(state, sharding.host_to_global(batch, mesh), {})
    return float(metrics["loss"]), float(metrics2["loss"]), jax.device_get(state["params"]), state


def test_train_step_matches_between_one_device_and_sharded_mesh():
    assert len(jax.devices()) == 8
    loss1, loss1b, params1, _ = _one_step(smoke_config(), jax.devices()[:1], dict(data=1, fsdp=1, tensor=1))
    loss8, loss8b, params8, state8 = _one_step(smoke_config(), jax.devices(), dict(data=2, fsdp=2, tensor=2))
    # The mesh really shards parameters over fsdp and tensor.
    kernel = state8["params"]["blocks"][0]["mlp"]["fc1"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape == (kernel.shape[0] // 2, kernel.shape[1] // 2)
    # Same batch and init: the losses agree to float32 reduction-order noise (stated tolerance 1e-5 rel).
    assert loss1 == pytest.approx(loss8, rel=1e-5)
    assert loss1b == pytest.approx(loss8b, rel=1e-5)
    for a, b in zip(jax.tree.leaves(params1), jax.tree.leaves(params8)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_config_rules_decide_parameter_sharding():
    # These rules leave every "embed"-only parameter whole on purpose: no sufficiently-sharded check here.
    config = smoke_config(**{"logical_axis_rules": [["batch", ["data"]], ["embed", None], ["mlp", "fsdp"]],
                             "param_sharding_tolerance": -1.0})
    mesh = sharding.make_mesh(dict(data=2, fsdp=4, tensor=1))
    with sharding.use_mesh(mesh, sharding.rules_from_config(config)):
        spec = state_spec(config, mesh)
        fc1 = spec.param_shardings["blocks"][0]["mlp"]["fc1"]["kernel"]
        assert fc1.spec == jax.sharding.PartitionSpec(None, "fsdp")
        assert sharding.batch_sharding(mesh).spec == jax.sharding.PartitionSpec("data")
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sharding.rules_from_config(smoke_config(**{"logical_axis_rules": [["embed", "model"]]}))
