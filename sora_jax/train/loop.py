"""train_and_evaluate(config, workdir): the whole training job, importable and testable."""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import numpy as np

from sora_jax import sharding
from sora_jax.config_validation import ConfigError, validate, validate_for_mesh
from sora_jax.tasks import build_task
from sora_jax.train import checkpointing
from sora_jax.train.state import count_params, init_state, state_spec
from sora_jax.train.step import make_eval_step, make_train_step


def _history_path(workdir: str) -> str:
    return os.path.join(workdir, "eval_history.json")


def _append_history(workdir: str, record: dict) -> list[dict]:
    """Adds an evaluation record to WORKDIR/eval_history.json (process 0 only; atomic replace)."""
    if jax.process_index() != 0:
        return [record]
    path = _history_path(workdir)
    history = json.load(open(path)) if os.path.exists(path) else []
    history = [h for h in history if h["step"] != record["step"]] + [record]
    with open(path + ".tmp", "w") as f:
        json.dump(history, f, indent=2)
    os.replace(path + ".tmp", path)
    return history


def _check_finite(loss, step: int, workdir: str) -> None:
    if not np.isfinite(float(loss)):
        raise FloatingPointError(
            f"training loss is {float(loss)} at step {step}; stopping without saving. The last good checkpoint "
            f"in {workdir} is intact: lower config.optim.lr or raise config.optim.warmup_steps and resume.")


def evaluate(eval_fn, state: dict, batches: list[dict], frozen, mesh) -> dict:
    """The task's metrics of params and EMA params, averaged over the fixed held-out batches:
    val_<metric>_params and val_<metric>_ema."""
    out = {}
    for which in ("params", "ema"):
        scores = jax.device_get([eval_fn(state[which], sharding.host_to_global(b, mesh), frozen, np.int32(i))
                                 for i, b in enumerate(batches)])
        for name in scores[0]:
            out[f"val_{name}_{which}"] = float(np.mean([s[name] for s in scores]))
    return out


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains (resuming from WORKDIR if it holds a checkpoint) and returns the final summary.

    Order matters for bad input: the config is validated and an existing checkpoint is checked against
    the model before anything is compiled or written.
    """
    validate(config)
    task = build_task(config)
    os.makedirs(workdir, exist_ok=True)
    ckpt = checkpointing.Checkpointer(workdir, keep=config.keep_checkpoints)
    latest = ckpt.latest_step()
    try:
        mesh = sharding.make_mesh(config.mesh)
        rules = sharding.rules_from_config(config)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    validate_for_mesh(config, dict(mesh.shape))
    with sharding.use_mesh(mesh, rules):
        try:
            spec = state_spec(config, mesh, task)
        except sharding.InsufficientShardingError as e:
            raise ConfigError(str(e)) from None
        if latest is not None:
            ckpt.check_compatible(latest, spec.abstract, workdir)
            if latest >= config.total_steps:
                logging.info("%s: checkpoint is already at step %d >= total_steps=%d; nothing to train.",
                             workdir, latest, config.total_steps)
                print(f"Checkpoint in {workdir} is already at step {latest} (total_steps={config.total_steps}); "
                      "nothing to train.")
                ckpt.close()
                return {"step": latest, "trained": False}
        checkpointing.write_config(workdir, config)
        return _run(config, workdir, ckpt, spec, latest, mesh)


def _data_iterator(config, task, ckpt, latest) -> tuple[Any, int, bool]:
    """(this host's data iterator, its stream start, whether its state is to be restored from `latest`).

    A checkpoint written by a different number of hosts cannot restore per-host iterator states; the task
    turns those states into a new stream start instead (see data_pipelines.pipeline.reshard_start).
    """
    pi, pc = jax.process_index(), jax.process_count()
    saved = ckpt.data_states(latest) if latest is not None else None
    if saved is None or saved[0] == pc:
        start = saved[2] if saved else 0
        return iter(task.train_data(pi, pc, start)), start, latest is not None
    count, states, old_start = saved
    try:
        start = task.reshard_start(states, old_start, count)
    except ValueError as e:
        raise ConfigError(f"{ckpt.directory}/{latest} was written by {count} hosts and this run has {pc}: {e}") from None
    logging.warning("Checkpoint %d was written by %d hosts, this run has %d: the data stream resumes at position "
                    "%d (what that repeats: data_pipelines.pipeline.reshard_start).", latest, count, pc, start)
    return iter(task.train_data(pi, pc, start)), start, False


def _window_scalars(task, window: list, waits: list, t_start: float) -> dict:
    """Means of the device and host metrics over a logging window, plus rates and the input-wait share.

    Host metrics named skipped_* are counts, so they are summed, not averaged. The window's wall time is
    taken after fetching its metrics: steps are dispatched asynchronously, so only then have they run.
    """
    got = jax.device_get([m for m, _ in window])
    elapsed = time.perf_counter() - t_start
    scalars = {name: float(np.mean([m[name] for m in got])) for name in got[0] if name != "count"}
    for name in window[0][1]:
        values = [h[name] for _, h in window]
        scalars[name] = float(np.sum(values) if name.startswith("skipped") else np.mean(values))
    scalars["steps_per_sec"] = len(window) / elapsed
    scalars[f"{task.throughput_unit}_per_sec"] = float(sum(m["count"] for m in got)) / elapsed
    # Time the loop spent blocked on the input pipeline, as a share of the window's wall time.
    scalars["input_wait_fraction"] = float(sum(waits)) / elapsed
    return scalars


def _run(config, workdir, ckpt, spec, latest, mesh) -> dict:
    from clu import metric_writers  # imports TensorFlow: only the training job pays for it

    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    task = spec.task
    data_iter, data_start, restore_data = _data_iterator(config, task, ckpt, latest)
    if latest is None:
        state = init_state(config, spec)
    else:
        state = ckpt.restore(latest, spec.abstract, data_iter if restore_data else None)
        logging.info("Resumed from step %d.", latest)
    start = int(state["step"])
    logging.info("Parameters: %d on mesh %s", count_params(state["params"]), dict(mesh.shape))

    frozen = jax.device_put(task.frozen(), spec.frozen_shardings)
    first = next(data_iter)
    train_step = make_train_step(config, spec, first).lower(
        state, sharding.host_to_global(first, mesh), frozen).compile()
    mem = train_step.memory_analysis()
    if mem is not None:
        logging.info("train_step memory: temp %.1f MiB, arguments %.1f MiB",
                     mem.temp_size_in_bytes / 2**20, mem.argument_size_in_bytes / 2**20)
    eval_batches = task.eval_data(jax.process_index(), jax.process_count())
    eval_fn = make_eval_step(config, spec, eval_batches[0])

    if start == 0:
        initial = evaluate(eval_fn, state, eval_batches, frozen, mesh)
        _append_history(workdir, {"step": 0, **initial})
        writer.write_scalars(0, initial)

    batch, window, waits, t_last, skipped = first, [], [], time.perf_counter(), {}
    for step in range(start, config.total_steps):
        if step > start:
            t_wait = time.perf_counter()
            batch = next(data_iter)
            waits.append(time.perf_counter() - t_wait)
        state, metrics = train_step(state, sharding.host_to_global(batch, mesh), frozen)
        window.append((metrics, task.host_metrics(batch)))
        done = step + 1
        if done % config.log_every_steps == 0 or done == config.total_steps:
            scalars = _window_scalars(task, window, waits, t_last)
            _check_finite(scalars["loss"], done, workdir)
            writer.write_scalars(done, scalars)
            skipped.update({k: skipped.get(k, 0) + int(v) for k, v in scalars.items() if k.startswith("skipped")})
            window, waits, t_last = [], [], time.perf_counter()
        if config.eval_every_steps and done % config.eval_every_steps == 0 and done != config.total_steps:
            scores = evaluate(eval_fn, state, eval_batches, frozen, mesh)
            _append_history(workdir, {"step": done, **scores})
            writer.write_scalars(done, scores)
        if done % config.checkpoint_every_steps == 0 or done == config.total_steps:
            # Never write a diverged state over good checkpoints.
            _check_finite(metrics["loss"], done, workdir)
            # The iterator already yielded this step's batch, so its state is where the next step begins.
            ckpt.save(done, state, data_iter, data_start)

    summary = {"step": int(state["step"]), "trained": True, **skipped}
    final = evaluate(eval_fn, state, eval_batches, frozen, mesh)
    history = _append_history(workdir, {"step": int(state["step"]), **final})
    writer.write_scalars(int(state["step"]), final)
    summary.update(final)
    if history[0]["step"] == 0:
        summary.update({f"{k}_initial": v for k, v in history[0].items() if k.endswith("_ema")})
        summary["val_loss_initial"] = history[0].get("val_loss_ema")
    ckpt.close()
    writer.flush()
    return summary
