"""Meshes, logical-axis rules, activation constraints and the sufficiently-sharded check.

Model code names only *logical* axes ("embed", "heads", "batch", ...). The config's rules map them onto
the mesh axes defined here, so changing the parallelism of a run is a config edit, never a model edit.

The rules live in flax's own logical-axis-rules context and names become mesh axes through
`flax.linen.logical_to_mesh_axes`. What flax does not do is kept here, small: dimensions the mesh does
not divide are replicated (activations) or reported (`assert_params_sufficiently_sharded`, parameters),
and the active mesh is held for `constrain`, `current_mesh` and the batch shardings (see `use_mesh`).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import math
import os
from typing import Any, Sequence

import jax
import numpy as np
from flax import linen as nn, nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "context")

# Parameters: "embed" is split over fsdp (ZeRO-3 style), the wide dimensions over tensor.
# Activations: the batch over data x fsdp, the token axis over context.
# Rules are in priority order (flax's semantics): a rule applies whole when none of its mesh axes is taken
# yet by another dimension of the same array, and a later rule for the same logical name is a fallback.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", "context"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", None),
    ("patch", None),
    ("text_len", None),
    # Convolutions (VAE, discriminator): output channels over fsdp, input channels whole.
    ("conv_in", None),
    ("conv_out", "fsdp"),
)


# The mesh of the active `use_mesh` (the rules live in flax's context; see `use_mesh` for why not jax's).
_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("sora_mesh", default=None)


class InsufficientShardingError(ValueError):
    """Each device would hold more parameter bytes than config.param_sharding_tolerance allows."""


def mesh_shape_from_config(mesh_cfg: Any, num_devices: int) -> dict[str, int]:
    """Resolves the config's mesh sizes (one may be -1, "the rest") against the device count.

    Raises:
      ValueError: naming the field and the fix, when the sizes cannot tile the devices.
    """
    sizes = {axis: int(mesh_cfg.get(axis, 1)) for axis in MESH_AXES}
    unknown = set(mesh_cfg.keys()) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"config.mesh has unknown axes {sorted(unknown)}; allowed axes are {MESH_AXES}.")
    fill = [a for a, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise ValueError(f"config.mesh: only one axis may be -1, got {fill}.")
    if any(s == 0 or s < -1 for s in sizes.values()):
        raise ValueError(f"config.mesh sizes must be positive or -1, got {sizes}.")
    known = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if num_devices % known:
            raise ValueError(
                f"config.mesh: {num_devices} devices cannot be split into {sizes}; the fixed axes multiply to "
                f"{known}, which does not divide {num_devices}. Change config.mesh.")
        sizes[fill[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(
            f"config.mesh {sizes} uses {math.prod(sizes.values())} devices but {num_devices} exist. "
            "Set one axis to -1 to absorb the rest.")
    return sizes


def make_mesh(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a Mesh with axes (data, fsdp, tensor, context) from the config for the given devices."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = mesh_shape_from_config(mesh_cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    if devices == list(jax.devices()):
        # mesh_utils orders devices so that inner axes follow the physical interconnect.
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    else:
        grid = np.asarray(devices, dtype=object).reshape(shape)
    # Auto axes: classic GSPMD propagation, constraints only where we place them.
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(logical: Sequence[str | None] | None, rules: Sequence[tuple]) -> P:
    """Maps logical axis names to a PartitionSpec with flax's `logical_to_mesh_axes`.

    Rules are in priority order: a (logical, mesh axes) rule applies whole when none of its mesh axes
    already shards another dimension of the array, so a mesh axis is used at most once per array; a later
    rule for the same logical name is a fallback. Names without a rule, or mapped to None, stay whole.

    Args:
      logical: one name (or None) per array dimension; None for an unannotated array.
      rules: (logical name, mesh axis | tuple of mesh axes | None) pairs.

    Returns:
      The PartitionSpec (P() for None), before any check that the mesh divides the dimensions.
    """
    if logical is None:
        return P()
    return nn.logical_to_mesh_axes(tuple(logical), tuple(rules))


def _spec_axes(spec: P) -> tuple[str, ...]:
    """The mesh axes a PartitionSpec shards over, in order."""
    out = []
    for entry in spec:
        out.extend(() if entry is None else (entry,) if isinstance(entry, str) else entry)
    return tuple(out)


def _fit_spec(spec: P, shape: Sequence[int], mesh_shape: dict[str, int]) -> tuple[P, list[str]]:
    """Replicates the dimensions the mesh does not divide; returns the spec and why each was dropped.

    jit accepts only evenly divided shardings for parameters, and an uneven activation constraint would pad;
    replicating is the fallback here, and the sufficiently-sharded check decides whether it is acceptable.
    """
    fixed, dropped = [], []
    entries = tuple(spec) + (None,) * (len(shape) - len(spec))
    for i, (dim, axes) in enumerate(zip(shape, entries)):
        names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        size = math.prod(mesh_shape[a] for a in names)
        if dim % size:
            dropped.append(f"dim {i} ({dim}) is not divisible by {'x'.join(names)}={size}")
            fixed.append(None)
        else:
            fixed.append(axes)
    return P(*fixed), dropped


def _is_logical(x) -> bool:
    return x is None or isinstance(x, tuple)


def logical_axes(params: nnx.State) -> Any:
    """Pure-dict tree of each parameter's logical axis names, as the model annotated them.

    Read from the Variables' `out_sharding` metadata rather than through `nnx.get_partition_spec`, which
    translates the names through the rules that `use_mesh` activates; here the rules are applied by
    `param_shardings`, which also checks divisibility.

    Args:
      params: an nnx.State of (abstract) parameters.

    Returns:
      The same tree as `nnx.to_pure_dict(params)` with a tuple of names (empty: unannotated) per leaf.
    """
    def names(v: nnx.Variable):
        axes = v.get_metadata().get("out_sharding")
        return v.replace(P(*axes) if axes else P())
    specs = nnx.to_pure_dict(jax.tree.map(names, params, is_leaf=lambda x: isinstance(x, nnx.Variable)))
    return jax.tree.map(tuple, specs, is_leaf=lambda x: isinstance(x, P))


def param_shardings(spec_tree: Any, shape_tree: Any, mesh: Mesh, rules: Sequence[tuple]) -> Any:
    """NamedShardings for a tree of logical specs (tuples of names or None) and matching shapes.

    A dimension the mesh does not divide is replicated; `assert_params_sufficiently_sharded` says whether
    that is acceptable.
    """
    def one(logical, shaped):
        spec, _ = _fit_spec(logical_to_spec(logical, rules), shaped.shape, mesh.shape)
        return NamedSharding(mesh, spec)
    return jax.tree.map(one, spec_tree, shape_tree, is_leaf=_is_logical)


def rules_from_config(config) -> tuple:
    """config.logical_axis_rules as a tuple of (logical, mesh axes) pairs; DEFAULT_RULES when unset."""
    rules = config.get("logical_axis_rules")
    if not rules:
        return DEFAULT_RULES
    out = []
    for pair in rules:
        if len(pair) != 2:
            raise ValueError(f"config.logical_axis_rules entries must be (logical, mesh_axes) pairs; got {pair}.")
        name, target = pair
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        bad = [a for a in axes if a not in MESH_AXES]
        if bad:
            raise ValueError(f"config.logical_axis_rules maps {name!r} to unknown mesh axes {bad}; "
                             f"mesh axes are {MESH_AXES}.")
        out.append((name, target if isinstance(target, str) or target is None else tuple(target)))
    return tuple(out)


def current_rules() -> tuple:
    """The rules of the active `use_mesh` (flax's logical-axis-rules context), else DEFAULT_RULES."""
    return tuple(nn.get_logical_axis_rules()) or DEFAULT_RULES


def current_mesh() -> Mesh | None:
    """The mesh of the active `use_mesh` (also while jit traces inside it), None outside one."""
    return _MESH.get()


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Sequence[tuple] = DEFAULT_RULES):
    """Activates `mesh` and `rules` for parameter shardings, batch shardings and `constrain`.

    The rules go into flax's `logical_axis_rules` context; empty rules mean DEFAULT_RULES, as an empty
    config.logical_axis_rules does. The mesh is held here rather than set with `jax.set_mesh`: under a
    jax context mesh every jit refuses arrays committed to other devices (the one-device VAE restore and
    sampling), and `nnx.eval_shape` attaches shardings by a plain lookup of each name in the rules, which
    fails for names the rules omit (a scanned "layers" axis, a partial config.logical_axis_rules).
    Both contexts are per thread.

    Yields:
      The mesh.
    """
    token = _MESH.set(mesh)
    try:
        with nn.logical_axis_rules(tuple(rules) or DEFAULT_RULES):
            yield mesh
    finally:
        _MESH.reset(token)


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """Constrains an activation's sharding by logical names; a no-op outside `use_mesh`.

    Like flax's `with_logical_constraint` with the held mesh, but a dimension the mesh does not divide (a
    short sequence, an odd head count) is left unconstrained instead of padded.
    """
    mesh = _MESH.get()
    if mesh is None:
        return x
    spec, dropped = _fit_spec(logical_to_spec(logical, current_rules()), x.shape, mesh.shape)
    if dropped:
        logging.warning("activation %s of shape %s: %s; replicating those dimensions.",
                        tuple(logical), x.shape, "; ".join(dropped))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The sharding of a batch's leading axis (rows of packed sequences) under the active rules."""
    return NamedSharding(mesh, logical_to_spec(("batch",), current_rules()))


# The sufficiently-sharded check (MaxText's): a parameter the mesh cannot split as the rules ask is
# replicated, and every device pays for it; beyond a tolerance that is an error, not a silent replica.


@dataclasses.dataclass(frozen=True)
class ParamShardingReport:
    """How evenly the parameters spread over the mesh; every device holds equal shards, so one number each.

    Attributes:
      total_bytes: all parameters, unsharded.
      per_device_bytes: the parameter bytes each device holds.
      shard_axes: the mesh axes the rules map any parameter dimension onto (normally fsdp, tensor).
      shard_factor: the product of their sizes; a perfect split holds total_bytes / shard_factor.
      offenders: the parameters holding the most bytes beyond their perfect share, largest first, each
        described with its path, shape, logical axes and why it is (partly) replicated.
    """
    total_bytes: int
    per_device_bytes: int
    shard_axes: tuple[str, ...]
    shard_factor: int
    offenders: tuple[str, ...]

    @property
    def perfect_bytes(self) -> float:
        return self.total_bytes / self.shard_factor

    @property
    def replicated_share(self) -> float:
        """per_device_bytes / perfect_bytes - 1: the extra each device holds because of replication."""
        return self.per_device_bytes / self.perfect_bytes - 1.0 if self.total_bytes else 0.0

    def as_dict(self) -> dict:
        return {"total_bytes": self.total_bytes, "per_device_bytes": self.per_device_bytes,
                "perfect_bytes": self.perfect_bytes, "replicated_share": self.replicated_share,
                "shard_axes": list(self.shard_axes), "shard_factor": self.shard_factor,
                "offenders": list(self.offenders)}


def _path_str(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _format_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _why_replicated(logical: tuple, wanted: P, dropped: list[str], missing: list[str]) -> str:
    """Why a parameter is not split over every sharding axis, in words."""
    reasons = list(dropped)
    if not logical:
        reasons.append("it has no logical axis names")
    unexplained = [a for a in missing if a not in _spec_axes(wanted)]
    if unexplained:
        reasons.append(f"no dimension maps to {'/'.join(unexplained)}")
    return "; ".join(reasons)


def param_report(logical_tree: Any, shape_tree: Any, mesh: Mesh, rules: Sequence[tuple] | None = None,
                 top: int = 5) -> ParamShardingReport:
    """Per-device against perfectly sharded parameter bytes, and the parameters that cause the difference.

    Args:
      logical_tree: logical axis names per parameter (as `logical_axes` returns).
      shape_tree: the matching tree of arrays or ShapeDtypeStructs.
      mesh: the mesh the parameters are laid out on.
      rules: logical-axis rules; the active ones (`current_rules()`) when None.
      top: how many offending parameters to describe.

    Returns:
      A ParamShardingReport.
    """
    rules = current_rules() if rules is None else tuple(rules)
    named, treedef = jax.tree_util.tree_flatten_with_path(logical_tree, is_leaf=_is_logical)
    shapes = treedef.flatten_up_to(shape_tree)
    wanted = [logical_to_spec(logical, rules) for _, logical in named]
    used = {a for spec in wanted for a in _spec_axes(spec)}
    shard_axes = tuple(a for a in mesh.axis_names if a in used)
    factor = math.prod(mesh.shape[a] for a in shard_axes)
    total = per_device = 0
    excess = []
    for (path, logical), shaped, spec in zip(named, shapes, wanted):
        fitted, dropped = _fit_spec(spec, shaped.shape, mesh.shape)
        nbytes = math.prod(shaped.shape) * np.dtype(shaped.dtype).itemsize
        held = NamedSharding(mesh, fitted).shard_shape(tuple(shaped.shape))
        held_bytes = math.prod(held) * np.dtype(shaped.dtype).itemsize
        total, per_device = total + nbytes, per_device + held_bytes
        extra = held_bytes - nbytes / factor
        if extra > 0:
            missing = [a for a in shard_axes if a not in _spec_axes(fitted) and mesh.shape[a] > 1]
            why = _why_replicated(tuple(logical or ()), spec, dropped, missing)
            excess.append((extra, f"{_path_str(path)} shape {tuple(shaped.shape)} axes {logical}: {why} "
                                  f"(+{_format_bytes(extra)} per device)"))
    excess.sort(key=lambda e: -e[0])
    offenders = tuple(text for _, text in excess[:top])
    if len(excess) > top:
        offenders += (f"... and {len(excess) - top} more parameters",)
    return ParamShardingReport(total, per_device, shard_axes, factor, offenders)


def assert_params_sufficiently_sharded(logical_tree: Any, shape_tree: Any, mesh: Mesh, tolerance: float,
                                       rules: Sequence[tuple] | None = None) -> ParamShardingReport:
    """Raises when each device holds more parameter bytes than a perfect split plus `tolerance`.

    A perfect split holds total / (product of the mesh axes the rules shard parameters over). Parameters
    whose dimensions the mesh does not divide, or that have no dimension mapped to some of those axes,
    are (partly) replicated and push each device above it.

    Args:
      logical_tree: logical axis names per parameter (as `logical_axes` returns).
      shape_tree: the matching tree of arrays or ShapeDtypeStructs.
      mesh: the mesh the parameters are laid out on.
      tolerance: the allowed per_device / perfect - 1 (config.param_sharding_tolerance); negative disables.
      rules: logical-axis rules; the active ones when None.

    Returns:
      The ParamShardingReport, also when the check passes or is disabled.

    Raises:
      InsufficientShardingError: naming the worst offending parameters and the fix.
    """
    report = param_report(logical_tree, shape_tree, mesh, rules)
    axes = " x ".join(f"{a}={mesh.shape[a]}" for a in report.shard_axes if mesh.shape[a] > 1) or "one device"
    logging.info("Parameters: %s per device of %s in all (perfect split over %s: %s, +%.2f%%).",
                 _format_bytes(report.per_device_bytes), _format_bytes(report.total_bytes), axes,
                 _format_bytes(report.perfect_bytes), 100 * report.replicated_share)
    if tolerance < 0 or report.replicated_share <= tolerance:
        return report
    raise InsufficientShardingError(
        f"Parameters are not sufficiently sharded: each device holds {_format_bytes(report.per_device_bytes)}, "
        f"{report.replicated_share:.1%} more than the {_format_bytes(report.perfect_bytes)} of a perfect split "
        f"of {_format_bytes(report.total_bytes)} over {axes}; config.param_sharding_tolerance={tolerance} "
        f"allows {tolerance:.1%}. Largest replicated parameters:\n  " + "\n  ".join(report.offenders) +
        "\nFix: choose sizes the mesh divides (each named dimension a multiple of the mesh axes it maps to, "
        "e.g. config.model.hidden a multiple of fsdp), change config.mesh or config.logical_axis_rules, or "
        "raise config.param_sharding_tolerance (a negative value disables this check).")


def sharded_bytes(tree: Any) -> tuple[int, int]:
    """(total, per-device) bytes of a tree of arrays or ShapeDtypeStructs carrying their shardings.

    For the whole train state (parameters, optimizer state, EMA) of an abstract `state_spec`: what each
    device will hold, without allocating anything. Leaves without a sharding count as replicated.
    """
    total = per_device = 0
    for x in jax.tree.leaves(tree):
        itemsize = np.dtype(x.dtype).itemsize
        held = x.sharding.shard_shape(tuple(x.shape)) if getattr(x, "sharding", None) is not None else x.shape
        total += math.prod(x.shape) * itemsize
        per_device += math.prod(held) * itemsize
    return total, per_device


def host_to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each host's slice of the batch into global arrays sharded along the batch axis.

    Keys starting with "host_" (host-side bookkeeping such as skipped-file counts) are left out.
    """
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in device_items(batch)}


def device_items(batch: dict) -> list:
    """The (key, value) pairs of a batch that go to devices: all but the "host_" ones."""
    return [(k, v) for k, v in batch.items() if not k.startswith("host_")]


def maybe_initialize_distributed(enabled: bool) -> None:
    """Starts jax.distributed for multi-host runs (TPU pods, SLURM, or explicit env variables).

    On TPU VMs and SLURM, jax discovers the coordinator itself; elsewhere set JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES and JAX_PROCESS_ID (launch/local_multiprocess.sh does).
    """
    if not enabled:
        return
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
        # CPU collectives across processes (tests, local multi-process runs) go through gloo.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if "JAX_COORDINATOR_ADDRESS" in os.environ:
        kwargs = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                      num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                      process_id=int(os.environ["JAX_PROCESS_ID"]))
    jax.distributed.initialize(**kwargs)
