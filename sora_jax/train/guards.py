"""What the training loop watches besides the loss: preemption signals and non-finite steps.

PreemptionWatch turns SIGTERM / SIGINT into a request the loop honours at the next step boundary: save a
checkpoint at the current step, then exit cleanly. On several hosts the save step is agreed through JAX's
preemption sync point (the coordination service propagates the notice), so every host saves the same step.

NonFiniteGuard applies config.nonfinite to the per-step `nonfinite` flags the train step returns (a step
whose loss, gradient norm or updated parameters are not finite). Flags are fetched in batches, at logging
and checkpoint boundaries, so steps stay asynchronous; a checkpoint is only written after the steps
before it have been judged.
"""
from __future__ import annotations

import logging
import os
import signal
import threading

import jax

from sora_jax import console


class PreemptionWatch:
    """Context manager: SIGTERM and SIGINT set a flag instead of killing the process.

    A second SIGINT (Ctrl-C twice) gets Python's default behaviour back, so an impatient user can still
    interrupt at once. On several hosts SIGTERM is left to JAX's own preemption notifier, and a SIGINT is
    passed on to it as a SIGTERM.
    """

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        del frame
        self.signal_name = signal.Signals(signum).name
        # Printed below; the log file gets it too, the console filter not twice.
        logging.warning("%s received: saving a checkpoint at the end of this step, then stopping.", self.signal_name,
                        extra=console.FILE_ONLY)
        print(f"\n{self.signal_name} received: saving a checkpoint at the end of this step, then stopping "
              "(Ctrl-C again to abort without saving).", flush=True)
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            if jax.process_count() > 1:
                # Only this host saw Ctrl-C: hand it to JAX's preemption notifier as a SIGTERM, so every host
                # learns of it through the coordination service and all save the same step.
                os.kill(os.getpid(), signal.SIGTERM)

    def __enter__(self) -> "PreemptionWatch":
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread (e.g. not in a test runner's worker)
        wanted = [signal.SIGINT] + ([signal.SIGTERM] if jax.process_count() == 1 else [])
        for sig in wanted:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def should_stop(self, step: int) -> bool:
        """True when this step is where every host saves and stops."""
        if jax.process_count() > 1:  # one host's signal alone must not stop it: the others would wait forever
            from jax.experimental import multihost_utils
            return multihost_utils.reached_preemption_sync_point(step)
        return self.signal_name is not None


class NonFiniteGuard:
    """Judges steps by their `nonfinite` flag under config.nonfinite ("stop" | "skip" | "rollback")."""

    def __init__(self, config, workdir: str):
        self.policy = config.get("nonfinite", "stop")
        self.max_skips = config.get("nonfinite_max_skips", 3)
        self.max_rollbacks = config.get("nonfinite_max_rollbacks", 3)
        self.lr_factor = config.get("nonfinite_lr_factor", 0.5)
        self.workdir = workdir
        self.pending: list[tuple[int, jax.Array]] = []
        self.consecutive = self.skipped = self.rollbacks = 0

    def add(self, step: int, metrics: dict) -> None:
        """Records step `step`'s flag (a device scalar; not fetched yet)."""
        self.pending.append((step, metrics["nonfinite"]))

    def check(self) -> int | None:
        """Judges the pending steps. Returns the first bad step when the policy is to roll back, else None.

        Raises:
          FloatingPointError: under "stop" at the first bad step; under "skip" after max_skips in a row;
            under "rollback" after max_rollbacks. Nothing is saved: the newest checkpoint stays the last good one.
        """
        steps = [s for s, _ in self.pending]
        flags = jax.device_get([f for _, f in self.pending])
        self.pending = []
        for step, bad in zip(steps, flags):
            if not bad:
                self.consecutive = 0
                continue
            if self.policy == "stop":
                self._fail(f"step {step} was not finite (loss, gradient or updated parameters)")
            if self.policy == "rollback":
                if self.rollbacks >= self.max_rollbacks:
                    self._fail(f"step {step} was not finite after {self.rollbacks} rollbacks")
                self.rollbacks += 1
                return step
            self.skipped += 1
            self.consecutive += 1
            logging.warning("step %d was not finite: its update was dropped (%d in a row).", step, self.consecutive)
            if self.consecutive >= self.max_skips:
                self._fail(f"{self.consecutive} steps in a row (the last: {step}) were not finite")
        return None

    def _fail(self, what: str) -> None:
        raise FloatingPointError(
            f"{what}; stopping without saving (config.nonfinite={self.policy!r}). The last good checkpoint in "
            f"{self.workdir} is intact: lower config.optim.lr or raise config.optim.warmup_steps and resume, or "
            "set config.nonfinite='skip' / 'rollback'.")
