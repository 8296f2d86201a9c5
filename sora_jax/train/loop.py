"""train_and_evaluate(config, workdir): the whole training job, importable and testable."""
from __future__ import annotations

import json
import logging
import os
import time

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


def _run(config, workdir, ckpt, spec, latest, mesh) -> dict:
    from clu import metric_writers  # imports TensorFlow: only the training job pays for it

    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    task = spec.task
    data_iter = iter(task.train_data(jax.process_index(), jax.process_count()))
    if latest is None:
        state = init_state(config, spec)
    else:
        state = ckpt.restore(latest, spec.abstract, data_iter)
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

    batch, window, t_last = first, [], time.perf_counter()
    for step in range(start, config.total_steps):
        if step > start:
            batch = next(data_iter)
        state, metrics = train_step(state, sharding.host_to_global(batch, mesh), frozen)
        window.append((metrics, task.host_metrics(batch)))
        done = step + 1
        if done % config.log_every_steps == 0 or done == config.total_steps:
            got = jax.device_get([m for m, _ in window])
            _check_finite(got[-1]["loss"], done, workdir)
            elapsed = time.perf_counter() - t_last
            scalars = {name: float(np.mean([m[name] for m in got])) for name in got[0] if name != "count"}
            scalars.update({name: float(np.mean([h[name] for _, h in window])) for name in window[0][1]})
            scalars["steps_per_sec"] = len(window) / elapsed
            scalars[f"{task.throughput_unit}_per_sec"] = float(sum(m["count"] for m in got)) / elapsed
            writer.write_scalars(done, scalars)
            window, t_last = [], time.perf_counter()
        if config.eval_every_steps and done % config.eval_every_steps == 0 and done != config.total_steps:
            scores = evaluate(eval_fn, state, eval_batches, frozen, mesh)
            _append_history(workdir, {"step": done, **scores})
            writer.write_scalars(done, scores)
        if done % config.checkpoint_every_steps == 0 or done == config.total_steps:
            # Never write a diverged state over good checkpoints.
            _check_finite(metrics["loss"], done, workdir)
            # The iterator already yielded this step's batch, so its state is where the next step begins.
            ckpt.save(done, state, data_iter)

    summary = {"step": int(state["step"]), "trained": True}
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
