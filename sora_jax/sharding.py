"""Meshes, logical-axis rules and activation constraints.

Model code names only *logical* axes ("embed", "heads", "batch", ...). The config's rules map them onto
the mesh axes defined here, so changing the parallelism of a run is a config edit, never a model edit.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import os
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "context")

# Parameters: "embed" is split over fsdp (ZeRO-3 style), the wide dimensions over tensor.
# Activations: the batch over data x fsdp, the token axis over context.
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

_CURRENT: contextvars.ContextVar[tuple[Mesh, tuple] | None] = contextvars.ContextVar("sora_mesh", default=None)


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
    """Maps logical axis names to a PartitionSpec; a mesh axis is used at most once per array."""
    if logical is None:
        return P()
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in logical:
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def _fit_spec(spec: P, shape: Sequence[int], mesh: Mesh, what: str) -> P:
    """Drops sharding on dimensions the mesh does not divide (replicating them), and says so."""
    fixed = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            fixed.append(None)
            continue
        names = (axes,) if isinstance(axes, str) else tuple(axes)
        size = math.prod(mesh.shape[a] for a in names)
        if dim % size:
            logging.warning("%s: dimension %d is not divisible by mesh axes %s (size %d); replicating it.",
                            what, dim, names, size)
            fixed.append(None)
        else:
            fixed.append(axes)
    return P(*fixed)


def param_shardings(spec_tree: Any, shape_tree: Any, mesh: Mesh, rules: Sequence[tuple]) -> Any:
    """NamedShardings for a tree of logical specs (tuples of names or None) and matching shapes."""
    def one(path, logical, shaped):
        spec = logical_to_spec(logical, rules)
        return NamedSharding(mesh, _fit_spec(spec, shaped.shape, mesh, jax.tree_util.keystr(path)))
    return jax.tree_util.tree_map_with_path(
        one, spec_tree, shape_tree, is_leaf=lambda x: x is None or isinstance(x, tuple))


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
    """The rules of the active `use_mesh`, else DEFAULT_RULES."""
    current = _CURRENT.get()
    return current[1] if current is not None else DEFAULT_RULES


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Sequence[tuple] = DEFAULT_RULES):
    """Activates `mesh` and `rules` for parameter shardings, batch shardings and `constrain`."""
    token = _CURRENT.set((mesh, tuple(rules)))
    try:
        yield mesh
    finally:
        _CURRENT.reset(token)


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """Constrains an activation's sharding by logical names; a no-op outside `use_mesh`."""
    current = _CURRENT.get()
    if current is None:
        return x
    mesh, rules = current
    spec = _fit_spec(logical_to_spec(logical, rules), x.shape, mesh, "activation")
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The sharding of a batch's leading axis (rows of packed sequences) under the active rules."""
    return NamedSharding(mesh, logical_to_spec(("batch",), current_rules()))


def host_to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each host's slice of the batch into global arrays sharded along the batch axis."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


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
