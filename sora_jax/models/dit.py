"""Diffusion transformer over packed spacetime tokens.

Inputs are NaViT-packed: each row of the batch holds several samples, told apart by segment ids.
- self-attention is restricted to the token's own sample (segment mask) with 3D RoPE from its
  per-sample (t, h, w) position;
- cross-attention reaches only the caption tokens of the token's own sample;
- timestep conditioning is per sample, broadcast to that sample's tokens, through adaLN-Zero. The
  timestep MLP runs once per sample (not per token or per block): each block adds its own learned
  offset table to the shared modulation, as PixArt-alpha's adaLN-single does. Gates start at zero, so
  every block starts as the identity.

Options in config.model (MODEL_OPTIONS; the defaults are this model as it always was) make the same module
express other DiTs of this family; configs/wan21.py sets them to Wan 2.1's text-to-video transformer:
  qk_norm           "per_head": RMS-norm of each head's q and k | "across_heads": of the whole projection,
                    before the split into heads | "none"
  cross_attn_norm   affine LayerNorm before cross-attention (False: none)
  norm_eps          epsilon of every LayerNorm and RMSNorm
  ffn_dim           the MLP's hidden width; 0 means int(hidden * mlp_ratio)
  time_freq_dim     width of the sinusoidal timestep features
  text_proj         caption projection: "linear" | "gelu_mlp" (linear, GELU-tanh, linear)
  null_text         a dropped caption becomes a "learned" embedding | "zeros" as its features (no parameter)
  final_modulation  shift and scale of the output norm: "linear" of the time embedding | "table": a learned
                    (2, hidden) table plus the time embedding itself
  image_dim         width of per-sample image features (e.g. CLIP's, Wan image-to-video) that cross-attention
                    also reads, through keys and values of their own; 0: none
  cond_channels     latent channels of conditioning (e.g. the first frame and its mask) that every token reads
                    besides its noisy latents, PackedInputs.cond; the model predicts only the latents; 0: none
  abs_pos           "none": RoPE alone (Wan) | "edges": also add to each token's embedding a learned projection of
                    sinusoids of its distances to its sample's six boundaries (first/last frame, top/bottom,
                    left/right). RoPE only tells tokens their offsets from one another; a small model trained
                    briefly learns where the walls are (whole objects, bounces) much sooner when told.
  head              output projection: "linear" (hidden -> patch) | "mlp" (hidden -> ffn_dim, GELU-tanh, -> patch).
                    A linear head's outputs span at most `hidden` dimensions: a pixel-space model whose patches
                    are wider (8x8x3 = 192 > 128) cannot draw every patch, and sharp edges come out smeared.
With config.text.encoder = "precomputed" the model has no text encoder: PackedInputs.text carries caption
features [B, Lt, config.text.width] computed elsewhere (e.g. umT5's, cached offline).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sora_jax import sharding
from sora_jax.layers.attention import QK_NORMS, Attention
from sora_jax.layers.common import DTYPES, MLP, dense, gather_segments, norm, timestep_embedding
from sora_jax.layers.rope import rope_angles
from sora_jax.models.text import build_text_encoder


class PackedInputs(NamedTuple):
    """One packed batch as the model sees it.

    tokens [B, L, D_patch] noisy latent patches; positions [B, L, 3]; segments [B, L] (0 = padding);
    t [B, S] per-sample timestep in [0, 1] (sample k has segment id k + 1); text [B, Lt] ids (caption
    features [B, Lt, config.text.width] when config.text.encoder is "precomputed");
    text_segments [B, Lt]; text_positions [B, Lt]; drop_text [B, S] True where the caption is replaced
    by the learned null embedding, or by zero features (config.model.null_text; classifier-free
    guidance); meta [B, S, 4] per-sample (fps, original height, original width, duration in s), read only
    by a model built with meta_conditioning. cond [B, L, pt*ph*pw*cond_channels] conditioning patches beside
    each token; image [B, Li, image_dim] image features with image_segments [B, Li]: only for models built
    with cond_channels / image_dim. given [B, L] bool, optional: tokens handed to the model clean (an image, the
    frames being extended) -- their tokens are the clean latents and they are modulated as at t = 0, whatever
    their sample's t; the rest of the sample is generated (per-token conditioning, sora_jax.diffusion.tasks).
    """
    tokens: jax.Array
    positions: jax.Array
    segments: jax.Array
    t: jax.Array
    text: jax.Array
    text_segments: jax.Array
    text_positions: jax.Array
    drop_text: jax.Array
    meta: jax.Array | None = None
    cond: jax.Array | None = None
    image: jax.Array | None = None
    image_segments: jax.Array | None = None
    given: jax.Array | None = None


def meta_features(meta: jax.Array) -> jax.Array:
    """log1p of (fps, height, width, duration): scale-free inputs for the conditioning MLP; 0 = unknown."""
    return jnp.log1p(jnp.maximum(meta.astype(jnp.float32), 0.0))


# Periods (in tokens) of the boundary-distance sinusoids of abs_pos="edges": 2 to 512, geometric.
EDGE_PERIODS = tuple(2.0 * 2.0 ** k for k in range(9))


def boundary_features(positions: jax.Array, segments: jax.Array, num_samples: int) -> jax.Array:
    """[B, L, 6 * 2 * len(EDGE_PERIODS)] sinusoids of each token's distance to the start and to the end of its
    own sample along t, h and w (the end is that sample's largest position on the axis, a segment max)."""
    b, length, _ = positions.shape
    ids = (jnp.arange(b)[:, None] * (num_samples + 1) + segments).reshape(-1)
    extent = jax.ops.segment_max(positions.reshape(-1, 3), ids, num_segments=b * (num_samples + 1))
    extent = extent.reshape(b, num_samples + 1, 3)
    far = jnp.take_along_axis(extent, segments[..., None], axis=1) - positions
    coords = jnp.concatenate([positions, far], axis=-1).astype(jnp.float32)
    angles = coords[..., None] * (2.0 * math.pi / jnp.asarray(EDGE_PERIODS, jnp.float32))
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(b, length, -1)


def modulate(x, shift, scale):
    return x * (1.0 + scale) + shift


# The config.model options beyond the basic sizes: name -> (default, allowed values; None: any).
MODEL_OPTIONS = {
    "qk_norm": ("per_head", QK_NORMS),
    "cross_attn_norm": (True, (True, False)),
    "norm_eps": (1e-6, None),
    "ffn_dim": (0, None),
    "time_freq_dim": (256, None),
    "text_proj": ("linear", ("linear", "gelu_mlp")),
    "null_text": ("learned", ("learned", "zeros")),
    "final_modulation": ("linear", ("linear", "table")),
    "image_dim": (0, None),
    "cond_channels": (0, None),
    "abs_pos": ("none", ("none", "edges")),
    "head": ("linear", ("linear", "mlp")),
}
PRECOMPUTED_TEXT = "precomputed"  # config.text.encoder: caption features come with the batch


def model_options(model_cfg) -> dict:
    """MODEL_OPTIONS read from config.model (absent ones take their defaults) and checked; ffn_dim resolved.

    Raises:
      ValueError: naming the field and the values it may take.
    """
    options = {name: model_cfg.get(name, default) for name, (default, _) in MODEL_OPTIONS.items()}
    for name, (_, allowed) in MODEL_OPTIONS.items():
        if allowed is not None and options[name] not in allowed:
            raise ValueError(f"config.model.{name}={options[name]!r}; choose one of {allowed}.")
    for name, even in (("ffn_dim", False), ("time_freq_dim", True), ("image_dim", False), ("cond_channels", False)):
        value = options[name]
        if not isinstance(value, int) or value < 0 or (even and (value == 0 or value % 2)):
            raise ValueError(f"config.model.{name}={value!r} must be a {'positive even' if even else 'non-negative'} "
                             "integer.")
    if not options["norm_eps"] > 0:
        raise ValueError(f"config.model.norm_eps={options['norm_eps']!r} must be > 0.")
    options["ffn_dim"] = options["ffn_dim"] or int(model_cfg.hidden * model_cfg.mlp_ratio)
    return options


class DiTBlock(nnx.Module):
    """Self-attention, cross-attention and MLP with adaLN-Zero modulation.

    The residual stream stays in float32 (the modulation is float32); every matmul and the attention
    kernels run in the compute dtype, which each layer casts its inputs to. Cross-attention has no gate:
    the caption is read at full strength from the first step (as in PixArt-alpha and Wan).
    """

    def __init__(self, dim: int, heads: int, ffn_dim: int, *, rngs: nnx.Rngs, backend: str, block: int,
                 dtype, param_dtype, qk_norm: str = "per_head", cross_attn_norm: bool = True, eps: float = 1e-6,
                 image_kv: bool = False):
        kw = dict(rngs=rngs, backend=backend, block=block, qk_norm=qk_norm, eps=eps, dtype=dtype,
                  param_dtype=param_dtype)
        self.norm1 = norm(dim, rngs=rngs, affine=False, eps=eps)
        self.attn = Attention(dim, heads, **kw)
        self.norm_cross = norm(dim, rngs=rngs, eps=eps, param_dtype=param_dtype) if cross_attn_norm else None
        self.cross = Attention(dim, heads, image_kv=image_kv, **kw)
        self.norm2 = norm(dim, rngs=rngs, affine=False, eps=eps)
        self.mlp = MLP(dim, ffn_dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.table = nnx.Param(jnp.zeros((6, dim), param_dtype), out_sharding=(None, "embed"))

    def __call__(self, x, mod, rope, segments, context, text_segments, image=None, image_segments=None):
        mod = mod + self.table[...].reshape(-1)
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod, 6, axis=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1), segments, rope=rope)
        normed = x if self.norm_cross is None else self.norm_cross(x)
        x = x + self.cross(normed, segments, context=context, context_segments=text_segments, image=image,
                           image_segments=image_segments)
        x = x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return sharding.constrain(x, ("batch", "length", "act_embed"))


# What a block keeps for the backward pass (config.model.remat). "save_dots" keeps the weight matmuls'
# outputs and recomputes the rest (attention included, which the blockwise/fused kernels recompute
# anyway); "offload_dots" moves those outputs to host memory instead (GPU/TPU).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "offload_dots": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}


def _run_block(block, x, mod, rope, segments, context, text_segments, image, image_segments):
    return block(x, mod, rope, segments, context, text_segments, image, image_segments)


class DiT(nnx.Module):
    """The video diffusion transformer; predicts the flow velocity for every token."""

    def __init__(self, model_cfg, text_cfg, patch_dim: int, vocab_size: int, *, rngs: nnx.Rngs):
        dim, dtype = model_cfg.hidden, DTYPES[model_cfg.dtype]
        param_dtype = DTYPES[model_cfg.get("param_dtype", "float32")]
        backend, block = model_cfg.attention, model_cfg.get("attention_block", 128)
        opts = model_options(model_cfg)
        self.hidden, self.heads, self.rope_theta = dim, model_cfg.heads, model_cfg.rope_theta
        self.patch, self.time_freq_dim = tuple(model_cfg.get("patch", ())), opts["time_freq_dim"]
        self.remat, self.scan_layers = model_cfg.get("remat", "none"), model_cfg.get("scan_layers", False)
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"config.model.remat={self.remat!r}; choose one of {sorted(REMAT_POLICIES)}.")
        # Conditioning patches (cond_channels) are read beside the noisy ones: the embedding's input grows.
        self.cond_dim = math.prod(self.patch) * opts["cond_channels"]
        self.patch_embed = dense(patch_dim + self.cond_dim, dim, ("patch", "embed"), rngs=rngs, dtype=dtype)
        self.edge_embed = nnx.data(None)
        if opts["abs_pos"] == "edges":
            self.edge_embed = dense(6 * 2 * len(EDGE_PERIODS), dim, (None, "embed"), rngs=rngs)
        self._init_text(text_cfg, vocab_size, dim, opts, rngs=rngs, backend=backend, block=block, dtype=dtype)
        self.t_mlp1 = dense(self.time_freq_dim, dim, (None, "embed"), rngs=rngs)
        self.t_mlp2 = dense(dim, dim, ("embed", None), rngs=rngs)
        self.t_mod = dense(dim, 6 * dim, ("embed", "mlp"), rngs=rngs, zero_init=True)
        # The caption's mean embedding joins the timestep in the adaLN conditioning (as SD3's pooled text
        # does): a per-sample global signal that global attributes such as color are learned from fast.
        self.pooled_text = (dense(dim, dim, ("embed", None), rngs=rngs, zero_init=True)
                            if model_cfg.pooled_text else None)
        # Per-sample metadata (fps, original size, duration) joins the timestep too, so one model can be asked
        # for a frame rate or a native resolution; zero-initialised, so it starts as a no-op.
        self.meta_mlp = nnx.data(None)
        if model_cfg.get("meta_conditioning", False):
            self.meta_mlp = nnx.Sequential(dense(4, dim, (None, "embed"), rngs=rngs), jax.nn.silu,
                                           dense(dim, dim, ("embed", None), rngs=rngs, zero_init=True))
        make = lambda r: DiTBlock(dim, model_cfg.heads, opts["ffn_dim"], rngs=r, backend=backend,  # noqa: E731
                                  block=block, dtype=dtype, param_dtype=param_dtype, qk_norm=opts["qk_norm"],
                                  cross_attn_norm=opts["cross_attn_norm"], eps=opts["norm_eps"],
                                  image_kv=opts["image_dim"] > 0)
        if self.scan_layers:
            # One stacked set of block parameters (leading "layers" axis), run by nnx.scan: the block is
            # traced and compiled once, whatever the depth.
            self.blocks = nnx.vmap(make, in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})(
                rngs.fork().split(model_cfg.depth))
        else:
            self.blocks = nnx.List([make(rngs) for _ in range(model_cfg.depth)])
        self.final_norm = norm(dim, rngs=rngs, affine=False, eps=opts["norm_eps"])
        # "table" (Wan): the time embedding itself plus a learned offset is the output norm's shift and scale.
        self.final_mod, self.final_table = nnx.data(None), nnx.data(None)
        if opts["final_modulation"] == "linear":
            self.final_mod = dense(dim, 2 * dim, ("embed", "mlp"), rngs=rngs, zero_init=True)
        else:
            self.final_table = nnx.Param(jnp.zeros((2, dim), param_dtype), out_sharding=(None, "embed"))
        self.final_hidden, head_in = nnx.data(None), dim
        if opts["head"] == "mlp":
            head_in = opts["ffn_dim"]
            self.final_hidden = dense(dim, head_in, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.final = dense(head_in, patch_dim, ("mlp" if opts["head"] == "mlp" else "embed", "patch"), rngs=rngs,
                           zero_init=True, dtype=dtype)

    def _init_text(self, text_cfg, vocab_size: int, dim: int, opts: dict, *, rngs, backend, block, dtype):
        """The text encoder (None for precomputed features), the projection to `dim`, the null caption."""
        if text_cfg.encoder == PRECOMPUTED_TEXT:
            self.text_encoder, width = nnx.data(None), text_cfg.width
        else:
            self.text_encoder = build_text_encoder(text_cfg, vocab_size, rngs=rngs, backend=backend, block=block,
                                                   dtype=dtype)
            width = self.text_encoder.out_dim
        if opts["text_proj"] == "linear":
            self.text_proj = dense(width, dim, (None, "embed"), rngs=rngs, dtype=dtype)
        else:  # "gelu_mlp", Wan's / PixArt-alpha's caption projection
            self.text_proj = nnx.Sequential(dense(width, dim, (None, "embed"), rngs=rngs, dtype=dtype),
                                            functools.partial(jax.nn.gelu, approximate=True),
                                            dense(dim, dim, ("embed", None), rngs=rngs, dtype=dtype))
        self.null_text = nnx.data(None)
        if opts["null_text"] == "learned":
            self.null_text = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (dim,)), out_sharding=("embed",))
        # Image features (Wan image-to-video's CLIP tokens): LayerNorm, GELU MLP, LayerNorm, as Wan has them,
        # with LayerNorm's usual epsilon of 1e-5 there.
        self.image_embed = nnx.data(None)
        if opts["image_dim"]:
            width = opts["image_dim"]
            self.image_embed = nnx.Sequential(
                norm(width, rngs=rngs, eps=1e-5, axis=None), dense(width, width, (None, None), rngs=rngs, dtype=dtype),
                functools.partial(jax.nn.gelu, approximate=False),
                dense(width, dim, (None, "embed"), rngs=rngs, dtype=dtype), norm(dim, rngs=rngs, eps=1e-5))

    def encode_text(self, inputs: PackedInputs) -> jax.Array:
        """Caption embeddings [B, Lt, hidden], dropped captions replaced by the null embedding (or zero features)."""
        dropped = gather_segments(inputs.drop_text, inputs.text_segments)[..., None]
        if self.text_encoder is None:
            features = inputs.text.astype(jnp.float32)
        else:
            features = self.text_encoder(inputs.text, inputs.text_segments, inputs.text_positions)
        if self.null_text is None:
            return self.text_proj(jnp.where(dropped, 0.0, features))
        return jnp.where(dropped, self.null_text[...], self.text_proj(features))

    def pool_text(self, context: jax.Array, text_segments: jax.Array, num_samples: int) -> jax.Array:
        """Mean caption embedding per sample: [B, Lt, D] -> [B, S, D] (sample k has segment k + 1)."""
        onehot = (text_segments[:, :, None] == jnp.arange(1, num_samples + 1)).astype(context.dtype)
        total = jnp.einsum("bls,bld->bsd", onehot, context)
        return total / jnp.maximum(onehot.sum(1)[..., None], 1.0)

    def run_blocks(self, x, args):
        """All blocks over x, with the configured remat policy, looped in Python or scanned."""
        step = _run_block
        if self.remat != "none":
            step = nnx.remat(_run_block, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan_layers)
        if not self.scan_layers:
            for block in self.blocks:
                x = step(block, x, *args)
            return x

        @nnx.scan(in_axes=(0, nnx.Carry) + (None,) * len(args), out_axes=nnx.Carry,
                  transform_metadata={nnx.PARTITION_NAME: "layers"})
        def scan_fn(block, carry, *rest):
            return step(block, carry, *rest)
        return scan_fn(self.blocks, x, *args)

    def _conditioning(self, inputs: PackedInputs):
        """(patch-embedding input, image tokens [B, Li, hidden] or None) from the optional inputs."""
        tokens, image = inputs.tokens, None
        if self.cond_dim:
            if inputs.cond is None:
                raise ValueError("this model reads conditioning patches (config.model.cond_channels); pass "
                                 f"PackedInputs.cond [B, L, {self.cond_dim}].")
            tokens = jnp.concatenate([tokens, inputs.cond.astype(tokens.dtype)], axis=-1)
        if self.image_embed is not None:
            if inputs.image is None or inputs.image_segments is None:
                raise ValueError("this model reads image features (config.model.image_dim); pass PackedInputs.image "
                                 "[B, Li, image_dim] and image_segments [B, Li].")
            image = self.image_embed(inputs.image.astype(jnp.float32))
        return tokens, image

    def _modulation(self, inputs: PackedInputs, context: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Per-token adaLN modulation [B, L, 6D] of the blocks and [B, L, 2D] of the output norm, from each
        sample's timestep (plus pooled caption and metadata where the model has them).

        Given tokens (inputs.given) take their sample's modulation at t = 0: the per-sample conditioning is
        computed for 2S entries (each sample at its t, then at 0) and each token gathers its own.
        """
        t, segments, samples = inputs.t, inputs.segments, inputs.t.shape[1]
        if inputs.given is not None:
            t = jnp.concatenate([t, jnp.zeros_like(t)], axis=1)
            segments = jnp.where(inputs.given & (segments > 0), segments + samples, segments)
        per_entry = lambda x: x if inputs.given is None else jnp.concatenate([x, x], axis=1)  # noqa: E731
        temb = self.t_mlp2(jax.nn.silu(self.t_mlp1(timestep_embedding(t, self.time_freq_dim))))  # [B, S or 2S, D]
        if self.pooled_text is not None:
            temb = temb + per_entry(self.pooled_text(self.pool_text(context, inputs.text_segments, samples)))
        if self.meta_mlp is not None:
            if inputs.meta is None:
                raise ValueError("this model conditions on per-sample metadata (config.model.meta_conditioning); "
                                 "pass PackedInputs.meta [B, S, 4] = (fps, height, width, duration).")
            temb = temb + per_entry(self.meta_mlp(meta_features(inputs.meta)))
        mod = gather_segments(self.t_mod(jax.nn.silu(temb)), segments)  # [B, L, 6D]
        if self.final_table is None:
            final_mod = self.final_mod(jax.nn.silu(temb))
        else:
            final_mod = (temb[..., None, :] + self.final_table[...]).reshape(*temb.shape[:-1], 2 * self.hidden)
        return mod, gather_segments(final_mod, segments)

    def __call__(self, inputs: PackedInputs) -> jax.Array:
        tokens, image = self._conditioning(inputs)
        # The residual stream is float32 (the modulation is); each layer casts its matmul inputs to the compute dtype.
        x = self.patch_embed(tokens).astype(jnp.float32)
        if self.edge_embed is not None:
            x = x + self.edge_embed(boundary_features(inputs.positions, inputs.segments, inputs.t.shape[1]))
        x = sharding.constrain(x, ("batch", "length", "act_embed"))
        context = self.encode_text(inputs)

        mod, final_mod = self._modulation(inputs, context)

        rope = rope_angles(inputs.positions, self.hidden // self.heads, self.rope_theta)
        x = self.run_blocks(x, (mod, rope, inputs.segments, context, inputs.text_segments, image,
                                inputs.image_segments))
        shift, scale = jnp.split(final_mod, 2, axis=-1)
        x = modulate(self.final_norm(x), shift, scale)
        if self.final_hidden is not None:
            x = jax.nn.gelu(self.final_hidden(x), approximate=True)
        return self.final(x).astype(jnp.float32)
