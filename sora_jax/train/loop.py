"""train_and_evaluate(config, workdir): the whole training job, importable and testable."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

import jax
import numpy as np

from sora_jax import console, sharding
from sora_jax.config_validation import ConfigError, validate, validate_for_mesh
from sora_jax.models.lora import LoRATargetError, fingerprint
from sora_jax.tasks import build_task
from sora_jax.train import checkpointing, init_from
from sora_jax.train.guards import NonFiniteGuard, PreemptionWatch
from sora_jax.train.state import count_params, init_state, state_spec
from sora_jax.train.step import make_eval_step, make_train_step
from sora_jax.train.workdir_lock import WorkdirLock


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


def _say(text: str) -> None:
    """A line for the person at the terminal (process 0 only), printed above the progress bar if one is drawn."""
    if jax.process_index() == 0:
        from tqdm import tqdm
        tqdm.write(text, file=sys.stdout)
        sys.stdout.flush()


def _eval_line(step: int, scores: dict) -> str:
    return f"eval step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in scores.items())


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


def train_and_evaluate(config, workdir: str, task=None, then=None) -> dict:
    """Trains (resuming from WORKDIR if it holds a checkpoint) and returns the final summary.

    task: config's task (sora_jax.tasks.build_task), if the caller has built it already.
    then: summary -> summary, run after training while the work dir's lock is still held (the after-training
      part writes samples and results.json there, so no second trainer may start before it is done).
    Order matters for bad input: the config is validated and an existing checkpoint is checked against
    the model before anything is compiled or written.
    """
    task = task or build_task(config)
    validate(config, task)
    os.makedirs(workdir, exist_ok=True)
    with WorkdirLock(workdir):  # one trainer per work dir: a second one stops here (WorkdirLocked)
        summary = _train_locked(config, task, workdir)
        return summary if then is None else then(summary)


def _train_locked(config, task, workdir: str) -> dict:
    """train_and_evaluate's work, under the work dir's lock."""
    ckpt = checkpointing.Checkpointer(workdir, keep=config.keep_checkpoints)
    try:
        mesh = sharding.make_mesh(config.mesh)
        rules = sharding.rules_from_config(config)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    validate_for_mesh(config, dict(mesh.shape), task)
    with sharding.use_mesh(mesh, rules):
        try:
            spec = state_spec(config, mesh, task)
        except (sharding.InsufficientShardingError, LoRATargetError) as e:
            raise ConfigError(str(e)) from None
        # Damaged newer steps are moved aside (checkpoints_bad/); another model's checkpoint still raises.
        latest = ckpt.newest_good_step(spec.abstract, workdir)
        if config.get("init_from") and latest is not None and not spec.lora:
            _say(f"{workdir} holds checkpoint {latest}: resuming from it (config.init_from is ignored).")
        if latest is not None and latest >= config.total_steps:
            console.commit_log()
            ckpt.close()
            return _already_trained(config, workdir, latest)
        weights = None
        if config.get("init_from") and (spec.lora or latest is None):
            # Read before anything is written or compiled: a mismatch leaves the work dir untouched.
            weights = init_from.load_weights(config, spec.weights_abstract)
        console.commit_log()  # the config is accepted: the log file (if deferred) may now be written
        checkpointing.write_config(workdir, config)
        return _run(config, workdir, ckpt, spec, weights, mesh)


def pending_marker(workdir: str) -> str:
    """A file that exists while the train command's after-training part (samples, results.json) runs."""
    return os.path.join(workdir, "after_training.pending")


def _already_trained(config, workdir: str, latest: int) -> dict:
    """The summary of a run whose checkpoint is at total_steps. If it was stopped after training but
    before its results were written (e.g. preempted while sampling), "finish" asks for that part again."""
    print(f"Checkpoint in {workdir} is already at step {latest} (total_steps={config.total_steps}); "
          "nothing to train.")
    if not os.path.exists(pending_marker(workdir)) or not os.path.exists(_history_path(workdir)):
        return {"step": latest, "trained": False}
    with open(_history_path(workdir)) as f:
        last = json.load(f)[-1]
    print("Its results were never written (interrupted after training): finishing them.")
    return {**{k: v for k, v in last.items() if k != "step"}, "step": latest, "trained": False, "finish": True}


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
        raise ConfigError(f"{ckpt.directory}/{latest} was written by {count} hosts and this run has {pc}: "
                          f"{e}") from None
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


def _mesh_text(mesh) -> str:
    """The mesh's axes of size > 1, e.g. "data=4 fsdp=2" ("one device" when there are none)."""
    return " ".join(f"{k}={v}" for k, v in dict(mesh.shape).items() if v > 1) or "one device"


def _check_base(config, workdir: str, step: int, state: dict, weights) -> None:
    """A LoRA checkpoint's adapters belong to the base weights they were trained on: refuse other ones."""
    stored, now = jax.device_get((state["base_fingerprint"], jax.jit(fingerprint)(weights)))
    if not np.allclose(stored, now, rtol=1e-4, atol=1e-7):
        raise checkpointing.CheckpointMismatchError(
            f"{workdir} holds LoRA adapters (step {step}) trained on other base weights than config.init_from="
            f"{config.init_from} (the base fingerprints differ). Use the init_from that run used (config.json there) "
            "or a fresh --workdir.")


def _run(config, workdir, ckpt, spec, weights, mesh) -> dict:
    from clu import metric_writers  # imports TensorFlow: only the training job pays for it

    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    task = spec.task
    # A step that fails to read back is moved aside and the next newest tried; None: start fresh.
    latest, state, (data_iter, data_start, _) = ckpt.restore_newest_good(
        spec.abstract, workdir, lambda step: _data_iterator(config, task, ckpt, step))
    if latest is None:
        if weights is None and config.get("init_from"):  # every checkpoint turned out damaged: a fresh start
            weights = init_from.load_weights(config, spec.weights_abstract)
        state = init_state(config, spec, weights)
    else:
        if spec.lora:
            _check_base(config, workdir, latest, state, weights)
        logging.info("Resumed from step %d.", latest)
        _say(f"Resuming from checkpoint {latest} in {workdir}.")
    start = int(state["step"])
    n_params = count_params(state["params"])
    logging.info("Parameters: %d on mesh %s", n_params, dict(mesh.shape))
    trained = f"{n_params:,} LoRA parameters over {count_params(weights):,} frozen" if spec.lora else f"{n_params:,}"
    _say(f"{trained} parameters on mesh {_mesh_text(mesh)}; compiling the train step ...")

    base = weights if spec.lora else None
    weights = None  # without LoRA they are the state's now; no second reference
    frozen = jax.device_put(spec.frozen_inputs(task.frozen(), base), spec.frozen_shardings)
    first = next(data_iter)
    train_step = make_train_step(config, spec, first).lower(
        state, sharding.host_to_global(first, mesh), frozen).compile()
    mem = train_step.memory_analysis()
    if mem is not None:
        logging.info("train_step memory: temp %.1f MiB, arguments %.1f MiB",
                     mem.temp_size_in_bytes / 2**20, mem.argument_size_in_bytes / 2**20)
    eval_batches = task.eval_data(jax.process_index(), jax.process_count())
    eval_fn = make_eval_step(config, spec, eval_batches[0])
    run = _Run(config, workdir, ckpt, spec, mesh, writer, data_iter, data_start, train_step, frozen,
               lambda st: evaluate(eval_fn, st, eval_batches, frozen, mesh))
    if start == 0:
        initial = run.evaluate(state)
        _append_history(workdir, {"step": 0, **initial})
        writer.write_scalars(0, initial)
        _say(_eval_line(0, initial))

    with PreemptionWatch() as watch:
        state, preempted = run.train(state, first, watch)
    if preempted:
        ckpt.close()
        writer.flush()
        return {"step": int(state["step"]), "trained": False, "preempted": watch.signal_name or "SIGTERM"}
    summary = {"step": int(state["step"]), "trained": True, **run.skipped}
    if run.guard.skipped or run.guard.rollbacks:
        summary.update(nonfinite_skipped=run.guard.skipped, nonfinite_rollbacks=run.guard.rollbacks)
    final = run.evaluate(state)
    history = _append_history(workdir, {"step": int(state["step"]), **final})
    writer.write_scalars(int(state["step"]), final)
    _say(_eval_line(int(state["step"]), final))
    summary.update(final)
    if history[0]["step"] == 0:
        summary.update({f"{k}_initial": v for k, v in history[0].items() if k.endswith("_ema")})
        summary["val_loss_initial"] = history[0].get("val_loss_ema")
    ckpt.close()
    writer.flush()
    return summary


class _Run:
    """The step loop of one training run: logging windows, evaluation, checkpoints, preemption, and the
    non-finite policy (which may roll the state and the data iterator back to the newest checkpoint)."""

    def __init__(self, config, workdir, ckpt, spec, mesh, writer, data_iter, data_start, train_step, frozen,
                 evaluate_fn):
        self.config, self.workdir, self.ckpt, self.spec, self.mesh = config, workdir, ckpt, spec, mesh
        self.writer, self.data_iter, self.data_start = writer, data_iter, data_start
        self.train_step, self.frozen, self.evaluate = train_step, frozen, evaluate_fn
        self.guard = NonFiniteGuard(config, workdir)
        self.skipped: dict = {}
        self.window, self.waits, self.t_last = [], [], time.perf_counter()

    def train(self, state, first, watch) -> tuple[dict, bool]:
        """Steps from state["step"] to config.total_steps; returns (state, whether preemption stopped it)."""
        self.progress = _Progress(int(state["step"]), self.config.total_steps, self.spec.task.throughput_unit)
        try:
            return self._steps(state, first, watch)
        finally:
            self.progress.close()

    def _steps(self, state, first, watch) -> tuple[dict, bool]:
        c, batch, step = self.config, first, int(state["step"])
        while step < c.total_steps:
            if batch is None:
                t_wait = time.perf_counter()
                batch = next(self.data_iter)
                self.waits.append(time.perf_counter() - t_wait)
            state, metrics = self.train_step(state, sharding.host_to_global(batch, self.mesh), self.frozen)
            self.window.append((metrics, self.spec.task.host_metrics(batch)))
            step, batch = step + 1, None
            self.progress.step(step)
            self.guard.add(step, metrics)
            if step % c.log_every_steps == 0 or step == c.total_steps:
                self._log(step)
            preempted = watch.should_stop(step)  # every step: the multi-host sync point needs each one
            save = step % c.checkpoint_every_steps == 0 or step == c.total_steps or preempted
            if save or step % c.log_every_steps == 0:
                bad = self.guard.check()  # every step before a save is judged; raises under "stop"
                if bad is not None:  # config.nonfinite="rollback"
                    state = self._rollback(bad)
                    step = int(state["step"])
                    self.progress.step(step)
                    continue
            if c.eval_every_steps and step % c.eval_every_steps == 0 and step != c.total_steps:
                scores = self.evaluate(state)
                _append_history(self.workdir, {"step": step, **scores})
                self.writer.write_scalars(step, scores)
                _say(_eval_line(step, scores))
            if save:
                # The iterator already yielded this step's batch, so its state is where the next step begins.
                self.ckpt.save(step, state, self.data_iter, self.data_start)
                self.progress.saved(step)
            if preempted:
                self.ckpt.wait()
                self.progress.close()
                _say(f"Stopped at step {step} ({watch.signal_name or 'preemption'}): checkpoint {step} is saved in "
                     f"{self.workdir}; run the same command again to resume.")
                return state, True
        return state, False

    def _log(self, step: int) -> None:
        scalars = _window_scalars(self.spec.task, self.window, self.waits, self.t_last)
        self.writer.write_scalars(step, scalars)
        self.progress.window(scalars)
        self.skipped.update({k: self.skipped.get(k, 0) + int(v) for k, v in scalars.items() if k.startswith("skipped")})
        self.window, self.waits, self.t_last = [], [], time.perf_counter()

    def _rollback(self, bad: int) -> dict:
        """The newest checkpoint's state (the data iterator goes back with it), its learning-rate scale
        lowered by config.nonfinite_lr_factor."""
        self.ckpt.wait()
        good = self.ckpt.latest_step()
        if good is None:
            self.guard._fail(f"step {bad} was not finite and there is no checkpoint to roll back to")
        state = self.ckpt.restore(good, self.spec.abstract, self.data_iter)
        scale = float(state["lr_scale"]) * self.guard.lr_factor
        state["lr_scale"] = jax.device_put(np.float32(scale), self.spec.shardings["lr_scale"])
        # A warning from our code: it reaches the terminal as one line (sora_jax.console) and the log file.
        logging.warning("step %d was not finite: rolled back to checkpoint %d with the learning rate x%.3g.",
                        bad, good, scale)
        self.window, self.waits, self.t_last = [], [], time.perf_counter()
        return state


class _Progress:
    """The training progress bar (process 0, on stderr): step / total, ETA, and the last logging window's loss
    and throughput. Off a terminal (a batch job's log file) it redraws at most every 30 s."""

    def __init__(self, start: int, total: int, unit: str):
        from tqdm import tqdm
        interactive = sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=start, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True,
                        disable=jax.process_index() != 0, mininterval=0.5 if interactive else 30.0,
                        smoothing=0.1)
        self.unit, self.fields, self.closed = unit, {}, False

    def step(self, step: int) -> None:
        if step >= self.bar.n:
            self.bar.update(step - self.bar.n)
        else:  # rolled back to an earlier checkpoint
            self.bar.n = step
            self.bar.refresh()

    def window(self, scalars: dict) -> None:
        from tqdm import tqdm
        if "loss" in scalars:
            self.fields["loss"] = f"{scalars['loss']:.4g}"
        rate = scalars.get(f"{self.unit}_per_sec")
        if rate is not None:
            self.fields[f"{self.unit}/s"] = tqdm.format_sizeof(rate)
        self._show()

    def saved(self, step: int) -> None:
        self.fields["saved"] = str(step)
        self._show()

    def _show(self) -> None:
        self.bar.set_postfix_str(", ".join(f"{k}={v}" for k, v in self.fields.items()), refresh=False)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.bar.close()
