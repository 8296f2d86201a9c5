"""Surviving faults: damaged checkpoints fall back to the newest good step; one trainer per work dir."""
import glob
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import jax
import pytest

from sora_jax import sharding
from sora_jax.tasks import build_task
from sora_jax.train import checkpointing
from sora_jax.train.loop import train_and_evaluate
from sora_jax.train.state import state_spec
from sora_jax.train.workdir_lock import WorkdirLock, WorkdirLocked
from tests.conftest import ROOT, smoke_config, with_overrides

# --- damaging a copy of the session's trained work dir (checkpoints at steps 2 and 4) -------------------

def _copy(trained_workdir, tmp_path) -> str:
    workdir = str(tmp_path / "w")
    shutil.copytree(trained_workdir, workdir)
    return workdir


def _step_dir(workdir, step) -> str:
    return os.path.join(workdir, "checkpoints", str(step))


def _iterator_json(workdir, step) -> str:
    return glob.glob(os.path.join(_step_dir(workdir, step), "data", "process_*-of-*.json"))[0]


def _truncate_state(workdir, step, keep=0.0):
    """Cuts every array data file (state/ocdbt.process_<i>/d/*) to `keep` of its size: the metadata still
    reads, the arrays do not (OUT_OF_RANGE). One file is not enough: a data file can hold bytes a restore
    does not read (another item's, or none), and losing those does not make the step unreadable. Nor is
    half of each: which arrays land in which half varies between runs (a CI run restored a halved step)."""
    for path in glob.glob(os.path.join(_step_dir(workdir, step), "state", "ocdbt.process_*", "d", "*")):
        os.truncate(path, int(os.path.getsize(path) * keep))


DAMAGE = {  # name -> (damage, words the one-line report must contain)
    "truncated_state": (_truncate_state, "OUT_OF_RANGE"),
    "no_iterator_json": (lambda w, s: os.remove(_iterator_json(w, s)), "holds no iterator state"),
    "empty_iterator_json": (lambda w, s: open(_iterator_json(w, s), "w").close(), "JSONDecodeError"),
    "no_state_dir": (lambda w, s: shutil.rmtree(os.path.join(_step_dir(w, s), "state")), "state metadata unreadable"),
}


def _steps(workdir) -> list[int]:
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def _bad(workdir) -> list[str]:
    root = os.path.join(workdir, checkpointing.BAD_DIR)
    return sorted(os.listdir(root)) if os.path.isdir(root) else []


# --- the trainer: damaged steps are moved aside and the next newest is used ------------------------------

@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_restore_falls_back_past_a_damaged_newest_step(trained_workdir, tmp_path, capsys, damage):
    workdir = _copy(trained_workdir, tmp_path)
    do_damage, words = DAMAGE[damage]
    do_damage(workdir, 4)
    config = smoke_config()
    task = build_task(config)
    mesh = sharding.make_mesh(config.mesh)
    ckpt = checkpointing.Checkpointer(workdir, keep=config.keep_checkpoints)
    with sharding.use_mesh(mesh, sharding.rules_from_config(config)):
        spec = state_spec(config, mesh, task)
        step, state, (data_iter, _, _) = ckpt.restore_newest_good(
            spec.abstract, workdir, lambda s: (iter(task.train_data(0, 1, 0)), 0, s is not None))
    ckpt.close()
    assert step == 2 and int(state["step"]) == 2
    assert data_iter.get_state() == json.load(open(_iterator_json(workdir, 2)))  # the iterator went back too
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("Checkpoint step 4 in"))
    assert words in line and f"moved it to {os.path.join(workdir, 'checkpoints_bad', '4-')}" in line, line
    assert _steps(workdir) == [2] and [b.split("-")[0] for b in _bad(workdir)] == ["4"]
    assert os.path.isdir(os.path.join(workdir, "checkpoints_bad", _bad(workdir)[0], "data"))  # kept, not deleted


def test_truncated_newest_checkpoint_resumes_training_from_the_previous_one(trained_workdir, tmp_path, capsys):
    workdir = _copy(trained_workdir, tmp_path)
    _truncate_state(workdir, 4)
    summary = train_and_evaluate(smoke_config(total_steps=6), workdir)
    out = capsys.readouterr().out
    assert summary["step"] == 6 and summary["trained"], summary
    assert re.search(r"Checkpoint step 4 in .* is unreadable \(ValueError: OUT_OF_RANGE", out), out[-3000:]
    assert "starting from step 0" not in out  # resumed from step 2
    assert _steps(workdir) == [2, 4, 6] and [b.split("-")[0] for b in _bad(workdir)] == ["4"]


def test_no_readable_checkpoint_left_starts_fresh(trained_workdir, tmp_path, capsys):
    workdir = _copy(trained_workdir, tmp_path)
    os.remove(_iterator_json(workdir, 4))
    open(_iterator_json(workdir, 2), "w").close()
    summary = train_and_evaluate(smoke_config(), workdir)
    out = capsys.readouterr().out
    assert summary["step"] == 4 and summary["trained"], summary
    assert "Checkpoint step 4 in" in out and "Checkpoint step 2 in" in out
    assert "No readable checkpoint is left in" in out and "starting from step 0" in out
    assert _steps(workdir) == [2, 4] and sorted(b.split("-")[0] for b in _bad(workdir)) == ["2", "4"]


def test_another_models_checkpoint_is_a_mismatch_and_stays(trained_workdir, tmp_path):
    workdir = _copy(trained_workdir, tmp_path)
    config = smoke_config(**{"model.mlp_ratio": 3.0})
    mesh = sharding.make_mesh(config.mesh)
    ckpt = checkpointing.Checkpointer(workdir)
    with sharding.use_mesh(mesh, sharding.rules_from_config(config)):
        abstract = state_spec(config, mesh, build_task(config)).abstract
        with pytest.raises(checkpointing.CheckpointMismatchError, match="differently shaped model"):
            ckpt.newest_good_step(abstract, workdir)
    ckpt.close()
    assert _steps(workdir) == [2, 4] and not _bad(workdir)  # a good checkpoint is never moved aside


# --- read-only jobs skip damaged steps and move nothing ------------------------------------------------

def test_sampling_and_evaluation_skip_a_damaged_step_without_moving_it(trained_workdir, tmp_path, capsys):
    from sora_jax.evaluate import EvalJob, load_config
    from sora_jax.generation import Sampler
    workdir = _copy(trained_workdir, tmp_path)
    _truncate_state(workdir, 4)
    assert Sampler.from_workdir(workdir).checkpoint_step == 2
    assert re.search(r"Skipping checkpoint step 4 in .*unreadable.*left in place", capsys.readouterr().out)
    assert _steps(workdir) == [2, 4] and not _bad(workdir)

    job = EvalJob(with_overrides(load_config(workdir), **{"eval.evaluators": ("val_loss",)}), workdir)
    assert job.evaluate_step(4) is None and job.restored == 0  # skipped, the job goes on
    assert 4 not in job.poll()[0]  # and not retried at the next poll of --watch
    os.utime(_step_dir(workdir, 4))  # the step written anew (as after the trainer moved it aside): tried again
    assert 4 in job.poll()[0]
    job.close()
    assert "Skipping checkpoint step 4" in capsys.readouterr().out
    assert _steps(workdir) == [2, 4] and not _bad(workdir)

    _truncate_state(workdir, 2)
    with pytest.raises(FileNotFoundError, match="no checkpoint in .* reads back"):
        Sampler.from_workdir(workdir)
    assert _steps(workdir) == [2, 4] and not _bad(workdir)


# --- one writer per work dir ---------------------------------------------------------------------------

def _hold_lock(workdir) -> subprocess.Popen:
    """Another process holding the work dir's lock (a real flock, not this process's)."""
    code = ("import sys, time; from sora_jax.train.workdir_lock import WorkdirLock; "
            "WorkdirLock(sys.argv[1], primary=True).acquire(); print('locked', flush=True); time.sleep(300)")
    proc = subprocess.Popen([sys.executable, "-c", code, workdir], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_trainer_on_a_held_work_dir_is_refused(tmp_path):
    workdir = str(tmp_path / "w")
    holder = _hold_lock(workdir)
    try:
        held_by = rf"pid {holder.pid} on host {re.escape(socket.gethostname())}"
        with pytest.raises(WorkdirLocked, match=held_by + r".*use another --workdir"):
            WorkdirLock(workdir, primary=True).acquire()
        with pytest.raises(WorkdirLocked, match=held_by):  # before anything is built or written
            train_and_evaluate(smoke_config(), workdir)
        assert sorted(os.listdir(workdir)) == [".lock"]
    finally:
        holder.kill()
        holder.wait()


def test_the_after_training_part_runs_under_the_lock(trained_workdir, tmp_path):
    """`then` (the trainer's sampling and results.json) runs before the lock is released: a second trainer
    started meanwhile is refused."""
    workdir = _copy(trained_workdir, tmp_path)
    code = ("import sys; from sora_jax.train.workdir_lock import WorkdirLock, WorkdirLocked\n"
            "try:\n    WorkdirLock(sys.argv[1], primary=True).acquire(); print('free')\n"
            "except WorkdirLocked:\n    print('held')")

    def probe():
        return subprocess.run([sys.executable, "-c", code, workdir], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()

    seen = []
    summary = train_and_evaluate(smoke_config(), workdir, then=lambda s: seen.append(probe()) or {**s, "then": 1})
    assert seen == ["held"] and summary["then"] == 1
    assert probe() == "free"


def test_the_lock_of_a_dead_trainer_is_taken_over(tmp_path, capsys):
    workdir = str(tmp_path / "w")
    holder = _hold_lock(workdir)
    holder.kill()  # SIGKILL: nothing released it, the kernel dropped the flock, the file names the dead pid
    holder.wait()
    with WorkdirLock(workdir, primary=True) as lock:
        assert (f"taking over the lock left by dead process {holder.pid} on {socket.gethostname()}"
                in capsys.readouterr().out)
        assert json.load(open(lock.path))["pid"] == os.getpid()
    assert open(lock.path).read() == ""  # a clean release names no holder: the next one says nothing
    with WorkdirLock(workdir, primary=True):
        assert "taking over" not in capsys.readouterr().out


def test_only_process_zero_locks(tmp_path):
    assert jax.process_index() == 0
    with WorkdirLock(str(tmp_path)) as lock:  # primary=None: decided by jax.process_index()
        assert os.path.exists(lock.path)
    with WorkdirLock(str(tmp_path / "other"), primary=False) as lock:
        assert not os.path.exists(lock.path)


# --- a disk that cannot take the next checkpoint ------------------------------------------------------------

def test_a_save_that_cannot_fit_is_refused_before_writing_and_the_rerun_resumes(trained_workdir, tmp_path,
                                                                                  monkeypatch):
    workdir = _copy(trained_workdir, tmp_path)
    real = shutil.disk_usage
    monkeypatch.setattr(checkpointing.shutil, "disk_usage", lambda path: real(path)._replace(free=100_000))
    with pytest.raises(checkpointing.CheckpointWriteError) as raised:
        train_and_evaluate(smoke_config(total_steps=6, checkpoint_every_steps=1), workdir)
    message = str(raised.value)
    assert re.search(r"could not write checkpoint 5 to .*: it needs about [\d.]+ MiB and the disk has 0\.1 MiB free\. "
                     r"Checkpoint 4 is intact", message), message
    assert "config.keep_checkpoints" in message
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]  # nothing partial written
    monkeypatch.undo()
    assert train_and_evaluate(smoke_config(total_steps=6, checkpoint_every_steps=1), workdir)["step"] == 6


_LIMITED_WRITES = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv.pop(1)), resource.RLIM_INFINITY))
runpy.run_module("sora_jax.train", run_name="__main__", alter_sys=True)
"""


def test_a_failed_write_names_the_step_and_cause_and_keeps_the_previous_checkpoint(trained_workdir, tmp_path):
    """The OS refuses the checkpoint's data file mid-save (a per-file size limit stands in for a full disk,
    which needs a mount this test cannot count on): one error paragraph, the previous step intact."""
    workdir = _copy(trained_workdir, tmp_path)
    cmd = ["--config=configs/tiny.py:smoke", f"--workdir={workdir}", "--config.total_steps=6",
           "--config.checkpoint_every_steps=1", "--config.sample.num_prompts=0"]
    r = subprocess.run([sys.executable, "-c", _LIMITED_WRITES, "200000", *cmd], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert re.match(r"error: could not write checkpoint 5 to \S+: the operating system refused the write: File too "
                    r"large \(errno 27\)\. Checkpoint 4 is intact", last), r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert sorted(d for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()) == ["2", "4"]
    rerun = subprocess.run([sys.executable, "-m", "sora_jax.train", *cmd], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert steps[-1] == 6 and not glob.glob(os.path.join(workdir, "checkpoints", "*tmp*"))


def test_a_full_disk_is_reported_as_such():
    """tensorstore's message on a full disk (copied from a run on a 4 MiB tmpfs) reads as a full disk."""
    error = ValueError("RESOURCE_EXHAUSTED: Failed writing: \"/w/checkpoints/3.orbax-checkpoint-tmp/state.orbax-"
                       "checkpoint-tmp/d/283b\": Failed to write 9915 bytes to file 16: No space left on device "
                       "[os_error_code='28']")
    assert checkpointing._is_write_failure(error)
    assert checkpointing._failed_step(error, None) == 3
    assert checkpointing._write_cause(error) == "the disk is full (No space left on device)"
    assert not checkpointing._is_write_failure(ValueError("a bug in the caller"))
    # The OS's reason far into a long root message (a metadata write in a deep work dir), with the spec between
    # the reason and its code: tensorstore's words on a failed open (reproduced with an RLIMIT_FSIZE, 2026-12-07).
    spec = ("[tensorstore_spec='{\\\"create\\\":true,\\\"driver\\\":\\\"zarr\\\",\\\"metadata\\\":"
            "{\\\"chunks\\\":[10]},\\\"transform\\\":{\\\"input_exclusive_max\\\":[[10]]}}']")
    root = ValueError("OUT_OF_RANGE: Error opening \"zarr\" driver: Error writing \"ema.t_mod.kernel/.zarray\" in "
                      f"OCDBT database at local file \"/{'deep/' * 60}5.orbax-checkpoint-tmp/state\": Failed writing: "
                      f"\"d/9af1.__lock\": Failed to write 399117 bytes to file 4: File too large {spec} "
                      "[os_error_code='27']")
    try:
        try:
            raise root
        except ValueError as e:
            raise Exception("orbax could not save") from e
    except Exception as wrapped:
        assert checkpointing._is_write_failure(wrapped)
        cause = checkpointing._write_cause(wrapped)
        assert cause == "the operating system refused the write: File too large (errno 27)", cause
        assert checkpointing._failed_step(wrapped, None) == 5
    # No code tag at all: the OS's words alone name it.
    denied = ValueError("PERMISSION_DENIED: Failed writing: \"/w/checkpoints/7.orbax-checkpoint-tmp/x\": "
                        "Permission denied")
    assert checkpointing._write_cause(denied) == "the operating system refused the write: Permission denied (errno 13)"
