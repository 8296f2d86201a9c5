"""Resume, learning, and the train/sample command lines."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from sora_jax.train.loop import train_and_evaluate
from tests.conftest import ROOT, smoke_config


def _final_state(workdir, step):
    mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state", "data"))
    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))["state"]
    data_dir = os.path.join(workdir, "checkpoints", str(step), "data")
    # The directory also holds orbax's commit_success.txt: read the iterator state file itself.
    data = json.load(open(os.path.join(data_dir, next(f for f in sorted(os.listdir(data_dir))
                                                      if f.startswith("process_")))))
    mngr.close()
    return state, data


def assert_same_final_state(workdir_a, workdir_b, step):
    """The two work dirs' checkpoints at `step` are bitwise equal: every state leaf and the iterator state."""
    (a, data_a), (b, data_b) = _final_state(workdir_a, step), _final_state(workdir_b, step)
    assert data_a == data_b
    leaves_a = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(a)}
    leaves_b = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(b)}
    assert sorted(leaves_a) == sorted(leaves_b)
    for path, x in leaves_a.items():
        np.testing.assert_array_equal(np.asarray(x), np.asarray(leaves_b[path]), err_msg=path)


def test_resume_is_bitwise_identical(tmp_path):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    train_and_evaluate(smoke_config(total_steps=4, checkpoint_every_steps=2), straight)
    train_and_evaluate(smoke_config(total_steps=2, checkpoint_every_steps=2), split)  # "stop" after 2
    summary = train_and_evaluate(smoke_config(total_steps=4, checkpoint_every_steps=2), split)  # resume
    assert summary["step"] == 4
    a, data_a = _final_state(straight, 4)
    b, data_b = _final_state(split, 4)
    assert data_a == data_b  # the same data order: the iterators stand at the same place
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    # A run already at total_steps exits at once.
    assert train_and_evaluate(smoke_config(total_steps=4), split) == {"step": 4, "trained": False}


def test_short_run_learns(tmp_path):
    summary = train_and_evaluate(smoke_config(total_steps=40, checkpoint_every_steps=40, log_every_steps=20,
                                              **{"optim.warmup_steps": 5, "ema_decay": 0.9}), str(tmp_path))
    assert summary["val_loss_params"] < 0.85 * summary["val_loss_initial"], summary


def _cli(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "XLA_FLAGS": ""})


def test_sample_cli_writes_media(trained_workdir, tmp_path):
    out = str(tmp_path / "out")
    r = _cli("-m", "sora_jax.sample", f"--workdir={trained_workdir}", "--prompt=a small red circle",
             "--prompt=a large blue square moving to the left", "--width=24", "--height=16", "--frames=2",
             f"--out={out}", "--steps=2", "--guidance=2")
    assert r.returncode == 0, r.stderr[-3000:]
    files = sorted(os.listdir(out))
    assert sum(f.endswith(".mp4") for f in files) == 2 and sum(f.endswith(".gif") for f in files) == 2
    import av
    with av.open(os.path.join(out, [f for f in files if f.endswith(".mp4")][0])) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 2 and frames[0].shape == (16, 24, 3)
    r = _cli("-m", "sora_jax.sample", f"--workdir={trained_workdir}", "--prompt=a small red circle",
             "--width=16", "--height=16", "--frames=1", f"--out={out}/img", "--steps=1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert [f for f in os.listdir(f"{out}/img") if f.endswith(".png")]


def test_divergence_stops_without_saving(tmp_path):
    import pytest
    workdir = str(tmp_path)
    train_and_evaluate(smoke_config(total_steps=2, checkpoint_every_steps=2), workdir)
    with pytest.raises(FloatingPointError, match="stopping without saving"):
        train_and_evaluate(smoke_config(total_steps=4, checkpoint_every_steps=2,
                                        **{"optim.lr": 1e30, "optim.warmup_steps": 0}), workdir)
    assert sorted(d for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()) == ["2"]


def test_window_metrics_sum_skips_and_measure_input_wait():
    import time

    from sora_jax.train.loop import _window_scalars

    class Task:
        throughput_unit = "tokens"

    window = [({"loss": np.float32(loss), "count": np.float32(100)},
               {"padding_fraction": 0.1, "skipped_corrupt": s})
              for loss, s in ((1.0, 2), (3.0, 1))]
    scalars = _window_scalars(Task, window, waits=[0.5, 0.5], t_start=time.perf_counter() - 2.0)
    assert scalars["loss"] == 2.0 and scalars["skipped_corrupt"] == 3.0  # losses averaged, skips summed
    assert 0.45 < scalars["input_wait_fraction"] < 0.5  # 1 s of waiting in a window of just over 2 s
    assert 95 < scalars["tokens_per_sec"] <= 100


def test_sample_cli_refuses_bad_requests_before_generating(trained_workdir, tmp_path):
    existing = tmp_path / "a_file"
    existing.write_text("x")
    cases = {"--width=100000 --height=100000": "GiB", "--guidance=nan": "--guidance=nan", "--width=0": "positive",
             "--fps=0": "--fps=0", f"--out={existing}": "existing file"}
    for flags_, message in cases.items():
        r = _cli("-m", "sora_jax.sample", f"--workdir={trained_workdir}", "--prompt=a small red circle",
                 "--steps=1", *flags_.split())
        assert r.returncode != 0 and message in r.stderr, (flags_, r.stderr[-2000:])
        assert "Traceback" not in r.stderr
    assert existing.read_text() == "x"
