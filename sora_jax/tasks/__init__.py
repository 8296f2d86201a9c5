"""Training tasks: what the one trainer (sora_jax.train) needs to know about a kind of model.

A task bundles a model builder, the data (a checkpointable grain iterator for training and a fixed list
of held-out batches), the loss and the evaluation metrics. The trainer owns everything else -- mesh and
logical-axis shardings, the optimizer and EMA, the jitted step, orbax checkpoints with the iterator
state, clu metrics, resumption and the non-finite-loss stop -- and it is the same for every task.
`config.task` picks one from TASKS:

  dit  the text-to-video diffusion transformer (rectified flow on packed latent tokens)
  vae  the 3D causal VAE (reconstruction + KL, optional perceptual and adversarial terms)
"""
from __future__ import annotations

from typing import Any, Protocol

import jax


class Task(Protocol):
    """The interface the trainer calls. `model` arguments are merged NNX modules inside jit."""

    # Name of the per-step count returned as metrics["count"]; logged as "<unit>_per_sec".
    throughput_unit: str

    def validate(self) -> None:
        """Raises ConfigError for a config this task cannot run (before anything compiles)."""

    def validate_for_mesh(self, mesh_shape: dict) -> None:
        """Raises ConfigError for what depends on the mesh (batch divisibility)."""

    def build_model(self, rngs) -> Any:
        """The trainable nnx.Module (only nnx.Param state)."""

    def frozen(self) -> Any:
        """A pytree of non-trained arrays the loss reads (e.g. perceptual-loss weights, a frozen text encoder)."""

    def frozen_axes(self) -> Any:
        """frozen()'s tree with each array's logical axis names (a tuple; () replicates it): the trainer shards
        frozen arrays by the same rules as parameters."""

    def train_data(self, process_index: int, process_count: int, start: int = 0):
        """This host's checkpointable grain IterDataset of training batches (dicts of numpy arrays).

        start: where the run's data stream begins (from reshard_start; 0 for a new run)."""

    def reshard_start(self, states: list[dict], start: int, process_count: int) -> int:
        """The stream start for a run on a different number of hosts than the `process_count` whose
        iterator states (and stream start) a checkpoint holds; ValueError if it cannot be done."""

    def eval_data(self, process_index: int, process_count: int) -> list[dict]:
        """This host's part of a fixed list of held-out batches."""

    def loss(self, model, frozen, batch: dict, key: jax.Array, step: jax.Array) -> tuple[jax.Array, dict]:
        """(scalar loss, metrics); metrics holds "count" plus any scalars worth logging."""

    def eval_metrics(self, model, frozen, batch: dict, key: jax.Array) -> dict:
        """Scalars for one held-out batch; the trainer logs their mean as val_<name>_{params,ema}."""

    def host_metrics(self, batch: dict) -> dict:
        """Scalars computed on the host from a training batch (e.g. padding fraction); names starting with
        "skipped" are counts, summed over a logging window."""

    def after_training(self, workdir: str) -> dict:
        """Process 0, after the last checkpoint: samples, exports; returns entries for results.json."""


from sora_jax.tasks.dit import DiTTask  # noqa: E402
from sora_jax.tasks.vae import VAETask  # noqa: E402

TASKS = {"dit": DiTTask, "vae": VAETask}


def build_task(config) -> Task:
    """The task named by config.task (default "dit")."""
    from sora_jax.config_validation import ConfigError
    name = config.get("task", "dit")
    if name not in TASKS:
        raise ConfigError(f"config.task={name!r}; choose one of {sorted(TASKS)}.")
    return TASKS[name](config)
