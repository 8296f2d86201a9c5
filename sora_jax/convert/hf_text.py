"""A local Hugging Face T5 v1.1 / umT5 directory -> our T5Encoder, with its tokenizer.

The directory holds config.json, the weights as *.safetensors (one file, or shards listed by
model.safetensors.index.json) and the tokenizer files. Pickle weights (.bin, .pt, .pth) are refused:
loading them can run arbitrary code. Only the encoder is read; a full encoder-decoder checkpoint's
decoder.* and lm_head.* tensors are skipped. Every other tensor must map onto a parameter with the same
shape, and every parameter must be filled; otherwise the error names the tensor and both shapes.

`caption_encoder_of` (over `frozen_text_encoder`) and `encode_captions` serve training and sampling with a
frozen encoder (config.text.path): the DiT task and the Sampler load it through the same cached function and
compute the same features.
"""
from __future__ import annotations

import functools
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax import sharding
from sora_jax.models.t5 import T5Encoder, T5EncoderConfig
from sora_jax.models.text import frozen_encoder_path
from sora_jax.safetensors_io import PICKLE_SUFFIXES

SUPPORTED_MODEL_TYPES = ("t5", "umt5")
_IGNORED_PREFIXES = ("decoder.", "lm_head.")
_TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer.model")


def t5_config_from_hf(raw: dict, source: str = "config.json") -> T5EncoderConfig:
    """Our T5EncoderConfig from a Hugging Face T5 / umT5 config.json dict.

    Raises:
      ValueError: another model_type, a non-gated-GELU feed-forward, or a decoder config.
    """
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{source}: model_type {model_type!r} is not supported; this loader reads T5 v1.1 and "
                         f"umT5 encoders (model_type one of {SUPPORTED_MODEL_TYPES}).")
    ffn = raw.get("feed_forward_proj", "relu")
    if ffn != "gated-gelu":
        raise ValueError(f"{source}: feed_forward_proj {ffn!r} is not supported; only 'gated-gelu' (T5 v1.1, "
                         "umT5) is. The original T5 (relu) and gated-silu variants are not implemented.")
    if raw.get("is_decoder"):
        raise ValueError(f"{source}: is_decoder is true; pass an encoder (or encoder-decoder) checkpoint.")
    try:
        d_model, heads = int(raw["d_model"]), int(raw["num_heads"])
        return T5EncoderConfig(
            vocab_size=int(raw["vocab_size"]), d_model=d_model, d_kv=int(raw.get("d_kv", d_model // heads)),
            num_heads=heads, d_ff=int(raw["d_ff"]), num_layers=int(raw["num_layers"]),
            num_buckets=int(raw.get("relative_attention_num_buckets", 32)),
            max_distance=int(raw.get("relative_attention_max_distance", 128)),
            eps=float(raw.get("layer_norm_epsilon", 1e-6)), per_layer_bias=model_type == "umt5")
    except KeyError as e:
        raise ValueError(f"{source} lacks the field {e.args[0]!r}; it is not a complete T5 config.") from None


# Hugging Face tensor name (encoder part, after "encoder.") -> our parameter path; {i} is the layer.
_LAYER_MAP = {
    "layer.0.layer_norm.weight": "attn_norm/scale",
    "layer.0.SelfAttention.q.weight": "attn/q/kernel",
    "layer.0.SelfAttention.k.weight": "attn/k/kernel",
    "layer.0.SelfAttention.v.weight": "attn/v/kernel",
    "layer.0.SelfAttention.o.weight": "attn/o/kernel",
    "layer.0.SelfAttention.relative_attention_bias.weight": "attn/relative_bias",
    "layer.1.layer_norm.weight": "ffn_norm/scale",
    "layer.1.DenseReluDense.wi_0.weight": "ffn/wi_0/kernel",
    "layer.1.DenseReluDense.wi_1.weight": "ffn/wi_1/kernel",
    "layer.1.DenseReluDense.wo.weight": "ffn/wo/kernel",
}
_BLOCK = re.compile(r"encoder\.block\.(\d+)\.(.+)")


def _our_name(hf_name: str) -> str | None:
    """Our parameter path for a Hugging Face tensor name; None when it has no counterpart."""
    if hf_name in ("shared.weight", "encoder.embed_tokens.weight"):
        return "embed/embedding"
    if hf_name == "encoder.final_layer_norm.weight":
        return "final_norm/scale"
    match = _BLOCK.fullmatch(hf_name)
    if match and match.group(2) in _LAYER_MAP:
        return f"layers/{match.group(1)}/{_LAYER_MAP[match.group(2)]}"
    return None


def _hf_name(ours: str) -> str:
    """The Hugging Face name of our parameter path (the embedding's: shared.weight)."""
    fixed = {"embed/embedding": "shared.weight", "final_norm/scale": "encoder.final_layer_norm.weight"}
    if ours in fixed:
        return fixed[ours]
    _, layer, rest = ours.split("/", 2)
    return f"encoder.block.{layer}." + {v: k for k, v in _LAYER_MAP.items()}[rest]


def _weight_files(path: str) -> list[str]:
    """The safetensors files holding the weights (the index's shards, or every *.safetensors)."""
    files = os.listdir(path)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f).get("weight_map", {}).values()))
        absent = [s for s in shards if s not in files]
        if absent:
            raise FileNotFoundError(f"{index} lists shard {absent[0]}, which is not in {path}; download every shard "
                                    "listed in the index.")
        return shards
    shards = sorted(f for f in files if f.endswith(".safetensors"))
    if shards:
        return shards
    pickles = sorted(f for f in files if f.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise ValueError(f"{path} holds only pickle weights ({', '.join(pickles)}); pickle files are refused because "
                         "loading them can run arbitrary code. Download the .safetensors weights, or convert with "
                         "save_pretrained(..., safe_serialization=True) in a trusted environment.")
    raise FileNotFoundError(f"no model.safetensors (or sharded *.safetensors with model.safetensors.index.json) in "
                            f"{path}; download the model's safetensors weights into it.")


def _host_device() -> jax.Device:
    """The first CPU device; the default device when JAX was started without the CPU platform."""
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:
        return jax.devices()[0]


def _read_encoder_tensors(path: str) -> dict[str, tuple[np.ndarray, str]]:
    """{Hugging Face name: (array, file)} for the encoder's tensors; the decoder's are never read."""
    from safetensors import SafetensorError, safe_open

    tensors = {}
    # The flax framework reads bfloat16 (numpy's cannot); the host keeps the whole checkpoint off the accelerator.
    with jax.default_device(_host_device()):
        for name in _weight_files(path):
            file = os.path.join(path, name)
            try:
                with safe_open(file, framework="flax") as f:
                    for key in f.keys():
                        if not key.startswith(_IGNORED_PREFIXES):
                            tensors[key] = (np.asarray(f.get_tensor(key)), name)
            except (SafetensorError, OSError, ValueError) as e:
                raise ValueError(f"{file} is not a valid safetensors file ({e}); re-download it.") from None
    return tensors


def _fill(wanted: dict[str, jax.ShapeDtypeStruct], tensors: dict, config_path: str, dtype) -> dict[str, jax.Array]:
    """Our flat {path: array} from the Hugging Face tensors, checking names and shapes both ways."""
    fix = "the config does not match the weights."
    filled, source = {}, {}
    for hf_name, (stored, file) in sorted(tensors.items()):  # sorted: the same tensor is reported each time
        ours = _our_name(hf_name)
        if ours is None or ours not in wanted:
            raise ValueError(f"tensor {hf_name}: shape {tuple(stored.shape)} in {file} has no place in the encoder "
                             f"of {config_path}; {fix}")
        # PyTorch Linear weights are (out, in); our kernels are (in, out).
        value = stored.T if ours.endswith("/kernel") else stored
        if tuple(value.shape) != tuple(wanted[ours].shape):
            layout = f" ({tuple(stored.shape)} as stored)" if value.shape != stored.shape else ""
            raise ValueError(f"tensor {hf_name}: shape {tuple(value.shape)}{layout} in {file} but "
                             f"{tuple(wanted[ours].shape)} from {config_path}; {fix}")
        if ours in filled and not np.array_equal(np.asarray(filled[ours]), value.astype(filled[ours].dtype)):
            raise ValueError(f"tensors {source[ours]} and {hf_name} both hold the token embedding but differ; "
                             "the checkpoint is inconsistent.")
        filled[ours], source[ours] = value, hf_name
    missing = sorted(set(wanted) - set(filled))
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} tensor(s) the config needs, e.g. {_hf_name(missing[0])} "
                         f"(our {missing[0]}, shape {tuple(wanted[missing[0]].shape)}); {fix}")
    return {k: jnp.asarray(v, dtype) for k, v in filled.items()}


def _nest(flat: dict[str, jax.Array]) -> dict:
    """{"a/b/c": x} -> {"a": {"b": {"c": x}}}, with integer keys where the path has layer numbers."""
    out: dict = {}
    for name, value in flat.items():
        *parents, leaf = (int(p) if p.isdigit() else p for p in name.split("/"))
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _flat_shapes(tree, prefix: str = "") -> dict[str, jax.ShapeDtypeStruct]:
    """{"layers/0/attn/q/kernel": leaf} for a nested dict of parameters."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        out.update(_flat_shapes(value, name) if isinstance(value, dict) else {name: value})
    return out


def _load_tokenizer(path: str):
    """The Hugging Face tokenizer saved in `path`, read without network access."""
    present = [f for f in _TOKENIZER_FILES if os.path.exists(os.path.join(path, f))]
    if not present:
        raise FileNotFoundError(f"no tokenizer in {path}: expected one of {', '.join(_TOKENIZER_FILES)}. Download the "
                                "model's tokenizer files into the same directory (tokenizer.save_pretrained(path)).")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def load_hf_text_encoder(path: str, dtype=jnp.float32, param_dtype=None, tokenizer_path: str | None = None
                         ) -> T5Encoder:
    """Reads a local Hugging Face T5 v1.1 / umT5 directory; returns our encoder with its tokenizer.

    Args:
      path: directory with config.json, *.safetensors and the tokenizer files (what save_pretrained writes).
      dtype: compute dtype.
      param_dtype: dtype of the parameters; None: `dtype`.
      tokenizer_path: where the tokenizer files are, if not in `path` (a diffusers pipeline keeps them in a
        `tokenizer` folder beside `text_encoder`).

    Returns:
      A T5Encoder whose `.tokenizer` attribute is the Hugging Face tokenizer.

    Raises:
      FileNotFoundError: no config.json, no safetensors weights or no tokenizer (the message names the file).
      ValueError: an unsupported model_type or feed-forward, pickle-only weights, or a tensor whose name or
        shape does not fit the config (the message names the tensor and both shapes).
    """
    config_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a directory; pass a local Hugging Face model directory.")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} does not exist: pass a Hugging Face model directory (save_pretrained "
                                "or a downloaded snapshot) that includes config.json.")
    with open(config_path) as f:
        cfg = t5_config_from_hf(json.load(f), config_path)
    param_dtype = param_dtype or dtype
    tensors = _read_encoder_tensors(path)
    tokenizer = _load_tokenizer(tokenizer_path or path)

    abstract = nnx.eval_shape(lambda: T5Encoder(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    flat = _fill(_flat_shapes(nnx.to_pure_dict(params)), tensors, config_path, param_dtype)
    nnx.replace_by_pure_dict(params, _nest(flat))
    encoder = nnx.merge(graphdef, params, rest)
    encoder.tokenizer = tokenizer  # a plain attribute: NNX leaves non-array objects out of the state
    return encoder


@functools.lru_cache(maxsize=None)
def frozen_text_encoder(path: str, dtype: str = "float32", tokenizer_path: str = "") -> tuple[nnx.GraphDef, dict]:
    """(graphdef, params as a pure dict) of the encoder in `path`, read once per process and dtype.

    The parameters are in `dtype` too (bfloat16 for a bfloat16 model: umT5-XXL is 5.7B parameters, and the
    trainer replicates frozen arrays on every device). The tokenizer (in `tokenizer_path`, or `path`) is
    checked to be there but not kept: config.text.tokenizer = "hf" reads it; dropping it keeps the graphdef
    hashable, as jit's static arguments must be.
    """
    encoder = load_hf_text_encoder(path, dtype=jnp.dtype(dtype), tokenizer_path=tokenizer_path or None)
    del encoder.tokenizer
    graphdef, params, rest = nnx.split(encoder, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise TypeError(f"the text encoder of {path} holds state besides its parameters.")
    return graphdef, nnx.to_pure_dict(params)


def caption_encoder_of(config) -> tuple[nnx.GraphDef, dict] | None:
    """frozen_text_encoder of config.text.path in config.model.dtype; None when the config has no frozen caption
    encoder (sora_jax.models.text.frozen_encoder_path). The DiT task and the Sampler both get theirs here."""
    path = frozen_encoder_path(config.text)
    if not path:
        return None
    return frozen_text_encoder(path, config.model.dtype, config.text.get("tokenizer_path", ""))


def encoder_axes(encoder: tuple[nnx.GraphDef, dict]) -> dict:
    """The logical axis names of a frozen encoder's parameters (caption_encoder_of's pair), as the model annotated
    them: what shards them like the DiT's."""
    return sharding.logical_axes(nnx.state(nnx.merge(*encoder), nnx.Param))


class CaptionFeatures:
    """config's frozen caption encoder on this host's devices, for features computed outside the train step (the
    latent cache's, and the held-out batches' when training reads that cache). Drop it when done: it holds a
    device copy of the weights.

    The weights are sharded over the host's local devices by their logical axes (umT5-XXL does not fit one
    16 GB chip) and the few captions are replicated; the run's global mesh is not used, because each host
    encodes its own captions.
    """

    def __init__(self, config):
        encoder = caption_encoder_of(config)
        if encoder is None:
            raise ValueError("config.text names no frozen caption encoder (text.encoder='precomputed' with text.path).")
        self.graphdef = encoder[0]
        devices = np.asarray(jax.local_devices()).reshape(1, -1, 1, 1)
        self.mesh = jax.sharding.Mesh(devices, sharding.MESH_AXES)
        self.rules = (("batch", None),) + tuple(r for r in sharding.current_rules() if r[0] != "batch")
        self.params = jax.device_put(encoder[1], sharding.param_shardings(encoder_axes(encoder), encoder[1], self.mesh,
                                                                          self.rules))
        self._encode = jax.jit(encode_captions, static_argnums=0)

    def __call__(self, ids: np.ndarray, segments: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """float32 features [B, Lt, width] of packed caption ids [B, Lt] (rows of padding: zero)."""
        with sharding.use_mesh(self.mesh, self.rules):
            out = self._encode(self.graphdef, self.params, jnp.asarray(ids), jnp.asarray(segments),
                               jnp.asarray(positions))
        return np.where(np.asarray(segments)[..., None] > 0, np.asarray(out, np.float32), 0.0).astype(np.float32)

    def one(self, ids: np.ndarray, length: int) -> np.ndarray:
        """Features [len(ids), width] of one caption, padded to `length` slots so one compile serves all."""
        n = len(ids)
        padded = np.zeros((1, length), np.int32)
        padded[0, :n] = ids
        segments = (np.arange(length) < n).astype(np.int32)[None]
        return self(padded, segments, np.arange(length, dtype=np.int32)[None])[0, :n]


PAD_ID = 0  # T5's and umT5's pad token (config.json pad_token_id); no caption token has it


def encode_captions(graphdef: nnx.GraphDef, params: dict, ids: jax.Array, segments: jax.Array,
                    positions: jax.Array) -> jax.Array:
    """Caption features [B, Lt, d_model] of packed token ids [B, Lt] from a frozen encoder (no gradient).

    Each caption is encoded on its own tokens only (its segment). Slots holding the pad id inside a caption's
    segment (config.text.pad_captions: Wan 2.1's 512 slots) are left out of the encoding, as Hugging Face's
    attention mask leaves them out, and get zero features, as diffusers' WanPipeline zeroes them; cross-attention
    still reads them, being of the caption's segment. Without pad_captions a sample attends to its real caption
    tokens only, which a pretrained Wan (trained on 512 slots) sees as somewhat different conditioning.
    """
    encoder = nnx.merge(graphdef, params)
    real = ids != PAD_ID
    features = encoder(ids, jnp.where(real, segments, 0), positions)
    return jax.lax.stop_gradient(jnp.where(real[..., None], features, 0).astype(features.dtype))
