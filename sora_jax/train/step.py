"""The train and eval steps, each jitted once with explicit shardings; the loss comes from the task."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from sora_jax import sharding
from sora_jax.train.state import StateSpec


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
    """EMA decay with warm-up, so early EMA weights are not dominated by the random init."""
    step = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def _batch_shardings(mesh, batch_example: dict) -> dict:
    return {k: sharding.batch_sharding(mesh) for k, _ in sharding.device_items(batch_example)}


def _model_and_frozen(spec: StateSpec, params, frozen):
    """(model, the task's frozen arrays): under LoRA, `frozen` also carries the base weights the adapters
    (params) are merged with."""
    if spec.lora:
        return nnx.merge(spec.graphdef, params, frozen["base"]), frozen["task"]
    return nnx.merge(spec.graphdef, params), frozen


def make_train_step(config, spec: StateSpec, batch_example: dict):
    """Returns train_step(state, batch, frozen) -> (state, metrics), jitted with donated state.

    The noise key is fold_in(seed, step): the same step sees the same noise whether or not the run
    was interrupted, which is what makes resumed training bitwise-identical. Under LoRA only the adapters
    (state["params"]) are differentiated and updated; the base weights in `frozen` never change.
    """
    tx, task = spec.tx, spec.task
    base_key = jax.random.key(config.seed)
    skip_nonfinite = config.get("nonfinite", "stop") == "skip"

    def train_step(state, batch, frozen):
        key = jax.random.fold_in(base_key, state["step"])

        def loss_fn(params):
            model, task_frozen = _model_and_frozen(spec, params, frozen)
            return task.loss(model, task_frozen, batch, key, state["step"])

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        updates = jax.tree.map(lambda u: u * state["lr_scale"].astype(u.dtype), updates)
        params = optax.apply_updates(state["params"], updates)
        decay = ema_decay_at(state["step"], config.ema_decay)
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state["ema"], params)
        grad_norm = optax.tree.norm(grads)
        # The state after the update is what a checkpoint would hold, so that is what is judged.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(params))
        new = {"params": params, "opt_state": opt_state, "ema": ema}
        if skip_nonfinite:  # config.nonfinite="skip": a non-finite step leaves the state as it was
            new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, {k: state[k] for k in new})
        metrics = {"loss": loss, "grad_norm": grad_norm, "nonfinite": 1.0 - finite.astype(jnp.float32), **aux}
        # Whatever else the state holds (lr_scale; base_fingerprint under LoRA) passes through unchanged.
        return {**state, **new, "step": state["step"] + 1}, metrics

    replicated = NamedSharding(spec.mesh, P())
    return jax.jit(train_step, in_shardings=(spec.shardings, _batch_shardings(spec.mesh, batch_example),
                                             spec.frozen_shardings),
                   out_shardings=(spec.shardings, replicated), donate_argnums=(0,))


def make_eval_step(config, spec: StateSpec, batch_example: dict):
    """Returns eval_metrics(params, batch, frozen, index) -> dict of scalars, with fixed noise per index."""
    task = spec.task
    base_key = jax.random.key(config.seed + 1)

    def eval_step(params, batch, frozen, index):
        key = jax.random.fold_in(base_key, index)
        model, task_frozen = _model_and_frozen(spec, params, frozen)
        return task.eval_metrics(model, task_frozen, batch, key)

    replicated = NamedSharding(spec.mesh, P())
    return jax.jit(eval_step, in_shardings=(spec.param_shardings, _batch_shardings(spec.mesh, batch_example),
                                            spec.frozen_shardings, replicated), out_shardings=replicated)
