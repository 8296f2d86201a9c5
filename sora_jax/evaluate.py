"""Offline evaluation job: scores every finalized checkpoint of a training work dir once.

  python -m sora_jax.evaluate --workdir=DIR [--watch] [--poll_seconds=30] [--timeout_seconds=0] \
      [--config.eval.evaluators='("val_loss", "adherence")' --config.eval.mesh.fsdp=2 ...]

The run's config is read from DIR/config.json; `--config.<field>=value` overrides any field of it with
ml_collections' type checks (config.eval holds the job's own fields, see configs/common.py:eval_config).
Each checkpoint's EMA parameters (raw ones with --config.eval.use_ema=False) are restored sharded on
the evaluation mesh (config.eval.mesh, independent of the training mesh) and passed to the evaluators
of config.eval.evaluators (sora_jax/evaluation/evaluators.py). Results go to DIR/eval: results.json
(per step), evaluated.json (the steps done: a restarted job skips them), TensorBoard scalars, and
step_<N>/ with sample videos and per-prompt details.

Without --watch the job evaluates the finalized checkpoints not yet done and exits. With --watch it
keeps polling until the run's last step (config.total_steps) is evaluated, or --timeout_seconds pass
(exit status 1). Checkpoints still being written are skipped until orbax finalizes them
(sora_jax/evaluation/records.py says how that is detected).
"""
from __future__ import annotations

import logging
import os
import sys
import time

import jax
import ml_collections
from absl import app, flags

from sora_jax import console, sharding
from sora_jax.config_validation import ConfigError, validate, validate_for_mesh
from sora_jax.evaluation.evaluators import EvalContext, build_evaluators, run_evaluators, sampling_settings
from sora_jax.evaluation.records import EvalRecords, scan_step_dirs
from sora_jax.tasks import build_task
from sora_jax.train import checkpointing
from sora_jax.train.checkpointing import CheckpointMismatchError
from sora_jax.train.init_from import LoRAFolding
from sora_jax.train.state import state_spec

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training work dir (config.json and checkpoints/); results go to WORKDIR/eval.")
flags.DEFINE_bool("watch", False, "Keep polling for new checkpoints until config.total_steps is evaluated.")
flags.DEFINE_float("poll_seconds", None, "Seconds between polls with --watch (default: config.eval.poll_seconds).")
flags.DEFINE_float("timeout_seconds", None, "With --watch, give up after this many seconds; 0 waits forever "
                   "(default: config.eval.timeout_seconds).")
console.define_verbose_flag()


def _without_lora(config) -> ml_collections.ConfigDict:
    """The config of the plain model a LoRA run's adapters fold into."""
    plain = ml_collections.ConfigDict(config.to_dict())
    plain.lora.rank = 0
    return plain


def _tuples(x):
    """JSON lists -> tuples, recursively: ml_collections overrides tuples from the command line, not lists."""
    if isinstance(x, dict):
        return {k: _tuples(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return tuple(_tuples(v) for v in x)
    return x


def _merge(defaults: dict, stored: dict) -> dict:
    out = dict(defaults)
    for k, v in stored.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The run's config from WORKDIR/config.json, ready for `--config.*` overrides.

    config.eval fields the stored config lacks (a run from before a field existed) take the defaults
    of configs/common.py:eval_config when the repository's configs package is importable.
    """
    raw = _tuples(checkpointing.read_config(workdir).to_dict())
    try:
        from configs.common import eval_config
        raw["eval"] = _merge(eval_config(raw.get("task", "dit")).to_dict(), raw.get("eval", {}))
    except ImportError:
        logging.info("configs.common is not importable; config.eval is taken from config.json as it is.")
    return ml_collections.ConfigDict(raw)


def _headline(scalars: dict) -> str:
    """The per-step console line: every scalar but the per-bucket losses (those go to the log)."""
    return " ".join(f"{k}={v:.4g}" for k, v in scalars.items() if not k.startswith("val_loss_t"))


class EvalJob:
    """The evaluation of one work dir: mesh, abstract parameters, evaluators and bookkeeping.

    Everything that can be wrong with the config (fields, evaluator names, mesh, weights files) raises
    ConfigError here, before any checkpoint is restored or anything compiled.
    """

    def __init__(self, config, workdir: str):
        self.config, self.workdir = config, workdir
        self.task = build_task(config)
        validate(config, self.task)
        self.evaluators = build_evaluators(config)
        try:
            self.mesh = sharding.make_mesh(config.eval.mesh)
            self.rules = sharding.rules_from_config(config)
        except ValueError as e:
            raise ConfigError(str(e).replace("config.mesh", "config.eval.mesh")) from None
        try:
            validate_for_mesh(config, dict(self.mesh.shape), self.task)
        except ConfigError as e:
            raise ConfigError(f"config.eval.mesh {dict(self.mesh.shape)}: {e}".replace(
                "change config.mesh", "change config.eval.mesh")) from None
        self.which = "ema" if config.eval.use_ema else "params"
        with sharding.use_mesh(self.mesh, self.rules):
            try:
                self.spec = state_spec(config, self.mesh, self.task)
                # A LoRA run's checkpoints hold adapters: each is folded into config.init_from's base (loaded
                # once), and the evaluators see the plain model, as the sampler does.
                self.plain = state_spec(_without_lora(config), self.mesh, self.task) if self.spec.lora else self.spec
                self.lora = LoRAFolding(config, self.spec, self.plain.param_shardings) if self.spec.lora else None
            except sharding.InsufficientShardingError as e:
                raise ConfigError(f"config.eval.mesh: {e}") from None
        self.frozen = jax.device_put(self.task.frozen(), self.plain.frozen_shardings)
        self.eval_dir = os.path.join(workdir, "eval")
        self.records = EvalRecords(self.eval_dir)
        self.checkpoint_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
        self._ckpt = self._writer = self._sampler = None
        self.restored = 0
        self._checked = False
        # Damaged steps, by the identity of their directory: skipped at later polls (one line, not one per
        # poll) until the trainer moves the step aside and writes that step anew.
        self._damaged: dict[int, tuple[int, int]] = {}

    # --- checkpoints ---------------------------------------------------------------------------------
    def _checkpointer(self):
        if self._ckpt is None and os.path.isdir(self.checkpoint_dir):
            self._ckpt = checkpointing.Checkpointer(self.workdir, read_only=True)
        return self._ckpt

    def poll(self) -> tuple[list[int], list[int]]:
        """(finalized steps not yet evaluated, steps still being written), from a fresh listing."""
        ckpt = self._checkpointer()
        if ckpt is None:
            return [], []
        ckpt.manager.reload()  # the step list is cached at construction; training keeps adding to it
        listed = set(ckpt.manager.all_steps())
        committed, writing = scan_step_dirs(self.checkpoint_dir)
        final = listed & committed
        writing = (writing | (listed - committed)) - final
        final = {s for s in final if self._damaged.get(s) is None or self._damaged[s] != self._identity(s)}
        return sorted(final - self.records.done), sorted(writing)

    def _identity(self, step: int) -> tuple[int, int] | None:
        try:
            st = os.stat(os.path.join(self.checkpoint_dir, str(step)))
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns

    # --- one checkpoint ------------------------------------------------------------------------------
    def _generate(self, params):
        if self.config.get("task", "dit") != "dit":
            return None
        settings = sampling_settings(self.config)

        def generate(prompts, seed):
            from sora_jax.generation import Sampler
            if self._sampler is None:  # built once: its jitted step is reused for every checkpoint
                self._sampler = Sampler(self.config, self.plain.graphdef, params)
            self._sampler.params = params
            return self._sampler.generate(prompts, settings["width"], settings["height"], settings["frames"],
                                          settings["steps"], settings["guidance"], seed, progress=False,
                                          fps=settings["fps"])
        return generate

    def evaluate_step(self, step: int) -> dict | None:
        """Restores `step`, runs the evaluators and records the results; None if the step vanished."""
        ckpt, start = self._checkpointer(), time.perf_counter()
        abstract = self.spec.abstract[self.which]
        with sharding.use_mesh(self.mesh, self.rules):
            try:
                # The first step is checked against the whole state (a mismatch raises). None: the step is
                # damaged; a line said why, and it stays in place (moving it aside is the trainer's job).
                params = ckpt.try_restore_params(step, abstract, self.which,
                                                 None if self._checked else self.spec.abstract)
                self._checked = self._checked or params is not None
            except (FileNotFoundError, ValueError):
                if os.path.isdir(os.path.join(self.checkpoint_dir, str(step))):
                    raise
                logging.warning("checkpoint %d was deleted (training keeps only config.keep_checkpoints) or moved "
                                "aside as damaged before it could be evaluated; skipping it.", step)
                return None
            if params is None:
                self._damaged[step] = self._identity(step)
                return None
            if self.lora is not None:
                params = self.lora.fold(ckpt, step, params)
            self._damaged.pop(step, None)
            self.restored += 1
            restored_s = time.perf_counter() - start
            out_dir = os.path.join(self.eval_dir, f"step_{step}")
            ctx = EvalContext(self.config, self.task, step, self.which, self.plain.graphdef, params, self.mesh,
                              self.frozen, out_dir, self._generate(params))
            scalars, artifacts, _ = run_evaluators(self.evaluators, ctx)
        seconds = time.perf_counter() - start
        result = {**scalars, "checkpoint_params": self.which, "eval_seconds": seconds}
        if artifacts:
            result["artifacts_dir"] = out_dir
        self._write_scalars(step, scalars)
        self.records.add(step, result, write=jax.process_index() == 0)
        logging.info("step %d: restored %s in %.1f s; results %s; artifacts %s", step, self.which, restored_s,
                     scalars, artifacts)
        print(f"eval step {step} ({self.which}): {_headline(scalars)} [{seconds:.1f} s]", flush=True)
        return result

    def _write_scalars(self, step: int, scalars: dict) -> None:
        if self._writer is None:  # created on first use: a restart with nothing new writes no event file
            from clu import metric_writers
            self._writer = metric_writers.create_default_writer(
                self.eval_dir, just_logging=jax.process_index() > 0, asynchronous=False)
        self._writer.write_scalars(step, scalars)
        self._writer.flush()

    # --- the job -------------------------------------------------------------------------------------
    def run(self, watch: bool = False, poll_seconds: float = 30.0, timeout_seconds: float = 0.0) -> dict:
        """Evaluates pending checkpoints (polling with `watch`); returns a summary dict."""
        final_step = int(self.config.total_steps)
        deadline = time.monotonic() + timeout_seconds if watch and timeout_seconds > 0 else None
        new, writing, timed_out = [], [], False
        if watch:
            print(f"Watching {self.checkpoint_dir} until step {final_step} is evaluated "
                  f"(poll every {poll_seconds:g} s{f', timeout {timeout_seconds:g} s' if deadline else ''}).",
                  flush=True)
        try:
            while True:
                pending, writing = self.poll()
                for step in pending:
                    if self.evaluate_step(step) is not None:
                        new.append(step)
                if not watch or any(s >= final_step for s in self.records.done):
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    timed_out = True
                    break
                logging.info("waiting for checkpoints (done: %s; being written: %s)", sorted(self.records.done),
                             writing)
                time.sleep(poll_seconds if deadline is None else
                           max(0.0, min(poll_seconds, deadline - time.monotonic())))
        finally:
            self.close()
        return self._summary(new, writing, timed_out, final_step)

    def close(self) -> None:
        """Flushes the TensorBoard writer and releases the checkpoint manager."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._ckpt is not None:
            self._ckpt.close()
            self._ckpt = None

    def _summary(self, new: list[int], writing: list[int], timed_out: bool, final_step: int) -> dict:
        summary = {"new_steps": new, "evaluated_steps": sorted(self.records.done), "in_progress": writing,
                   "restored": self.restored, "timed_out": timed_out, "results": self.records.results_path}
        done = ", ".join(map(str, sorted(self.records.done))) or "none"
        print(f"Evaluated {len(new)} new checkpoint(s) of {self.workdir}" + (f" (steps {new})" if new else "")
              + f"; done in all: {done}. Results: {self.records.results_path}", flush=True)
        if writing:
            print(f"Skipped checkpoints still being written: steps {writing}.", flush=True)
        if timed_out:
            print(f"Timed out before step {final_step} (config.total_steps) was evaluated.", flush=True)
        logging.info("evaluation summary: %s", summary)
        return summary


def evaluate_workdir(config, workdir: str, watch: bool = False, poll_seconds: float | None = None,
                     timeout_seconds: float | None = None) -> dict:
    """The whole job for one work dir (importable; the CLI is a thin wrapper).

    Returns:
      {"new_steps", "evaluated_steps", "in_progress", "restored", "timed_out", "results"}.
    """
    poll = float(config.eval.poll_seconds if poll_seconds is None else poll_seconds)
    timeout = float(config.eval.timeout_seconds if timeout_seconds is None else timeout_seconds)
    return EvalJob(config, workdir).run(watch, poll, timeout)


def _workdir_from_argv(argv: list[str]) -> str | None:
    """--workdir must be known before absl parses the rest: the `--config.*` flags come from its config."""
    for i, arg in enumerate(argv):
        if arg.startswith("--workdir="):
            return arg.split("=", 1)[1]
        if arg == "--workdir" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _log_path(workdir: str, process_index: int) -> str:
    name = "evaluate.log" if process_index == 0 else f"evaluate.process_{process_index}.log"
    return os.path.join(workdir, "eval", name)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.workdir or "config" not in FLAGS:
        raise app.UsageError("--workdir is required (a directory written by `python -m sora_jax.train`).")
    config = FLAGS.config
    # TensorFlow (clu's event files) is imported later, on the first result: its start-up lines can still be
    # turned off here. Library INFO goes to WORKDIR/eval/evaluate.log (one per process), not the terminal.
    console.quiet_native_logs()
    console.setup_logging(_log_path(FLAGS.workdir, 0), FLAGS.verbose)
    with console.reported_errors((ConfigError, CheckpointMismatchError, FileNotFoundError)):
        sharding.maybe_initialize_distributed(config.distributed)
        if jax.process_index() > 0:
            console.setup_logging(_log_path(FLAGS.workdir, jax.process_index()), FLAGS.verbose)
        summary = evaluate_workdir(config, FLAGS.workdir, FLAGS.watch, FLAGS.poll_seconds, FLAGS.timeout_seconds)
    if summary["timed_out"]:
        sys.exit(f"error: --timeout_seconds passed before step {config.total_steps} was evaluated.")


if __name__ == "__main__":
    _workdir = _workdir_from_argv(sys.argv[1:])
    if _workdir:
        try:
            from ml_collections import config_flags
            config_flags.DEFINE_config_dict("config", load_config(_workdir), "The run's config (from "
                                            "WORKDIR/config.json); override fields with --config.a.b=value.")
        except FileNotFoundError as e:
            sys.exit(f"error: {e}")
        except (AttributeError, KeyError) as e:  # config_flags applies the overrides while defining the flag
            while isinstance(e, BaseException) and e.args:  # ml_collections nests the KeyError
                e = e.args[0]
            message = str(e).replace("\\", "").replace("'", "").replace("\n", ". ")
            sys.exit(f"error: a --config.* override names a field the run's config lacks: {message} (the "
                     f"evaluation job's own fields are under config.eval: configs/common.py:eval_config).")
    app.run(main)
