"""Our DiT train step against diffusers' WanTransformer3DModel of the same size, in one run.

  python benchmarks/peer_dit.py                                  # small, sized for a 2-core CPU
  python benchmarks/peer_dit.py --preset=xl --compile --peak_tflops=989   # DiT-XL on one H100/H200

Both models see the same number of video tokens per row (patch 1x2x2 over 16-channel latents, 64
features a token) and the same caption length, on the same device, in one process: jax takes its default
device, torch takes cuda when it is available. After a warm-up (compilation) the two are timed in
alternating rounds and the medians are reported, so background load on a shared machine hits both alike.
Each step is forward + backward + optimizer update; the peer also clips gradients and updates an EMA, as
our step does (`--nopeer_match_step` drops both, as in the GPU.md baseline).

Model FLOPs follow /work/shared/GPU.md and depend on sizes only, so both models are charged the same
for the same work: 6 x matmul parameters per video token x real tokens, 12 x depth x hidden x sum n^2
for self-attention, and the cross-attention terms (key/value projections of caption tokens, and
12 x depth x hidden x sum n m for the scores). MFU is against `--peak_tflops`, or by default against the
best of a 2048^2 jnp matmul and a torch matmul measured in the same run in the compute dtype.

`--samples_per_row=k` packs k equal samples (k divides the latent frames) into each of our rows; the
peer cannot pack and keeps one sample per row, so its attention covers the whole row.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import sys
import time

# Both frameworks hold device memory at once; jax must not take 75% of the GPU up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from absl import app, flags  # noqa: E402

PRESETS = {
    # hidden 384, 1,024 tokens: a couple of minutes for both models on a 2-core CPU.
    "small": dict(heads=6, head_dim=64, depth=4, ffn=1536, rows=1, latent=(4, 32, 32)),
    # DiT-XL (GPU.md's baseline): hidden 1152, 28 blocks, 2 rows of 8 x 32 x 32 = 8,192 tokens.
    "xl": dict(heads=16, head_dim=72, depth=28, ffn=4608, rows=2, latent=(8, 64, 64)),
}

FLAGS = flags.FLAGS
flags.DEFINE_enum("preset", "small", list(PRESETS), "Model and batch sizes; the flags below override them.")
flags.DEFINE_integer("heads", None, "Attention heads.")
flags.DEFINE_integer("head_dim", None, "Channels per head (hidden = heads x head_dim).")
flags.DEFINE_integer("depth", None, "Transformer blocks.")
flags.DEFINE_integer("ffn", None, "MLP width (our mlp_ratio = ffn / hidden).")
flags.DEFINE_integer("rows", None, "Rows per batch (the peer's batch size).")
flags.DEFINE_list("latent", None, "Latent frames,height,width of one row (tokens = T * H/2 * W/2).")
flags.DEFINE_integer("samples_per_row", 1, "Equal samples packed in each of our rows (the peer keeps 1).")
flags.DEFINE_integer("text_len", 12, "Caption tokens per sample.")
flags.DEFINE_integer("text_dim", 128, "Caption embedding width (the peer's text_dim, our text.width).")
flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"],
                  "Compute dtype of both (auto: bfloat16 on a GPU, float32 elsewhere); weights stay float32.")
flags.DEFINE_string("attention", "auto", "Our config.model.attention ('xla' if this checkout lacks 'auto').")
flags.DEFINE_string("remat", None, "Our config.model.remat (default: the config's).")
flags.DEFINE_boolean("scan_layers", None, "Our config.model.scan_layers (default: the config's).")
flags.DEFINE_boolean("compile", False, "torch.compile the peer.")
flags.DEFINE_boolean("peer_match_step", True, "The peer also clips gradients and keeps an EMA, as ours does.")
flags.DEFINE_enum("only", "both", ["both", "ours", "peer"], "Measure one side only (e.g. when both do not fit).")
flags.DEFINE_integer("cpu_threads", 0, "If > 0, both run on this many cores (on a shared CPU, 1 keeps torch's "
                     "OpenMP barriers from waiting on a descheduled thread); 0 leaves each its default.")
flags.DEFINE_integer("rounds", 5, "Alternating timed rounds.")
flags.DEFINE_integer("steps", 2, "Steps per model per round.")
flags.DEFINE_integer("warmup", 2, "Untimed steps per model before timing (the first compiles).")
flags.DEFINE_float("peak_tflops", None, "Peak for MFU (989 for bf16 on H100/H200); default: measured matmul.")
flags.DEFINE_string("out", None, "JSON path (default benchmarks/results/peer_dit_<preset>_<platform>.json).")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The shared model and batch sizes; the patch is 1x2x2 over 16 latent channels for both."""
    heads: int
    head_dim: int
    depth: int
    ffn: int
    rows: int
    latent: tuple[int, int, int]
    samples_per_row: int
    text_len: int
    text_dim: int
    channels: int = 16
    patch: tuple[int, int, int] = (1, 2, 2)

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim

    @property
    def grid(self) -> tuple[int, int, int]:
        """Token grid of one row."""
        return tuple(s // p for s, p in zip(self.latent, self.patch))

    @property
    def tokens_per_row(self) -> int:
        return int(np.prod(self.grid))

    @property
    def patch_features(self) -> int:
        return self.channels * int(np.prod(self.patch))

    def sample_grid(self, k: int) -> tuple[int, int, int]:
        """Token grid of each of k equal samples of a row (the frames are split between them)."""
        nt, nh, nw = self.grid
        if nt % k:
            raise ValueError(f"--samples_per_row={k} must divide the row's {nt} latent frames.")
        return nt // k, nh, nw


def sizes_from_flags() -> Sizes:
    """The preset, with any size flag given on the command line in its place."""
    s = dict(PRESETS[FLAGS.preset])
    for name in ("heads", "head_dim", "depth", "ffn", "rows"):
        if FLAGS[name].value is not None:
            s[name] = FLAGS[name].value
    if FLAGS.latent:
        s["latent"] = tuple(int(v) for v in FLAGS.latent)
    sizes = Sizes(samples_per_row=FLAGS.samples_per_row, text_len=FLAGS.text_len, text_dim=FLAGS.text_dim, **s)
    if any(v % p for v, p in zip(sizes.latent, sizes.patch)):
        raise ValueError(f"--latent={sizes.latent} must divide by the patch {sizes.patch}.")
    sizes.sample_grid(sizes.samples_per_row)  # raises if the frames do not split
    return sizes


def model_flops(sizes: Sizes, samples_per_row: int) -> float:
    """GPU.md's model FLOPs of one train step whose rows each hold `samples_per_row` equal samples."""
    h, d = sizes.hidden, sizes.depth
    # Per video token: self-attention q/k/v/o, cross-attention q/o, the MLP, patch embedding and output.
    per_token = d * (4 * h * h + 2 * h * h + 2 * h * sizes.ffn) + 2 * sizes.patch_features * h
    n = sizes.tokens_per_row // samples_per_row  # video tokens of one sample
    m = sizes.text_len  # caption tokens of one sample
    samples = sizes.rows * samples_per_row
    dense = 6 * per_token * n * samples
    self_attn = 12 * d * h * n * n * samples
    cross = 6 * (2 * d * h * h) * m * samples + 12 * d * h * n * m * samples  # caption k/v, then the scores
    return float(dense + self_attn + cross)


def _time_loop(fn, sync, min_seconds: float = 0.3) -> float:
    """Seconds per call of fn, doubling the call count until a batch of calls lasts min_seconds."""
    sync(fn())
    count = 1
    while True:
        start = time.perf_counter()
        for _ in range(count):
            out = fn()
        sync(out)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return elapsed / count
        count *= 2


def matmul_tflops(compute_dtype: str, torch_device: torch.device, n: int = 2048) -> dict:
    """This machine's n x n matmul throughput in the compute dtype, through jnp and through torch."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(compute_dtype))
    f = jax.jit(lambda x: x @ x)
    jax_s = _time_loop(lambda: f(a), jax.block_until_ready)
    b = torch.randn(n, n, device=torch_device, dtype=getattr(torch, compute_dtype))
    torch_s = _time_loop(lambda: b @ b, lambda _: _torch_sync(torch_device))
    flops = 2.0 * n ** 3
    return {"jax": flops / jax_s / 1e12, "torch": flops / torch_s / 1e12}


def _torch_sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------- ours


def _latent_autoencoder_dir(tmpdir: str) -> str:
    """A VAE checkpoint directory holding only vae_config.json (16 latent channels, no weights).

    The DiT's patch width comes from the autoencoder's channel count, and the identity autoencoder has 3
    channels, so no pixel patch gives the peer's 1 x 2 x 2 x 16 = 64 features. The "vae" autoencoder reads
    its channel count from vae_config.json and loads weights only to encode or decode, which a train step
    on synthetic latents never does.
    """
    from sora_jax.models.vae import VAEConfig
    cfg = {k: v for k, v in dataclasses.asdict(VAEConfig(z_dim=16)).items() if v is not None}
    with open(os.path.join(tmpdir, "vae_config.json"), "w") as f:
        json.dump(cfg, f)
    return tmpdir


def _attention_backend(name: str) -> str:
    """`name` if this checkout accepts it; 'auto' falls back to 'xla' where it does not exist yet."""
    from sora_jax.layers import attention
    accepted = getattr(attention, "BACKEND_CHOICES", tuple(attention.ATTENTION_BACKENDS))
    if name in accepted:
        return name
    if name == "auto":
        print("config.model.attention='auto' is not accepted by this checkout; using 'xla'.")
        return "xla"
    raise ValueError(f"--attention={name!r}; choose one of {sorted(accepted)}.")


def our_config(sizes: Sizes, compute_dtype: str, ae_dir: str):
    """configs/dit_xl.py when it exists (else configs/common.py base_config), resized to `sizes`."""
    import importlib.util
    if importlib.util.find_spec("configs.dit_xl") is not None:
        from configs.dit_xl import get_config
        config, source = get_config(), "configs/dit_xl.py"
    else:
        from configs.common import base_config
        config, source = base_config(), "configs/common.py:base_config"
    model = dict(hidden=sizes.hidden, depth=sizes.depth, heads=sizes.heads, mlp_ratio=sizes.ffn / sizes.hidden,
                 patch=sizes.patch, dtype=compute_dtype, attention=_attention_backend(FLAGS.attention))
    for name in ("remat", "scan_layers"):
        if FLAGS[name].value is not None:
            model[name] = FLAGS[name].value
    missing = sorted(set(model) - set(config.model.keys()))
    if missing:  # an unlocked ConfigDict would silently grow a field the model never reads
        raise ValueError(f"{source} has no config.model field(s) {missing}; this checkout predates them.")
    config.model.update(model)
    config.autoencoder.update(name="vae", checkpoint=ae_dir)
    # The peer takes precomputed caption embeddings: ours gets a zero-layer text encoder of the same width
    # (embedding lookup + norm), so neither spends a caption transformer.
    config.text.update(width=sizes.text_dim, depth=0, max_len=sizes.text_len)
    k = sizes.samples_per_row
    config.data.update(seq_len=sizes.tokens_per_row, text_len=k * sizes.text_len, max_samples_per_row=k,
                       global_batch_rows=sizes.rows)
    config.flow.prediction = "velocity"  # the peer's target too
    return config, source


def our_batch(sizes: Sizes, vocab_size: int, seed: int = 0) -> dict:
    """A synthetic packed batch in data_pipelines/pipeline.py's layout, rows of k equal samples."""
    from sora_jax import patching
    k, rows, lt = sizes.samples_per_row, sizes.rows, sizes.text_len
    grid = sizes.sample_grid(k)
    n = int(np.prod(grid))
    rng = np.random.default_rng(seed)
    info = np.zeros((k, 5), np.int32)
    info[:, :3], info[:, 3], info[:, 4] = grid, n, np.arange(k)

    def per_row(x):
        return np.broadcast_to(x, (rows,) + x.shape).copy()

    return {
        "video": rng.standard_normal((rows, k * n, sizes.patch_features), np.float32),
        "video_pos": per_row(np.tile(patching.positions(grid), (k, 1))),
        "video_segment_ids": per_row(np.repeat(np.arange(1, k + 1, dtype=np.int32), n)),
        "text": rng.integers(3, vocab_size, (rows, k * lt), dtype=np.int32),
        "text_segment_ids": per_row(np.repeat(np.arange(1, k + 1, dtype=np.int32), lt)),
        "text_positions": per_row(np.tile(np.arange(lt, dtype=np.int32), k)),
        "info": per_row(info),
    }


class OursRunner:
    """Our train state and jitted train step (compiled ahead of time under the config's mesh)."""

    name = "ours"

    def __init__(self, sizes: Sizes, compute_dtype: str, ae_dir: str):
        from sora_jax import sharding
        from sora_jax.layers import attention
        from sora_jax.models.text import build_tokenizer
        from sora_jax.train.state import count_params, init_state, state_spec
        from sora_jax.train.step import make_train_step

        config, self.config_source = our_config(sizes, compute_dtype, ae_dir)
        resolve = getattr(attention, "resolve_backend", lambda name: name)
        self.details = {"config": self.config_source, "attention": config.model.attention,
                        "attention_resolved": resolve(config.model.attention),
                        "remat": config.model.get("remat"), "scan_layers": config.model.get("scan_layers")}
        host_batch = our_batch(sizes, build_tokenizer(config.text).vocab_size)
        mesh = sharding.make_mesh(config.mesh)
        # Tracing reads the active mesh and rules (activation constraints), so compile inside the scope.
        with sharding.use_mesh(mesh, sharding.rules_from_config(config)):
            spec = state_spec(config, mesh)
            self.state = init_state(config, spec)
            self.batch = sharding.host_to_global(host_batch, mesh)
            self.step = make_train_step(config, spec, host_batch).lower(self.state, self.batch, {}).compile()
        self.params = count_params(self.state["params"])
        self.tokens_per_step = int(np.sum(host_batch["video_segment_ids"] > 0))
        self.flops = model_flops(sizes, sizes.samples_per_row)
        self.loss = float("nan")

    def run(self, steps: int) -> float:
        """Seconds for `steps` train steps, waiting for the last to finish."""
        start = time.perf_counter()
        for _ in range(steps):
            self.state, metrics = self.step(self.state, self.batch, {})
        jax.block_until_ready(metrics)
        elapsed = time.perf_counter() - start
        self.loss = float(metrics["loss"])
        return elapsed

    def peak_memory_gib(self) -> float | None:
        stats = jax.local_devices()[0].memory_stats() or {}
        return stats["peak_bytes_in_use"] / 2 ** 30 if "peak_bytes_in_use" in stats else None


# ---------------------------------------------------------------------------------------------------- peer


class PeerRunner:
    """diffusers' WanTransformer3DModel trained by flow matching with AdamW, float32 master weights."""

    name = "peer"

    def __init__(self, sizes: Sizes, compute_dtype: str, device: torch.device, compile_model: bool,
                 match_step: bool):
        from diffusers import WanTransformer3DModel

        torch.manual_seed(0)
        model = WanTransformer3DModel(
            patch_size=sizes.patch, num_attention_heads=sizes.heads, attention_head_dim=sizes.head_dim,
            in_channels=sizes.channels, out_channels=sizes.channels, text_dim=sizes.text_dim, freq_dim=256,
            ffn_dim=sizes.ffn, num_layers=sizes.depth, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads").to(device).train()
        self.weights = [p for p in model.parameters() if p.requires_grad]
        fused = device.type == "cuda"
        # Our optimizer's settings (configs/common.py): AdamW b2 0.99, weight decay 0.01, clipping at 1.
        self.opt = torch.optim.AdamW(self.weights, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.01,
                                     **({"fused": True} if fused else {"foreach": True}))
        self.ema = [p.detach().clone() for p in self.weights] if match_step else None
        self.model = torch.compile(model) if compile_model else model
        self.device, self.autocast = device, compute_dtype == "bfloat16"
        self.x0 = torch.randn(sizes.rows, sizes.channels, *sizes.latent, device=device)
        self.text = torch.randn(sizes.rows, sizes.text_len, sizes.text_dim, device=device)
        self.params = sum(p.numel() for p in self.weights)
        self.tokens_per_step = sizes.rows * sizes.tokens_per_row
        self.flops = model_flops(sizes, 1)
        self.loss = float("nan")
        self.details = {"compile": compile_model, "match_step": match_step, "fused_adamw": fused,
                        "autocast_bf16": self.autocast}

    def _step(self) -> torch.Tensor:
        """One rectified-flow step: x_t = (1 - t) x0 + t eps, velocity target eps - x0, as ours."""
        rows = self.x0.shape[0]
        t = torch.sigmoid(torch.randn(rows, device=self.device))  # logit-normal timesteps
        noise = torch.randn_like(self.x0)
        tb = t.view(rows, 1, 1, 1, 1)
        xt = (1.0 - tb) * self.x0 + tb * noise
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            pred = self.model(xt, t * 1000.0, self.text, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), noise - self.x0)
        loss.backward()
        if self.ema is not None:
            torch.nn.utils.clip_grad_norm_(self.weights, 1.0, foreach=True)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(self.ema, self.weights, 1.0 - 0.999)
        return loss.detach()

    def run(self, steps: int) -> float:
        """Seconds for `steps` train steps, waiting for the device to finish."""
        start = time.perf_counter()
        for _ in range(steps):
            loss = self._step()
        _torch_sync(self.device)
        elapsed = time.perf_counter() - start
        self.loss = float(loss)
        return elapsed

    def peak_memory_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / 2 ** 30 if self.device.type == "cuda" else None


# ---------------------------------------------------------------------------------------------------- timing


def alternate(runners: list, warmup: int, rounds: int, steps: int) -> dict[str, list[float]]:
    """Seconds per step of each runner in each round; the order flips every round so neither always
    runs right after the other (caches, clocks, background load)."""
    for r in runners:
        r.run(warmup)
    per_step = {r.name: [] for r in runners}
    for i in range(rounds):
        for r in (runners if i % 2 == 0 else runners[::-1]):
            per_step[r.name].append(r.run(steps) / steps)
            print(f"  round {i + 1}/{rounds} {r.name}: {per_step[r.name][-1] * 1e3:.1f} ms/step", flush=True)
    return per_step


def summarize(runner, seconds: list[float], peak_tflops: float, own_matmul_tflops: float) -> dict:
    """Median step time, tokens/s, model TFLOP/s and MFU of one runner.

    mfu_vs_own_matmul divides by the runner's own framework's matmul rate instead: on a CPU the two
    frameworks' BLAS libraries can differ by several times, and this separates that from the rest.
    """
    step = statistics.median(seconds)
    achieved = runner.flops / step / 1e12
    return {
        "params": runner.params, "tokens_per_step": runner.tokens_per_step, "step_seconds_median": step,
        "step_seconds": seconds, "tokens_per_sec": runner.tokens_per_step / step,
        # The fastest round: the least disturbed by other jobs when a shared machine's load comes and goes.
        "tokens_per_sec_best": runner.tokens_per_step / min(seconds),
        "model_tflop_per_step": runner.flops / 1e12, "model_tflops": achieved, "mfu": achieved / peak_tflops,
        "mfu_vs_own_matmul": achieved / own_matmul_tflops,
        "peak_memory_gib": runner.peak_memory_gib(), "last_loss": runner.loss, **runner.details,
    }


def print_table(results: dict, peak: dict) -> None:
    header = f"{'':6}{'params':>12}{'tokens/step':>13}{'ms/step':>10}{'tokens/s':>11}{'TFLOP/step':>12}" \
             f"{'TFLOP/s':>10}{'MFU':>8}{'MFU(own mm)':>13}"
    print(header)
    for name, r in results.items():
        print(f"{name:6}{r['params']:>12,}{r['tokens_per_step']:>13,}{r['step_seconds_median'] * 1e3:>10.1f}"
              f"{r['tokens_per_sec']:>11,.0f}{r['model_tflop_per_step']:>12.4f}{r['model_tflops']:>10.3f}"
              f"{r['mfu']:>8.1%}{r['mfu_vs_own_matmul']:>13.1%}")
    if len(results) == 2:
        ours, peer = results["ours"], results["peer"]
        print(f"ours / peer tokens/s: {ours['tokens_per_sec'] / peer['tokens_per_sec']:.3f} (medians), "
              f"{ours['tokens_per_sec_best'] / peer['tokens_per_sec_best']:.3f} (fastest rounds)")
    print(f"peak {peak['used']:.3f} TFLOP/s ({peak['source']}); measured matmul TFLOP/s: "
          + ", ".join(f"{k} {v:.3f}" for k, v in peak["measured_matmul_tflops"].items()))


def limit_cpu_threads(n: int) -> None:
    """Runs both frameworks on n cores: torch's OpenMP pool gets n threads, and this process is pinned to n
    cores, which XLA's CPU client reads to size its thread pool (it has no thread-count flag). Must precede
    jax's first backend use; threads started later inherit the pinning."""
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:n])
    torch.set_num_threads(n)


def measure_peak(compute_dtype: str, device: torch.device) -> dict:
    """Both frameworks' matmul rates, and the peak MFU divides by (--peak_tflops, else the better rate)."""
    measured = matmul_tflops(compute_dtype, device)
    return {"measured_matmul_tflops": measured, "dtype": compute_dtype,
            "used": FLAGS.peak_tflops or max(measured.values()),
            "source": "--peak_tflops" if FLAGS.peak_tflops else f"best measured 2048^2 {compute_dtype} matmul"}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


def write_record(sizes: Sizes, compute_dtype: str, device: torch.device, peak: dict, results: dict) -> str:
    """Writes the run's JSON (to --out, or a name built from the preset, platform and threads)."""
    record = {
        "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python"] + sys.argv),
        "device": {"jax": jax.devices()[0].device_kind, "jax_platform": jax.default_backend(),
                   "torch": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
                   "host_cpus": os.cpu_count()},
        "versions": {"jax": jax.__version__, "torch": torch.__version__},
        "sizes": {**dataclasses.asdict(sizes), "hidden": sizes.hidden, "tokens_per_row": sizes.tokens_per_row},
        "compute_dtype": compute_dtype, "cpu_threads": FLAGS.cpu_threads or None, "rounds": FLAGS.rounds,
        "steps_per_round": FLAGS.steps, "peak": peak, **results,
    }
    if len(results) == 2:
        ours, peer = results["ours"], results["peer"]
        record["tokens_per_sec_ratio_ours_over_peer"] = ours["tokens_per_sec"] / peer["tokens_per_sec"]
        record["best_round_ratio_ours_over_peer"] = ours["tokens_per_sec_best"] / peer["tokens_per_sec_best"]
    threads = f"_{FLAGS.cpu_threads}thread" if FLAGS.cpu_threads > 0 else ""
    out = FLAGS.out or os.path.join("benchmarks", "results",
                                    f"peer_dit_{FLAGS.preset}_{jax.default_backend()}{threads}.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(record, f, indent=2)
    return out


def main(argv):
    del argv
    import tempfile

    if FLAGS.cpu_threads > 0:
        limit_cpu_threads(FLAGS.cpu_threads)
    sizes = sizes_from_flags()
    on_gpu = jax.default_backend() == "gpu"
    compute_dtype = FLAGS.dtype if FLAGS.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"sizes {sizes}; {sizes.rows} x {sizes.tokens_per_row} tokens; {compute_dtype}; jax "
          f"{jax.devices()[0].device_kind}, torch {device}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:  # holds the weightless VAE config while ours is built
        runners = []
        if FLAGS.only != "peer":
            runners.append(OursRunner(sizes, compute_dtype, _latent_autoencoder_dir(tmp)))
        if FLAGS.only != "ours":
            runners.append(PeerRunner(sizes, compute_dtype, device, FLAGS.compile, FLAGS.peer_match_step))
    per_step = alternate(runners, FLAGS.warmup, FLAGS.rounds, FLAGS.steps)
    peak = measure_peak(compute_dtype, device)
    own = {"ours": peak["measured_matmul_tflops"]["jax"], "peer": peak["measured_matmul_tflops"]["torch"]}
    results = {r.name: summarize(r, per_step[r.name], peak["used"], own[r.name]) for r in runners}
    print_table(results, peak)
    print(f"wrote {write_record(sizes, compute_dtype, device, peak, results)}")


if __name__ == "__main__":
    app.run(main)
