"""Diffusion transformer over packed spacetime tokens.

Inputs are NaViT-packed: each row of the batch holds several samples, told apart by segment ids.
- self-attention is restricted to the token's own sample (segment mask) with 3D RoPE from its
  per-sample (t, h, w) position;
- cross-attention reaches only the caption tokens of the token's own sample;
- timestep conditioning is per sample, broadcast to that sample's tokens, through adaLN-Zero. The
  timestep MLP runs once per sample (not per token or per block): each block adds its own learned
  offset table to the shared modulation, as PixArt-alpha's adaLN-single does. Gates start at zero, so
  every block starts as the identity.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sora_jax import sharding
from sora_jax.layers.attention import Attention
from sora_jax.layers.common import DTYPES, MLP, dense, gather_segments, norm, timestep_embedding
from sora_jax.layers.rope import rope_angles
from sora_jax.models.text import build_text_encoder


class PackedInputs(NamedTuple):
    """One packed batch as the model sees it.

    tokens [B, L, D_patch] noisy latent patches; positions [B, L, 3]; segments [B, L] (0 = padding);
    t [B, S] per-sample timestep in [0, 1] (sample k has segment id k + 1); text [B, Lt] ids;
    text_segments [B, Lt]; text_positions [B, Lt]; drop_text [B, S] True where the caption is replaced
    by the learned null embedding (classifier-free guidance); meta [B, S, 4] per-sample (fps, original
    height, original width, duration in s), read only by a model built with meta_conditioning.
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


def meta_features(meta: jax.Array) -> jax.Array:
    """log1p of (fps, height, width, duration): scale-free inputs for the conditioning MLP; 0 = unknown."""
    return jnp.log1p(jnp.maximum(meta.astype(jnp.float32), 0.0))


def modulate(x, shift, scale):
    return x * (1.0 + scale) + shift


class DiTBlock(nnx.Module):
    """Self-attention, cross-attention and MLP with adaLN-Zero modulation.

    The residual stream stays in float32 (the modulation is float32); every matmul and the attention
    kernels run in the compute dtype, which each layer casts its inputs to.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float, *, rngs: nnx.Rngs, backend: str, block: int,
                 dtype, param_dtype):
        kw = dict(rngs=rngs, backend=backend, block=block, dtype=dtype, param_dtype=param_dtype)
        self.norm1 = norm(dim, rngs=rngs, affine=False)
        self.attn = Attention(dim, heads, **kw)
        self.norm_cross = norm(dim, rngs=rngs, param_dtype=param_dtype)
        self.cross = Attention(dim, heads, **kw)
        self.norm2 = norm(dim, rngs=rngs, affine=False)
        self.mlp = MLP(dim, int(dim * mlp_ratio), rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.table = nnx.Param(jnp.zeros((6, dim), param_dtype), out_sharding=(None, "embed"))

    def __call__(self, x, mod, rope, segments, context, text_segments):
        mod = mod + self.table[...].reshape(-1)
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod, 6, axis=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1), segments, rope=rope)
        x = x + self.cross(self.norm_cross(x), segments, context=context, context_segments=text_segments)
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


def _run_block(block, x, mod, rope, segments, context, text_segments):
    return block(x, mod, rope, segments, context, text_segments)


class DiT(nnx.Module):
    """The video diffusion transformer; predicts the flow velocity for every token."""

    def __init__(self, model_cfg, text_cfg, patch_dim: int, vocab_size: int, *, rngs: nnx.Rngs):
        dim, dtype = model_cfg.hidden, DTYPES[model_cfg.dtype]
        param_dtype = DTYPES[model_cfg.get("param_dtype", "float32")]
        backend, block = model_cfg.attention, model_cfg.get("attention_block", 128)
        self.hidden, self.heads, self.rope_theta = dim, model_cfg.heads, model_cfg.rope_theta
        self.remat, self.scan_layers = model_cfg.get("remat", "none"), model_cfg.get("scan_layers", False)
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"config.model.remat={self.remat!r}; choose one of {sorted(REMAT_POLICIES)}.")
        self.patch_embed = dense(patch_dim, dim, ("patch", "embed"), rngs=rngs, dtype=dtype)
        self.text_encoder = build_text_encoder(text_cfg, vocab_size, rngs=rngs, backend=backend, block=block,
                                               dtype=dtype)
        self.text_proj = dense(self.text_encoder.out_dim, dim, (None, "embed"), rngs=rngs, dtype=dtype)
        self.null_text = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (dim,)), out_sharding=("embed",))
        self.t_mlp1 = dense(256, dim, (None, "embed"), rngs=rngs)
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
        make = lambda r: DiTBlock(dim, model_cfg.heads, model_cfg.mlp_ratio, rngs=r, backend=backend,  # noqa: E731
                                  block=block, dtype=dtype, param_dtype=param_dtype)
        if self.scan_layers:
            # One stacked set of block parameters (leading "layers" axis), run by nnx.scan: the block is
            # traced and compiled once, whatever the depth.
            self.blocks = nnx.vmap(make, in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})(
                rngs.fork().split(model_cfg.depth))
        else:
            self.blocks = nnx.List([make(rngs) for _ in range(model_cfg.depth)])
        self.final_norm = norm(dim, rngs=rngs, affine=False)
        self.final_mod = dense(dim, 2 * dim, ("embed", "mlp"), rngs=rngs, zero_init=True)
        self.final = dense(dim, patch_dim, ("embed", "patch"), rngs=rngs, zero_init=True, dtype=dtype)

    def encode_text(self, inputs: PackedInputs) -> jax.Array:
        """Caption embeddings [B, Lt, hidden], with dropped captions replaced by the null embedding."""
        ctx = self.text_proj(self.text_encoder(inputs.text, inputs.text_segments, inputs.text_positions))
        dropped = gather_segments(inputs.drop_text, inputs.text_segments)
        return jnp.where(dropped[..., None], self.null_text[...], ctx)

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

    def __call__(self, inputs: PackedInputs) -> jax.Array:
        # The residual stream is float32 (the modulation is); each layer casts its matmul inputs to the compute dtype.
        x = self.patch_embed(inputs.tokens).astype(jnp.float32)
        x = sharding.constrain(x, ("batch", "length", "act_embed"))
        context = self.encode_text(inputs)

        temb = self.t_mlp2(jax.nn.silu(self.t_mlp1(timestep_embedding(inputs.t, 256))))  # [B, S, D]
        if self.pooled_text is not None:
            temb = temb + self.pooled_text(self.pool_text(context, inputs.text_segments, inputs.t.shape[1]))
        if self.meta_mlp is not None:
            if inputs.meta is None:
                raise ValueError("this model conditions on per-sample metadata (config.model.meta_conditioning); "
                                 "pass PackedInputs.meta [B, S, 4] = (fps, height, width, duration).")
            temb = temb + self.meta_mlp(meta_features(inputs.meta))
        mod = gather_segments(self.t_mod(jax.nn.silu(temb)), inputs.segments)  # [B, L, 6D]
        final_mod = gather_segments(self.final_mod(jax.nn.silu(temb)), inputs.segments)

        rope = rope_angles(inputs.positions, self.hidden // self.heads, self.rope_theta)
        x = self.run_blocks(x, (mod, rope, inputs.segments, context, inputs.text_segments))
        shift, scale = jnp.split(final_mod, 2, axis=-1)
        return self.final(modulate(self.final_norm(x), shift, scale)).astype(jnp.float32)
