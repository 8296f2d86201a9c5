"""Per-device parameter and optimizer-state bytes of a DiT at fsdp = 1, 2, 4, 8, against total / fsdp.

  python benchmarks/param_bytes.py [--config=configs/dit_xl.py] [--out=benchmarks/results]

Abstract only: `state_spec` under `sharding.use_mesh` on 8 simulated CPU devices (the rest of the 8 go
to the data axis), so nothing is allocated and a 675M-parameter model is measured in seconds. Prints a
table and writes benchmarks/results/param_bytes.json. Goal: parameters within 2% of total / fsdp on every
row (MaxText's sufficiently-sharded criterion, config.param_sharding_tolerance).

Without --config: configs/dit_xl.py when it exists, else configs/tiny.py widened to hidden 1152,
depth 4, 16 heads.
"""
from __future__ import annotations

import datetime
import json
import os
import sys

# 8 simulated devices; set before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from sora_jax import sharding  # noqa: E402
from sora_jax.train.state import state_spec  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "DiT config to measure (see the module docstring).")
flags.DEFINE_string("out", os.path.join(ROOT, "benchmarks", "results"), "Directory for the JSON result.")

FSDP_SIZES = (1, 2, 4, 8)
GOAL = 0.02


def default_config():
    """configs/dit_xl.py if present, else a medium DiT from configs/tiny.py; returns (name, config)."""
    if os.path.exists(os.path.join(ROOT, "configs", "dit_xl.py")):
        from configs import dit_xl
        return "configs/dit_xl.py", dit_xl.get_config()
    from configs import tiny
    config = tiny.get_config()
    config.model.update(hidden=1152, depth=4, heads=16)
    return "configs/tiny.py (hidden 1152, depth 4, heads 16)", config


def measure(config, fsdp: int) -> dict:
    """Per-device and total bytes of the abstract train state with the 8 devices split data x fsdp."""
    config.mesh.update(data=len(jax.devices()) // fsdp, fsdp=fsdp, tensor=1, context=1)
    config.param_sharding_tolerance = -1.0  # measure every row; the goal is judged below
    mesh = sharding.make_mesh(config.mesh)
    with sharding.use_mesh(mesh, sharding.rules_from_config(config)):
        spec = state_spec(config, mesh)
    row = {"fsdp": fsdp, "data": mesh.shape["data"]}
    for part in ("params", "opt_state", "ema"):
        row[f"{part}_total_bytes"], row[f"{part}_per_device_bytes"] = sharding.sharded_bytes(spec.abstract[part])
    row["state_total_bytes"], row["state_per_device_bytes"] = sharding.sharded_bytes(spec.abstract)
    row["param_count"] = sum(x.size for x in jax.tree.leaves(spec.abstract["params"]))
    for part in ("params", "opt_state", "state"):
        ideal = row[f"{part}_total_bytes"] / fsdp
        row[f"{part}_over_ideal"] = row[f"{part}_per_device_bytes"] / ideal - 1.0
    row["within_goal"] = row["params_over_ideal"] <= GOAL
    return row


def main(argv):
    del argv
    if FLAGS.config is None:
        name, config = default_config()
    else:
        name, config = config_flags.get_config_filename(FLAGS["config"]), FLAGS.config
    rows = [measure(config, fsdp) for fsdp in FSDP_SIZES]
    mib = 2**20
    print(f"{name}: {rows[0]['param_count'] / 1e6:.1f}M parameters, {len(jax.devices())} simulated devices")
    print(f"{'fsdp':>4} {'params/dev MiB':>15} {'total/fsdp':>11} {'over':>7} {'opt/dev MiB':>12} "
          f"{'over':>7} {'state/dev MiB':>14} {'over':>7}")
    for r in rows:
        print(f"{r['fsdp']:>4} {r['params_per_device_bytes'] / mib:>15.2f} "
              f"{r['params_total_bytes'] / r['fsdp'] / mib:>11.2f} {r['params_over_ideal']:>7.2%} "
              f"{r['opt_state_per_device_bytes'] / mib:>12.2f} {r['opt_state_over_ideal']:>7.2%} "
              f"{r['state_per_device_bytes'] / mib:>14.2f} {r['state_over_ideal']:>7.2%}")
    ok = all(r["within_goal"] for r in rows)
    print(f"goal (parameters within {GOAL:.0%} of total / fsdp on every row): {'met' if ok else 'NOT met'}")
    os.makedirs(FLAGS.out, exist_ok=True)
    path = os.path.join(FLAGS.out, "param_bytes.json")
    with open(path, "w") as f:
        json.dump({"date": datetime.date.today().isoformat(), "config": name, "devices": len(jax.devices()),
                   "model": {k: config.model[k] for k in ("hidden", "depth", "heads", "mlp_ratio")},
                   "goal": GOAL, "goal_met": ok, "rows": rows}, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
