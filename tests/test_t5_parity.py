"""Our T5 v1.1 / umT5 encoder against transformers' (PyTorch, CPU) on tiny random checkpoints, and the
loader's refusals. Nothing is downloaded: models and tokenizer are built here and saved to tmp dirs."""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import PartitionSpec as P
from tokenizers import Tokenizer, models, pre_tokenizers

from sora_jax import sharding
from sora_jax.convert.hf_text import load_hf_text_encoder
from sora_jax.models.text import build_text_encoder

WORDS = ["<pad>", "</s>", "<unk>"] + [f"w{i}" for i in range(60)]
ARCH = dict(vocab_size=100, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2, relative_attention_num_buckets=8,
            relative_attention_max_distance=16, feed_forward_proj="gated-gelu", dropout_rate=0.0)
MODELS = {"t5": (transformers.T5Config, transformers.T5EncoderModel),
          "umt5": (transformers.UMT5Config, transformers.UMT5EncoderModel)}


def _save_tokenizer(path):
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                         unk_token="<unk>").save_pretrained(path)


def _checkpoint(tmp_path, kind):
    """A random float32 HF encoder saved as safetensors with a tokenizer; returns (torch model, dir)."""
    config_cls, model_cls = MODELS[kind]
    torch.manual_seed(0)
    model = model_cls(config_cls(**ARCH)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_attention_bias" in name:  # large and distinct per layer: sharing a table must show
                p.copy_(3.0 * torch.randn_like(p))
            elif "layer_norm" in name:  # off 1.0, so a norm that drops its scale shows
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    path = os.path.join(str(tmp_path), kind)
    model.save_pretrained(path, safe_serialization=True)
    _save_tokenizer(path)
    return model, path


@pytest.fixture(scope="module", params=sorted(MODELS))
def checkpoint(request, tmp_path_factory):
    model, path = _checkpoint(tmp_path_factory.mktemp("hf"), request.param)
    return request.param, model, path, load_hf_text_encoder(path)


def _reference(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(np.asarray(ids, np.int64)),
                    attention_mask=torch.from_numpy(np.asarray(mask, np.int64))).last_hidden_state
    return out.numpy()


def _rel_err(ours, ref):
    return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-6))


def test_padded_batch_matches_transformers(checkpoint):
    kind, model, _, ours = checkpoint
    rng = np.random.default_rng(0)
    # Long enough (24 > max_distance 16) that the logarithmic and the clipped buckets are exercised.
    ids = rng.integers(3, 100, size=(3, 24))
    mask = np.ones_like(ids)
    mask[1, 15:] = 0
    mask[2, 5:] = 0
    ids = ids * mask
    ref = _reference(model, ids, mask)
    out = np.asarray(ours.encode(jnp.asarray(ids), jnp.asarray(mask)))
    assert out.shape == ref.shape == (3, 24, 32)
    real = mask.astype(bool)  # HF's padding rows attend to the real tokens, ours to padding: not compared
    err = _rel_err(out[real], ref[real])
    print(f"{kind}: padded batch max relative diff {err:.2e}")
    assert err < 1e-4


def test_packed_captions_match_each_alone(checkpoint):
    kind, model, _, ours = checkpoint
    rng = np.random.default_rng(1)
    lengths = (7, 12, 4)
    captions = [rng.integers(3, 100, size=n) for n in lengths]
    row = 26  # three captions and 3 padding tokens
    ids, segments, positions = (np.zeros((1, row), np.int32) for _ in range(3))
    start = 0
    for seg, cap in enumerate(captions, start=1):
        ids[0, start:start + len(cap)] = cap
        segments[0, start:start + len(cap)] = seg
        positions[0, start:start + len(cap)] = np.arange(len(cap))
        start += len(cap)
    out = np.asarray(ours(jnp.asarray(ids), jnp.asarray(segments), jnp.asarray(positions)))
    start, worst = 0, 0.0
    for cap in captions:
        ref = _reference(model, cap[None], np.ones((1, len(cap))))[0]
        worst = max(worst, _rel_err(out[0, start:start + len(cap)], ref))
        start += len(cap)
    print(f"{kind}: packed captions max relative diff {worst:.2e}")
    assert worst < 1e-4
    # Relative distances come from `positions`, not from places in the row: with contiguous captions the
    # two agree, so shuffle the row's tokens (ids, segments and positions alike) and expect the same outputs.
    perm = rng.permutation(row)
    shuffled = np.asarray(ours(*(jnp.asarray(a[:, perm]) for a in (ids, segments, positions))))
    real = segments[0] > 0
    assert _rel_err(shuffled[0, np.argsort(perm)][real], out[0][real]) < 1e-5


def test_tokenizer_round_trip(checkpoint):
    _, _, _, ours = checkpoint
    enc = ours.tokenizer(["w1 w2 w3", "w7"], padding=True)
    assert enc["input_ids"] == [[4, 5, 6], [10, 0, 0]]
    assert enc["attention_mask"] == [[1, 1, 1], [1, 0, 0]]
    assert ours.tokenizer.decode(enc["input_ids"][0]) == "w1 w2 w3"
    assert ours.encode(jnp.asarray(enc["input_ids"]), jnp.asarray(enc["attention_mask"])).shape == (2, 3, 32)


def test_missing_config_is_named(tmp_path):
    _save_tokenizer(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_text_encoder(str(tmp_path))


def test_other_model_type_is_refused(tmp_path):
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"model_type": "bert", "hidden_size": 32}, f)
    with pytest.raises(ValueError, match=r"model_type 'bert' is not supported.*t5.*umt5"):
        load_hf_text_encoder(str(tmp_path))


def test_pickle_only_weights_are_refused_unread(tmp_path, monkeypatch):
    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called")
    monkeypatch.setattr(torch, "load", no_unpickling)
    config_cls, model_cls = MODELS["t5"]
    model_cls(config_cls(**ARCH)).config.save_pretrained(str(tmp_path))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    _save_tokenizer(str(tmp_path))
    with pytest.raises(ValueError, match=r"only pickle weights \(pytorch_model.bin\).*refused"):
        load_hf_text_encoder(str(tmp_path))


def test_shape_mismatch_names_tensor_and_shapes(tmp_path):
    _, path = _checkpoint(tmp_path, "umt5")
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    raw["d_ff"] = 48  # the stored wi_0 is (64, 32): ours would be (32, 48)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(raw, f)
    with pytest.raises(ValueError, match=r"encoder\.block\.0\.layer\.1\.DenseReluDense\.wi_0\.weight: shape "
                                         r"\(32, 64\) \(\(64, 32\) as stored\).* but \(32, 48\)"):
        load_hf_text_encoder(path)


def test_missing_weights_and_tokenizer_are_named(tmp_path):
    _, path = _checkpoint(tmp_path, "t5")
    os.rename(os.path.join(path, "tokenizer.json"), os.path.join(path, "moved.json"))
    with pytest.raises(FileNotFoundError, match="no tokenizer in .*tokenizer.json"):
        load_hf_text_encoder(path)
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_hf_text_encoder(path)


def _set_model_type(path, model_type):
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    raw["model_type"] = model_type
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(raw, f)


def test_unused_and_missing_tensors_are_errors(tmp_path):
    """T5 shares layer 0's bias table; umT5 has one per layer. Swapping the configs leaves a tensor over
    (umT5 weights, T5 config) or one missing (T5 weights, umT5 config)."""
    _, path = _checkpoint(tmp_path, "umt5")
    _set_model_type(path, "t5")
    with pytest.raises(ValueError, match=r"block\.1\.layer\.0\.SelfAttention\.relative_attention_bias\.weight: "
                                         r"shape \(8, 4\).* has no place"):
        load_hf_text_encoder(path)
    _, path = _checkpoint(tmp_path, "t5")
    _set_model_type(path, "umt5")
    with pytest.raises(ValueError, match=r"lacks 1 tensor\(s\).*block\.1\.layer\.0\.SelfAttention\."
                                         r"relative_attention_bias\.weight .*shape \(8, 4\)"):
        load_hf_text_encoder(path)


def test_encoder_decoder_checkpoint_loads_its_encoder(tmp_path):
    torch.manual_seed(2)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**ARCH)).eval()
    path = str(tmp_path / "full")
    # Small shards: the index (model.safetensors.index.json) is followed, and the decoder's tensors skipped.
    model.save_pretrained(path, safe_serialization=True, max_shard_size="20KB")
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    _save_tokenizer(path)
    ids = np.random.default_rng(3).integers(3, 100, size=(2, 9))
    mask = np.ones_like(ids)
    ref = _reference(model.get_encoder(), ids, mask)
    out = np.asarray(load_hf_text_encoder(path).encode(jnp.asarray(ids), jnp.asarray(mask)))
    assert _rel_err(out, ref) < 1e-4


def test_bfloat16_checkpoint_loads(tmp_path):
    """Released checkpoints are often bfloat16, which numpy cannot read from safetensors by itself."""
    model, path = _checkpoint(tmp_path, "umt5")
    model.to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
    ours = load_hf_text_encoder(path)  # float32 parameters from the bfloat16 tensors
    ids = np.random.default_rng(5).integers(3, 100, size=(2, 10))
    mask = np.ones_like(ids)
    ref = _reference(model.float(), ids, mask)  # the same bfloat16-rounded weights, run in float32
    assert _rel_err(np.asarray(ours.encode(jnp.asarray(ids), jnp.asarray(mask))), ref) < 1e-4


def test_sharded_on_a_mesh_like_the_dit(checkpoint):
    """Parameters placed by their logical names on a (data 2, fsdp 2, tensor 2) mesh give the same outputs."""
    kind, _, _, ours = checkpoint
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2, context=1))
    graphdef, params, rest = nnx.split(ours, nnx.Param, ...)
    specs = sharding.logical_axes(params)
    pure = nnx.to_pure_dict(params)
    placed = sharding.param_shardings(specs, pure, mesh, sharding.DEFAULT_RULES)
    assert placed["layers"][0]["ffn"]["wi_0"]["kernel"].spec == P("fsdp", "tensor")
    assert placed["embed"]["embedding"].spec == P(None, "fsdp")
    nnx.replace_by_pure_dict(params, jax.device_put(pure, placed))
    sharded = nnx.merge(graphdef, params, rest)
    ids = np.random.default_rng(4).integers(3, 100, size=(4, 16))
    mask = (np.arange(16) < np.array([[16], [9], [3], [12]])).astype(np.int32)

    @nnx.jit
    def run(model, ids, mask):
        return model.encode(ids, mask)
    with sharding.use_mesh(mesh):
        out = np.asarray(run(sharded, jnp.asarray(ids), jnp.asarray(mask)))
    ref = np.asarray(ours.encode(jnp.asarray(ids), jnp.asarray(mask)))
    assert _rel_err(out[mask > 0], ref[mask > 0]) < 1e-5, kind


def test_registry_builds_t5_and_umt5_from_config():
    text = ml_collections.ConfigDict(dict(encoder="umt5", width=32, depth=2, heads=4, max_len=12, d_ff=64))
    umt5 = build_text_encoder(text, 100, rngs=nnx.Rngs(0), backend="auto")
    text.encoder = "t5"
    t5 = build_text_encoder(text, 100, rngs=nnx.Rngs(0), backend="auto")
    assert umt5.out_dim == t5.out_dim == 32
    assert [layer.attn.relative_bias is not None for layer in umt5.layers] == [True, True]
    assert [layer.attn.relative_bias is not None for layer in t5.layers] == [True, False]
    ids = jnp.ones((1, 5), jnp.int32)
    assert umt5(ids, ids, jnp.arange(5)[None]).shape == (1, 5, 32)
