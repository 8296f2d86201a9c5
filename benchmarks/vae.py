"""VAE benchmark: peak memory against video length (streamed), and frames/s against diffusers.

  python benchmarks/vae.py [--size=32] [--lengths=33,1001] [--out=benchmarks/results]

Memory: each length runs in a fresh subprocess that streams procedurally made frames through
`encode_chunked` and `decode_chunked` (pieces are dropped as a writer would), and reports its peak RSS.
Speed: encode + decode of one 33-frame clip, ours (chunked, compiled, warm) and diffusers'
`AutoencoderKLWan` (its own chunked path) with the same weights on this CPU, measured in one run; the
ratio ours / theirs is the figure to compare, absolute times drift on a shared machine.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

BENCH = dict(base_dim=16, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])


def _ours(path):
    from sora_jax.convert import load_diffusers_vae
    return load_diffusers_vae(path)


def stream_peak_rss(path: str, frames: int, size: int) -> dict:
    """Runs in a subprocess: stream `frames` frames through encode and decode; returns peak RSS (MiB)."""
    import jax.numpy as jnp
    vae = _ours(path)
    rng = np.random.default_rng(0)

    def pieces():
        yield jnp.asarray(rng.uniform(-1, 1, (1, 1, size, size, 3)), jnp.float32)
        for _ in range((frames - 1) // 4):
            yield jnp.asarray(rng.uniform(-1, 1, (1, 4, size, size, 3)), jnp.float32)

    start = time.perf_counter()
    latent = vae.encode_chunked(pieces())
    decoded = 0
    for piece in vae.decode_chunked(latent):
        decoded += np.asarray(piece).shape[1]  # a writer would encode it to disk here
    return {"frames": frames, "decoded_frames": decoded, "seconds": time.perf_counter() - start,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def speed(path: str, size: int, frames: int = 33, repeats: int = 3) -> dict:
    import jax
    import jax.numpy as jnp
    import torch
    from diffusers import AutoencoderKLWan
    torch.set_num_threads(os.cpu_count())
    theirs = AutoencoderKLWan.from_pretrained(path).eval()
    ours = _ours(path)
    video = np.random.default_rng(0).uniform(-1, 1, (1, frames, size, size, 3)).astype(np.float32)
    video_t = torch.from_numpy(video).permute(0, 4, 1, 2, 3).contiguous()

    def run_ours():
        latent = ours.encode_chunked(jnp.asarray(video))
        for piece in ours.decode_chunked(latent):
            jax.block_until_ready(piece)

    def run_theirs():
        with torch.no_grad():
            theirs.decode(theirs.encode(video_t).latent_dist.mean)

    out = {}
    for name, fn in (("ours", run_ours), ("diffusers", run_theirs)):
        fn()  # warm-up (compilation for ours)
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        out[f"{name}_frames_per_sec"] = frames * repeats / (time.perf_counter() - start)
    out["ratio_ours_over_diffusers"] = out["ours_frames_per_sec"] / out["diffusers_frames_per_sec"]
    return out


def main():
    args = dict(a.lstrip("-").split("=", 1) for a in sys.argv[1:])
    if "child" in args:
        print(json.dumps(stream_peak_rss(args["path"], int(args["frames"]), int(args["size"]))))
        return
    size = int(args.get("size", 32))
    lengths = [int(x) for x in args.get("lengths", "33,1001").split(",")]
    import torch
    from diffusers import AutoencoderKLWan
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as path:
        AutoencoderKLWan(**BENCH).save_pretrained(path, safe_serialization=True)
        memory = []
        for frames in lengths:
            r = subprocess.run([sys.executable, __file__, "--child=1", f"--path={path}", f"--frames={frames}",
                                f"--size={size}"], capture_output=True, text=True, check=True)
            memory.append(json.loads(r.stdout.strip().splitlines()[-1]))
        result = {"date": time.strftime("%Y-%m-%d"), "config": BENCH, "frame_size": size, "memory": memory,
                  "peak_rss_ratio_longest_over_shortest": memory[-1]["peak_rss_mib"] / memory[0]["peak_rss_mib"],
                  **speed(path, size)}
    print(json.dumps(result, indent=2))
    out = args.get("out", "benchmarks/results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "vae.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
