"""diffusers `WanTransformer3DModel` (Wan 2.1 text- and image-to-video) -> our DiT, configured as Wan.

Wan 2.1's transformer is our DiT with the options of sora_jax/models/dit.py set (`dit_config_from_diffusers`):
QK RMS-norm across heads, Wan's caption MLP over precomputed umT5 features, the output norm modulated by a
table plus the time embedding, and an explicit FFN width. Everything else already coincides: adaLN with a
shared modulation plus a per-block (6, dim) table in the same shift/scale/gate order, an ungated cross-
attention behind an affine LayerNorm, GELU-tanh FFN, cosine-first sinusoidal timesteps on the 0-1000 scale
and the same 3D RoPE split and pair layout.

Tensors map by name (`_our_name`): PyTorch Linear weights (out, in) become kernels (in, out); the 1x2x2
patch Conv3d (dim, C, pt, ph, pw) becomes the dense patch embedding over sora_jax/patching.py's patch
vector, whose features are ordered (pt, ph, pw, C); the (1, k, dim) scale_shift_tables lose their leading
axis. proj_out already emits its features in (pt, ph, pw, C) order, which is ours. Every tensor must be
used and every parameter filled with equal shapes; otherwise the error names the tensor and both shapes.

Timesteps: our t in [0, 1] is Wan's timestep / 1000. Both use x_t = (1 - t) x_0 + t noise and predict the
velocity noise - x_0, and our timestep embedding multiplies t by 1000 again, so the scales meet exactly.

Image-to-video (image_dim set): CLIP image features pass Wan's image embedder and every cross-attention
reads them through keys and values of their own (config.model.image_dim); the conditioning latents that
diffusers concatenates after the noisy ones on the channel axis (in_channels - out_channels of them: the
first-frame latents and their mask) come as separate conditioning patches (config.model.cond_channels),
so the patch Conv3d's input channels split into the noisy part and the conditioning part.

Not supported (refused with a message): first-last-frame models (pos_embed_seq_len) and Wan 2.2's
per-token timesteps.

The way back: `save_diffusers_transformer` writes our DiT (LoRA adapters of sora_jax.models.lora merged into
their kernels) as a diffusers directory (config.json + one safetensors file) through the inverse maps
(`_torch_name`, `_to_theirs`); `diffusers_config` refuses a model whose options Wan's transformer lacks.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from sora_jax import patching
from sora_jax.convert.diffusers_vae import PICKLE_SUFFIXES, _flatten, _unflatten
from sora_jax.models.dit import DiT, PackedInputs, model_options

WAN_CLASS = "WanTransformer3DModel"
INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
TIMESTEP_SCALE = 1000.0  # Wan's timestep = TIMESTEP_SCALE * our t

# diffusers module -> ours, outside the blocks and inside each block; attention projections inside attn1/2.
_TOP = {
    "patch_embedding": "patch_embed",
    "condition_embedder.time_embedder.linear_1": "t_mlp1",
    "condition_embedder.time_embedder.linear_2": "t_mlp2",
    "condition_embedder.time_proj": "t_mod",
    "condition_embedder.text_embedder.linear_1": "text_proj/layers/0",
    "condition_embedder.text_embedder.linear_2": "text_proj/layers/2",
    "condition_embedder.image_embedder.norm1": "image_embed/layers/0",
    "condition_embedder.image_embedder.ff.net.0.proj": "image_embed/layers/1",
    "condition_embedder.image_embedder.ff.net.2": "image_embed/layers/3",
    "condition_embedder.image_embedder.norm2": "image_embed/layers/4",
    "proj_out": "final",
}
_BLOCK = {"norm2": "norm_cross", "ffn.net.0.proj": "mlp/fc1", "ffn.net.2": "mlp/fc2"}
_ATTENTION = {"attn1": "attn", "attn2": "cross"}
_PROJECTION = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "out", "norm_q": "q_norm", "norm_k": "k_norm",
               "add_k_proj": "k_image", "add_v_proj": "v_image", "norm_added_k": "k_image_norm"}
# Stored by some image-to-video checkpoints but used by no computation; diffusers skips them on load too.
_UNUSED = re.compile(r"blocks\.\d+\.attn2\.norm_added_q\.weight")


def dit_config_from_diffusers(raw: dict, *, dtype: str = "float32", param_dtype: str = "float32",
                              attention: str = "auto") -> ml_collections.ConfigDict:
    """Our config sections for a diffusers WanTransformer3DModel config.json dict.

    Returns:
      ConfigDict with `model` and `text` (fields of config.model / config.text) and `channels` (latent
      channels, the autoencoder's).
    Raises:
      ValueError: a variant our DiT does not express (first-last-frame, fewer input than output channels).
    """
    if raw.get("pos_embed_seq_len") is not None:
        raise ValueError(f"pos_embed_seq_len={raw['pos_embed_seq_len']} (Wan's first-last-frame model) is not "
                         "supported.")
    heads, head_dim = raw.get("num_attention_heads", 40), raw.get("attention_head_dim", 128)
    dim, in_channels = heads * head_dim, raw.get("in_channels", 16)
    channels = raw.get("out_channels") or in_channels
    if in_channels < channels:
        raise ValueError(f"in_channels={in_channels} < out_channels={channels}: the model cannot read all it predicts.")
    image_dim = raw.get("image_dim") or 0
    if (raw.get("added_kv_proj_dim") is not None) != bool(image_dim) or raw.get("added_kv_proj_dim") not in (None, dim):
        raise ValueError(f"image_dim={raw.get('image_dim')} with added_kv_proj_dim={raw.get('added_kv_proj_dim')}: "
                         f"image-to-video needs both, the latter equal to the hidden size {dim}.")
    ffn_dim = raw.get("ffn_dim", 13824)
    model = dict(
        hidden=dim, depth=raw.get("num_layers", 40), heads=heads, mlp_ratio=ffn_dim / dim, ffn_dim=ffn_dim,
        patch=tuple(raw.get("patch_size", (1, 2, 2))), dtype=dtype, param_dtype=param_dtype, attention=attention,
        rope_theta=10000.0, pooled_text=False, meta_conditioning=False,
        # diffusers' WanAttention applies the across-heads RMS-norm whatever config.qk_norm says.
        qk_norm="across_heads", cross_attn_norm=bool(raw.get("cross_attn_norm", True)),
        norm_eps=float(raw.get("eps", 1e-6)), time_freq_dim=raw.get("freq_dim", 256), text_proj="gelu_mlp",
        null_text="zeros", final_modulation="table", image_dim=image_dim, cond_channels=in_channels - channels)
    text = dict(encoder="precomputed", width=raw.get("text_dim", 4096), max_len=512)
    return ml_collections.ConfigDict(dict(model=model, text=text, channels=channels))


def _our_name(torch_name: str) -> tuple[str | None, str]:
    """(our parameter path, kind) for a diffusers tensor name; path None when nothing of ours matches.

    kind: "linear" (transpose), "conv" (Conv3d -> dense patch embedding, see _to_ours), "table" (drop the
    leading 1),
    "vector" (norm weights and biases: as stored), "unused" (stored, read by nothing: skipped).
    """
    if _UNUSED.fullmatch(torch_name):
        return None, "unused"
    if torch_name == "scale_shift_table":
        return "final_table", "table"
    prefix, (module, _, leaf) = "", torch_name.rpartition(".")
    block = re.fullmatch(r"blocks\.(\d+)\.(.+)", torch_name)
    if block:
        index, rest = block.groups()
        if rest == "scale_shift_table":
            return f"blocks/{index}/table", "table"
        prefix, (module, _, leaf) = f"blocks/{index}/", rest.rpartition(".")
        attn, _, projection = module.partition(".")
        if attn in _ATTENTION and projection in _PROJECTION:
            ours = f"{_ATTENTION[attn]}/{_PROJECTION[projection]}"
        else:
            ours = _BLOCK.get(module)
    else:
        ours = _TOP.get(module)
    if ours is None or leaf not in ("weight", "bias"):
        return None, ""
    if leaf == "bias":
        return f"{prefix}{ours}/bias", "vector"
    if "norm" in module:
        return f"{prefix}{ours}/scale", "vector"
    return f"{prefix}{ours}/kernel", "conv" if module == "patch_embedding" else "linear"


def _to_ours(value: np.ndarray, kind: str, channels: int) -> np.ndarray:
    """A stored tensor in our layout; `channels` is the number of noisy-latent input channels."""
    if kind == "linear":
        return value.T
    if kind == "conv":
        # (dim, C_in, pt, ph, pw): the first `channels` inputs are the noisy latents, the rest conditioning.
        # Each part becomes (pt, ph, pw, C, dim) -> its patch vector x dim; the conditioning rows follow.
        parts = (value[:, :channels], value[:, channels:])
        return np.concatenate([np.transpose(p, (2, 3, 4, 1, 0)).reshape(-1, value.shape[0]) for p in parts], axis=0)
    if kind == "table":
        return value.reshape(value.shape[1:]) if value.ndim == 3 and value.shape[0] == 1 else value
    return value


def _weight_files(path: str) -> list[str]:
    """The safetensors files of a diffusers model directory: the index's shards, or the single file.

    Raises:
      ValueError: only pickle weights (never loaded: unpickling can run arbitrary code).
      FileNotFoundError: no weights, or a shard the index names is absent.
    """
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f).get("weight_map", {}).values()))
        absent = [s for s in shards if not os.path.exists(os.path.join(path, s))]
        if not shards or absent:
            raise FileNotFoundError(f"{index} names shards that are not in {path}: {absent or 'none listed'}; "
                                    "download every shard.")
        return [os.path.join(path, s) for s in shards]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if WEIGHTS_FILE in files:
        return [os.path.join(path, WEIGHTS_FILE)]
    if len(files) == 1:
        return [os.path.join(path, files[0])]
    if files:
        raise FileNotFoundError(f"{path} holds several .safetensors files ({', '.join(files)}) but no {INDEX_FILE} "
                                "saying which make up the model.")
    pickles = [f for f in os.listdir(path) if f.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise ValueError(f"{path} holds only pickle weights ({', '.join(pickles)}); pickle files are refused because "
                         "loading them can run arbitrary code. Re-save with safe_serialization=True.")
    raise FileNotFoundError(f"no .safetensors weights in {path} (expected {WEIGHTS_FILE} or {INDEX_FILE}).")


def _read_tensors(files: list[str]):
    """Yields (name, host array, file name) for every tensor; bfloat16 stays bfloat16 (via ml_dtypes)."""
    from safetensors import SafetensorError, safe_open

    cpu = jax.local_devices(backend="cpu")[0]
    for file in files:
        try:
            # framework="flax": numpy has no bfloat16; arrays stay on the host CPU, one at a time.
            with jax.default_device(cpu), safe_open(file, framework="flax") as f:
                for name in sorted(f.keys()):  # sorted: the same tensor is reported each time
                    yield name, np.asarray(f.get_tensor(name)), os.path.basename(file)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file} is not a valid safetensors file ({e}); re-download or re-export it.") from None


def read_config(path: str) -> dict:
    """config.json of a diffusers WanTransformer3DModel directory; other classes are refused."""
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} does not exist: pass a diffusers-format transformer directory "
                                "(e.g. Wan2.1-T2V-1.3B-Diffusers/transformer).")
    with open(config_path) as f:
        raw = json.load(f)
    if raw.get("_class_name") != WAN_CLASS:
        raise ValueError(f"{config_path} describes a {raw.get('_class_name')!r}, not a {WAN_CLASS}; pass the "
                         "transformer directory of a Wan 2.1 checkpoint.")
    return raw


def load_diffusers_transformer(path: str, *, dtype: str = "float32", param_dtype: str = "float32",
                               attention: str = "auto", scan_layers: bool = False) -> DiT:
    """Reads a diffusers-format WanTransformer3DModel directory and returns our DiT with its weights.

    Args:
      path: the directory with config.json and diffusion_pytorch_model.safetensors (or sharded, with
        diffusion_pytorch_model.safetensors.index.json).
      dtype, param_dtype: compute and parameter dtypes (names in sora_jax.layers.common.DTYPES).
      attention: attention backend (sora_jax.layers.attention.BACKEND_CHOICES).
      scan_layers: stack the blocks' parameters for nnx.scan (config.model.scan_layers, as configs/wan21.py
        sets for the full sizes) instead of one module per block.
    Raises:
      ValueError: another model class, pickle-only weights, a corrupt file, or a tensor whose name or shape
        does not match the architecture in config.json (the message names the tensor and both shapes).
      FileNotFoundError: no config.json or no weights.
    """
    cfg, filled = read_diffusers_weights(path, dtype=dtype, param_dtype=param_dtype, attention=attention,
                                         scan_layers=scan_layers)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: _build(cfg)), nnx.Param)
    # Host arrays until here: the device holds one copy of the weights, never two.
    return nnx.merge(graphdef, _unflatten({k: jnp.asarray(v) for k, v in filled.items()}, nnx.to_pure_dict(state)))


def _build(cfg) -> DiT:
    return DiT(cfg.model, cfg.text, math.prod(cfg.model.patch) * cfg.channels, 0, rngs=nnx.Rngs(0))


def read_diffusers_weights(path: str, *, dtype: str = "float32", param_dtype: str = "float32",
                           attention: str = "auto", scan_layers: bool = False) -> tuple[ml_collections.ConfigDict,
                                                                                        dict[str, np.ndarray]]:
    """(our config sections, {our parameter path "a/b/kernel": host array}) of a diffusers WanTransformer3DModel
    directory, in our layout and param_dtype, without touching a device (load_diffusers_transformer's first
    half; the trainer's config.init_from places the arrays into their shardings itself).

    cfg.model.scan_layers is `scan_layers`, and the block parameters are stacked accordingly. Raises as
    load_diffusers_transformer does.
    """
    raw = read_config(path)
    cfg = dit_config_from_diffusers(raw, dtype=dtype, param_dtype=param_dtype, attention=attention)
    # Tensors are checked against the per-block layout, whose names are diffusers' block indices.
    _, state = nnx.split(nnx.eval_shape(lambda: _build(cfg)), nnx.Param)
    filled = _convert(path, _flatten(nnx.to_pure_dict(state)), cfg.channels)
    cfg.model.scan_layers = scan_layers
    if scan_layers:  # one array per block parameter, its leading axis the layer that nnx.scan runs over
        for key in [k for k in filled if k.startswith("blocks/0/")]:
            rest = key[len("blocks/0/"):]
            filled[f"blocks/{rest}"] = np.stack([filled.pop(f"blocks/{i}/{rest}") for i in range(cfg.model.depth)])
    return cfg, filled


def _convert(path: str, wanted: dict, channels: int) -> dict[str, np.ndarray]:
    """{our parameter path: host array in our layout and dtype} for every tensor of the checkpoint at `path`.

    Raises:
      ValueError: a tensor with no counterpart in `wanted` or of another shape, or one `wanted` has not.
    """
    source = os.path.join(path, "config.json")
    filled = {}
    for torch_name, stored, file in _read_tensors(_weight_files(path)):
        ours, kind = _our_name(torch_name)
        if kind == "unused":
            continue
        if ours not in wanted:
            raise ValueError(f"tensor {torch_name}: shape {tuple(stored.shape)} in {file} but no such tensor in the "
                             f"architecture of {source}; the config does not match the weights.")
        value = _to_ours(stored, kind, channels)
        expected = tuple(wanted[ours].shape)
        if tuple(value.shape) != expected:
            layout = f" ({tuple(stored.shape)} as stored)" if value.shape != stored.shape else ""
            raise ValueError(f"tensor {torch_name}: shape {tuple(value.shape)}{layout} in {file} but {expected} from "
                             f"{source}; the config does not match the weights.")
        filled[ours] = np.asarray(value, wanted[ours].dtype)
    missing = sorted(set(wanted) - set(filled))
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} tensors the config needs, e.g. {missing[0]} "
                         f"{tuple(wanted[missing[0]].shape)}; the config does not match the weights.")
    return filled


@nnx.jit
def apply_dense(model: DiT, latents: jax.Array, timesteps: jax.Array, context: jax.Array,
                image: jax.Array | None = None, condition: jax.Array | None = None) -> jax.Array:
    """Wan's forward on dense inputs: one sample per row, packed through our patching utilities (jitted;
    one compile per input shape).

    Args:
      model: a DiT configured as Wan (load_diffusers_transformer).
      latents: [B, T, H, W, C] channels-last latents: diffusers' hidden_states [B, C, T, H, W] permuted by
        (0, 2, 3, 4, 1). T, H, W must divide by the patch size.
      timesteps: [B] on Wan's 0-1000 scale (diffusers' `timestep`).
      context: [B, Lt, text_dim] caption features (diffusers' encoder_hidden_states); every position is
        attended, padding included, as diffusers does.
      image: image-to-video only: [B, Li, image_dim] image features (diffusers' encoder_hidden_states_image).
      condition: image-to-video only: [B, T, H, W, in_channels - out_channels] conditioning latents, the
        channels diffusers concatenates after the noisy ones.
    Returns:
      [B, T, H, W, C] float32 prediction (the flow velocity noise - x_0), the layout of `latents`.
    """
    b, *size, channels = latents.shape
    grid = patching.check_divisible(size, model.patch)
    tokens = jax.vmap(functools.partial(patching.patchify, patch=model.patch))(latents)
    n, lt = tokens.shape[1], context.shape[1]
    positions = jnp.broadcast_to(jnp.asarray(patching.positions(grid)), (b, n, 3))
    t = jnp.asarray(timesteps, jnp.float32).reshape(b, 1) / TIMESTEP_SCALE
    cond = None if condition is None else jax.vmap(functools.partial(patching.patchify, patch=model.patch))(condition)
    image_segments = None if image is None else jnp.ones(image.shape[:2], jnp.int32)
    inputs = PackedInputs(tokens, positions, jnp.ones((b, n), jnp.int32), t, context, jnp.ones((b, lt), jnp.int32),
                          jnp.broadcast_to(jnp.arange(lt, dtype=jnp.int32), (b, lt)), jnp.zeros((b, 1), bool),
                          cond=cond, image=image, image_segments=image_segments)
    out = model(inputs)
    return jax.vmap(lambda x: patching.unpatchify(x, grid, model.patch, channels))(out)


# --- export: our DiT (LoRA adapters merged) -> diffusers ---------------------------------------------------

_TOP_BACK = {ours: theirs for theirs, ours in _TOP.items()}
_BLOCK_BACK = {ours: theirs for theirs, ours in _BLOCK.items()}
_BLOCK_BACK.update({f"{a_ours}/{p_ours}": f"{a}.{p}" for a, a_ours in _ATTENTION.items()
                    for p, p_ours in _PROJECTION.items()})
# Fields of our config.model that dit_config_from_diffusers derives from config.json: an exported config must
# give them back unchanged, or diffusers would compute something else.
_EXPRESSED = ("hidden", "depth", "heads", "ffn_dim", "patch", "rope_theta", "pooled_text", "meta_conditioning",
              "qk_norm", "cross_attn_norm", "norm_eps", "time_freq_dim", "text_proj", "null_text", "final_modulation",
              "image_dim", "cond_channels")


def _torch_name(ours: str) -> tuple[str, str]:
    """(diffusers tensor name, kind) of one of our parameter paths (a per-block layout); _our_name's inverse."""
    if ours == "final_table":
        return "scale_shift_table", "table"
    module, _, leaf = ours.rpartition("/")
    block = re.fullmatch(r"blocks/(\d+)/(.+)", module) or re.fullmatch(r"blocks/(\d+)/(table)", ours)
    if block and block.group(2) == "table":
        return f"blocks.{block.group(1)}.scale_shift_table", "table"
    theirs = f"blocks.{block.group(1)}.{_BLOCK_BACK.get(block.group(2), '')}" if block else _TOP_BACK.get(module, "")
    if not theirs or theirs.endswith("."):
        raise ValueError(f"parameter {ours} has no counterpart in diffusers' WanTransformer3DModel.")
    if leaf == "kernel":
        return f"{theirs}.weight", "conv" if module == "patch_embed" else "linear"
    return f"{theirs}.{'bias' if leaf == 'bias' else 'weight'}", "vector"


def _to_theirs(value: np.ndarray, kind: str, patch: tuple, channels: int) -> np.ndarray:
    """One of our arrays in diffusers' layout; _to_ours's inverse."""
    if kind == "linear":
        return value.T
    if kind == "conv":  # rows (pt, ph, pw, C) of the noisy latents, then of the conditioning -> (dim, C_in, pt, ph, pw)
        split = math.prod(patch) * channels
        parts = [p.reshape(*patch, -1, value.shape[1]).transpose(4, 3, 0, 1, 2)
                 for p in (value[:split], value[split:])]
        return np.concatenate(parts, axis=1)
    if kind == "table":
        return value[None]
    return value


def diffusers_config(model_cfg, text_cfg, channels: int) -> dict:
    """The config.json of a WanTransformer3DModel computing what our DiT of `model_cfg` computes.

    Raises:
      ValueError: the model uses an option Wan's transformer does not have (naming the field).
    """
    dim, heads, opts = model_cfg.hidden, model_cfg.heads, model_options(model_cfg)
    raw = dict(_class_name=WAN_CLASS, patch_size=list(model_cfg.patch), num_attention_heads=heads,
               attention_head_dim=dim // heads, in_channels=channels + opts["cond_channels"], out_channels=channels,
               text_dim=text_cfg.width, freq_dim=opts["time_freq_dim"], ffn_dim=opts["ffn_dim"],
               num_layers=model_cfg.depth, cross_attn_norm=opts["cross_attn_norm"], qk_norm="rms_norm_across_heads",
               eps=opts["norm_eps"], image_dim=opts["image_dim"] or None,
               added_kv_proj_dim=dim if opts["image_dim"] else None, rope_max_seq_len=1024, pos_embed_seq_len=None)
    if text_cfg.encoder != "precomputed":
        raise ValueError(f"config.text.encoder={text_cfg.encoder!r}: Wan's transformer reads precomputed caption "
                         "features (\"precomputed\").")
    back = dit_config_from_diffusers(raw).model
    ours = {**model_cfg.to_dict(), **opts, "patch": tuple(model_cfg.patch)}
    for field in _EXPRESSED:
        if ours.get(field) != back[field] and not (field == "patch" and tuple(back[field]) == ours[field]):
            raise ValueError(f"config.model.{field}={ours.get(field)!r} has no WanTransformer3DModel equivalent "
                             f"(it would be {back[field]!r}).")
    return raw


EXPORT_DTYPES = {"float32": np.float32, "bfloat16": jnp.bfloat16, "float16": np.float16}


def save_diffusers_transformer(model_or_params, config, out_dir: str, dtype: str = "float32",
                               max_shard_gib: float = 5.0) -> str:
    """Writes a DiT configured as Wan (LoRA adapters, if any, merged) as a diffusers WanTransformer3DModel
    directory (config.json + safetensors) that `from_pretrained` loads.

    Args:
      model_or_params: our DiT (possibly with sora_jax.models.lora adapters) or the plain model's parameters
        as a pure dict; blocks per layer or stacked (config.model.scan_layers).
      config: has `model` and `text` (a training config, or dit_config_from_diffusers's result).
      out_dir: created if absent; must not hold a model already.
      dtype: what the tensors are written in, one of EXPORT_DTYPES ("bfloat16" halves a 14B export to 28 GB,
        as the released Wan weights are stored).
      max_shard_gib: weights beyond this size are split into numbered files with an index
        (diffusion_pytorch_model-0000k-of-0000n.safetensors + INDEX_FILE), as diffusers writes large models.
    Returns:
      out_dir.
    Raises:
      ValueError: an option diffusers' Wan transformer lacks, a parameter with no diffusers counterpart, or an
        unknown dtype.
      FileExistsError: out_dir already holds config.json or weights.
    """
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype {dtype!r}; choose one of {sorted(EXPORT_DTYPES)}.")
    tensors, raw = _diffusers_tensors(model_or_params, config, EXPORT_DTYPES[dtype])
    os.makedirs(out_dir, exist_ok=True)
    taken = [f for f in os.listdir(out_dir) if f == "config.json" or f.endswith((".safetensors", ".index.json"))]
    if taken:
        raise FileExistsError(f"{out_dir} already holds {', '.join(sorted(taken))}; export into a new directory.")
    _write_shards(tensors, out_dir, int(max_shard_gib * 2**30))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(raw, f, indent=2)
    return out_dir


def _diffusers_tensors(model_or_params, config, dtype) -> tuple[dict[str, np.ndarray], dict]:
    """({diffusers name: array in `dtype`}, diffusers config.json) of our DiT's (merged) parameters."""
    from sora_jax.models.lora import merged_params
    params = model_or_params if isinstance(model_or_params, dict) else merged_params(model_or_params)
    flat = {k: np.asarray(jax.device_get(v)) for k, v in _flatten(params).items()}
    channels = flat["final/kernel"].shape[1] // math.prod(config.model.patch)
    raw = diffusers_config(config.model, config.text, channels)
    if any(k.startswith("blocks/") and not re.match(r"blocks/\d+/", k) for k in flat):  # stacked: one per block
        for key in [k for k in flat if k.startswith("blocks/")]:
            for i, value in enumerate(flat.pop(key)):
                flat[f"blocks/{i}/{key[len('blocks/'):]}"] = value
    tensors = {}
    for ours, value in flat.items():
        theirs, kind = _torch_name(ours)
        value = _to_theirs(value, kind, tuple(config.model.patch), channels)
        tensors[theirs] = np.ascontiguousarray(value.astype(dtype))
    return tensors, raw


def _write_shards(tensors: dict[str, np.ndarray], out_dir: str, max_bytes: int) -> None:
    """One WEIGHTS_FILE, or numbered files of at most max_bytes each (a larger tensor alone) plus INDEX_FILE."""
    from safetensors.numpy import save_file
    shards, size = [[]], 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    if len(shards) == 1:
        save_file(tensors, os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})
        return
    weight_map = {}
    for k, names in enumerate(shards):
        file = WEIGHTS_FILE.replace(".safetensors", f"-{k + 1:05d}-of-{len(shards):05d}.safetensors")
        save_file({n: tensors[n] for n in names}, os.path.join(out_dir, file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2)
