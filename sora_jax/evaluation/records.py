"""Bookkeeping of the offline evaluation job: which checkpoints are final, which are done, and the results.

WORKDIR/eval/evaluated.json  {"steps": [2, 4, ...]}   the steps whose results are recorded
WORKDIR/eval/results.json    {"2": {metric: value, ..., "checkpoint_params": "ema", ...}, ...}

Both are replaced atomically (write to a temporary file, then os.replace), and results.json is written
before evaluated.json: a job killed between the two re-evaluates that step on restart and overwrites
the same entry, so no step is ever marked done without its results.

Finalized checkpoints. orbax 0.12.8 writes a step into `<step>.orbax-checkpoint-tmp-<timestamp>` and
renames it to `<step>` when complete on local and POSIX file systems (AtomicRenameTemporaryPath); on
object stores (gs://) it writes `<step>` directly and marks it complete last with a `commit_success.txt`
file (CommitFileTemporaryPath). In 0.12.8 the marker is written in both modes (into the temporary
directory before the rename, or into the final one last), so a step counts as final only when orbax's own
listing (a fresh CheckpointManager read) reports it AND its directory holds commit_success.txt. Anything
else that looks like a step -- a temporary directory, or a step directory without the marker -- is "in
progress" and is looked at again on the next poll.
"""
from __future__ import annotations

import json
import os
import re

COMMIT_MARKER = "commit_success.txt"  # orbax.checkpoint._src.path.atomicity_types.COMMIT_SUCCESS_FILE
TMP_MARKER = ".orbax-checkpoint-tmp"  # ... TMP_DIR_SUFFIX
_STEP_DIR = re.compile(r"^(\d+)(" + re.escape(TMP_MARKER) + r".*)?$")


def atomic_write_json(path: str, obj) -> None:
    """Writes JSON to `path` so that readers see the old or the new file, never a partial one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def is_committed(step_dir: str) -> bool:
    """Whether a step directory is complete: final name and orbax's commit marker inside."""
    return TMP_MARKER not in os.path.basename(step_dir) and os.path.isfile(os.path.join(step_dir, COMMIT_MARKER))


def scan_step_dirs(checkpoint_dir: str) -> tuple[set[int], set[int]]:
    """(steps with a committed directory, steps still being written) under a checkpoint directory."""
    committed, in_progress = set(), set()
    if not os.path.isdir(checkpoint_dir):
        return committed, in_progress
    for name in os.listdir(checkpoint_dir):
        m = _STEP_DIR.match(name)
        path = os.path.join(checkpoint_dir, name)
        if not m or not os.path.isdir(path):
            continue
        (committed if is_committed(path) else in_progress).add(int(m.group(1)))
    return committed, in_progress - committed


class EvalRecords:
    """The done steps and results of WORKDIR/eval, read at start and rewritten after every step."""

    def __init__(self, eval_dir: str):
        self.eval_dir = eval_dir
        self.evaluated_path = os.path.join(eval_dir, "evaluated.json")
        self.results_path = os.path.join(eval_dir, "results.json")
        self.results = self._read(self.results_path, {})
        done = self._read(self.evaluated_path, {"steps": []})
        # A step counts as done only with its results (see the module docstring for the write order).
        self.done = {int(s) for s in done.get("steps", []) if str(s) in self.results}

    @staticmethod
    def _read(path: str, default):
        if not os.path.exists(path):
            return default
        with open(path) as f:
            try:
                return json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON ({e}); it is written atomically, so something else "
                                 "changed it. Delete it to re-evaluate every checkpoint.") from None

    def add(self, step: int, result: dict, write: bool = True) -> None:
        """Records one step's results (results.json first, then evaluated.json); write=False on hosts > 0."""
        self.results[str(step)] = result
        self.results = dict(sorted(self.results.items(), key=lambda kv: int(kv[0])))
        self.done.add(int(step))
        if write:
            os.makedirs(self.eval_dir, exist_ok=True)
            atomic_write_json(self.results_path, self.results)
            atomic_write_json(self.evaluated_path, {"steps": sorted(self.done)})
