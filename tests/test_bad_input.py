"""Bad input: a clear error naming the problem, before any compile; checkpoints never touched."""
import os
import subprocess
import sys

import pytest

from sora_jax.config_validation import ConfigError, validate
from sora_jax.sampling import check_request
from sora_jax.train.checkpointing import CheckpointMismatchError
from sora_jax.train.loop import train_and_evaluate
from tests.conftest import ROOT, smoke_config


def _cli(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "XLA_FLAGS": ""})


def test_unknown_config_field_is_rejected(tmp_path):
    r = _cli("-m", "sora_jax.train", "--config=configs/tiny.py:smoke", f"--workdir={tmp_path}",
             "--config.modle.hidden=64")
    assert r.returncode != 0
    assert "modle" in r.stderr
    assert not os.path.exists(tmp_path / "checkpoints")


def test_negative_step_count():
    with pytest.raises(ConfigError, match="config.total_steps=-5 is negative"):
        validate(smoke_config(total_steps=-5))
    with pytest.raises(ConfigError, match="--steps=-1 must be a positive"):
        check_request(smoke_config(), ["a red circle"], 16, 16, 1, steps=-1)


def test_negative_steps_on_the_command_line(tmp_path):
    r = _cli("-m", "sora_jax.train", "--config=configs/tiny.py:smoke", f"--workdir={tmp_path}",
             "--config.total_steps=-3")
    assert r.returncode != 0 and "total_steps=-3 is negative" in r.stderr


def test_size_not_divisible_by_patch():
    with pytest.raises(ConfigError, match="width=20 is not divisible by 8"):
        check_request(smoke_config(), ["a red circle"], 20, 16, 2, steps=2)
    with pytest.raises(ConfigError, match="height=12 is not divisible by 8"):
        check_request(smoke_config(), ["a red circle"], 16, 12, 2, steps=2)


def test_no_prompt(trained_workdir, tmp_path):
    with pytest.raises(ConfigError, match="no prompt"):
        check_request(smoke_config(), [], 16, 16, 2, steps=2)
    r = _cli("-m", "sora_jax.sample", f"--workdir={trained_workdir}", f"--out={tmp_path}", "--width=16")
    assert r.returncode != 0 and "no prompt" in r.stderr
    r = _cli("-m", "sora_jax.sample", f"--workdir={trained_workdir}", f"--out={tmp_path}", "--prompt=a red circle",
             "--width=20")
    assert r.returncode != 0 and "width=20 is not divisible by 8" in r.stderr


def _snapshot(directory):
    """Every file's mtime but the work dir lock's (each trainer takes it, even one that stops at once)."""
    return {os.path.join(d, f): os.path.getmtime(os.path.join(d, f)) for d, _, fs in os.walk(directory) for f in fs
            if f != ".lock"}


def test_differently_shaped_model_in_workdir(trained_workdir):
    before = _snapshot(trained_workdir)
    with pytest.raises(CheckpointMismatchError, match=r"tensor ema/blocks/0/mlp/fc1/bias has shape \(128,\) in the checkpoint but \(96,\)"):
        train_and_evaluate(smoke_config(total_steps=8, **{"model.mlp_ratio": 3.0}), trained_workdir)
    assert _snapshot(trained_workdir) == before  # nothing written, nothing overwritten


def test_insufficiently_sharded_parameters_stop_before_compile(tmp_path):
    """hidden 36 on fsdp 8: most parameter bytes would be replicated; a ConfigError names the parameter."""
    config = smoke_config(**{"model.hidden": 36, "model.heads": 2, "param_sharding_tolerance": 0.02,
                             "mesh.data": 1, "mesh.fsdp": 8})
    with pytest.raises(ConfigError, match=r"(?s)not divisible by fsdp=8.*param_sharding_tolerance"):
        train_and_evaluate(config, str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints" / "0")
