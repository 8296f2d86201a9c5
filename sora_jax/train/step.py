"""The train and eval steps, each jitted once with explicit shardings."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from sora_jax import sharding
from sora_jax.diffusion.flow import flow_loss
from sora_jax.train.state import StateSpec


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
    """EMA decay with warm-up, so early EMA weights are not dominated by the random init."""
    step = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def make_train_step(config, spec: StateSpec, batch_example: dict):
    """Returns train_step(state, batch) -> (state, metrics), jitted with donated state.

    The noise key is fold_in(seed, step): the same step sees the same noise whether or not the run
    was interrupted, which is what makes resumed training bitwise-identical.
    """
    graphdef, tx = spec.graphdef, spec.tx
    base_key = jax.random.key(config.seed)

    def train_step(state, batch):
        key = jax.random.fold_in(base_key, state["step"])

        def loss_fn(params):
            return flow_loss(nnx.merge(graphdef, params), batch, key, config.flow, config.flow.caption_dropout)

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        decay = ema_decay_at(state["step"], config.ema_decay)
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state["ema"], params)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "real_tokens": aux["real_tokens"]}
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "ema": ema}, metrics

    batch_sh = {k: sharding.batch_sharding(spec.mesh) for k in batch_example}
    replicated = NamedSharding(spec.mesh, P())
    return jax.jit(train_step, in_shardings=(spec.shardings, batch_sh),
                   out_shardings=(spec.shardings, replicated), donate_argnums=(0,))


def make_eval_step(config, spec: StateSpec, batch_example: dict):
    """Returns eval_loss(params, batch, index) with fixed timesteps (batch["t"]) and fixed noise."""
    graphdef = spec.graphdef
    base_key = jax.random.key(config.seed + 1)

    def eval_step(params, batch, index):
        key = jax.random.fold_in(base_key, index)
        loss, _ = flow_loss(nnx.merge(graphdef, params), batch, key, config.flow, caption_dropout=0.0)
        return loss

    batch_sh = {k: sharding.batch_sharding(spec.mesh) for k in batch_example}
    replicated = NamedSharding(spec.mesh, P())
    return jax.jit(eval_step, in_shardings=(spec.param_shardings, batch_sh, replicated), out_shardings=replicated)
