"""Train-step throughput of a config, as a ratio to this machine's own matmul throughput.

  python benchmarks/train_step.py [--config=configs/tiny.py] [--steps=10] [--out=benchmarks/results]

Prints and saves (JSON) tokens/s, the step's FLOPs (XLA cost analysis), the achieved FLOP/s, a dense
float32 matmul's FLOP/s measured in the same run, and their ratio ("matmul utilisation"). Absolute
times on a shared machine drift; the ratio is the figure to compare.
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from data_pipelines import pipeline  # noqa: E402
from sora_jax import sharding  # noqa: E402
from sora_jax.train.state import init_state, state_spec  # noqa: E402
from sora_jax.train.step import make_train_step  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config to measure.")
flags.DEFINE_integer("steps", 10, "Timed steps (after one warm-up step).")
flags.DEFINE_string("out", "benchmarks/results", "Directory for the JSON result.")


def matmul_flops_per_sec(n: int = 2048, repeats: int = 10) -> float:
    """float32 n x n matmul throughput of the default device."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        out = f(a)
    out.block_until_ready()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def main(argv):
    del argv
    config = FLAGS.config
    mesh = sharding.make_mesh(config.mesh)
    it = iter(pipeline.packed_dataset(config))
    batches = [next(it) for _ in range(FLAGS.steps + 1)]
    with sharding.use_mesh(mesh, sharding.rules_from_config(config)):
        spec = state_spec(config, mesh)
        state = init_state(config, spec)
        compiled = make_train_step(config, spec, batches[0]).lower(
            state, sharding.host_to_global(batches[0], mesh), {}).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        step_flops = float(cost.get("flops", float("nan")))
        state, m = compiled(state, sharding.host_to_global(batches[0], mesh), {})
        jax.block_until_ready(m)
        start, real = time.perf_counter(), 0.0
        for b in batches[1:]:
            state, m = compiled(state, sharding.host_to_global(b, mesh), {})
            real += float(np.sum(b["video_segment_ids"] > 0))
        jax.block_until_ready(m)
        elapsed = time.perf_counter() - start
    peak = matmul_flops_per_sec()
    achieved = step_flops * FLAGS.steps / elapsed
    result = {
        "date": time.strftime("%Y-%m-%d"), "device": str(jax.devices()[0].device_kind),
        "devices": jax.device_count(), "steps": FLAGS.steps,
        "step_seconds": elapsed / FLAGS.steps, "real_tokens_per_sec": real / elapsed,
        "step_gflops": step_flops / 1e9, "achieved_gflops_per_sec": achieved / 1e9,
        "matmul_gflops_per_sec": peak / 1e9, "matmul_utilisation": achieved / peak,
    }
    print(json.dumps(result, indent=2))
    os.makedirs(FLAGS.out, exist_ok=True)
    with open(os.path.join(FLAGS.out, "train_step.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)
