"""Ahead-of-time compile (sora_jax.aot): memory reports for targets this machine is not.

The TPU case compiles with libtpu's compiler on the CPU; libtpu comes with the `test` extra (jax[tpu]:
a 213 MB wheel, installed in seconds, compile of the smoke model about 15 s), so it is not skipped: a
missing libtpu fails with the install command.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT, with_overrides


def _smoke(**overrides):
    from configs import dit_xl
    return with_overrides(dit_xl.get_config("smoke"), **overrides)


@pytest.fixture(scope="module")
def cpu8_report():
    from sora_jax import aot
    return aot.compile_train_step(_smoke(), "cpu:8", hbm_gib=80)


def test_parse_targets():
    from sora_jax import aot
    assert aot.parse_target("cpu:4") == aot.Target("cpu:4", "cpu", 4)
    # v5p-N counts TensorCores (2 per chip): v5p-128 is 64 chips.
    assert aot.parse_target("v5p-128") == aot.Target("v5p-128", "tpu", 64, "v5p:4x4x4")
    assert aot.parse_target("v5p-8").topology == "v5p:2x2x1"
    assert aot.parse_target("v6e-256") == aot.Target("v6e-256", "tpu", 256, "v6e:16x16")
    assert aot.parse_target("v5litepod-16").topology == "v5e:4x4"
    assert aot.parse_target("v5p:4x4x8").num_devices == 128
    with pytest.raises(aot.AotError, match="GPU targets cannot be compiled"):
        aot.parse_target("h100:8")
    with pytest.raises(aot.AotError, match="not a standard slice"):
        aot.parse_target("v6e-24")


def test_cpu8_reports_memory(cpu8_report, capsys):
    from sora_jax import aot
    r = cpu8_report
    assert r["num_devices"] == 8 and r["mesh"]["fsdp"] == 8
    assert r["model"]["attention"] == "blockwise"  # "auto" resolved for the target platform
    mem = r["memory"]
    assert mem["arguments"] > 0 and mem["temporaries"] > 0 and mem["outputs"] > 0
    assert mem["total"] == (mem["arguments"] + mem["outputs"] - mem["aliased"] + mem["temporaries"]
                            + mem["generated_code"])
    # The donated state comes back as the outputs' buffers; the arguments hold at least the sharded state.
    assert mem["aliased"] >= r["state_bytes_per_device"] * 0.9
    assert mem["arguments"] >= r["state_bytes_per_device"]
    p = r["params"]
    assert p["per_device_bytes"] < p["total_bytes"] and 0 <= p["replicated_share"] <= 0.25
    assert r["fits"] is True and 0 < r["hbm_fraction"] < 1
    print(aot.format_report(r))
    out = capsys.readouterr().out
    assert "temporaries" in out and "replicated share" in out and "fits" in out


def test_step_that_does_not_fit_is_an_error(cpu8_report):
    from sora_jax import aot
    report = dict(cpu8_report)
    with pytest.raises(aot.DoesNotFitError, match="the train step needs") as e:
        aot.check_fit(report, hbm_gib=cpu8_report["memory"]["total"] / 2 / aot.GIB)
    assert e.value.report["fits"] is False and e.value.report["hbm_fraction"] > 1.9


def test_too_small_hbm_fails_before_compiling(monkeypatch):
    from sora_jax import aot
    from sora_jax.train import step
    # The state alone exceeds the budget: no train step may even be built.
    monkeypatch.setattr(step, "make_train_step", lambda *a, **k: pytest.fail("compiled anyway"))
    with pytest.raises(aot.DoesNotFitError, match="train state alone needs") as e:
        aot.compile_train_step(_smoke(), "cpu:8", hbm_gib=1e-5)
    assert "memory" not in e.value.report and e.value.report["state_bytes_per_device"] > 1e-5 * aot.GIB


@pytest.mark.parametrize("name", ["dit_xl", "wan14b", "wan21:14B"])
def test_full_size_configs_are_sized_without_compiling(name):
    import importlib

    from sora_jax import aot
    module, _, arg = name.partition(":")
    # Eight rows: one or more for each of the 8 devices.
    config = with_overrides(importlib.import_module(f"configs.{module}").get_config(arg or None),
                            **{"data.global_batch_rows": 8})
    # Validated, sharded (the sufficiently-sharded check passes) and sized; the tiny budget stops it there.
    with pytest.raises(aot.DoesNotFitError, match="train state alone needs") as e:
        aot.compile_train_step(config, "cpu:8", hbm_gib=1.0)
    params = e.value.report["params"]
    assert params["count"] > (6e8 if name == "dit_xl" else 14e9) and params["replicated_share"] < 0.02


def test_wan_shaped_step_on_precomputed_caption_features_compiles():
    """The Wan configuration trains on caption features of a frozen encoder (text.encoder="precomputed")."""
    from configs import wan21
    from sora_jax import aot
    config = wan21.get_config("tiny")
    assert aot.dit_batch(config)["text"] == ((8, 512, 32), np.float32)
    report = aot.compile_train_step(config, "cpu:8", hbm_gib=80)
    assert report["fits"] is True and report["params"]["count"] > 0


def test_wan14b_smoke_compiles_with_context_axis():
    from configs import wan14b
    from sora_jax import aot
    report = aot.compile_train_step(wan14b.get_config("smoke"), "cpu:8", hbm_gib=80)
    assert report["mesh"]["context"] == 2 and report["mesh"]["fsdp"] == 4 and report["fits"] is True


def test_insufficient_sharding_fails_before_compiling():
    from sora_jax import aot
    with pytest.raises(aot.AotError, match="not sufficiently sharded"):
        aot.compile_train_step(_smoke(param_sharding_tolerance=0.0), "cpu:8")


def test_more_devices_than_started_is_a_clear_error():
    import jax

    from sora_jax import aot
    jax.devices()  # started with conftest's 8 devices, whatever ran before
    with pytest.raises(aot.AotError, match="already started with 8 CPU devices"):
        aot.compile_train_step(_smoke(), "cpu:16")


def _aot_cli(tmp_path, *args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # the CLI sets the device count itself
    return subprocess.run([sys.executable, "-m", "sora_jax.aot", "--config=configs/dit_xl.py:smoke", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_cli_cpu2_writes_json(tmp_path):
    out = tmp_path / "aot.json"
    r = _aot_cli(tmp_path, "--topology=cpu:2", f"--json={out}", "--hbm_gib=16", "--config.model.remat=full")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "per-device memory" in r.stdout and "fits" in r.stdout
    report = json.loads(out.read_text())
    assert report["num_devices"] == 2 and report["mesh"]["fsdp"] == 2
    assert report["model"]["remat"] == "full" and report["overrides"]["model.remat"] == "full"
    assert report["memory"]["total"] > report["memory"]["temporaries"] > 0 and report["fits"] is True


def test_cli_too_small_hbm_exits_1_with_report(tmp_path):
    out = tmp_path / "aot.json"
    r = _aot_cli(tmp_path, "--topology=cpu:2", f"--json={out}", "--hbm_gib=0.00001")
    assert r.returncode == 1 and "train state alone needs" in r.stderr
    assert json.loads(out.read_text())["fits"] is False


def test_tpu_topology_compiles():
    try:
        import libtpu  # noqa: F401
    except ImportError:
        pytest.fail("libtpu is missing: pip install -e '.[test]' (it brings jax[tpu]==0.10.2)")
    from sora_jax import aot
    report = aot.compile_train_step(_smoke(), "v5p-8", hbm_gib=None)
    assert report["tpu_topology"] == "v5p:2x2x1" and report["num_devices"] == 4
    assert report["device_kind"].startswith("TPU v5") and report["hbm_gib"] == 95.0
    assert report["model"]["attention"] == "splash"  # "auto" on a TPU target
    assert report["memory"]["temporaries"] > 0 and report["fits"] is True


def test_tpu_compiler_refusing_the_step_is_does_not_fit():
    from sora_jax import aot
    # Explicit [rows, heads, L, L] float32 logits at 32k tokens: far beyond a v5p chip's 95 GiB.
    config = _smoke(**{"model.attention": "xla", "data.seq_len": 32768})
    with pytest.raises(aot.DoesNotFitError, match="RESOURCE_EXHAUSTED") as e:
        aot.compile_train_step(config, "v5p-2")
    assert e.value.report["fits"] is False and e.value.report["num_devices"] == 1
