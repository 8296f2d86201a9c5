"""Packed attention, forward + backward: the `blockwise` backend against the `xla` reference, in one run.

  python benchmarks/attention_packed.py [--tokens=4096] [--samples=8] [--heads=16] [--head_dim=72]
                                        [--blocks=128,256,512] [--dtype=float32] [--repeats=5]

One row of `tokens` holding `samples` equal samples (the issue's case: 8 samples in 4,096 tokens). The
work that matters is sum(n^2) over samples, 1/samples of the dense L^2, so `samples` is also the ratio a
perfect skip could reach against an equally efficient dense kernel. The script also times each sample
attended alone with the xla backend (the "one by one" bound). Prints a table and writes JSON; the figure
to compare is the ratio, measured within this run.
"""
from __future__ import annotations

import json
import os
import sys
import time
from datetime import date

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from sora_jax.layers.attention import xla_attention  # noqa: E402
from sora_jax.layers.blockwise import blockwise_attention  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("tokens", 4096, "Row length.")
flags.DEFINE_integer("samples", 8, "Equal samples packed into the row.")
flags.DEFINE_integer("heads", 16, "Attention heads.")
flags.DEFINE_integer("head_dim", 72, "Head dimension.")
flags.DEFINE_list("blocks", ["128", "256", "512"], "Block sizes of the blockwise backend to time.")
flags.DEFINE_string("dtype", "float32", "Compute dtype of q, k, v.")
flags.DEFINE_integer("repeats", 5, "Timed calls per variant (the minimum is reported).")
flags.DEFINE_string("out", "benchmarks/results/attention_packed.json", "JSON output path.")


def _fwd_bwd(fn):
    """jit(grad) of sum(out^2) w.r.t. q, k, v: forward and backward, as in training."""
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(jnp.square(fn(q, k, v).astype(jnp.float32))),
                            argnums=(0, 1, 2)))


def _time(f, args, repeats: int) -> float:
    jax.block_until_ready(f(*args))  # compile + warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(f(*args))
        best = min(best, time.perf_counter() - start)
    return best


def main(_):
    n, s = FLAGS.tokens, FLAGS.samples
    if n % s:
        raise SystemExit(f"--tokens={n} is not divisible by --samples={s}.")
    dtype = jnp.dtype(FLAGS.dtype)
    shape = (1, n, FLAGS.heads, FLAGS.head_dim)
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, shape, dtype) for key in keys)
    seg = jnp.asarray(np.repeat(np.arange(1, s + 1), n // s)[None].astype(np.int32))
    rows = {}
    rows["xla (dense, masked)"] = _time(_fwd_bwd(lambda q, k, v: xla_attention(q, k, v, seg, seg)), (q, k, v),
                                        FLAGS.repeats)
    for block in (int(b) for b in FLAGS.blocks):
        rows[f"blockwise block={block}"] = _time(
            _fwd_bwd(lambda q, k, v, b=block: blockwise_attention(q, k, v, seg, seg, block=b)), (q, k, v),
            FLAGS.repeats)
    one_seg = jnp.ones((1, n // s), jnp.int32)
    alone = _time(_fwd_bwd(lambda q, k, v: xla_attention(q, k, v, one_seg, one_seg)),
                  tuple(x[:, :n // s] for x in (q, k, v)), FLAGS.repeats)
    rows[f"xla, each sample alone (x{s})"] = alone * s
    base = rows["xla (dense, masked)"]
    print(f"\nPacked attention fwd+bwd: 1 x {n} tokens, {s} samples, {FLAGS.heads} heads x {FLAGS.head_dim}, "
          f"{FLAGS.dtype}, device {jax.devices()[0].device_kind} ({jax.default_backend()})")
    print(f"{'variant':36s} {'ms':>10s} {'speed-up vs xla':>16s}")
    for name, sec in rows.items():
        print(f"{name:36s} {sec * 1e3:10.1f} {base / sec:15.2f}x")
    record = dict(date=str(date.today()), device=jax.devices()[0].device_kind, backend=jax.default_backend(),
                  command=" ".join(sys.argv), tokens=n, samples=s, heads=FLAGS.heads, head_dim=FLAGS.head_dim,
                  dtype=FLAGS.dtype, ms={k: v * 1e3 for k, v in rows.items()},
                  speedup_vs_xla={k: base / v for k, v in rows.items()})
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
