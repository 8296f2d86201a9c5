"""Bad input: one clear error naming the problem, before anything compiles; the work dir left byte for byte.

The matrix runs each bad input against a copy of a work dir that already holds checkpoints (the session's
trained_workdir), with the train and eval step builders replaced by ones that fail the test if called.
The VAE loaders' tests build their diffusers-format directories with safetensors.numpy and run with torch
and diffusers made unimportable: a bad file is refused without them.
"""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from sora_jax.config_validation import ConfigError
from sora_jax.generation import check_request
from sora_jax.train import loop
from sora_jax.train.checkpointing import CheckpointMismatchError
from sora_jax.train.loop import train_and_evaluate
from tests.conftest import ROOT, check_config, smoke_config


def _cli(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "XLA_FLAGS": ""})


def _snapshot(directory):
    """Every file's bytes (hashed) and every folder, by relative path; the work dir lock file is left out
    (each trainer takes it, even one that stops at once)."""
    seen = {}
    for d, dirs, files in os.walk(directory):
        for name in dirs:
            seen[os.path.relpath(os.path.join(d, name), directory)] = "dir"
        for name in files:
            if name != ".lock":
                with open(os.path.join(d, name), "rb") as f:
                    seen[os.path.relpath(os.path.join(d, name), directory)] = hashlib.sha256(f.read()).hexdigest()
    return seen


@pytest.fixture
def workdir(trained_workdir, tmp_path):
    """A copy of the trained work dir (checkpoints at steps 2 and 4): a test that wrongly writes there
    cannot spoil the session's fixture for the tests after it."""
    return shutil.copytree(trained_workdir, str(tmp_path / "workdir"))


@pytest.fixture
def no_compile(monkeypatch):
    """Fails the test if the trainer gets as far as building its train or eval step."""
    def refuse(*args, **kwargs):
        raise AssertionError("the step builder was called: bad input was not refused before compiling")
    monkeypatch.setattr(loop, "make_train_step", refuse)
    monkeypatch.setattr(loop, "make_eval_step", refuse)


_MISMATCH = "{workdir} holds a checkpoint (step 4) of a "
_FIX = " Use a fresh --workdir, or the config that wrote it (config.json there)."
# (dotted overrides of the smoke config, the error, its exact message; {workdir} is the work dir's path)
BAD_INPUTS = {
    "negative total_steps": (
        {"total_steps": -5}, ConfigError,
        "config.total_steps=-5 is negative; it must be > 0, the step training runs up to."),
    "zero total_steps": (
        {"total_steps": 0}, ConfigError,
        "config.total_steps=0 trains nothing; it must be > 0, the step training runs up to."),
    "sides not divisible by the patch": (
        {"data.sides": (16, 20)}, ConfigError,
        "config.data.sides: height=20 is not divisible by 8 (autoencoder stride 1 x patch 8); its 20 latent "
        "height must be a multiple of the patch size 8."),
    "no frame counts": (
        {"data.frames": ()}, ConfigError,
        'config.data.frames=() is empty; the procedural world needs at least one, e.g. '
        '--config.data.frames="(1, 2, 4)".'),
    "Adam b1 above 1": (
        {"optim.b1": 5.0}, ConfigError,
        "config.optim.b1=5.0 must be in [0, 1): it is the decay rate of Adam's first moment (usually 0.9)."),
    "unknown solver": (
        {"sample.solver": "eulr"}, ConfigError,
        "config.sample.solver='eulr'; choose one of ('euler', 'heun', 'unipc', 'stochastic')."),
    "unknown first-frame rule": (
        {"sample.first_frame": "first"}, ConfigError,
        "config.sample.first_frame='first'; choose one of ('joint', 'image')."),
    "guidance interval upside down": (
        {"sample.guidance_interval": (0.8, 0.2)}, ConfigError,
        "config.sample.guidance_interval=(0.8, 0.2) must satisfy 0 <= lo <= hi <= 1 (e.g. 0.5,1; 0,1: guidance at "
        "every step)."),
    "deeper model": (
        {"model.depth": 3, "total_steps": 8}, CheckpointMismatchError,
        _MISMATCH + "different model: tensor ema/blocks/2/attn/k/bias is missing from it." + _FIX),
    "wider model": (
        {"model.hidden": 64, "total_steps": 8}, CheckpointMismatchError,
        _MISMATCH + "differently shaped model: tensor ema/blocks/0/attn/k/bias has shape (32,) in the "
        "checkpoint but (64,) in the config." + _FIX),
    "wider MLP": (
        {"model.mlp_ratio": 3.0, "total_steps": 8}, CheckpointMismatchError,
        _MISMATCH + "differently shaped model: tensor ema/blocks/0/mlp/fc1/bias has shape (128,) in the "
        "checkpoint but (96,) in the config." + _FIX),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_on_a_checkpointed_workdir(case, workdir, no_compile):
    overrides, error, message = BAD_INPUTS[case]
    before = _snapshot(workdir)
    with pytest.raises(error) as raised:
        train_and_evaluate(smoke_config(**overrides), workdir)
    assert str(raised.value) == message.format(workdir=workdir)
    assert _snapshot(workdir) == before  # nothing written, nothing overwritten, nothing moved aside


# The trainer run as `python -m sora_jax.train`, with its step builders refusing to be called.
_TRAIN_CLI_NO_COMPILE = """
import runpy, sys
from sora_jax.train import loop
def refuse(*args, **kwargs):
    sys.exit("the step builder was called: bad input was not refused before compiling")
loop.make_train_step = loop.make_eval_step = refuse
runpy.run_module("sora_jax.train", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("override, message", [
    ("--config.optim.learning_rate=1",
     "error: --config.optim.learning_rate: config.optim has no field 'learning_rate'. Its fields are b1, b2, "
     "grad_clip, lr, mu_dtype, schedule, warmup_steps, weight_decay."),
    ("--config.modle.hidden=64",
     "error: --config.modle.hidden: config has no field 'modle'. Did you mean --config.model? Its fields are "),
])
def test_unknown_config_field_on_the_command_line(override, message, workdir):
    """One line naming the override, the fields there and the nearest name; no chained tracebacks."""
    before = _snapshot(workdir)
    r = _cli("-c", _TRAIN_CLI_NO_COMPILE, "--config=configs/tiny.py:smoke", f"--workdir={workdir}", override)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), r.stderr[-3000:]
    assert _snapshot(workdir) == before


def test_negative_step_count():
    with pytest.raises(ConfigError, match=r"config\.total_steps=-5 is negative"):
        check_config(smoke_config(total_steps=-5))
    with pytest.raises(ConfigError, match="--steps=-1 must be a positive"):
        check_request(smoke_config(), ["a red circle"], 16, 16, 1, steps=-1)


@pytest.mark.parametrize("overrides, message", [
    (["--config.total_steps=-3"], "error: config.total_steps=-3 is negative"),
    (["--config.model.depth=3", "--config.total_steps=8"], "error: {workdir} holds a checkpoint (step 4) of a "),
])
def test_rejected_config_on_the_command_line_leaves_the_workdir_byte_identical(overrides, message, workdir):
    """The train command's log file is held until the config is accepted: train.log is not appended to."""
    before = _snapshot(workdir)
    r = _cli("-c", _TRAIN_CLI_NO_COMPILE, "--config=configs/tiny.py:smoke", f"--workdir={workdir}", *overrides)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith(message.format(workdir=workdir)), (
        r.stderr[-3000:])
    assert _snapshot(workdir) == before


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
    # A size the patch does not divide: the Python API refuses it naming the nearest valid one; the command
    # rounds to that one and says so (the documented rule: nearest multiple, ties upward).
    with pytest.raises(ConfigError, match=r"width=20 is not divisible by 8 .* nearest valid request is 24x16"):
        check_request(smoke_config(), ["a red circle"], 20, 16, 2, steps=2)
    r = _cli("-m", "sora_jax.sample", f"--workdir={trained_workdir}", f"--out={tmp_path}", "--prompt=a red circle",
             "--width=20", "--height=16", "--frames=2", "--steps=2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "rounded 20x16, 2 frames to 24x16, 2 frames" in r.stdout
    with open(os.path.join(tmp_path, "000_a_red_circle.json")) as f:
        assert json.load(f)["width"] == 24


def test_insufficiently_sharded_parameters_stop_before_compile(tmp_path):
    """hidden 36 on fsdp 8: most parameter bytes would be replicated; a ConfigError names the parameter."""
    config = smoke_config(**{"model.hidden": 36, "model.heads": 2, "param_sharding_tolerance": 0.02,
                             "mesh.data": 1, "mesh.fsdp": 8})
    with pytest.raises(ConfigError, match=r"(?s)not divisible by fsdp=8.*param_sharding_tolerance"):
        train_and_evaluate(config, str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints" / "0")


# --- VAE weights: diffusers-format directories and our own converted ones, without torch ------------------

_WAN = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
            temperal_downsample=[False, True, True])


@pytest.fixture
def no_torch(monkeypatch):
    """`import torch` / `import diffusers` raise ImportError: the loaders must not need them."""
    for name in ("torch", "diffusers"):
        monkeypatch.setitem(sys.modules, name, None)


def _diffusers_layout(ours: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    """Our parameter (name, array) as diffusers stores it: the inverse of sora_jax.convert's mapping."""
    module, leaf = ours.rsplit("/", 1)
    name = f"{module.replace('/', '.')}.{'weight' if leaf == 'kernel' else leaf}".replace(".resample_conv.",
                                                                                          ".resample.1.")
    if leaf == "kernel":  # (*k, I, O) -> (O, I, *k)
        value = np.transpose(value, (value.ndim - 1, value.ndim - 2, *range(value.ndim - 2)))
    elif leaf == "gamma":  # (C,) -> (C, 1, 1, 1)
        value = value.reshape(-1, 1, 1, 1)
    return name, np.ascontiguousarray(value)


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    """A small AutoencoderKLWan directory (config.json + safetensors) with random weights, written by
    safetensors.numpy from our own module's parameter shapes; returns (path, our parameters by name)."""
    from flax import nnx
    from safetensors.numpy import save_file

    from sora_jax.convert.diffusers_vae import _flatten, vae_config_from_diffusers
    from sora_jax.models.vae import CausalVAE
    path = str(tmp_path_factory.mktemp("wan_numpy"))
    abstract = nnx.eval_shape(lambda: CausalVAE(vae_config_from_diffusers(_WAN), rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    ours = {k: rng.normal(size=v.shape).astype(np.float32)
            for k, v in _flatten(nnx.to_pure_dict(nnx.state(abstract, nnx.Param))).items()}
    save_file(dict(_diffusers_layout(k, v) for k, v in ours.items()),
              os.path.join(path, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(_WAN, f)
    return path, ours


def _variant(wan_dir, tmp_path, **config_changes) -> str:
    """A copy of the diffusers directory with config.json fields changed."""
    path = shutil.copytree(wan_dir[0], str(tmp_path / "variant"))
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**raw, **config_changes}, f)
    return path


def test_numpy_written_diffusers_directory_loads(wan_dir, no_torch):
    """The control for the tests below: the intact directory loads, every tensor where it belongs."""
    from flax import nnx

    from sora_jax.convert import load_diffusers_vae
    from sora_jax.convert.diffusers_vae import _flatten
    path, ours = wan_dir
    loaded = _flatten(nnx.to_pure_dict(nnx.state(load_diffusers_vae(path), nnx.Param)))
    assert sorted(loaded) == sorted(ours)
    for name, value in ours.items():
        np.testing.assert_array_equal(np.asarray(loaded[name]), value, err_msg=name)


def test_diffusers_config_that_does_not_match_the_weights(wan_dir, tmp_path, no_torch):
    from sora_jax.convert import load_diffusers_vae
    path = _variant(wan_dir, tmp_path, z_dim=6)
    with pytest.raises(ValueError) as raised:
        load_diffusers_vae(path)
    assert str(raised.value) == (
        "tensor decoder.conv_in.weight: shape (3, 3, 3, 4, 16) ((16, 4, 3, 3, 3) as stored) in "
        f"diffusion_pytorch_model.safetensors but (3, 3, 3, 6, 16) from {path}/config.json; the config does not "
        "match the weights.")


def test_diffusers_tensor_the_config_has_no_place_for(wan_dir, tmp_path, no_torch):
    from safetensors.numpy import save_file

    from sora_jax.convert import load_diffusers_vae
    path = _variant(wan_dir, tmp_path)
    save_file({"decoder.extra.weight": np.zeros((2, 3), np.float32)}, os.path.join(path, "extra.safetensors"))
    with pytest.raises(ValueError) as raised:
        load_diffusers_vae(path)
    assert str(raised.value) == (
        f"tensor decoder.extra.weight: shape (2, 3) in extra.safetensors but no such tensor in the architecture "
        f"of {path}/config.json; the config does not match the weights.")


def test_corrupt_safetensors_file(wan_dir, tmp_path, no_torch):
    from sora_jax.convert import load_diffusers_vae
    path = _variant(wan_dir, tmp_path)
    weights = os.path.join(path, "diffusion_pytorch_model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    with pytest.raises(ValueError, match="^" + re.escape(weights) + r" is not a valid safetensors file \(.+\); "
                                         r"re-download or re-export it\.$"):
        load_diffusers_vae(path)


@pytest.mark.parametrize("suffix", [".bin", ".pt"])
def test_pickle_weights_are_refused(wan_dir, tmp_path, no_torch, suffix):
    from sora_jax.convert import load_diffusers_vae
    path = _variant(wan_dir, tmp_path)
    os.remove(os.path.join(path, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(path, f"diffusion_pytorch_model{suffix}"), "wb") as f:
        f.write(b"\x80\x04not unpickled: refused by its name")
    with pytest.raises(ValueError) as raised:
        load_diffusers_vae(path)
    assert str(raised.value) == (
        f"{path} holds only pickle weights (diffusion_pytorch_model{suffix}); pickle files are refused because "
        "loading them can run arbitrary code. Convert them to .safetensors first.")


@pytest.fixture(scope="module")
def converted(wan_dir, tmp_path_factory):
    """The numpy-written diffusers VAE saved in our own format (what `python -m sora_jax.convert` writes)."""
    from sora_jax.convert import load_diffusers_vae
    from sora_jax.convert.vae_checkpoint import save_vae
    path = str(tmp_path_factory.mktemp("converted") / "vae")
    save_vae(load_diffusers_vae(wan_dir[0]), path)
    return path


def _converted_copy(converted, tmp_path, **config_changes) -> str:
    path = shutil.copytree(converted, str(tmp_path / "vae"))
    with open(os.path.join(path, "vae_config.json")) as f:
        raw = json.load(f)
    with open(os.path.join(path, "vae_config.json"), "w") as f:
        json.dump({**raw, **config_changes}, f)
    return path


def test_converted_vae_whose_config_does_not_match_its_weights(converted, tmp_path, no_torch):
    """orbax would restore the stored shapes into a model built for other ones; the loader refuses first."""
    from sora_jax.convert.vae_checkpoint import load_vae
    path = _converted_copy(converted, tmp_path, z_dim=6)
    with pytest.raises(ValueError) as raised:
        load_vae(path)
    assert str(raised.value) == (
        f"tensor decoder/conv_in/kernel: shape (3, 3, 3, 4, 16) in {path}/params but (3, 3, 3, 6, 16) from "
        f"{path}/vae_config.json; the config does not match the weights; use the vae_config.json written with "
        "them.")
    assert load_vae(_converted_copy(converted, tmp_path / "intact")).cfg.z_dim == 4  # the control


def test_converted_vae_with_damaged_weights(converted, tmp_path, no_torch):
    from sora_jax.convert.vae_checkpoint import load_vae
    path = _converted_copy(converted, tmp_path)
    for d, _, files in os.walk(os.path.join(path, "params")):
        for name in files:
            if os.path.basename(d) == "d":  # orbax's tensor data files
                with open(os.path.join(d, name), "r+b") as f:
                    f.truncate(os.path.getsize(os.path.join(d, name)) // 2)
    with pytest.raises(ValueError, match="^" + re.escape(path) + r"/params does not read back \(.+\); its files are "
                                         r"damaged or incomplete: convert the VAE again"):
        load_vae(path)
