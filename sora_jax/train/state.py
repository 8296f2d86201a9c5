"""The train state and its shardings, created sharded from the start.

The state is a plain pytree {step, params, opt_state, ema} whose params are pure dicts of arrays; the
model's structure (graphdef) is kept separately and merged with params inside jitted functions. The
abstract state (shapes + shardings) is computed without allocating anything, so a restore lands
directly in its sharded layout and no host ever holds the whole model.

With LoRA (config.lora.rank > 0) the model carries adapters (sora_jax.models.lora) and the state's params,
opt_state and EMA are the adapters' alone, plus base_fingerprint (sora_jax.models.lora.fingerprint of the
base weights they were trained on). The base weights are not state: they come from config.init_from at every
start and reach the step functions inside their `frozen` argument, {"task": task.frozen(), "base": weights},
sharded by their logical axes like parameters (StateSpec.frozen_inputs).
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
from sora_jax.models import lora


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
    # LoRA only: the frozen base weights' ShapeDtypeStructs (with shardings) and their shardings.
    base_abstract: Any = None
    base_shardings: Any = None
    rules: Any = sharding.DEFAULT_RULES  # the logical-axis rules the shardings above were made under

    @property
    def lora(self) -> bool:
        """Whether the trained params are LoRA adapters over frozen base weights."""
        return self.base_abstract is not None

    @property
    def weights_abstract(self):
        """The plain model's parameters (what config.init_from provides): the base under LoRA, else params."""
        return self.base_abstract if self.lora else self.abstract["params"]

    @property
    def frozen_shardings(self):
        """The task's frozen arrays and LoRA's base weights, sharded by their logical axes like parameters (a
        frozen array the task names no axes for is replicated)."""
        task = sharding.param_shardings(self.task.frozen_axes(), self.task.frozen(), self.mesh, self.rules)
        return {"task": task, "base": self.base_shardings} if self.lora else task

    def frozen_inputs(self, task_frozen, base=None):
        """The step functions' `frozen` argument: the task's frozen arrays, and under LoRA the base weights."""
        return {"task": task_frozen, "base": base} if self.lora else task_frozen

    @property
    def param_shardings(self):
        return self.shardings["params"]


def build_model(config, task, rngs: nnx.Rngs):
    """The task's model, with LoRA adapters on config.lora.targets when config.lora.rank > 0."""
    model = task.build_model(rngs)
    lora_cfg = config.get("lora")
    if lora_cfg is not None and lora_cfg.rank > 0:
        lora.apply_lora(model, lora_cfg.rank, lora_cfg.alpha or lora_cfg.rank, lora_cfg.targets, rngs=rngs)
    return model


def split_model(model):
    """(graphdef, trained params, frozen base params or None): adapters and base under LoRA."""
    if any(isinstance(m, lora.LoRALinear) for _, m in nnx.iter_graph(model)):
        graphdef, trained, base, rest = nnx.split(model, nnx.LoRAParam, nnx.Param, ...)
    else:
        (graphdef, trained, rest), base = nnx.split(model, nnx.Param, ...), None
    if jax.tree.leaves(rest):
        raise TypeError("models may hold only nnx.Param state (no RNG or batch statistics).")
    return graphdef, trained, base


def state_spec(config, mesh: Mesh, task=None) -> StateSpec:
    """Abstract train state and shardings for `config` on `mesh` (under the active logical-axis rules).

    Raises:
      sora_jax.models.lora.LoRATargetError: config.lora.targets match no linear layer (or are not valid regexes).
    """
    from sora_jax.tasks import build_task
    task = task or build_task(config)
    abstract_model = nnx.eval_shape(lambda: build_model(config, task, nnx.Rngs(config.seed)))
    graphdef, abstract_params, abstract_base = split_model(abstract_model)
    rules = sharding.current_rules()
    pure, logical = nnx.to_pure_dict(abstract_params), sharding.logical_axes(abstract_params)
    param_sh = sharding.param_shardings(logical, pure, mesh, rules)
    everything, everything_logical = pure, logical
    if abstract_base is not None:  # the sufficiently-sharded check covers the frozen base as well
        base_pure, base_logical = nnx.to_pure_dict(abstract_base), sharding.logical_axes(abstract_base)
        base_sh = sharding.param_shardings(base_logical, base_pure, mesh, rules)
        everything, everything_logical = ({"lora": pure, "base": base_pure},
                                          {"lora": logical, "base": base_logical})
    report = sharding.assert_params_sufficiently_sharded(
        everything_logical, everything, mesh, config.get("param_sharding_tolerance", 0.02), rules)
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
    to_abstract = lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh)  # noqa: E731
    if abstract_base is None:
        abstract = jax.tree.map(to_abstract, shapes, shardings)
        return StateSpec(graphdef, abstract, shardings, tx, mesh, task, report, rules=rules)
    # A LoRA checkpoint records which base its adapters belong to (checked on every restore).
    shardings["base_fingerprint"] = replicated
    shapes["base_fingerprint"] = jax.eval_shape(lora.fingerprint, base_pure)
    abstract = jax.tree.map(to_abstract, shapes, shardings)
    return StateSpec(graphdef, abstract, shardings, tx, mesh, task, report,
                     base_abstract=jax.tree.map(to_abstract, base_pure, base_sh), base_shardings=base_sh, rules=rules)


def init_state(config, spec: StateSpec, weights=None) -> dict:
    """Initialises the train state directly into its shardings (jit with out_shardings).

    weights: config.init_from's weights (the plain model's parameters, sharded like spec.weights_abstract).
    Without LoRA they are the starting params and EMA (a fine-tune: step 0 and a fresh optimizer); with LoRA
    they are the frozen base (required), and the state records their fingerprint while the adapters start
    with B = 0.
    """
    if spec.lora and weights is None:
        raise ValueError("a LoRA train state needs its base weights (config.init_from).")

    def init(weights):
        model = build_model(config, spec.task, nnx.Rngs(config.seed))
        _, trained, _ = split_model(model)  # under LoRA the random base is dropped (never computed: XLA prunes it)
        params = weights if weights is not None and not spec.lora else nnx.to_pure_dict(trained)
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": spec.tx.init(params),
                 "ema": jax.tree.map(jnp.copy, params), "lr_scale": jnp.ones((), jnp.float32)}
        if spec.lora:
            state["base_fingerprint"] = lora.fingerprint(weights)
        return state
    return jax.jit(init, out_shardings=spec.shardings)(weights)


def count_params(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))
