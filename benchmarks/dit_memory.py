"""Train-step memory of configs/dit_xl.py at 2 x 8,192 tokens, per remat policy, with and without scan.

  python benchmarks/dit_memory.py [--remat=none,full,save_dots] [--scan=on,off] [--topology=cpu:1]
      [--hbm_gib=80] [--out=benchmarks/results]

Each variant's train step is compiled, never run, from abstract inputs (sora_jax.aot) and XLA's memory
analysis of the compiled program gives the per-device bytes: arguments (the train state and the batch),
temporaries (activations kept for the backward pass and working buffers) and their total, checked
against --hbm_gib (80: one H100). The default target is one simulated CPU device; `--topology=cpu:1,v5p-2`
adds the TPU compiler's view of one v5p chip (libtpu, `pip install -e '.[aot]'`), whose scheduling is
closer to an accelerator's. A compiler that checks HBM itself (TPU) refuses a step that does not fit, so
such a row has no figures, only fits=false. Unrolled variants (scan off) take minutes each to compile on
a CPU. Prints a table and writes benchmarks/results/dit_memory.json.

Measured 2026-11-23 (GiB per device; state = 9.3 GiB of arguments in every row):
  remat       scan   cpu:1 total   v5p-2 (one v5p chip) total
  none        on     139.7         refused by the compiler (97.8 GiB of temporaries > 95.7)
  full        on      19.3          22.7
  save_dots   on      40.7          34.6
  none/full/save_dots off  119.5 / 120.6 / 119.5  (not measured on TPU)
With unrolled layers XLA:CPU's schedule undoes remat (every policy alike), while the TPU compiler keeps
it (2 unrolled layers: none 7.9, full 5.7, save_dots 5.4 GiB): compare policies with scan on.
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from sora_jax import aot  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("remat", ["none", "full", "save_dots"], "config.model.remat policies to compile.")
flags.DEFINE_list("scan", ["on", "off"], "config.model.scan_layers settings: on, off.")
flags.DEFINE_list("topology", ["cpu:1"], "Targets (sora_jax.aot), e.g. cpu:1,v5p-2.")
flags.DEFINE_float("hbm_gib", 80.0, "Per-device memory to check against (80: an H100).")
flags.DEFINE_string("out", "benchmarks/results", "Directory for dit_memory.json.")


def measure(topology: str, remat: str, scan: bool) -> dict:
    """One variant's row: per-device GiB, whether it fits, compile seconds, or the error it hit."""
    from configs import dit_xl
    config = dit_xl.get_config()
    config.model.update(remat=remat, scan_layers=scan)
    row = {"topology": topology, "remat": remat, "scan_layers": scan}
    start = time.perf_counter()
    try:
        report = aot.compile_train_step(config, topology, FLAGS.hbm_gib)
    except aot.DoesNotFitError as e:
        report = e.report
        row["error"] = str(e).splitlines()[0][:300]
    except Exception as e:  # noqa: BLE001 -- a variant that cannot compile is a result, not a crash
        row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}", fits=None)
        return row
    row["compile_seconds"] = round(time.perf_counter() - start, 1)
    row["device_kind"] = report.get("device_kind")
    row["tokens"] = config.data.global_batch_rows * config.data.seq_len
    row["params"] = report["params"]["count"]
    for key in ("arguments", "outputs", "aliased", "temporaries", "total"):
        if "memory" in report:
            row[f"{key}_gib"] = round(report["memory"][key] / aot.GIB, 3)
    row["fits"] = report.get("fits")
    return row


def table(rows: list[dict]) -> str:
    lines = [f"{'target':<8}{'remat':<11}{'scan':<6}{'args GiB':>10}{'temp GiB':>10}{'total GiB':>11}"
             f"{'fits':>7}{'compile s':>11}"]
    for r in rows:
        num = lambda k: f"{r[k]:.2f}" if k in r else "-"  # noqa: E731
        lines.append(f"{r['topology']:<8}{r['remat']:<11}{'on' if r['scan_layers'] else 'off':<6}"
                     f"{num('arguments_gib'):>10}{num('temporaries_gib'):>10}{num('total_gib'):>11}"
                     f"{str(r.get('fits')):>7}{r.get('compile_seconds', '-'):>11}")
        if r.get("error") and r.get("fits") is not False:
            lines.append(f"    error: {r['error']}")
    return "\n".join(lines)


def main(argv):
    del argv
    # Before JAX starts: the CPU target sets the simulated device count.
    aot.prepare_platform(aot.parse_target(FLAGS.topology[0]))
    rows = []
    for topology in FLAGS.topology:
        for scan in FLAGS.scan:
            for remat in FLAGS.remat:
                rows.append(measure(topology, remat, scan == "on"))
                print(table(rows[-1:]).split("\n", 1)[1], flush=True)
    print(table(rows))
    result = {"date": time.strftime("%Y-%m-%d"), "config": "configs/dit_xl.py", "hbm_gib": FLAGS.hbm_gib,
              "batch": "2 rows x 8192 tokens", "method": "XLA memory analysis of the compiled train step "
              "(sora_jax.aot.compile_train_step), per device; nothing executed", "rows": rows}
    os.makedirs(FLAGS.out, exist_ok=True)
    with open(os.path.join(FLAGS.out, "dit_memory.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)
