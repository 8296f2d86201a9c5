"""config.init_from: the weights a fine-tune starts from (or, under LoRA, the frozen base of the adapters).

DIR is one of:
- a sora_jax training work dir: its newest readable checkpoint's EMA parameters (config.init_from_weights =
  "ema", the default: the weights its samples and evaluations use) or its raw parameters ("params");
- a diffusers WanTransformer3DModel directory (config.json + safetensors), converted by
  sora_jax.convert.diffusers_wan.

Every tensor's name and shape are compared with the config's model before any array is read onto a device
(and before anything compiles); a difference is a CheckpointMismatchError naming the tensor and both shapes.
The arrays are placed straight into the model's parameter shardings.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from sora_jax.config_validation import ConfigError
from sora_jax.train import checkpointing
from sora_jax.train.checkpointing import CheckpointMismatchError

WEIGHT_CHOICES = ("ema", "params")


def source_kind(path: str) -> str:
    """"workdir" or "diffusers" for an init_from directory; ConfigError for anything else."""
    if not os.path.isdir(path):
        raise ConfigError(f"config.init_from={path!r} is not a directory; name a sora_jax work dir or a diffusers "
                          "WanTransformer3DModel directory.")
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return "workdir"
    if os.path.exists(os.path.join(path, "config.json")):
        from sora_jax.convert.diffusers_wan import read_config
        try:
            read_config(path)
        except ValueError as e:
            raise ConfigError(f"config.init_from={path!r}: {e}") from None
        return "diffusers"
    raise ConfigError(f"config.init_from={path!r} holds neither checkpoints/ (a sora_jax work dir) nor a diffusers "
                      "config.json.")


def _compare(stored: dict[str, tuple], wanted: dict[str, tuple], source: str) -> None:
    """Raises CheckpointMismatchError naming the first tensor whose presence or shape differs."""
    fix = "config.init_from must hold weights of the model this config builds (same sizes and options)."
    for name, want in sorted(wanted.items()):
        if name not in stored:
            raise CheckpointMismatchError(f"{source} lacks tensor {name} {want} that the config's model has. {fix}")
        if tuple(stored[name]) != tuple(want):
            raise CheckpointMismatchError(f"{source}: tensor {name} has shape {tuple(stored[name])} there but "
                                          f"{tuple(want)} in the config's model. {fix}")
    extra = sorted(set(stored) - set(wanted))
    if extra:
        raise CheckpointMismatchError(f"{source} has tensor {extra[0]} {tuple(stored[extra[0]])}, which the config's "
                                      f"model lacks. {fix}")


def _shapes(tree: Any) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {checkpointing._name(p): tuple(getattr(x, "shape", ())) for p, x in leaves}


def _from_workdir(path: str, abstract: Any, which: str) -> tuple[Any, str]:
    config_path = os.path.join(path, "config.json")
    if os.path.exists(config_path):
        source_lora = checkpointing.read_config(path).get("lora")
        if source_lora is not None and source_lora.get("rank", 0) > 0:
            raise ConfigError(f"config.init_from={path!r} is a LoRA run: its checkpoints hold only adapters. Start "
                              "from its merged weights (sora_jax.convert.diffusers_wan.save_diffusers_transformer) "
                              "or from its own init_from.")
    ckpt = checkpointing.Checkpointer(path, read_only=True)
    try:
        steps = sorted(ckpt.manager.all_steps(), reverse=True)
        if not steps:
            raise ConfigError(f"config.init_from={path!r} has no checkpoint; train there first.")
        for step in steps:  # the newest step whose metadata reads; a damaged one is skipped with a line
            try:
                stored = ckpt._stored_state_metadata(step)
            except checkpointing.CorruptCheckpointError:
                continue
            _compare(_shapes(stored.get(which, {})), _shapes(abstract), f"config.init_from={path} (step {step}, "
                     f"{which})")
            params = ckpt.try_restore_params(step, abstract, which)
            if params is not None:
                return params, f"{path} step {step} ({which})"
        raise ConfigError(f"config.init_from={path!r}: no checkpoint reads back (each one's problem is printed above).")
    finally:
        ckpt.close()


def _from_diffusers(path: str, abstract: Any, scan_layers: bool) -> tuple[Any, str]:
    from sora_jax.convert.diffusers_wan import read_diffusers_weights
    try:
        _, host = read_diffusers_weights(path, scan_layers=scan_layers)
    except (ValueError, FileNotFoundError) as e:
        raise CheckpointMismatchError(f"config.init_from={path}: {e}") from None
    wanted = _shapes(abstract)
    _compare({k: v.shape for k, v in host.items()}, wanted, f"config.init_from={path}")
    flat = {checkpointing._name(p): a for p, a in jax.tree_util.tree_leaves_with_path(abstract)}
    placed = {k: jax.device_put(np.asarray(host.pop(k), a.dtype), a.sharding) for k, a in flat.items()}
    return jax.tree_util.tree_map_with_path(lambda p, _: placed[checkpointing._name(p)], abstract), path


def load_weights(config, abstract: Any) -> Any:
    """The plain model's parameters from config.init_from, placed into `abstract`'s shardings.

    Args:
      config: the run's config (init_from, init_from_weights, model.scan_layers).
      abstract: ShapeDtypeStructs with shardings of the model's parameters (StateSpec.weights_abstract).
    Raises:
      ConfigError: the directory is neither kind, has no readable checkpoint, or is a LoRA run's.
      CheckpointMismatchError: a tensor missing, extra or of another shape (named, with both shapes).
    """
    path, which = config.init_from, config.get("init_from_weights", "ema")
    if source_kind(path) == "workdir":
        params, what = _from_workdir(path, abstract, which)
    else:
        params, what = _from_diffusers(path, abstract, bool(config.model.get("scan_layers", False)))
    if jax.process_index() == 0:
        print(f"Weights from {what} (config.init_from).", flush=True)
    return params


def merged_lora_params(config, ckpt, which: str, device_sharding) -> tuple[int | None, Any]:
    """(step, the plain model's parameters) of a LoRA run: its newest readable adapters folded into the base.

    For read-only jobs (sampling, evaluation) on a LoRA work dir, whose checkpoints hold adapters only.

    Args:
      config: the LoRA run's config (its config.init_from holds the base weights).
      ckpt: the work dir's read-only Checkpointer.
      which: "ema" or "params" adapters.
      device_sharding: where the parameters go (e.g. one device for the sampler).
    Returns:
      (None, None) when no step reads back.
    Raises:
      CheckpointMismatchError: config.init_from now holds other weights than the adapters were trained on.
    """
    from flax import nnx

    from sora_jax.models import lora
    from sora_jax.tasks import build_task
    from sora_jax.train.state import build_model, split_model
    task = build_task(config)
    graphdef, trained, base = split_model(nnx.eval_shape(lambda: build_model(config, task, nnx.Rngs(0))))
    place = lambda state: jax.tree.map(  # noqa: E731
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device_sharding), nnx.to_pure_dict(state))
    step, adapters = ckpt.restore_params_newest_good(place(trained), which)
    if step is None:
        return None, None
    weights = load_weights(config, place(base))
    check_base(config, ckpt, step, jax.jit(lora.fingerprint)(weights), device_sharding)
    nnx.replace_by_pure_dict(trained, adapters)
    nnx.replace_by_pure_dict(base, weights)
    return step, lora.merged_params(nnx.merge(graphdef, trained, base))


def check_base(config, ckpt, step: int, fingerprint: jax.Array, device_sharding) -> None:
    """Raises CheckpointMismatchError unless step's adapters were trained on the base whose fingerprint is given
    (sora_jax.models.lora.fingerprint of config.init_from's weights now)."""
    stored = ckpt.restore_params(step, jax.ShapeDtypeStruct(fingerprint.shape, np.float32, sharding=device_sharding),
                                 "base_fingerprint")
    if not np.allclose(np.asarray(stored), np.asarray(fingerprint), rtol=1e-4, atol=1e-7):
        raise CheckpointMismatchError(
            f"{ckpt.workdir} holds LoRA adapters (step {step}) trained on other base weights than config.init_from="
            f"{config.init_from} holds now (the base fingerprints differ); restore that base to use them.")


class LoRAFolding:
    """A LoRA run's base (config.init_from), loaded once and sharded like the plain model's parameters, into which
    each checkpoint's adapters are folded: what the evaluation job scores, as the sampler does.

    Args:
      config: the LoRA run's config.
      spec: its StateSpec (LoRA: adapters trained, base frozen).
      plain_shardings: the plain model's parameter shardings (where the folded parameters go).
    """

    def __init__(self, config, spec, plain_shardings):
        from flax import nnx

        from sora_jax.models import lora
        self.config, self.replicated = config, jax.sharding.NamedSharding(spec.mesh, jax.sharding.PartitionSpec())
        self.base = load_weights(config, spec.weights_abstract)
        self.fingerprint = jax.jit(lora.fingerprint)(self.base)
        self._fold = jax.jit(lambda adapters, base: lora.merged_params(nnx.merge(spec.graphdef, adapters, base)),
                             out_shardings=plain_shardings)

    def fold(self, ckpt, step: int, adapters) -> Any:
        """The plain model's parameters: step's `adapters` folded into the base (checked to be theirs)."""
        check_base(self.config, ckpt, step, self.fingerprint, self.replicated)
        return self._fold(adapters, self.base)
