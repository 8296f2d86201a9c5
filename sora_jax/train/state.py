"""The train state and its shardings, created sharded from the start.

The state is a plain pytree {step, params, opt_state, ema} whose params are pure dicts of arrays; the
model's structure (graphdef) is kept separately and merged with params inside jitted functions. The
abstract state (shapes + shardings) is computed without allocating anything, so a restore lands
directly in its sharded layout and no host ever holds the whole model.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sora_jax import sharding


def make_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformation:
    """AdamW with linear warmup, then constant or cosine decay, after global-norm clipping.

    Update k (counting from 0) uses lr * min((k + 1) / warmup_steps, 1): the first update already moves
    the weights (lr / warmup_steps), and warmup_steps=0 means the full rate from the first step. The
    cosine schedule then decays from lr at update warmup_steps towards 0 at update total_steps.
    The second moment is always float32; the first may be bfloat16 (config.optim.mu_dtype).
    """
    if optim_cfg.schedule not in ("constant", "cosine"):
        raise ValueError(f"config.optim.schedule={optim_cfg.schedule!r}; choose 'constant' or 'cosine'.")
    peak, warmup, cosine = float(optim_cfg.lr), int(optim_cfg.warmup_steps), optim_cfg.schedule == "cosine"
    decay_steps = max(total_steps - warmup, 1)

    def lr(count):
        # optax.linear_schedule(0, lr, warmup) would give update 0 a rate of 0: a wasted step, and with
        # warmup_steps=0 every step would be (optax treats 0 transition steps as "stay at the start").
        count = jnp.asarray(count, jnp.float32)
        rate = peak * (jnp.minimum((count + 1.0) / warmup, 1.0) if warmup > 0 else 1.0)
        if cosine:
            progress = jnp.clip((count - warmup) / decay_steps, 0.0, 1.0)
            rate = rate * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return rate

    return optax.chain(
        optax.clip_by_global_norm(optim_cfg.grad_clip) if optim_cfg.grad_clip > 0 else optax.identity(),
        optax.adamw(lr, b1=optim_cfg.b1, b2=optim_cfg.b2, weight_decay=optim_cfg.weight_decay,
                    mu_dtype=jnp.dtype(optim_cfg.get("mu_dtype", "float32"))))


@dataclasses.dataclass
class StateSpec:
    """Everything known about the train state before it exists."""
    graphdef: Any
    abstract: Any  # ShapeDtypeStructs carrying their shardings
    shardings: Any
    tx: optax.GradientTransformation
    mesh: Mesh
    task: Any
    param_report: Any = None  # sharding.ParamShardingReport of the parameters on this mesh

    @property
    def frozen_shardings(self):
        """The task's frozen arrays are replicated on every device."""
        return jax.tree.map(lambda _: NamedSharding(self.mesh, P()), self.task.frozen())

    @property
    def param_shardings(self):
        return self.shardings["params"]


def state_spec(config, mesh: Mesh, task=None) -> StateSpec:
    """Abstract train state and shardings for `config` on `mesh` (under the active logical-axis rules)."""
    from sora_jax.tasks import build_task
    task = task or build_task(config)
    abstract_model = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(config.seed)))
    graphdef, abstract_params, rest = nnx.split(abstract_model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise TypeError("models may hold only nnx.Param state (no RNG or batch statistics).")
    pure = nnx.to_pure_dict(abstract_params)
    logical, rules = sharding.logical_axes(abstract_params), sharding.current_rules()
    param_sh = sharding.param_shardings(logical, pure, mesh, rules)
    report = sharding.assert_params_sufficiently_sharded(
        logical, pure, mesh, config.get("param_sharding_tolerance", 0.02), rules)
    tx = make_optimizer(config.optim, config.total_steps)
    abstract_opt = jax.eval_shape(tx.init, pure)
    replicated = NamedSharding(mesh, P())
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_sh,
                                   transform_non_params=lambda _: replicated)
    # lr_scale multiplies every update: 1 until a non-finite rollback lowers it (config.nonfinite), and
    # checkpointed with the rest so a resumed run keeps the lowered rate.
    shardings = {"step": replicated, "params": param_sh, "opt_state": opt_sh, "ema": param_sh, "lr_scale": replicated}
    shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": pure, "opt_state": abstract_opt, "ema": pure,
              "lr_scale": jax.ShapeDtypeStruct((), jnp.float32)}
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    return StateSpec(graphdef, abstract, shardings, tx, mesh, task, report)


def init_state(config, spec: StateSpec) -> dict:
    """Initialises the train state directly into its shardings (jit with out_shardings)."""
    def init():
        model = spec.task.build_model(nnx.Rngs(config.seed))
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": spec.tx.init(params),
                "ema": jax.tree.map(jnp.copy, params), "lr_scale": jnp.ones((), jnp.float32)}
    return jax.jit(init, out_shardings=spec.shardings)()


def count_params(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))
