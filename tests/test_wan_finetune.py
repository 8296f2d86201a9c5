"""Fine-tuning smoke run of a Wan-configured DiT with a frozen umT5 caption encoder applied inside the step.

A tiny random diffusers WanTransformer3DModel (pixel space: 3 channels, so the identity autoencoder and the
procedural world feed it) is config.init_from, and a tiny random transformers UMT5EncoderModel with a local
tokenizer is config.text.path: the data pipeline tokenizes captions with that tokenizer ("hf"), the DiT task
encodes them with the frozen umT5 in the step. Checked end to end: the step-0 loss is the diffusers weights'
on transformers' umT5 features, a resume is bitwise the uninterrupted run, LoRA trains only adapters, both
runs sample, and the merged LoRA export loads in diffusers and computes what our merged model computes.
Nothing is downloaded.
"""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from configs import wan21
from data_pipelines.procedural import VOCABULARY
from sora_jax.config_validation import ConfigError
from sora_jax.convert import diffusers_wan
from sora_jax.diffusion.flow import flow_loss
from sora_jax.generation import Sampler
from sora_jax.models.text import build_tokenizer
from sora_jax.tasks import build_task
from sora_jax.train import loop
from sora_jax.train.loop import train_and_evaluate
from tests.conftest import with_overrides
from tests.test_train import _final_state, assert_same_final_state

WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=3, out_channels=3,
           text_dim=32, freq_dim=256, ffn_dim=64, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
           eps=1e-6, rope_max_seq_len=32)
WORDS = ["<pad>", "</s>", "<unk>"] + list(VOCABULARY)
UMT5 = dict(vocab_size=len(WORDS), d_model=WAN["text_dim"], d_kv=8, num_heads=4, d_ff=64, num_layers=2,
            relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
            dropout_rate=0.0)
LORA = {"lora.rank": 4, "lora.alpha": 8.0, "optim.lr": 1e-2}
PROMPTS = ["a small red circle moving to the left", "a large blue square"]


def _save_tokenizer(path):
    """A word-level tokenizer that, like umT5's, ends every caption with </s> (a post-processor special token)."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                         unk_token="<unk>").save_pretrained(path)


def _randomise(model, rule):
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(rule(name, p))
    return model.float().eval()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """(Wan transformer dir, umT5 dir, the torch umT5): every weight random, the zero- and one-initialised too."""
    root = tmp_path_factory.mktemp("wan_finetune")
    torch.manual_seed(0)
    wan = _randomise(WanTransformer3DModel(**WAN), lambda name, p: (
        (1.0 if "norm" in name and name.endswith("weight") else 0.0)
        + torch.randn_like(p) / (p[0].numel() if p.ndim > 1 and "table" not in name else 4) ** 0.5))
    wan.save_pretrained(str(root / "wan"), safe_serialization=True)
    umt5 = _randomise(transformers.UMT5EncoderModel(transformers.UMT5Config(**UMT5)), lambda name, p: (
        1.0 + 0.3 * torch.randn_like(p) if "layer_norm" in name else p))
    umt5.save_pretrained(str(root / "umt5"), safe_serialization=True)
    _save_tokenizer(str(root / "umt5"))
    return str(root / "wan"), str(root / "umt5"), umt5


def _config(dirs, **overrides):
    """configs/wan21.py "tiny" with the model of the diffusers dir, on 16x16 procedural clips, umT5 frozen."""
    wan_dir, umt5_dir, _ = dirs
    config = wan21.get_config("tiny")
    wan = diffusers_wan.dit_config_from_diffusers(diffusers_wan.read_config(wan_dir))
    config.model.update(wan.model)
    config.model.attention_block = 128
    config.text.update(wan.text)
    return with_overrides(config, **{
        "autoencoder.name": "identity", "autoencoder.channels": wan.channels, "init_from": wan_dir,
        "text.tokenizer": "hf", "text.path": umt5_dir, "text.max_len": 16,
        "data.sides": (8, 16), "data.frames": (1, 2), "data.seq_len": 128, "data.text_len": 32, "data.packing_bins": 8,
        "data.max_samples_per_row": 4, "mesh.data": -1, "mesh.fsdp": 2, "param_sharding_tolerance": 1.0,
        "total_steps": 4, "checkpoint_every_steps": 2, "log_every_steps": 2, "eval_batches": 1,
        "optim.lr": 1e-3, "optim.warmup_steps": 0, "sample.num_prompts": 0, "sample.width": 16,
        "sample.height": 16, "sample.frames": 2, "sample.steps": 2, **overrides})


@pytest.fixture(scope="module")
def full_run(dirs, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("full"))
    train_and_evaluate(_config(dirs), workdir)
    return workdir


@pytest.fixture(scope="module")
def lora_run(dirs, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("lora"))
    train_and_evaluate(_config(dirs, **LORA), workdir)
    return workdir


def _history(workdir):
    with open(os.path.join(workdir, "eval_history.json")) as f:
        return json.load(f)


def _leaves(tree):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _torch_features(umt5, ids):
    with torch.no_grad():
        return umt5(input_ids=torch.from_numpy(np.asarray(ids, np.int64)[None])).last_hidden_state[0].numpy()


def _rel_err(ours, ref):
    return float(np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref)))


def test_hf_tokenizer_adds_special_tokens_and_truncates(dirs):
    tokenizer = build_tokenizer(_config(dirs).text)
    index = {w: i for i, w in enumerate(WORDS)}
    ids = tokenizer.encode("A small red circle", 16)
    assert ids.dtype == np.int32 and tokenizer.vocab_size == len(WORDS)
    np.testing.assert_array_equal(ids, [index[w] for w in ("a", "small", "red", "circle", "</s>")])
    # Truncated at the end, the model's end-of-caption token kept last.
    np.testing.assert_array_equal(tokenizer.encode("A small red circle", 3), [index["a"], index["small"], 1])


def test_finetune_starts_from_the_diffusers_weights_on_umt5_features(dirs, full_run):
    """Step 0's held-out loss is the diffusers model's, converted, on the features transformers' umT5 computes
    for the batch's captions one by one (the step encodes them packed, with our umT5, frozen)."""
    config = _config(dirs)
    history = _history(full_run)
    assert [h["step"] for h in history] == [0, 4]
    assert all(np.isfinite(h[k]) for h in history for k in h)
    batch = build_task(config).eval_data(0, 1)[0]
    features = np.zeros(batch["text"].shape + (WAN["text_dim"],), np.float32)
    for row in range(batch["text"].shape[0]):
        for segment in set(batch["text_segment_ids"][row].tolist()) - {0}:
            where = batch["text_segment_ids"][row] == segment
            features[row, where] = _torch_features(dirs[2], batch["text"][row, where])
    model = diffusers_wan.load_diffusers_transformer(dirs[0])
    reference, _ = flow_loss(model, {**batch, "text": jnp.asarray(features)}, jax.random.fold_in(
        jax.random.key(config.seed + 1), 0), config.flow, caption_dropout=0.0)
    print(f"step-0 held-out loss {history[0]['val_loss_params']:.6f}, diffusers + transformers {reference:.6f}")
    assert history[0]["val_loss_params"] == pytest.approx(float(reference), rel=1e-5)
    assert history[-1]["val_loss_params"] != history[0]["val_loss_params"]  # it trained
    state, _ = _final_state(full_run, 4)
    assert int(state["step"]) == 4 and "text_encoder" not in state["params"]  # umT5 frozen, not trained


def test_resume_is_bitwise_identical(dirs, full_run, tmp_path):
    split = shutil.copytree(full_run, str(tmp_path / "split"))
    shutil.rmtree(os.path.join(split, "checkpoints", "4"))
    assert train_and_evaluate(_config(dirs), split)["step"] == 4
    assert_same_final_state(full_run, split, 4)


def test_lora_trains_only_adapters(full_run, lora_run):
    base, history = _history(full_run)[0], _history(lora_run)
    # B = 0: step 0 is the base model exactly; then the adapters move the loss.
    assert history[0]["val_loss_params"] == pytest.approx(base["val_loss_params"], rel=1e-6)
    assert history[-1]["val_loss_params"] != history[0]["val_loss_params"]
    state, _ = _final_state(lora_run, 4)
    params = _leaves(state["params"])
    assert len(params) == 2 * 20 and all("lora_a" in p or "lora_b" in p for p in params)
    assert all(np.abs(x).max() > 0 for p, x in params.items() if "lora_b" in p)


def _check_sampler(sampler, dirs, step):
    assert sampler.checkpoint_step == step
    # The prompts' features are the frozen umT5's: transformers' for the tokenizer's ids, zero-padded slots aside.
    text, segments, _ = sampler.caption_inputs(PROMPTS)
    assert text.shape == (2, 16, WAN["text_dim"])
    tokenizer = build_tokenizer(sampler.config.text)
    for i, prompt in enumerate(PROMPTS):
        ids = tokenizer.encode(prompt, 16)
        assert int(segments[i].sum()) == len(ids)
        ref = _torch_features(dirs[2], ids)
        assert _rel_err(text[i, :len(ids)], ref) < 1e-4
    videos = sampler.generate(PROMPTS, 16, 16, 2, steps=2, progress=False)
    assert videos.shape == (2, 2, 16, 16, 3) and videos.dtype == np.uint8
    # The caption reaches the video: the same noise under another prompt gives another video.
    swapped = sampler.generate(PROMPTS[::-1], 16, 16, 2, steps=2, progress=False)
    assert not np.array_equal(videos[0], swapped[1])
    return videos


def test_full_and_lora_runs_sample(dirs, full_run, lora_run):
    full = _check_sampler(Sampler.from_workdir(full_run), dirs, 4)
    lora = _check_sampler(Sampler.from_workdir(lora_run), dirs, 4)
    assert not np.array_equal(full, lora)


def test_merged_lora_export_matches_diffusers(dirs, lora_run, tmp_path, monkeypatch):
    from flax import nnx
    sampler = Sampler.from_workdir(lora_run)  # the adapters folded into the base
    out = str(tmp_path / "merged")
    r = _convert(lora_run, out)  # the command users run
    assert r.returncode == 0, r.stderr[-2000:]
    # Without `accelerate`, from_pretrained refuses classes that keep modules in float32 (a half-precision load
    # option); everything here is float32, so dropping the option changes nothing.
    monkeypatch.setattr(WanTransformer3DModel, "_keep_in_fp32_modules", None)
    theirs = WanTransformer3DModel.from_pretrained(out).float().eval()
    rng = np.random.default_rng(0)
    latents = rng.normal(size=(1, 2, 8, 8, 3)).astype(np.float32)  # (B, T, H, W, C)
    context = rng.normal(size=(1, 5, WAN["text_dim"])).astype(np.float32)
    timesteps = np.array([700.0], np.float32)
    run = lambda m: np.asarray(diffusers_wan.apply_dense(  # noqa: E731
        m, jnp.asarray(latents), jnp.asarray(timesteps), jnp.asarray(context)))
    ours = run(nnx.merge(sampler.graphdef, sampler.params))
    with torch.no_grad():
        ref = theirs(torch.from_numpy(latents.transpose(0, 4, 1, 2, 3)), torch.from_numpy(timesteps),
                     torch.from_numpy(context), return_dict=False)[0].numpy().transpose(0, 2, 3, 4, 1)
    err, moved = _rel_err(ours, ref), _rel_err(run(diffusers_wan.load_diffusers_transformer(dirs[0])), ref)
    print(f"merged LoRA export vs diffusers: {err:.2e}; the base differs from it by {moved:.2e}")
    assert err < 1e-4
    assert moved > 1e-3  # the trained adapters are in the export, far beyond the tolerance
    # A base that is not the one the adapters were trained on is refused, not merged.
    other_base = shutil.copytree(dirs[0], str(tmp_path / "other_base"))
    weights = os.path.join(other_base, "diffusion_pytorch_model.safetensors")
    tensors = load_file(weights)
    tensors["proj_out.bias"] = tensors["proj_out.bias"] + 0.5
    save_file(tensors, weights, metadata={"format": "pt"})
    moved_run = shutil.copytree(lora_run, str(tmp_path / "moved"))
    with open(os.path.join(moved_run, "config.json")) as f:
        stored = json.load(f)
    with open(os.path.join(moved_run, "config.json"), "w") as f:
        json.dump({**stored, "init_from": other_base}, f)
    r = _convert(moved_run, str(tmp_path / "refused"))
    assert r.returncode == 1 and "trained on other base weights" in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]
    assert not os.path.exists(os.path.join(tmp_path, "refused", "config.json"))


def _convert(src, dst, *flags):
    import subprocess
    import sys

    from tests.conftest import ROOT
    return subprocess.run([sys.executable, "-m", "sora_jax.convert", "--kind=dit_to_diffusers", f"--src={src}",
                           f"--dst={dst}", *flags], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_bad_caption_encoder_is_refused_before_compiling(dirs, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "make_train_step", lambda *a, **k: pytest.fail("compiled anyway"))
    wide = str(tmp_path / "wide")
    shutil.copytree(dirs[1], wide)
    with open(os.path.join(wide, "config.json")) as f:
        raw = json.load(f)
    with open(os.path.join(wide, "config.json"), "w") as f:
        json.dump({**raw, "d_model": 48}, f)
    cases = {(("text.path", str(tmp_path / "absent")),): "is not a directory",
             (("text.path", str(tmp_path)),): "has no config.json",
             (("text.path", wide),): "emits 48-wide features but config.text.width=32",
             (("text.tokenizer", "words"),): "set config.text.tokenizer='hf'",
             (("text.encoder", "tiny"), ("text.pad_captions", True)):
                 "pad_captions=True .* needs a frozen caption encoder"}
    for overrides, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            train_and_evaluate(_config(dirs, **dict(overrides)), str(tmp_path / "w"))
    assert not os.path.exists(os.path.join(tmp_path, "w", "config.json"))


def test_aot_sizes_the_step_with_the_frozen_encoder(dirs):
    """Ahead-of-time compilation (python -m sora_jax.aot) builds the step the trainer runs: caption ids in the
    batch, not features, and umT5's parameters among its frozen arguments."""
    from sora_jax import aot
    config = _config(dirs)
    assert aot.dit_batch(config)["text"] == ((8, 32), np.int32)
    report = aot.compile_train_step(config, "cpu:8", hbm_gib=80)
    assert report["fits"] is True


def test_the_frozen_encoder_is_sharded_like_the_dit(dirs):
    """umT5's parameters reach the step sharded by their logical axes (embed over fsdp), not replicated."""
    from jax.sharding import PartitionSpec as P

    from sora_jax import sharding
    from sora_jax.train.state import state_spec
    config = _config(dirs)
    mesh = sharding.make_mesh(config.mesh)
    with sharding.use_mesh(mesh, sharding.rules_from_config(config)):
        spec = state_spec(config, mesh)
    frozen = spec.frozen_shardings["text_encoder"]
    assert frozen["embed"]["embedding"].spec == P(None, "fsdp")
    assert frozen["layers"][0]["ffn"]["wi_0"]["kernel"].spec == P("fsdp", "tensor")
    assert frozen["layers"][0]["attn"]["relative_bias"].spec == P(None, None)  # a 32 x heads table: replicated


def test_cached_caption_features_train_without_the_encoder_in_the_step(dirs, full_run, tmp_path):
    """`python -m sora_jax.encode` caches umT5's features beside the latents (transformers' features for each
    caption); training on the cache runs no encoder in its step and starts from the same held-out loss as the
    run that encodes in the step. A cache of another text setting is refused before compiling."""
    from data_pipelines import pipeline
    from data_pipelines.latents import LatentShards
    from sora_jax.config_validation import validate_dit
    from sora_jax.encode import encode_dataset
    out = str(tmp_path / "latents")
    encode_dataset(_config(dirs), out, num_examples=12, shard_size=6)
    shards, tokenizer = LatentShards(out), build_tokenizer(_config(dirs).text)
    assert shards.manifest["text_features"]["max_len"] == 16
    for index in (0, 7):
        record = shards[index]
        reference = _torch_features(dirs[2], tokenizer.encode(record["caption"], 16))
        assert record["text_features"].shape == reference.shape
        assert _rel_err(record["text_features"], reference) < 1e-4

    cached = _config(dirs, **{"data.source": "latents", "data.latent_dir": out, "data.raw_source": "procedural",
                              "total_steps": 2, "checkpoint_every_steps": 2})
    task = build_task(cached)
    assert task.frozen() == {}  # the step holds no encoder
    batch = next(iter(pipeline.packed_dataset(cached)))
    assert batch["text"].shape == (8, 32, WAN["text_dim"]) and batch["text"].dtype == np.float32
    workdir = str(tmp_path / "run")
    train_and_evaluate(cached, workdir)
    step0 = _history(workdir)[0]["val_loss_params"]
    assert step0 == pytest.approx(_history(full_run)[0]["val_loss_params"], rel=1e-5)

    with pytest.raises(ConfigError, match=r"another text encoder setting \(max_len differ"):
        validate_dit(with_overrides(cached, **{"text.max_len": 12}))


def test_padded_captions_condition_as_wan_was_trained(dirs):
    """config.text.pad_captions: each caption takes max_len slots, zero features past its tokens, all read by
    cross-attention (Wan 2.1's 512 umT5 slots). The step's held-out loss is the diffusers model's on exactly that
    conditioning, and differs from the unpadded one (the pretrained model does notice)."""
    config = _config(dirs, **{"text.pad_captions": True, "data.text_len": 64})
    task = build_task(config)
    batch = task.eval_data(0, 1)[0]
    segments = batch["text_segment_ids"]
    assert all(np.sum(segments[r] == s) == 16 for r in range(len(segments)) for s in set(segments[r].tolist()) - {0})
    model = diffusers_wan.load_diffusers_transformer(dirs[0])
    key = jax.random.key(3)
    ours = task.eval_metrics(model, task.frozen(), batch, key)["loss"]
    features = np.zeros(segments.shape + (WAN["text_dim"],), np.float32)
    for row in range(len(segments)):
        for segment in set(segments[row].tolist()) - {0}:
            real = (segments[row] == segment) & (batch["text"][row] != 0)
            features[row, real] = _torch_features(dirs[2], batch["text"][row, real])
    reference, _ = flow_loss(model, {**batch, "text": jnp.asarray(features)}, key, config.flow, caption_dropout=0.0)
    assert float(ours) == pytest.approx(float(reference), rel=1e-5)
    unpadded = {**batch, "text_segment_ids": np.where(batch["text"] != 0, segments, 0)}
    other, _ = flow_loss(model, {**unpadded, "text": jnp.asarray(features)}, key, config.flow, caption_dropout=0.0)
    assert abs(float(other) - float(reference)) > 1e-4 * abs(float(reference))
    # The sampler conditions the same way: every slot of the prompt's row read, zeros past its tokens.
    text, text_segments, _ = Sampler(config, None, None).caption_inputs([VOCABULARY[0]])
    ids = build_tokenizer(config.text).encode(VOCABULARY[0], 16)
    assert np.all(np.asarray(text_segments) == 1) and not np.any(np.asarray(text)[0, len(ids):])
    assert _rel_err(np.asarray(text)[0, :len(ids)], _torch_features(dirs[2], ids)) < 1e-4
