"""orbax checkpoints of {step, params, opt_state, ema} together with the grain iterator state.

Before a restore, the checkpoint's recorded shapes are compared with the config's model; a mismatch is
an error that names the tensor and both shapes, raised before anything compiles, and the checkpoint is
left untouched. The config of a run is stored beside its checkpoints (config.json) for sampling and
evaluation jobs.
"""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
    """The work dir holds a checkpoint of a differently shaped model."""


def _name(path) -> str:
    """A tensor's path as "a/b/0/c", the same for live trees and orbax metadata (which keys by string)."""
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    return "/".join(parts)


def _restore_args(abstract: Any, partial: bool = False) -> ocp.args.PyTreeRestore:
    """Restore straight into the shardings the abstract tree (ShapeDtypeStructs) carries."""
    return ocp.args.PyTreeRestore(item=abstract, partial_restore=partial,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))


class Checkpointer:
    """Async CheckpointManager over WORKDIR/checkpoints with items "state" and "data"."""

    def __init__(self, workdir: str, keep: int = 3, read_only: bool = False):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only,
                                               enable_async_checkpointing=not read_only)
        # Registered handlers let orbax read item metadata (shapes) before any restore.
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
            "state": ocp.PyTreeCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
            "data_layout": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator=None, data_start: int = 0) -> None:
        """Starts an async save; the previous one is awaited by orbax first.

        data_start is where this run's data stream began (nonzero after resuming on a different number
        of hosts); with the per-host iterator states it locates every host's position in the global stream.
        """
        items = {"state": ocp.args.PyTreeSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
            items["data_layout"] = ocp.args.JsonSave({"start": int(data_start), "process_count": jax.process_count()})
        self.manager.save(step, args=ocp.args.Composite(**items))

    def data_states(self, step: int) -> tuple[int, list[dict], int] | None:
        """(process count, per-process iterator states, stream start) saved at `step`; None without data.

        Read from the files grain writes (process_<i>-of-<n>.json), so it works whatever the current
        process count is.
        """
        data_dir = os.path.join(self.directory, str(step), "data")
        found = {}
        for path in glob.glob(os.path.join(data_dir, "process_*-of-*.json")):
            m = re.fullmatch(r"process_(\d+)-of-(\d+)\.json", os.path.basename(path))
            if m:
                with open(path) as f:
                    found[(int(m.group(2)), int(m.group(1)))] = json.load(f)
        if not found:
            return None
        count = max(n for n, _ in found)
        states = [found.get((count, i)) for i in range(count)]
        if any(s is None for s in states):
            raise CheckpointMismatchError(f"{data_dir} lacks the iterator state of some of its {count} hosts.")
        layout_path = os.path.join(self.directory, str(step), "data_layout", "metadata")
        start = 0
        if os.path.exists(layout_path):
            with open(layout_path) as f:
                start = int(json.load(f).get("start", 0))
        return count, states, start

    def check_compatible(self, step: int, abstract_state: Any, workdir: str) -> None:
        """Raises CheckpointMismatchError if any tensor's shape differs from the config's model."""
        stored = self.manager.item_metadata(step)["state"]
        if stored is None:
            raise CheckpointMismatchError(f"{workdir}: checkpoint step {step} has no readable metadata; it may be "
                                          "corrupt or from another program. Use a fresh --workdir.")
        stored_shapes = {_name(p): tuple(getattr(m, "shape", ()))
                         for p, m in jax.tree_util.tree_leaves_with_path(stored)}
        wanted = {_name(p): tuple(a.shape) for p, a in jax.tree_util.tree_leaves_with_path(abstract_state)}
        for name, want in wanted.items():
            if name not in stored_shapes:
                raise CheckpointMismatchError(
                    f"{workdir} holds a checkpoint (step {step}) of a different model: tensor {name} is missing "
                    f"from it. Use a fresh --workdir, or the config that wrote it (config.json there).")
            if stored_shapes[name] != want:
                raise CheckpointMismatchError(
                    f"{workdir} holds a checkpoint (step {step}) of a differently shaped model: tensor {name} "
                    f"has shape {stored_shapes[name]} in the checkpoint but {want} in the config. "
                    f"Use a fresh --workdir, or the config that wrote it (config.json there).")
        extra = set(stored_shapes) - set(wanted)
        if extra:
            raise CheckpointMismatchError(
                f"{workdir} holds a checkpoint (step {step}) of a different model: it has tensors the config "
                f"lacks, e.g. {sorted(extra)[0]}. Use a fresh --workdir or the config that wrote it.")

    def restore(self, step: int, abstract_state: Any, data_iterator=None) -> Any:
        """Restores into the abstract state's shardings (and the iterator in place)."""
        items = {"state": _restore_args(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

    def restore_params(self, step: int, abstract_params: Any, which: str = "ema") -> Any:
        """Restores only `params` or `ema` (sampling and evaluation jobs need nothing else)."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=_restore_args({which: abstract_params}, partial=True)))
        return restored["state"][which]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def write_config(workdir: str, config) -> None:
    """Stores the run's config as JSON (sampling and evaluation jobs rebuild the model from it)."""
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))


def read_config(workdir: str):
    """The config a training run stored in its work dir."""
    import ml_collections
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: --workdir must be a directory written by sora_jax.train.")
    with open(path) as f:
        raw = json.load(f)
    config = ml_collections.ConfigDict(raw)
    if "model" in config:  # VAE runs have no DiT model section
        config.model.patch = tuple(config.model.patch)
    return config
