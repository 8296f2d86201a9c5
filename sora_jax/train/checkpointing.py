"""orbax checkpoints of {step, params, opt_state, ema} together with the grain iterator state.

Before a restore, the checkpoint's recorded shapes are compared with the config's model; a mismatch is
an error that names the tensor and both shapes, raised before anything compiles, and the checkpoint is
left untouched. The config of a run is stored beside its checkpoints (config.json) for sampling and
evaluation jobs.

Damaged steps (a truncated or missing file, unparsable metadata or iterator state) are not fatal: the
trainer (restore_newest_good) moves such a step aside to WORKDIR/checkpoints_bad/<step>-<unix time>,
never deleting it, says so in one line, and falls back to the next newest step, or to a fresh start when
none is left. Read-only jobs (restore_params_newest_good) skip damaged steps and move nothing. A good
checkpoint of a differently shaped model is never taken for a damaged one: it stays a
CheckpointMismatchError.

A save that cannot be written (disk full, quota, permissions) is a CheckpointWriteError naming the step,
the cause, the newest complete step (intact: orbax writes into a tmp dir and renames it when complete)
and the fix. Before each save the free space is compared with the bytes this process will write, so a
disk that is clearly too full is reported before anything is written.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import json
import logging
import os
import re
import shutil
import sys
import time
import traceback
from typing import Any, Callable

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from sora_jax import console

BAD_DIR = "checkpoints_bad"


class CheckpointMismatchError(ValueError):
    """The work dir holds a checkpoint of a differently shaped model."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the newest complete one is intact."""


class CorruptCheckpointError(ValueError):
    """A checkpoint step cannot be read back: one of its files is missing, truncated or unparsable."""


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


def _reason(error: BaseException) -> str:
    """Why a read failed, in one line: the root cause's type and first line.

    orbax wraps tensorstore's errors (OUT_OF_RANGE, DATA_LOSS) in a generic Exception whose own message is
    a page of JSON, so the innermost cause is the informative one.
    """
    root = error
    while root.__cause__ is not None or (root.__context__ is not None and not root.__suppress_context__):
        root = root.__cause__ or root.__context__
    lines = str(root).strip().splitlines() or [""]
    line = lines[0].strip() or repr(root)
    return f"{type(root).__name__}: {line[:300]}"


def _is_damage(error: Exception) -> bool:
    """Whether a failed read means the step's files are damaged, rather than something moving the step aside
    would not fix: a checkpoint of another model, or device memory or a device failing."""
    if isinstance(error, CorruptCheckpointError):
        return True
    if isinstance(error, (CheckpointMismatchError, MemoryError, jax.errors.JaxRuntimeError)):
        return False
    return "RESOURCE_EXHAUSTED" not in _reason(error)


def _why(error: Exception) -> str:
    """A CorruptCheckpointError's own message (it already names what broke), else the root cause."""
    return str(error) if isinstance(error, CorruptCheckpointError) else _reason(error)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _error_text(error: BaseException) -> str:
    """Every message of the error's cause chain, whole: orbax re-raises tensorstore's error with the OS cause
    inside, and where in it the OS's reason sits depends on which file failed (a long path can push it past
    the 300 characters _reason keeps)."""
    texts, e = [], error
    while e is not None and len(texts) < 32:
        texts.append(str(e))
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return " ".join(texts)


# The OS errors that make a save fail for want of space or permission.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EROFS)


def _is_write_failure(error: BaseException) -> bool:
    """Whether a save failed for want of space or permission (an OS error), not a bug in the caller."""
    e: BaseException | None = error
    while e is not None:
        if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
            return True
        e = e.__cause__ or e.__context__
    return any(k in _error_text(error) for k in ("os_error_code", "No space left", "Disk quota", "File too large",
                                                 "Permission denied", "Read-only file system"))


def _write_cause(error: BaseException) -> str:
    """The OS's reason in a few words (tensorstore's "...: No space left on device [os_error_code='28']").

    The code is found by its tag and the reason by the OS's own words for that code: tensorstore may put payloads
    between the two (on a failed open, a "[tensorstore_spec='...']" of the whole spec; CI, 2026-12-07)."""
    text = _error_text(error)
    tagged = re.search(r"\[os_error_code='?(\d+)'?\]", text)
    codes = [int(tagged.group(1))] if tagged else list(_WRITE_ERRNOS)
    named = [c for c in codes if os.strerror(c) in text]
    code = named[0] if named else (codes[0] if tagged else None)
    if code == errno.ENOSPC or "No space left" in text:
        return "the disk is full (No space left on device)"
    reason = os.strerror(code) if named else _reason(error)
    return f"the operating system refused the write: {reason}" + (f" (errno {code})" if code else "")


def _failed_step(error: BaseException, default: int | None) -> int | None:
    """The step whose tmp dir the error names (an async save fails while the next one starts)."""
    found = re.search(r"/(\d+)\.orbax-checkpoint-tmp", _error_text(error))
    return int(found.group(1)) if found else default


def _load_json(path: str) -> Any:
    """A JSON file of a checkpoint; CorruptCheckpointError naming the file if it cannot be read or parsed."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CorruptCheckpointError(f"{path} does not read back: {_reason(e)}") from e


def _all_agree(ok: bool) -> bool:
    """True when every process read the step: damage seen by any host makes the step bad for all of them."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def _is_abandoned_read_noise(unraisable) -> bool:
    """Whether an unraisable exception is the aftermath of a failed orbax restore (see _quiet_abandoned_reads)."""
    error = unraisable.exc_value
    if (isinstance(getattr(error, "__cause__", None), GeneratorExit)
            and getattr(unraisable.object, "__name__", "") == "_read_array_index_and_device_put"):
        return True
    return _is_closed_loop_noise(error, unraisable.exc_traceback)


def _is_closed_loop_noise(error: BaseException | None, tb) -> bool:
    """TensorStore completing the futures of abandoned reads or writes on orbax's event loop, closed by then."""
    frames = [f.name for f in traceback.extract_tb(tb)] if tb else []
    return isinstance(error, RuntimeError) and str(error) == "Event loop is closed" and "call_soon_threadsafe" in frames


def _quiet_abandoned_reads() -> None:
    """Drops the noise of a failed restore, keeping its one-line report readable.

    When one array read fails, orbax abandons the others, and each turns the GeneratorExit that closes it
    into an Exception that Python prints as a page ("Exception ignored in <coroutine
    _read_array_index_and_device_put>", TensorStore spec included); TensorStore may then complete their
    futures on a closed event loop; a failed write (full disk) does the same, printed through sys.excepthook.
    Only those are dropped; every other exception still reaches the previous hooks.
    """
    previous, previous_excepthook = sys.unraisablehook, sys.excepthook
    if getattr(previous, "quiets_abandoned_reads", False):
        return

    def hook(unraisable):
        if not _is_abandoned_read_noise(unraisable):
            previous(unraisable)

    def excepthook(kind, value, tb):
        if not _is_closed_loop_noise(value, tb):
            previous_excepthook(kind, value, tb)
    hook.quiets_abandoned_reads = True
    sys.unraisablehook, sys.excepthook = hook, excepthook


def _report(line: str) -> None:
    """A fault's one line: to the log on every process, to the console once."""
    logging.warning(line, extra=console.FILE_ONLY)  # printed below
    if jax.process_index() == 0:
        print(line, flush=True)


def _compare_shapes(stored: Any, abstract: Any, workdir: str, step: int) -> None:
    """Raises CheckpointMismatchError naming the first tensor whose presence or shape differs."""
    stored_shapes = {_name(p): tuple(getattr(m, "shape", ())) for p, m in jax.tree_util.tree_leaves_with_path(stored)}
    wanted = {_name(p): tuple(a.shape) for p, a in jax.tree_util.tree_leaves_with_path(abstract)}
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


class Checkpointer:
    """Async CheckpointManager over WORKDIR/checkpoints with items "state" and "data"."""

    def __init__(self, workdir: str, keep: int = 3, read_only: bool = False):
        self.workdir, self.read_only = workdir, read_only
        self.moved_aside: list[str] = []  # where this object moved damaged steps, oldest first
        self.in_flight: int | None = None  # the step of the newest save started
        _quiet_abandoned_reads()  # a failed read or write must end as one line, not pages of asyncio noise
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        # The trainer (the one writer; see workdir_lock) removes the tmp dirs of saves a killed run left.
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only,
                                               enable_async_checkpointing=not read_only,
                                               cleanup_tmp_directories=not read_only)
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
        try:
            self._check_space(step, state)
            self.manager.save(step, args=ocp.args.Composite(**items))  # also raises the previous save's error
        except CheckpointWriteError:
            raise
        except Exception as e:  # noqa: BLE001 -- orbax/tensorstore raise bare Exception/ValueError
            if not _is_write_failure(e):
                raise
            previous = self.in_flight  # the async part of the previous save fails while this one starts
            unfinished = previous is not None and not os.path.isdir(os.path.join(self.directory, str(previous)))
            raise self._write_error(_failed_step(e, previous if unfinished else step), _write_cause(e)) from e
        self.in_flight = step

    def _check_space(self, step: int, state: Any) -> None:
        """Refuses a save that cannot fit: this process's shards against the free space (all hosts agree)."""
        need = sum(s.data.nbytes for leaf in jax.tree.leaves(state) if isinstance(leaf, jax.Array)
                   for s in leaf.addressable_shards if s.replica_id == 0)
        free = shutil.disk_usage(self.directory).free
        if not _all_agree(free >= need):
            raise self._write_error(step, f"it needs about {_mib(need)} and the disk has {_mib(free)} free")

    def _write_error(self, step: int, cause: str) -> CheckpointWriteError:
        done = sorted(int(d) for d in os.listdir(self.directory) if d.isdigit() and int(d) != step)
        intact = (f"Checkpoint {done[-1]} is intact; the next run resumes from it and removes the partial save."
                  if done else "No earlier checkpoint exists.")
        free = _mib(shutil.disk_usage(self.directory).free)
        return CheckpointWriteError(
            f"could not write checkpoint {step} to {self.directory}: {cause}. {intact} Free space on that disk "
            f"({free} free now), keep fewer checkpoints (config.keep_checkpoints), or use a --workdir on a larger "
            f"disk; then run the same command again.")

    def data_states(self, step: int) -> tuple[int, list[dict], int] | None:
        """(process count, per-process iterator states, stream start) saved at `step`; None without data.

        Read from the files grain writes (process_<i>-of-<n>.json), so it works whatever the current
        process count is. Raises CorruptCheckpointError when a file is missing or does not parse.
        """
        data_dir = os.path.join(self.directory, str(step), "data")
        found = {}
        for path in glob.glob(os.path.join(data_dir, "process_*-of-*.json")):
            m = re.fullmatch(r"process_(\d+)-of-(\d+)\.json", os.path.basename(path))
            if m:
                found[(int(m.group(2)), int(m.group(1)))] = _load_json(path)
        layout_path = os.path.join(self.directory, str(step), "data_layout", "metadata")
        start = 0
        if os.path.exists(layout_path):
            layout = _load_json(layout_path)
            start = int(layout.get("start", 0)) if isinstance(layout, dict) else 0
        if not found:
            if os.path.isdir(data_dir):  # the item was saved, its state file is gone
                raise CorruptCheckpointError(f"{data_dir} holds no iterator state (process_*-of-*.json)")
            return None
        count = max(n for n, _ in found)
        if any((count, i) not in found for i in range(count)):
            raise CorruptCheckpointError(f"{data_dir} lacks the iterator state of some of its {count} hosts")
        return count, [found[(count, i)] for i in range(count)], start

    def _stored_state_metadata(self, step: int) -> Any:
        """The "state" item's metadata tree; CorruptCheckpointError when it cannot be read."""
        try:
            stored = self.manager.item_metadata(step)["state"]
        except Exception as e:  # orbax, tensorstore and json each raise their own types
            if not _is_damage(e):
                raise
            raise CorruptCheckpointError(f"state metadata unreadable: {_reason(e)}") from e
        if stored is None:
            raise CorruptCheckpointError("state metadata unreadable: orbax found none")
        return stored

    def check_compatible(self, step: int, abstract_state: Any, workdir: str | None = None) -> None:
        """Raises CheckpointMismatchError if any tensor's shape differs from the config's model, and
        CorruptCheckpointError if the step's metadata cannot be read."""
        _compare_shapes(self._stored_state_metadata(step), abstract_state, workdir or self.workdir, step)

    def verify(self, step: int, abstract_state: Any, workdir: str | None = None) -> None:
        """The checks that read no arrays: metadata readable and matching, iterator states parse.

        Raises:
          CorruptCheckpointError: something is unreadable (the step is damaged).
          CheckpointMismatchError: the step is readable but of a differently shaped model.
        """
        self.check_compatible(step, abstract_state, workdir)
        self.data_states(step)

    def move_aside(self, step: int, reason: str) -> str:
        """Moves a damaged step to WORKDIR/checkpoints_bad/<step>-<unix time> (never deletes it) and makes
        the manager forget it; returns the new path. Process 0 moves, the others wait for it."""
        if self.read_only:
            raise PermissionError(f"{self.directory} is opened read-only: step {step} cannot be moved aside.")
        bad_root = os.path.join(os.path.dirname(self.directory), BAD_DIR)
        dest, n = os.path.join(bad_root, f"{step}-{int(time.time())}"), 1
        while os.path.exists(dest):  # the same step damaged twice within a second
            dest, n = os.path.join(bad_root, f"{step}-{int(time.time())}-{n}"), n + 1
        if jax.process_index() == 0:
            os.makedirs(bad_root, exist_ok=True)
            shutil.move(os.path.join(self.directory, str(step)), dest)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
        self.manager.reload()  # its step list is cached
        self.moved_aside.append(dest)
        _report(f"Checkpoint step {step} in {self.directory} is unreadable ({reason}); moved it to {dest}.")
        return dest

    def newest_good_step(self, abstract_state: Any, workdir: str | None = None) -> int | None:
        """The newest step that passes verify(); newer damaged steps are moved aside first.

        Cheap (no arrays are read): a step whose array data is truncated passes, and restore_newest_good
        catches it. A readable step of another model raises CheckpointMismatchError and is left alone.
        """
        while (step := self.latest_step()) is not None:
            try:
                self.verify(step, abstract_state, workdir)
                reason = None
            except CorruptCheckpointError as e:
                reason = _why(e)
            if _all_agree(reason is None):
                return step
            self.move_aside(step, reason or "another process could not read it")
        return None

    def restore_newest_good(self, abstract_state: Any, workdir: str | None = None,
                            make_data: Callable[[int | None], tuple] | None = None) -> tuple[int | None, Any, Any]:
        """Restores the newest step that reads back whole; damaged steps are moved aside on the way.

        Args:
          abstract_state: ShapeDtypeStructs carrying the target shardings (state_spec(...).abstract).
          workdir: the work dir as the user named it, for messages.
          make_data: step (None: a fresh start) -> (data iterator, data start, whether to restore the
            iterator's state). Called for each step tried, so every attempt pairs a step with an iterator
            built for it (an older step may come from a different number of hosts), and an iterator that a
            failed attempt restored in part is dropped. The iterator is restored in place.

        Returns:
          (step, state, data): data is make_data's result for that step; step and state are None when no
          step is left (the caller starts fresh; a line says so if any step was moved aside).
        """
        while True:
            step = self.newest_good_step(abstract_state, workdir)
            data = make_data(step) if make_data is not None else None
            if step is None:
                break
            iterator = data[0] if data is not None and data[2] else None
            try:
                state, reason = self.restore(step, abstract_state, iterator), None
            except Exception as e:  # arrays restored before the failure die with this frame
                if not _is_damage(e):
                    raise
                _quiet_abandoned_reads()
                state, reason = None, _why(e)
            if _all_agree(reason is None):
                return step, state, data
            self.move_aside(step, reason or "another process could not read it")
        if self.moved_aside:  # this run moved steps aside (here or in newest_good_step): say what happens now
            _report(f"No readable checkpoint is left in {self.directory} (the damaged ones are in "
                    f"{os.path.join(os.path.dirname(self.directory), BAD_DIR)}); starting from step 0.")
        return None, None, data

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

    def try_restore_params(self, step: int, abstract_params: Any, which: str = "ema",
                           abstract_state: Any = None) -> Any | None:
        """restore_params, or None after one line saying why if the step is damaged (nothing is moved).

        The stored shapes are checked first: those of `which`, or of the whole state when abstract_state
        is given. Raises CheckpointMismatchError for a readable step of a differently shaped model.
        """
        try:
            stored = self._stored_state_metadata(step)
            if abstract_state is None:  # a missing `which` reads as its tensors missing: a mismatch
                stored, abstract_state = {k: v for k, v in stored.items() if k == which}, {which: abstract_params}
            _compare_shapes(stored, abstract_state, self.workdir, step)
            params, reason = self.restore_params(step, abstract_params, which), None
        except Exception as e:
            # A step deleted while being read (training keeps config.keep_checkpoints) is not damaged.
            if not _is_damage(e) or not os.path.isdir(os.path.join(self.directory, str(step))):
                raise
            _quiet_abandoned_reads()
            params, reason = None, _why(e)
        if _all_agree(reason is None):
            return params
        _report(f"Skipping checkpoint step {step} in {self.directory}: it is unreadable "
                f"({reason or 'another process could not read it'}); left in place.")
        return None

    def restore_params_newest_good(self, abstract_params: Any, which: str = "ema") -> tuple[int | None, Any]:
        """(step, params) of the newest step whose `which` params read back; (None, None) if none does.

        For read-only jobs (sampling, evaluation): damaged steps are skipped with a line each, never moved.
        """
        for step in sorted(self.manager.all_steps(), reverse=True):
            params = self.try_restore_params(step, abstract_params, which)
            if params is not None:
                return step, params
        return None, None

    def wait(self) -> None:
        """Blocks until the pending save is complete; a failed write is a CheckpointWriteError."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            if not _is_write_failure(e):
                raise
            raise self._write_error(_failed_step(e, self.in_flight), _write_cause(e)) from e

    def close(self) -> None:
        """Waits for the pending save (its failure is raised once) and releases orbax's threads."""
        try:
            self.wait()
        except CheckpointWriteError:
            with contextlib.suppress(Exception):
                self.manager.close()
            raise
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
