"""Parameter sharding from the config's logical-axis rules, and the optimizer's learning-rate schedule.

Packed isolation lives in test_packed_isolation.py, the 1-device vs mesh train step in test_mesh_equivalence.py.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax import sharding
from sora_jax.train.state import make_optimizer, state_spec
from tests.conftest import smoke_config


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


def _rates(warmup_steps, schedule, total_steps=8):
    """The step each update takes on a scalar with gradient 1: Adam's first moves are the learning rate."""
    optim = smoke_config(**{"optim.lr": 0.1, "optim.warmup_steps": warmup_steps, "optim.schedule": schedule,
                            "optim.weight_decay": 0.0, "optim.grad_clip": 0.0}).optim
    tx = make_optimizer(optim, total_steps)
    param, opt_state, rates = jnp.zeros(()), tx.init(jnp.zeros(())), []
    for _ in range(total_steps):
        update, opt_state = tx.update(jnp.ones(()), opt_state, param)
        rates.append(-float(update))
    return np.asarray(rates)


def test_warmup_starts_at_the_first_update():
    """Update k uses lr * min((k + 1) / warmup, 1): no update is wasted at rate 0, warm-up 0 is the full rate."""
    np.testing.assert_allclose(_rates(4, "constant"), [0.025, 0.05, 0.075, 0.1, 0.1, 0.1, 0.1, 0.1], rtol=1e-5)
    np.testing.assert_allclose(_rates(0, "constant"), [0.1] * 8, rtol=1e-5)
    cosine = _rates(2, "cosine")
    np.testing.assert_allclose(cosine[:3], [0.05, 0.1, 0.1], rtol=1e-5)  # the peak at update warmup_steps
    assert np.all(np.diff(cosine[2:]) < 0) and cosine[-1] > 0  # then decays, the last update included
    assert _rates(0, "cosine")[0] == pytest.approx(0.1, rel=1e-5)
    with pytest.raises(ValueError, match="config.optim.schedule='linear'"):
        make_optimizer(smoke_config(**{"optim.schedule": "linear"}).optim, 8)


def test_output_head_rank():
    """model.head="mlp" lets a model narrower than its patches draw any patch; a linear head cannot.

    The smoke DiT is 32 wide and its pixel patches 8*8*3 = 192: whatever the inputs, a linear head's outputs lie
    in an affine subspace of at most 32 dimensions. An MLP head (32 -> 128 -> 192) spans far more.
    """
    from sora_jax import patching
    from sora_jax.models.dit import PackedInputs
    from tests.conftest import randomised_model
    n, rng = 256, np.random.default_rng(0)
    inputs = PackedInputs(
        tokens=jnp.asarray(rng.normal(size=(1, n, 192)), jnp.float32),
        positions=jnp.asarray(patching.positions((4, 8, 8))[None]), segments=jnp.ones((1, n), jnp.int32),
        t=jnp.full((1, 1), 0.5), text=jnp.asarray([[3, 4, 5, 6]]), text_segments=jnp.ones((1, 4), jnp.int32),
        text_positions=jnp.arange(4)[None], drop_text=jnp.zeros((1, 1), bool))
    ranks = {}
    for head in ("linear", "mlp"):
        out = np.asarray(randomised_model(smoke_config(**{"model.head": head}))(inputs))[0]
        ranks[head] = np.linalg.matrix_rank(out - out.mean(0), tol=1e-4 * np.abs(out).max())
    hidden = smoke_config().model.hidden
    # The setup is not degenerate: the linear head spans all it can (hidden - 1: the LayerNorm before it removes
    # each token's mean, a direction the head never sees).
    assert ranks["linear"] == hidden - 1, ranks
    assert ranks["mlp"] > 3 * hidden, f"an MLP head of width {4 * hidden} spans only {ranks['mlp']} of 192: {ranks}"


def test_unknown_head_is_refused():
    from sora_jax.models.dit import model_options
    with pytest.raises(ValueError, match="config.model.head"):
        model_options(smoke_config(**{"model.head": "conv"}).model)
