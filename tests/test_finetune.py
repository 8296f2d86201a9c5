"""Fine-tuning: config.init_from (a fine-tune from a work dir's weights, not a resume), LoRA adapters (only
they train, only they are checkpointed, over a base re-read at every start and fingerprinted), and the
merged export to diffusers' WanTransformer3DModel."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel
from flax import nnx
from safetensors.torch import load_file

from sora_jax import sharding
from sora_jax.convert import diffusers_wan
from sora_jax.convert.diffusers_wan import apply_dense, load_diffusers_transformer
from sora_jax.models import lora
from sora_jax.tasks import build_task
from sora_jax.train import init_from, loop
from sora_jax.train.checkpointing import CheckpointMismatchError
from sora_jax.train.loop import train_and_evaluate
from sora_jax.train.state import build_model, split_model, state_spec
from tests.conftest import smoke_config, with_overrides
from tests.test_train import _final_state, assert_same_final_state
from tests.test_wan_parity import TINY, _rel_err, _torch_wan

LORA = {"lora.rank": 4, "lora.alpha": 8.0}


def _history(workdir):
    with open(os.path.join(workdir, "eval_history.json")) as f:
        return json.load(f)


def _leaves(tree):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def finetuned(trained_workdir, tmp_path_factory):
    """A 2-step fine-tune of the trained smoke run (a base of the same shapes with other weights)."""
    workdir = str(tmp_path_factory.mktemp("finetuned"))
    train_and_evaluate(smoke_config(init_from=trained_workdir, total_steps=2), workdir)
    return workdir


@pytest.fixture(scope="module")
def lora_run(trained_workdir, tmp_path_factory):
    """4 LoRA steps over the trained smoke run's EMA weights, checkpoints at 2 and 4."""
    workdir = str(tmp_path_factory.mktemp("lora"))
    train_and_evaluate(smoke_config(init_from=trained_workdir, **LORA), workdir)
    return workdir


def test_init_from_a_work_dir_is_a_finetune_from_its_weights(trained_workdir, finetuned, capsys):
    source, new = _history(trained_workdir)[-1], _history(finetuned)
    assert new[0]["step"] == 0 and new[-1]["step"] == 2  # step 0, not the source's 4
    # It starts from the source's EMA weights: the same held-out loss, for params and EMA alike.
    assert new[0]["val_loss_params"] == pytest.approx(source["val_loss_ema"], rel=1e-6)
    assert new[0]["val_loss_ema"] == pytest.approx(source["val_loss_ema"], rel=1e-6)
    state, data = _final_state(finetuned, 2)
    assert int(state["step"]) == 2
    # A fresh optimizer: Adam's count is 2, not the source's 4 + 2.
    counts = [int(x) for p, x in _leaves(state["opt_state"]).items() if "count" in p]
    assert counts and set(counts) == {2}
    # A work dir with checkpoints of its own resumes from them (here: is already done), saying init_from is ignored.
    assert train_and_evaluate(smoke_config(init_from=trained_workdir, total_steps=2), finetuned)["step"] == 2
    assert "config.init_from is ignored" in capsys.readouterr().out


def test_init_from_of_another_shape_is_refused_before_compiling(trained_workdir, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "make_train_step", lambda *a, **k: pytest.fail("compiled anyway"))
    workdir = str(tmp_path / "w")
    with pytest.raises(CheckpointMismatchError, match=r"tensor blocks/0/mlp/fc1/bias has shape \(128,\) there but "
                                                      r"\(64,\) in the config's model"):
        train_and_evaluate(smoke_config(init_from=trained_workdir, **{"model.mlp_ratio": 2.0}), workdir)
    assert not os.path.exists(os.path.join(workdir, "config.json"))


def _is_adapter(path):
    return "lora_a" in path or "lora_b" in path


def _merged_by_hand(trained_workdir, lora_run):
    """({path: array} of the LoRA run's final EMA adapters folded into its base, {path: array} of the base)."""
    state, base = _final_state(lora_run, 4)[0], _final_state(trained_workdir, 4)[0]["ema"]
    config = smoke_config(init_from=trained_workdir, **LORA)
    graphdef, adapters_like, base_like = split_model(nnx.eval_shape(lambda: build_model(config, build_task(config),
                                                                                    nnx.Rngs(0))))
    as_tree = lambda like, restored: jax.tree.unflatten(  # noqa: E731 -- orbax keys block indices by string
        jax.tree.structure(nnx.to_pure_dict(like)), [jnp.asarray(x) for x in jax.tree.leaves(restored)])
    merged = _leaves(lora.merged_params(nnx.merge(graphdef, as_tree(adapters_like, state["ema"]),
                                                  as_tree(base_like, base))))
    return merged, _leaves(as_tree(base_like, base))


def test_a_lora_run_samples_with_its_adapters_folded_into_the_base(trained_workdir, finetuned, lora_run, tmp_path):
    from sora_jax.generation import Sampler
    sampler = Sampler.from_workdir(lora_run)
    assert sampler.checkpoint_step == 4
    merged, _ = _merged_by_hand(trained_workdir, lora_run)
    got = _leaves(sampler.params)
    assert got.keys() == merged.keys()
    for path, x in merged.items():
        np.testing.assert_allclose(got[path], x, rtol=0, atol=1e-6, err_msg=path)
    video = sampler.generate(["a red circle moving right"], 16, 16, 2, steps=2, progress=False)
    assert video.shape == (1, 2, 16, 16, 3)
    # The base in config.init_from replaced by other weights of the same shapes: refused, not sampled.
    moved = shutil.copytree(lora_run, str(tmp_path / "moved"))
    with open(os.path.join(moved, "config.json")) as f:
        stored = json.load(f)
    stored["init_from"] = finetuned
    with open(os.path.join(moved, "config.json"), "w") as f:
        json.dump(stored, f)
    with pytest.raises(CheckpointMismatchError, match="trained on other base weights"):
        Sampler.from_workdir(moved)
    from sora_jax.evaluate import EvalJob, load_config
    with pytest.raises(CheckpointMismatchError, match="trained on other base weights"):
        EvalJob(load_config(moved), moved).run()


def test_the_evaluation_job_scores_a_lora_run_with_its_adapters_folded(lora_run, tmp_path):
    """Each checkpoint's adapters folded into config.init_from's base: the held-out loss (one timestep bucket)
    is the one the trainer logged for that step."""
    from sora_jax.evaluate import EvalJob, load_config
    workdir = shutil.copytree(lora_run, str(tmp_path / "lora"))
    config = with_overrides(load_config(workdir), **{"eval.evaluators": ("val_loss",), "eval.timestep_buckets": 1})
    job = EvalJob(config, workdir)
    assert job.lora is not None
    job.run()
    with open(os.path.join(workdir, "eval", "results.json")) as f:
        results = json.load(f)
    logged = {h["step"]: h["val_loss_ema"] for h in _history(lora_run)}
    assert sorted(results) == ["2", "4"] and sorted(logged) == [0, 4]
    assert results["4"]["val_loss"] == pytest.approx(logged[4], rel=1e-5)
    assert results["2"]["val_loss"] != results["4"]["val_loss"]  # each step's own adapters were folded


def test_lora_trains_and_checkpoints_only_adapters(trained_workdir, lora_run):
    source = _history(trained_workdir)[-1]
    history = _history(lora_run)
    # B = 0: step 0 is exactly the base model.
    assert history[0]["val_loss_params"] == pytest.approx(source["val_loss_ema"], rel=1e-6)
    assert history[-1]["val_loss_params"] != history[0]["val_loss_params"]
    state, _ = _final_state(lora_run, 4)
    assert sorted(state) == ["base_fingerprint", "ema", "lr_scale", "opt_state", "params", "step"]
    params, ema, opt = _leaves(state["params"]), _leaves(state["ema"]), _leaves(state["opt_state"])
    assert params and all(_is_adapter(p) for p in params) and set(ema) == set(params)
    assert len(params) == 2 * 20  # q, k, v, out of both attentions and fc1, fc2 in 2 blocks; A and B each
    # The optimizer's state exists only for the adapters (besides Adam's scalar step count).
    assert all(_is_adapter(p) for p, x in opt.items() if x.ndim > 0)
    assert sum(x.size for x in opt.values() if x.ndim > 0) == 2 * sum(x.size for x in params.values())
    # The checkpoint's bytes are the adapters' (no base tensor anywhere in it).
    base_size = sum(np.asarray(x).size for x in jax.tree.leaves(_final_state(trained_workdir, 4)[0]["ema"]))
    assert sum(x.size for x in jax.tree.leaves(state)) < base_size
    # The adapters trained: B moved off zero, A from its random start.
    b = [x for p, x in params.items() if "lora_b" in p]
    assert all(np.abs(x).max() > 0 for x in b)
    first = _leaves(_final_state(lora_run, 2)[0]["params"])
    assert any(not np.array_equal(first[p], params[p]) for p in params if "lora_a" in p)
    # The weights the trained model computes with: the base bitwise wherever no adapter is, elsewhere the
    # base kernel plus alpha / rank * A B, which training moved.
    merged, base = _merged_by_hand(trained_workdir, lora_run)
    assert merged.keys() == base.keys()
    adapted = [p for p in base if "'kernel'" in p and any(f"'{layer}']['kernel'" in p for layer in
                                                          ("q", "k", "v", "out", "fc1", "fc2")) and "blocks" in p]
    assert len(adapted) == 20
    for path, x in base.items():
        if path in adapted:
            assert not np.array_equal(merged[path], x), path
        else:
            np.testing.assert_array_equal(merged[path], x, err_msg=path)


def test_lora_resume_is_bitwise_identical(trained_workdir, lora_run, tmp_path):
    """Stopped after checkpoint 2 (step 4's removed), the run resumes there: the base is read again from
    init_from, the adapters, optimizer and data order come from the checkpoint, and step 4 is bitwise the
    uninterrupted run's."""
    split = shutil.copytree(lora_run, str(tmp_path / "split"))
    shutil.rmtree(os.path.join(split, "checkpoints", "4"))
    summary = train_and_evaluate(smoke_config(init_from=trained_workdir, **LORA), split)
    assert summary["step"] == 4 and "val_loss_initial" in summary
    assert_same_final_state(lora_run, split, 4)


def test_lora_checkpoint_of_another_base_is_refused(lora_run, finetuned, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "make_train_step", lambda *a, **k: pytest.fail("compiled anyway"))
    workdir = shutil.copytree(lora_run, str(tmp_path / "w"))
    with pytest.raises(CheckpointMismatchError, match="trained on other base weights"):
        train_and_evaluate(smoke_config(init_from=finetuned, total_steps=6, **LORA), workdir)
    # Adapters of another shape (another rank here; another base size alike) are named with both shapes.
    with pytest.raises(CheckpointMismatchError, match=r"lora_a has shape \(32, 4\) in the checkpoint but \(32, 2\)"):
        train_and_evaluate(smoke_config(init_from=finetuned, total_steps=6, **{**LORA, "lora.rank": 2}), workdir)


def _random_adapters(model, seed=0):
    """Non-zero A and B on every adapted layer, sized so the adapters move the output by a few per cent."""
    keys = iter(jax.random.split(jax.random.key(seed), 1000))
    for _, module in nnx.iter_graph(model):
        if isinstance(module, lora.LoRALinear):
            for var in (module.lora.lora_a, module.lora.lora_b):
                var[...] = 0.3 * jax.random.normal(next(keys), var.shape) / var.shape[-2] ** 0.5


def test_merged_export_loads_in_diffusers_and_matches(tmp_path, monkeypatch):
    src = str(tmp_path / "wan")
    _torch_wan().save_pretrained(src, safe_serialization=True)
    model = load_diffusers_transformer(src, attention="xla")
    rng = np.random.default_rng(0)
    latents = rng.normal(size=(2, 3, 8, 8, 4)).astype(np.float32)  # (B, T, H, W, C)
    context = rng.normal(size=(2, 7, TINY["text_dim"])).astype(np.float32)
    timesteps = np.array([937.5, 62.5], np.float32)
    run = lambda m: np.asarray(apply_dense(m, jnp.asarray(latents), jnp.asarray(timesteps),  # noqa: E731
                                           jnp.asarray(context)))
    base_out = run(model)
    adapted = lora.apply_lora(model, 3, 6.0, lora.DEFAULT_TARGETS, rngs=nnx.Rngs(1))
    assert len(adapted) == 2 * 10
    np.testing.assert_array_equal(run(model), base_out)  # B = 0: an exact no-op
    _random_adapters(model)
    ours = run(model)
    assert _rel_err(ours, base_out) > 1e-2  # the adapters matter far beyond the tolerance

    wan = diffusers_wan.dit_config_from_diffusers(diffusers_wan.read_config(src))
    out = diffusers_wan.save_diffusers_transformer(model, wan, str(tmp_path / "merged"))
    # Without `accelerate` installed, from_pretrained refuses classes that keep modules in float32 (a memory
    # option of half-precision loads); everything here is float32 already, so the option changes nothing.
    monkeypatch.setattr(WanTransformer3DModel, "_keep_in_fp32_modules", None)
    theirs = WanTransformer3DModel.from_pretrained(out).float().eval()
    # Every tensor written is one the model has, and every one it has was written (none left at its init).
    assert set(load_file(os.path.join(out, "diffusion_pytorch_model.safetensors"))) == set(theirs.state_dict())
    with torch.no_grad():
        ref = theirs(torch.from_numpy(latents.transpose(0, 4, 1, 2, 3)), torch.from_numpy(timesteps),
                     torch.from_numpy(context), return_dict=False)[0].numpy().transpose(0, 2, 3, 4, 1)
    err = _rel_err(ours, ref)
    print(f"merged export vs diffusers: max relative difference {err:.2e}")
    assert err < 1e-4
    # Without adapters, from stacked (scanned) blocks, the export gives back diffusers' own file bit for bit.
    scanned = nnx.to_pure_dict(nnx.state(load_diffusers_transformer(src, scan_layers=True), nnx.Param))
    plain = diffusers_wan.save_diffusers_transformer(scanned, wan, str(tmp_path / "plain"))
    original, exported = (load_file(os.path.join(d, "diffusion_pytorch_model.safetensors")) for d in (src, plain))
    assert original.keys() == exported.keys()
    assert all(torch.equal(original[k], exported[k]) for k in original)
    # The export reads back into our DiT as the merged weights.
    again = nnx.to_pure_dict(nnx.state(load_diffusers_transformer(out), nnx.Param))
    for (p, x), y in zip(_leaves(lora.merged_params(model)).items(), _leaves(again).values()):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-6, err_msg=p)
    # In bfloat16 and split into numbered files with an index, as the released 14B is stored: diffusers loads it,
    # each tensor is the float32 export's rounded to bfloat16, and the outputs agree to bfloat16 precision.
    half = diffusers_wan.save_diffusers_transformer(model, wan, str(tmp_path / "bf16"), "bfloat16", max_shard_gib=2e-5)
    files = sorted(f for f in os.listdir(half) if f.endswith(".safetensors"))
    assert len(files) > 2 and files[0] == "diffusion_pytorch_model-00001-of-%05d.safetensors" % len(files)
    with open(os.path.join(half, diffusers_wan.INDEX_FILE)) as f:
        assert sorted(set(json.load(f)["weight_map"].values())) == files
    theirs_half = WanTransformer3DModel.from_pretrained(half, torch_dtype=torch.bfloat16)
    full = load_file(os.path.join(out, "diffusion_pytorch_model.safetensors"))
    assert theirs_half.state_dict().keys() == full.keys()
    assert all(torch.equal(v, full[k].to(torch.bfloat16)) for k, v in theirs_half.state_dict().items())
    with torch.no_grad():
        ref_half = theirs_half.float().eval()(
            torch.from_numpy(latents.transpose(0, 4, 1, 2, 3)), torch.from_numpy(timesteps),
            torch.from_numpy(context), return_dict=False)[0].numpy().transpose(0, 2, 3, 4, 1)
    assert 1e-5 < _rel_err(ref_half, ours) < 3e-2


def test_init_from_a_diffusers_directory(tmp_path):
    """A diffusers WanTransformer3DModel directory as config.init_from: its weights land in the config's model
    (here with stacked, scanned blocks and LoRA adapters over them), sharded; another size is refused naming
    the tensor and both shapes."""
    from configs import wan21
    src = str(tmp_path / "wan")
    _torch_wan().save_pretrained(src, safe_serialization=True)
    reference = nnx.to_pure_dict(nnx.state(load_diffusers_transformer(src, scan_layers=True), nnx.Param))
    config = wan21.get_config("tiny")
    wan = diffusers_wan.dit_config_from_diffusers(diffusers_wan.read_config(src))
    config.model.update(wan.model)
    config.text.update(wan.text)
    with_overrides(config, **{"autoencoder.channels": wan.channels, "model.scan_layers": True, "init_from": src,
                              **LORA})
    mesh = sharding.make_mesh(dict(config.mesh))
    with sharding.use_mesh(mesh, sharding.rules_from_config(config)):
        spec = state_spec(config, mesh)
        assert spec.lora and spec.abstract["params"]["blocks"]["attn"]["q"]["lora"]["lora_a"].shape == (2, 32, 4)
        weights = init_from.load_weights(config, spec.weights_abstract)
        got, want = _leaves(weights), _leaves(reference)
        assert got.keys() == want.keys()
        for path, x in want.items():
            np.testing.assert_array_equal(got[path], x, err_msg=path)
        fc1 = weights["blocks"]["mlp"]["fc1"]["kernel"]
        assert fc1.sharding == spec.base_shardings["blocks"]["mlp"]["fc1"]["kernel"]
        other = wan21.get_config("tiny")  # ffn_dim 64 and text_dim 32, not 40 and 16
        other.init_from = src
        other_spec = state_spec(other, mesh)
        with pytest.raises(CheckpointMismatchError, match=r"tensor blocks/0/mlp/fc1/bias has shape \(40,\) there but "
                                                          r"\(64,\) in the config's model"):
            init_from.load_weights(other, other_spec.weights_abstract)


def test_bad_finetune_configs_are_refused_before_compiling(trained_workdir, tmp_path, monkeypatch):
    from sora_jax.config_validation import ConfigError
    monkeypatch.setattr(loop, "make_train_step", lambda *a, **k: pytest.fail("compiled anyway"))
    cases = {(("lora.targets", ("blocks/0/attn/query",)), ("init_from", trained_workdir)): "matches none of",
             (("init_from", ""),): "needs config.init_from",
             (("init_from", str(tmp_path)),): "neither checkpoints/",
             (("lora.targets", ("blocks/(",)), ("init_from", trained_workdir)): "not a valid regex"}
    for overrides, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            train_and_evaluate(smoke_config(**LORA, **dict(overrides)), str(tmp_path / "w"))
