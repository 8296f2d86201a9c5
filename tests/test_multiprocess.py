"""Two JAX processes x 4 CPU devices on localhost (gloo collectives): one sharded training job."""
import json
import os
import socket
import subprocess
import sys

from tests.conftest import ROOT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_training_and_resume(tmp_path):
    workdir = str(tmp_path / "mp")
    port = _free_port()

    def launch(total_steps):
        procs = []
        for pid in range(2):
            env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                   "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(pid),
                   "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "sora_jax.train", "--config=configs/tiny.py:smoke", f"--workdir={workdir}",
                 f"--config.total_steps={total_steps}", "--config.sample.num_prompts=0",
                 "--config.mesh.fsdp=2", "--config.distributed=True"],
                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outs = [p.communicate(timeout=600)[0] for p in procs]
        for p, out in zip(procs, outs):
            assert p.returncode == 0, "\n".join(l for l in out.splitlines() if not l.startswith(("I1", "W1")))[-6000:]
        return outs

    launch(2)
    launch(4)  # resumes from step 2 in both processes
    steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert steps[-1] == 4
    # Each process saved its own data-iterator state (a different shard of the source).
    data_dir = os.path.join(workdir, "checkpoints", "4", "data")
    states = [json.load(open(os.path.join(data_dir, f))) for f in sorted(os.listdir(data_dir)) if f.startswith("process_")]
    assert len(states) == 2 and states[0] != states[1]
    results = json.load(open(os.path.join(workdir, "results.json")))
    assert results["step"] == 4 and results["val_loss_params"] > 0

    # The same work dir on ONE process: the two hosts' iterator states become one stream start.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    r = subprocess.run([sys.executable, "-m", "sora_jax.train", "--config=configs/tiny.py:smoke",
                        f"--workdir={workdir}", "--config.total_steps=6", "--config.sample.num_prompts=0",
                        "--config.mesh.fsdp=2", "--alsologtostderr"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "written by 2 hosts, this run has 1" in r.stderr
    layout = json.load(open(os.path.join(workdir, "checkpoints", "6", "data_layout", "metadata")))
    frontier = min(p + 2 * s["parent"]["next_index"] for p, s in enumerate(states))
    assert layout == {"start": frontier, "process_count": 1}
