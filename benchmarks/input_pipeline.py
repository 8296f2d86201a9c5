"""Input-pipeline throughput on this machine's CPU: cached latents, and raw H.264 decode at 256p and 480p.

  python benchmarks/input_pipeline.py [--quick] [--out=benchmarks/results]

Everything it reads is made in a temporary folder first:
  latents  `--latent_records` msgpack records in ArrayRecord shards, in the format `python -m sora_jax.encode`
           writes (Wan-like latents, 3x32x56x16 = 9 frames at 256x448 through a 4x8x8 VAE with 16 channels),
           read by the packed pipeline (source "latents", autoencoder "latent": no encoding, patch 1x2x2).
  raw      `--clips` synthetic H.264 MP4s per size (a textured background panning under a moving disc, so the
           encoder makes real motion vectors and residuals; one slice per frame, as ffmpeg's libx264 writes
           by default, so FFmpeg decodes each file on one core), in a JSONL manifest (source "folder").

Measured, one after another in this process (the device-side train step in a subprocess):
  codec    PyAV decoding every frame of the files to RGB: the ceiling of any clip reader.
  decode   the decode stage alone (pipeline.source_dataset: ManifestSource -> DecodeMedia), one thread,
           clip_frames 9 and 17 at 8 fps from 24 fps files (every 3rd native frame is kept).
  packed   the whole packed pipeline (pipeline.packed_dataset: decode, patchify, tokenise, pack, batch) with
           data.num_threads 1 and 2, and data.workers 2 (grain multiprocessing).
  train    `benchmarks/train_step.py --config=configs/tiny.py`: the tokens/s the tiny pixel-space DiT's train
           step consumes on the same CPU, the anchor of the "x train step" column (input tokens/s / that).

Packed rates cover whole packing rounds: grain's best-fit packer fills `packing_bins` rows before it emits
any, so the clock starts after the first batch and stops after a whole number of rounds. Absolute rates on
a shared machine drift; compare rows of one run. Both sides of the "x train step" ratio ran on the same
cores here; on a training host the step runs on the accelerator and the input has the CPU to itself.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import av  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from PIL import Image  # noqa: E402

from configs.common import base_config  # noqa: E402
from data_pipelines import pipeline  # noqa: E402
from data_pipelines.latents import shard_name  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_bool("quick", False, "A short run (~1.5 min): 4 clips per size, 6 decode examples, 1 round, 2 steps.")
flags.DEFINE_string("out", "benchmarks/results", "Directory for input_pipeline.json.")
flags.DEFINE_integer("latent_records", 256, "Cached latent records to write.")
flags.DEFINE_list("latent_shape", ["3", "32", "56", "16"], "Latent (T', H', W', C) of every record.")
flags.DEFINE_integer("clips", 8, "Synthetic MP4s per size.")
flags.DEFINE_integer("clip_length", 72, "Native frames per MP4 (at 24 fps; 17 frames at 8 fps need 49).")
flags.DEFINE_list("sizes", ["256x448", "480x848"], "HxW of the synthetic MP4s.")
flags.DEFINE_list("decode_clip_frames", ["9", "17"], "data.clip_frames for the decode-stage runs.")
flags.DEFINE_integer("packed_clip_frames", 9, "data.clip_frames for the packed runs.")
flags.DEFINE_integer("max_sample_tokens", 9 * 32 * 56,
                     "Raw runs' token budget per sample: 9 frames of 256x448 in 8x8 pixel patches (no downscale).")
flags.DEFINE_integer("seq_len", 16384, "Raw runs' tokens per packed row.")
flags.DEFINE_integer("raw_packing_bins", 16, "Raw runs' packing rows per round (rows of 16k pixel tokens are big).")
flags.DEFINE_integer("rounds", 3, "Packing rounds timed per packed run.")
flags.DEFINE_float("min_seconds", 4.0, "Shortest timed window per decode or packed run (--quick: 1.5).")
flags.DEFINE_integer("decode_examples", 24, "Fewest examples timed per decode-stage run.")
flags.DEFINE_integer("train_steps", 5, "Tiny train steps timed for the anchor (0: skip it).")

_CAPTION = "clip {k}: a bright disc drifts across a textured background while the camera pans right"


# ---------------------------------------------------------------------------------------------- data


def write_latent_shards(out: str, count: int, shape, shards: int = 4, seed: int = 0) -> None:
    """Writes `count` records of random latents as `python -m sora_jax.encode` does (manifest + shards)."""
    from array_record.python.array_record_module import ArrayRecordWriter
    from flax import serialization

    rng = np.random.default_rng(seed)
    per_shard = -(-count // shards)
    t, h, w, c = shape
    manifest = {"num_examples": count, "shard_size": per_shard, "split": "train", "shards": shards,
                "autoencoder": {"name": "latent", "channels": c, "stride": [4, 8, 8]}, "latent_channels": c,
                "data_seed": seed}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    for k in range(shards):
        writer = ArrayRecordWriter(os.path.join(out, shard_name(k, shards)), "group_size:1")
        for index in range(k * per_shard, min((k + 1) * per_shard, count)):
            latent = rng.standard_normal((t, h, w, c), dtype=np.float32)
            writer.write(serialization.msgpack_serialize({
                "latent": latent, "caption": _CAPTION.format(k=index), "index": index,
                "frames": 1 + 4 * (t - 1), "height": 8 * h, "width": 8 * w}))
        writer.close()


def synthetic_frames(height: int, width: int, frames: int, seed: int) -> np.ndarray:
    """uint8 (frames, height, width, 3): a detailed texture panning 4 px a frame under a moving bright disc."""
    rng = np.random.default_rng(seed)
    pan = 4 * frames
    coarse = rng.uniform(0, 255, (height // 16 + 2, (width + pan) // 16 + 2, 3)).astype(np.uint8)
    texture = np.asarray(Image.fromarray(coarse).resize((width + pan, height), Image.Resampling.BICUBIC), np.int16)
    texture = np.clip(texture + rng.normal(0, 10, texture.shape), 0, 255).astype(np.uint8)  # fine detail
    yy, xx = np.mgrid[:height, :width]
    radius = height / 8
    out = np.empty((frames, height, width, 3), np.uint8)
    for i in range(frames):
        frame = texture[:, pan - 4 * i: pan - 4 * i + width].copy()
        cy = height / 2 + height / 4 * np.sin(i / 7)
        cx = (i / frames) * width
        frame[(yy - cy) ** 2 + (xx - cx) ** 2 < radius ** 2] = (250, 240, 200)
        out[i] = frame
    return out


def write_clips(folder: str, height: int, width: int, clips: int, length: int, fps: int = 24) -> str:
    """Encodes `clips` H.264 MP4s (libx264 veryfast, crf 23, a keyframe every 2 s, one slice per frame).

    Returns the path of a JSONL manifest that lists each file many times: grain's index shuffle costs ~3 ms
    an element over 8 elements (0.1 ms over 256, nothing at real dataset sizes), which would otherwise be
    charged to decoding.
    """
    os.makedirs(folder, exist_ok=True)
    lines = []
    for k in range(clips):
        name = f"clip{k:03d}.mp4"
        with av.open(os.path.join(folder, name), "w") as container:
            stream = container.add_stream("libx264", rate=fps, options={"preset": "veryfast", "crf": "23"})
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.codec_context.gop_size = 2 * fps
            # One slice per frame, as ffmpeg's own libx264 default writes: PyAV's default (slice threads)
            # would cut frames into slices that FFmpeg then decodes on several cores, hiding the decode cost.
            stream.codec_context.thread_type = "FRAME"
            for frame in synthetic_frames(height, width, length, seed=k):
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
        lines.append(json.dumps({"path": name, "caption": _CAPTION.format(k=k)}))
    manifest = os.path.join(folder, "manifest.jsonl")
    with open(manifest, "w") as f:
        f.write("\n".join(lines * max(1, 256 // clips)) + "\n")
    return manifest


# -------------------------------------------------------------------------------------------- configs


def _config(**data):
    c = base_config()
    c.text.update(tokenizer="bytes", vocabulary=(), max_len=128)  # real captions, as configs/tiny_videos.py
    c.data.update(text_len=512, **data)
    return c


def latent_config(latent_dir: str, threads: int, workers: int):
    """Cached Wan-like latents: no encoding in the pipeline (autoencoder "latent"), 1x2x2 patches."""
    c = _config(source="latents", latent_dir=latent_dir, seq_len=4096, num_threads=threads, workers=workers)
    c.autoencoder.update(name="latent", channels=int(FLAGS.latent_shape[3]), stride=(4, 8, 8))
    c.model.patch = (1, 2, 2)
    return c


def raw_config(manifest: str, clip_frames: int, threads: int = 1, workers: int = 0):
    """Pixel space (identity autoencoder, 8x8 patches) from a folder of MP4s at 8 fps."""
    return _config(source="folder", manifest=manifest, fps=8.0, clip_frames=clip_frames,
                   max_sample_tokens=FLAGS.max_sample_tokens, seq_len=FLAGS.seq_len,
                   packing_bins=FLAGS.raw_packing_bins, num_threads=threads, workers=workers)


# ------------------------------------------------------------------------------------------- measures


def time_codec(folder: str) -> dict:
    """Every frame of every MP4 in `folder` decoded to an RGB array by PyAV (FFmpeg's defaults)."""
    names = sorted(name for name in os.listdir(folder) if name.endswith(".mp4"))
    size = sum(os.path.getsize(os.path.join(folder, name)) for name in names)
    frames, start = 0, time.perf_counter()
    for name in names:
        with av.open(os.path.join(folder, name)) as container:
            for frame in container.decode(video=0):
                frame.to_ndarray(format="rgb24")
                frames += 1
    elapsed = time.perf_counter() - start
    return {"frames": frames, "frames_per_sec": frames / elapsed, "bitrate_kbps": size * 8 / (frames / 24) / 1000}


def time_decode(config, examples: int, min_seconds: float) -> dict:
    """The decode stage alone: elements of pipeline.source_dataset (shuffled, repeated, DecodeMedia), one thread.

    Times at least `examples` elements and at least `min_seconds`, after one warm-up element.
    """
    ds = pipeline.source_dataset(config, "train")
    first = ds[0]  # warm-up: opens the libraries' lazy pieces
    t0 = time.perf_counter()
    i = done = frames = native = tokens = 0
    while i < examples or time.perf_counter() - t0 < min_seconds:
        i += 1
        ex = ds[i]
        if ex is None:
            continue
        t, h, w = ex["video"].shape[:3]
        stride = round(24.0 / float(ex["meta"][0]))
        done, frames, native, tokens = done + 1, frames + t, native + 1 + (t - 1) * stride, tokens + t * h * w // 64
    elapsed = time.perf_counter() - t0
    return {"examples": done, "seconds": elapsed, "examples_per_sec": done / elapsed,
            "frames_per_sec": frames / elapsed, "native_frames_spanned_per_sec": native / elapsed,
            "tokens_per_sec": tokens / elapsed, "clip_shape": list(first["video"].shape)}


def time_packed(config, rounds: int, min_seconds: float) -> dict:
    """Batches of pipeline.packed_dataset in whole packing rounds, after a warm-up.

    The first batch holds the start-up and one packing round (each worker's packer fills `packing_bins`
    rows before it emits any). While the main process waits for it, threads and worker processes work
    ahead, so two more rounds per worker are read before the clock starts; the clock then runs for `rounds`
    rounds per worker and at least `min_seconds` (fast pipelines), always ending, like the warm-up, just after
    a round's first batch.
    """
    rows = config.data.global_batch_rows
    per_round = max(1, config.data.packing_bins // rows) * max(1, config.data.workers)
    pixels = config.autoencoder.name == "identity" and config.model.patch[0] == 1
    t0 = time.perf_counter()
    it = iter(pipeline.packed_dataset(config))
    batch = next(it)
    first = time.perf_counter() - t0
    for _ in range(2 * per_round):
        next(it)
    t1 = time.perf_counter()
    examples = tokens = slots = batches = frames = 0
    while batches < rounds * per_round or time.perf_counter() - t1 < min_seconds:
        for _ in range(per_round):
            batch = next(it)
            examples += int(np.sum(batch["info"][..., 3] > 0))
            frames += int(np.sum(batch["info"][..., 0]))  # token frames: video frames in pixel space
            tokens += int(np.sum(batch["video_segment_ids"] > 0))
            slots += batch["video_segment_ids"].size
        batches += per_round
    elapsed = time.perf_counter() - t1
    info = batch["info"][batch["info"][..., 3] > 0]
    del it  # stops the worker processes before the next run
    return {"first_batch_sec": first, "batches": batches, "examples": examples, "seconds": elapsed,
            "examples_per_sec": examples / elapsed, "tokens_per_sec": tokens / elapsed,
            "padding": 1 - tokens / slots, "token_grid": [int(v) for v in info[0, :3]],
            **({"frames_per_sec": frames / elapsed} if pixels else {})}


def time_train_step(steps: int) -> dict | None:
    """benchmarks/train_step.py on configs/tiny.py in a subprocess; its JSON (real_tokens_per_sec etc.)."""
    if steps <= 0:
        return None
    here = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run([sys.executable, os.path.join(here, "train_step.py"), "--config=configs/tiny.py",
                               f"--steps={steps}", f"--out={out}"], cwd=os.path.dirname(here), capture_output=True,
                              text=True)
        if done.returncode:
            raise RuntimeError(f"benchmarks/train_step.py failed (exit {done.returncode}):\n{done.stderr[-3000:]}\n"
                               "rerun with --train_steps=0 to skip the anchor.")
        with open(os.path.join(out, "train_step.json")) as f:
            return json.load(f)


# ------------------------------------------------------------------------------------------- report


def _fmt(v, digits=1):
    return "" if v is None else f"{v:,.{digits}f}"


def print_table(rows: list[dict], anchor: float | None) -> None:
    head = ("stage", "data", "clip", "threads/workers", "ex/s", "tokens/s", "frames/s", "x train step",
            "first batch s")
    print("| " + " | ".join(head) + " |\n|" + " --- |" * len(head))
    for r in rows:
        ratio = r["tokens_per_sec"] / anchor if anchor and "tokens_per_sec" in r else None
        cells = (r["stage"], r["data"], str(r.get("clip_frames", "")), r.get("parallel", ""),
                 _fmt(r.get("examples_per_sec")), _fmt(r.get("tokens_per_sec"), 0), _fmt(r.get("frames_per_sec")),
                 _fmt(ratio, 2) + ("x" if ratio else ""), _fmt(r.get("first_batch_sec")))
        print("| " + " | ".join(cells) + " |")
    if anchor:
        print(f"\nanchor: configs/tiny.py train step consumes {anchor:,.0f} real tokens/s on this CPU.")


def _parallel(threads: int, workers: int) -> str:
    return f"{threads} thread{'s' * (threads > 1)}" + (f", {workers} workers" if workers else "")


def run(tmp: str) -> dict:
    quick = FLAGS.quick
    rounds = 1 if quick else FLAGS.rounds
    min_seconds = 1.5 if quick else FLAGS.min_seconds
    settings = [(1, 0), (2, 0), (1, 2)]
    rows = []

    latent_dir = os.path.join(tmp, "latents")
    write_latent_shards(latent_dir, FLAGS.latent_records, [int(v) for v in FLAGS.latent_shape])
    for threads, workers in settings:
        r = time_packed(latent_config(latent_dir, threads, workers), rounds, min_seconds)
        rows.append(dict(stage="packed", data="latents " + "x".join(FLAGS.latent_shape), patch="1x2x2",
                         parallel=_parallel(threads, workers), **r))
        print(rows[-1], flush=True)

    for size in FLAGS.sizes:
        height, width = (int(v) for v in size.split("x"))
        folder = os.path.join(tmp, f"mp4_{size}")
        manifest = write_clips(folder, height, width, 4 if quick else FLAGS.clips, FLAGS.clip_length)
        rows.append(dict(stage="codec", data=f"{size} h264", parallel="ffmpeg default", **time_codec(folder)))
        print(rows[-1], flush=True)
        for clip_frames in (int(v) for v in FLAGS.decode_clip_frames):
            r = time_decode(raw_config(manifest, clip_frames), 6 if quick else FLAGS.decode_examples, min_seconds)
            rows.append(dict(stage="decode", data=f"{size} h264", clip_frames=clip_frames, parallel="1 thread", **r))
            print(rows[-1], flush=True)
        for threads, workers in settings:
            r = time_packed(raw_config(manifest, FLAGS.packed_clip_frames, threads, workers), rounds, min_seconds)
            rows.append(dict(stage="packed", data=f"{size} h264", clip_frames=FLAGS.packed_clip_frames, patch="1x8x8",
                             parallel=_parallel(threads, workers), **r))
            print(rows[-1], flush=True)
    return {"rows": rows, "train_step": time_train_step(2 if quick else FLAGS.train_steps)}


def main(argv):
    del argv
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="input_pipeline_") as tmp:
        result = run(tmp)
    anchor = result["train_step"]["real_tokens_per_sec"] if result["train_step"] else None
    for r in result["rows"]:
        if anchor and "tokens_per_sec" in r:
            r["x_train_step"] = r["tokens_per_sec"] / anchor
    result.update({
        "date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()}-core CPU", "quick": FLAGS.quick,
        "command": " ".join(["python", "benchmarks/input_pipeline.py", *sys.argv[1:]]),
        "load_average_before": list(load_before), "load_average_after": list(os.getloadavg()),
        "settings": {"max_sample_tokens": FLAGS.max_sample_tokens, "seq_len": FLAGS.seq_len,
                     "raw_packing_bins": FLAGS.raw_packing_bins, "latent_seq_len": 4096, "latent_packing_bins": 64,
                     "global_batch_rows": 8, "fps": 8.0, "native_fps": 24, "clip_length": FLAGS.clip_length},
    })
    print_table(result["rows"], anchor)
    os.makedirs(FLAGS.out, exist_ok=True)
    with open(os.path.join(FLAGS.out, "input_pipeline.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)
