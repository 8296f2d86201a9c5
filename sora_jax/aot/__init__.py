"""Ahead-of-time compile of the train step for a machine this one is not, to read its memory first.

The train step is lowered from abstract, sharded inputs (ShapeDtypeStructs: nothing is allocated) and
compiled for the target's devices; XLA's memory analysis of the compiled program then gives the
per-device bytes of arguments, temporaries and outputs before any job is launched.

Targets (`parse_target`):
  cpu:N                  N simulated CPU devices of this machine. The mesh and the shardings are the
                         real ones; the figures are XLA:CPU's buffer assignment, which is close to, but not
                         the same as, a GPU's or TPU's (fusion and layout differ). With unrolled layers
                         (scan_layers=False) XLA:CPU's schedule undoes remat: every policy measures alike
                         (about 120 GiB for configs/dit_xl.py), so size remat with scan_layers=True.
  v5p-128, v6e-256,      Cloud TPU accelerator types, compiled by libtpu's compiler on this CPU machine
  v5litepod-16, v5e-16   (`pip install -e '.[aot]'`). v5p-N counts TensorCores, two per chip, and JAX sees
                         one device per chip (megacore): v5p-128 is 64 chips, topology 4x4x4. v5e and v6e
                         have one TensorCore per chip: v6e-256 is 256 chips, 16x16.
  v5p:4x4x4, v6e:16x16   libtpu topology strings, passed through as they are.
GPU targets (H100 x N) cannot be compiled here: XLA's GPU compiler lives in the CUDA plugin and takes its
target from an attached GPU (its deviceless mode is experimental); compile on the GPU machine, or use
cpu:N with --hbm_gib=80 for the budget.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import time
from typing import Any

import numpy as np

from sora_jax.config_validation import ConfigError

# Device memory per chip in GiB, by the device kind JAX reports (prefix match, longest first).
HBM_GIB = {
    "TPU v5 lite": 16.0, "TPU v5e": 16.0, "TPU v5p": 95.0, "TPU v5": 95.0, "TPU v6 lite": 32.0,
    "TPU v6e": 32.0, "TPU v4": 32.0, "NVIDIA H100": 80.0, "NVIDIA H200": 141.0,
}
GIB = 2**30


class AotError(ConfigError):
    """The target cannot be compiled for here, or the step does not fit it; the message says what to do."""


class DoesNotFitError(AotError):
    """The train step needs more memory per device than the target has. `report` holds the figures."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


@dataclasses.dataclass(frozen=True)
class Target:
    """What to compile for: `platform` "cpu" (num_devices simulated) or "tpu" (a libtpu topology)."""
    name: str
    platform: str
    num_devices: int = 0
    topology: str = ""


# Friendly TPU generation prefix -> (libtpu generation, TensorCores counted per chip, torus rank).
_TPU_TYPES = {"v5p": ("v5p", 2, 3), "v5e": ("v5e", 1, 2), "v5litepod": ("v5e", 1, 2), "v6e": ("v6e", 1, 2)}
_GPU_NAMES = re.compile(r"^(h100|h200|a100|b200|gpu|cuda)", re.IGNORECASE)
_GPU_MESSAGE = (
    "GPU targets cannot be compiled ahead of time here. XLA's GPU compiler runs inside the CUDA PJRT plugin "
    "(jax[cuda12], not installed on a CPU machine) and describes its target from an attached GPU; its "
    "deviceless mode needs a hand-written device description (get_topology_desc(platform='cuda', "
    "target_config=...)) and is experimental (jax-ml/jax#28376), so this tool does not offer it. Compile on "
    "the GPU machine (the trainer logs the step's memory analysis before the first step), or check "
    "sharding and memory here with --topology=cpu:N --hbm_gib=80 (H100) / 141 (H200).")


def torus_shape(chips: int, rank: int) -> tuple[int, ...]:
    """The slice shape Cloud TPU uses for `chips` chips: from one host's 2x2x1 (3D) or 1x1 (2D), double the
    last of the smallest dimensions (v5p: 8 -> 2x2x2, 16 -> 2x2x4, 64 -> 4x4x4, 128 -> 4x4x8; v6e: 8 -> 2x4,
    256 -> 16x16)."""
    shape = [2, 2, 1] if rank == 3 and chips >= 4 else [1] * rank
    if chips < 1 or chips & (chips - 1):
        raise AotError(f"{chips} chips is not a standard slice (a power of two); name the topology "
                       "explicitly, e.g. v5p:4x4x4.")
    while math.prod(shape) < chips:
        smallest = min(shape)
        shape[max(i for i, s in enumerate(shape) if s == smallest)] *= 2
    return tuple(shape)


def parse_target(name: str) -> Target:
    """Parses --topology: cpu:N, a Cloud TPU accelerator type (v5p-128) or a libtpu topology (v5p:4x4x4).

    Raises:
      AotError: for GPU names (see the module docstring) and names it does not understand.
    """
    name = (name or "").strip()
    if m := re.fullmatch(r"cpu:(\d+)", name):
        if int(m.group(1)) < 1:
            raise AotError(f"--topology={name}: the device count must be at least 1.")
        return Target(name, "cpu", num_devices=int(m.group(1)))
    if _GPU_NAMES.match(name):
        raise AotError(f"--topology={name}: {_GPU_MESSAGE}")
    if m := re.fullmatch(r"(v5p|v5e|v5litepod|v6e)-(\d+)", name):
        generation, cores_per_chip, rank = _TPU_TYPES[m.group(1)]
        cores = int(m.group(2))
        if cores % cores_per_chip:
            raise AotError(f"--topology={name}: {m.group(1)}-N counts TensorCores ({cores_per_chip} per chip); "
                           f"{cores} is not a multiple of {cores_per_chip}.")
        shape = torus_shape(cores // cores_per_chip, rank)
        return Target(name, "tpu", math.prod(shape), f"{generation}:{'x'.join(map(str, shape))}")
    if m := re.fullmatch(r"(v\w+):(\d+(?:x\d+)+)", name):
        return Target(name, "tpu", math.prod(int(s) for s in m.group(2).split("x")), name)
    raise AotError(f"--topology={name!r} is not understood; use cpu:N, a Cloud TPU type (v5p-128, v6e-256, "
                   "v5litepod-16) or a libtpu topology (v5p:4x4x4, v6e:16x16).")


def prepare_platform(target: Target) -> None:
    """Sets JAX's CPU device count for cpu:N and keeps libtpu from starting as a runtime for TPU targets.

    Must run before JAX's backends start (the first jax.devices() or array op); after that it only checks.
    """
    import jax
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():
        # Only CPU runs here: a TPU target is compiled through compile-only devices from libtpu, and libtpu
        # started as a runtime on a host without TPUs only prints warnings and falls back.
        jax.config.update("jax_platforms", "cpu")
        if target.platform == "cpu":
            jax.config.update("jax_num_cpu_devices", target.num_devices)
    if target.platform == "cpu":
        have = len(jax.devices("cpu"))
        if have < target.num_devices:
            raise AotError(
                f"--topology={target.name}: JAX already started with {have} CPU devices in this process. Run "
                f"`python -m sora_jax.aot` in a fresh process, or set XLA_FLAGS="
                f"--xla_force_host_platform_device_count={target.num_devices} before JAX starts.")


def target_devices(target: Target) -> list:
    """The devices to build the mesh over: simulated CPU devices, or libtpu's compile-only TPU devices."""
    import jax
    if target.platform == "cpu":
        return list(jax.devices("cpu"))[:target.num_devices]
    from jax.experimental import topologies
    # libtpu takes /tmp/libtpu_lockfile for the life of the process, which guards TPU chips; compile-only
    # devices open none, and without this a second compile (another test worker, a training job's AOT
    # check) fails while the first process lives.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    dims = tuple(int(d) for d in target.topology.split(":")[1].split("x"))
    # libtpu assumes hosts of 2x2x1 chips; a smaller slice must say that its one host is the slice.
    kwargs = {"chips_per_host_bounds": dims + (1,) * (3 - len(dims))} if math.prod(dims) < 4 else {}
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=target.topology,
                                                 **kwargs).devices)
    except RuntimeError as e:
        if "TPU support not installed" in str(e):
            raise AotError(
                f"--topology={target.name} needs libtpu, the TPU compiler, which is not installed. Install it "
                "with `pip install -e '.[aot]'` (jax[tpu]==0.10.2 -> libtpu 0.0.42.1: a 213 MB wheel, 684 MB "
                "installed); it compiles on a CPU-only machine and runs nothing.") from None
        raise AotError(f"--topology={target.name} ({target.topology}): libtpu refused it: {e}") from None


def default_hbm_gib(device_kind: str) -> float | None:
    """Per-device memory for a known device kind, else None (e.g. CPU)."""
    for kind in sorted(HBM_GIB, key=len, reverse=True):
        if device_kind.startswith(kind):
            return HBM_GIB[kind]
    return None


def resolve_for_target(config, platform: str):
    """A copy of `config` as the target would run it: attention "auto" becomes the target's backend.

    The model resolves "auto" from the platform JAX runs on, which here is the CPU, not the target.
    """
    from sora_jax.layers import attention
    config = copy.deepcopy(config)
    if config.get("model") is not None and config.model.get("attention") == "auto":
        with config.unlocked():
            config.model.attention = attention.AUTO_BACKEND.get(platform, "blockwise")
    return config


def validate_for_compile(config) -> None:
    """validate(config), less what only data loading needs: compiling reads no data, so a latent cache
    that exists only on the training machine is not required here."""
    from sora_jax.config_validation import validate
    from sora_jax.tasks import build_task
    checked = copy.deepcopy(config)
    if checked.get("data") is not None and checked.data.get("source") == "latents":
        with checked.unlocked():
            checked.data.source = checked.data.get("raw_source", "procedural")
    validate(checked, build_task(checked))


def dit_batch(config) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Global shapes and dtypes of one DiT batch (data_pipelines/pipeline.py describes the fields)."""
    from data_pipelines.latents import cached_text_features
    from sora_jax.models import patch_dim
    from sora_jax.models.text import frozen_encoder_path
    d = config.data
    rows, length, text, samples = d.global_batch_rows, d.seq_len, d.text_len, d.max_samples_per_row
    # Token ids, or caption features of a frozen encoder computed ahead (config.text.encoder="precomputed");
    # a frozen encoder in the step (config.text.path) reads ids again, unless the latent cache holds its features.
    ahead = config.text.encoder == "precomputed" and (not frozen_encoder_path(config.text)
                                                      or cached_text_features(config))
    captions = ((rows, text, config.text.width), np.float32) if ahead else ((rows, text), np.int32)
    return {
        "video": ((rows, length, patch_dim(config)), np.float32), "video_pos": ((rows, length, 3), np.int32),
        "video_segment_ids": ((rows, length), np.int32), "text": captions,
        "text_segment_ids": ((rows, text), np.int32), "text_positions": ((rows, text), np.int32),
        "info": ((rows, samples, 5), np.int32),
    }


# config.task -> its batch's global shapes; a task whose step should be AOT-checked adds its entry.
BATCH_SHAPES = {"dit": dit_batch}


def abstract_batch(config, mesh) -> dict:
    """The batch as ShapeDtypeStructs, sharded along rows as the trainer shards real batches."""
    import jax

    from sora_jax import sharding
    task = config.get("task", "dit")
    if task not in BATCH_SHAPES:
        raise AotError(f"config.task={task!r}: AOT compile knows the batch shapes of {sorted(BATCH_SHAPES)}; "
                       "add the task's shapes to sora_jax.aot.BATCH_SHAPES.")
    row_sharding = sharding.batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=row_sharding)
            for k, (shape, dtype) in BATCH_SHAPES[task](config).items()}


def param_figures(spec) -> dict:
    """The sufficiently-sharded figures of the parameters (sora_jax.sharding.param_report, computed by
    state_spec): per-device against perfectly split bytes, their ratio less one and the worst offenders."""
    import jax
    return {"count": sum(x.size for x in jax.tree.leaves(spec.abstract["params"])), **spec.param_report.as_dict()}


def memory_figures(compiled) -> dict:
    """Per-device bytes from XLA's memory analysis; total = arguments + outputs - aliased (donated
    buffers reused for outputs) + temporaries + generated code."""
    m = compiled.memory_analysis()
    if m is None:
        raise AotError("this backend gives no memory analysis for compiled programs.")
    out = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
           "aliased": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes,
           "generated_code": m.generated_code_size_in_bytes}
    out["total"] = (out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
                    + out["generated_code"])
    if getattr(m, "peak_memory_in_bytes", 0):
        # XLA's heap-simulator peak; on CPU it can be below the temporaries, so `total` is the figure used.
        out["xla_peak"] = m.peak_memory_in_bytes
    host = {"host_arguments": m.host_argument_size_in_bytes, "host_outputs": m.host_output_size_in_bytes,
            "host_temporaries": m.host_temp_size_in_bytes}
    if any(host.values()):  # only where activations are offloaded (remat "offload_dots")
        out.update(host)
    return out


def _flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 -- not every compiler gives one; the figure is optional
        return None
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


def _abstract_frozen(spec) -> Any:
    import jax
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                        spec.task.frozen(), spec.frozen_shardings)


def _build_mesh(config, devices):
    from sora_jax import sharding
    from sora_jax.config_validation import validate_for_mesh
    from sora_jax.tasks import build_task
    try:
        mesh = sharding.make_mesh(config.mesh, devices)
        rules = sharding.rules_from_config(config)
    except ValueError as e:
        raise AotError(str(e)) from None
    validate_for_mesh(config, dict(mesh.shape), build_task(config))
    return mesh, rules


def _check_state_fits(report: dict, state_bytes: int) -> None:
    """Before compiling: the state alone (params, optimizer moments, EMA) must leave room in HBM."""
    hbm = report["hbm_gib"]
    if hbm and state_bytes > hbm * GIB:
        raise DoesNotFitError(
            f"the train state alone needs {state_bytes / GIB:.2f} GiB per device, more than the "
            f"{hbm:g} GiB of a {report['device_kind']}; shard parameters over more devices (config.mesh.fsdp), "
            "keep Adam's first moment in bfloat16 (config.optim.mu_dtype) or use a larger target.", report)


_ADVICE = ("Lower config.data.global_batch_rows or seq_len, set config.model.remat='full' (or 'save_dots'), "
           "config.model.scan_layers=True, or shard over more devices.")


def check_fit(report: dict, hbm_gib: float | None = None) -> None:
    """Sets report["fits"] and ["hbm_fraction"] from the compiled step's total against the HBM.

    Args:
      report: a report with "memory" (from `compile_train_step`).
      hbm_gib: overrides report["hbm_gib"] (which it then replaces).

    Raises:
      DoesNotFitError: when the total exceeds the HBM; nothing is checked when the HBM is unknown.
    """
    if hbm_gib is not None:
        report["hbm_gib"] = hbm_gib
    hbm, total = report["hbm_gib"], report["memory"]["total"]
    report["hbm_fraction"] = total / (hbm * GIB) if hbm else None
    report["fits"] = None if not hbm else total <= hbm * GIB
    if report["fits"] is False:
        raise DoesNotFitError(
            f"the train step needs {total / GIB:.2f} GiB per device, more than the {hbm:g} GiB of a "
            f"{report['device_kind']} (temporaries {report['memory']['temporaries'] / GIB:.2f} GiB). " + _ADVICE,
            report)


def _compile(lowered, report: dict):
    """lowered.compile(); a compiler that checks HBM itself (TPU) refuses an oversized step outright."""
    import jax
    try:
        return lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        why = str(e).strip().splitlines()[0]
        raise DoesNotFitError(f"the {report['device_kind']} compiler refused the train step: {why} " + _ADVICE,
                              {**report, "fits": False}) from None


def compile_train_step(config, target: Target | str, hbm_gib: float | None = None) -> dict:
    """Compiles config's train step for `target` and returns its per-device memory report.

    Args:
      config: a training config (ConfigDict); not modified.
      target: a Target or a --topology string (see the module docstring).
      hbm_gib: per-device memory to check against; default: known by the target's device kind.

    Raises:
      AotError: the target cannot be compiled for here, or parameters are insufficiently sharded.
      DoesNotFitError: the state (before compiling) or the step (after) exceeds hbm_gib; `.report`.
      ConfigError: the config itself is invalid.
    """
    from sora_jax import sharding
    from sora_jax.train.state import state_spec
    from sora_jax.train.step import make_train_step

    target = parse_target(target) if isinstance(target, str) else target
    prepare_platform(target)
    devices = target_devices(target)
    kind = devices[0].device_kind
    config = resolve_for_target(config, target.platform)
    validate_for_compile(config)
    mesh, rules = _build_mesh(config, devices)
    report = {"topology": target.name, "platform": target.platform, "tpu_topology": target.topology or None,
              "device_kind": kind, "num_devices": len(devices), "mesh": dict(mesh.shape),
              "hbm_gib": hbm_gib if hbm_gib is not None else default_hbm_gib(kind),
              "model": {k: config.model.get(k) for k in ("hidden", "depth", "heads", "dtype", "param_dtype",
                                                          "attention", "remat", "scan_layers")}}
    with sharding.use_mesh(mesh, rules):
        try:
            spec = state_spec(config, mesh)  # also runs the sufficiently-sharded check
        except sharding.InsufficientShardingError as e:
            raise AotError(str(e)) from None
        report["params"] = param_figures(spec)
        report["state_bytes_per_device"] = sharding.sharded_bytes(spec.abstract)[1]
        _check_state_fits(report, report["state_bytes_per_device"])
        batch = abstract_batch(config, mesh)
        start = time.perf_counter()
        lowered = make_train_step(config, spec, batch).lower(spec.abstract, batch, _abstract_frozen(spec))
        compiled = _compile(lowered, report)
        report["compile_seconds"] = time.perf_counter() - start
    report["memory"] = memory_figures(compiled)
    if target.platform == "cpu" and not config.model.get("scan_layers") and config.model.get("remat") != "none":
        report["note"] = ("XLA:CPU's schedule undoes remat across unrolled layers; these temporaries overstate "
                          "an accelerator's. Compare remat policies with config.model.scan_layers=True.")
    report["flops_per_device"] = _flops(compiled)
    check_fit(report)
    return report


def _fmt(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def format_report(report: dict) -> str:
    """A short human-readable summary of `compile_train_step`'s report."""
    p, m = report["params"], report.get("memory")
    lines = [
        f"target {report['topology']}: {report['num_devices']} x {report['device_kind']}, mesh {report['mesh']}",
        f"parameters {p['count'] / 1e6:,.1f}M = {_fmt(p['total_bytes'])}; per device "
        f"{_fmt(p['per_device_bytes'])}, perfect split over {'x'.join(p['shard_axes']) or 'nothing'} "
        f"{_fmt(p['perfect_bytes'])}: replicated share {p['replicated_share']:+.2%}",
        f"train state (params, optimizer, EMA) per device {_fmt(report['state_bytes_per_device'])}",
    ]
    if m:
        lines.append("per-device memory of the compiled train step:")
        for key in ("arguments", "outputs", "aliased", "temporaries", "generated_code", "total",
                    "host_temporaries"):
            if key in m:
                lines.append(f"  {key:<16}{_fmt(m[key]):>12}")
        hbm = report.get("hbm_gib")
        lines.append(f"  of {hbm:g} GiB HBM: {report['hbm_fraction']:.1%} -> "
                     f"{'fits' if report['fits'] else 'DOES NOT FIT'}" if hbm else
                     "  HBM of this device kind unknown; pass --hbm_gib to check the fit")
        lines.append(f"compiled in {report['compile_seconds']:.1f} s")
    if report.get("note"):
        lines.append(f"note: {report['note']}")
    return "\n".join(lines)
