"""Two JAX processes x 4 CPU devices (gloo collectives on localhost) train what one process x 8 devices
trains, resume for real, and hand their checkpoint to a one-process run.

The 2-process job trains 2 steps, is launched again to step 4 (resuming from its step-2 checkpoint), and
its parameters are compared with a straight 4-step run in this process on the same mesh (data 4 x fsdp 2)
fed the same global batches: host p of 2 reads stream positions p, p + 2, ... and packs its own rows, so
the one-process run reads both hosts' streams and stacks their rows in the order the 2-process global
array holds them.
"""
import glob
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys

import grain.experimental as grain_exp
import jax
import numpy as np
import orbax.checkpoint as ocp

from data_pipelines import pipeline
from sora_jax.tasks.dit import DiTTask
from sora_jax.train.loop import train_and_evaluate
from tests.conftest import ROOT, smoke_config

OVERRIDES = {"sample.num_prompts": 0, "mesh.fsdp": 2}  # data = -1: 4 on both sides
PARAM_TOL = 2e-5  # of each parameter leaf's largest magnitude


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_two_processes(workdir: str, total_steps: int, *extra: str) -> list[subprocess.Popen]:
    port = _free_port()
    procs = []
    for pid in range(2):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
               "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(pid),
               "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "sora_jax.train", "--config=configs/tiny.py:smoke", f"--workdir={workdir}",
             f"--config.total_steps={total_steps}", "--config.distributed=True",
             *(f"--config.{k}={v}" for k, v in OVERRIDES.items()), *extra],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def _finish(procs: list[subprocess.Popen], head: tuple[str, ...] = ("", "")) -> list[str]:
    """Each process's whole output (`head`: what the test already read of it); fails on a non-zero exit."""
    outs = [first + p.communicate(timeout=300)[0] for p, first in zip(procs, head)]
    for p, out in zip(procs, outs):
        kept = [line for line in out.splitlines() if not line.startswith(("I1", "W1"))]
        assert p.returncode == 0, "\n".join(kept)[-6000:]
    return outs


def _launch_two_processes(workdir: str, total_steps: int, *extra: str) -> list[str]:
    return _finish(_start_two_processes(workdir, total_steps, *extra))


def _hashes(directory: str) -> dict:
    """sha256 of every file under `directory`, by relative path."""
    out = {}
    for path in sorted(glob.glob(os.path.join(directory, "**"), recursive=True)):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _logs(workdir: str) -> dict:
    """Process 0's and process 1's log files and their current contents."""
    paths = [os.path.join(workdir, name) for name in ("train.log", "train.process_1.log")]
    return {p: open(p).read() if os.path.exists(p) else "" for p in paths}


def _params(workdir: str, step: int) -> dict:
    """{path: numpy array} of the parameters saved at `step`, whatever devices wrote them."""
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    checkpointer = ocp.PyTreeCheckpointer()
    stored = checkpointer.metadata(path).item_metadata.tree["params"]
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), stored)
    params = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item={"params": stored}, restore_args={"params": as_numpy}, partial_restore=True))["params"]
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def _iterator_states(workdir: str, step: int) -> list[dict]:
    data_dir = os.path.join(workdir, "checkpoints", str(step), "data")
    return [json.load(open(os.path.join(data_dir, f))) for f in sorted(os.listdir(data_dir))
            if f.startswith("process_")]


def _two_host_stream(self, process_index, process_count, start=0):
    """DiTTask.train_data for one process standing in for two: both hosts' packed rows, host 0's first
    (its devices hold the first rows of the data x fsdp batch sharding)."""
    assert (process_index, process_count) == (0, 1)
    hosts = [pipeline.packed_dataset(self.config, "train", p, 2, start) for p in range(2)]
    return grain_exp.ZipIterDataset(hosts).map(
        lambda pair: {k: (np.sum if k.startswith("host_") else np.concatenate)([b[k] for b in pair], 0)
                      for k in pair[0]})


def test_two_processes_train_resume_and_match_one_process(tmp_path, monkeypatch, caplog):
    workdir, reference = str(tmp_path / "mp"), str(tmp_path / "one")
    _launch_two_processes(workdir, 2)
    step2 = os.path.join(workdir, "checkpoints", "2")
    hashes, logs = _hashes(step2), _logs(workdir)
    assert hashes and all("Resumed from" not in text for text in logs.values())

    _launch_two_processes(workdir, 4)
    # The second launch resumed from step 2 in both processes and left that checkpoint as it was.
    for path, before in logs.items():
        assert "Resumed from step 2." in _logs(workdir)[path][len(before):], path
    assert _hashes(step2) == hashes
    states = _iterator_states(workdir, 4)  # each process saved its own iterator (its own shard of the source)
    assert len(states) == 2 and states[0] != states[1]
    results = json.load(open(os.path.join(workdir, "results.json")))
    assert results["step"] == 4 and results["val_loss_params"] > 0

    # One process, 8 devices, the same mesh and global batches, 4 steps straight: the same parameters.
    with monkeypatch.context() as patch:
        patch.setattr(DiTTask, "train_data", _two_host_stream)
        train_and_evaluate(smoke_config(total_steps=4, **OVERRIDES), reference)
    assert _iterator_states(reference, 4)[0]["parents"] == states  # both hosts' streams, read as far
    # Not bitwise: gloo's all-reduce across processes adds the shards' gradients in another order than the
    # in-process one (measured: at most 3e-6 of a leaf's largest value, 16 of 93 leaves bitwise equal).
    got, want = _params(workdir, 4), _params(reference, 4)
    assert got.keys() == want.keys()
    for path, a in want.items():
        np.testing.assert_allclose(got[path], a, rtol=0, atol=PARAM_TOL * float(np.abs(a).max()), err_msg=path)

    # The 2-host work dir resumed by ONE process: the two hosts' iterator states become one stream start.
    with caplog.at_level(logging.WARNING):
        train_and_evaluate(smoke_config(total_steps=6, **OVERRIDES), workdir)
    assert "written by 2 hosts, this run has 1" in caplog.text
    layout = json.load(open(os.path.join(workdir, "checkpoints", "6", "data_layout", "metadata")))
    frontier = min(p + 2 * s["parent"]["next_index"] for p, s in enumerate(states))
    assert layout == {"start": frontier, "process_count": 1}



def test_one_hosts_ctrl_c_or_damage_is_acted_on_by_both_hosts(tmp_path):
    """Only host 1 is interrupted. Its Ctrl-C is passed to JAX's preemption notifier as a SIGTERM (what a
    scheduler sends), the coordination service tells host 0, and both save the same step at the sync point and
    exit 0 -- rather than host 1 leaving alone and host 0 waiting for it forever. Then a step damaged in host
    1's part is moved aside and both hosts resume from the step before."""
    workdir = str(tmp_path / "mp")
    procs = _start_two_processes(workdir, 10_000, "--config.checkpoint_every_steps=100000",
                                 "--config.log_every_steps=1", "--alsologtostderr")
    read = []
    for line in procs[1].stdout:  # a logged step: training is under way on both hosts
        read.append(line)
        if "] grad_norm=" in line:
            procs[1].send_signal(signal.SIGINT)
            break
    outs = _finish(procs, ("", "".join(read)))
    saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert len(saved) == 1 and 0 < saved[0] < 10_000, saved
    assert f"Stopped at step {saved[0]} (preemption)" in outs[0]
    assert len(_iterator_states(workdir, saved[0])) == 2  # both hosts wrote their part of that step

    _launch_two_processes(workdir, saved[0] + 2)
    for path, text in _logs(workdir).items():
        assert f"Resumed from step {saved[0]}." in text, path
    assert os.path.isdir(os.path.join(workdir, "checkpoints", str(saved[0] + 2)))

    # Damage host 1's part of the newest step (its iterator state): the step is moved aside once, both hosts
    # agreeing through a barrier, and both resume from the same earlier step (a host resuming elsewhere than
    # the other would hang or diverge).
    newest, logs = saved[0] + 2, _logs(workdir)
    steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    previous = steps[-2]  # saved[0], or saved[0] + 1 when the smoke config's checkpoint interval fell there
    os.remove(os.path.join(workdir, "checkpoints", str(newest), "data", "process_1-of-2.json"))
    _launch_two_processes(workdir, newest + 2)
    for path, text in _logs(workdir).items():
        assert f"Resumed from step {previous}." in text[len(logs[path]):], path
    assert [d.split("-")[0] for d in os.listdir(os.path.join(workdir, "checkpoints_bad"))] == [str(newest)]
