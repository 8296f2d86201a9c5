"""Preemption and non-finite steps: SIGTERM saves and resumes bitwise; each config.nonfinite policy."""
import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from sora_jax.train.loop import train_and_evaluate
from tests.conftest import ROOT, smoke_config
from tests.test_train import _final_state


def _steps(workdir):
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def test_sigterm_saves_the_current_step_and_the_rerun_matches_an_uninterrupted_run(tmp_path):
    total = 40
    straight = str(tmp_path / "straight")
    train_and_evaluate(smoke_config(total_steps=total, checkpoint_every_steps=1000), straight)

    workdir = str(tmp_path / "preempted")
    cmd = [sys.executable, "-m", "sora_jax.train", "--config=configs/tiny.py:smoke", f"--workdir={workdir}",
           f"--config.total_steps={total}", "--config.checkpoint_every_steps=1000", "--config.log_every_steps=1",
           "--config.sample.num_prompts=0", "--alsologtostderr"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # the first logged step: training is under way
        lines.append(line)
        if "] grad_norm=" in line:
            proc.send_signal(signal.SIGTERM)
            break
    out = "".join(lines) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    saved = _steps(workdir)
    assert len(saved) == 1 and 0 < saved[0] < total, (saved, out[-2000:])  # the step it was at, not 1000s
    assert f"Stopped at step {saved[0]} (SIGTERM)" in out
    assert not os.path.exists(os.path.join(workdir, "results.json"))

    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    a, data_a = _final_state(straight, total)
    b, data_b = _final_state(workdir, total)
    assert data_a == data_b
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_stop_judges_the_updated_parameters_and_keeps_the_good_checkpoint(trained_workdir, tmp_path):
    # lr=inf: step 5's loss is still finite (computed before the update), its updated parameters are not.
    workdir = str(tmp_path / "w")
    shutil.copytree(trained_workdir, workdir)
    with pytest.raises(FloatingPointError, match="step 5 was not finite.*stopping without saving"):
        train_and_evaluate(smoke_config(total_steps=6, checkpoint_every_steps=1, **{"optim.lr": float("inf")}), workdir)
    assert _steps(workdir)[-1] == 4


def test_skip_drops_non_finite_updates_and_stops_after_too_many(trained_workdir, tmp_path):
    from data_pipelines import pipeline
    from sora_jax import sharding
    from sora_jax.tasks import build_task
    from sora_jax.train.state import init_state, state_spec
    from sora_jax.train.step import make_train_step
    config = smoke_config(nonfinite="skip", **{"optim.warmup_steps": 0})
    mesh = sharding.make_mesh(config.mesh)
    with sharding.use_mesh(mesh, sharding.rules_from_config(config)):
        spec = state_spec(config, mesh, build_task(config))
        batch = next(iter(pipeline.packed_dataset(config)))
        poisoned = {**batch, "video": np.full_like(batch["video"], np.nan)}
        step = make_train_step(config, spec, batch)
        state = init_state(config, spec)
        before = jax.device_get(state["params"])
        state, metrics = step(state, sharding.host_to_global(poisoned, mesh), {})
        assert float(metrics["nonfinite"]) == 1.0 and int(state["step"]) == 1
        for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state["params"]))):
            np.testing.assert_array_equal(x, y)  # the update was dropped
        # One finite step: with warmup_steps=0 the first update already runs at the full learning rate.
        state, metrics = step(state, sharding.host_to_global(batch, mesh), {})
        assert float(metrics["nonfinite"]) == 0.0
        changed = [not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(before),
                                                              jax.tree.leaves(jax.device_get(state["params"])))]
        assert any(changed)  # a finite step still trains

    workdir = str(tmp_path / "w")
    shutil.copytree(trained_workdir, workdir)
    with pytest.raises(FloatingPointError, match="3 steps in a row"):
        train_and_evaluate(smoke_config(total_steps=12, checkpoint_every_steps=100, log_every_steps=1,
                                        nonfinite="skip", **{"optim.lr": float("inf")}), workdir)
    assert _steps(workdir)[-1] == 4


def test_rollback_restores_the_checkpoint_lowers_the_rate_and_finishes(trained_workdir, tmp_path):
    # lr=1e30 diverges at once; one rollback with factor 1e-30 leaves an effective rate of 1, which trains on.
    workdir = str(tmp_path / "w")
    shutil.copytree(trained_workdir, workdir)
    summary = train_and_evaluate(smoke_config(total_steps=8, checkpoint_every_steps=2, log_every_steps=1,
                                              nonfinite="rollback", nonfinite_lr_factor=1e-30,
                                              **{"optim.lr": 1e30}), workdir)
    assert summary["step"] == 8 and summary["nonfinite_rollbacks"] == 1
    state, _ = _final_state(workdir, 8)
    assert np.isclose(float(state["lr_scale"]), 1e-30)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))


def test_sigkill_during_saves_resumes_from_the_newest_complete_step(tmp_path):
    workdir = str(tmp_path / "killed")
    cmd = [sys.executable, "-m", "sora_jax.train", "--config=configs/tiny.py:smoke", f"--workdir={workdir}",
           "--config.total_steps=400", "--config.checkpoint_every_steps=1", "--config.log_every_steps=1",
           "--config.keep_checkpoints=2", "--config.sample.num_prompts=0", "--alsologtostderr"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = 0
    for line in proc.stdout:  # saving every step: a kill after a few steps lands in or between saves
        seen += "] grad_norm=" in line
        if seen >= 5:
            proc.kill()
            break
    proc.wait(timeout=60)
    complete = _steps(workdir)
    assert complete, "no checkpoint was complete before the kill"
    rerun = subprocess.run([*cmd[:5], "--config.total_steps=" + str(complete[-1] + 2), *cmd[6:]], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"Resuming from checkpoint {complete[-1]}" in rerun.stdout + rerun.stderr
    assert _steps(workdir)[-1] == complete[-1] + 2
    leftovers = [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if "tmp" in d]
    assert not leftovers, leftovers  # the killed save's tmp dir was cleaned up


def test_a_rerun_finishes_what_an_interrupted_after_training_part_left(trained_workdir, tmp_path):
    workdir = str(tmp_path / "w")
    shutil.copytree(trained_workdir, workdir)
    open(os.path.join(workdir, "after_training.pending"), "w").close()  # as a SIGTERM while sampling leaves it
    r = subprocess.run([sys.executable, "-m", "sora_jax.train", "--config=configs/tiny.py:smoke",
                        f"--workdir={workdir}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "finishing them" in r.stdout
    results = json.load(open(os.path.join(workdir, "results.json")))
    assert results["step"] == 4 and results["sample_paths"] and "val_loss_ema" in results
    assert not os.path.exists(os.path.join(workdir, "after_training.pending"))
    again = subprocess.run([sys.executable, "-m", "sora_jax.train", "--config=configs/tiny.py:smoke",
                            f"--workdir={workdir}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "finishing" not in again.stdout
