"""LoRA adapters on a model's linear layers (flax NNX's nnx.LoRA), their fingerprinted base, and merging.

`apply_lora` turns every nnx.Linear whose module path matches a target regex into a `LoRALinear`: the same
kernel and bias at the same parameter paths (so the base weights of a plain model load onto it unchanged)
plus an nnx.LoRA child whose `lora/lora_a` [..., in, rank] and `lora/lora_b` [..., rank, out] are
nnx.LoRAParam. The layer computes base(x) + (alpha / rank) * x A B; B starts at zero, so an adapted model
computes exactly what its base does until B trains. In a model whose blocks are scanned (stacked
parameters with a leading layer axis) each adapter gets that axis too.

nnx.LoRAParam subclasses nnx.Param: split a model with `nnx.split(model, nnx.LoRAParam, nnx.Param)` to get
(graphdef, adapters, base); the trainer trains the first and keeps the second frozen.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

# Attention (q, k, v, out of self- and cross-attention) and FFN projections of sora_jax.models.dit's blocks,
# with or without a block index (scanned blocks have none).
DEFAULT_TARGETS = (r"blocks/(\d+/)?(attn|cross)/(q|k|v|out)", r"blocks/(\d+/)?mlp/fc[12]")


class LoRATargetError(ValueError):
    """config.lora.targets are not valid regexes or match no linear layer of the model."""


class LoRALinear(nnx.Linear):
    """An nnx.Linear that adopts an existing layer's variables and adds a scaled nnx.LoRA beside it.

    The base kernel and bias stay at `kernel` and `bias` (the paths of the layer it replaces); the adapter
    lives at `lora` and is scaled by `scale` = alpha / rank.
    """

    def __init__(self, base: nnx.Linear, rank: int, alpha: float, *, rngs: nnx.Rngs):
        # nnx.Linear.__init__ would draw a new kernel; this layer takes over `base`'s variables instead.
        for name, value in vars(base).items():
            if not name.startswith("_pytree__"):
                setattr(self, name, value)
        kernel = base.kernel
        lead, axes = tuple(kernel.shape[:-2]), tuple(kernel.get_metadata().get("out_sharding") or
                                                     (None,) * kernel.ndim)
        he = nnx.initializers.he_uniform()
        # nnx.LoRA asks for (in, rank) and (rank, out); stacked (scanned) kernels need the layer axes in front.
        # Adapters are float32 whatever the base's dtype: their small updates would vanish in bfloat16.
        self.lora = nnx.LoRA(
            kernel.shape[-2], rank, kernel.shape[-1], rngs=rngs, dtype=base.dtype, param_dtype=jnp.float32,
            a_initializer=lambda key, shape, dtype: he(key, lead + shape, dtype),
            b_initializer=lambda key, shape, dtype: jnp.zeros(lead + shape, dtype),
            a_metadata={"out_sharding": axes[:-1] + (None,)},
            b_metadata={"out_sharding": axes[:-2] + (None, axes[-1])})
        self.scale = float(alpha) / rank

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        y = super().__call__(inputs, out_sharding=out_sharding)
        return y + (self.scale * self.lora(inputs)).astype(y.dtype)

    def merged_kernel(self) -> jax.Array:
        """kernel + scale * A @ B: the plain layer's kernel computing what this one does."""
        delta = jnp.matmul(self.lora.lora_a[...].astype(jnp.float32), self.lora.lora_b[...].astype(jnp.float32))
        return (self.kernel[...].astype(jnp.float32) + self.scale * delta).astype(self.kernel.dtype)


def _path(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def _compile(targets: str | Sequence[str]) -> list[re.Pattern]:
    """Target regexes (one string or several); each must match a whole module path such as blocks/0/attn/q."""
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if not targets:
        raise LoRATargetError("config.lora.targets is empty; name the layers to adapt, e.g. "
                         f"{DEFAULT_TARGETS}.")
    try:
        return [re.compile(t) for t in targets]
    except re.error as e:
        raise LoRATargetError(f"config.lora.targets holds an invalid regex ({e}).") from None


def apply_lora(model: nnx.Module, rank: int, alpha: float, targets: str | Sequence[str], *,
               rngs: nnx.Rngs) -> list[str]:
    """Replaces the nnx.Linear layers whose path fullmatches one of `targets` with LoRALinear, in place.

    Args:
      model: the model (concrete or abstract, e.g. under nnx.eval_shape).
      rank: the adapters' rank (> 0); alpha: their scale is alpha / rank.
      targets: regexes over module paths ("blocks/0/attn/q"; "blocks/attn/q" when blocks are scanned).
      rngs: draws the A matrices (B is zero).
    Returns:
      The adapted layers' paths, sorted.
    Raises:
      LoRATargetError: an invalid regex, or targets that match no linear layer (the message lists some paths).
    """
    patterns = _compile(targets)
    linears = {_path(p): m for p, m in nnx.iter_graph(model) if isinstance(m, nnx.Linear)
               and not isinstance(m, LoRALinear)}
    chosen = sorted(p for p in linears if p and any(t.fullmatch(p) for t in patterns))
    if not chosen:
        raise LoRATargetError(f"config.lora.targets={targets!r} matches none of the model's linear layers, e.g. "
                         f"{', '.join(sorted(linears)[:6])}.")
    for path in chosen:
        *parents, leaf = path.split("/")
        parent = model
        for part in parents:
            parent = parent[int(part)] if part.isdigit() else getattr(parent, part)
        wrapped = LoRALinear(linears[path], rank, alpha, rngs=rngs)
        if leaf.isdigit():
            parent[int(leaf)] = wrapped
        else:
            setattr(parent, leaf, wrapped)
    return chosen


def merged_params(model: nnx.Module) -> dict:
    """The plain model's parameters as a pure dict: every LoRALinear's adapter folded into its kernel and
    its `lora` entries dropped. A model without adapters gives its parameters as they are."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for path, module in nnx.iter_graph(model):
        if isinstance(module, LoRALinear):
            node = params
            for part in path:
                node = node[part]
            node["kernel"] = module.merged_kernel()
            del node["lora"]
    return params


def fingerprint(params: Any) -> jax.Array:
    """A float32 vector that identifies a set of weights: per tensor (sorted by path), its mean, mean square
    and a position-weighted mean (so a permutation shows). Sharded arrays stay sharded: no reshape, only
    elementwise products with broadcast per-axis weights and reductions. Equal weights give equal vectors up
    to the reduction order (compare with a tolerance: another mesh may sum in another order)."""
    stats = []
    for _, x in sorted(jax.tree_util.tree_leaves_with_path(params), key=lambda kv: jax.tree_util.keystr(kv[0])):
        x = x.astype(jnp.float32)
        weight = jnp.ones((), jnp.float32)
        for axis, n in enumerate(x.shape):
            w = jnp.cos(0.5 + 0.618034 * jnp.arange(n, dtype=jnp.float32))
            weight = weight * w.reshape((n,) + (1,) * (x.ndim - axis - 1))
        stats += [jnp.mean(x), jnp.mean(x * x), jnp.mean(x * weight)]
    return jnp.stack(stats)
