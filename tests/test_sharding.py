"""Logical-axis rules, activation constraints and the sufficiently-sharded check (8 simulated devices)."""
import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from sora_jax import sharding
from sora_jax.train.state import state_spec
from tests.conftest import smoke_config

# What the hand-written mapping this module used before flax's produced; the refactor must not change it.
DEFAULT_EXPECTED = [
    (("embed", "mlp"), P("fsdp", "tensor")),
    (("mlp", "embed"), P("tensor", "fsdp")),
    (("embed", "heads"), P("fsdp", "tensor")),
    (("heads", "embed"), P("tensor", "fsdp")),
    ((None, "embed"), P(None, "fsdp")),
    (("patch", "embed"), P(None, "fsdp")),
    (("vocab", "embed"), P(None, "fsdp")),
    (("mlp",), P("tensor")),
    (("embed",), P("fsdp")),
    ((None, None, None, "conv_in", "conv_out"), P(None, None, None, None, "fsdp")),
    (("layers", "embed", "mlp"), P(None, "fsdp", "tensor")),  # a name without a rule stays whole
    (("batch", "length", "act_embed"), P(("data", "fsdp"), "context", None)),
    (("batch", "length", "act_heads", None), P(("data", "fsdp"), "context", "tensor", None)),
    (None, P()),
]

CUSTOM_RULES = (("batch", ("data", "fsdp")), ("length", "context"), ("embed", "fsdp"), ("mlp", "tensor"),
                ("heads", "tensor"), ("kv", None))
CUSTOM_EXPECTED = [
    (("batch", "length", "embed"), P(("data", "fsdp"), "context", None)),  # fsdp is taken by the batch
    (("batch", "embed", "mlp"), P(("data", "fsdp"), None, "tensor")),
    (("mlp", "heads"), P("tensor", None)),  # tensor shards one dimension only
    (("heads", "kv"), P("tensor", None)),
    (("kv", "embed"), P(None, "fsdp")),
]


@pytest.mark.parametrize("rules,expected", [(sharding.DEFAULT_RULES, DEFAULT_EXPECTED),
                                            (CUSTOM_RULES, CUSTOM_EXPECTED)], ids=["default", "custom"])
def test_rules_map_logical_names_as_before(rules, expected):
    for logical, spec in expected:
        assert sharding.logical_to_spec(logical, rules) == spec, logical


def test_rules_are_in_priority_order_with_fallbacks():
    # flax's semantics: the earlier rule wins a contested mesh axis; a later rule for a name is a fallback.
    assert sharding.logical_to_spec(("mlp", "embed"), (("embed", "fsdp"), ("mlp", "fsdp"))) == P(None, "fsdp")
    fallback = (("embed", "fsdp"), ("mlp", "fsdp"), ("mlp", "tensor"))
    assert sharding.logical_to_spec(("mlp", "embed"), fallback) == P("tensor", "fsdp")


def test_use_mesh_activates_flax_rules_and_the_mesh():
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
    assert sharding.current_mesh() is None and sharding.current_rules() == sharding.DEFAULT_RULES
    with sharding.use_mesh(mesh, CUSTOM_RULES):
        assert sharding.current_mesh() is mesh
        assert sharding.current_rules() == CUSTOM_RULES
        assert tuple(nn.get_logical_axis_rules()) == CUSTOM_RULES  # flax's own context holds them
        inner = sharding.make_mesh(dict(data=8), jax.devices())
        with sharding.use_mesh(inner):
            assert sharding.current_mesh() is inner and sharding.current_rules() == sharding.DEFAULT_RULES
        assert sharding.current_mesh() is mesh and sharding.current_rules() == CUSTOM_RULES
        assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"))
    assert sharding.current_mesh() is None and not nn.get_logical_axis_rules()


def test_param_shardings_replicate_what_the_mesh_does_not_divide():
    mesh = sharding.make_mesh(dict(data=1, fsdp=4, tensor=2))
    logical = {"w": ("embed", "mlp"), "odd": ("embed", "mlp"), "free": None}
    shapes = {"w": jax.ShapeDtypeStruct((64, 32), jnp.float32), "odd": jax.ShapeDtypeStruct((6, 32), jnp.float32),
              "free": jax.ShapeDtypeStruct((5,), jnp.float32)}
    got = sharding.param_shardings(logical, shapes, mesh, sharding.DEFAULT_RULES)
    assert got["w"].spec == P("fsdp", "tensor")
    assert got["odd"].spec == P(None, "tensor")  # 6 rows do not split over fsdp=4
    assert got["free"].is_fully_replicated


def _constrained_shard_shape(x, logical):
    # A fresh function per call: jit caches traces regardless of the active use_mesh.
    return jax.jit(lambda a: sharding.constrain(a * 2.0, logical))(x)


def test_constrain_shards_inside_use_mesh_under_jit():
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
    x = jnp.ones((8, 4, 6))
    with sharding.use_mesh(mesh):
        y = _constrained_shard_shape(x, ("batch", "length", "act_heads"))
        assert y.sharding.shard_shape(y.shape) == (2, 4, 3)  # batch over data x fsdp, heads over tensor
        assert len(y.sharding.device_set) == 8
        # A dimension the mesh does not divide is left whole instead of failing or padding.
        z = _constrained_shard_shape(jnp.ones((8, 4, 3)), ("batch", "length", "act_heads"))
        assert z.sharding.shard_shape(z.shape) == (2, 4, 3)
    with sharding.use_mesh(mesh, (("batch", "tensor"),)):
        y = _constrained_shard_shape(x, ("batch", "length", "act_heads"))
        assert y.sharding.shard_shape(y.shape) == (4, 4, 6)  # the active rules decide


def test_constrain_is_a_no_op_outside_use_mesh():
    x = jnp.ones((8, 4, 6))
    assert sharding.constrain(x, ("batch", "length", "act_heads")) is x
    text = jax.jit(lambda a: sharding.constrain(a * 2.0, ("batch", "length", "act_heads"))).lower(x).as_text()
    assert "sharding_constraint" not in text and "Sharding" not in text


def test_report_counts_bytes_exactly():
    mesh = sharding.make_mesh(dict(data=1, fsdp=4, tensor=2))
    logical = {"w": ("embed", "mlp"), "b": ("mlp",)}
    shapes = {"w": jax.ShapeDtypeStruct((64, 32), jnp.float32), "b": jax.ShapeDtypeStruct((32,), jnp.float32)}
    report = sharding.param_report(logical, shapes, mesh, sharding.DEFAULT_RULES)
    assert report.shard_axes == ("fsdp", "tensor") and report.shard_factor == 8
    assert report.total_bytes == (64 * 32 + 32) * 4
    assert report.per_device_bytes == 64 * 32 * 4 // 8 + 32 * 4 // 2  # the bias splits over tensor only
    assert report.replicated_share == pytest.approx(report.per_device_bytes / (report.total_bytes / 8) - 1)
    assert len(report.offenders) == 1 and report.offenders[0].startswith("b ") and "fsdp" in report.offenders[0]
    placed = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                          sharding.param_shardings(logical, shapes, mesh, sharding.DEFAULT_RULES))
    assert sharding.sharded_bytes(placed) == (report.total_bytes, report.per_device_bytes)


def _fsdp8_state_spec(**overrides):
    config = smoke_config(**overrides)
    config.mesh.update(data=1, fsdp=8, tensor=1)
    mesh = sharding.make_mesh(config.mesh)
    with sharding.use_mesh(mesh, sharding.rules_from_config(config)):
        return state_spec(config, mesh)


def test_state_spec_stops_on_parameters_the_mesh_cannot_split():
    with pytest.raises(sharding.InsufficientShardingError) as err:
        _fsdp8_state_spec(**{"model.hidden": 36, "param_sharding_tolerance": 0.02})
    message = str(err.value)
    assert "t_mlp1.kernel shape (256, 36)" in message  # the worst offender, with its shape ...
    assert "(None, 'embed')" in message  # ... its logical axes ...
    assert "dim 1 (36) is not divisible by fsdp=8" in message  # ... and why it is replicated
    assert "config.param_sharding_tolerance=0.02" in message and "config.mesh" in message


def test_state_spec_passes_a_well_divisible_config():
    spec = _fsdp8_state_spec(**{"model.hidden": 512, "param_sharding_tolerance": 0.02})
    kernel = spec.abstract["params"]["blocks"][0]["mlp"]["fc1"]["kernel"]
    assert kernel.sharding.spec == P("fsdp", "tensor")
    total, per_device = sharding.sharded_bytes(spec.abstract["params"])
    assert per_device <= 1.02 * total / 8


def test_negative_tolerance_disables_the_check():
    spec = _fsdp8_state_spec(**{"model.hidden": 36, "param_sharding_tolerance": -1.0})
    kernel = spec.abstract["params"]["t_mlp1"]["kernel"]
    assert kernel.sharding.shard_shape(kernel.shape) == kernel.shape  # replicated, as the check would say
